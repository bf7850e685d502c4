"""The rows of the comparison: how each method's model is built from the pipeline's artifacts."""
from __future__ import annotations

from pathlib import Path

DENSE = Path("artifacts/dense")
PRIOR = Path("artifacts/prior")
HARDEN = Path("artifacts/harden")

# sparsegpt_noupdate: the MaskLLM authors' prior (dense-model Hessians, no OBS update) on the dense weights
ROWS = ("dense", "magnitude", "wanda", "sparsegpt", "sparsegpt_maskonly", "sparsegpt_noupdate", "maskllm")

LABELS = {"dense": "dense", "magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT",
          "sparsegpt_maskonly": "SparseGPT mask only", "sparsegpt_noupdate": "SparseGPT, no update (MaskLLM prior)",
          "maskllm": "MaskLLM"}


def label(row: str) -> str:
    """A row's name for readers (a row without a label keeps its key)."""
    return LABELS.get(row, row)


def row_mask_path(row: str) -> Path | None:
    if row == "dense":
        return None
    if row == "maskllm":
        return HARDEN / "mask.safetensors"
    method = row.removesuffix("_maskonly")
    return PRIOR / method / "mask.safetensors"


def row_weights_path(row: str) -> Path | None:
    """SparseGPT's row uses its OBS-updated weights; its mask-only row keeps the dense ones."""
    return PRIOR / "sparsegpt" / "weights.safetensors" if row == "sparsegpt" else None

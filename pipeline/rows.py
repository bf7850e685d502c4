"""The rows of the comparison: how each method's model is built from the pipeline's artifacts."""
from __future__ import annotations

from pathlib import Path

DENSE = Path("artifacts/dense")
PRIOR = Path("artifacts/prior")
HARDEN = Path("artifacts/harden")

ROWS = ("dense", "magnitude", "wanda", "sparsegpt", "sparsegpt_maskonly", "maskllm")


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


def build_row_model(row: str, dtype: str = "float32", device: str | None = None):
    """The dense checkpoint with the row's updated weights and mask applied -> model (eval)."""
    from pipeline.modeling import load_model

    if row not in ROWS:
        raise ValueError(f"unknown evaluation row {row!r}; one of {ROWS}")
    model = load_model(DENSE, "float32", "cpu")
    weights, mask = row_weights_path(row), row_mask_path(row)
    if weights is not None or mask is not None:
        from pipeline.masks_io import apply_masks, load_masks, load_weights

        if weights is not None:
            load_weights(model, weights)
        if mask is not None:
            apply_masks(model, load_masks(mask))
    from pipeline.modeling import DTYPES, default_device

    return model.to(device or default_device(), DTYPES[dtype])

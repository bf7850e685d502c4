"""The rows of the comparison and the artifacts each is built from: the dense model, every row of the
one-shot methods (``pipeline.oneshot.registry``), and MaskLLM's hardened mask."""
from __future__ import annotations

from pathlib import Path

from pipeline.oneshot import registry

DENSE = Path("artifacts/dense")
PRIOR = Path("artifacts/prior")
HARDEN = Path("artifacts/harden")

_ROWS = {r.name: r for r in registry.comparison()}
ROWS = tuple(_ROWS)
# every row that prunes in one shot: the rows MaskLLM has to beat
ONE_SHOT = tuple(r.name for r in registry.rows())


def label(row: str) -> str:
    """A row's name for readers (a row without a label keeps its key)."""
    return _ROWS[row].label if row in _ROWS else row


def colour(row: str, default: str = "#888888") -> str:
    return _ROWS[row].colour if row in _ROWS else default


def check_row(row: str) -> None:
    if row not in _ROWS:
        raise ValueError(f"unknown evaluation row {row!r}; one of {', '.join(ROWS)}")


def row_mask_path(row: str) -> Path | None:
    """The mask file a row evaluates (None: the dense model)."""
    check_row(row)
    if row == registry.DENSE.name:
        return None
    if row == registry.MASKLLM.name:
        return HARDEN / "mask.safetensors"
    return PRIOR / registry.method_of_row(row).name / "mask.safetensors"


def row_weights_path(row: str) -> Path | None:
    """The updated weights a row evaluates in place of the dense ones (SparseGPT's), if any."""
    check_row(row)
    # dense and MaskLLM have no updated weights (Row.updated_weights is False for both)
    if not _ROWS[row].updated_weights:
        return None
    return PRIOR / registry.method_of_row(row).name / "weights.safetensors"

"""A row's model: the dense checkpoint with the row's updated weights and mask applied
(the evaluate and zeroshot stages). Apart from pipeline/evaluation/rows.py so that what only names the rows
(the plot stage, the report) does not depend on model loading."""
from __future__ import annotations

from pipeline.model.masks_io import apply_masks, load_masks, load_weights
from pipeline.model.loading import DTYPES, load_model
from pipeline.stage import default_device
from pipeline.evaluation.rows import DENSE, row_mask_path, row_weights_path


def build_row_model(row: str, dtype: str = "float32", device: str | None = None):
    """The dense checkpoint with the row's updated weights and mask applied -> model (eval)."""
    model = load_model(DENSE, "float32", "cpu")
    weights, mask = row_weights_path(row), row_mask_path(row)
    if weights is not None:
        load_weights(model, weights)
    if mask is not None:
        apply_masks(model, load_masks(mask))
    return model.to(device or default_device(), DTYPES[dtype])

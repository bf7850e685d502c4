"""One-shot N:M pruning of a whole causal LM: magnitude, Wanda or SparseGPT (the priors).

Wanda and SparseGPT are calibrated block by block (``pipeline.calibration``): the inputs
of block l come from the already pruned blocks < l, SparseGPT's blocks with their updated
weights, Wanda's with their masked weights. **The model is pruned in place**: pass a copy
if the dense model is still needed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.calibration import InputStats, prune_blockwise
from pipeline.magnitude import magnitude_mask
from pipeline.nm import PrunableLayer, check_nm, check_pattern, find_prunable_layers
from pipeline.sparsegpt import check_blocksize, sparsegpt_prune_layers
from pipeline.wanda import wanda_mask

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class OneShotResult:
    """Masks keyed by parameter name, **shaped like the stored parameter** (bool).

    For ``nn.Linear`` that is ``[out, in]``; for GPT-2's ``Conv1D`` it is ``[in, out]``
    (groups of M then run along dim 0). ``updated_weights`` (SparseGPT only) are the
    pruned weights with the OBS update, same keys and shapes. ``errors``: per parameter,
    ``||W X - W' X||^2 / ||W X||^2`` on the calibration inputs the layer was pruned from.
    """

    method: str
    n: int
    m: int
    masks: dict[str, torch.Tensor]
    updated_weights: dict[str, torch.Tensor] | None = None
    errors: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def relative_error(weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||(W - W') X||_F^2 / ||W X||_F^2`` from ``H ~ X X^T``: weights [out, in], H [in, in]."""
    W = weight.float()
    D = W - new_weight.float()
    return float(((D @ hessian) * D).sum() / ((W @ hessian) * W).sum())


@torch.no_grad()
def prune_oneshot(
    model: nn.Module,
    method: str,
    calib: torch.Tensor | None,
    n: int,
    m: int,
    percdamp: float = 0.01,
    blocksize: int = 128,
    batch_size: int = 8,
    measure_error: bool = True,
    progress: bool = True,
) -> OneShotResult:
    """Prune every linear layer in the blocks to N:M (N kept), **in place**; calib: LongTensor [nsamples, seqlen].

    Magnitude needs no calibration: with ``calib=None`` it runs no forward pass (and
    measures no error). ``measure_error`` fills ``result.errors``; for Wanda (and
    magnitude with calibration) it costs a Gram matrix per layer input.
    """
    if method not in METHODS:
        raise ValueError(f"prior.method: unknown {method!r}; choose one of {', '.join(METHODS)}")
    check_pattern(n, m)
    if method == "sparsegpt":
        check_blocksize(blocksize, m)
    if calib is None and method != "magnitude":
        raise ValueError(f"prior.method={method} needs calibration tokens (calib=None given)")
    start = time.perf_counter()
    layers = find_prunable_layers(model, m)  # raises, naming the layer, if in % m != 0
    result = OneShotResult(method, n, m, masks={}, updated_weights={} if method == "sparsegpt" else None)

    def select(W: torch.Tensor, stats: InputStats | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One-shot mask and new weights of a stacked weight W [out, in]."""
        if method == "magnitude":
            mask = magnitude_mask(W, n, m)
        else:
            mask = wanda_mask(W, stats.sq_norms, n, m)
        return mask, W * mask

    def record(group: list[PrunableLayer], W, mask, new, stats: InputStats | None) -> None:
        rows = [layer.weight().shape[0] for layer in group]
        for layer, w, w_mask, w_new in zip(group, W.split(rows), mask.split(rows), new.split(rows)):
            check_nm(w_mask, n, m, layer.name)
            if measure_error and stats is not None:
                result.errors[layer.param_name] = relative_error(w, w_new, stats.hessian)
            layer.weight().copy_(w_new)
            result.masks[layer.param_name] = (w_mask.t() if layer.transposed else w_mask).contiguous().cpu()
            if result.updated_weights is not None:
                result.updated_weights[layer.param_name] = layer.module.weight.detach().clone().cpu()

    def prune_block(block_layers: list[PrunableLayer], stats: dict[str, InputStats]) -> None:
        groups: dict[int, list[PrunableLayer]] = {}  # layers sharing one statistics object
        for layer in block_layers:
            key = id(stats[layer.name]) if layer.name in stats else id(layer)
            groups.setdefault(key, []).append(layer)
        # rows are pruned independently, so layers fed the same input (q/k/v) are pruned
        # as one stacked [sum(out), in] weight: one H^-1 factor, one column sweep
        todo = [(group, torch.cat([layer.weight().float() for layer in group]), stats.get(group[0].name))
                for group in groups.values()]
        if method == "sparsegpt":  # the block's sweeps are independent: one per core
            pruned = sparsegpt_prune_layers([(W, st.hessian) for _, W, st in todo], n, m, percdamp, blocksize)
        else:
            pruned = [select(W, st) for _, W, st in todo]
        for (group, W, st), (mask, new) in zip(todo, pruned):
            record(group, W, mask, new, st)

    if calib is None or (method == "magnitude" and not measure_error):
        prune_block(layers, {})
    else:
        def new_stats(layer: PrunableLayer) -> InputStats:
            return InputStats(
                layer.in_features,
                layer.module.weight.device,
                norms=method == "wanda",
                hessian=method == "sparsegpt" or measure_error,
            )
        prune_blockwise(model, calib, prune_block, new_stats, batch_size, progress)
    result.seconds = time.perf_counter() - start
    return result

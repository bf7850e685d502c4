"""One-shot N:M pruning of a whole causal LM with a method of the registry (``pipeline.oneshot.registry``).

Calibrated methods are run block by block (``pipeline.oneshot.calibration``): the inputs of block l
come from the already pruned blocks < l, with the weights each method wrote (SparseGPT's updated
weights, the others' masked weights). **The model is pruned in place**: pass a copy if the dense
model is still needed. A method with ``dense_inputs`` (the MaskLLM authors' SparseGPT prior) is the
exception to the block order: every block is calibrated on the **dense** model's activations, and
its masks are applied once all blocks are chosen.

Fused mixture-of-experts weights ``[E, out, in]`` are pruned expert by expert, each from
the inputs of the tokens routed to it; an expert that no calibration token reaches gets
the magnitude choice (listed in ``OneShotResult.fallbacks``).
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.model.nm import PrunableLayer, check_nm, check_pattern, find_prunable_layers
from pipeline.oneshot import registry
from pipeline.oneshot.calibration import InputStats, StatsKey, prune_blockwise
from pipeline.oneshot.magnitude import magnitude_mask


def method_module(method: registry.Method):
    """The module that holds a method's ``prune_layers`` (and optional ``check``)."""
    return importlib.import_module(method.module)


@dataclass
class OneShotResult:
    """Masks keyed by parameter name, **shaped like the stored parameter** (bool).

    For ``nn.Linear`` that is ``[out, in]``; for GPT-2's ``Conv1D`` it is ``[in, out]``
    (groups of M then run along dim 0); for fused experts ``[E, out, in]`` or ``[E, in, out]``.
    ``updated_weights`` (SparseGPT only) are the pruned weights with the OBS update, same
    keys and shapes. ``errors``: per parameter, ``||W X - W' X||^2 / ||W X||^2`` on the
    calibration inputs the layer was pruned from (summed over its experts). ``fallbacks``:
    the experts (``"<param>[e]"``) that no calibration token reached: magnitude choice.
    """

    method: str
    n: int
    m: int
    masks: dict[str, torch.Tensor]
    updated_weights: dict[str, torch.Tensor] | None = None
    errors: dict[str, float] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    seconds: float = 0.0


def relative_error(weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||(W - W') X||_F^2 / ||W X||_F^2`` from ``H ~ X X^T``: weights [out, in], H [in, in]."""
    W = weight.float()
    D = W - new_weight.float()
    return float(((D @ hessian) * D).sum() / ((W @ hessian) * W).sum())


@dataclass
class _Matrix:
    """One ``[out, in]`` matrix to prune: a layer's weight, or expert ``expert`` of a fused one."""

    layer: PrunableLayer
    expert: int | None

    @property
    def key(self) -> StatsKey:
        return (self.layer.param_name, self.expert)

    def weight(self) -> torch.Tensor:
        """A view: writes go to the parameter."""
        w = self.layer.weight()
        return w if self.expert is None else w[self.expert]


def _matrices(layer: PrunableLayer) -> list[_Matrix]:
    return [_Matrix(layer, None)] if layer.experts is None else [_Matrix(layer, e) for e in range(layer.experts)]


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
    ignore=(),
    device: torch.device | str | None = None,
) -> OneShotResult:
    """Prune every N:M target in the blocks to N:M (N kept), **in place**; calib: LongTensor [nsamples, seqlen].

    Magnitude needs no calibration: with ``calib=None`` it runs no forward pass (and
    measures no error). ``measure_error`` fills ``result.errors``; for Wanda (and
    magnitude with calibration) it costs a Gram matrix per layer input. ``ignore``:
    ``sparsity.ignore`` patterns (those weights stay dense). ``device``: where the blocks
    compute, one at a time (default: where the model is; a model on CPU with
    ``device="cuda"`` keeps only the block being pruned on the GPU).
    """
    entry = registry.get(method)  # raises, naming the known methods
    check_pattern(n, m)
    options = registry.Options(percdamp, blocksize)
    module = method_module(entry)
    if hasattr(module, "check"):
        module.check(n, m, options)
    if calib is None and entry.statistics:
        raise ValueError(f"prior.method={method} needs calibration tokens (calib=None given)")
    start = time.perf_counter()
    layers = find_prunable_layers(model, m, ignore)  # raises, naming the layer, if in % m != 0
    result = OneShotResult(method, n, m, masks={}, updated_weights={} if entry.updates_weights else None)
    calibrated = calib is not None and bool(entry.statistics)

    def prune_block(block_layers: list[PrunableLayer], stats: dict[StatsKey, InputStats]) -> None:
        groups: dict[int, list[_Matrix]] = {}  # matrices sharing one statistics object
        for matrix in (mat for layer in block_layers for mat in _matrices(layer)):
            shared = matrix.key in stats and entry.rows_independent
            key = id(stats[matrix.key]) if shared else id(matrix)
            groups.setdefault(key, []).append(matrix)
        # rows are pruned independently, so layers fed the same input (q/k/v) are pruned
        # as one stacked [sum(out), in] weight: one H^-1 factor, one column sweep
        # float32, or float64 for a model calibrated in float64 (prior.dtype)
        todo = [(group, torch.cat([mat.weight().to(torch.promote_types(mat.weight().dtype, torch.float32))
                                   for mat in group]), stats.get(group[0].key))
                for group in groups.values()]
        if calibrated:
            result.fallbacks += [f"{group[0].layer.param_name}[{group[0].expert}]"
                                 for group, _, st in todo if st is None and group[0].expert is not None]
        # the method on every matrix that calibration reached; the magnitude choice for an expert it did not
        reached = iter(module.prune_layers([(W, st) for _, W, st in todo if st is not None or not entry.statistics],
                                           n, m, options))
        pruned = []
        for _, W, st in todo:
            if st is not None or not entry.statistics:
                pruned.append(next(reached))
            else:
                keep = magnitude_mask(W, n, m)
                pruned.append((keep, W.masked_fill(~keep, 0)))
        masks = {layer.param_name: torch.zeros(layer.weight().shape, dtype=torch.bool) for layer in block_layers}
        error_terms = {layer.param_name: [0.0, 0.0] for layer in block_layers}
        for (group, W, st), (mask, new) in zip(todo, pruned):
            rows = [mat.weight().shape[0] for mat in group]
            for mat, w, w_mask, w_new in zip(group, W.split(rows), mask.split(rows), new.split(rows)):
                name = mat.layer.param_name
                check_nm(w_mask, n, m, name if mat.expert is None else f"{name}[{mat.expert}]")
                if measure_error and st is not None:
                    # H = 2 X^T X / nsamples: weigh each expert's terms by its nsamples to sum over X
                    D = w - w_new
                    error_terms[name][0] += st.nsamples * float(((D @ st.hessian) * D).sum())
                    error_terms[name][1] += st.nsamples * float(((w @ st.hessian) * w).sum())
                if not entry.dense_inputs:  # its later blocks see the dense weights: masked at the end
                    mat.weight().copy_(w_new)
                target = masks[name] if mat.expert is None else masks[name][mat.expert]
                target.copy_(w_mask)
        for layer in block_layers:
            name = layer.param_name
            result.masks[name] = layer.stored(masks[name]).contiguous()
            num, den = error_terms[name]
            if den > 0:
                result.errors[name] = num / den
            if result.updated_weights is not None:
                result.updated_weights[name] = layer.param().detach().clone().cpu()

    if calib is None or (not entry.statistics and not measure_error):
        prune_block(layers, {})
    else:
        def new_stats(layer: PrunableLayer) -> InputStats:
            return InputStats(
                layer.in_features,
                layer.param().device,
                norms="norms" in entry.statistics,
                hessian="hessian" in entry.statistics or measure_error,
            )
        prune_blockwise(model, calib, prune_block, new_stats, batch_size, progress, layers=layers, device=device,
                        dense_inputs=entry.dense_inputs)
    if entry.dense_inputs:
        for layer in layers:
            layer.param().masked_fill_(~result.masks[layer.param_name].to(layer.param().device), 0)
    result.seconds = time.perf_counter() - start
    return result

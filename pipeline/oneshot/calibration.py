"""Block-sequential calibration: walk the transformer blocks one at a time.

The scheme of the SparseGPT and Wanda reference implementations, for any HF causal LM:
the inputs of block 0 are captured once for the whole calibration set; then, for every
block l in order,

1. one pass over the stored inputs collects per-layer statistics of the inputs X of the
   block's N:M targets, all *before* any of them is pruned: forward pre-hooks on nn.Linear /
   Conv1D; for fused mixture-of-experts weights, the inputs of **each expert**, i.e. exactly
   the tokens routed to it, read off its products in the experts' forward (``pipeline.model.observe``);
2. the pruning method prunes the block's weights from those statistics;
3. a second pass through the (now pruned) block turns its inputs into block l+1's inputs.

So block l sees the activations of the already pruned blocks < l, and the full model is
never re-run per block. With a compute ``device`` other than the model's (big models: the
model stays on CPU), only the block being pruned is moved to it, and the captured inputs,
which stay on the model's device, go to it one batch at a time.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.oneshot.gram import accumulate_gram
from pipeline.model.nm import PrunableLayer, _is_linear, find_blocks, find_prunable_layers
from pipeline.model.observe import Layout, LinearUses, Use, eager_experts


class InputStats:
    """Streaming statistics of one layer's calibration inputs X [tokens, in].

    ``sq_norms`` [in] float64: ``||X_j||_2^2`` over all tokens (Wanda).
    ``hessian`` [in, in]: ``2 X^T X / nsamples`` kept as a running mean over samples, like
    SparseGPT's ``add_batch`` (its scale cancels in every use), in the inputs' precision:
    float32 (bfloat16 / float16 inputs widen to it), or float64 for float64 inputs (a model
    calibrated in float64, ``prior.dtype``).
    """

    def __init__(self, width: int, device: torch.device | str, norms: bool = False, hessian: bool = False):
        self.nsamples = 0
        self.sq_norms = torch.zeros(width, dtype=torch.float64, device=device) if norms else None
        self._width, self._device, self._wants_hessian = width, device, hessian
        self._upper = None  # allocated by the first batch, in its precision
        self._hessian = None

    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs ``x`` [batch, seq, in] (or [tokens, in] = one sample)."""
        batch = x.shape[0] if x.ndim == 3 else 1
        x = x.reshape(-1, x.shape[-1])
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        total = self.nsamples + batch
        if self.sq_norms is not None:
            self.sq_norms += torch.linalg.vector_norm(x, dim=0).double().square()
        if self._wants_hessian:
            if self._upper is None:
                self._upper = torch.zeros(self._width, self._width, dtype=x.dtype, device=self._device)
            # H <- H * old/total + (2/total) X^T X, its upper triangle only: X^T X is symmetric
            accumulate_gram(self._upper, x, alpha=2 / total, beta=self.nsamples / total)
            self._hessian = None
        self.nsamples = total

    @property
    def hessian(self) -> torch.Tensor | None:
        """The full symmetric ``2 X^T X / nsamples`` [in, in] (built from the upper triangle); None before any batch."""
        if self._upper is not None and self._hessian is None:
            self._hessian = self._upper.triu() + self._upper.triu(1).t()
        return self._hessian


# ---------------------------------------------------------------- capturing and running blocks

class _StopForward(Exception):
    """Raised by a hook to cut a forward pass short once it has what it needs."""


@dataclass
class BlockCall:
    """One calibration batch as a block sees it: ``block(hidden, *args, **kwargs)``."""

    hidden: torch.Tensor  # [batch, seq, hidden]
    args: tuple = ()  # the block's other positional arguments (GPT-2: cache, mask, ...)
    kwargs: dict = field(default_factory=dict)  # attention mask, position embeddings, ...


def place(obj, device: torch.device | str):
    """``obj`` on ``device``: a module (in place), or tensors nested in tuples, lists, dicts and BlockCalls (copies)."""
    if isinstance(obj, nn.Module):
        return obj.to(device)
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(place(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: place(v, device) for k, v in obj.items()}
    if is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: place(getattr(obj, f.name), device) for f in fields(obj)})
    return obj


def capture_block_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int) -> list[BlockCall]:
    """Inputs of block 0 for every calibration batch; ``calib`` is LongTensor [nsamples, seqlen]."""
    _, blocks = find_blocks(model)
    calls: list[BlockCall] = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        calls.append(BlockCall(hidden, tuple(args[1:]), kwargs))
        raise _StopForward  # the rest of the model is not needed yet

    device = model.get_input_embeddings().weight.device if hasattr(model, "get_input_embeddings") \
        else next(model.parameters()).device
    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in calib.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return calls


def _call(block: nn.Module, call: BlockCall, device: torch.device | None):
    """``block`` on one call, its inputs moved to ``device`` (None: where they are)."""
    if device is not None and call.hidden.device != device:
        call = place(call, device)
    return block(call.hidden, *call.args, **call.kwargs)


def _advance(call: BlockCall, out) -> None:
    out = out[0] if isinstance(out, tuple) else out
    call.hidden = out.to(call.hidden.device)


def run_block(block: nn.Module, calls: list[BlockCall], device: torch.device | None = None) -> None:
    """Replace every call's hidden states by the block's output (the next block's input), where they were."""
    for call in calls:
        _advance(call, _call(block, call, device))


NewStats = Callable[[PrunableLayer], InputStats]
StatsKey = tuple[str, "int | None"]  # (parameter name, expert index or None)


def _hooked(layer: PrunableLayer) -> bool:
    """Targets whose inputs a forward pre-hook sees: the weight of an nn.Linear / Conv1D."""
    return layer.experts is None and layer.attr == "weight" and _is_linear(layer.module)


def observe_block(
    block: nn.Module, layers: list[PrunableLayer], calls: list[BlockCall], new_stats: NewStats,
    device: torch.device | None = None, advance: bool = False,
) -> dict[StatsKey, InputStats]:
    """One pass over ``calls`` collecting input statistics -> {(parameter name, expert or None): stats}.

    ``advance``: run the whole block and replace every call's hidden states by its output, as
    :func:`run_block` does, in the same pass (for a block whose weights its pruning leaves as they are).

    nn.Linear / Conv1D layers fed the very same tensor (q/k/v, gate/up) share one statistics
    object, so the Gram matrix of a shared input is accumulated once; without other targets
    the pass stops after the last layer's input is seen (the rest of the block does not
    affect the statistics). Fused experts get one statistics object per expert, from the
    tokens routed to it; an expert that no calibration token reaches has none. A Linear
    whose weight the block multiplies without calling the module (Jamba's ``dt_proj``) is
    read off that product like the experts.
    """
    hooked = {layer.param_name: layer for layer in layers if _hooked(layer)}
    watched = {layer.param_name: layer for layer in layers if not _hooked(layer)}
    owner: dict[str, str] = {}  # param name -> param name of the first layer with the same input
    stats: dict[StatsKey, InputStats] = {}
    first_inputs: dict[str, torch.Tensor] = {}  # first batch only: who received which tensor
    seen: set[str] = set()  # hooked layers whose input this batch has reached
    observed: set[str] = set()  # watched parameters used at least once

    def hook_for(layer: PrunableLayer):
        name = layer.param_name

        def hook(module, args):
            x = args[0]
            if name not in owner:  # first batch: find who shares this input
                shared = next((other for other, t in first_inputs.items() if t is x), None)
                owner[name] = shared or name
                first_inputs[name] = x
                if shared is None:
                    stats[(name, None)] = new_stats(layer)
            if owner[name] == name:
                stats[(name, None)].add_batch(x)
            seen.add(name)
            if not watched and len(seen) == len(hooked) and not advance:
                raise _StopForward
        return hook

    def on_use(use: Use) -> None:
        if use.param in owner:  # a Linear called as a module: its hook has it
            return
        layer = watched.get(use.param) or hooked[use.param]
        if use.layout != Layout(layer.experts, layer.transposed):
            raise RuntimeError(f"calibration: {use.param} is used as {use.layout}, but was classified as "
                               f"{Layout(layer.experts, layer.transposed)}")
        observed.add(use.param)
        x = use.inputs
        if use.expert is not None:
            # rows that are exactly zero are tokens not routed here (Llama 4 feeds every expert every
            # token, scaled by a routing weight of 0); they add nothing to X^T X or to ||X_j||
            x = x[x.ne(0).any(dim=-1)]
            if x.shape[0] == 0:
                return
        key = (use.param, use.expert)
        if key not in stats:
            stats[key] = new_stats(layer)
        stats[key].add_batch(x)

    handles = [layer.module.register_forward_pre_hook(hook_for(layer)) for layer in hooked.values()]
    # the first batch also watches the Linear weights, in case a module is not called; after
    # it, only what needs watching is (dense blocks then run without the observer)
    watch = LinearUses({name: layer.param() for name, layer in {**hooked, **watched}.items()}, on_use)
    unreadable: dict[str, set[str]] = {}
    try:
        for i, call in enumerate(calls):
            seen.clear()
            try:
                with watch or contextlib.nullcontext():
                    out = _call(block, call, device)
                if advance:
                    _advance(call, out)
            except _StopForward:
                pass
            first_inputs.clear()
            if i == 0:
                watched.update({name: layer for name, layer in hooked.items() if name not in owner})
                unreadable = {name: why for name, why in watch.unreadable.items() if name in watched}
                watch = LinearUses({name: layer.param() for name, layer in watched.items()}, on_use) \
                    if watched else None
                if unreadable:
                    break
    finally:
        for handle in handles:
            handle.remove()
    if unreadable:
        raise RuntimeError(f"calibration: cannot read the inputs of {sorted(unreadable)}: {unreadable}")
    if watch is not None and watch.unreadable:
        raise RuntimeError(f"calibration: cannot read the inputs of {sorted(watch.unreadable)}: {watch.unreadable}")
    missing = [name for name in hooked if name not in owner and name not in observed]
    missing += [name for name in watched if name not in observed and name not in hooked]
    if missing:
        raise RuntimeError(f"calibration: layers never called by their block's forward: {missing}")
    out = {(name, None): stats[(owner[name], None)] for name in hooked if name in owner}
    out.update({key: st for key, st in stats.items() if key[0] in watched})
    return out


PruneBlock = Callable[[list[PrunableLayer], dict[StatsKey, InputStats]], None]


@torch.no_grad()
def prune_blockwise(
    model: nn.Module,
    calib: torch.Tensor,
    prune_block: PruneBlock,
    new_stats: NewStats | None,
    batch_size: int = 8,
    progress: bool = True,
    layers: list[PrunableLayer] | None = None,
    device: torch.device | str | None = None,
    dense_inputs: bool = False,
) -> None:
    """Walk the blocks in order: observe (if ``new_stats``), ``prune_block``, run the pruned block.

    ``dense_inputs``: ``prune_block`` leaves the weights as they are (it only chooses masks), so every
    block is calibrated on the dense model's activations; one pass per block then both observes and
    computes the next block's inputs (the same bits as observing and running in two passes).

    ``calib`` is LongTensor [nsamples, seqlen]. ``prune_block(layers, stats)`` gets the
    block's N:M targets (``layers``, default: all of the model's) and their input statistics
    ({} without ``new_stats``) and modifies the weights in place; its result is what the
    next block is calibrated on. ``device``: where each block computes (default: where it
    is); the block is moved there for its passes and back afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        layers = find_prunable_layers(model) if layers is None else layers
        _, blocks = find_blocks(model)
        # fused experts run their per-expert loop, whose products show each expert's inputs
        experts = eager_experts(model) if any(not _hooked(layer) for layer in layers) else contextlib.nullcontext()
        with experts:
            calls = capture_block_inputs(model, calib, batch_size)
            for index, block in enumerate(tqdm(blocks, desc="blocks", disable=not progress)):
                home = next(block.parameters()).device
                target = torch.device(device) if device is not None else home
                block_layers = [layer for layer in layers if layer.block == index]
                place(block, target)
                try:
                    observed = bool(new_stats and block_layers)
                    stats = observe_block(block, block_layers, calls, new_stats, target, advance=dense_inputs) \
                        if observed else {}
                    prune_block(block_layers, stats)
                    del stats
                    if not (dense_inputs and observed):
                        run_block(block, calls, target)
                finally:
                    place(block, home)
    finally:
        model.train(was_training)

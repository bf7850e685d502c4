"""Block-sequential calibration: walk the transformer blocks one at a time.

The scheme of the SparseGPT and Wanda reference implementations, for any HF causal LM:
the inputs of block 0 are captured once for the whole calibration set; then, for every
block l in order,

1. one pass over the stored inputs collects per-layer statistics of the inputs X of the
   block's linear layers (forward pre-hooks), all *before* any layer of the block is pruned;
2. the pruning method prunes the block's layers from those statistics;
3. a second pass through the (now pruned) block turns its inputs into block l+1's inputs.

So block l sees the activations of the already pruned blocks < l, and the full model is
never re-run per block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.nm import PrunableLayer, find_blocks, find_prunable_layers


# ---------------------------------------------------------------- per-layer statistics

class InputStats:
    """Streaming statistics of one layer's calibration inputs X [tokens, in].

    ``sq_norms`` [in] float64: ``||X_j||_2^2`` over all tokens (Wanda).
    ``hessian`` [in, in] float32: ``2 X^T X / nsamples`` kept as a running mean over
    samples, like SparseGPT's ``add_batch`` (its scale cancels in every use).
    """

    panel = 192  # Gram rows per matmul: only the upper staircase of X^T X is computed

    def __init__(self, width: int, device: torch.device | str, norms: bool = False, hessian: bool = False):
        self.nsamples = 0
        self.sq_norms = torch.zeros(width, dtype=torch.float64, device=device) if norms else None
        self._upper = torch.zeros(width, width, dtype=torch.float32, device=device) if hessian else None
        self._hessian = None

    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs ``x`` [batch, seq, in] (or [tokens, in] = one sample)."""
        batch = x.shape[0] if x.ndim == 3 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        total = self.nsamples + batch
        if self.sq_norms is not None:
            self.sq_norms += torch.linalg.vector_norm(x, dim=0).double().square()
        if self._upper is not None:
            # H <- H * old/total + (2/total) X^T X, one row panel at a time: X^T X is
            # symmetric, so the panels stop at the diagonal (about 40 % fewer flops)
            for i in range(0, x.shape[1], self.panel):
                rows = slice(i, i + self.panel)
                self._upper[rows, i:].addmm_(x[:, rows].t(), x[:, i:], beta=self.nsamples / total, alpha=2 / total)
            self._hessian = None
        self.nsamples = total

    @property
    def hessian(self) -> torch.Tensor | None:
        """The full symmetric ``2 X^T X / nsamples`` [in, in] (built from the upper triangle)."""
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


def capture_block_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int) -> list[BlockCall]:
    """Inputs of block 0 for every calibration batch; ``calib`` is LongTensor [nsamples, seqlen]."""
    _, blocks = find_blocks(model)
    calls: list[BlockCall] = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        calls.append(BlockCall(hidden, tuple(args[1:]), kwargs))
        raise _StopForward  # the rest of the model is not needed yet

    device = next(model.parameters()).device
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


def run_block(block: nn.Module, calls: list[BlockCall]) -> None:
    """Replace every call's hidden states by the block's output (the next block's input)."""
    for call in calls:
        out = block(call.hidden, *call.args, **call.kwargs)
        call.hidden = out[0] if isinstance(out, tuple) else out


NewStats = Callable[[PrunableLayer], InputStats]


def observe_block(
    block: nn.Module, layers: list[PrunableLayer], calls: list[BlockCall], new_stats: NewStats
) -> dict[str, InputStats]:
    """One pass over ``calls`` collecting input statistics of ``layers`` -> {layer name: stats}.

    Layers fed the very same tensor (q/k/v, gate/up) share one statistics object, so the
    Gram matrix of a shared input is accumulated once. The pass stops after the last
    layer's input is seen: the rest of the block does not affect the statistics.
    """
    owner: dict[str, str] = {}  # layer name -> name of the first layer with the same input
    stats: dict[str, InputStats] = {}
    first_inputs: dict[str, torch.Tensor] = {}  # first batch only: who received which tensor
    seen: set[str] = set()  # layers whose input this batch has reached

    def hook_for(layer: PrunableLayer):
        def hook(module, args):
            x = args[0]
            if layer.name not in owner:  # first batch: find who shares this input
                shared = next((name for name, other in first_inputs.items() if other is x), None)
                owner[layer.name] = shared or layer.name
                first_inputs[layer.name] = x
                if shared is None:
                    stats[layer.name] = new_stats(layer)
            if owner[layer.name] == layer.name:
                stats[layer.name].add_batch(x)
            seen.add(layer.name)
            if len(seen) == len(layers):
                raise _StopForward
        return hook

    handles = [layer.module.register_forward_pre_hook(hook_for(layer)) for layer in layers]
    try:
        for call in calls:
            seen.clear()
            try:
                block(call.hidden, *call.args, **call.kwargs)
            except _StopForward:
                pass
            first_inputs.clear()
    finally:
        for handle in handles:
            handle.remove()
    missing = [layer.name for layer in layers if layer.name not in owner]
    if missing:
        raise RuntimeError(f"calibration: layers never called by their block's forward: {missing}")
    return {layer.name: stats[owner[layer.name]] for layer in layers}


PruneBlock = Callable[[list[PrunableLayer], dict[str, InputStats]], None]


@torch.no_grad()
def prune_blockwise(
    model: nn.Module,
    calib: torch.Tensor,
    prune_block: PruneBlock,
    new_stats: NewStats | None,
    batch_size: int = 8,
    progress: bool = True,
) -> None:
    """Walk the blocks in order: observe (if ``new_stats``), ``prune_block``, run the pruned block.

    ``calib`` is LongTensor [nsamples, seqlen]. ``prune_block(layers, stats)`` gets the
    block's prunable layers and their input statistics ({} without ``new_stats``) and
    modifies the weights in place; its result is what the next block is calibrated on.
    """
    was_training = model.training
    model.eval()
    try:
        layers = find_prunable_layers(model)
        _, blocks = find_blocks(model)
        calls = capture_block_inputs(model, calib, batch_size)
        for index, block in enumerate(tqdm(blocks, desc="blocks", disable=not progress)):
            block_layers = [layer for layer in layers if layer.block == index]
            stats = observe_block(block, block_layers, calls, new_stats) if new_stats and block_layers else {}
            prune_block(block_layers, stats)
            del stats
            run_block(block, calls)
    finally:
        model.train(was_training)

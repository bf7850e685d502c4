"""MaskLLM: learnable N:M masks on frozen weights (Fang et al., NeurIPS 2024, arXiv 2409.17481).

Every group g of M consecutive input weights has logits ``pi_g`` over the C(M, N)
candidates ``s_i``. A training step samples, per group,

    y_g = softmax((kappa * pi_g + G_g) / tau),   G ~ Gumbel(0, 1)       (soft, not hard)
    soft_mask_g = sum_i y_gi * s_i

and the layer computes with ``W * soft_mask``; the loss is
``CE - lambda(t) * sum_layers ||W * soft_mask||_F^2``. Only the logits are trained.
The final mask of each group is its highest-logit candidate (``harden``).

Usage (what a learn stage does)::

    masks = attach_masks(model, n=2, m=4, priors=prior_masks, prior_strength=3.0)
    optimizer, lr_schedule = make_optimizer(masks, lr=5e-4, steps=T)
    schedule = Schedule(steps=T)
    for t, input_ids in enumerate(batches):
        metrics = train_step(model, masks, input_ids, optimizer, lr_schedule, schedule, t)
    hard = masks.hard_masks(); masks.remove()

Implementation notes:

- The per-weight work (noise, softmax over the C(M, N) candidates, the candidate mix, ``W * mask``,
  the squared norm, and their backward) is one fused function, ``pipeline.maskllm.kernel.masked_weight``:
  a C++ pass per layer on CPU, torch ops elsewhere. Its Gumbel noise is counter-based (a hash of
  seed, step, micro-batch, layer and position), so nothing is kept for backward, a micro-batch gets
  the same sample whichever rank computes it (N ranks x A accumulation steps draw what one process
  draws over N * A micro-batches), and a resumed run draws what an uninterrupted one would.
- The mask is a torch parametrization of the frozen weight (``nn.Linear``, GPT-2 ``Conv1D`` or fused
  3-D expert weights alike); the logits ``[G, C]`` are one contiguous float32 parameter per layer
  (FSDP shards them along the groups).
- ``W * mask`` is not kept from the forward to the backward (``RecomputedWeights``, in ``train_step``):
  the products keep a recipe and backward recomputes each layer's masked weight, the same bits, one
  layer at a time; the kernel's backward then reads the sample that recomputation drew. That removes
  a model-sized tensor (1 float per weight: on the default model the step's peak RSS falls 8 %, 1.32x
  -> 1.21x a dense step's, for 4 % more time, bench/maskllm_step.py). Under FSDP (unsharded weights
  are freed after each block's forward) and with ``learn.recompute_masked_weights: false`` they are kept.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from pipeline.maskllm.kernel import Recipe, as_3d, masked_weight, noise_key, sample_reference
from pipeline.model.nm import NMError, candidates as make_candidates, check_nm, find_blocks, find_prunable_layers

__all__ = [
    "Schedule", "MaskState", "MaskSet", "LearnableMask",
    "init_logits", "prior_overlap", "apply_prior", "sample_candidate_weights",
    "soft_mask", "harden", "attach_masks", "make_optimizer", "train_step",
]


# ------------------------------------------------------------------ the math, on one layer

def init_logits(groups: int, n_candidates: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logits pi ~ N(0, 0.01^2), float32 ``[G, C]``, contiguous."""
    return torch.randn(groups, n_candidates, generator=generator) * 0.01


def prior_overlap(prior_mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """overlap_gi = #positions where candidate i and the prior's group g are both 1.

    prior_mask: bool ``[out, in]``; candidates: ``[C, M]`` -> float ``[G, C]``.
    """
    groups = prior_mask.reshape(-1, candidates.shape[1]).to(candidates.dtype)
    return groups @ candidates.t()


def apply_prior(logits: torch.Tensor, prior_mask: torch.Tensor, candidates: torch.Tensor,
                prior_strength: float) -> torch.Tensor:
    """pi_gi + alpha * std(pi) * overlap_gi (std over the whole layer) -> ``[G, C]``."""
    return logits + prior_strength * logits.std() * prior_overlap(prior_mask, candidates)


def sample_candidate_weights(logits: torch.Tensor, temperature: float, logit_scale: float,
                             key: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """y_g = softmax((kappa * pi_g + G_g) / tau), G ~ Gumbel(0, 1), over the candidates: ``[G, C]``.

    ``key`` selects the noise (``mask_kernel.noise_key(seed, step, layer)``): the draw the fused
    kernel makes for the same key, here in plain torch ops.
    """
    return sample_reference(logits, key, temperature, logit_scale)


def soft_mask(y: torch.Tensor, candidates: torch.Tensor, shape: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Soft mask of group g = sum_i y_gi * s_i: ``[G, C] @ [C, M]`` -> ``[out, in]``."""
    return (y @ candidates).reshape(shape)


def harden(logits: torch.Tensor, candidates: torch.Tensor, shape: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Final mask: the highest-logit candidate of every group, no sampling -> bool ``[out, in]``."""
    return candidates[logits.argmax(dim=-1)].bool().reshape(shape)


# ------------------------------------------------------------------ schedules and shared state

@dataclass(frozen=True)
class Schedule:
    """Linear schedules over T steps: temperature tau, logit scale kappa, regulariser lambda."""

    steps: int  # T
    temperature: float = 4.0  # tau at t = 0 ...
    temperature_end: float = 0.05  # ... and at t = T
    logit_scale: float = 1e2  # kappa at t = 0 ...
    logit_scale_end: float = 5e2  # ... and at t = T
    reg_weight: float = 1e-5  # lambda0; lambda(t) = lambda0 * (1 - t/T)

    def _frac(self, t: int) -> float:
        return min(max(t / self.steps, 0.0), 1.0)

    def temperature_at(self, t: int) -> float:
        return self.temperature + (self.temperature_end - self.temperature) * self._frac(t)

    def logit_scale_at(self, t: int) -> float:
        return self.logit_scale + (self.logit_scale_end - self.logit_scale) * self._frac(t)

    def reg_weight_at(self, t: int) -> float:
        return self.reg_weight * (1.0 - self._frac(t))


@dataclass
class MaskState:
    """What every layer's mask reads at forward time; the training loop updates it."""

    temperature: float = 4.0
    logit_scale: float = 1e2
    hard: bool = False  # argmax candidates, no sampling (evaluation)
    seed: int = 0  # the noise of a layer is a function of (seed, step, micro-batch, layer)
    step: int = 0
    micro: int = 0  # the global index of the micro-batch being computed in this step
    track_confidence: bool = False  # record mean max_i y_gi of each sample
    recomputed: "RecomputedWeights | None" = None  # set during a training forward that recomputes W * mask


class _Packed(NamedTuple):
    recipe: Recipe
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class RecomputedWeights:
    """Saved-tensor hooks of a training forward: autograd keeps a recipe instead of each ``W * soft_mask``.

    The product ``x @ (W * M)^T`` keeps its weight for the input gradient, which would hold one
    masked copy of every layer from the forward to the backward: a model-sized tensor the dense step
    does not have (its weights are the parameters themselves). Each layer's masked weight is
    registered here; a saved tensor that is it or a view of it (its transpose, an expert's slice) is
    packed as the layer's :class:`~pipeline.maskllm.kernel.Recipe` and recomputed, the same bits, when
    backward unpacks it. Any other saved tensor is kept as usual.
    """

    def __init__(self):
        self._live: dict[int, tuple[weakref.ref, Recipe]] = {}  # id of the weight -> (the weight, its recipe)

    def register(self, out: torch.Tensor, recipe: Recipe) -> None:
        self._live[id(out)] = (weakref.ref(out), recipe)

    def clear(self) -> None:
        for _, recipe in self._live.values():
            recipe.release()
        self._live.clear()

    def pack(self, t: torch.Tensor):
        # called for every tensor the forward saves: a dict lookup for most of them
        base = t._base if t._base is not None else t  # the weight itself, or a view of it (its transpose)
        entry = self._live.get(id(base))
        # the registered weight must be this very tensor: a freed one's id may be reused
        if entry is None or entry[0]() is not base or t.layout != torch.strided:
            return t
        return _Packed(entry[1], t.size(), t.stride(), t.storage_offset())

    @staticmethod
    def unpack(packed):
        if isinstance(packed, _Packed):
            return packed.recipe().as_strided(packed.size, packed.stride, packed.offset)
        return packed

    @contextlib.contextmanager
    def active(self, state: MaskState):
        """Pack the masked weights saved in the enclosed forward (its backward may run outside)."""
        state.recomputed = self
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            state.recomputed = None


# ------------------------------------------------------------------ one layer's masked weight

class LearnableMask(nn.Module):
    """Parametrization ``W -> W * soft_mask`` of one weight; holds its logits ``[G, C]``.

    ``view`` maps the stored weight to its logical ``[out, in]`` / ``[E, out, in]`` view (None: it is
    stored so; GPT-2 Conv1D: a transpose); ``index``: the layer's position in the model, which keys
    its noise.
    """

    def __init__(self, logits: torch.Tensor, candidates: torch.Tensor, state: MaskState, view=None,
                 index: int = 0):
        super().__init__()
        self.logits = nn.Parameter(logits.contiguous())
        self.register_buffer("candidates", candidates, persistent=False)
        self.state = state
        self.view = view
        self.index = index
        self.sq_norm = None  # ||W * M||^2 of the last training forward (graph attached)
        self.stats: dict = {}

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.state.hard:
            return torch.where(self.hard_mask(weight.shape), weight, torch.zeros((), dtype=weight.dtype))
        key = noise_key(self.state.seed, self.state.step, self.index, self.state.micro)
        args = (weight, self.logits, self.candidates, key, self.state.temperature, self.state.logit_scale, self.view)
        recomputed = self.state.recomputed if torch.is_grad_enabled() else None
        recipe = Recipe(*args) if recomputed is not None else None
        out, sq_norm, confidence = masked_weight(*args, recipe=recipe)
        if recipe is not None:
            recomputed.register(out, recipe)
        if torch.is_grad_enabled():
            self.sq_norm = sq_norm  # the regulariser of this very sample, summed in float64
        if self.state.track_confidence:
            self.stats["confidence"] = float(confidence) / self.logits.shape[0]
        return out

    def hard_mask(self, shape) -> torch.Tensor:
        """Argmax candidate of every group -> bool, shaped like the stored weight."""
        mask = torch.zeros(shape, dtype=torch.bool, device=self.logits.device)
        target = as_3d(mask, self.view)  # written through the logical view: the groups' order
        target.copy_(harden(self.logits.detach(), self.candidates, target.shape))
        return mask


# ------------------------------------------------------------------ all layers of a model

def _choice_dtype(n_candidates: int) -> torch.dtype:
    return torch.int16 if n_candidates <= torch.iinfo(torch.int16).max else torch.int64


class MaskSet:
    """The learnable masks of one model, keyed by parameter name (``model.layers.0.mlp.up_proj.weight``)."""

    def __init__(self, n: int, m: int, layers: dict, state: MaskState,
                 prior_choice: dict[str, tuple[torch.Tensor, int]] | None):
        self.n, self.m, self.state = n, m, state
        self.layers = layers  # param_name -> (PrunableLayer, LearnableMask)
        self._hooks: list = []
        # param_name -> (the prior's candidate index of the groups this process holds, first group)
        self._prior_choice = prior_choice
        self.last_regularizer = float("nan")
        # recompute W * mask in backward instead of keeping it (RecomputedWeights); learn turns it off
        # under FSDP, whose unsharded weights are freed between a block's forward and its backward
        self.recompute_weights = True
        self.reset_diagnostics()

    def reset_diagnostics(self) -> None:
        """Take the current choices as the reference of the next flip rate; once the logits are
        sharded, keep only this process's rows of the prior's choices."""
        self._last_choice = self._choices()
        if self._prior_choice is not None:
            for k, (mine, start) in self._last_choice.items():
                held, held_start = self._prior_choice[k]
                self._prior_choice[k] = (held[start - held_start:start - held_start + len(mine)], start)

    def parameters(self) -> list[nn.Parameter]:
        return [mask.logits for _, mask in self.layers.values()]

    def set_step(self, schedule: Schedule, t: int) -> float:
        """Set tau, kappa and the noise of step t; returns lambda(t)."""
        self.state.step = t
        self.state.temperature = schedule.temperature_at(t)
        self.state.logit_scale = schedule.logit_scale_at(t)
        return schedule.reg_weight_at(t)

    def regularizer(self, reg_weight: float) -> torch.Tensor:
        """-lambda * sum_layers ||W * M||_F^2 from the masks of the last forward (scalar)."""
        norms = []
        for name, (_, mask) in self.layers.items():
            if mask.sq_norm is None:
                raise RuntimeError(f"{name}: no soft mask sampled since the last regularizer() call; "
                                   "run a training forward (grad enabled, not hard) first")
            norms.append(mask.sq_norm)
            mask.sq_norm = None  # do not keep the graph alive past this step
        reg = (-reg_weight * torch.stack(norms).sum()).float()  # the sum in float64, the loss in float32
        self.last_regularizer = float(reg.detach())
        return reg

    @contextlib.contextmanager
    def hard(self):
        """Evaluate with the hardened (argmax) masks."""
        previous, self.state.hard = self.state.hard, True
        try:
            yield self
        finally:
            self.state.hard = previous

    def _choices(self) -> dict[str, tuple[torch.Tensor, int]]:
        """{name: (argmax candidate of this process's groups, index of its first group)}."""
        out = {}
        for name, (_, mask) in self.layers.items():
            local, start = local_rows(mask.logits.detach())
            out[name] = (local.argmax(-1).to(_choice_dtype(mask.logits.shape[1])), start)
        return out

    def hard_masks(self) -> dict[str, torch.Tensor]:
        """Hardened masks, bool, shaped like the stored parameter (GPT-2 Conv1D: ``[in, out]``)."""
        out = {}
        for name, (layer, mask) in self.layers.items():
            hard = mask.hard_mask(_original(layer).shape)
            check_nm(as_3d(hard, mask.view), self.n, self.m, name)
            out[name] = hard
        return out

    def diagnostics(self) -> dict[str, float]:
        """Flip rate since the last call, confidence, agreement with the prior, regulariser value.

        Under FSDP each process counts its own shard of the groups; the counts are summed.
        """
        current = self._choices()
        counts = [sum(c.numel() for c, _ in current.values()),
                  sum(int((c != self._last_choice[k][0]).sum()) for k, (c, _) in current.items()), 0]
        if self._prior_choice is not None:
            counts[2] = sum(int((c == self._prior_choice[k][0]).sum()) for k, (c, _) in current.items())
        groups, flips, same = _sum_over_processes(counts, self.parameters())
        self._last_choice = current
        out = {"flip_rate": flips / groups, "regularizer": self.last_regularizer}
        conf = [(mask.stats.pop("confidence"), mask.logits.shape[0]) for _, mask in self.layers.values()
                if "confidence" in mask.stats]
        if conf:
            out["confidence"] = sum(c * g for c, g in conf) / sum(g for _, g in conf)
        if self._prior_choice is not None:
            out["prior_agreement"] = same / groups
        return out

    def logits_state_dict(self) -> dict[str, torch.Tensor]:
        """{param_name: logits [G, C]} as contiguous float32 CPU copies (safetensors-ready).

        Sharded (FSDP) logits are gathered: every process must call it."""
        return {name: full_tensor(mask.logits.detach()).to("cpu").contiguous()
                for name, (_, mask) in self.layers.items()}

    def load_logits_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved logits in; names and shapes must match exactly."""
        missing, extra = set(self.layers) - set(state), set(state) - set(self.layers)
        if missing or extra:
            raise KeyError(f"logits checkpoint: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]} "
                           f"(was it saved for this model and N:M pattern?)")
        for name, (_, mask) in self.layers.items():
            if state[name].shape != mask.logits.shape:
                raise ValueError(f"{name}: logits shape {tuple(state[name].shape)} != {tuple(mask.logits.shape)} "
                                 f"(saved for another N:M pattern?)")
            with torch.no_grad():
                mask.logits.copy_(state[name])
        self._last_choice = self._choices()

    def remove(self) -> None:
        """Remove the parametrizations: the modules get back their plain (frozen) weights."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for layer, _ in self.layers.values():
            parametrize.remove_parametrizations(layer.module, _attr(layer), leave_parametrized=False)
        self.layers = {}


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This process's rows of a (possibly FSDP-sharded) ``[G, C]`` tensor and the first row's index."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t, 0
    # FSDP2 shards dim 0 as torch.chunk does: ceil(G / world) rows per rank, the last ones shorter
    mesh = t.device_mesh
    return t.to_local(), mesh.get_local_rank() * -(-t.shape[0] // mesh.size())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (FSDP) one (a collective); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _sum_over_processes(counts: list[int], params: list[torch.Tensor]) -> list[int]:
    """Sum integer counts over the processes when the logits are sharded (FSDP), else as they are."""
    from torch.distributed.tensor import DTensor

    if not params or not isinstance(params[0], DTensor):
        return counts
    import torch.distributed as dist

    total = torch.tensor(counts, dtype=torch.int64, device=params[0].to_local().device)
    dist.all_reduce(total)
    return total.tolist()


def _attr(layer) -> str:
    """The parametrized attribute: ``weight``, or a fused expert tensor's name (``gate_up_proj``)."""
    return getattr(layer, "attr", "weight")


def _view(layer):
    """The stored -> logical ``[out, in]`` view of a prunable weight (None if they are the same)."""
    if hasattr(layer, "logical"):
        return layer.logical
    return (lambda t: t.transpose(-1, -2)) if layer.transposed else None


def _original(layer) -> torch.Tensor:
    """The frozen stored weight under its parametrization."""
    return getattr(layer.module.parametrizations, _attr(layer)).original


def attach_masks(model: nn.Module, n: int, m: int, *, priors: dict[str, torch.Tensor] | None = None,
                 prior_strength: float = 3.0, seed: int = 0, state: MaskState | None = None,
                 ignore: tuple[str, ...] | list[str] = (), on_block: Callable[[int], None] | None = None,
                 before_block: Callable[[int], None] | None = None) -> MaskSet:
    """Freeze ``model`` and give every prunable weight learnable N:M mask logits.

    priors: optional {param_name: bool mask shaped like the stored parameter} (as masks_io
    reads them), e.g. SparseGPT's, or a learned mask for transfer. ``ignore``: regexes of parameter
    names left dense (``sparsity.ignore``). ``before_block(b)`` runs before the layers of block b get
    their masks (a model built on the meta device reads the block's weights there), ``on_block(b)``
    once they have them (FSDP shards the block there, so the whole model's logits never exist
    unsharded in one process).
    """
    candidates = make_candidates(n, m)
    state = state or MaskState(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)  # weights frozen: only the logits learn
    layers, prior_choice = {}, ({} if priors is not None else None)
    prunable = find_prunable_layers(model, m, ignore=ignore)
    for index, layer in enumerate(prunable):
        if before_block is not None and (index == 0 or prunable[index - 1].block != layer.block):
            before_block(layer.block)
        stored = getattr(layer.module, _attr(layer))
        cands = candidates.to(stored.device)
        logits = init_logits(stored.numel() // m, candidates.shape[0], generator).to(stored.device)
        if priors is not None:
            if layer.param_name not in priors:
                raise NMError(f"prior has no mask for {layer.param_name}; was it computed for this model?")
            prior = priors[layer.param_name].to(stored.device)
            if prior.shape != stored.shape:
                raise NMError(f"{layer.param_name}: prior mask shape {tuple(prior.shape)} does not match "
                              f"the weight's {tuple(stored.shape)}; was the prior made for this model?")
            prior = as_3d(prior, _view(layer))
            check_nm(prior, n, m, f"prior {layer.param_name}")
            logits = apply_prior(logits, prior, cands, prior_strength)
            prior_choice[layer.param_name] = (prior_overlap(prior, cands).argmax(-1).to(_choice_dtype(len(cands))), 0)
        mask = LearnableMask(logits, cands, state, _view(layer), index)
        # unsafe: the output keeps W's shape and dtype by construction; skips a sample per layer
        parametrize.register_parametrization(layer.module, _attr(layer), mask, unsafe=True)
        layers[layer.param_name] = (layer, mask)
        if on_block is not None and (index + 1 == len(prunable) or prunable[index + 1].block != layer.block):
            on_block(layer.block)
            if prior_choice is not None:  # sharded now: keep this process's rows of the block's prior choices
                for name, (held, mask) in layers.items():
                    if held.block == layer.block and name in prior_choice:
                        rows, start = local_rows(mask.logits.detach())
                        prior_choice[name] = (prior_choice[name][0][start:start + len(rows)], start)
    masks = MaskSet(n, m, layers, state, prior_choice)
    _, blocks = find_blocks(model)
    masks._hooks = [hook for b in sorted({layer.block for layer in prunable}) for hook in _cache_in(blocks[b])]
    return masks


def _cache_in(block: nn.Module) -> list:
    """Cache every mask of ``block`` while the block runs (one sample per layer and step, however
    often a weight is read: fused experts read theirs once per expert), and drop it when the block
    is done: a masked weight lives no longer than its block needs it (with activation checkpointing,
    the recomputation draws the same, keyed, noise)."""
    contexts = []

    def enter(module, args):
        contexts.append(parametrize.cached())
        contexts[-1].__enter__()

    def leave(module, args, output):
        contexts.pop().__exit__(None, None, None)

    return [block.register_forward_pre_hook(enter), block.register_forward_hook(leave, always_call=True)]


# ------------------------------------------------------------------ optimisation

def make_optimizer(masks: MaskSet, lr: float, steps: int, weight_decay: float = 0.1, min_lr_ratio: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-5
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW on the logits only, cosine decay from lr to lr * min_lr_ratio over ``steps``, no warm-up.

    betas (0.9, 0.95) and eps 1e-5 are the MaskLLM authors' (Megatron) settings: with ~1e8 logits
    and the gradient clipped to norm 1, each logit's gradient is tiny, and torch's default eps 1e-8
    would turn almost every update into a sign step.
    """
    params = masks.parameters()
    fused = all(p.device.type in ("cpu", "cuda") and type(p) is nn.Parameter for p in params)  # one kernel per tensor
    # sharded (FSDP) logits on CPU: one tensor at a time; the multi-tensor path would hold temporaries as
    # large as every logit this process holds (the GPU path keeps it: it is fast there)
    foreach = False if not fused and all(p.device.type == "cpu" for p in params) else None
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused or None,
                                  foreach=foreach)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr * min_lr_ratio)
    return optimizer, lr_schedule


def train_step(model: nn.Module, masks: MaskSet, micro_batches, optimizer: torch.optim.Optimizer,
               lr_schedule, schedule: Schedule, t: int, grad_clip: float = 1.0, no_sync=None) -> dict[str, float]:
    """One MaskLLM step: per micro-batch a fresh sample, CE - lambda*||W*M||^2, backward; then clip, AdamW.

    ``micro_batches``: this process's ``[(global micro-batch index, input_ids [b, T]), ...]``, or one
    ``input_ids`` tensor (micro-batch 0). The gradient is the mean over the micro-batches (and, through
    DDP's or FSDP's averaging, over the processes): each loss is divided by their number here.
    ``no_sync()``: a context that skips the gradient sync of all but the last micro-batch.
    """
    if isinstance(micro_batches, torch.Tensor):
        micro_batches = [(0, micro_batches)]
    reg_weight = masks.set_step(schedule, t)
    optimizer.zero_grad(set_to_none=True)  # before the forward: old grads and activations never coexist
    ce_sum = reg_sum = 0.0
    for i, (index, input_ids) in enumerate(micro_batches):
        masks.state.micro = index
        last = i + 1 == len(micro_batches)
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            recomputed = RecomputedWeights() if masks.recompute_weights else None
            with recomputed.active(masks.state) if recomputed else contextlib.nullcontext():
                ce = model(input_ids=input_ids, labels=input_ids).loss  # each block caches its masks while it runs
            reg = masks.regularizer(reg_weight)
            try:
                ((ce + reg) / len(micro_batches)).backward()
            finally:
                if recomputed:
                    recomputed.clear()
        ce_sum, reg_sum = ce_sum + float(ce.detach()), reg_sum + float(reg.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(masks.parameters(), grad_clip)
    optimizer.step()
    lr_schedule.step()
    ce, reg = ce_sum / len(micro_batches), reg_sum / len(micro_batches)
    return {"loss": ce + reg, "ce": ce, "regularizer": reg, "grad_norm": float(grad_norm),
            "temperature": masks.state.temperature, "logit_scale": masks.state.logit_scale,
            "reg_weight": reg_weight, "lr": optimizer.param_groups[0]["lr"]}

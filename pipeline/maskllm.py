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

- Sampling is torch's soft Gumbel-softmax with the noise of ``torch.distributions.Gumbel``, the
  mask a torch parametrization of the frozen weight, gradients plain autograd, and the memory
  saving ``torch.utils.checkpoint``: nothing here re-derives what torch already has.
- Layout: the logits of a layer are the ``[G, C]`` tensor of the paper, stored candidate-major
  (strides ``(1, G)``): the softmax over the C candidates then runs across contiguous rows of
  G groups, ~4x faster on CPU than a softmax over a last dim of 6.
- Memory: with ``MaskState.recompute`` the sample y (1.5 floats per weight at 2:4) is not kept
  for backward but redrawn from the same RNG state (checkpointing restores it).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from pipeline.nm import NMError, candidates as make_candidates, check_nm, find_prunable_layers

__all__ = [
    "Schedule", "MaskState", "MaskSet", "LearnableMask",
    "init_logits", "prior_overlap", "apply_prior", "sample_candidate_weights",
    "soft_mask", "masked_weight", "harden", "sparse_weight_regularizer",
    "attach_masks", "make_optimizer", "train_step",
]


# ------------------------------------------------------------------ the math, on one layer

def init_logits(groups: int, n_candidates: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logits pi ~ N(0, 0.01^2), float32 ``[G, C]``, stored candidate-major (see module note)."""
    pi = torch.randn(groups, n_candidates, generator=generator) * 0.01
    return torch.empty(n_candidates, groups).t().copy_(pi)


def prior_overlap(prior_mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """overlap_gi = #positions where candidate i and the prior's group g are both 1.

    prior_mask: bool ``[out, in]``; candidates: ``[C, M]`` -> float ``[G, C]``.
    """
    groups = prior_mask.reshape(-1, candidates.shape[1]).to(candidates.dtype)
    return groups @ candidates.t()


def apply_prior(logits: torch.Tensor, prior_mask: torch.Tensor, candidates: torch.Tensor,
                prior_strength: float) -> torch.Tensor:
    """pi_gi + alpha * std(pi) * overlap_gi (std over the whole layer) -> ``[G, C]``, logits' layout."""
    shift = prior_strength * logits.std() * prior_overlap(prior_mask, candidates)
    return logits.clone().add_(shift)  # clone keeps the candidate-major layout


def sample_candidate_weights(logits: torch.Tensor, temperature: float, logit_scale: float) -> torch.Tensor:
    """y_g = softmax((kappa * pi_g + G_g) / tau), G ~ Gumbel(0, 1), over the candidates: ``[G, C]``.

    The soft Gumbel-softmax of ``F.gumbel_softmax``, with its noise from torch's
    ``distributions.Gumbel`` (inverse CDF of ``uniform_``) instead of ``-log(exponential_)``:
    the same distribution, 2.6x faster on CPU, where drawing 1.5 numbers per weight was the
    step's largest cost (tests/test_maskllm.py checks both against each other).
    Draws from the global RNG, so a seeded step (and its checkpointed recompute) redraws it.
    """
    z = torch.distributions.Gumbel(logits.new_zeros(()), logits.new_ones(()), validate_args=False).rsample(
        (logits.shape[1], logits.shape[0]))  # [C, G]: candidate-major like the logits
    z = z.add_(logits.t(), alpha=logit_scale).div_(temperature)
    return torch.softmax(z, dim=0).t()


def soft_mask(y: torch.Tensor, candidates: torch.Tensor, shape: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Soft mask of group g = sum_i y_gi * s_i: ``[G, C] @ [C, M]`` -> ``[out, in]``."""
    return (y @ candidates).reshape(shape)


def harden(logits: torch.Tensor, candidates: torch.Tensor, shape: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Final mask: the highest-logit candidate of every group, no sampling -> bool ``[out, in]``."""
    return candidates[logits.argmax(dim=-1)].bool().reshape(shape)


def sparse_weight_regularizer(weights: list[torch.Tensor], masks: list[torch.Tensor],
                              reg_weight: float) -> torch.Tensor:
    """-lambda * sum_layers ||W * M||_F^2 (scalar): rewards keeping large weights."""
    return -reg_weight * sum((w * m).square().sum() for w, m in zip(weights, masks))


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
    # redraw y in backward instead of keeping it: saves 1.5 floats per weight at 2:4, costs a
    # second draw (~+8 % step time on CPU); off by default, on where memory is what limits
    recompute: bool = False
    track_confidence: bool = False  # record mean max_i y_gi of each sample (one extra pass)


# ------------------------------------------------------------------ one layer's masked weight

def masked_weight(weight: torch.Tensor, logits: torch.Tensor, candidates: torch.Tensor, temperature: float,
                  logit_scale: float, stats: dict | None = None) -> torch.Tensor:
    """W * soft_mask(y) for one freshly drawn y; ``weight`` is ``[out, in]``."""
    y = sample_candidate_weights(logits, temperature, logit_scale)
    if stats is not None:
        stats["confidence"] = y.detach().amax(dim=-1).mean()
    return weight * soft_mask(y, candidates, weight.shape).to(weight.dtype)


class LearnableMask(nn.Module):
    """Parametrization ``W -> W * soft_mask`` of one layer; holds its logits ``[G, C]``."""

    def __init__(self, logits: torch.Tensor, candidates: torch.Tensor, state: MaskState, transposed: bool):
        super().__init__()
        self.logits = nn.Parameter(logits)
        self.register_buffer("candidates", candidates, persistent=False)
        self.state = state
        self.transposed = transposed  # GPT-2 Conv1D stores W as [in, out]
        self.sq_norm = None  # ||W * M||^2 of the last training forward (graph attached)
        self.stats: dict = {}

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.t() if self.transposed else weight  # [out, in]
        if self.state.hard:
            masked = w * self.hard_mask(w.shape).to(w.dtype)
        else:
            stats = self.stats if self.state.track_confidence else None
            args = (w, self.logits, self.candidates, self.state.temperature, self.state.logit_scale, stats)
            if self.state.recompute and torch.is_grad_enabled():
                # keep only the inputs; backward redraws y from the restored RNG state
                masked = checkpoint(masked_weight, *args, use_reentrant=False, preserve_rng_state=True)
            else:
                masked = masked_weight(*args)
            if torch.is_grad_enabled():
                # the regulariser of this very sample, summed in float32 (bf16 would lose it)
                self.sq_norm = masked.square().sum(dtype=torch.float32)
        return masked.t() if self.transposed else masked

    def hard_mask(self, shape) -> torch.Tensor:
        """Argmax candidate of every group -> bool ``[out, in]``."""
        return harden(self.logits.detach(), self.candidates, shape)


# ------------------------------------------------------------------ all layers of a model

def _choice_dtype(n_candidates: int) -> torch.dtype:
    return torch.int16 if n_candidates <= torch.iinfo(torch.int16).max else torch.int64


class MaskSet:
    """The learnable masks of one model, keyed by parameter name (``model.layers.0.mlp.up_proj.weight``)."""

    def __init__(self, model: nn.Module, n: int, m: int, layers: dict, state: MaskState,
                 prior_choice: dict[str, torch.Tensor] | None):
        self.model, self.n, self.m, self.state = model, n, m, state
        self.layers = layers  # param_name -> (PrunableLayer, LearnableMask)
        self._prior_choice = prior_choice  # param_name -> prior's candidate index per group
        self._last_choice = self._choices()
        self.last_regularizer = float("nan")

    def parameters(self) -> list[nn.Parameter]:
        return [mask.logits for _, mask in self.layers.values()]

    def set_step(self, schedule: Schedule, t: int) -> float:
        """Set tau, kappa for step t; returns lambda(t)."""
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
        reg = -reg_weight * torch.stack(norms).sum()
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

    def _choices(self) -> dict[str, torch.Tensor]:
        return {name: mask.logits.detach().argmax(-1).to(_choice_dtype(mask.logits.shape[1]))
                for name, (_, mask) in self.layers.items()}

    def hard_masks(self) -> dict[str, torch.Tensor]:
        """Hardened masks, bool, shaped like the stored parameter (GPT-2 Conv1D: ``[in, out]``)."""
        out = {}
        for name, (layer, mask) in self.layers.items():
            shape = layer.module.parametrizations.weight.original.shape
            hard = mask.hard_mask(shape[::-1] if layer.transposed else shape)
            check_nm(hard, self.n, self.m, name)
            out[name] = hard.t() if layer.transposed else hard
        return out

    def diagnostics(self) -> dict[str, float]:
        """Flip rate since the last call, confidence, agreement with the prior, regulariser value."""
        current = self._choices()
        groups = sum(c.numel() for c in current.values())
        flips = sum(int((current[k] != self._last_choice[k]).sum()) for k in current)
        self._last_choice = current
        out = {"flip_rate": flips / groups, "regularizer": self.last_regularizer}
        conf = [(mask.stats["confidence"], mask.logits.shape[0]) for _, mask in self.layers.values()
                if "confidence" in mask.stats]
        if conf:
            out["confidence"] = float(sum(float(c) * g for c, g in conf) / sum(g for _, g in conf))
        if self._prior_choice is not None:
            same = sum(int((current[k] == self._prior_choice[k]).sum()) for k in current)
            out["prior_agreement"] = same / groups
        return out

    def logits_state_dict(self) -> dict[str, torch.Tensor]:
        """{param_name: logits [G, C]} as contiguous float32 CPU copies (safetensors-ready)."""
        return {name: mask.logits.detach().to("cpu").contiguous() for name, (_, mask) in self.layers.items()}

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
        for layer, _ in self.layers.values():
            parametrize.remove_parametrizations(layer.module, "weight", leave_parametrized=False)
        self.layers = {}


def attach_masks(model: nn.Module, n: int, m: int, *, priors: dict[str, torch.Tensor] | None = None,
                 prior_strength: float = 3.0, seed: int = 0, state: MaskState | None = None) -> MaskSet:
    """Freeze ``model`` and give every prunable layer learnable N:M mask logits.

    priors: optional {param_name: bool mask shaped like the stored parameter} (as masks_io
    reads them), e.g. SparseGPT's, or a learned mask for transfer.
    """
    candidates = make_candidates(n, m)
    state = state or MaskState()
    generator = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)  # weights frozen: only the logits learn
    layers, prior_choice = {}, ({} if priors is not None else None)
    for layer in find_prunable_layers(model, m):
        w = layer.weight()
        logits = init_logits(w.numel() // m, candidates.shape[0], generator).to(w.device)
        if priors is not None:
            if layer.param_name not in priors:
                raise NMError(f"prior has no mask for {layer.param_name}; was it computed for this model?")
            prior = priors[layer.param_name].to(w.device)
            prior = prior.t() if layer.transposed else prior
            if prior.shape != w.shape:
                raise NMError(f"{layer.param_name}: prior mask shape {tuple(prior.shape)} does not match "
                              f"the weight's {tuple(w.shape)} ([out, in]); was the prior made for this model?")
            check_nm(prior, n, m, f"prior {layer.param_name}")
            logits = apply_prior(logits, prior, candidates.to(w.device), prior_strength)
            prior_choice[layer.param_name] = prior_overlap(prior, candidates.to(w.device)).argmax(-1).to(
                _choice_dtype(candidates.shape[0]))
        mask = LearnableMask(logits, candidates.to(w.device), state, layer.transposed)
        # unsafe: the output keeps W's shape and dtype by construction; skips a sample per layer
        parametrize.register_parametrization(layer.module, "weight", mask, unsafe=True)
        layers[layer.param_name] = (layer, mask)
    return MaskSet(model, n, m, layers, state, prior_choice)


# ------------------------------------------------------------------ optimisation

def make_optimizer(masks: MaskSet, lr: float, steps: int, weight_decay: float = 0.1,
                   min_lr_ratio: float = 0.1) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW on the logits only, cosine decay from lr to lr * min_lr_ratio over ``steps``, no warm-up."""
    params = masks.parameters()
    fused = all(p.device.type in ("cpu", "cuda") for p in params)  # one kernel per tensor, not ~10 passes
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr * min_lr_ratio)
    return optimizer, lr_schedule


def train_step(model: nn.Module, masks: MaskSet, input_ids: torch.Tensor, optimizer: torch.optim.Optimizer,
               lr_schedule, schedule: Schedule, t: int, grad_clip: float = 1.0) -> dict[str, float]:
    """One MaskLLM step on ``input_ids`` [B, T]: sample, CE - lambda*||W*M||^2, backward, clip, AdamW."""
    reg_weight = masks.set_step(schedule, t)
    optimizer.zero_grad(set_to_none=True)  # before the forward: old grads and activations never coexist
    with parametrize.cached():  # one sample per layer per step, however often .weight is read
        ce = model(input_ids=input_ids, labels=input_ids).loss
    reg = masks.regularizer(reg_weight)
    loss = ce + reg
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(masks.parameters(), grad_clip)
    optimizer.step()
    lr_schedule.step()
    return {"loss": float(loss.detach()), "ce": float(ce.detach()), "regularizer": float(reg.detach()),
            "grad_norm": float(grad_norm),
            "temperature": masks.state.temperature, "logit_scale": masks.state.logit_scale,
            "reg_weight": reg_weight, "lr": optimizer.param_groups[0]["lr"]}

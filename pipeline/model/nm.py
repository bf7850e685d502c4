"""N:M sparsity core: candidate sets, mask validation and prunable-weight discovery.

Convention: N = weights **kept** in every group of M consecutive input weights
(2:4 keeps 2 of 4). A weight is always handled in its logical ``[out, in]`` orientation
(``[E, out, in]`` for fused mixture-of-experts weights); GPT-2's ``Conv1D`` stores
``[in, out]``, GPT-OSS and Llama 4 experts ``[E, in, out]``: transposed at this edge only.

Which weights are N:M targets (MASKLLM.md: every linear layer inside the blocks): every
weight matrix in the transformer blocks, i.e. the weights of ``nn.Linear`` / ``Conv1D``
and of fused experts, except the **routers / gates** (a ``gate``/``router`` module whose
output is one score per expert, or one scalar gate). Those are left dense by design: they
hold a tiny share of the weights (E x hidden), their outputs pick the experts, so a
pruned router reroutes tokens, and no sparse kernel gains from an E-row matrix
(llm-compressor's MoE recipes ignore them too). ``sparsity.ignore`` (regexes on parameter
names) leaves any other chosen weight dense; every block weight matrix that is neither
covered nor ignored nor a gate is reported by ``pipeline.model.coverage``.
"""
from __future__ import annotations

import itertools
import math
import re
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from pipeline.model.observe import Layout, LinearUses, eager_experts

try:  # transformers' GPT-2 style linear layer (weight stored transposed)
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()


class NMError(ValueError):
    """A user-caused N:M problem (bad pattern, indivisible layer, invalid mask)."""


def check_pattern(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or m < 1 or not 0 < n <= m:
        raise NMError(f"sparsity: need integers 0 < n <= m, got n={n}, m={m} (e.g. n: 2, m: 4)")


def candidates(n: int, m: int) -> torch.Tensor:
    """All binary vectors of length m with n ones, lexicographic order of kept positions.

    Returns float32 ``[C(m, n), m]``; 2:4 -> 6 rows, 4:8 -> 70 rows.
    """
    check_pattern(n, m)
    rows = list(itertools.combinations(range(m), n))
    out = torch.zeros(len(rows), m)
    for i, kept in enumerate(rows):
        out[i, list(kept)] = 1.0
    assert out.shape[0] == math.comb(m, n)
    return out


def nm_violations(mask: torch.Tensor, n: int, m: int) -> int:
    """Number of groups of m (along the last dim) that do not keep exactly n."""
    if mask.shape[-1] % m:
        return -1
    groups = mask.reshape(-1, m).to(torch.int64)
    binary = ((groups == 0) | (groups == 1)).all(dim=1)
    return int((~binary | (groups.sum(dim=1) != n)).sum())


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True if ``mask`` ([out, in], 0/1) keeps exactly n of every m along ``in``."""
    return nm_violations(mask, n, m) == 0


def check_nm(mask: torch.Tensor, n: int, m: int, name: str) -> None:
    bad = nm_violations(mask, n, m)
    if bad == -1:
        raise NMError(f"{name}: input width {mask.shape[-1]} is not divisible by m={m}")
    if bad:
        total = mask.numel() // m
        raise NMError(f"{name}: {bad} of {total} groups do not keep exactly {n} of {m}")


def topn_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest scores in every group of m along the last dim -> bool, score's shape (any leading dims)."""
    groups = score.reshape(*score.shape[:-1], score.shape[-1] // m, m)
    idx = torch.topk(groups, n, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(score.shape)


# ---------------------------------------------------------------- prunable weights

@dataclass
class PrunableLayer:
    """One N:M target: the parameter ``module.<attr>`` inside transformer block ``block``.

    ``experts``: E for a fused mixture-of-experts weight (``[E, out, in]`` logically; DBRX
    stacks them along the rows of a 2-D parameter), None for one matrix. ``transposed``: the
    parameter stores ``[.., in, out]`` (GPT-2 ``Conv1D``, GPT-OSS / Llama 4 experts).
    """

    name: str  # module name, e.g. "model.layers.0.self_attn.q_proj" or "model.layers.0.mlp.experts"
    module: nn.Module
    block: int  # index of the transformer block it lives in
    attr: str = "weight"  # "weight", "gate_up_proj", "down_proj", ...
    experts: int | None = None
    transposed: bool = False

    @property
    def param_name(self) -> str:
        return f"{self.name}.{self.attr}"

    def param(self) -> torch.Tensor:
        """The stored parameter (parametrized: what the module computes with)."""
        return getattr(self.module, self.attr)

    def logical(self, stored: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like the parameter (weight, mask) -> ``[out, in]`` or ``[E, out, in]`` (a view)."""
        if self.experts is not None and stored.ndim == 2:  # experts stacked along the rows (DBRX)
            stored = stored.view(self.experts, -1, stored.shape[-1])
        return stored.transpose(-2, -1) if self.transposed else stored

    def stored(self, logical: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`logical`: ``[out, in]`` / ``[E, out, in]`` -> shaped like the parameter."""
        t = logical.transpose(-2, -1) if self.transposed else logical
        return t.reshape(self.shape)

    def weight(self) -> torch.Tensor:
        """The weight as ``[out, in]``, or ``[E, out, in]`` for fused experts (a view: writes go to the module)."""
        return self.logical(self.param())

    @property
    def shape(self) -> torch.Size:
        """The stored parameter's shape, read without running a parametrization (MaskLLM's sampled mask)."""
        if parametrize.is_parametrized(self.module, self.attr):
            return getattr(self.module.parametrizations, self.attr).original.shape
        return getattr(self.module, self.attr).shape

    @property
    def in_features(self) -> int:
        return self.logical(torch.empty(self.shape, device="meta")).shape[-1]

    @property
    def out_features(self) -> int:
        return self.logical(torch.empty(self.shape, device="meta")).shape[-2]


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ModuleList holding the most weight-matrix elements (>= 2-D parameters)."""
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            size = sum(p.numel() for p in mod.parameters() if p.ndim >= 2)
            if size > best_size:
                best, best_size = (name, mod), size
    if best is None:
        raise NMError(f"{type(model).__name__}: no transformer blocks (nn.ModuleList of weight matrices) found")
    return best


# transformers' fused experts (`@use_experts_implementation`) name their weights so, and set
# `is_transposed` (stored [E, in, out]) and `num_experts` on the module
_FUSED_EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_GATE = re.compile(r"^(gate|router|gating)$|_(gate|router)$")  # mlp.gate, mlp.router.layer, shared_expert_gate


@dataclass
class BlockWeights:
    """Every weight matrix (>= 2-D parameter, not a bias) inside the transformer blocks, by what N:M does with it."""

    targets: list[PrunableLayer]  # N:M targets, block by block in registration order
    gates: list[str]  # routers / gates: dense by design
    unclassified: dict[str, str]  # parameter name -> why its input dim is unknown
    numel: dict[str, int] = field(default_factory=dict)  # elements of each (all three kinds)
    other: dict[str, str] = field(default_factory=dict)  # >= 2-D but no matrix product (convolutions): not counted

    def names(self) -> list[str]:
        return list(self.numel)

    def ignored_by(self, patterns) -> set[str]:
        """The block weight names matched (``re.search``) by ``sparsity.ignore``; a pattern matching none raises."""
        matched: set[str] = set()
        for pattern in patterns:
            try:
                rx = re.compile(pattern)
            except re.error as e:
                raise NMError(f"sparsity.ignore: {pattern!r} is not a valid regular expression ({e})") from None
            hits = {name for name in self.numel if rx.search(name)}
            if not hits:
                example = ", ".join(list(self.numel)[:3])
                raise NMError(f"sparsity.ignore: pattern {pattern!r} matches no weight matrix in the transformer "
                              f"blocks (they are named like {example}); fix the pattern or remove it")
            matched |= hits
        return matched


_PROBED: "weakref.WeakKeyDictionary[nn.Module, dict[str, Layout | str]]" = weakref.WeakKeyDictionary()


def block_weights(model: nn.Module) -> BlockWeights:
    """Sort the blocks' weight matrices into N:M targets, gates (dense by design) and unclassified ones.

    nn.Linear / Conv1D and transformers' fused experts are known by type; any other weight
    matrix is classified by watching a short forward pass (``pipeline.model.observe``), once per model.
    """
    prefix, blocks = find_blocks(model)
    out = BlockWeights([], [], {})
    unknown: dict[str, tuple[int, str, nn.Module, str, torch.Tensor]] = {}
    for b, block in enumerate(blocks):
        experts = _expert_counts(block)
        for path, module, attr, param in stored_parameters(block):
            full = f"{prefix}.{b}.{path}.{attr}" if path else f"{prefix}.{b}.{attr}"
            if param.ndim < 2 or attr.endswith("bias"):
                continue  # norms, biases (GPT-OSS's [E, out] expert biases too), scalars
            if isinstance(module, nn.modules.conv._ConvNd):
                out.other[full] = f"{type(module).__name__} weight: a convolution, not a matrix product"
                continue
            out.numel[full] = param.numel()
            if param.ndim == 2 and experts and _is_gate(path, param, experts):
                out.gates.append(full)
            elif _is_linear(module) and attr == "weight":
                transposed = bool(Conv1D) and isinstance(module, Conv1D)
                out.targets.append(PrunableLayer(f"{prefix}.{b}.{path}", module, b, attr, None, transposed))
            elif attr in _FUSED_EXPERT_WEIGHTS and param.ndim == 3 and _fused_experts(module) == param.shape[0]:
                out.targets.append(PrunableLayer(f"{prefix}.{b}.{path}", module, b, attr, param.shape[0],
                                                 bool(module.is_transposed)))
            else:
                unknown[full] = (b, f"{prefix}.{b}.{path}", module, attr, param)
                out.targets.append(None)  # placeholder: keeps registration order
    layouts = _probe_layouts(model, {name: entry[4] for name, entry in unknown.items()}) if unknown else {}
    placed = iter(unknown.items())
    targets = []
    for layer in out.targets:
        if layer is not None:
            targets.append(layer)
            continue
        full, (b, name, module, attr, param) = next(placed)
        layout = layouts[full]
        if isinstance(layout, str):
            out.unclassified[full] = layout
        else:
            targets.append(PrunableLayer(name, module, b, attr, layout.experts, layout.transposed))
    out.targets = targets
    return out


def stored_parameters(root: nn.Module):
    """(module path, module, attribute, stored tensor) of every parameter under ``root``.

    A parametrized weight (MaskLLM's mask) is its frozen original under its own name
    (``q_proj.weight``, not ``q_proj.parametrizations.weight.original``), and the
    parametrizations' own parameters (the mask logits) are not the model's weights. A tied
    parameter (GPT-2's embeddings and head) is listed once, like ``named_parameters`` does.
    """
    seen: set[int] = set()
    for path, module in root.named_modules():
        if "parametrizations" in path.split("."):
            continue
        params = list(module.named_parameters(recurse=False))
        if parametrize.is_parametrized(module):
            params += [(attr, plist.original) for attr, plist in module.parametrizations.items()]
        for attr, param in params:
            if id(param) not in seen:
                seen.add(id(param))
                yield path, module, attr, param


def _expert_counts(block: nn.Module) -> set[int]:
    """Numbers of experts of the block's mixture-of-experts modules (empty for a dense block)."""
    counts = set()
    for mod in block.modules():
        for attr in _EXPERT_COUNTS:
            value = getattr(mod, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                counts.add(value)
    return counts


def _fused_experts(module: nn.Module) -> int | None:
    """E for a module of transformers' fused experts (``@use_experts_implementation``), else None."""
    transposed, experts = getattr(module, "is_transposed", None), getattr(module, "num_experts", None)
    return experts if isinstance(transposed, bool) and isinstance(experts, int) else None


def _is_gate(path: str, param: torch.Tensor, experts: set[int]) -> bool:
    """A router (one output per expert) or a scalar gate, named like one (``mlp.gate``, ``router.layer``)."""
    named = any(_GATE.search(part) for part in path.split("."))
    return named and (param.shape[0] in experts | {1} or param.shape[1] in experts | {1})


def probe_tokens(model: nn.Module, length: int = 64) -> torch.Tensor:
    """A fixed random token sequence ``[1, length]`` for a forward that only needs to run, not to mean anything."""
    embeddings = model.get_input_embeddings()
    vocab = embeddings.num_embeddings if hasattr(embeddings, "num_embeddings") else model.config.vocab_size
    ids = torch.randint(vocab, (1, length), generator=torch.Generator().manual_seed(0))
    return ids.to(embeddings.weight.device)


@torch.no_grad()
def _probe_layouts(model: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, Layout | str]:
    """Layout of each parameter as one probe forward uses it, or why it cannot be read (cached per model)."""
    cached = _PROBED.get(model, {})
    todo = {name: p for name, p in params.items() if name not in cached}
    if todo:
        seen: dict[str, set[Layout]] = {}
        watch = LinearUses(todo, lambda use: seen.setdefault(use.param, set()).add(use.layout))
        was_training = model.training
        model.eval()
        try:
            with eager_experts(model), watch:
                model(input_ids=probe_tokens(model), use_cache=False)
        finally:
            model.train(was_training)
        for name in todo:
            layouts, unreadable = seen.get(name, set()), watch.unreadable.get(name)
            if unreadable:
                cached[name] = "used in a way its strides do not explain: " + "; ".join(sorted(unreadable))
            elif len(layouts) == 1:
                cached[name] = next(iter(layouts))
            elif layouts:
                cached[name] = f"used in {len(layouts)} different layouts"
            else:
                cached[name] = "not the weight of any F.linear / matmul / bmm in a forward pass"
        _PROBED[model] = cached
    return {name: cached[name] for name in params}


def find_prunable_layers(model: nn.Module, m: int | None = None, ignore=()) -> list[PrunableLayer]:
    """The N:M targets inside the transformer blocks, block by block in registration order.

    Embeddings and the LM head live outside the blocks and stay dense; so do routers / gates
    and the weights named by ``ignore`` (regexes on parameter names, ``sparsity.ignore``; a
    pattern that matches no block weight raises). A block weight matrix whose input dim
    cannot be told raises, naming it; so does, with ``m`` given, a target whose input width
    is not divisible by m.
    """
    weights = block_weights(model)
    ignored = weights.ignored_by(ignore)
    unknown = {name: why for name, why in weights.unclassified.items() if name not in ignored}
    if unknown:
        listed = "; ".join(f"{name} ({why})" for name, why in list(unknown.items())[:5])
        raise NMError(f"{len(unknown)} weight matrices in the blocks of {type(model).__name__} cannot be pruned N:M, "
                      f"their input dimension is unknown: {listed}. Leave them dense by adding a pattern to "
                      f"sparsity.ignore (e.g. {re.escape(next(iter(unknown)).rpartition('.')[2])}$)")
    layers = [layer for layer in weights.targets if layer.param_name not in ignored]
    if m is not None:
        for layer in layers:
            if layer.in_features % m:
                raise NMError(
                    f"layer {layer.name}: input width {layer.in_features} is not divisible by "
                    f"m={m}; choose an m that divides it, or leave it dense with sparsity.ignore "
                    f"(e.g. {re.escape(layer.param_name)})"
                )
    return layers

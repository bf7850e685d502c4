"""N:M sparsity core: candidate sets, mask validation and prunable-layer discovery.

Convention: N = weights **kept** in every group of M consecutive input weights
(2:4 keeps 2 of 4). A weight is always handled in its ``[out, in]`` orientation;
GPT-2's ``Conv1D`` stores ``[in, out]`` and is transposed at this edge only.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

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
    """Keep the n largest scores in every group of m along the last dim -> bool, score's shape."""
    out, inp = score.shape
    groups = score.reshape(out, inp // m, m)
    idx = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(out, inp)


# ---------------------------------------------------------------- layer discovery

@dataclass
class PrunableLayer:
    name: str  # module name, e.g. "model.layers.0.self_attn.q_proj"
    module: nn.Module
    block: int  # index of the transformer block it lives in

    @property
    def param_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def transposed(self) -> bool:
        return bool(Conv1D) and isinstance(self.module, Conv1D)

    def weight(self) -> torch.Tensor:
        """The weight as ``[out, in]`` (a view: writes go to the module)."""
        w = self.module.weight
        return w.t() if self.transposed else w

    @property
    def in_features(self) -> int:
        return self.weight().shape[1]


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ModuleList holding the most linear-layer parameters."""
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            size = sum(
                sub.weight.numel() for sub in mod.modules() if _is_linear(sub)
            )
            if size > best_size:
                best, best_size = (name, mod), size
    if best is None:
        raise NMError(f"{type(model).__name__}: no transformer blocks (nn.ModuleList of linear layers) found")
    return best


def find_prunable_layers(model: nn.Module, m: int | None = None) -> list[PrunableLayer]:
    """Every nn.Linear / Conv1D inside the transformer blocks, block by block in registration order.

    Embeddings and the LM head live outside the blocks and stay dense. With ``m`` given,
    a layer whose input width is not divisible by m raises an error naming it.
    """
    prefix, blocks = find_blocks(model)
    layers = []
    for b, block in enumerate(blocks):
        for sub, mod in block.named_modules():
            if _is_linear(mod):
                layers.append(PrunableLayer(f"{prefix}.{b}.{sub}", mod, b))
    if m is not None:
        for layer in layers:
            if layer.in_features % m:
                raise NMError(
                    f"layer {layer.name}: input width {layer.in_features} is not divisible by "
                    f"m={m}; choose an m that divides it or exclude this model"
                )
    return layers

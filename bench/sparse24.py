"""2:4 model surgery for sparse tensor cores: which linear layers qualify, the packed form, the swap.

NVIDIA GPUs of compute capability >= 8.0 multiply a weight that keeps 2 of every 4 consecutive
input weights on sparse tensor cores; torch exposes them as ``torch.sparse.to_sparse_semi_structured``
(a ``SparseSemiStructuredTensor`` with a CUTLASS or a cuSPARSELt backend). This module decides,
layer by layer, whether a model's weight can take that form (and says why not), swaps the eligible
linears for ``SemiStructuredLinear``, and takes the conversion as an argument: the CUDA-only one
on a GPU, ``packed_round_trip`` (the compressed form in plain torch) on a CPU, so the surgery is
testable without a GPU.

    report = sparsify_24(model, "cusparselt")                           # CUDA, fp16 / bf16
    report = sparsify_24(model, "cusparselt", convert=packed_round_trip)  # anywhere
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.model.nm import (
    NMError, PrunableLayer, _is_linear, block_weights, check_nm, find_blocks, find_prunable_layers,
)

BACKENDS = ("cusparselt", "cutlass")

# The pattern the sparse kernels run per dtype. 16- and 8-bit types: 2:4. float32 runs 1:2 (TF32
# sparse tensor cores), which a 2:4 mask is not in general (torch/sparse/semi_structured.py,
# CUTLASS docstring: "We also support 1:2 sparsity for float32 dtype"; the CUTLASS packer of
# torch/sparse/_semi_structured_conversions.py takes pairs, ksparse = 2, for torch.float).
KERNEL_PATTERN = {torch.float32: (1, 2)}
DEFAULT_PATTERN = (2, 4)

Convert = Callable[[torch.Tensor], torch.Tensor]


def backend_class(backend: str):
    """torch's tensor subclass of one backend (``SparseSemiStructuredTensorCUSPARSELT`` / ``...CUTLASS``)."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    classes = {"cusparselt": SparseSemiStructuredTensorCUSPARSELT, "cutlass": SparseSemiStructuredTensorCUTLASS}
    if backend not in classes:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return classes[backend]


def min_shape(backend: str, dtype: torch.dtype) -> tuple[int, int] | None:
    """(rows, cols) that both dims of the sparse weight [out, in] must be multiples of (and at least); None: no kernel.

    Read from torch itself (``_DTYPE_SHAPE_CONSTRAINTS`` in torch/sparse/semi_structured.py, what
    ``from_dense`` validates against), so the rules follow the installed torch. In torch 2.13:
    cuSPARSELt fp16/bf16 (16, 16), int8 and float8_e4m3fn (32, 32), no float32; CUTLASS fp16/bf16
    (32, 64), int8 (16, 128), float32 (32, 32). The activations need no shape: torch pads them to the
    table's dense minimum (``cutlass_mm`` / ``cusparselt_mm``), so one decode token works.
    """
    constraints = backend_class(backend)._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    return None if constraints is None else (constraints.sparse_min_rows, constraints.sparse_min_cols)


def shape_reason(out_features: int, in_features: int, dtype: torch.dtype, backend: str) -> str | None:
    """Why a weight [out, in] of ``dtype`` cannot take ``backend``'s sparse GEMM (dtype, shape); None if it can."""
    shape = min_shape(backend, dtype)
    if shape is None:
        supported = ", ".join(str(d).removeprefix("torch.") for d in backend_class(backend)._DTYPE_SHAPE_CONSTRAINTS)
        return f"dtype {str(dtype).removeprefix('torch.')} has no {backend} sparse kernel (it has: {supported})"
    rows, cols = shape
    if out_features < rows or out_features % rows or in_features < cols or in_features % cols:
        return (f"weight [out, in] = [{out_features}, {in_features}]: {backend} "
                f"{str(dtype).removeprefix('torch.')} needs both dims multiples of ({rows}, {cols})")
    return None


def excess_groups(weight: torch.Tensor, n: int, m: int) -> int:
    """Groups of m consecutive inputs of ``weight`` [out, in] with more than n nonzeros (a kernel would drop some)."""
    nonzeros = (weight.reshape(weight.shape[0], -1, m) != 0).sum(dim=-1)
    return int((nonzeros > n).sum())


def pattern_reason(weight: torch.Tensor) -> str | None:
    """Why ``weight`` [out, in] is not in its dtype's kernel pattern (2:4, float32 1:2); None if it is.

    The packers keep the nonzeros (torch: ``dense != 0``): CUTLASS's silently drops any beyond n per
    group, cuSPARSELt's compression assumes a pruned matrix, so a weight that is not N:M must be
    refused here, not converted. A group with fewer nonzeros is
    fine (a kept weight can itself be 0.0, e.g. in dequantised 4-bit weights).
    """
    n, m = KERNEL_PATTERN.get(weight.dtype, DEFAULT_PATTERN)
    if weight.shape[1] % m:
        return f"input width {weight.shape[1]} is not divisible by {m}"
    bad = excess_groups(weight, n, m)
    if bad:
        return (f"{bad} of {weight.numel() // m} groups of {m} inputs hold more than {n} nonzeros: "
                f"the weight is not {n}:{m} sparse (apply a {n}:{m} mask first)")
    return None


# ---------------------------------------------------------------- the packed form in plain torch

def pack_nm(weight: torch.Tensor, n: int = 2, m: int = 4, mask: torch.Tensor | None = None):
    """Compressed N:M form: weight [out, in] -> (values [out, in*n/m], positions uint8 [out, in*n/m]).

    ``positions`` are the kept inputs' indices within their group of m, ascending (the order of
    torch's CUTLASS packer). Without ``mask`` the kept ones are the nonzeros, a group with fewer
    than n filled up with its first zeros; with a bool ``mask`` [out, in] (exactly n:m) the kept
    ones are the mask's, so a kept weight that is 0.0 stays a kept 0.0. Every zero comes out +0.0.
    """
    out, inp = weight.shape
    if inp % m:
        raise NMError(f"input width {inp} is not divisible by m={m}")
    groups = weight.reshape(out, inp // m, m)
    if mask is None:
        if excess_groups(weight, n, m):
            raise NMError(f"weight {tuple(weight.shape)}: {excess_groups(weight, n, m)} groups hold more than "
                          f"{n} nonzeros; pass its {n}:{m} mask or prune it first")
        keep = groups != 0
    else:
        check_nm(mask, n, m, f"mask {tuple(mask.shape)}")
        keep = mask.to(torch.bool).reshape(out, inp // m, m)
    # Score: kept first, then lower index first; the top n are the group's kept positions.
    index = torch.arange(m, device=weight.device)
    score = keep.to(torch.int64) * m + (m - 1 - index)
    positions = torch.topk(score, n, dim=-1).indices.sort(dim=-1).values
    values = torch.gather(groups, -1, positions)
    # A filled-in or kept zero may be -0.0 (an old ``W * mask``); the packed form holds only +0.0.
    values = values.masked_fill(values == 0, 0)
    return values.reshape(out, -1), positions.to(torch.uint8).reshape(out, -1)


def unpack_nm(values: torch.Tensor, positions: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Dense weight [out, in] from ``pack_nm``'s (values, positions), both [out, in*n/m]; pruned entries are +0.0."""
    out, kept = values.shape
    dense = torch.zeros(out, kept // n, m, dtype=values.dtype, device=values.device)  # +0.0, never -0.0
    dense.scatter_(-1, positions.reshape(out, -1, n).long(), values.reshape(out, -1, n))
    return dense.reshape(out, kept // n * m)


def packed_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """The CPU stand-in for the CUDA-only conversion: ``unpack_nm(pack_nm(W))`` in the dtype's kernel pattern."""
    n, m = KERNEL_PATTERN.get(weight.dtype, DEFAULT_PATTERN)
    return unpack_nm(*pack_nm(weight, n, m), n, m)


def torch_converter(backend: str) -> Convert:
    """The CUDA conversion of one backend: what ``to_sparse_semi_structured`` calls, without its global switch
    (``SparseSemiStructuredTensor._FORCE_CUTLASS``), so one process can time both backends."""
    return backend_class(backend).from_dense


# ---------------------------------------------------------------- the replacement module and the surgery

class SemiStructuredLinear(nn.Module):
    """``y = x Wᵀ + b`` with W [out, in] in a semi-structured sparse form: x [..., in] -> y [..., out].

    A module of its own rather than ``linear.weight = Parameter(sparse)`` (torch's tutorial): torch's
    sparse ``linear`` flattens x with ``view``, which fails on non-contiguous activations, so x is
    flattened here; GPT-2's ``Conv1D`` ([in, out] storage) becomes the same module; and the dense
    module is dropped, so its weight's memory is freed.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.backend = backend
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


OUTSIDE_BLOCKS = ("outside the transformer blocks: embeddings and the LM head stay dense "
                  "(MaskLLM prunes only the blocks' linears)")
NOT_A_TARGET = "inside the blocks but no N:M target (a router / gate, dense by design: pipeline.model.nm)"
FUSED_EXPERTS = ("fused mixture-of-experts weight: torch's semi-structured sparse tensors are single 2-D matrices "
                 "(no grouped sparse GEMM), so it runs dense")


@dataclass
class Surgery:
    """Which linear layers a surgery replaced, and every other linear layer or N:M target with why it was not."""

    backend: str
    replaced: list[str] = field(default_factory=list)  # module names
    skipped: dict[str, str] = field(default_factory=dict)  # module (fused experts, router: parameter) name -> why not

    def summary(self) -> str:
        return f"{len(self.replaced)} linear layers 2:4 ({self.backend}), {len(self.skipped)} kept dense"


def layer_reason(weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> str | None:
    """Why one weight [out, in] (with its bias) cannot go to ``backend``'s sparse GEMM; None if it can."""
    reason = shape_reason(weight.shape[0], weight.shape[1], weight.dtype, backend)
    if reason is None and bias is not None and bias.dtype != weight.dtype:
        reason = f"bias dtype {bias.dtype} differs from the weight's {weight.dtype} (cuSPARSELt needs them equal)"
    if reason is None and weight.device.type != "meta":
        reason = pattern_reason(weight)
    return reason


def linear_targets(targets: list[PrunableLayer]) -> dict[str, PrunableLayer]:
    """The N:M targets that are whole linear layers (``nn.Linear`` / ``Conv1D``), by module name."""
    return {layer.name: layer for layer in targets
            if layer.experts is None and layer.attr == "weight" and _is_linear(layer.module)}


def eligibility(model: nn.Module, backend: str) -> Surgery:
    """Every linear layer and N:M target of ``model``, sorted into eligible (``replaced``: would be) and not
    (``skipped``, why; keyed by module name, or parameter name for a fused experts weight)."""
    backend_class(backend)  # an unknown backend fails before any work
    report = Surgery(backend)
    targets = find_prunable_layers(model)
    linears = linear_targets(targets)
    for layer in targets:
        if layer.name not in linears:
            report.skipped[layer.param_name] = FUSED_EXPERTS
    gates = block_weights(model).gates  # parameter names
    report.skipped.update({name: NOT_A_TARGET for name in gates})
    prefix = find_blocks(model)[0] + "."
    for name, module in model.named_modules():
        if not _is_linear(module) or f"{name}.weight" in gates:
            continue
        if name not in linears:
            report.skipped[name] = NOT_A_TARGET if name.startswith(prefix) else OUTSIDE_BLOCKS
            continue
        reason = layer_reason(linears[name].weight(), module.bias, backend)
        if reason is None:
            report.replaced.append(name)
        else:
            report.skipped[name] = reason
    return report


@torch.no_grad()
def sparsify_24(model: nn.Module, backend: str, convert: Convert | None = None) -> Surgery:
    """Swap every eligible linear of ``model`` for a ``SemiStructuredLinear`` holding ``convert(W)`` (in place).

    ``convert`` takes the contiguous weight [out, in]; by default torch's conversion for ``backend``
    (CUDA only). Returns the report: what was replaced, what stays dense and why. Layer by layer,
    so each dense weight is freed as its sparse form arrives; a conversion that fails raises,
    naming its layer (the layers before it are swapped already).
    """
    report = eligibility(model, backend)
    convert = convert or torch_converter(backend)
    layers = linear_targets(find_prunable_layers(model))
    for name in tqdm(report.replaced, desc=f"2:4 {backend}", unit="layer", leave=False):
        layer = layers[name]
        try:
            weight = convert(layer.weight().detach().contiguous())
        except (RuntimeError, NotImplementedError) as e:
            raise type(e)(f"{name}: {backend} conversion failed: {e}") from e
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, SemiStructuredLinear(weight, layer.module.bias, backend))
    return report


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; for a tensor subclass (a ``SparseSemiStructuredTensor``) the sum of its inner tensors."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, shared (tied) tensors counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total

"""Which parameters a forward pass uses as linear weights, in which layout, on which inputs.

transformers 5 stores mixture-of-experts weights as fused parameters that each family lays
out its own way (Mixtral ``[E, out, in]``, GPT-OSS and Llama 4 ``[E, in, out]``, DBRX experts
stacked in a 2-D ``[E * rows, cols]``), and its forward slices them and multiplies with
``F.linear`` / ``matmul`` / ``bmm``. Rather than keep a table of conventions, ``LinearUses``
watches the forward (a ``TorchFunctionMode``): when an operand of a matrix product is a view
of a watched parameter, the view's strides say which of the parameter's dims is contracted
with the input (its input dim, the one N:M groups run along) and its storage offset which
expert it is. The same observation gives each expert's calibration inputs: exactly the
tokens routed to it, as the model computes them.
"""
from __future__ import annotations

import bisect
import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class Layout:
    """How a parameter holds its weight: ``experts`` E (None: one matrix) and whether it is stored ``[.., in, out]``."""

    experts: int | None
    transposed: bool


@dataclass
class Use:
    """One observed product: parameter ``param`` (its expert ``expert``) applied to inputs X ``[tokens, in]``."""

    param: str
    layout: Layout
    expert: int | None
    inputs: torch.Tensor


# the products whose operands are read: F.linear(x, W) contracts W's last dim; matmul /
# mm / bmm contract the second operand's dim -2 (or, weight first, the weight's last dim)
_LINEAR = {F.linear}
_MATMUL = {torch.matmul, torch.mm, torch.bmm, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.bmm,
           torch.Tensor.__matmul__}
_RMATMUL = {torch.Tensor.__rmatmul__}


class LinearUses(TorchFunctionMode):
    """Calls ``on_use(Use)`` for every F.linear / matmul / bmm whose weight is a view of a watched parameter.

    A use whose weight view its strides cannot explain (a partial slice of an expert, an
    offset view) is noted in ``unreadable`` {name: reasons} instead; a parameter multiplied by
    a product this class does not read (einsum, addmm) is simply never reported.
    """

    def __init__(self, params: dict[str, torch.Tensor], on_use: Callable[[Use], None]):
        super().__init__()
        self.on_use = on_use
        self.unreadable: dict[str, set[str]] = {}
        spans = [(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(), name, p) for name, p in params.items()]
        spans.sort(key=lambda s: s[0])
        self._starts = [s[0] for s in spans]
        self._spans = spans

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            self._observe(func, x, w, weight_first=False, contracted=-1)
        elif func in _MATMUL or func in _RMATMUL:
            a, b = args[:2] if len(args) >= 2 else (args[0], kwargs.get("other", kwargs.get("mat2")))
            if func in _RMATMUL:  # b @ a
                a, b = b, a
            if self._owner(b) is not None:
                self._observe(func, a, b, weight_first=False, contracted=-2)
            elif self._owner(a) is not None:
                self._observe(func, b, a, weight_first=True, contracted=-1)
        return func(*args, **kwargs)

    def _owner(self, t) -> tuple[str, torch.Tensor] | None:
        """The watched parameter whose memory ``t`` lies in, if any."""
        if not isinstance(t, torch.Tensor) or t.ndim < 2 or t.device.type == "meta":
            return None
        i = bisect.bisect_right(self._starts, t.data_ptr()) - 1
        if i >= 0 and t.data_ptr() < self._spans[i][1]:
            return self._spans[i][2], self._spans[i][3]
        return None

    def _observe(self, func, x, w, weight_first: bool, contracted: int) -> None:
        owner = self._owner(w)
        if owner is None or not isinstance(x, torch.Tensor):
            return
        name, param = owner
        where = locate(w, param)
        if isinstance(where, str):
            self.unreadable.setdefault(name, set()).add(f"{getattr(func, '__name__', func)}: {where}")
            return
        vdims, experts, expert = where
        in_v, out_v = vdims[contracted], vdims[-1 if contracted == -2 else -2]
        if in_v is None or out_v is None or (experts is not None and {in_v, out_v} != {1, 2}):
            self.unreadable.setdefault(name, set()).add(f"{getattr(func, '__name__', func)}: dims {vdims}")
            return
        layout = Layout(experts, transposed=in_v < out_v)
        if weight_first:  # W @ x: x holds the inputs in its columns
            x = x.transpose(-1, -2)
        width = x.shape[-1]
        if w.ndim == 3:  # bmm over the experts: batch entry e is expert e's inputs
            if vdims[0] != 0 or x.ndim != 3:
                self.unreadable.setdefault(name, set()).add(f"{getattr(func, '__name__', func)}: batch dims {vdims}")
                return
            for e in range(x.shape[0]):
                self.on_use(Use(name, layout, e, x[e].reshape(-1, width)))
        else:
            self.on_use(Use(name, layout, expert, x.reshape(-1, width)))


def locate(view: torch.Tensor, param: torch.Tensor) -> tuple[list[int | None], int | None, int | None] | str:
    """Where a view lies in ``param``: (dim of the logical weight for each dim of the view, experts E, expert index).

    The logical weight is ``param`` itself, or, for experts stacked along the rows of a 2-D
    parameter, ``param.view(E, rows, cols)``; its dim 0 is the expert dim of an experts
    parameter. Returns a reason (str) when the view is not a whole matrix of it.
    """
    size = param.element_size()
    offset = (view.data_ptr() - param.data_ptr()) // size
    pdims: list[int | None] = []
    for d in range(view.ndim):
        if view.shape[d] == 1:
            pdims.append(None)
            continue
        match = [k for k in range(param.ndim) if param.stride(k) == view.stride(d) and param.shape[k] > 1]
        if len(match) != 1:
            return f"view of shape {tuple(view.shape)} strides {view.stride()} is not a slice of {tuple(param.shape)}"
        pdims.append(match[0])
    partial = [d for d, k in enumerate(pdims) if k is not None and view.shape[d] != param.shape[k]]
    if param.ndim == 3:
        if partial:
            return f"partial slice {tuple(view.shape)} of {tuple(param.shape)}"
        experts = param.shape[0]
        if 0 in pdims:  # the whole stack (bmm over experts)
            return (pdims, experts, None) if offset == 0 else "offset view of the expert stack"
        expert, rest = divmod(offset, param.stride(0))
        return (pdims, experts, expert) if rest == 0 else f"offset {offset} is inside expert {expert}"
    if param.ndim != 2:
        return f"{param.ndim}-D parameter"
    if not partial:
        return ([None if k is None else k for k in pdims], None, None) if offset == 0 else "offset view"
    # experts stacked along the rows of a 2-D parameter (DBRX): a block of `rows` rows per expert
    if len(partial) != 1 or pdims[partial[0]] != 0 or param.shape[0] % view.shape[partial[0]]:
        return f"partial slice {tuple(view.shape)} of {tuple(param.shape)}"
    rows = view.shape[partial[0]]
    expert, rest = divmod(offset, rows * param.stride(0))
    if rest:
        return f"offset {offset} is not the start of a block of {rows} rows"
    # logical view [E, rows, cols]: param dim 0 (within a block) -> 1, param dim 1 -> 2
    return [None if k is None else k + 1 for k in pdims], param.shape[0] // rows, expert


@contextlib.contextmanager
def eager_experts(model: nn.Module):
    """Run transformers' fused experts through their per-expert loop ("eager") inside the block.

    The batched kernels (grouped_mm, batched_mm) gather the experts' weights into copies or
    multiply all experts in one call, so neither the layout nor the per-expert inputs could
    be read from them; the eager loop computes the same function one expert at a time.
    """
    get = getattr(model, "get_experts_implementation", None)
    before = get() if callable(get) else None
    if not before or all(v in (None, "eager") for v in before.values()):
        yield
        return
    model.set_experts_implementation("eager")
    try:
        yield
    finally:
        model.set_experts_implementation(before)

"""MaskLLM's per-weight work, fused: ``W * soft_mask`` from the logits and Gumbel noise, and back.

Per group g of M weights and candidate c (MASKLLM.md, steps 3 and 5)::

    y_g = softmax((kappa * pi_g + G_g) / tau),   G_gc = -log(-log u_gc)
    soft_mask_g = sum_c y_gc s_c,   out = W * soft_mask,   sq = ||out||_F^2

**Noise.** ``u_gc`` is a counter-based uniform: a hash of (key, g * C + c), where the key is a hash of
(seed, step, micro-batch, layer). Nothing needs to be stored for backward (the noise is recomputed), every
data-parallel or FSDP rank draws the same noise without communication, a resumed run draws what an
uninterrupted one would, and the result does not depend on the thread count. ``u = (2j + 1) / 2^24``
(j: 23 hash bits) lies in (0, 1) exactly, so G is bounded by +-16.6 like the clamped uniforms of
``torch.distributions.Gumbel`` (tests/test_mask_kernel.py checks the law against ``F.gumbel_softmax``).

**Two implementations of one formula.** On CPU, a C++ kernel (``csrc/masked_weight.cpp``, compiled
on first use by ``torch.utils.cpp_extension``) makes one pass per layer forward and one backward,
instead of ~15 tensor-wide passes. Elsewhere (CUDA, or no C++ compiler), the same math in torch ops
(``masked_weight_reference``, also the test oracle), wrapped so that, like the kernel, it keeps
nothing but its inputs for backward and recomputes the sample there. The two draw bitwise-identical
uniforms; their logs and exps may differ in the last bit.

**Recomputation.** :class:`Recipe` computes a layer's ``W * soft_mask`` again (``pipeline.maskllm.masks``
keeps it instead of the masked weight for backward); on the kernel it also keeps the sample ``y`` it
drew, which the kernel's backward then reads instead of drawing it a third time (the same bits).

Subnormal soft-mask entries are flushed to zero in both, as FTZ would: late in the schedule
(tau -> 0.05) they appear in large numbers and slow every CPU op that reads them.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import struct
import warnings
from pathlib import Path
from typing import Callable

import torch

CSRC = Path(__file__).resolve().parent / "csrc" / "masked_weight.cpp"
M32 = 0xFFFFFFFF
MAX_CPP_CANDIDATES = 128  # the kernel's stack buffers; C(M, N) above it (e.g. 8:16) uses torch ops


# ------------------------------------------------------------------ the noise

def noise_key(seed: int, step: int, layer: int, micro: int = 0) -> tuple[int, int]:
    """Two 32-bit keys for the noise of (seed, step, micro-batch, layer): a cryptographic hash, so keys of
    neighbouring steps, micro-batches or layers are unrelated."""
    digest = hashlib.blake2b(struct.pack("<qqqq", seed, step, micro, layer), digest_size=8).digest()
    k0, k1 = struct.unpack("<II", digest)
    return k0, k1


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """C. Wellons' 32-bit hash on int64 tensors holding uint32 values (products kept below 2^63)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = ((x * 0xA68B) + (((x * 0x846C) & 0xFFFF) << 16)) & M32  # x * 0x846ca68b mod 2^32, in halves
    return x ^ (x >> 16)


def uniform(index: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Counter-based uniforms in (0, 1): int64 ``index`` -> float32, ``(2j + 1) / 2^24`` (exact)."""
    k0, k1 = key
    h = _lowbias32(_lowbias32((index & M32) ^ k0) ^ k1 ^ (index >> 32))
    return (((h >> 9) << 1) | 1).to(torch.float32) * 2.0**-24


def gumbel(groups: int, n_candidates: int, key: tuple[int, int], device=None) -> torch.Tensor:
    """Gumbel(0, 1) noise ``[G, C]`` of one layer and step: ``-log(-log u)``."""
    index = torch.arange(groups * n_candidates, device=device, dtype=torch.int64).view(groups, n_candidates)
    return -torch.log(-torch.log(uniform(index, key)))


def flush_subnormals(x: torch.Tensor) -> torch.Tensor:
    """Subnormal entries -> 0 (what FTZ does to results), whatever the process's FTZ setting."""
    return torch.where(x.abs() < torch.finfo(x.dtype).tiny, torch.zeros_like(x), x)


class _Flush(torch.autograd.Function):
    """``flush_subnormals`` in forward and on the gradient in backward (the kernel flushes both)."""

    @staticmethod
    def forward(ctx, x):
        return flush_subnormals(x)

    @staticmethod
    def backward(ctx, grad):
        return flush_subnormals(grad)


# ------------------------------------------------------------------ the torch reference

View = Callable[[torch.Tensor], torch.Tensor]  # stored weight -> its logical [out, in] / [E, out, in] view


def as_3d(weight: torch.Tensor, view: View | None) -> torch.Tensor:
    """The kernel's ``[B, R, K]`` view of a stored weight: groups of M along K (the input)."""
    w = weight if view is None else view(weight)
    return w.unsqueeze(0) if w.dim() == 2 else w


def sample_reference(logits: torch.Tensor, key: tuple[int, int], temperature: float,
                     logit_scale: float) -> torch.Tensor:
    """y = softmax((kappa * pi + G) / tau) over the candidates: ``[G, C]``, subnormals flushed."""
    noise = gumbel(logits.shape[0], logits.shape[1], key, logits.device)
    return flush_subnormals(torch.softmax((logit_scale * logits + noise) / temperature, dim=-1))


def masked_weight_reference(weight: torch.Tensor, logits: torch.Tensor, candidates: torch.Tensor,
                            key: tuple[int, int], temperature: float, logit_scale: float,
                            view: View | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W * soft_mask, ||W * soft_mask||^2 float64, sum_g max_c y_gc float64) under plain autograd."""
    y = sample_reference(_Flush.apply(logits), key, temperature, logit_scale)
    mask = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # the stored layout
    target = as_3d(mask, view)
    target.copy_((y @ candidates.to(y.dtype)).reshape(target.shape))  # autograd follows the copy into the view
    out = _Flush.apply(weight.float() * mask).to(weight.dtype)
    sq = out.double().square().sum()
    return out, sq, y.detach().amax(dim=-1).double().sum()


# ------------------------------------------------------------------ the C++ kernel

@functools.lru_cache(maxsize=1)
def cpp_kernel():
    """The compiled CPU kernel, or None (with one warning) where it cannot be built."""
    if os.environ.get("MASKLLM_KERNEL", "auto") == "torch":
        return None
    error: Exception | None = None
    # -ffast-math lets gcc vectorise log/exp (glibc's libmvec); every group's arithmetic is the same
    # whatever the thread count, so results stay deterministic. -fopenmp: at::parallel_for runs the
    # tiles on torch's OpenMP pool (the process already holds torch's libgomp.so.1, which the loader
    # reuses for ours: one pool, not two). A compiler without OpenMP (Apple clang) gets the same
    # kernel without it: at::parallel_for then runs the tiles in order on one thread, same results
    base = ["-O3", "-march=native", "-ffast-math", "-std=c++20"]
    builds = [(base + ["-fopenmp"], ["-fopenmp"]), (base, [])]
    for i, (cflags, ldflags) in enumerate(builds):
        try:
            _build(cflags, ldflags)
            if i:
                warnings.warn("MaskLLM's C++ mask kernel was built without OpenMP (the compiler refused "
                              "-fopenmp): it runs on one thread", RuntimeWarning, stacklevel=2)
            return _Ops(torch.ops.maskllm)
        except Exception as e:  # no compiler, no ninja, no OpenMP, unsupported platform
            error = e
    if os.environ.get("MASKLLM_KERNEL") == "cpp":
        raise error
    warnings.warn(f"MaskLLM's C++ mask kernel could not be built ({type(error).__name__}: {error}); "
                  "using the torch implementation (same math, slower on CPU)", RuntimeWarning, stacklevel=2)
    return None


def _build(cflags: list[str], ldflags: list[str]) -> None:
    """Compile and load the kernel (``torch.ops.maskllm``) with these flags."""
    from torch.utils.cpp_extension import load

    # built from a copy named by its content, flags, Python and torch: every checkout of the same
    # source (the test suite's temporary repositories, DVC's queued experiments) reuses one build
    # instead of rebuilding because the source path changed. The folder is ours (under torch's
    # documented TORCH_EXTENSIONS_DIR when set), passed to load() as its build_directory.
    code = CSRC.read_bytes()
    key = " ".join([*cflags, *ldflags, platform.python_version(), torch.__version__]).encode()
    name = f"maskllm_masked_weight_{hashlib.sha256(code + key).hexdigest()[:12]}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    build = root / "maskllm" / name
    build.mkdir(parents=True, exist_ok=True)
    source = build / CSRC.name
    if not source.is_file() or source.read_bytes() != code:
        tmp = source.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(code)
        os.replace(tmp, source)
    load(name=name, sources=[str(source)], build_directory=str(build), verbose=False, is_python_module=False,
         extra_cflags=cflags, extra_ldflags=ldflags)


class _Ops:
    """The kernel's entry points (``torch.ops.maskllm``)."""

    def __init__(self, ops):
        self.forward, self.backward, self.sample = (ops.masked_weight_forward, ops.masked_weight_backward,
                                                    ops.masked_weight_sample)


def kernel_name(device: torch.device | str, n_candidates: int) -> str:
    """Which implementation ``masked_weight`` uses for this device and candidate count."""
    if torch.device(device).type == "cpu" and n_candidates <= MAX_CPP_CANDIDATES and cpp_kernel() is not None:
        return "cpp"
    return "torch"


class Recipe:
    """How to compute one layer's masked weight again: the inputs of :func:`masked_weight`.

    ``pipeline.maskllm.masks`` keeps a recipe, not ``W * soft_mask``, where autograd would keep the masked
    weight for the input gradient of the layer's product (one model-sized tensor held from the forward
    to the backward). Calling it recomputes the same bits; on the C++ kernel it also leaves the layer's
    sample ``y`` for the kernel's backward, which then reads it instead of drawing it again. Both stay
    until that backward has run (a weight read by several products is recomputed once).
    """

    def __init__(self, weight, logits, candidates, key, temperature, logit_scale, view):
        self.args = (weight, logits, candidates, key, temperature, logit_scale, view)
        self.out: torch.Tensor | None = None
        self.y: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        if self.out is None:
            weight, logits, candidates, key, temperature, logit_scale, view = self.args
            with torch.no_grad():
                if kernel_name(weight.device, logits.shape[1]) == "cpp":
                    self.out = torch.empty_like(weight)
                    _, _, self.y = cpp_kernel().forward(as_3d(weight, view), as_3d(self.out, view), logits,
                                                        candidates, key[0], key[1], logit_scale, temperature,
                                                        torch.get_num_threads(), True)
                else:
                    self.out = masked_weight_reference(weight, logits, candidates, key, temperature, logit_scale,
                                                       view)[0]
        return self.out

    def release(self) -> torch.Tensor | None:
        """Drop the recomputed weight -> the sample it left (None if there is none)."""
        y, self.out, self.y = self.y, None, None
        return y


class _MaskedWeight(torch.autograd.Function):
    """The C++ forward/backward; only the inputs are saved (the noise and y are recomputed, or read from
    the recipe's recomputation)."""

    @staticmethod
    def forward(ctx, weight, logits, candidates, key, temperature, logit_scale, view):
        out = torch.empty_like(weight)
        sq, confidence, _ = cpp_kernel().forward(as_3d(weight, view), as_3d(out, view), logits, candidates, key[0],
                                                 key[1], logit_scale, temperature, torch.get_num_threads(), False)
        ctx.save_for_backward(weight, logits, candidates)
        ctx.args = (key, temperature, logit_scale, view)
        ctx.mark_non_differentiable(confidence)
        return out, sq, confidence

    @staticmethod
    def backward(ctx, grad_out, grad_sq, _grad_confidence):
        weight, logits, candidates = ctx.saved_tensors
        key, temperature, logit_scale, view = ctx.args
        recipe = getattr(ctx, "recipe", None)  # set by masked_weight on this node
        y = recipe.release() if recipe is not None else None
        if grad_out is None:
            grad_out = torch.zeros_like(weight)
        g_sq = 0.0 if grad_sq is None else float(grad_sq)
        grad_logits = cpp_kernel().backward(as_3d(grad_out.to(weight.dtype), view), g_sq, as_3d(weight, view), logits,
                                            candidates, key[0], key[1], logit_scale, temperature,
                                            torch.get_num_threads(), y)
        return None, grad_logits, None, None, None, None, None


class _MaskedWeightTorch(torch.autograd.Function):
    """The torch ops with the C++ kernel's memory behaviour: nothing but the inputs is kept for backward,
    which recomputes the layer's sample (the same keyed noise) under its own small graph.

    Besides memory, this keeps the regulariser's gradient in the same autograd node as the mask's:
    with separate ops, backward reaches every layer's ``||W * M||^2`` branch straight from the loss,
    at its very start, which makes activation checkpointing recompute every block at once."""

    @staticmethod
    def forward(ctx, weight, logits, candidates, key, temperature, logit_scale, view):
        with torch.no_grad():
            out, sq, confidence = masked_weight_reference(weight, logits, candidates, key, temperature, logit_scale,
                                                          view)
        ctx.save_for_backward(weight, logits, candidates)
        ctx.args = (key, temperature, logit_scale, view)
        ctx.mark_non_differentiable(confidence)
        return out, sq, confidence

    @staticmethod
    def backward(ctx, grad_out, grad_sq, _grad_confidence):
        weight, logits, candidates = ctx.saved_tensors
        key, temperature, logit_scale, view = ctx.args
        recipe = getattr(ctx, "recipe", None)
        if recipe is not None:
            recipe.release()
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_()
            out, sq, _ = masked_weight_reference(weight.detach(), leaf, candidates, key, temperature, logit_scale,
                                                 view)
            outputs, grads = [], []
            for tensor, grad in ((out, grad_out), (sq, grad_sq)):
                if grad is not None:
                    outputs.append(tensor)
                    grads.append(grad)
            (grad_logits,) = torch.autograd.grad(outputs, [leaf], grads)
        return None, grad_logits, None, None, None, None, None


def masked_weight(weight: torch.Tensor, logits: torch.Tensor, candidates: torch.Tensor, key: tuple[int, int],
                  temperature: float, logit_scale: float, view: View | None = None, recipe: Recipe | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W * soft_mask`` (W's shape and dtype), ``||.||^2`` and ``sum_g max_c y_gc`` (float64 scalars).

    weight: the stored parameter; ``view`` maps it (and anything shaped like it) to its logical
    ``[out, in]`` or ``[E, out, in]`` view (None: it is already ``[out, in]``); logits: float32
    ``[G, C]``, contiguous, groups in the row-major order of that view; candidates: ``[C, M]`` 0/1.
    Gradients flow to the logits only. ``recipe``: the :class:`Recipe` of this very call, if the
    caller recomputes the output in backward (its recomputation is released by this function's backward).
    """
    fused = _MaskedWeight if kernel_name(weight.device, logits.shape[1]) == "cpp" else _MaskedWeightTorch
    out, sq, confidence = fused.apply(weight, logits, candidates, key, temperature, logit_scale, view)
    if recipe is not None and out.grad_fn is not None:
        out.grad_fn.recipe = recipe  # a custom Function's node is its ctx: its backward finds the recipe there
    return out, sq, confidence

"""The Gram matrix of calibration inputs, accumulated: ``C <- beta * C + alpha * X^T X`` (upper triangle).

SparseGPT's Hessian ``2 X^T X`` is symmetric, so only one triangle needs computing. BLAS has the
routine for exactly that, ``syrk`` (half the FLOPs of a GEMM, at a GEMM's efficiency), but torch
exposes no binding of it. Where torch's CPU build carries Intel MKL (the x86 wheels), its ``?syrk``
is called through ``ctypes`` and runs on torch's own OpenMP pool; anywhere else (CUDA, ARM, other
BLAS) the triangle is computed in row panels of ``addmm`` (about 40 % fewer FLOPs than the full
product, at a lower efficiency). On the 2-core Intel Xeon, float64, 4096 tokens: 1.2x faster than the
panels at width 576 and 1536 (bench/sparsegpt_speed.py reports the Hessian's share).

The two agree to rounding (``tests/test_gram.py``), not bit for bit.
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

PANEL = 192  # Gram rows per addmm in the fallback: only the upper staircase of X^T X is computed


@functools.lru_cache(maxsize=None)
def mkl_syrk(dtype: torch.dtype):
    """MKL's ``?syrk`` (Fortran calling convention) from torch's CPU library, or None where it has none."""
    if os.environ.get("MASKLLM_SYRK", "auto") == "torch":
        return None
    name = {torch.float32: "mkl_blas_ssyrk", torch.float64: "mkl_blas_dsyrk"}.get(dtype)
    if name is None or "mkl" not in torch.__config__.show().lower():
        return None
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        fn = getattr(ctypes.CDLL(str(library)), name)  # the library torch has loaded: no second copy
    except (OSError, AttributeError):
        return None
    fn.restype = None
    return fn


def accumulate_gram(upper: torch.Tensor, x: torch.Tensor, alpha: float, beta: float) -> None:
    """``upper <- beta * upper + alpha * x^T x`` on and above the diagonal (below it: unspecified).

    upper: [n, n] contiguous, x: [tokens, n], both of one floating dtype and device.
    """
    n, tokens = upper.shape[0], x.shape[0]
    syrk = mkl_syrk(upper.dtype) if upper.device.type == "cpu" and upper.is_contiguous() else None
    if syrk is not None and 0 < tokens < 2**31 and n < 2**31:  # MKL's LP64 interface: 32-bit sizes
        x = x.contiguous()
        # row-major x [tokens, n] is column-major x^T [n, tokens]: C = x^T x with trans "N", and the
        # row-major upper triangle is the column-major lower one ("L")
        scalar = ctypes.c_double if upper.dtype == torch.float64 else ctypes.c_float
        syrk(ctypes.byref(ctypes.c_char(b"L")), ctypes.byref(ctypes.c_char(b"N")), ctypes.byref(ctypes.c_int(n)),
             ctypes.byref(ctypes.c_int(tokens)), ctypes.byref(scalar(alpha)), ctypes.c_void_p(x.data_ptr()),
             ctypes.byref(ctypes.c_int(n)), ctypes.byref(scalar(beta)), ctypes.c_void_p(upper.data_ptr()),
             ctypes.byref(ctypes.c_int(n)))
        return
    for i in range(0, n, PANEL):
        rows = slice(i, i + PANEL)
        upper[rows, i:].addmm_(x[:, rows].t(), x[:, i:], beta=beta, alpha=alpha)


def gram_flops(width: int, tokens: int, dtype: torch.dtype = torch.float64) -> int:
    """FLOPs of one :func:`accumulate_gram` on CPU: the triangle (syrk) or the panels' staircase."""
    if mkl_syrk(dtype) is not None:
        return width * (width + 1) * tokens
    return sum(2 * min(PANEL, width - i) * (width - i) * tokens for i in range(0, width, PANEL))

"""The Gram matrix of calibration inputs, accumulated: ``C <- beta * C + alpha * X^T X`` (upper triangle).

SparseGPT's Hessian ``2 X^T X`` is symmetric, so only its upper triangle is computed, in row panels of
``addmm``: about 40 % fewer FLOPs than the full product, on any device and BLAS, the same bits
wherever torch's GEMM gives them. (A BLAS ``syrk`` would halve the FLOPs, but torch binds none, and
the Hessian is under 1 % of a SparseGPT prior's wall time.)
"""
from __future__ import annotations

import torch

PANEL = 192  # Gram rows per addmm: only the upper staircase of X^T X is computed


def accumulate_gram(upper: torch.Tensor, x: torch.Tensor, alpha: float, beta: float) -> None:
    """``upper <- beta * upper + alpha * x^T x`` on and above the diagonal (below it: unspecified).

    upper: [n, n], x: [tokens, n], both of one floating dtype and device.
    """
    n = upper.shape[0]
    for i in range(0, n, PANEL):
        rows = slice(i, i + PANEL)
        upper[rows, i:].addmm_(x[:, rows].t(), x[:, i:], beta=beta, alpha=alpha)


def gram_flops(width: int, tokens: int) -> int:
    """FLOPs of one :func:`accumulate_gram`: the panels' staircase."""
    return sum(2 * min(PANEL, width - i) * (width - i) * tokens for i in range(0, width, PANEL))

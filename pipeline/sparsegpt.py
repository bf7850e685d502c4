"""SparseGPT (Frantar & Alistarh, 2023) for N:M: mask selection with OBS weight updates.

Per layer, ``H = 2 X X^T`` from the calibration inputs (dampened by ``percdamp`` of its
mean diagonal) and ``U`` = upper Cholesky factor of ``H^-1``. Columns are swept left to
right; at the start of every group of M columns each row keeps the N weights with the
largest ``w^2 / U_jj^2`` and prunes the rest. Pruning (or freezing, if kept) column j
moves the weights of the later columns by the OBS update

    W[:, j:] -= (w_j - q_j) / U_jj * U[j, j:]        (q_j = w_j masked)

which is sequential elimination of ``H^-1`` written with the rows of its Cholesky factor.
The update is applied lazily: to the rest of the group column by column, to the rest of
the ``blocksize`` block once per group, to the remaining columns once per block.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from pipeline.nm import NMError, check_pattern, topn_mask


@contextmanager
def one_thread():
    """Run CPU work on one thread: a chain of small dependent ops gains nothing from
    OpenMP and, on a busy machine, stalls at every fork/join (measured: 10-30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the dampened ``H^-1``: H [in, in] -> (U float32 [in, in], dead bool [in])."""
    H = hessian.float().clone()  # float32 as in the reference: the damping keeps H well conditioned
    dead = H.diagonal() == 0  # inputs that are always zero: their weights are zeroed
    H.diagonal()[dead] = 1
    H.diagonal().add_(percdamp * H.diagonal().mean())
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(Hinv, upper=True), dead


def obs_sweep(
    weight: torch.Tensor, U: torch.Tensor, n: int, m: int, blocksize: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """The N:M column sweep: weight [out, in], U [in, in] -> (keep bool [out, in], new weight float32 [out, in])."""
    W = weight.detach().float().clone()
    out, cols = W.shape
    keep = torch.zeros(out, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]  # W1 is a view: updates land in W
        Err1 = torch.zeros_like(W1)  # (w_j - q_j) / U_jj of every column of the block
        for g1 in range(0, i2 - i1, m):
            g2 = g1 + m
            d = U1.diagonal()[g1:g2]
            keep_g = topn_mask(W1[:, g1:g2].square() / d.square(), n, m)  # N best per row
            keep[:, i1 + g1 : i1 + g2] = keep_g
            prune_over_d = (~keep_g).float() / d
            for j in range(g1, g2):
                err = W1[:, j] * prune_over_d[:, j - g1]
                W1[:, j:g2].addr_(err, U1[j, j:g2], alpha=-1)  # column j becomes q_j
                Err1[:, j] = err
            W1[:, g2:].addmm_(Err1[:, g1:g2], U1[g1:g2, g2:], alpha=-1)
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    W.mul_(keep)  # pruned weights exactly zero, not zero up to rounding
    return keep, W


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    n: int,
    m: int,
    percdamp: float = 0.01,
    blocksize: int = 128,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT N:M (N kept): weight [out, in], H [in, in] -> (mask bool [out, in], new weight float32 [out, in]).

    ``factor``: ``inverse_hessian_factor(hessian, percdamp)`` if already computed (layers
    fed the same input, like q/k/v, share it).
    """
    check_pattern(n, m)
    check_blocksize(blocksize, m)
    if weight.shape[1] % m:
        raise NMError(f"sparsegpt: input width {weight.shape[1]} is not divisible by m={m}")
    with one_thread():
        U, dead = factor if factor is not None else inverse_hessian_factor(hessian, percdamp)
        weight = weight.detach().float().masked_fill(dead[None, :], 0)
        return obs_sweep(weight, U, n, m, blocksize)


def check_blocksize(blocksize: int, m: int) -> None:
    """Groups of m columns must not straddle two blocks."""
    if blocksize < m or blocksize % m:
        raise NMError(f"sparsegpt.blocksize={blocksize} must be a positive multiple of m={m} (e.g. 128)")

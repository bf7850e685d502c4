"""SparseGPT (Frantar & Alistarh, 2023) for N:M: mask selection with OBS weight updates.

Per layer, ``H = 2 X X^T`` from the calibration inputs (dampened by ``percdamp`` of its
mean diagonal) and ``U`` = upper Cholesky factor of ``H^-1``. Columns are swept left to
right; at the start of every group of M columns each row keeps the N weights with the
largest ``w^2 / U_jj^2`` and prunes the rest. Pruning (or freezing, if kept) column j
moves the weights of the later columns by the OBS update

    W[:, j:] -= (w_j - q_j) / U_jj * U[j, j:]        (q_j = w_j masked)

which is sequential elimination of ``H^-1`` written with the rows of its Cholesky factor.
The updates are applied lazily: inside a group column by column; to a group, from the
earlier columns of its ``blocksize`` block, when the sweep reaches it; to the columns
after a block, once per block (one matmul).

On CPU the sweep runs as a C++ op (``csrc/obs_sweep.cpp``, built on first use by
``torch.utils.cpp_extension``): the same ATen calls as :func:`obs_sweep`, bit for bit, without
Python (and its GIL) between them. Without a compiler, or with ``MASKLLM_KERNEL=torch``,
:func:`obs_sweep` itself runs.
"""
from __future__ import annotations

import functools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.model.nm import NMError, check_pattern


@contextmanager
def one_thread():
    """Run the enclosed CPU work on one thread (the setting is restored afterwards)."""
    # the sweep is a chain of small dependent ops: an OpenMP fork/join per op costs more
    # than it saves and, on a busy machine, stalls (measured 10-30x slower on 2 threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def precise(t: torch.Tensor) -> torch.dtype:
    """The dtype SparseGPT computes ``t`` in: float32 (the reference's; bfloat16 / float16 widen to it) or float64."""
    return torch.promote_types(t.dtype, torch.float32)


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the dampened ``H^-1``: H [in, in] -> (U [in, in] float32 or float64 as H, dead bool [in])."""
    H = hessian.to(precise(hessian)).clone()  # float32 as in the reference (damping keeps H well conditioned), or float64
    dead = H.diagonal() == 0  # inputs that are always zero: their weights are zeroed
    H.diagonal()[dead] = 1
    H.diagonal().add_(percdamp * H.diagonal().mean())
    # The reference's cholesky -> cholesky_inverse -> cholesky(upper), without forming H^-1:
    # with J the index reversal and L the lower Cholesky factor of J H J, H = R R^T for the
    # upper triangular R = J L J, so H^-1 = (R^-1)^T R^-1 and U = R^-1 = J L^-1 J (the same
    # unique factor, positive diagonal). One Cholesky and one triangular solve: 1.3x faster
    # single-threaded at width 1536, float64, where the reference's potri is the slow step.
    L = torch.linalg.cholesky(H.flip(0, 1))
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1), dead


def obs_sweep(
    weight: torch.Tensor, U: torch.Tensor, n: int, m: int, blocksize: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """The N:M column sweep: weight [out, in], U [in, in] -> (keep bool [out, in], new weight [out, in] in U's dtype).

    Works on ``W^T`` so that the columns it sweeps one by one are contiguous in memory.
    The sweep is a chain of small dependent ops (one group of M columns at a time), so it
    is written for few dispatches per group: views split once per block, the in-group
    OBS coefficients read as Python floats, and the group's mask set in place.
    """
    WT = weight.detach().to(precise(U)).t().contiguous()  # [in, out]: row j of WT is column j of W
    cols = WT.shape[0]
    keepT = torch.zeros_like(WT, dtype=torch.bool)
    d = U.diagonal()
    d_sq = d.square()[:, None]  # denominators of the scores w^2 / U_jj^2
    inv_d = (1 / d)[:, None]  # err_j = (w_j - q_j) / U_jj: w_j / U_jj where pruned, 0 where kept
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = WT[i1:i2], U[i1:i2, i1:i2]  # W1 is a view: updates land in WT
        Err1 = torch.zeros_like(W1)  # (w_j - q_j) / U_jj of every column of the block
        u = U1.tolist()  # scalars for the in-group updates: a list lookup is cheaper than a tensor index
        rows, errs = W1.unbind(), Err1.unbind()  # one view per column of W, made once per block
        groups = zip(
            range(0, i2 - i1, m),
            W1.split(m), U1.t().split(m), keepT[i1:i2].split(m), d_sq[i1:i2].split(m), inv_d[i1:i2].split(m),
        )
        for g1, W_g, U_g, keep_g, d_sq_g, inv_d_g in groups:
            if g1:  # the OBS updates of the block's earlier columns, applied when the group is reached
                W_g.addmm_(U_g[:, :g1], Err1[:g1], alpha=-1)
            # N best per row of W by w^2 / U_jj^2, chosen once at the start of the group
            keep_g.scatter_(0, W_g.square().div_(d_sq_g).topk(n, dim=0).indices, True)
            w, err = rows[g1 : g1 + m], errs[g1 : g1 + m]
            prune_over_d = torch.where(keep_g, 0.0, inv_d_g).unbind()
            for j in range(m):
                torch.mul(w[j], prune_over_d[j], out=err[j])
                # column j itself would become q_j: left as is, the final W * keep does it
                for k in range(j + 1, m):
                    w[k].add_(err[j], alpha=-u[g1 + j][g1 + k])
        WT[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)
    WT.masked_fill_(~keepT, 0)  # pruned weights exactly +0.0 (not zero up to rounding, not -0.0)
    return keepT.t(), WT.t()  # views: the caller's copy into the layer does the transpose once


CSRC = Path(__file__).resolve().parent / "csrc" / "obs_sweep.cpp"


@functools.lru_cache(maxsize=1)
def compiled_sweep():
    """:func:`obs_sweep` as a compiled CPU op (same signature), or None (with one warning) where it cannot be built."""
    if os.environ.get("MASKLLM_KERNEL", "auto") == "torch":
        return None
    try:
        from torch.utils.cpp_extension import load

        load(name="maskllm_obs_sweep", sources=[str(CSRC)], verbose=False, is_python_module=False,
             extra_cflags=["-O2"])
        return torch.ops.maskllm_sparsegpt.obs_sweep
    except Exception as e:  # no compiler, no ninja, unsupported platform
        if os.environ.get("MASKLLM_KERNEL") == "cpp":
            raise
        warnings.warn(f"SparseGPT's C++ sweep could not be built ({type(e).__name__}: {e}); using the "
                      "Python loop (the same results, slower)", RuntimeWarning, stacklevel=2)
        return None


def sweep_for(device: torch.device):
    """The sweep to run on ``device``: the compiled one on CPU where it builds, else :func:`obs_sweep`."""
    compiled = compiled_sweep() if device.type == "cpu" else None
    return compiled if compiled is not None else obs_sweep


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    n: int,
    m: int,
    percdamp: float = 0.01,
    blocksize: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT N:M (N kept): weight [out, in], H [in, in] -> (mask bool [out, in], new weight float32 [out, in])."""
    return sparsegpt_prune_layers([(weight, hessian)], n, m, percdamp, blocksize)[0]


def sparsegpt_prune_layers(
    layers: list[tuple[torch.Tensor, torch.Tensor]],
    n: int,
    m: int,
    percdamp: float = 0.01,
    blocksize: int = 128,
    workers: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`sparsegpt_prune` of independent layers, ``[(weight, H), ...]``, up to ``workers`` sweeps at a time.

    Every layer's sweep runs on one thread, so the results are those of one layer after the
    other; ``workers`` (default: torch's thread count) puts the otherwise idle cores to work
    on the other layers' sweeps. Torch ops release the GIL while they run. The ``H^-1``
    factors come first, one after the other on all of torch's threads: LAPACK uses them well,
    and the widest layer's factor (MLP down-projection) would otherwise be the block's long pole.
    """
    check_pattern(n, m)
    check_blocksize(blocksize, m)
    for weight, _ in layers:
        if weight.shape[1] % m:
            raise NMError(f"sparsegpt: input width {weight.shape[1]} is not divisible by m={m}")
    workers = max(1, min(len(layers), workers or torch.get_num_threads()))
    if any(weight.device.type != "cpu" for weight, _ in layers):
        # an accelerator runs one sweep at a time anyway, and CUDA's lazily loaded linalg
        # libraries must not be initialised from two threads at once
        workers = 1
    sweeps = {layer[0].device: sweep_for(layer[0].device) for layer in layers}  # built here, not in a worker

    def factor(layer: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        weight, hessian = layer
        U, dead = inverse_hessian_factor(hessian, percdamp)
        return weight.detach().to(U.dtype).masked_fill(dead[None, :], 0), U

    def sweep(weight: torch.Tensor, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sweeps[weight.device](weight, U, n, m, blocksize)

    if workers == 1:  # one factor alive at a time (a 70B model's down-projection: 28672^2)
        results = []
        for layer in layers:
            weight, U = factor(layer)
            with one_thread():
                results.append(sweep(weight, U))
        return results
    # every factor of the block at once: as much memory again as the block's Hessians, which the
    # statistics pass holds anyway (a CPU-sized model; accelerators take the path above)
    factored = [factor(layer) for layer in layers]
    # the longest sweeps (most weights) first: the last one to start is then a short one,
    # and the workers finish together
    order = sorted(range(len(layers)), key=lambda i: layers[i][0].numel(), reverse=True)
    # one_thread is entered once, here: new threads take torch's global thread count (1)
    # when they first run a parallel op, and none of them changes it
    with one_thread(), ThreadPoolExecutor(workers) as pool:
        results = dict(zip(order, pool.map(lambda i: sweep(*factored[i]), order)))
    return [results[i] for i in range(len(layers))]


def prune_layers(layers, n: int, m: int, options) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The registry's interface: [(W [out, in], stats with hessian), ...] -> [(keep, W updated), ...]."""
    return sparsegpt_prune_layers([(weight, stats.hessian) for weight, stats in layers], n, m, options.percdamp,
                                  options.blocksize)


def check(n: int, m: int, options) -> None:
    check_blocksize(options.blocksize, m)


def check_blocksize(blocksize: int, m: int) -> None:
    """Groups of m columns must not straddle two blocks."""
    if blocksize < m or blocksize % m:
        raise NMError(f"sparsegpt.blocksize={blocksize} must be a positive multiple of m={m} (e.g. 128)")

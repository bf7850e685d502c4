"""The MaskLLM authors' SparseGPT prior: the dense model's Hessians, the mask without the OBS update.

What NVlabs/MaskLLM runs to make its prior (README "Generate prior masks": "For SparseGPT,
weight update is disabled"; ``tasks/pruning/prune_main_llama.py: prune_hessian`` and
``tasks/pruning/sparsity/core.py: HessianPruner.prune`` without ``--update-weight``):

- ``H = 2 X X^T`` of every layer from **one pass of the dense model** (hooks on all layers
  at once: no block is calibrated on pruned blocks' outputs);
- dampened by ``percdamp`` (0.01) of the mean diagonal, ``U`` = upper Cholesky factor of
  ``H^-1`` (the same three calls as our SparseGPT's);
- in every group of M inputs, the ``M - N`` smallest ``w^2 / U_jj^2`` of the **dense**
  weights are pruned. Without the update no weight moves, so every group is scored as the
  sweep would score it at its start had nothing been pruned before it.

(Their tensor-parallel runs take each rank's own slice of H for the row-parallel layers,
o_proj and down_proj; here H is the whole layer's, as with one GPU.)
"""
from __future__ import annotations

import torch

from pipeline.model.nm import NMError, check_pattern
from pipeline.oneshot.sparsegpt import inverse_hessian_factor


def noupdate_mask(weight: torch.Tensor, U: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the m-n smallest ``w^2 / U_jj^2`` of every group of m: weight [out, in], U [in, in] -> keep bool [out, in]."""
    out, cols = weight.shape
    score = weight.to(U.dtype).square() / U.diagonal().square()[None, :]
    # their call on each [out, m] slice: topk(score, m - n, largest=False) marks the *pruned*
    # weights, so ties break as theirs do (keeping the n largest could break them otherwise)
    pruned = torch.topk(score.reshape(out, cols // m, m), m - n, dim=-1, largest=False).indices
    keep = torch.ones(out, cols // m, m, dtype=torch.bool, device=weight.device).scatter_(-1, pruned, False)
    return keep.reshape(out, cols)


def sparsegpt_noupdate_layers(
    layers: list[tuple[torch.Tensor, torch.Tensor]], n: int, m: int, percdamp: float = 0.01
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prior of every ``(weight [out, in], H [in, in])`` -> [(keep bool [out, in], weight * keep), ...].

    ``H`` must come from the dense model's inputs. The weights are not updated: the second
    element is the dense weight with the mask applied.
    """
    check_pattern(n, m)
    out = []
    for weight, hessian in layers:
        if weight.shape[1] % m:
            raise NMError(f"sparsegpt_noupdate: input width {weight.shape[1]} is not divisible by m={m}")
        U, dead = inverse_hessian_factor(hessian, percdamp)
        W = weight.detach().to(U.dtype)
        keep = noupdate_mask(W.masked_fill(dead[None, :], 0), U, n, m)  # dead inputs score 0, as theirs do
        out.append((keep, W.masked_fill(~keep, 0)))
    return out


def prune_layers(layers, n: int, m: int, options) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The registry's interface: [(W [out, in], stats with the dense model's hessian), ...] -> [(keep, W masked), ...]."""
    return sparsegpt_noupdate_layers([(weight, stats.hessian) for weight, stats in layers], n, m, options.percdamp)

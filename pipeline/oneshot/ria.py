"""RIA (Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large Language Models",
ICLR 2024): relative importance and activations.

Score ``S_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * (||X_j||_2)^a`` with ``a = 0.5``: a
weight's share of its input channel's (column's) and of its output channel's (row's) total magnitude,
times the input activation norm to a power below Wanda's 1. Keep the N best-scored weights in every
group of M inputs; no weight update. (The paper also permutes input channels before N:M pruning;
that is a separate step, not done here: every method is compared on the same channel order.)
"""
from __future__ import annotations

import torch

from pipeline.model.nm import topn_mask

ACTIVATION_POWER = 0.5  # a: the paper's setting for every model


def ria_score(weight: torch.Tensor, sq_norms: torch.Tensor, power: float = ACTIVATION_POWER) -> torch.Tensor:
    """``RI_ij * ||X_j||^a``: weight [out, in] of one layer, sq_norms ``||X_j||^2`` [in] -> score [out, in]."""
    w = weight.detach().abs().to(torch.promote_types(weight.dtype, torch.float32))
    column, row = w.sum(dim=0, keepdim=True), w.sum(dim=1, keepdim=True)
    # an all-zero column or row (a dead input or output) scores 0, not 0/0
    relative = torch.where(column > 0, w / column, 0.0) + torch.where(row > 0, w / row, 0.0)
    return relative * sq_norms.to(w.dtype).pow(power / 2)[None, :]


def ria_mask(weight: torch.Tensor, sq_norms: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n best RIA scores of every m inputs: weight [out, in], sq_norms [in] -> bool [out, in]."""
    return topn_mask(ria_score(weight, sq_norms), n, m)


def prune_layers(layers, n: int, m: int, options=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The registry's interface: [(W [out, in] of one layer, stats with sq_norms), ...] -> [(keep, W masked), ...]."""
    out = []
    for weight, stats in layers:
        keep = ria_mask(weight, stats.sq_norms, n, m)
        out.append((keep, weight.masked_fill(~keep, 0)))
    return out

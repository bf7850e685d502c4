"""Wanda (Sun et al., 2023): prune by weight magnitude times input activation norm.

Score ``S_ij = |W_ij| * ||X_j||_2`` with ``X_j`` input feature j over all calibration
tokens; keep the N best-scored weights in every group of M inputs. No weight update.
"""
from __future__ import annotations

import torch

from pipeline.model.nm import topn_mask


def wanda_score(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2``: weight [out, in], sq_norms ``||X_j||^2`` [in] -> float32 [out, in]."""
    return weight.detach().abs().float() * sq_norms.sqrt().float()[None, :]


def wanda_mask(weight: torch.Tensor, sq_norms: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n best Wanda scores of every m inputs: weight [out, in], sq_norms [in] -> bool [out, in]."""
    return topn_mask(wanda_score(weight, sq_norms), n, m)


def prune_layers(layers, n: int, m: int, options=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The registry's interface: [(W [out, in], stats with sq_norms), ...] -> [(keep, W masked), ...]."""
    out = []
    for weight, stats in layers:
        keep = wanda_mask(weight, stats.sq_norms, n, m)
        out.append((keep, weight.masked_fill(~keep, 0)))
    return out

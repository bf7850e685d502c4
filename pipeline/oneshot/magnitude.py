"""Magnitude pruning: keep the N largest |W| in every group of M inputs."""
from __future__ import annotations

import torch

from pipeline.model.nm import topn_mask


def magnitude_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest ``|W|`` of every m consecutive inputs: weight [..., out, in] -> bool, its shape."""
    return topn_mask(weight.detach().abs().float(), n, m)


def prune_layers(layers, n: int, m: int, options=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The registry's interface: [(W [out, in], stats (unused)), ...] -> [(keep, W masked), ...]."""
    out = []
    for weight, _ in layers:
        keep = magnitude_mask(weight, n, m)
        out.append((keep, weight.masked_fill(~keep, 0)))  # +0.0, never -0.0 (sparse kernels expect +0)
    return out

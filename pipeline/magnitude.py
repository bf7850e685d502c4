"""Magnitude pruning: keep the N largest |W| in every group of M inputs."""
from __future__ import annotations

import torch

from pipeline.nm import topn_mask


def magnitude_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest ``|W|`` of every m consecutive inputs: weight [..., out, in] -> bool, its shape."""
    return topn_mask(weight.detach().abs().float(), n, m)

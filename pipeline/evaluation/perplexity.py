"""Perplexity under one protocol (Wanda / SparseGPT / MaskLLM evaluation scripts).

Join the test split with "\\n\\n", tokenise once, cut into non-overlapping windows of
``seqlen`` tokens, drop the tail, PPL = exp(mean over windows of the window's mean
next-token cross-entropy).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.data.tokens import windows


def window_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per window: logits ``[B, L, V]``, ids ``[B, L]`` -> ``[B]``."""
    pred = logits[:, :-1].float()
    target = ids[:, 1:]
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    return ce.view(target.shape).mean(dim=1)


@torch.inference_mode()
def perplexity(model, tokens: torch.Tensor, seqlen: int, batch_size: int = 4,
               max_windows: int | None = None, desc: str = "ppl") -> dict:
    """PPL of ``model`` on 1-D ``tokens`` -> {ppl, nll, windows, tokens}."""
    win = windows(tokens, seqlen)
    if max_windows:
        win = win[:max_windows]
    if len(win) == 0:
        raise ValueError(f"test split has {tokens.numel()} tokens: fewer than one window of evaluate.seqlen={seqlen}")
    device = next(model.parameters()).device
    losses = []
    for i in tqdm(range(0, len(win), batch_size), desc=desc, unit="batch"):
        ids = win[i : i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        losses.append(window_losses(logits, ids).double().cpu())
    nll = torch.cat(losses).mean().item()
    return {"ppl": math.exp(nll), "nll": nll, "windows": len(win), "tokens": len(win) * seqlen}

"""Token arrays: a split tokenised once under the evaluation protocol, on disk, and cut into windows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.io import atomic_save_npy

JOIN = "\n\n"  # the evaluation protocol joins documents with a blank line


class DataError(RuntimeError):
    """A corpus cannot be found or read; the message names the package/path and the fix."""



def tokenize(tokenizer, docs: list[str]) -> np.ndarray:
    """Join with the protocol's separator and tokenise once -> uint32 ids ``[tokens]``."""
    ids = tokenizer(JOIN.join(docs), return_attention_mask=False)["input_ids"]
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and arr.max() >= 2**32:
        raise DataError("token id does not fit uint32")
    return arr.astype(np.uint32)


def write_split(out_dir: Path, split: str, ids: np.ndarray) -> None:
    atomic_save_npy(out_dir / f"{split}.npy", ids)


def load_tokens(path: str | Path) -> torch.Tensor:
    """A split's token ids as a 1-D LongTensor."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing; run `dvc repro data` first")
    return torch.from_numpy(np.load(path).astype(np.int64))


def windows(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows, tail dropped -> ``[len // seqlen, seqlen]``."""
    n = tokens.numel() // seqlen
    return tokens[: n * seqlen].view(n, seqlen)


def sample_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Random windows (seeded) -> ``[nsamples, seqlen]``; for calibration and training batches."""
    if tokens.numel() <= seqlen:
        raise DataError(f"train split has {tokens.numel()} tokens, fewer than seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])

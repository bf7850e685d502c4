"""How much SparseGPT costs on top of the calibration forward passes it cannot avoid.

    .venv/bin/python bench/sparsegpt_speed.py artifacts/dense --nsamples 32 --seqlen 512

(a) the block-sequential forward passes alone (capture block 0's inputs, then one pass
per block, no statistics); (b) full SparseGPT 2:4 pruning on the same calibration set
(statistics pass + pruning + output pass per block). Block-sequential SparseGPT runs every
block twice, so (b)/(a) >= ~2. Writes bench/results/sparsegpt_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pipeline.calibration import prune_blockwise
from pipeline.oneshot import prune_oneshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="artifacts/dense", help="HF model directory")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--blocksize", type=int, default=128)
    parser.add_argument("--out", default="bench/results/sparsegpt_speed.json")
    args = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen), generator=gen)

    start = time.perf_counter()
    prune_blockwise(model, calib, prune_block=lambda layers, stats: None, new_stats=None, batch_size=args.batch_size)
    forward_s = time.perf_counter() - start

    result = prune_oneshot(
        model, "sparsegpt", calib, args.n, args.m, blocksize=args.blocksize, batch_size=args.batch_size,
        measure_error=False,
    )
    ratio = result.seconds / forward_s

    print(f"\n{'':<34}{'seconds':>10}")
    print(f"{'(a) calibration forward passes':<34}{forward_s:>10.1f}")
    print(f"{'(b) SparseGPT ' + f'{args.n}:{args.m}':<34}{result.seconds:>10.1f}")
    print(f"{'(b) / (a)':<34}{ratio:>10.2f}   (floor ~2, target <= 2.6)")

    record = {
        "model": args.model,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "batch_size": args.batch_size,
        "pattern": f"{args.n}:{args.m}",
        "blocksize": args.blocksize,
        "layers": len(result.masks),
        "forward_seconds": round(forward_s, 2),
        "sparsegpt_seconds": round(result.seconds, 2),
        "ratio": round(ratio, 3),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "device": str(next(model.parameters()).device),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""How much SparseGPT costs on top of the calibration forward passes it cannot avoid.

    .venv/bin/python bench/sparsegpt_speed.py            # the default profile (after dvc repro)
    .venv/bin/python bench/sparsegpt_speed.py --threads 1 --nsamples 32

By default everything is the prior stage's: the dense model of ``artifacts/dense``, the
calibration windows it samples from ``artifacts/data/train.npy`` and ``prior.*`` /
``sparsity.*`` of ``params.yaml``; flags override them.

(a) the block-sequential forward passes alone (capture block 0's inputs, then one pass
per block, no statistics); (b) full SparseGPT 2:4 pruning on the same calibration set
(statistics pass + pruning + output pass per block). Block-sequential SparseGPT runs every
block twice, so (b)/(a) >= ~2.

Runs (a), then ``--repeat`` times (b) followed by (a), and compares the fastest run of
each (like ``timeit``): on a shared machine the load drifts and only the minimum
approaches the uncontended cost. Process CPU time is recorded too (with ``--threads 1``
it is the work done, whatever the load). Writes bench/results/sparsegpt_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from pipeline.calibration import prune_blockwise
from pipeline.config import load_params
from pipeline.data import load_tokens, sample_windows
from pipeline.modeling import load_model
from pipeline.oneshot import prune_oneshot


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="artifacts/dense", help="HF model directory")
    parser.add_argument("--train", default="artifacts/data/train.npy", help="token file to sample windows from")
    parser.add_argument("--params", default="params.yaml", help="defaults of the flags below")
    parser.add_argument("--nsamples", type=int, help="default: prior.nsamples")
    parser.add_argument("--seqlen", type=int, help="default: prior.seqlen")
    parser.add_argument("--batch-size", type=int, default=8, help="the prior stage's batch")
    parser.add_argument("--n", type=int, help="default: sparsity.n")
    parser.add_argument("--m", type=int, help="default: sparsity.m")
    parser.add_argument("--blocksize", type=int, help="default: prior.blocksize")
    parser.add_argument("--repeat", type=int, default=1, help="runs of (b), each followed by a run of (a)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="bench/results/sparsegpt_speed.json")
    args = parser.parse_args()
    params = load_params(args.params)
    for key, value in (("nsamples", params.prior.nsamples), ("seqlen", params.prior.seqlen),
                       ("blocksize", params.prior.blocksize), ("n", params.sparsity.n), ("m", params.sparsity.m)):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model).eval()
    calib = sample_windows(load_tokens(args.train), args.nsamples, args.seqlen, params.prior.seed)

    def forward_passes() -> None:
        prune_blockwise(model, calib, lambda layers, stats: None, new_stats=None, batch_size=args.batch_size)

    def sparsegpt() -> None:  # pruning a pruned model again costs the same: dense matmuls either way
        prune_oneshot(
            model, "sparsegpt", calib, args.n, args.m, params.prior.percdamp, args.blocksize, args.batch_size,
            measure_error=False,  # the stage's error report is a diagnostic, not part of the method
        )

    forward_runs, sparsegpt_runs = [timed(forward_passes)], []
    for _ in range(args.repeat):
        sparsegpt_runs.append(timed(sparsegpt))
        forward_runs.append(timed(forward_passes))
    forward = [min(run[k] for run in forward_runs) for k in (0, 1)]
    pruning = [min(run[k] for run in sparsegpt_runs) for k in (0, 1)]
    ratio, cpu_ratio = pruning[0] / forward[0], pruning[1] / forward[1]

    print(f"\n{'':<34}{'wall s':>10}{'cpu s':>10}   all wall s")
    print(f"{'(a) calibration forward passes':<34}{forward[0]:>10.1f}{forward[1]:>10.1f}   "
          + ", ".join(f"{run[0]:.1f}" for run in forward_runs))
    print(f"{'(b) SparseGPT ' + f'{args.n}:{args.m}':<34}{pruning[0]:>10.1f}{pruning[1]:>10.1f}   "
          + ", ".join(f"{run[0]:.1f}" for run in sparsegpt_runs))
    print(f"{'(b) / (a)':<34}{ratio:>10.2f}{cpu_ratio:>10.2f}   (floor ~2, target <= 2.6)")

    record = {
        "model": args.model,
        "calibration": f"{args.train}, seed {params.prior.seed}",
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "batch_size": args.batch_size,
        "pattern": f"{args.n}:{args.m}",
        "blocksize": args.blocksize,
        "percdamp": params.prior.percdamp,
        "forward_seconds": round(forward[0], 2),
        "sparsegpt_seconds": round(pruning[0], 2),
        "ratio": round(ratio, 3),
        "forward_cpu_seconds": round(forward[1], 2),
        "sparsegpt_cpu_seconds": round(pruning[1], 2),
        "cpu_ratio": round(cpu_ratio, 3),
        "forward_runs_wall": [round(run[0], 2) for run in forward_runs],
        "sparsegpt_runs_wall": [round(run[0], 2) for run in sparsegpt_runs],
        "threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
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

"""How much SparseGPT costs on top of the calibration forward passes it cannot avoid.

    .venv/bin/python -m bench.sparsegpt_speed --repeat 2          # the default profile (after dvc repro)
    .venv/bin/python -m bench.sparsegpt_speed --threads 1 --nsamples 32
    .venv/bin/python -m bench.sparsegpt_speed --profile --blocks 6  # where the time goes, first 6 blocks
    python -m bench.sparsegpt_speed --config pipeline/maskllm/model_configs/smollm2-135m.json --nsamples 64 --seqlen 512 \
        --n 2 --m 4 --blocksize 128 --percdamp 0.01       # no artifacts: random weights of those shapes

By default everything is the prior stage's: the dense model of ``artifacts/dense``, the
calibration windows it samples from ``artifacts/data/train.npy`` and ``prior.*`` /
``sparsity.*`` of ``params.yaml``; flags override them. With ``--config`` (a config.json) the
model has those shapes and random weights, and the windows random tokens: the costs measured
here depend on the shapes only, so a machine without the pipeline's artifacts can run it.

(a) the block-sequential forward passes alone (capture block 0's inputs, then one pass
per block, no statistics); (b) full SparseGPT 2:4 pruning on the same calibration set
(statistics pass + Hessians + H^-1 factors and column sweeps + output pass per block).
Block-sequential SparseGPT runs every block about twice, so (b)/(a) >= ~1.8.

Runs (a), then ``--repeat`` times (b) followed by (a), and compares the fastest run of
each (like ``timeit``): on a shared machine the load drifts and only the minimum
approaches the uncontended cost. Process CPU time is recorded too (with ``--threads 1``
it is the work done, whatever the load). Both are also given as achieved FLOP/s, a
fraction of this machine's float32 GEMM peak on the model's shapes (``bench/roofline.py``,
measured in this process): the FLOPs are counted from the model's shapes (linear layers,
causal attention, the Hessian triangle ``pipeline.oneshot.gram`` computes, the factors and the sweeps'
updates). ``--profile`` times each part of (b) once more; ``--interleave`` runs (b)
once more with (a) timed block by block inside it (before each block's statistics pass, a plain
forward of the block), a ratio that load drifting between whole runs cannot bias. Writes bench/results/sparsegpt_speed.json.
"""
from __future__ import annotations

import argparse
import collections
import os
import platform
import time
from pathlib import Path

import torch

from pipeline.oneshot import calibration

from pipeline.oneshot import prune as oneshot
from pipeline.oneshot.calibration import InputStats, prune_blockwise
from pipeline.data.tokens import load_tokens, sample_windows
from pipeline.oneshot.gram import gram_flops
from pipeline.io import write_json
from pipeline.oneshot.prune import prune_oneshot
from pipeline.stage import keep_freed_memory
from bench.roofline import gemm_peak, model_shapes


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def flops(config: dict, blocks: int, nsamples: int, seqlen: int, m: int, blocksize: int) -> dict[str, float]:
    """FLOPs of (a) and of (b)'s parts for a LLaMA-style model (q/k/v and gate/up share an input)."""
    s = model_shapes(config)
    (q, hidden), (kv, _), (inter, _) = s["q_proj"], s["k_proj/v_proj"], s["gate_proj/up_proj"]
    layers = {"qkv": (q + 2 * kv, hidden), "o": (hidden, q), "gate_up": (2 * inter, hidden), "down": (hidden, inter)}
    tokens = nsamples * seqlen
    linear = sum(2 * o * i for o, i in layers.values()) * tokens
    attention = 2 * 2 * q * (seqlen + 1) / 2 * tokens  # QK^T and AV over the causal half
    forward = linear + attention
    stats = forward - 2 * hidden * inter * tokens  # the statistics pass stops at down_proj's input
    hessian = sum(gram_flops(i, tokens) for _, i in layers.values())
    factor = sum(4 / 3 * i**3 for _, i in layers.values())  # potrf, potri, potrf
    sweep = sum(2 * o * (sum((i - min(i1 + blocksize, i)) * blocksize for i1 in range(0, i, blocksize))
                         + sum(m * g1 for i1 in range(0, i, blocksize) for g1 in range(0, min(blocksize, i - i1), m)))
                for o, i in layers.values())
    per_block = {"forward": forward, "stats_pass": stats, "hessian": hessian, "factor_and_sweep": factor + sweep,
                 "output_pass": forward}
    out = {k: v * blocks for k, v in per_block.items()}
    out["sparsegpt"] = out["stats_pass"] + out["hessian"] + out["factor_and_sweep"] + out["output_pass"]
    return out


def profile(run, fa: float) -> dict[str, dict[str, float]]:
    """Wall and main-thread CPU seconds of (b)'s parts during one ``run()`` (the functions are wrapped meanwhile)."""
    wall, cpu = collections.defaultdict(float), collections.defaultdict(float)
    targets = [(InputStats, "add_batch", "hessian"), (calibration, "observe_block", "stats_pass_with_hessian"),
               (oneshot, "sparsegpt_prune_layers", "factor_and_sweep"), (calibration, "run_block", "output_pass"),
               (calibration, "capture_block_inputs", "capture")]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]

    def wrap(fn, key):
        def timed_fn(*args, **kwargs):
            t, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                wall[key] += time.perf_counter() - t
                cpu[key] += time.thread_time() - c
        return timed_fn

    for (owner, name, key), (_, _, fn) in zip(targets, saved):
        setattr(owner, name, wrap(fn, key))
    try:
        total = timed(run)
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    wall["stats_pass"] = wall.pop("stats_pass_with_hessian") - wall["hessian"]
    cpu["stats_pass"] = cpu.pop("stats_pass_with_hessian") - cpu["hessian"]
    wall["other"] = total[0] - sum(wall.values())
    print(f"\n{'(b) part':<22}{'wall s':>9}{'/ (a)':>8}{'main-thread cpu s':>19}")
    for key in ("capture", "stats_pass", "hessian", "factor_and_sweep", "output_pass", "other"):
        print(f"{key:<22}{wall[key]:>9.1f}{wall[key] / fa:>8.3f}{cpu.get(key, float('nan')):>19.1f}")
    print(f"{'total':<22}{total[0]:>9.1f}{total[0] / fa:>8.3f}")
    return {k: {"wall_s": round(wall[k], 2), "of_forward": round(wall[k] / fa, 3),
                "main_thread_cpu_s": round(cpu.get(k, float("nan")), 2)} for k in wall}


def interleaved(run) -> dict[str, float]:
    """(a) and (b) block by block in one ``run()`` of (b): before each block's statistics pass, a plain
    forward of that block over the same inputs (outputs discarded) is timed apart.

    The two sums then share every minute of the run, so load that drifts over the minutes
    between whole runs of (a) and (b) (measured: 76.2 and 66.8 s for two runs of (a) in one process) cancels
    in their ratio.
    """
    owner, name = calibration, "observe_block"
    observe = getattr(owner, name)
    plain = [0.0]

    def timed_observe(block, layers, calls, new_stats, device=None):
        t = time.perf_counter()
        for call in calls:
            calibration._call(block, call, device)  # block l's share of (a)
        plain[0] += time.perf_counter() - t
        return observe(block, layers, calls, new_stats, device)

    setattr(owner, name, timed_observe)
    try:
        total = timed(run)[0]
    finally:
        setattr(owner, name, observe)
    forward, sparsegpt = plain[0], total - plain[0]
    print(f"\ninterleaved, block by block: (a) {forward:.1f} s, (b) {sparsegpt:.1f} s, (b) / (a) {sparsegpt / forward:.3f}")
    return {"forward_seconds": round(forward, 2), "sparsegpt_seconds": round(sparsegpt, 2),
            "ratio": round(sparsegpt / forward, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="artifacts/dense", help="HF model directory")
    parser.add_argument("--train", default="artifacts/data/train.npy", help="token file to sample windows from")
    parser.add_argument("--config", help="a config.json: random weights of its shapes instead of MODEL, random tokens")
    parser.add_argument("--params", default="params.yaml", help="defaults of the flags below")
    parser.add_argument("--nsamples", type=int, help="default: prior.nsamples")
    parser.add_argument("--seqlen", type=int, help="default: prior.seqlen")
    parser.add_argument("--batch-size", type=int, default=8, help="the prior stage's batch")
    parser.add_argument("--n", type=int, help="default: sparsity.n")
    parser.add_argument("--m", type=int, help="default: sparsity.m")
    parser.add_argument("--blocksize", type=int, help="default: prior.blocksize")
    parser.add_argument("--percdamp", type=float, help="default: prior.percdamp")
    parser.add_argument("--seed", type=int, help="default: prior.seed")
    parser.add_argument("--dtype", choices=["float32", "float64"], help="default: prior.dtype (the stage's precision)")
    parser.add_argument("--blocks", type=int, help="only the first BLOCKS transformer blocks (quicker profiles)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of (b), each followed by a run of (a)")
    parser.add_argument("--profile", action="store_true", help="then time (b)'s parts in one more run")
    parser.add_argument("--interleave", action="store_true",
                        help="then one more run of (b) with (a) timed block by block inside it (immune to drifting load)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="glibc's default malloc settings, not the stage's (pipeline.stage.keep_freed_memory)")
    parser.add_argument("--out", default="bench/results/sparsegpt_speed.json")
    args = parser.parse_args()
    keys = ("nsamples", "seqlen", "blocksize", "percdamp", "seed", "dtype", "n", "m")
    if any(getattr(args, key) is None for key in keys):
        from pipeline.config import load_params

        params = load_params(args.params)
        for key in keys:
            if getattr(args, key) is None:
                setattr(args, key, getattr(params.sparsity if key in ("n", "m") else params.prior, key))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the prior stage (pipeline.stage.run_stage)
    kept = False if args.default_malloc else keep_freed_memory()  # as the prior stage, on CPU

    if args.config:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(args.config)
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        model.config.use_cache = False
        tokens = torch.randint(0, config.vocab_size, (args.nsamples * args.seqlen * 4,),
                               generator=torch.Generator().manual_seed(args.seed))
    else:
        from pipeline.model.loading import load_model

        model, tokens = load_model(args.model).eval(), load_tokens(args.train)
    model.to(getattr(torch, args.dtype))  # as the prior stage calibrates
    if args.blocks:
        model.model.layers = model.model.layers[: args.blocks]
    blocks = model.config.num_hidden_layers if not args.blocks else args.blocks
    calib = sample_windows(tokens, args.nsamples, args.seqlen, args.seed)
    peak = gemm_peak(dtype=getattr(torch, args.dtype))
    work = flops(model.config.to_dict(), blocks, args.nsamples, args.seqlen, args.m, args.blocksize)

    def forward_passes() -> None:
        prune_blockwise(model, calib, lambda layers, stats: None, new_stats=None, batch_size=args.batch_size,
                        progress=False)

    def sparsegpt() -> None:  # pruning a pruned model again costs the same: dense matmuls either way
        prune_oneshot(
            model, "sparsegpt", calib, args.n, args.m, args.percdamp, args.blocksize, args.batch_size,
            measure_error=False, progress=False,  # the stage's error report is a diagnostic, not part of the method
        )

    forward_runs, sparsegpt_runs = [timed(forward_passes)], []
    for _ in range(args.repeat):
        sparsegpt_runs.append(timed(sparsegpt))
        forward_runs.append(timed(forward_passes))
    forward = [min(run[k] for run in forward_runs) for k in (0, 1)]
    pruning = [min(run[k] for run in sparsegpt_runs) for k in (0, 1)]
    ratio, cpu_ratio = pruning[0] / forward[0], pruning[1] / forward[1]
    roof_a, roof_b = work["forward"] / forward[0] / peak, work["sparsegpt"] / pruning[0] / peak

    print(f"\n{'':<34}{'wall s':>10}{'cpu s':>10}{'GFLOP/s':>9}{'of peak':>9}   all wall s")
    print(f"{'(a) calibration forward passes':<34}{forward[0]:>10.1f}{forward[1]:>10.1f}"
          f"{work['forward'] / forward[0] / 1e9:>9.1f}{roof_a:>9.2f}   " + ", ".join(f"{run[0]:.1f}" for run in forward_runs))
    print(f"{'(b) SparseGPT ' + f'{args.n}:{args.m}':<34}{pruning[0]:>10.1f}{pruning[1]:>10.1f}"
          f"{work['sparsegpt'] / pruning[0] / 1e9:>9.1f}{roof_b:>9.2f}   " + ", ".join(f"{run[0]:.1f}" for run in sparsegpt_runs))
    print(f"{'(b) / (a)':<34}{ratio:>10.2f}{cpu_ratio:>10.2f}   (floor ~1.8, target <= 2.4)")
    print(f"{args.dtype} GEMM peak at {torch.get_num_threads()} thread(s), measured now: {peak / 1e9:.1f} GFLOP/s; FLOPs (b)/(a) "
          f"{work['sparsegpt'] / work['forward']:.2f}")
    parts = profile(sparsegpt, forward[0]) if args.profile else None
    mixed = interleaved(sparsegpt) if args.interleave else None

    record = {
        "model": args.config or args.model,
        "random_weights": bool(args.config),
        "blocks": blocks,
        "calibration": f"{'random tokens' if args.config else args.train}, seed {args.seed}",
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "batch_size": args.batch_size,
        "pattern": f"{args.n}:{args.m}",
        "blocksize": args.blocksize,
        "percdamp": args.percdamp,
        "dtype": args.dtype,
        "forward_seconds": round(forward[0], 2),
        "sparsegpt_seconds": round(pruning[0], 2),
        "ratio": round(ratio, 3),
        "forward_cpu_seconds": round(forward[1], 2),
        "sparsegpt_cpu_seconds": round(pruning[1], 2),
        "cpu_ratio": round(cpu_ratio, 3),
        "forward_runs_wall": [round(run[0], 2) for run in forward_runs],
        "sparsegpt_runs_wall": [round(run[0], 2) for run in sparsegpt_runs],
        "gemm_peak_flops_per_s": round(peak),
        "flops": {k: round(v) for k, v in work.items()},
        "forward_fraction_of_peak": round(roof_a, 3),
        "sparsegpt_fraction_of_peak": round(roof_b, 3),
        "profile": parts,
        "interleaved": mixed,
        "threads": torch.get_num_threads(), "malloc_keeps_freed_memory": kept,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "device": str(next(model.parameters()).device),
    }
    out = Path(args.out)
    write_json(out, record)  # makes the folder, writes atomically
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

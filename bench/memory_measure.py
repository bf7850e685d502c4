"""Measured per-rank peak memory of MaskLLM ``learn`` and of a one-shot prior on CPU (checks pipeline/maskllm/memory_plan.py).

    .venv/bin/python -m bench.memory_measure learn                          # 1 process
    .venv/bin/python -m bench.memory_measure learn --nproc 2 --parallel fsdp
    .venv/bin/python -m bench.memory_measure prior --method sparsegpt --nsamples 16

Every rank is its own process (torchrun, also for one), so the figures are the stage's, not this
launcher's. Per rank: the peak resident set (VmHWM from /proc/self/status: it includes the
interpreter, the libraries and the C++ mask kernel, measured alone as ``baseline`` before the model
is loaded), the resident set sampled every 100 ms with the phase it fell in (load, prepare, step t),
and, for ``learn``, the exact bytes of this rank's mask state after the last step: its local shards
of the logits, their gradients and AdamW's state, read off the live tensors. The launcher then asks
``memory_plan.py`` for the same configuration and writes both, with the error, to
``bench/results/memory_measure_<label>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def proc_status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Sampler:
    """Samples VmRSS every ``every`` seconds in a thread; ``phase`` labels what the process is doing."""

    def __init__(self, every: float = 0.1):
        self.every, self.phase, self.peaks = every, "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = proc_status()["VmRSS"]
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            time.sleep(self.every)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


# ------------------------------------------------------------------ one rank

def local_bytes(t) -> int:
    """Bytes this process holds of a (possibly FSDP-sharded) tensor."""
    from torch.distributed.tensor import DTensor

    if t is None:
        return 0
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def rank_learn(args, sampler: Sampler) -> dict:
    import torch

    import pipeline.maskllm.train as learn_mod
    from pipeline.config import Learn, Sparsity
    from pipeline.data.tokens import load_tokens
    from pipeline.maskllm.checkpoint import Checkpoint
    from pipeline.maskllm.distributed import Dist
    from pipeline.maskllm.train import learn_masks
    from pipeline.oneshot.magnitude import magnitude_mask
    from pipeline.maskllm.kernel import kernel_name
    from pipeline.model.loading import load_model
    from pipeline.model.nm import find_prunable_layers

    d = Dist.from_env()
    cfg = Learn(steps=args.steps, batch_size=args.batch, micro_batch_size=args.batch // args.nproc, seqlen=args.seqlen,
                nproc=args.nproc, parallel=args.parallel,
                dtype=args.dtype, activation_checkpointing=args.activation_checkpointing,
                checkpoint_every=args.steps + 1, prior="magnitude" if args.prior else "none")
    sp = Sparsity(n=args.n, m=args.m)
    kernel = kernel_name("cpu", __import__("math").comb(sp.m, sp.n))  # built (or loaded) before the baseline
    baseline = proc_status()
    sampler.phase = "load"
    model = load_model(args.model, cfg.dtype, "cpu")
    train = load_tokens(Path(args.data) / "train.npy")
    priors = None
    if args.prior:  # what the stage holds while learning: the prior's bool masks, one byte per weight
        priors = {layer.param_name: magnitude_mask(layer.weight().float(), sp.n, sp.m).contiguous()
                  for layer in find_prunable_layers(model, sp.m)}
    after_load = proc_status()
    sampler.phase = "learn"
    optimizers = []
    make = learn_mod.make_optimizer

    def recording(*a, **k):  # learn_masks keeps its optimizer to itself: record it to count its state
        opt, sched = make(*a, **k)
        optimizers.append(opt)
        return opt, sched

    learn_mod.make_optimizer = recording
    with tempfile.TemporaryDirectory() as ckpt:
        result = learn_masks(model, priors, train, cfg, sp, Checkpoint(Path(ckpt), "measure"), d=d,
                             progress=d.main, device="cpu")
    params = result.masks.parameters()
    state = {"logits": sum(local_bytes(p) for p in params), "grads": sum(local_bytes(p.grad) for p in params),
             "optimizer": sum(local_bytes(v) for st in optimizers[0].state.values() for v in st.values()
                              if torch.is_tensor(v))}
    logit_ids = {id(p) for p in params}
    frozen = sum(local_bytes(p) for p in model.parameters() if id(p) not in logit_ids)
    return {"rank": d.rank, "world": d.world, "kernel": kernel, "threads": torch.get_num_threads(),
            "baseline": baseline, "after_load": after_load, "end": proc_status(),
            "mask_state_bytes": state, "mask_state_total": sum(state.values()), "frozen_weight_bytes": frozen,
            "step_seconds": result.step_seconds}


def rank_prior(args, sampler: Sampler) -> dict:
    import torch

    from pipeline.data.tokens import load_tokens, sample_windows
    from pipeline.model.loading import load_model
    from pipeline.oneshot.prune import prune_oneshot
    from pipeline.oneshot.sparsegpt import compiled_sweep

    compiled_sweep()  # the C++ sweep built (or loaded) before the baseline
    baseline = proc_status()
    sampler.phase = "load"
    model = load_model(args.model, "float32", "cpu")
    calib = sample_windows(load_tokens(Path(args.data) / "train.npy"), args.nsamples, args.seqlen, 0)
    after_load = proc_status()
    sampler.phase = "prune"
    start = time.perf_counter()
    result = prune_oneshot(model, args.method, calib, args.n, args.m, measure_error=True, progress=False, device="cpu")
    return {"rank": 0, "world": 1, "threads": torch.get_num_threads(), "baseline": baseline,
            "after_load": after_load, "end": proc_status(), "seconds": time.perf_counter() - start,
            "layers": len(result.masks)}


def rank_main(args) -> None:
    import torch

    torch.set_flush_denormal(True)  # as run_stage does
    sampler = Sampler()
    out = (rank_learn if args.what == "learn" else rank_prior)(args, sampler)
    out["rss_peak_by_phase"] = sampler.stop()
    rank = int(os.environ.get("RANK", "0"))
    Path(args.rank_out).mkdir(parents=True, exist_ok=True)
    (Path(args.rank_out) / f"rank{rank}.json").write_text(json.dumps(out))


# ------------------------------------------------------------------ the launcher

def plan_for(args) -> dict:
    """memory_plan.py's figures for the same run (CPU: the C++ kernel; host = device)."""
    import memory_plan

    config = str(Path(args.model) / "config.json")
    if args.what == "learn":
        setup = memory_plan.LearnSetup(n=args.n, m=args.m, world=args.nproc, parallel=args.parallel, dtype=args.dtype,
                                       activation_checkpointing=args.activation_checkpointing, batch=args.batch,
                                       micro_batch=args.batch // args.nproc,
                                       seqlen=args.seqlen, device="cpu", prior_masks=args.prior)
        return memory_plan.plan_learn(config, setup).as_dict()
    setup = memory_plan.PriorSetup(n=args.n, m=args.m, method=args.method, nsamples=args.nsamples, seqlen=args.seqlen,
                                   device="cpu", threads=args.threads)
    return memory_plan.plan_prior(config, setup).as_dict()


def launch(args) -> Path:
    """Run the measurement as ``args.nproc`` torchrun processes; write their figures (no plan yet)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(args.threads or max(1, (os.cpu_count() or 1) // args.nproc))
    if args.malloc_mmap_threshold:
        # glibc keeps freed heap chunks (and raises its mmap threshold up to 32 MiB as big blocks are freed),
        # so RSS also holds memory no tensor uses; with every block above this size mmapped, a freed
        # tensor goes back to the system at once and the peak RSS is what the tensors needed
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        env["MALLOC_TRIM_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    args.threads = int(env["OMP_NUM_THREADS"])
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "--", __file__, *sys.argv[1:], "--rank-out", tmp]
        start = time.time()
        subprocess.run(cmd, env=env, check=True)
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(args.nproc)]
    from pipeline.io import write_json
    from pipeline.provenance import provenance

    result = {"what": args.what, "args": {k: v for k, v in vars(args).items() if k != "rank_out"},
              "wall_seconds": time.time() - start, "ranks": ranks,
              "provenance": provenance("cpu", args.dtype if args.what == "learn" else "float32")}
    label = args.label or (f"{args.what}_{args.nproc}x{args.parallel}" if args.what == "learn"
                           else f"prior_{args.method}")
    path = RESULTS / f"memory_measure_{label}.json"
    write_json(path, result)
    return path


def compare(path: Path) -> dict:
    """Add memory_plan.py's prediction for the measured configuration to a result file, and the error."""
    from pipeline.io import write_json

    result = json.loads(path.read_text())
    args = argparse.Namespace(**result["args"])
    ranks = result["ranks"]
    plan = plan_for(args)
    peaks = [r["end"]["VmHWM"] for r in ranks]
    baseline = max(r["baseline"]["VmHWM"] for r in ranks)
    # on CPU the host is the device: the plan's host peak (the step's or the load's, and what the stage holds
    # beside them); the process baseline is a constant it is given: this run's, measured before the model existed
    predicted = plan["host_peak_bytes"] + baseline
    result.update({"plan": plan, "baseline_bytes": baseline, "measured_peak_bytes": max(peaks),
                   "predicted_peak_bytes": predicted, "error": predicted / max(peaks) - 1})
    if args.what == "learn":
        result["mask_state_bytes_per_rank"] = [r["mask_state_total"] for r in ranks]
        result["predicted_mask_state_bytes"] = plan["mask_state_bytes"]
    write_json(path, result)
    gib = 2**30
    print(f"{path.name}")
    print(f"{'rank':>4s} {'baseline':>9s} {'after load':>10s} {'peak':>8s} {'mask state':>10s}  (GiB)")
    for r in ranks:
        state = r.get("mask_state_total", 0) / gib
        print(f"{r['rank']:4d} {r['baseline']['VmHWM'] / gib:9.3f} {r['after_load']['VmHWM'] / gib:10.3f} "
              f"{r['end']['VmHWM'] / gib:8.3f} {state:10.3f}")
    print(f"plan: {predicted / gib:.3f} GiB per rank (baseline + {plan['host_peak_bytes'] / gib:.3f}); "
          f"measured {max(peaks) / gib:.3f}; error {result['error']:+.1%}")
    return result


def main() -> None:
    if sys.argv[1:2] == ["compare"]:  # re-predict measured runs: memory_measure.py compare FILE...
        for name in sys.argv[2:]:
            compare(Path(name))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["learn", "prior"])
    ap.add_argument("--model", default=str(ROOT / "artifacts" / "dense"))
    ap.add_argument("--data", default=str(ROOT / "artifacts" / "data"))
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="the optimizer state appears at step 1, the peak by step 2")
    ap.add_argument("--prior", action=argparse.BooleanOptionalAction, default=True,
                    help="hold prior masks as the stage does (magnitude masks, computed here)")
    ap.add_argument("--method", default="sparsegpt", choices=["magnitude", "wanda", "sparsegpt", "sparsegpt_noupdate"])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="threads per process (0: cores / nproc)")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=0,
                    help="glibc: mmap every allocation from this many bytes on (0: glibc's default, dynamic)")
    ap.add_argument("--label", default="")
    ap.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                    help="add memory_plan.py's prediction (later: memory_measure.py compare FILE...)")
    ap.add_argument("--rank-out", help=argparse.SUPPRESS)  # set by the launcher for its torchrun processes
    args = ap.parse_args()
    if args.what == "prior" and args.nproc != 1:
        ap.error("prior runs in one process (--nproc 1)")
    if args.rank_out:
        return rank_main(args)
    path = launch(args)
    if args.compare:
        compare(path)


if __name__ == "__main__":
    main()

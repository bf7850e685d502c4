"""What only a GPU can tell, in one run of at most 8 minutes (run it through bench/gpu_check.sh).

    python -m bench.gpu_check                     # on a CUDA machine: writes bench/results/gpu_check.json (and $OUT/)
    python -m bench.gpu_check --cpu-dry-run       # every part on CPU, tiny configs: checks the script itself

Parts, each timed, each recorded even when another fails, in order of value (the budget skips the rest):

1. ``sdpa``: which tensors CUDA's SDPA keeps for backward (flash-like or math) per dtype: the plan counts that.
2. ``learn``: MaskLLM steps (``pipeline.maskllm.masks.train_step``, what ``learn`` runs per step on one
   process) on randomly initialised models built from bench/configs (quality is not the point):
   seconds per step, tokens/s, and the peak of ``torch.cuda.max_memory_allocated`` over the steps
   after the first (AdamW's state exists) against ``memory_plan.plan_learn`` for the same run.
3. ``prior``: a SparseGPT prior (``pipeline.oneshot.prune.prune_oneshot``, the model on the host, one block
   at a time on the GPU): seconds and the GPU peak against ``memory_plan.plan_prior``.
4. ``same_masks``: CUDA against CPU on a tiny model: the first soft mask (torch ops on CUDA, the C++
   kernel on CPU), the hardened masks after a few MaskLLM steps, and the one-shot masks.

Runs on the device's own Python: torch, transformers, numpy, tqdm; no DVC, MLflow or pydantic
(it imports ``pipeline.maskllm.masks`` and ``pipeline.oneshot.prune``, never ``pipeline.maskllm.train`` or ``pipeline.config``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from pipeline.maskllm import memory_plan
from pipeline.maskllm import masks as maskllm
from pipeline.maskllm.kernel import kernel_name, masked_weight, masked_weight_reference
from pipeline.model.nm import candidates
from pipeline.oneshot.prune import prune_oneshot
from pipeline.io import write_json
from pipeline.provenance import provenance

RESULTS = ROOT / "bench" / "results"

# (label, config, blocks kept (None: all), dtype, N:M, sequences, seqlen, activation checkpointing)
LEARN_RUNS = [
    ("llama-3.2-1b fp32 2:4", "llama-3.2-1b", None, "float32", (2, 4), 1, 2048, False),
    ("llama-3.2-1b bf16 2:4", "llama-3.2-1b", None, "bfloat16", (2, 4), 1, 2048, False),
    ("llama-3.2-1b bf16 2:4 AC", "llama-3.2-1b", None, "bfloat16", (2, 4), 1, 2048, True),
    ("llama-2-70b 1 block bf16 2:4", "llama-2-70b", 1, "bfloat16", (2, 4), 1, 4096, False),
    ("llama-3.2-1b 4 blocks bf16 4:8", "llama-3.2-1b", 4, "bfloat16", (4, 8), 1, 2048, False),
    ("llama-3.1-8b 2 blocks bf16 2:4", "llama-3.1-8b", 2, "bfloat16", (2, 4), 1, 4096, False),
]
PRIOR_RUN = ("llama-3.2-1b", None, 32, 2048)  # config, blocks kept, calibration windows, seqlen
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "num_hidden_layers": 2, "vocab_size": 256, "bos_token_id": 0, "eos_token_id": 1}


class Check:
    """The result file, rewritten after every part, so a run cut short keeps what it measured."""

    def __init__(self, path: Path, budget_s: float, dry_run: bool):
        self.path, self.budget_s, self.start = path, budget_s, time.monotonic()
        self.result = {"dry_run": dry_run, "parts": {}, "budget_s": budget_s}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def part(self, name: str, fn, *args, need_s: float = 0.0):
        """Run one part; its result (or its error, or why it was skipped) goes into the file."""
        if self.left() < need_s:
            self.result["parts"][name] = {"skipped": f"{self.left():.0f} s left of the budget, needs ~{need_s:.0f} s"}
            print(f"[gpu_check] {name}: skipped (budget)", flush=True)
        else:
            t0 = time.monotonic()
            try:
                out = fn(*args)
                out["seconds"] = time.monotonic() - t0
            except Exception as e:  # a failed part is a result too: the others still run
                out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:],
                       "seconds": time.monotonic() - t0}
            self.result["parts"][name] = out
            print(f"[gpu_check] {name}: {_summary(out)} ({out['seconds']:.1f} s)", flush=True)
            release()
        self.save()

    def save(self) -> None:
        self.result["elapsed_s"] = time.monotonic() - self.start
        write_json(self.path, self.result)
        out = os.environ.get("OUT")
        if out:  # the device tool brings back what is under $OUT
            Path(out).mkdir(parents=True, exist_ok=True)
            shutil.copy(self.path, Path(out) / self.path.name)


def _summary(out: dict) -> str:
    if "error" in out:
        return "ERROR " + out["error"][:200]
    keys = [k for k in ("error_vs_plan", "peak_gib", "plan_gib", "tokens_per_s", "agreement", "attention") if k in out]
    return ", ".join(f"{k}={out[k]}" for k in keys) or "ok"


def release() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ devices and models

class Meter:
    """Peak tensor memory of a region: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU (dry run) the
    tensors alive before it plus the peak of those made inside (``memory_plan.LiveBytes``)."""

    def __init__(self, device: str, alive_before: int = 0):
        self.device, self.alive_before = device, alive_before
        self.tracker = memory_plan.LiveBytes() if device == "cpu" else None

    def __enter__(self):
        if self.tracker is None:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.tracker.__enter__()
        return self

    def __exit__(self, *exc):
        if self.tracker is None:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.tracker.__exit__(*exc)
            self.peak = self.alive_before + self.tracker.peak
        return False


def tensor_bytes(*groups) -> int:
    """Distinct storages' bytes of the tensors in ``groups`` (iterables of tensors)."""
    seen = {}
    for group in groups:
        for t in group:
            if isinstance(t, torch.Tensor):
                seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())


def config_file(name: str, blocks: int | None, tmp: Path, dry_run: bool) -> Path:
    """pipeline/maskllm/model_configs/<name>.json, with only ``blocks`` blocks kept (and, dry run, tiny widths), as a file."""
    raw = json.loads((memory_plan.CONFIGS / f"{name}.json").read_text())
    if dry_run:
        raw.update(TINY)
    if blocks is not None:
        raw["num_hidden_layers"] = blocks
    path = tmp / f"{name}-{blocks or 'all'}{'-tiny' if dry_run else ''}.json"
    path.write_text(json.dumps(raw))
    return path


def random_model(path: Path, dtype: str, device: str, seed: int = 0):
    """A randomly initialised causal LM of a config file, built directly on ``device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(memory_plan.load_config(path), dtype=memory_plan.DTYPES[dtype])
    model.config.use_cache = False
    return model


def tokens(batch: int, seqlen: int, vocab: int, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seqlen), generator=g).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------ the parts

def part_sdpa(device: str) -> dict:
    """Which SDPA kernel training would use per dtype: what it keeps for backward (GQA, causal, no mask)."""
    out = {}
    heads, kv, T, D = 8, 2, 256, 64
    for dtype in ("float32", "bfloat16"):
        dt = memory_plan.DTYPES[dtype]
        q = torch.randn(1, heads, T, D, device=device, dtype=dt, requires_grad=True)
        k = torch.randn(1, kv, T, D, device=device, dtype=dt, requires_grad=True)
        v = torch.randn(1, kv, T, D, device=device, dtype=dt, requires_grad=True)
        exclude = {t.untyped_storage()._cdata for t in (q, k, v)}
        with memory_plan.saved_bytes(exclude) as saved:
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        flash_like = heads * T * D * dt.itemsize + heads * T * 4  # out + logsumexp
        # a kernel that keeps the [heads, T, T] probabilities (math) keeps far more than out + lse
        out[dtype] = "math" if saved[0] >= heads * T * T * dt.itemsize else "flash"
        out[f"{dtype}_saved_bytes"] = saved[0]
        out[f"{dtype}_flash_like_bytes"] = flash_like
    out["attention"] = out["float32"] + "/" + out["bfloat16"]
    return out


def part_learn(device: str, run: tuple, tmp: Path, dry_run: bool, attention: dict, steps: int) -> dict:
    """MaskLLM steps on one process: time, tokens/s, peak memory, and the plan's peak for the same run."""
    label, name, blocks, dtype, (n, m), seqs, seqlen, ac = run
    if dry_run:
        seqlen = min(seqlen, 64)
    path = config_file(name, blocks, tmp, dry_run)
    model = random_model(path, dtype, device)
    masks = maskllm.attach_masks(model, n, m, seed=0)
    if ac:  # as pipeline.maskllm.train.prepare does: recompute each block in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer, lr_schedule = maskllm.make_optimizer(masks, lr=5e-4, steps=100)
    schedule = maskllm.Schedule(steps=100)
    batch = tokens(seqs, seqlen, model.config.vocab_size, device)
    maskllm.train_step(model, masks, batch, optimizer, lr_schedule, schedule, 0)  # AdamW's state appears here
    optimizer.zero_grad(set_to_none=True)
    release()
    alive = tensor_bytes(model.parameters(), model.buffers(),
                         (v for st in optimizer.state.values() for v in st.values()))
    times = []
    with Meter(device, alive) as meter:
        for t in range(1, steps + 1):
            sync(device)
            start = time.perf_counter()
            metrics = maskllm.train_step(model, masks, batch, optimizer, lr_schedule, schedule, t)
            sync(device)
            times.append(time.perf_counter() - start)
    kernel = kernel_name(device, math.comb(m, n))
    setup = memory_plan.LearnSetup(n=n, m=m, world=1, dtype=dtype, activation_checkpointing=ac, batch=seqs, micro_batch=seqs,
                                   seqlen=seqlen, device="cuda" if device.startswith("cuda") else "cpu",
                                   prior_masks=False, attention=attention.get(dtype, "flash"), kernel=kernel)
    plan = memory_plan.plan_learn(str(path), setup)
    step = statistics.median(times)
    gib = 2**30
    return {"label": label, "config": name, "blocks": blocks or model.config.num_hidden_layers, "dtype": dtype,
            "nm": f"{n}:{m}", "batch": seqs, "seqlen": seqlen, "activation_checkpointing": ac, "kernel": kernel,
            "params": sum(p.numel() for p in model.parameters()), "step_s": times, "median_step_s": step,
            "tokens_per_s": round(seqs * seqlen / step, 1), "final_ce": metrics["ce"],
            "peak_bytes": meter.peak, "peak_gib": round(meter.peak / gib, 3),
            "plan_bytes": plan.device_peak_bytes, "plan_gib": round(plan.device_peak_bytes / gib, 3),
            "plan_moment": plan.moment, "plan_terms": plan.terms,
            "error_vs_plan": round(plan.device_peak_bytes / meter.peak - 1, 4)}


def part_prior(device: str, tmp: Path, dry_run: bool) -> dict:
    """A SparseGPT prior, block by block on ``device`` from a model on the host: time and device peak vs the plan."""
    name, blocks, nsamples, seqlen = PRIOR_RUN
    if dry_run:
        nsamples, seqlen = 8, 64
    path = config_file(name, blocks, tmp, dry_run)
    model = random_model(path, "float32", "cpu")
    calib = tokens(nsamples, seqlen, model.config.vocab_size, "cpu", seed=1)
    threads = torch.get_num_threads()
    alive = tensor_bytes(model.parameters(), model.buffers()) if device == "cpu" else 0
    with Meter(device, alive) as meter:
        start = time.perf_counter()
        result = prune_oneshot(model, "sparsegpt", calib, 2, 4, progress=False, device=device)
        seconds = time.perf_counter() - start
    plan = memory_plan.plan_prior(str(path), memory_plan.PriorSetup(
        n=2, m=4, method="sparsegpt", nsamples=nsamples, seqlen=seqlen, device="cuda" if device != "cpu" else "cpu",
        threads=threads))
    # on CPU the device peak is the process's tensors: the host terms the plan lists apart
    planned = plan.device_peak_bytes if device != "cpu" else plan.host_peak_bytes
    gib = 2**30
    return {"config": name, "nsamples": nsamples, "seqlen": seqlen, "threads": threads,
            "layers": len(result.masks), "prune_s": seconds, "peak_bytes": meter.peak,
            "peak_gib": round(meter.peak / gib, 3), "plan_bytes": planned, "plan_gib": round(planned / gib, 3),
            "plan_terms": plan.terms, "error_vs_plan": round(planned / meter.peak - 1, 4)}


def part_same_masks(device: str, tmp: Path, steps: int = 3) -> dict:
    """CUDA (or, dry run, the torch ops on CPU) against the CPU kernel: soft masks, learned and one-shot masks."""
    path = config_file("llama-3.2-1b", 2, tmp, dry_run=True)  # the tiny widths, on both devices
    base = random_model(path, "float32", "cpu", seed=3)
    out: dict = {"devices": f"{device} vs cpu", "cpu_kernel": kernel_name("cpu", 6)}
    # 1. one sampled soft mask of one layer: torch ops on `device` against the C++ kernel (or torch) on CPU
    w = base.model.layers[0].mlp.down_proj.weight.detach()
    cands = candidates(2, 4)
    logits = torch.randn(w.numel() // 4, cands.shape[0], generator=torch.Generator().manual_seed(0)) * 0.01
    cpu, _, _ = masked_weight(w, logits, cands, (7, 11), 4.0, 100.0)
    other, _, _ = masked_weight_reference(w.to(device), logits.to(device), cands.to(device), (7, 11), 4.0, 100.0)
    out["soft_mask_max_abs_diff"] = float((cpu - other.cpu()).abs().max())
    # 2. a few MaskLLM steps from the same logits on each device: the hardened masks
    hard = {}
    for dev in ("cpu", device):
        model = copy.deepcopy(base).to(dev).train()
        masks = maskllm.attach_masks(model, 2, 4, seed=0)
        optimizer, lr_schedule = maskllm.make_optimizer(masks, lr=5e-4, steps=steps)
        schedule = maskllm.Schedule(steps=steps)
        batch = tokens(2, 64, model.config.vocab_size, dev, seed=2)
        for t in range(steps):
            maskllm.train_step(model, masks, batch, optimizer, lr_schedule, schedule, t)
        hard[dev] = {k: v.cpu() for k, v in masks.hard_masks().items()}
    same = sum(int((hard["cpu"][k] == hard[device][k]).sum()) for k in hard["cpu"])
    total = sum(v.numel() for v in hard["cpu"].values())
    out["learned_mask_agreement"] = same / total
    # 3. the one-shot priors, calibrated block by block on each device
    calib = tokens(8, 64, base.config.vocab_size, "cpu", seed=4)
    for method in ("magnitude", "wanda", "sparsegpt"):
        got = {}
        for dev in ("cpu", device):
            model = copy.deepcopy(base)
            got[dev] = prune_oneshot(model, method, calib, 2, 4, progress=False, device=dev).masks
        same = sum(int((got["cpu"][k] == got[device][k]).sum()) for k in got["cpu"])
        out[f"{method}_mask_agreement"] = same / sum(v.numel() for v in got["cpu"].values())
    out["agreement"] = min(v for k, v in out.items() if k.endswith("agreement"))
    return out


# ------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="every part on CPU with tiny configs (no GPU needed)")
    ap.add_argument("--budget-s", type=float, default=420, help="wall-clock budget of the parts (the script stops "
                    "starting new ones once it is spent)")
    ap.add_argument("--steps", type=int, default=3, help="measured MaskLLM steps per run (after one warm-up)")
    ap.add_argument("--out", default=str(RESULTS / "gpu_check.json"))
    ap.add_argument("--only", nargs="*", default=None, help="parts to run: sdpa learn prior same_masks")
    args = ap.parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on the GPU machine, or use --cpu-dry-run", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu_dry_run else "cuda"
    torch.set_flush_denormal(True)  # as the stages do (pipeline.stage.flush_denormals)
    check = Check(Path(args.out), args.budget_s, args.cpu_dry_run)
    check.result["provenance"] = provenance(device, "float32/bfloat16")
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        check.result["gpu"] = {"name": props.name, "total_bytes": props.total_memory,
                               "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    only = set(args.only or ["sdpa", "learn", "prior", "same_masks"])
    attention = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "sdpa" in only:
            check.part("sdpa", part_sdpa, device)
            attention = {k: v for k, v in check.result["parts"]["sdpa"].items() if k in memory_plan.DTYPES}
        # what the brief asks first (float32 and bfloat16 steps, the same masks, a prior), then the extras
        core, extra = LEARN_RUNS[:2], LEARN_RUNS[2:]
        if "learn" in only:
            for run in core:
                check.part(f"learn: {run[0]}", part_learn, device, run, tmp, args.cpu_dry_run, attention, args.steps,
                           need_s=30)
        if "same_masks" in only:
            check.part("same_masks", part_same_masks, device, tmp, need_s=30)
        if "prior" in only:
            check.part("prior: sparsegpt", part_prior, device, tmp, args.cpu_dry_run, need_s=60)
        if "learn" in only:
            for run in extra:
                check.part(f"learn: {run[0]}", part_learn, device, run, tmp, args.cpu_dry_run, attention, args.steps,
                           need_s=40)
    failed = [name for name, part in check.result["parts"].items() if "error" in part]
    print(f"[gpu_check] wrote {check.path}; {len(failed)} part(s) failed{': ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

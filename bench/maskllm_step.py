"""Cost of one MaskLLM step against one dense training step, same model, same batch.

    .venv/bin/python -m bench.maskllm_step artifacts/dense            # the learn stage's 2 x 512

Time: both variants live in ONE process and their steps alternate (warm-up first), so
load from other processes hits both alike; the median per step is reported.
Peak memory: each variant runs alone in a subprocess (CPU: ru_maxrss, which includes the
interpreter and the model; CUDA: torch.cuda.max_memory_allocated).
Writes bench/results/maskllm_step.json (or --out).
Malloc: as the pipeline's stages on CPU, glibc keeps freed memory for reuse (pipeline.stage.
keep_freed_memory); --default-malloc measures both steps under glibc's defaults instead.
Roofline: each variant's FLOPs per step (counted from the model's shapes: forward, input
gradients, and the weight gradients it computes) over its median step time, as a fraction of
this machine's float32 GEMM peak on the model's shapes (bench/roofline.py, measured in this process).

  dense step:   forward, CE, backward, clip 1.0, AdamW (all weights trainable), cosine lr step
  MaskLLM step: sample every mask, forward, CE - lambda*||W*M||^2, backward to the logits,
                clip 1.0, AdamW (logits only), cosine lr step  (pipeline.maskllm.masks.train_step;
                W * mask recomputed in backward, as learn runs it)
  maskllm_kept: the same with every W * mask kept from the forward to the backward (learn under FSDP)
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pipeline.maskllm import masks as maskllm
from pipeline.io import write_json
from pipeline.maskllm.kernel import kernel_name
from pipeline.stage import keep_freed_memory
from bench.roofline import gemm_peak, model_shapes

RESULTS = Path(__file__).resolve().parent / "results" / "maskllm_step.json"


def load(args) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device)
    model.config.use_cache = False
    return model.train()


def dense_variant(args):
    """A closure running one dense training step."""
    model = load(args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=True)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1000, eta_min=1e-6)

    def step(input_ids, t):  # the same order as maskllm.train_step
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
    step.model = model  # bench/step_profile.py reuses it for an evaluation batch
    return step


def maskllm_variant(args, recompute: bool = True):
    """A closure running one MaskLLM step (pipeline.maskllm.masks.train_step); ``recompute``: W * mask recomputed in
    backward (what learn does, but under FSDP) or kept from the forward (maskllm_kept)."""
    model = load(args)
    masks = maskllm.attach_masks(model, args.n, args.m)
    masks.recompute_weights = recompute
    optimizer, lr_schedule = maskllm.make_optimizer(masks, lr=5e-4, steps=1000)
    schedule = maskllm.Schedule(steps=1000)

    def step(input_ids, t):
        maskllm.train_step(model, masks, input_ids, optimizer, lr_schedule, schedule, t)
    return step


VARIANTS = {"dense": dense_variant, "maskllm": maskllm_variant,
            "maskllm_kept": lambda args: maskllm_variant(args, recompute=False)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def batch(args) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 1000, (args.batch, args.seqlen), generator=gen).to(args.device)


def time_both(args) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Alternate dense and MaskLLM steps in this process -> wall and CPU seconds per step of each.

    CPU seconds (all threads of this process) are the steadier figure on a shared machine.
    """
    steps = {name: make(args) for name, make in VARIANTS.items()}
    input_ids = batch(args)
    wall, cpu = {name: [] for name in steps}, {name: [] for name in steps}
    for t in range(args.warmup + args.steps):
        for name, step in steps.items():
            sync(args.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            step(input_ids, t)
            sync(args.device)
            if t >= args.warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def peak_memory_child(args) -> None:
    """Run one variant alone (in a subprocess) and print its peak memory in MiB as JSON."""
    step = VARIANTS[args.variant](args)
    input_ids = batch(args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for t in range(2):  # the optimizer state appears at the first step; the peak by the second
        step(input_ids, t)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_mib()
    print(json.dumps({"peak_mib": peak}))


def peak_rss_mib() -> float:
    """This process's peak resident set. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    from the parent through fork + exec, so a child of a big parent would report the parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_memory(args, variant: str) -> float:
    cmd = [sys.executable, __file__, args.model, "--variant", variant, "--device", args.device,
           "--batch", str(args.batch), "--seqlen", str(args.seqlen), "--n", str(args.n), "--m", str(args.m)]
    cmd += ["--default-malloc"] if args.default_malloc else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def step_flops(model_dir: str, batch: int, seqlen: int) -> dict[str, float]:
    """FLOPs of one step per variant: forward + input gradients of every GEMM; weight gradients of
    the block linears (dense: AdamW trains them; MaskLLM: the gradient of W * mask feeds the logits)
    and of the LM head (dense only: MaskLLM's is frozen and unmasked)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    shapes, tokens = model_shapes(config), batch * seqlen
    twice = {"k_proj/v_proj", "gate_proj/up_proj"}  # two layers of that shape
    block = sum(2 * o * i * (2 if name in twice else 1) for name, (o, i) in shapes.items() if name != "lm_head")
    block = block * config["num_hidden_layers"] * tokens
    head = 2 * shapes["lm_head"][0] * shapes["lm_head"][1] * tokens
    q = shapes["q_proj"][0]
    attention = 2 * 2 * q * (seqlen + 1) / 2 * tokens * config["num_hidden_layers"]  # QK^T, AV: causal half
    forward = block + head + attention
    return {"dense": 3 * forward, "maskllm": 3 * forward - head, "maskllm_kept": 3 * forward - head}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="artifacts/dense", help="HF model dir")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--out", default=str(RESULTS), help="where the JSON goes (one file per machine)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="glibc's default malloc settings, not the stages' (pipeline.stage.keep_freed_memory)")
    ap.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # subprocess mode
    args = ap.parse_args()
    kept = False if args.default_malloc else keep_freed_memory()
    if args.variant:
        return peak_memory_child(args)

    peak = {name: peak_memory(args, name) for name in VARIANTS}  # first, while this process is small
    wall, cpu = time_both(args)
    median = {name: statistics.median(ts) for name, ts in wall.items()}
    gemm = gemm_peak() if args.device == "cpu" else None  # the yardstick of bench/roofline.py (CPU)
    work = step_flops(args.model, args.batch, args.seqlen)
    median_cpu = {name: statistics.median(ts) for name, ts in cpu.items()}
    result = {
        "model": args.model, "device": args.device, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(),
        "batch": args.batch, "seqlen": args.seqlen, "n": args.n, "m": args.m, "mask_kernel": kernel_name(args.device, math.comb(args.m, args.n)),
        "steps": args.steps, "warmup": args.warmup, "malloc_keeps_freed_memory": kept,
        "step_s": wall, "step_cpu_s": cpu,
        "median_step_s": median, "median_step_cpu_s": median_cpu, "peak_mib": peak,
        "time_ratio": median["maskllm"] / median["dense"],
        "cpu_time_ratio": median_cpu["maskllm"] / median_cpu["dense"],
        "memory_ratio": peak["maskllm"] / peak["dense"],
        # what recomputing W * mask in backward costs and saves, against keeping it (same process, same steps)
        "recompute_vs_kept": {"time": median["maskllm"] / median["maskllm_kept"],
                              "cpu_time": median_cpu["maskllm"] / median_cpu["maskllm_kept"],
                              "memory": peak["maskllm"] / peak["maskllm_kept"]},
        "memory_kind": "cuda max_memory_allocated" if args.device.startswith("cuda") else "ru_maxrss (whole process)",
        "flops_per_step": work, "gemm_peak_flops_per_s": gemm,
        "achieved_flops_per_s": {name: work[name] / median[name] for name in VARIANTS},
        "fraction_of_peak": {name: work[name] / median[name] / gemm for name in VARIANTS} if gemm else None,
    }
    print(f"{'variant':12s} {'median step (s)':>16s} {'CPU s/step':>11s} {'peak (MiB)':>11s}")
    for name in VARIANTS:
        print(f"{name:12s} {median[name]:16.3f} {median_cpu[name]:11.3f} {peak[name]:11.0f}")
    print(f"{'ratio':12s} {result['time_ratio']:16.2f} {result['cpu_time_ratio']:11.2f} {result['memory_ratio']:11.2f}"
          "   (maskllm / dense)")
    kept = result["recompute_vs_kept"]
    print(f"{'ratio':12s} {kept['time']:16.2f} {kept['cpu_time']:11.2f} {kept['memory']:11.2f}"
          "   (maskllm / maskllm_kept: W * mask recomputed in backward / kept)")
    if gemm:
        print("achieved FLOP/s, fraction of the GEMM peak (" + f"{gemm / 1e9:.1f} GFLOP/s): "
              + ", ".join(f"{name} {work[name] / median[name] / 1e9:.1f} GFLOP/s = {work[name] / median[name] / gemm:.2f}"
                          for name in VARIANTS))
    write_json(Path(args.out), result)  # makes the folder, writes atomically
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

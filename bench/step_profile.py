"""Where the time of a dense training step, an evaluation and a MaskLLM step goes, against the GEMM peak.

    .venv/bin/python -m bench.step_profile artifacts/dense          # 2 x 512 train step, 4 x 512 eval batch

Issue "Throughput" asks the step MaskLLM shares with dense training and the evaluation to run at
60 % of this machine's float32 GEMM peak; this says what keeps them from it. Each part runs
under torch.profiler after a warm-up, and its ops' self CPU time is summed by kind:

  gemm       aten::mm / addmm / bmm (the linears, the LM head, their gradients)
  attention  scaled-dot-product attention, forward and backward
  vocab      log-softmax / NLL over the 49,152-entry vocabulary and their backward
  optimizer  AdamW (fused) and the gradient clipping
  mask       the fused mask kernel (MaskLLM step only), forward and backward
  other      every other op: elementwise (RMSNorm, SiLU, RoPE, residuals), copies, allocations

The GEMM share is then turned into FLOP/s (the FLOPs of bench/maskllm_step.py's count over the
GEMM ops' time) and compared with the peak measured in this process (bench/roofline.py): if the
GEMMs themselves reach the peak, the rest of the step is what limits it. The MaskLLM step of the
same batch is profiled the same way, kind by kind against the dense step. A last part times the
phases of one evaluation stage (`python -m stages.evaluate`): imports, model load + mask,
forward passes. Writes bench/results/step_profile.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
from bench.maskllm_step import dense_variant, maskllm_variant, step_flops
from bench.roofline import gemm_peak, machine

from pipeline.evaluation.perplexity import window_losses
from pipeline.io import write_json
from pipeline.stage import keep_freed_memory

RESULTS = Path(__file__).resolve().parent / "results" / "step_profile.json"
KINDS = {
    "gemm": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention": ("scaled_dot_product", "flash_attention", "efficient_attention"),
    "vocab": ("log_softmax", "nll_loss", "cross_entropy"),
    "optimizer": ("adam", "clip_grad", "aten::_foreach", "aten::norm", "linalg_vector_norm"),
    "mask": ("maskllm::", "_MaskedWeight"),  # the fused mask kernel, forward and backward (MaskLLM step only)
}


def kind(op: str) -> str:
    low = op.lower()
    return next((k for k, keys in KINDS.items() if any(key.lower() in low for key in keys)), "other")


def by_kind(prof) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Self CPU seconds per kind, and the 12 costliest ops (name, seconds)."""
    out = dict.fromkeys([*KINDS, "other"], 0.0)
    ops = []
    for e in prof.key_averages():
        if e.key.startswith("ProfilerStep") or e.key.startswith("## "):
            continue
        s = e.self_cpu_time_total / 1e6
        out[kind(e.key)] += s
        ops.append((e.key, s))
    return out, sorted(ops, key=lambda o: -o[1])[:12]


def profiled(fn, rounds: int) -> tuple[float, dict[str, float], list]:
    """Wall seconds per round of ``fn`` under the profiler, self seconds per kind per round."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(rounds):
            fn()
        wall = (time.perf_counter() - start) / rounds
    kinds, top = by_kind(prof)
    return wall, {k: v / rounds for k, v in kinds.items()}, [(n, s / rounds) for n, s in top]


def report(name: str, wall: float, kinds: dict[str, float], flops: float, gemm_flops: float, peak: float) -> dict:
    total = sum(kinds.values())
    row = {"wall_s": wall, "self_s": kinds, "self_total_s": total, "flops": flops,
           "step_fraction_of_peak": flops / wall / peak,
           "gemm_fraction_of_peak": gemm_flops / kinds["gemm"] / peak if kinds["gemm"] else None}
    print(f"\n{name}: {wall:.2f} s per round, {flops / wall / 1e9:.1f} GFLOP/s = "
          f"{row['step_fraction_of_peak']:.2f} of the GEMM peak")
    print(f"  {'kind':<11}{'self s':>9}{'share':>8}")
    for k, v in kinds.items():
        print(f"  {k:<11}{v:>9.2f}{v / total:>8.1%}")
    if row["gemm_fraction_of_peak"]:
        print(f"  the GEMMs alone: {gemm_flops / kinds['gemm'] / 1e9:.1f} GFLOP/s = {row['gemm_fraction_of_peak']:.2f} "
              f"of the peak; without every non-GEMM op the step would reach "
              f"{flops / kinds['gemm'] / peak:.2f}")
    return row


def eval_stage_phases(row: str, domain: str, keep_freed: bool) -> dict:
    """Wall seconds of each phase of one evaluation stage, in a fresh process as DVC runs it."""
    code = f"""
import time, json
t0 = time.perf_counter()
import torch
from pipeline.stage import keep_freed_memory
if {keep_freed!r}:
    keep_freed_memory()  # as run_stage does
from pipeline.data.tokens import load_tokens
from pipeline.evaluation.perplexity import perplexity
from pipeline.evaluation.row_model import build_row_model
t1 = time.perf_counter()
model = build_row_model({row!r}, "float32")
t2 = time.perf_counter()
tokens = load_tokens("artifacts/domains/{domain}/test.npy")
r = perplexity(model, tokens, 512, 4, 40, desc="ppl")
t3 = time.perf_counter()
print(json.dumps({{"imports_s": t1 - t0, "load_and_mask_s": t2 - t1, "forward_s": t3 - t2, "ppl": r["ppl"]}}))
"""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    phases = json.loads(out.strip().splitlines()[-1])
    phases["process_s"] = time.perf_counter() - start
    phases["interpreter_and_exit_s"] = phases["process_s"] - phases["imports_s"] - phases["load_and_mask_s"] - phases["forward_s"]
    return phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="artifacts/dense", help="HF model dir")
    ap.add_argument("--rounds", type=int, default=2, help="profiled rounds per part")
    ap.add_argument("--warmup", type=int, default=3, help="unprofiled rounds before them (the heap grows for a few)")
    ap.add_argument("--eval-row", default="maskllm", help="row of the timed evaluation stage ('' to skip it)")
    ap.add_argument("--eval-domain", default="wiki")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--default-malloc", action="store_true",
                    help="glibc's default malloc settings, not the stages' (pipeline.stage.keep_freed_memory)")
    args = ap.parse_args()
    kept = False if args.default_malloc else keep_freed_memory()
    threads = torch.get_num_threads()
    peak = gemm_peak()
    print(f"float32 GEMM peak in this process: {peak / 1e9:.1f} GFLOP/s on {threads} threads")

    # (a) the dense training step of bench/maskllm_step.py: 2 x 512 tokens, AdamW on every weight
    ns = argparse.Namespace(model=args.model, device="cpu", batch=2, seqlen=512)
    step = dense_variant(ns)
    config = json.loads((Path(args.model) / "config.json").read_text())
    vocab = min(1000, config["vocab_size"])
    ids = torch.randint(0, vocab, (2, 512), generator=torch.Generator().manual_seed(0))
    for t in range(args.warmup):  # the optimizer state appears at the first step, the heap settles later
        step(ids, t)
    wall, kinds, top_train = profiled(lambda: step(ids, 1), args.rounds)
    flops = step_flops(args.model, 2, 512)["dense"]
    attention_share = 2 * 2 * config["hidden_size"] * (512 + 1) / 2 * 1024 * config["num_hidden_layers"] * 3
    train = report("dense training step (2 x 512)", wall, kinds, flops, flops - attention_share, peak)
    train["top_ops"] = top_train

    # (b) one evaluation batch: forward of 4 x 512 tokens and the per-window NLL, as pipeline.evaluation.perplexity
    model = step.model.eval()
    eval_ids = torch.randint(0, vocab, (4, 512), generator=torch.Generator().manual_seed(1))

    def eval_batch():
        with torch.no_grad():
            window_losses(model(input_ids=eval_ids, use_cache=False).logits, eval_ids)
    for _ in range(args.warmup):
        eval_batch()
    wall, kinds, top_eval = profiled(eval_batch, args.rounds)
    eval_flops = flops / 3 * 2  # forward only, twice the tokens
    evaluate = report("evaluation batch (4 x 512, forward + NLL)", wall, kinds, eval_flops,
                      eval_flops - attention_share / 3 * 2, peak)
    evaluate["top_ops"] = top_eval

    # (c) the MaskLLM step on the same batch (pipeline.maskllm.masks.train_step), for what it adds to (a)
    del model, step
    mstep = maskllm_variant(argparse.Namespace(**vars(ns), n=2, m=4))
    for t in range(args.warmup):
        mstep(ids, t)
    wall, kinds, top_mask = profiled(lambda: mstep(ids, 1), args.rounds)
    mflops = step_flops(args.model, 2, 512)["maskllm"]
    mask = report("MaskLLM step (2 x 512)", wall, kinds, mflops, mflops - attention_share, peak)
    mask["top_ops"] = top_mask
    print("  against the dense step, self s: " + ", ".join(
        f"{k} {kinds[k] - train['self_s'][k]:+.2f}" for k in kinds))

    record = {"peak_flops_per_s": peak, "threads": threads, "train_step": train, "eval_batch": evaluate,
              "maskllm_step": mask, "malloc_keeps_freed_memory": kept, **machine()}
    if args.eval_row:
        phases = eval_stage_phases(args.eval_row, args.eval_domain, not args.default_malloc)
        record["eval_stage"] = phases
        print(f"\nevaluation stage {args.eval_row} @ {args.eval_domain} in a fresh process: {phases['process_s']:.1f} s = "
              f"imports {phases['imports_s']:.1f} + load and mask {phases['load_and_mask_s']:.1f} + forwards "
              f"{phases['forward_s']:.1f} + interpreter start/exit {phases['interpreter_and_exit_s']:.1f}")
    out = Path(args.out)
    write_json(out, record)  # makes the folder, writes atomically
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""The fused mask kernel alone: one step's forward and backward over every masked layer of the model.

    .venv/bin/python -m bench.mask_kernel_speed artifacts/dense                  # this checkout's kernel
    .venv/bin/python -m bench.mask_kernel_speed artifacts/dense --source old.cpp --out old.json

What the MaskLLM step adds to a dense step is mostly this kernel (bench/maskllm_step.py), so this
times it apart from the GEMMs: the model's real weights, the learned logits of the last `learn` run
when they exist (artifacts/learn/logits.safetensors; else the prior-free initial logits), every
masked layer through ``pipeline.maskllm.kernel.masked_weight`` and autograd, as the step calls it.
Two points of the default schedule: its start (tau 4, kappa 1000) and its end (tau 0.05, kappa
500), where most exps of the softmax underflow.

Yardsticks measured in the same process: the torch-ops implementation of the same formula (the
CUDA path, ``_MaskedWeightTorch``), and the memory-traffic floor, the bytes the kernel must move
(forward: W, logits, out; backward: grad, W, logits, grad of the logits) over this machine's
STREAM copy bandwidth (bench/roofline.py). ``--source`` builds another version of
csrc/masked_weight.cpp (e.g. ``git show REV:pipeline/maskllm/csrc/masked_weight.cpp > old.cpp``) to
compare versions; run each in its own process, one after the other, on an idle machine.
Writes bench/results/mask_kernel_speed.json (or --out).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
from bench.roofline import machine, memory_bandwidth

from pipeline.maskllm import kernel as mk
from pipeline.maskllm import masks as maskllm
from pipeline.io import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "mask_kernel_speed.json"
POINTS = {"start": (4.0, 1000.0), "end": (0.05, 500.0)}  # (tau, kappa) of params.yaml's schedule


def layers(model_dir: str, logits_file: Path):
    """[(weight, logits leaf, candidates, view, index)] of every masked layer, and where the logits came from."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    masks = maskllm.attach_masks(model, 2, 4)
    source = "initial (no learned logits found)"
    if logits_file.is_file():
        from safetensors.torch import load_file
        masks.load_logits_state_dict(load_file(str(logits_file)))
        source = str(logits_file)
    out = []
    for layer, mask in masks.layers.values():
        weight = maskllm._original(layer).detach()
        out.append((weight, mask.logits.detach().clone().requires_grad_(), mask.candidates, mask.view, mask.index))
    return out, source


def one_pass(fn, items, tau: float, kappa: float, grads, reg_grad: float) -> tuple[float, float, float]:
    """Wall seconds of the forward of every layer, then of the backward of every layer; CPU seconds of both
    (all threads: the steadier figure on a shared machine)."""
    cpu = time.process_time()
    start = time.perf_counter()
    outs = [fn(w, logits, S, mk.noise_key(0, 1, index), tau, kappa, view) for w, logits, S, view, index in items]
    mid = time.perf_counter()
    for (out, sq, _), g in zip(outs, grads):
        torch.autograd.backward([out, sq], [g, torch.tensor(reg_grad, dtype=torch.float64)])
    end = time.perf_counter()
    cpu = time.process_time() - cpu
    for _w, logits, *_ in items:
        logits.grad = None
    return mid - start, end - mid, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="artifacts/dense")
    ap.add_argument("--logits", default="artifacts/learn/logits.safetensors")
    ap.add_argument("--source", help="another masked_weight.cpp to build and time instead of this checkout's")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch-ops yardstick (slow)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.source:
        mk.CSRC = Path(args.source).resolve()  # cpp_kernel() builds from it, under its content's name
    if mk.cpp_kernel() is None:
        sys.exit("the C++ mask kernel did not build: nothing to time")
    items, source = layers(args.model, ROOT / args.logits)
    weights = sum(w.numel() for w, *_ in items)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(w.shape, generator=gen) * 1e-3 for w, *_ in items]
    bandwidth = memory_bandwidth()["copy"]
    bytes_fwd, bytes_bwd = weights * (4 + 6 + 4), weights * (4 + 4 + 6 + 6)  # float32; logits 1.5 floats/weight
    impls = {"kernel": mk._MaskedWeight.apply}
    if not args.no_torch:
        impls["torch"] = mk._MaskedWeightTorch.apply
    rows = {}
    for point, (tau, kappa) in POINTS.items():
        for name, fn in impls.items():
            one_pass(fn, items, tau, kappa, grads, -1e-4)  # warm-up
            runs = [one_pass(fn, items, tau, kappa, grads, -1e-4) for _ in range(args.repeat if name == "kernel" else 2)]
            fwd, bwd = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            cpu = statistics.median(r[2] for r in runs)
            rows[f"{point}/{name}"] = {
                "tau": tau, "kappa": kappa, "forward_s": fwd, "backward_s": bwd, "step_s": fwd + bwd,
                "cpu_s": cpu, "forward_runs_s": [r[0] for r in runs], "backward_runs_s": [r[1] for r in runs],
                "cpu_runs_s": [r[2] for r in runs],
                "ns_per_candidate_cpu": (fwd + bwd) * torch.get_num_threads() / (1.5 * weights) * 1e9,
                "fraction_of_bandwidth_floor": (bytes_fwd + bytes_bwd) / bandwidth / (fwd + bwd),
            }
    print(f"{weights / 1e6:.1f} M masked weights in {len(items)} layers; logits: {source}; "
          f"{torch.get_num_threads()} threads; copy bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"(floor {(bytes_fwd + bytes_bwd) / bandwidth:.3f} s per step)")
    print(f"{'point/impl':14s} {'forward s':>10s} {'backward s':>11s} {'step s':>8s} {'CPU s':>7s} {'ns/cand CPU':>12s} "
          f"{'floor/time':>11s}")
    for key, r in rows.items():
        print(f"{key:14s} {r['forward_s']:10.3f} {r['backward_s']:11.3f} {r['step_s']:8.3f} {r['cpu_s']:7.3f} "
              f"{r['ns_per_candidate_cpu']:12.2f} {r['fraction_of_bandwidth_floor']:11.2f}")
    result = {"model": args.model, "logits": source, "source": str(mk.CSRC), "masked_weights": weights,
              "layers": len(items), "threads": torch.get_num_threads(), "machine": machine(),
              "copy_bandwidth_bytes_per_s": bandwidth, "bytes_per_step": bytes_fwd + bytes_bwd, "rows": rows}
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

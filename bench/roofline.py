"""The yardstick: this machine's measured float32 GEMM peak on the model's shapes, and its memory bandwidth.

    .venv/bin/python -m bench.roofline                   # 1 and 2 threads: a table, bench/results/roofline.json
    .venv/bin/python -m bench.roofline --threads 2 --model artifacts/dense

The GEMMs are those of SmolLM2-135M (or ``--model``'s config.json): every linear layer of a
block and the LM head, forward ``x @ W^T``, backward ``g @ W`` (input gradient) and
``g^T @ x`` (weight gradient), at 2 x 512 tokens (a MaskLLM training step), 4 x 512 (an
evaluation batch) and 8 x 512 (a calibration batch of the priors, which also accumulates
``X^T X`` per layer input). The peak is the fastest of them, best of a few timed rounds
(``timeit``'s rule: on a shared machine only the minimum approaches the uncontended cost).
Memory bandwidth: STREAM's copy and triad on 256 MiB arrays (far beyond the caches).

Other benchmarks measure the peak in their own process and report what they achieve as a
fraction of it::

    from bench.roofline import gemm_peak      # run as `python -m bench.<script>` from the repository root
    peak = gemm_peak()                        # FLOP/s at torch's current thread count
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.io import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "roofline.json"
# SmolLM2-135M (artifacts/dense/config.json): the shapes when no model is given
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
           "head_dim": 64, "vocab_size": 49152}
TOKENS = {"train": 2 * 512, "eval": 4 * 512, "calib": 8 * 512}


@dataclass(frozen=True)
class Gemm:
    """``[m, k] @ [k, n]`` as the model computes it: ``kind`` forward | grad_input | grad_weight | gram."""

    name: str
    kind: str
    m: int
    n: int
    k: int

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k


def model_shapes(config: dict | None = None) -> dict[str, tuple[int, int]]:
    """Weight shapes ``(out, in)`` of a block's linear layers and the LM head."""
    c = {**SMOLLM2, **(config or {})}
    hidden, head_dim = c["hidden_size"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    return {"q_proj": (q, hidden), "k_proj/v_proj": (kv, hidden), "o_proj": (hidden, q),
            "gate_proj/up_proj": (c["intermediate_size"], hidden), "down_proj": (hidden, c["intermediate_size"]),
            "lm_head": (c["vocab_size"], hidden)}


def gemm_shapes(config: dict | None = None) -> list[Gemm]:
    """Every distinct GEMM of training (forward and backward), evaluation and calibration."""
    shapes, out = model_shapes(config), {}
    for phase, T in TOKENS.items():
        for layer, (o, i) in shapes.items():
            if phase == "calib" and layer == "lm_head":
                continue  # calibration stops at the last block
            out.setdefault((T, o, i), Gemm(f"{layer} {phase}", "forward", T, o, i))
            if phase == "train":  # only MaskLLM's training runs backward
                out.setdefault((T, i, o), Gemm(f"{layer} {phase}", "grad_input", T, i, o))
                out.setdefault((o, i, T), Gemm(f"{layer} {phase}", "grad_weight", o, i, T))
        if phase == "calib":  # SparseGPT's X^T X of every distinct layer input width
            for width in sorted({i for layer, (o, i) in shapes.items() if layer != "lm_head"}):
                out.setdefault((width, width, T), Gemm(f"X^T X {width} {phase}", "gram", width, width, T))
    return list(out.values())


@contextmanager
def threads(n: int | None):
    """torch's intra-op thread count set to ``n`` (None: unchanged) for the block."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _operands(g: Gemm, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    if g.kind == "forward":  # x [T, in] @ W[out, in]^T, as nn.Linear
        x, w = randn(g.m, g.k), randn(g.n, g.k)
        return lambda: F.linear(x, w)
    if g.kind == "grad_input":  # grad [T, out] @ W [out, in]
        a, b = randn(g.m, g.k), randn(g.k, g.n)
        return lambda: torch.mm(a, b)
    # grad_weight: grad^T [out, T] @ x [T, in]; gram: X^T [in, T] @ X [T, in]: transposed views, as autograd / InputStats
    a, b = randn(g.k, g.m), randn(g.k, g.n)
    return lambda: torch.mm(a.t(), b)


def best_seconds(fn, min_time: float = 0.1, rounds: int = 3) -> float:
    """Fastest mean time per call of ``fn`` over ``rounds`` rounds of at least ``min_time`` seconds each."""
    fn()  # warm-up: allocations, MKL's first-call setup
    best = float("inf")
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        best = min(best, elapsed / calls)
    return best


def measure_gemms(n_threads: int | None = None, config: dict | None = None, min_time: float = 0.1,
                  rounds: int = 3, dtype: torch.dtype = torch.float32) -> list[dict]:
    """FLOP/s of every model GEMM at ``n_threads`` -> [{name, kind, m, n, k, seconds, flops_per_s}, ...]."""
    rows = []
    with threads(n_threads):
        for g in gemm_shapes(config):
            s = best_seconds(_operands(g, dtype), min_time, rounds)
            rows.append({**asdict(g), "seconds": s, "flops_per_s": g.flops / s})
    return rows


def gemm_peak(n_threads: int | None = None, config: dict | None = None, min_time: float = 0.05,
              rounds: int = 2, dtype: torch.dtype = torch.float32) -> float:
    """The measured GEMM peak (FLOP/s, float32 unless ``dtype``) on the model's shapes at ``n_threads`` (default: torch's)."""
    return max(r["flops_per_s"] for r in measure_gemms(n_threads, config, min_time, rounds, dtype))


def memory_bandwidth(n_threads: int | None = None, mib: int = 256, min_time: float = 0.2,
                     rounds: int = 3) -> dict[str, float]:
    """STREAM copy (2 arrays moved) and triad (3) in bytes/s at ``n_threads``, arrays of ``mib`` MiB."""
    n = mib * 2**20 // 4
    a, b, c = torch.ones(n), torch.ones(n), torch.ones(n)
    with threads(n_threads):
        copy = best_seconds(lambda: b.copy_(a), min_time, rounds)
        triad = best_seconds(lambda: torch.add(b, c, alpha=3.0, out=a), min_time, rounds)
    return {"copy": 2 * 4 * n / copy, "triad": 3 * 4 * n / triad}


def fraction(flops: float, seconds: float, peak: float) -> float:
    """Achieved FLOP/s as a fraction of ``peak``."""
    return flops / seconds / peak


def machine() -> dict:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().splitlines()
        cpu = next((l.split(":", 1)[1].strip() for l in info if l.startswith("model name")), "")
        mhz = next((float(l.split(":", 1)[1]) for l in info if l.startswith("cpu MHz")), None)
    except OSError:
        cpu, mhz = "", None
    return {"cpu": cpu or platform.processor(), "cpu_mhz": mhz, "cores": os.cpu_count(), "torch": torch.__version__,
            "blas": "MKL" if torch.backends.mkl.is_available() else "other",
            "load_average_1min": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model dir whose config.json gives the shapes (default: SmolLM2-135M)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--min-time", type=float, default=0.1, help="seconds per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="float64: the yardstick of a float64 calibration (prior.dtype)")
    ap.add_argument("--out", help="default: bench/results/roofline.json (float64: roofline_float64.json)")
    args = ap.parse_args()
    config = json.loads((Path(args.model) / "config.json").read_text()) if args.model else None

    dtype = getattr(torch, args.dtype)
    record = {"machine": machine(), "dtype": args.dtype, "shapes": model_shapes(config), "tokens": TOKENS, "threads": {}}
    for t in args.threads:
        rows = measure_gemms(t, config, args.min_time, args.rounds, dtype)
        peak = max(rows, key=lambda r: r["flops_per_s"])
        bandwidth = memory_bandwidth(t)
        record["threads"][str(t)] = {"gemm_peak_flops_per_s": peak["flops_per_s"], "peak_gemm": peak["name"],
                                     "memory_bytes_per_s": bandwidth, "gemms": rows}
        print(f"\n{t} thread(s), {args.dtype}\n{'GEMM':<28}{'kind':<13}{'m x n x k':>22}{'GFLOP/s':>10}{'of peak':>9}")
        for r in rows:
            print(f"{r['name']:<28}{r['kind']:<13}{r['m']:>8} x{r['n']:>6} x{r['k']:>6}"
                  f"{r['flops_per_s'] / 1e9:>10.1f}{r['flops_per_s'] / peak['flops_per_s']:>9.2f}")
        print(f"peak {peak['flops_per_s'] / 1e9:.1f} GFLOP/s ({peak['name']}, {peak['kind']}); memory: copy "
              f"{bandwidth['copy'] / 1e9:.1f} GB/s, triad {bandwidth['triad'] / 1e9:.1f} GB/s")
    out = Path(args.out) if args.out else RESULTS if args.dtype == "float32" else RESULTS.with_name("roofline_float64.json")
    write_json(out, record)  # makes the folder, writes atomically
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

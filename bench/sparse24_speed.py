"""2:4 inference speed: the block linears on sparse tensor cores against the same model dense.

    python -m bench.sparse24_speed --config pipeline/maskllm/model_configs/smollm2-135m.json --config pipeline/maskllm/model_configs/llama-3.2-1b.json
    python -m bench.sparse24_speed --model artifacts/harden/sparse_model --mask none   # the hardened MaskLLM model
    python -m bench.sparse24_speed --config pipeline/maskllm/model_configs/smollm2-135m.json --dry-run-cpu  # checks the script only

Needs a CUDA GPU of compute capability >= 8.0 (NVIDIA Ampere or later); anywhere else it stops
at once. A model is a shipped HF config (``--config``: randomly initialised, nothing downloaded:
the kernel's speed does not depend on which 2:4 mask) or a saved model (``--model``), in fp16 or
bf16, with a 2:4 mask on every linear of its blocks (``--mask``: magnitude by default). Each
variant is built alone on the GPU from the same masked weights: dense, then per backend
(cuSPARSELt, CUTLASS) every eligible linear swapped for a ``to_sparse_semi_structured`` weight
(``bench/sparse24.py``). Measured per variant: prefill tokens/s (one forward of batch x seqlen,
last-token logits, as generation does) and per-token decode latency (``--decode-tokens`` steps
of one token per sequence on a KV cache of seqlen), at every batch size and seqlen, with the
peak GPU memory of each; the sparse model's logits against the dense one's; and per-layer GEMM
speedups for the model's weight shapes (torch.utils.benchmark). Which layers were not eligible,
and why, is listed. A backend that fails (e.g. CUTLASS's kernels are built for sm8x only) is
recorded with its error, not hidden. Writes bench/results/sparse24_speed.json.
"""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

# Only torch, transformers and safetensors may be needed here: the GPU machine has no dvc,
# mlflow or pydantic (pipeline.config), so only modules free of them are imported.
from pipeline.io import write_json
from pipeline.oneshot.magnitude import magnitude_mask
from pipeline.model.nm import find_prunable_layers
from pipeline.provenance import provenance
from bench.sparse24 import (
    BACKENDS, packed_round_trip, sparsify_24, torch_converter, weight_bytes,
)

RESULTS = Path(__file__).resolve().parent / "results" / "sparse24_speed.json"
DRY_RUN_RESULTS = RESULTS.with_name("sparse24_speed_dryrun.json")  # never over a measurement
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MIN_CAPABILITY = (8, 0)  # sparse tensor cores: Ampere (sm80) and later
LOGITS_TOLERANCE = 2e-2  # relative L2 error of the sparse model's logits beyond which a kernel is wrong


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", default=[], help="HF config JSON (with model_type); repeatable")
    ap.add_argument("--model", action="append", default=[], help="saved model directory; repeatable")
    ap.add_argument("--mask", default="magnitude",
                    help="magnitude (2:4 of |W|), none (the weights are 2:4 already) or a mask .safetensors")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float16")
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--seqlens", nargs="+", type=int, default=[128, 1024], help="prefill lengths = decode contexts")
    ap.add_argument("--decode-tokens", type=int, default=16, help="decode steps timed per run")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (median reported)")
    ap.add_argument("--gemm-min-time", type=float, default=0.1, help="seconds per GEMM measurement (blocked_autorange)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help=f"default: {RESULTS.relative_to(RESULTS.parents[2])} "
                                  f"({DRY_RUN_RESULTS.name} with --dry-run-cpu)")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="run every step on the CPU with the plain-torch packing round trip in place of the CUDA "
                         "conversion: checks the script; its times mean nothing")
    args = ap.parse_args(argv)
    check_inputs(args, ap)
    args.out = args.out or str(DRY_RUN_RESULTS if args.dry_run_cpu else RESULTS)
    return args


def check_inputs(args, ap) -> None:
    """Every file the run needs exists and every number makes sense, before any work."""
    if not args.config and not args.model:
        ap.error("give at least one --config JSON or --model directory")
    for path in args.config:
        if not Path(path).is_file():
            ap.error(f"--config {path}: no such file (shipped configs: pipeline/maskllm/model_configs/*.json)")
        try:
            raw = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            ap.error(f"--config {path}: not JSON ({e})")
        if not isinstance(raw, dict) or "model_type" not in raw:
            ap.error(f"--config {path}: no model_type key (an HF config dict, e.g. \"model_type\": \"llama\")")
    for path in args.model:
        if not (Path(path) / "config.json").is_file():
            ap.error(f"--model {path}: no config.json there "
                     "(a save_pretrained directory, e.g. artifacts/harden/sparse_model)")
    if args.mask not in ("magnitude", "none") and not Path(args.mask).is_file():
        ap.error(f"--mask {args.mask}: neither magnitude, none nor an existing mask file")
    for key in ("batch_sizes", "seqlens"):
        if min(getattr(args, key)) < 1:
            ap.error(f"--{key.replace('_', '-')}: every value must be >= 1")
    if args.decode_tokens < 1 or args.repeat < 1 or args.gemm_min_time <= 0:
        ap.error("--decode-tokens, --repeat and --gemm-min-time must be positive")


def require_cuda() -> str:
    """The CUDA device, or exit at once with what is missing (nothing measured, nothing written)."""
    if not torch.cuda.is_available():
        sys.exit(f"bench/sparse24_speed.py: 2:4 sparse tensor cores need a CUDA GPU of compute capability >= "
                 f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (NVIDIA Ampere or later); torch {torch.__version__} sees "
                 "no CUDA device here. Nothing measured, nothing written. Run it on a GPU machine (or "
                 "--dry-run-cpu to check the script).")
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        sys.exit(f"bench/sparse24_speed.py: {torch.cuda.get_device_name()} has compute capability "
                 f"{capability[0]}.{capability[1]}; 2:4 sparse tensor cores need >= "
                 f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ampere or later). Nothing measured, nothing written.")
    return "cuda"


def environment(device: str) -> dict:
    """GPU, capability, torch, CUDA and cuSPARSELt versions."""
    env = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        env.update(gpu=torch.cuda.get_device_name(), capability=f"{major}.{minor}",
                   cusparselt=torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None)
    return env


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- the models

def load_config(spec: dict):
    """The HF config of a ``--config`` JSON or a ``--model`` directory."""
    from transformers import AutoConfig

    if spec["kind"] == "model":
        return AutoConfig.from_pretrained(spec["path"])
    raw = json.loads(Path(spec["path"]).read_text())  # has model_type: check_inputs
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def build(config, dtype: torch.dtype, device: str, state: dict | None = None):
    """A model of ``config`` on ``device`` (randomly initialised there, or with ``state``), eval mode."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if state is not None:
        model.load_state_dict(state)
    model.config.use_cache = True
    return model.eval()


@torch.no_grad()
def masked_state(spec: dict, config, args, device: str) -> dict:
    """The weights every variant starts from, on the CPU: the model with its 2:4 mask applied (+0.0 zeros)."""
    dtype = DTYPES[args.dtype]
    if spec["kind"] == "model":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype).to(device)
    else:
        torch.manual_seed(args.seed)
        model = build(config, dtype, device)
    if args.mask == "magnitude":
        for layer in find_prunable_layers(model, 4):
            weight = layer.weight()
            weight.masked_fill_(~magnitude_mask(weight, 2, 4), 0)
    elif args.mask != "none":
        from pipeline.model.masks_io import apply_masks, load_masks

        apply_masks(model, load_masks(args.mask))
    state = {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}
    del model
    return state


# ---------------------------------------------------------------- measurements

def peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def prefill(model, ids: torch.Tensor, args, device: str) -> tuple[float, int | None]:
    """(median seconds of one forward of ids [B, L] with last-token logits, peak bytes)."""
    for _ in range(2):  # warm-up: kernel selection, caches
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    peak_reset(device)
    times = []
    for _ in range(args.repeat):
        sync(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak_bytes(device)


def kv_cache(model, out):
    """(keyword, cache) of a forward's KV cache: recent transformers 5 releases name it ``cache``, earlier
    ones ``past_key_values`` (the GPU machine has 5.17)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return name, out[name]


def decode(model, ids: torch.Tensor, args, device: str) -> tuple[float, int | None]:
    """(median seconds per decode step of one token per sequence after a prefill of ids [B, L], peak bytes)."""
    times = []
    for run in range(args.repeat + 1):  # run 0 warms up
        if run == 1:
            peak_reset(device)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        (key, cache), token = kv_cache(model, out), out.logits[:, -1:].argmax(-1)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.decode_tokens):
            out = model(input_ids=token, use_cache=True, **{key: cache})
            cache, token = out[key], out.logits[:, -1:].argmax(-1)
        sync(device)
        if run:
            times.append((time.perf_counter() - start) / args.decode_tokens)
        del out, cache
    return statistics.median(times), peak_bytes(device)


def measure(model, args, device: str, vocab: int, label: str) -> list[dict]:
    """Prefill and decode at every (batch, seqlen)."""
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    grid = [(b, s) for b in args.batch_sizes for s in args.seqlens]
    for batch, seqlen in tqdm(grid, desc=label, unit="shape"):
        ids = torch.randint(0, vocab, (batch, seqlen), generator=gen).to(device)
        prefill_s, prefill_peak = prefill(model, ids, args, device)
        decode_s, decode_peak = decode(model, ids, args, device)
        rows.append({"batch": batch, "seqlen": seqlen, "prefill_s": prefill_s,
                     "prefill_tokens_per_s": batch * seqlen / prefill_s, "prefill_peak_bytes": prefill_peak,
                     "decode_s_per_token": decode_s, "decode_peak_bytes": decode_peak})
    return rows


def logits_check(model, ids: torch.Tensor, reference: torch.Tensor) -> dict:
    """The sparse model's logits [B, L, V] against the dense model's: relative L2 error, max |diff|, top-1 agreement."""
    logits = model(input_ids=ids, use_cache=False).logits.float().cpu()
    diff = logits - reference
    rel = float(diff.norm() / reference.norm())
    return {"relative_l2": rel, "max_abs_diff": float(diff.abs().max()),
            "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
            "ok": rel <= LOGITS_TOLERANCE}


def gemm_table(shapes: list[tuple[int, int]], tokens: list[int], convert: dict, args, device: str) -> list[dict]:
    """Per weight shape [out, in] and token count M: dense vs 2:4 ``F.linear`` time (torch.utils.benchmark medians)."""
    from torch.utils.benchmark import Timer

    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    rows = []

    def seconds(x, w) -> float:
        timer = Timer("F.linear(x, w)", globals={"F": F, "x": x, "w": w})
        return timer.blocked_autorange(min_run_time=args.gemm_min_time).median

    for out_features, in_features in tqdm(shapes, desc="GEMM shapes", unit="shape"):
        w = torch.randn(out_features, in_features, generator=gen).to(device, dtype)
        w = w.masked_fill(~magnitude_mask(w, 2, 4), 0)
        sparse = {}
        for backend, fn in convert.items():
            try:
                sparse[backend] = fn(w)
            except (RuntimeError, NotImplementedError) as e:
                sparse[backend] = e
        for m in tokens:
            x = torch.randn(m, in_features, generator=gen).to(device, dtype)
            dense_out = F.linear(x, w)
            row = {"out": out_features, "in": in_features, "tokens": m, "dense_s": seconds(x, w)}
            for backend, ws in sparse.items():
                if isinstance(ws, Exception):
                    row[backend] = {"error": f"{type(ws).__name__}: {ws}"[:300]}
                    continue
                try:
                    got = F.linear(x, ws)
                    err = float((got.float() - dense_out.float()).norm() / dense_out.float().norm())
                    t = seconds(x, ws)
                    row[backend] = {"s": t, "speedup": row["dense_s"] / t, "relative_l2": err}
                except (RuntimeError, NotImplementedError) as e:
                    row[backend] = {"error": f"{type(e).__name__}: {e}"[:300]}
            rows.append(row)
            del x, dense_out
    return rows


def release(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


@torch.inference_mode()
def bench_model(spec: dict, args, device: str) -> dict:
    """Every variant of one model: dense, then the 2:4 surgery per backend."""
    dtype = DTYPES[args.dtype]
    config = load_config(spec)
    state = masked_state(spec, config, args, device)
    vocab = config.get_text_config().vocab_size
    check_ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    result = {"name": spec["name"], "source": spec["path"], "mask": args.mask, "variants": {}}

    model = build(config, dtype, device, state)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    reference = model(input_ids=check_ids, use_cache=False).logits.float().cpu()
    result["variants"]["dense"] = {"weight_bytes": weight_bytes(model),
                                   "runs": measure(model, args, device, vocab, "dense")}
    del model
    release(device)

    convert, shapes = {}, set()
    for backend in args.backends:
        fn = packed_round_trip if args.dry_run_cpu else torch_converter(backend)
        model = build(config, dtype, device, state)
        try:
            surgery = sparsify_24(model, backend, convert=fn)
            check = logits_check(model, check_ids, reference)
            runs = measure(model, args, device, vocab, backend)
        except (RuntimeError, NotImplementedError) as e:  # e.g. a backend without kernels for this GPU
            result["variants"][backend] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:500]}
            print(f"[{spec['name']}] {backend}: failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            del model
            release(device)
            continue
        shapes |= {(model.get_submodule(name).out_features, model.get_submodule(name).in_features)
                   for name in surgery.replaced}
        convert[backend] = fn
        result["variants"][backend] = {
            "status": "ok", "summary": surgery.summary(), "replaced": surgery.replaced, "not_eligible": surgery.skipped,
            "logits_vs_dense": check, "weight_bytes": weight_bytes(model), "runs": runs,
        }
        del model
        release(device)
    del state

    tokens = sorted({b for b in args.batch_sizes} | {b * s for b in args.batch_sizes for s in args.seqlens})
    result["gemm"] = gemm_table(sorted(shapes), tokens, convert, args, device) if convert else []
    return result


# ---------------------------------------------------------------- report

def speedups(result: dict) -> list[dict]:
    """Per backend and (batch, seqlen): sparse over dense prefill throughput and decode latency, and peak memory."""
    dense = {(r["batch"], r["seqlen"]): r for r in result["variants"]["dense"]["runs"]}
    rows = []
    for backend, variant in result["variants"].items():
        if backend == "dense" or variant.get("status") != "ok":
            continue
        for r in variant["runs"]:
            d = dense[(r["batch"], r["seqlen"])]
            rows.append({"backend": backend, "batch": r["batch"], "seqlen": r["seqlen"],
                         "prefill_speedup": r["prefill_tokens_per_s"] / d["prefill_tokens_per_s"],
                         "decode_speedup": d["decode_s_per_token"] / r["decode_s_per_token"],
                         "prefill_peak_ratio": (r["prefill_peak_bytes"] / d["prefill_peak_bytes"]
                                                if d["prefill_peak_bytes"] else None)})
    return rows


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def print_report(result: dict) -> None:
    print(f"\n== {result['name']} ({result['parameters'] / 1e6:.1f} M parameters, mask: {result['mask']})")
    print(f"{'variant':<11}{'batch':>6}{'seqlen':>7}{'prefill tok/s':>15}{'x dense':>9}"
          f"{'decode ms/tok':>15}{'x dense':>9}{'peak MiB':>10}")
    dense = {(r["batch"], r["seqlen"]): r for r in result["variants"]["dense"]["runs"]}
    for name, variant in result["variants"].items():
        if variant.get("status") == "failed":
            print(f"{name:<11}failed: {variant['error'][:100]}")
            continue
        for r in variant["runs"]:
            d = dense[(r["batch"], r["seqlen"])]
            print(f"{name:<11}{r['batch']:>6}{r['seqlen']:>7}{r['prefill_tokens_per_s']:>15,.0f}"
                  f"{r['prefill_tokens_per_s'] / d['prefill_tokens_per_s']:>9.2f}{r['decode_s_per_token'] * 1e3:>15.2f}"
                  f"{d['decode_s_per_token'] / r['decode_s_per_token']:>9.2f}{mib(r['prefill_peak_bytes']):>10}")
    for name, variant in result["variants"].items():
        print(f"{name:<11}weights {mib(variant.get('weight_bytes'))} MiB"
              + (f"; {variant['summary']}; logits vs dense: rel L2 {variant['logits_vs_dense']['relative_l2']:.2e}, "
                 f"top-1 agreement {variant['logits_vs_dense']['top1_agreement']:.3f}"
                 + ("" if variant["logits_vs_dense"]["ok"] else "  ** MISMATCH **") if "summary" in variant else ""))
        reasons = sorted(set(variant.get("not_eligible", {}).values()))
        for reason in reasons:
            names = [n for n, r in variant["not_eligible"].items() if r == reason]
            listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            print(f"{'':<11}not eligible ({len(names)}: {listed}): {reason}")
    if result["gemm"]:
        backends = [b for b in result["gemm"][0] if b not in ("out", "in", "tokens", "dense_s")]
        print(f"{'GEMM [out, in]':<16}{'tokens':>8}{'dense us':>10}" + "".join(f"{b + ' x':>14}" for b in backends))
        for g in result["gemm"]:
            cells = "".join(f"{g[b]['speedup']:>14.2f}" if "speedup" in g[b] else f"{'error':>14}" for b in backends)
            print(f"{str([g['out'], g['in']]):<16}{g['tokens']:>8}{g['dense_s'] * 1e6:>10.1f}{cells}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = "cpu" if args.dry_run_cpu else require_cuda()  # before any model is built
    specs = ([{"kind": "config", "path": p, "name": Path(p).stem} for p in args.config]
             + [{"kind": "model", "path": p, "name": Path(p).name} for p in args.model])
    record = {
        "bench": "sparse24_speed", "dry_run": args.dry_run_cpu, "environment": environment(device),
        "provenance": provenance(device, args.dtype),
        "settings": {k: getattr(args, k) for k in ("dtype", "backends", "batch_sizes", "seqlens", "decode_tokens",
                                                   "repeat", "gemm_min_time", "seed", "mask")},
        "models_requested": [spec["name"] for spec in specs], "models": [], "complete": False,
    }
    if args.dry_run_cpu:
        print("DRY RUN on the CPU: the plain-torch packing stands in for the sparse kernels; the times mean nothing")
    for spec in specs:
        result = bench_model(spec, args, device)
        result["speedups"] = speedups(result)
        print_report(result)
        record["models"].append(result)
        record["complete"] = len(record["models"]) == len(specs)
        write_json(args.out, record)  # after every model: a run cut short keeps what it measured, marked incomplete
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()

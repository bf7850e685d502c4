"""DVC stage `prior@<method>`: one-shot N:M masks of the dense model by a method of ``pipeline.oneshot.registry``.

``artifacts/prior/<method>`` (which `learn` and `harden` depend on) holds only what the params
and the dense model determine; timings and reconstruction errors, which vary from run to run
or machine to machine, go to ``metrics/prior/<method>.json`` (and ``<method>_layers.json``),
which nothing depends on.
"""
import sys
from pathlib import Path

import torch

from pipeline.model.coverage import check_coverage, measure_coverage
from pipeline.data.tokens import load_tokens, sample_windows
from pipeline.io import atomic_dir, write_json
from pipeline.model.masks_io import save_masks, save_weights
from pipeline.model.loading import default_device, load_model
from pipeline.oneshot import registry
from pipeline.oneshot.prune import prune_oneshot
from pipeline.provenance import provenance
from pipeline.stage import run_stage

DATA, DENSE, PRIOR = Path("artifacts/data"), Path("artifacts/dense"), Path("artifacts/prior")
METRICS = Path("metrics/prior")


def main(params, method):
    p, sp = params.prior, params.sparsity
    if method not in p.methods:
        raise ValueError(f"prior method {method!r} is not in prior.methods {p.methods}")
    # the model stays on CPU and each block visits the compute device for its passes, so a
    # model far larger than the accelerator (a 7B SparseGPT prior on one 24 GB GPU) fits
    model, device = load_model(DENSE, device="cpu"), default_device()
    entry = registry.get(method)
    # a method that needs H anyway reports its reconstruction error for free
    measure_error = p.reconstruction_error or "hessian" in entry.statistics
    calibrated = bool(entry.statistics) or measure_error
    if calibrated and p.dtype == "float64":  # forwards, Hessians, factors and sweeps in double
        model.double()
    # Calibration windows come from the train split only (seeded): never from test. Magnitude
    # needs none unless its reconstruction error is asked for (then: a calibration pass).
    calib = sample_windows(load_tokens(DATA / "train.npy"), p.nsamples, p.seqlen, p.seed) if calibrated else None
    result = prune_oneshot(model, method, calib, sp.n, sp.m, p.percdamp, p.blocksize, measure_error=measure_error,
                           ignore=sp.ignore, device=device)
    # every weight matrix in the blocks is under N:M, ignored, or a gate: fails before writing otherwise
    coverage = measure_coverage(model, result.masks, sp.n, sp.m, sp.ignore)
    check_coverage(coverage)
    errors = result.errors
    mean_err = sum(errors.values()) / len(errors) if errors else None
    with atomic_dir(PRIOR / method) as tmp:
        save_masks(tmp / "mask.safetensors", result.masks)
        if result.updated_weights is not None:
            # in the dense checkpoint's float32 (rounded once, after a float64 sweep)
            save_weights(tmp / "weights.safetensors", {k: v.to(torch.float32) for k, v in result.updated_weights.items()})
        write_json(tmp / "stats.json", {
            "method": method, "n": sp.n, "m": sp.m, "layers": len(result.masks),
            "calibration": {"split": "train", "nsamples": p.nsamples, "seqlen": p.seqlen, "seed": p.seed,
                            "dtype": p.dtype} if calibrated else None,
            "coverage": coverage.as_dict(), "magnitude_fallbacks": result.fallbacks,
        })
    write_json(METRICS / f"{method}.json", {
        "seconds": round(result.seconds, 3),
        **({"reconstruction_error": {"mean": mean_err, "max": max(errors.values())}} if errors else {}),
        "coverage": coverage.as_dict(names=False), "magnitude_fallbacks": len(result.fallbacks),
        "provenance": provenance(device, p.dtype if calibrated else "float32"),
    })
    write_json(METRICS / f"{method}_layers.json", {"reconstruction_error": errors})  # per layer ({}: not measured)
    fallbacks = (f"; {len(result.fallbacks)} expert matrices got no calibration token: magnitude choice"
                 if result.fallbacks else "")
    error = f"mean relative reconstruction error {mean_err:.4f}; " if errors else ""
    return (f"{method} {sp.n}:{sp.m}: {len(result.masks)} layers in {result.seconds:.1f} s, "
            f"{error}{coverage.summary()}{fallbacks}")


if __name__ == "__main__":
    method = sys.argv[1]
    run_stage(f"prior {method}", lambda p: main(p, method))

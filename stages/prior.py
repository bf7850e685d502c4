"""DVC stage `prior@<method>`: one-shot N:M masks (magnitude, Wanda, SparseGPT) of the dense model."""
import sys
from pathlib import Path

from pipeline.data import load_tokens, sample_windows
from pipeline.io import atomic_dir, write_json
from pipeline.masks_io import save_masks, save_weights
from pipeline.modeling import load_model
from pipeline.oneshot import prune_oneshot
from pipeline.stage import run_stage

DATA, DENSE, PRIOR = Path("artifacts/data"), Path("artifacts/dense"), Path("artifacts/prior")


def main(params, method):
    p, sp = params.prior, params.sparsity
    if method not in p.methods:
        raise ValueError(f"prior method {method!r} is not in prior.methods {p.methods}")
    model = load_model(DENSE)
    # Calibration windows come from the train split only (seeded): never from test.
    calib = sample_windows(load_tokens(DATA / "train.npy"), p.nsamples, p.seqlen, p.seed)
    result = prune_oneshot(model, method, calib, sp.n, sp.m, p.percdamp, p.blocksize)
    errors = result.errors
    mean_err = sum(errors.values()) / max(1, len(errors))
    with atomic_dir(PRIOR / method) as tmp:
        save_masks(tmp / "mask.safetensors", result.masks)
        if result.updated_weights is not None:
            save_weights(tmp / "weights.safetensors", result.updated_weights)
        write_json(tmp / "stats.json", {
            "method": method, "n": sp.n, "m": sp.m, "layers": len(result.masks), "seconds": result.seconds,
            "calibration": {"split": "train", "nsamples": p.nsamples, "seqlen": p.seqlen, "seed": p.seed},
            "mean_reconstruction_error": mean_err, "reconstruction_error": errors,
        })
    return (f"{method} {sp.n}:{sp.m}: {len(result.masks)} layers in {result.seconds:.1f} s, "
            f"mean relative reconstruction error {mean_err:.4f}")


if __name__ == "__main__":
    method = sys.argv[1]
    run_stage(f"prior {method}", lambda p: main(p, method))

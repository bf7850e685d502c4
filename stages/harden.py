"""DVC stage `harden`: argmax of the learned logits -> an N:M mask file, statistics, exports."""
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.model.coverage import check_coverage, measure_coverage
from pipeline.io import atomic_dir, write_json
from pipeline.maskllm.masks import attach_masks
from pipeline.model.masks_io import export_packed_npz, export_sparse_checkpoint, load_masks, save_masks
from pipeline.model.loading import load_model
from pipeline.provenance import provenance
from pipeline.stage import run_stage
from pipeline.model.tokenizer import load_tokenizer

DENSE, PRIOR, LEARN, OUT = Path("artifacts/dense"), Path("artifacts/prior"), Path("artifacts/learn"), Path("artifacts/harden")


def layer_stats(mask: torch.Tensor, prior: torch.Tensor, m: int) -> dict:
    """Agreement with a prior mask (both ``[out, in]`` or ``[E, out, in]``): per weight, and groups whose choice changed."""
    same = mask == prior
    return {"agreement": float(same.float().mean()),
            "groups_changed": float((~same).reshape(-1, m).any(dim=1).float().mean())}


def main(params):
    sp, h = params.sparsity, params.harden
    model = load_model(DENSE, "float32", "cpu")
    masks = attach_masks(model, sp.n, sp.m, seed=params.learn.seed, ignore=sp.ignore)
    masks.load_logits_state_dict(load_file(str(LEARN / "logits.safetensors")))
    logical = {name: layer.logical for name, (layer, _) in masks.layers.items()}  # -> [.., out, in]
    hard = masks.hard_masks()  # checked exactly N:M, shaped like the stored parameter
    masks.remove()
    # every weight matrix in the blocks is under N:M, ignored, or a gate: fails before writing otherwise
    coverage = measure_coverage(model, hard, sp.n, sp.m, sp.ignore)
    check_coverage(coverage)
    priors = {m: load_masks(PRIOR / m / "mask.safetensors") for m in params.prior.methods}

    def out_in(name, mask):  # statistics run over groups along the input dimension
        return logical[name](mask)

    stats = {name: {method: layer_stats(out_in(name, mask), out_in(name, prior[name]), sp.m)
                    for method, prior in priors.items()} for name, mask in hard.items()}
    summary = {method: {key: sum(s[method][key] for s in stats.values()) / len(stats)
                        for key in ("agreement", "groups_changed")} for method in priors}
    with atomic_dir(OUT) as tmp:
        save_masks(tmp / "mask.safetensors", hard)
        if h.export_npz:
            export_packed_npz(tmp / "mask_packed.npz", hard)
        if h.export_checkpoint:
            export_sparse_checkpoint(model, hard, tmp / "sparse_model", tokenizer=load_tokenizer(DENSE))
        write_json(tmp / "stats.json", {"n": sp.n, "m": sp.m, "layers": stats, "mean": summary,
                                        "coverage": coverage.as_dict()})
    write_json(Path("metrics/harden.json"), {**summary, "coverage": coverage.as_dict(names=False),
                                             "provenance": provenance("cpu", "float32")})
    agree = ", ".join(f"{k} {v['agreement']:.3f}" for k, v in summary.items())
    return f"{len(hard)} weights hardened, {coverage.summary()}; mean weight agreement with {agree}"


if __name__ == "__main__":
    run_stage("harden", main)

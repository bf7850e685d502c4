"""DVC stage `learn`: MaskLLM mask logits on the frozen dense model.

    python -m stages.learn    # learn.nproc x learn.nnodes > 1: this node's torchrun agent (DDP or FSDP)

On several nodes every node runs this same command (docs/scaling.md has a SLURM script); under a
launcher that sets the torch.distributed environment itself, each process runs as one rank.
"""
import json
import math
import os
from functools import partial
from pathlib import Path

from safetensors.torch import save_file

from pipeline.model.coverage import check_coverage, measure_coverage
from pipeline.data.tokens import load_tokens
from pipeline.io import atomic_dir, sha256_files, write_json
from pipeline.maskllm.checkpoint import Checkpoint
from pipeline.maskllm.distributed import Dist, die_with_parent, launch
from pipeline.maskllm.train import fingerprint, learn_masks, write_curve
from pipeline.maskllm.kernel import kernel_name
from pipeline.maskllm.memory_plan import check_fits, learn_setup
from pipeline.model.masks_io import LazyMasks
from pipeline.model.loading import default_device, fill_parameters, load_model, load_skeleton
from pipeline.model.nm import candidates, find_blocks, find_prunable_layers
from pipeline.provenance import provenance
from pipeline.stage import run_stage
from pipeline.records.mlflow_export import learn_run
from pipeline.maskllm.transfer import PriorFileError, load_prior_file

DATA, DENSE = Path("artifacts/data"), Path("artifacts/dense")
OUT, CKPT = Path("artifacts/learn"), Path("artifacts/learn_ckpt")
LEARN_PRIOR = Path("artifacts/learn_prior.json")  # the learn_prior stage: which prior mask, its sha256
CURVE = Path("plots/learn_curve.csv")


def main(params):
    cfg, sp = params.learn, params.sparsity
    if cfg.nproc * cfg.nnodes > 1 and "WORLD_SIZE" not in os.environ:
        return launch(cfg)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()
    d = Dist.from_env(cfg)
    device = d.device(default_device())
    if device.startswith("cuda"):  # before any weight is read: a run the memory plan says will not fit stops here
        import torch

        check_fits(DENSE / "config.json", learn_setup(params), torch.cuda.get_device_properties(device).total_memory)
    fill = None
    if cfg.parallel == "fsdp" and d.world > 1:  # the weights are read block by block as each is sharded
        model = load_skeleton(DENSE, cfg.dtype)
        fill = partial(fill_parameters, model, DENSE, outside=f"{find_blocks(model)[0]}.")
    else:
        model = load_model(DENSE, cfg.dtype, "cpu")  # to the device whole
    coverage = planned_coverage(model, sp)  # before any work: fails naming block weights left dense by accident
    prior = json.loads(LEARN_PRIOR.read_text())  # the learn_prior stage's choice and hash
    wanted = None if cfg.prior == "none" or cfg.prior_strength == 0 else cfg.prior
    if prior["prior"] != wanted:
        raise PriorFileError(f"{LEARN_PRIOR} names prior {prior['prior']!r}, learn.prior is {cfg.prior!r}: "
                             "run `dvc repro learn_prior` (or `dvc repro`) first")
    prior_file, priors = (Path(prior["file"]), None) if prior["prior"] else (None, None)
    if prior_file is not None:
        if sha256_files(prior_file) != prior["sha256"]:
            raise PriorFileError(f"{prior_file} changed after the learn_prior stage hashed it: rerun `dvc repro`")
        if prior["prior"] == "file":  # transfer: a learned mask (pipeline/maskllm/transfer.py)
            priors, _ = load_prior_file(prior_file, model, sp.n, sp.m, DENSE, ignore=sp.ignore)
        else:
            priors = LazyMasks(prior_file)  # each layer's mask is read as its block gets its logits
    train = load_tokens(DATA / "train.npy")
    ckpt = Checkpoint(CKPT, fingerprint(cfg, sp, prior_file, extra=f"dense={sha256_files(DENSE / 'model.safetensors')}",
                                        world=d.world))

    def run(log):
        return learn_masks(model, priors, train, cfg, sp, ckpt, log=log, d=d, device=device, fill=fill)

    if not d.main:
        result = run(None)
        result.masks.logits_state_dict()  # the gather is a collective: rank 0 writes
        d.barrier()
        return None
    extra = {"world_size": d.world, **{f"provenance.{k}": v for k, v in provenance(device, cfg.dtype).items()}}
    with learn_run(params, key=ckpt.run_id, extra_params=extra) as tracker:
        result = run(tracker.log)
        write_outputs(result, cfg, sp, d, device, coverage)
        d.barrier()
        tracker.finish(CURVE)
    ckpt.clear()  # finished: the next run of these params is a DVC cache hit, not a resume
    last = result.curve[-1]
    return (f"{cfg.steps} steps ({'resumed at ' + str(result.resumed_from) if result.resumed_from else 'fresh'}, "
            f"{d.world} process(es), {cfg.parallel if d.world > 1 else 'single'}), {coverage.summary()}, "
            f"final CE {last['ce']:.3f}, "
            f"flip rate {last['flip_rate']:.4f}, {result.seconds / max(1, cfg.steps - result.resumed_from):.2f} s/step")


def planned_coverage(model, sp):
    """The coverage of the masks learn will attach: every prunable weight under N:M (any valid pattern
    stands in for the learned one)."""
    pattern = candidates(sp.n, sp.m)[0].bool()
    layers = find_prunable_layers(model, sp.m, ignore=sp.ignore)
    stand_in = {layer.param_name: layer_mask(layer, pattern) for layer in layers}
    coverage = measure_coverage(model, stand_in, sp.n, sp.m, sp.ignore)
    check_coverage(coverage)
    return coverage


def layer_mask(layer, pattern):
    """A valid N:M mask shaped like the layer's parameter: ``pattern`` in every group of its input dim."""
    logical = layer.weight()
    mask = pattern.repeat(logical.shape[-1] // pattern.numel()).expand(logical.shape)
    return layer.stored(mask) if hasattr(layer, "stored") else mask


def write_outputs(result, cfg, sp, d, device, coverage) -> None:
    logits = result.masks.logits_state_dict()
    with atomic_dir(OUT) as tmp:
        save_file(logits, tmp / "logits.safetensors")
        # no wall time, resume point or world size here: a resumed or resharded run must produce the same output
        info = {"steps": cfg.steps, "prior": cfg.prior}
        if cfg.prior == "file":
            info["prior_file"] = cfg.prior_file
        write_json(tmp / "info.json", info)
    write_curve(CURVE, result.curve)
    last, times = result.curve[-1], result.step_seconds
    tenth = max(1, len(times) // 10)
    write_json(Path("metrics/learn.json"), {
        "final_ce": last["ce"], "final_flip_rate": last["flip_rate"],
        "prior_agreement": last.get("prior_agreement", float("nan")), "steps": cfg.steps,
        "resumed_from": result.resumed_from, "seconds": result.seconds,
        # the subnormal check of a whole run: late steps (tau near its end) as fast as early ones
        "step_seconds_first_10pct": sum(times[:tenth]) / tenth, "step_seconds_last_10pct": sum(times[-tenth:]) / tenth,
        "processes": d.world, "parallel": cfg.parallel if d.world > 1 else "single",
        "accumulation": cfg.batch_size // (cfg.micro(d.world) * d.world),
        # the largest peak resident memory of a process up to its first step (loading included)
        "peak_host_bytes_first_step": result.peak_host_bytes,
        "mask_kernel": kernel_name(device, math.comb(sp.m, sp.n)), "coverage": coverage.as_dict(names=False),
        "provenance": provenance(device, cfg.dtype)})


if __name__ == "__main__":
    run_stage("learn", main)

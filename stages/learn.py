"""DVC stage `learn`: MaskLLM mask logits on the frozen dense model.

    python -m stages.learn          # learn.nproc > 1: relaunches itself under torchrun (DDP or FSDP)
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import save_file

from pipeline.model.coverage import check_coverage, measure_coverage
from pipeline.data.tokens import load_tokens
from pipeline.io import atomic_dir, sha256_files, write_json
from pipeline.maskllm.train import Checkpoint, Dist, fingerprint, learn_masks, write_curve
from pipeline.maskllm.kernel import kernel_name
from pipeline.model.masks_io import load_masks
from pipeline.model.loading import default_device, load_model
from pipeline.model.nm import candidates, find_prunable_layers
from pipeline.provenance import provenance
from pipeline.stage import run_stage
from pipeline.records.mlflow_export import learn_run
from pipeline.maskllm.transfer import PriorFileError, load_prior_file

DATA, DENSE = Path("artifacts/data"), Path("artifacts/dense")
OUT, CKPT = Path("artifacts/learn"), Path("artifacts/learn_ckpt")
LEARN_PRIOR = Path("artifacts/learn_prior.json")  # the learn_prior stage: which prior mask, its sha256
CURVE = Path("plots/learn_curve.csv")


def launch(cfg) -> str:
    """learn.nproc > 1: run this stage as ``cfg.nproc`` torchrun processes, on this node."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # torchrun would pin every process to 1 thread
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.nproc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}",
           "-m", "stages.learn"]
    code = subprocess.call(cmd, env=env)
    if code:
        raise SystemExit(code)  # the failing rank printed its error
    return f"{cfg.nproc} processes ({cfg.parallel}) done"


def die_with_parent() -> None:
    """A rank that torchrun started: die with torchrun. Its workers run in sessions of their own,
    so a job scheduler's kill, or a SIGKILL of `dvc repro`'s process group, would leave them running
    the stage to its end behind the user's back (and behind the resumed run's)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # torchrun died before the prctl
        os._exit(1)


def main(params):
    cfg, sp = params.learn, params.sparsity
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch(cfg)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()
    d = Dist.from_env()
    device = d.device(default_device())
    model = load_model(DENSE, cfg.dtype, "cpu")  # to the device block by block (FSDP) or whole (else)
    coverage = planned_coverage(model, sp)  # before any work: fails naming block weights left dense by accident
    prior = json.loads(LEARN_PRIOR.read_text())  # the learn_prior stage's choice and hash
    prior_file, priors = (Path(prior["file"]), None) if prior["prior"] else (None, None)
    if prior_file is not None:
        if sha256_files(prior_file) != prior["sha256"]:
            raise PriorFileError(f"{prior_file} changed after the learn_prior stage hashed it: rerun `dvc repro`")
        if prior["prior"] == "file":  # transfer: a learned mask (pipeline/maskllm/transfer.py)
            priors, _ = load_prior_file(prior_file, model, sp.n, sp.m, DENSE, ignore=sp.ignore)
        else:
            priors = load_masks(prior_file)
    train = load_tokens(DATA / "train.npy")
    ckpt = Checkpoint(CKPT, fingerprint(cfg, sp, prior_file, extra=f"dense={sha256_files(DENSE / 'model.safetensors')}"))

    def run(log):
        return learn_masks(model, priors, train, cfg, sp, ckpt, log=log, d=d, device=device)

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
        "mask_kernel": kernel_name(device, math.comb(sp.m, sp.n)), "coverage": coverage.as_dict(names=False),
        "provenance": provenance(device, cfg.dtype)})


if __name__ == "__main__":
    run_stage("learn", main)

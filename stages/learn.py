"""DVC stage `learn`: MaskLLM mask logits on the frozen dense model (also under torchrun, DDP).

    python -m stages.learn                                  # one process
    torchrun --nproc_per_node 8 -m stages.learn             # data-parallel over learn.batch_size
"""
import json
from pathlib import Path

from safetensors.torch import save_file

from pipeline.data import load_tokens
from pipeline.io import atomic_dir, write_json
from pipeline.learn import Checkpoint, Dist, fingerprint, learn_masks, write_curve
from pipeline.masks_io import load_masks
from pipeline.modeling import default_device, load_model
from pipeline.stage import run_stage
from pipeline.tracking import learn_run
from pipeline.io import sha256_files
from pipeline.transfer import PriorFileError, load_prior_file

DATA, DENSE, PRIOR = Path("artifacts/data"), Path("artifacts/dense"), Path("artifacts/prior")
OUT, CKPT = Path("artifacts/learn"), Path("artifacts/learn_ckpt")
PRIOR_FILE = Path("artifacts/prior_file.json")  # the prior_file stage's hash of learn.prior_file
CURVE = Path("plots/learn_curve.csv")


def main(params):
    cfg, sp = params.learn, params.sparsity
    d = Dist.from_env()
    device = default_device()
    if device == "cuda" and d.world > 1:
        import torch

        device = f"cuda:{d.rank % torch.cuda.device_count()}"
    model = load_model(DENSE, "float32", device)
    prior_file, priors = None, None
    if cfg.prior == "file" and cfg.prior_strength > 0:  # transfer: a learned mask (pipeline/transfer.py)
        prior_file = Path(cfg.prior_file)
        expected = json.loads(PRIOR_FILE.read_text()).get("sha256")
        if sha256_files(prior_file) != expected:
            raise PriorFileError(f"learn.prior_file={cfg.prior_file!r} changed after the prior_file stage "
                                 "hashed it: rerun `dvc repro`")
        priors, _ = load_prior_file(prior_file, model, sp.n, sp.m, DENSE)
    elif cfg.prior not in ("none", "file") and cfg.prior_strength > 0:
        prior_file = PRIOR / cfg.prior / "mask.safetensors"
        priors = load_masks(prior_file)
    train = load_tokens(DATA / "train.npy")
    ckpt = Checkpoint(CKPT, fingerprint(cfg, sp, prior_file, extra=f"world={d.world}"))

    def run(log):
        return learn_masks(model, priors, train, cfg, sp, ckpt, log=log, d=d)

    if not d.main:
        run(None)
        d.barrier()
        return "rank done"
    dataset = json.loads((DATA / "stats.json").read_text())["source"]
    with learn_run(params, dataset, key=ckpt.run_id, extra_params={"world_size": d.world}) as tracker:
        result = run(tracker.log)
        d.barrier()
        write_outputs(result, cfg, d)
        tracker.finish(CURVE)
    ckpt.clear()  # finished: the next run of these params is a DVC cache hit, not a resume
    last = result.curve[-1]
    return (f"{cfg.steps} steps ({'resumed at ' + str(result.resumed_from) if result.resumed_from else 'fresh'}), "
            f"final CE {last['ce']:.3f}, flip rate {last['flip_rate']:.4f}, "
            f"{result.seconds / max(1, cfg.steps - result.resumed_from):.2f} s/step")


def write_outputs(result, cfg, d) -> None:
    with atomic_dir(OUT) as tmp:
        save_file(result.masks.logits_state_dict(), tmp / "logits.safetensors")
        # no wall time or resume point here: a resumed run must produce the same output
        info = {"steps": cfg.steps, "prior": cfg.prior, "world_size": d.world}
        if cfg.prior == "file":
            info["prior_file"] = cfg.prior_file
        write_json(tmp / "info.json", info)
    write_curve(CURVE, result.curve)
    last = result.curve[-1]
    write_json(Path("metrics/learn.json"), {"final_ce": last["ce"], "final_flip_rate": last["flip_rate"],
                                            "prior_agreement": last.get("prior_agreement", float("nan")),
                                            "seconds": result.seconds, "steps": cfg.steps,
                                            "resumed_from": result.resumed_from})


if __name__ == "__main__":
    run_stage("learn", main)

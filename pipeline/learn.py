"""The MaskLLM training loop: data, schedules, resumable checkpoints, DDP, per-step logging.

Every source of randomness at step t is a pure function of (seed, t) — the batch and the
Gumbel noise — so a run resumed from a checkpoint ends with the same logits as one that
never stopped, and every DDP rank samples the same masks (data-parallel over the batch).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from pipeline.config import Learn, Sparsity
from pipeline.data import sample_windows
from pipeline.io import atomic_path
from pipeline.maskllm import MaskSet, Schedule, attach_masks, make_optimizer, train_step

STEP_SEED = 1_000_003  # seeds of step t: seed * STEP_SEED + t (batches), + 2**31 (Gumbel noise)


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(int(os.environ.get("RANK", "0")), world)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def local_batch(train: torch.Tensor, cfg: Learn, t: int, d: Dist) -> torch.Tensor:
    """This rank's rows of the global batch of step t -> ``[batch_size / world, seqlen]``."""
    batch = sample_windows(train, cfg.batch_size, cfg.seqlen, seed=cfg.seed * STEP_SEED + t)
    return batch[d.rank :: d.world]


def fingerprint(cfg: Learn, sp: Sparsity, prior_file: Path | None, extra: str = "") -> str:
    """Identity of a run: a checkpoint of another run (other params or prior) is never resumed."""
    h = hashlib.sha256(cfg.model_dump_json().encode() + sp.model_dump_json().encode() + extra.encode())
    if prior_file is not None:
        h.update(prior_file.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Checkpoint:
    """``logits.safetensors`` + ``state.pt`` (optimizer, lr schedule, step, RNG) in one folder."""

    folder: Path
    run_id: str

    def save(self, masks: MaskSet, opt, lr_schedule, step: int, curve: list[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # state.pt last: it names the step, so a kill between the two files resumes the older step
        with atomic_path(self.folder / "logits.safetensors") as tmp:
            save_file(masks.logits_state_dict(), tmp)
        with atomic_path(self.folder / "state.pt") as tmp:
            torch.save({"run_id": self.run_id, "step": step, "optimizer": opt.state_dict(),
                        "lr_schedule": lr_schedule.state_dict(), "rng": torch.get_rng_state(), "curve": curve}, tmp)

    def load(self, masks: MaskSet, opt, lr_schedule) -> tuple[int, list[dict]]:
        """Restore the latest checkpoint of this run -> (step to resume from, curve so far)."""
        state_file = self.folder / "state.pt"
        if not state_file.is_file():
            return 0, []
        state = torch.load(state_file, weights_only=True)
        if state.get("run_id") != self.run_id:
            return 0, []  # another configuration's checkpoint: start afresh
        masks.load_logits_state_dict(load_file(str(self.folder / "logits.safetensors")))
        opt.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        torch.set_rng_state(state["rng"])
        return int(state["step"]), list(state.get("curve", []))

    def clear(self) -> None:
        for name in ("state.pt", "logits.safetensors"):
            (self.folder / name).unlink(missing_ok=True)


@dataclass
class LearnResult:
    masks: MaskSet
    curve: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0


def learn_masks(model, priors: dict | None, train: torch.Tensor, cfg: Learn, sp: Sparsity, ckpt: Checkpoint,
                log: Callable[[dict, int], None] | None = None, d: Dist | None = None,
                log_every: int | None = None, progress: bool = True) -> LearnResult:
    """Learn N:M masks of ``model`` (frozen) on ``train`` tokens; ``log(metrics, step)`` on rank 0."""
    d = d or Dist()
    if cfg.batch_size % d.world:
        raise ValueError(f"learn.batch_size={cfg.batch_size} must be divisible by the {d.world} DDP processes")
    strength = cfg.prior_strength if priors is not None else 0.0
    masks = attach_masks(model, sp.n, sp.m, priors=priors, prior_strength=strength, seed=cfg.seed)
    opt, lr_schedule = make_optimizer(masks, cfg.lr, cfg.steps, cfg.weight_decay)
    schedule = Schedule(cfg.steps, cfg.tau, cfg.tau_end, cfg.kappa, cfg.kappa_end, cfg.weight_reg)
    start, curve = ckpt.load(masks, opt, lr_schedule)
    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    log_every = log_every or max(1, cfg.steps // 100)
    result = LearnResult(masks, curve, resumed_from=start)
    t0 = time.time()
    model.train()
    bar = tqdm(range(start, cfg.steps), desc="learn masks", initial=start, total=cfg.steps,
               disable=not (progress and d.main))
    for t in bar:
        batch = local_batch(train, cfg, t, d).to(next(model.parameters()).device)
        torch.manual_seed(cfg.seed * STEP_SEED + t + 2**31)  # the step's Gumbel noise, same on every rank
        logging = (t + 1) % log_every == 0 or t == start or t + 1 == cfg.steps
        masks.state.track_confidence = logging
        metrics = train_step(net, masks, batch, opt, lr_schedule, schedule, t, cfg.grad_clip)
        if logging:
            metrics.update(masks.diagnostics())
            metrics["step"] = t + 1
            result.curve.append(metrics)
            bar.set_postfix(loss=f"{metrics['ce']:.3f}", tau=f"{metrics['temperature']:.2f}",
                            flip=f"{metrics['flip_rate']:.4f}")
            if log is not None and d.main:
                log(metrics, t + 1)
        done = t + 1
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            if d.main:
                ckpt.save(masks, opt, lr_schedule, done, result.curve)
            d.barrier()
    model.eval()
    result.seconds = time.time() - t0
    return result


def write_curve(path: Path, curve: list[dict]) -> None:
    """Per-step diagnostics as CSV (DVC plots)."""
    keys = ["step", "ce", "loss", "regularizer", "temperature", "logit_scale", "lr", "flip_rate",
            "confidence", "prior_agreement"]
    keys = [k for k in keys if any(k in row for row in curve)]
    with atomic_path(path) as tmp:
        lines = [",".join(keys)] + [",".join(json.dumps(row.get(k, "")) for k in keys) for row in curve]
        tmp.write_text("\n".join(lines) + "\n")

"""The MaskLLM training loop: data, schedules, DDP / FSDP2, resumable sharded checkpoints, logging.

Every source of randomness at step t is a pure function of (seed, t): the batch, and the Gumbel
noise (keyed by seed, step and layer in ``pipeline.maskllm.kernel``). So a run resumed from a
checkpoint ends with the same logits as one that never stopped, and every rank samples the same
masks while the global batch is split over the ranks (DDP or FSDP: only the float summation order of
the gradient reduction differs from one process).

Parallel modes (``learn.parallel`` with ``learn.nproc`` processes under torchrun):

- ``ddp``: every rank holds the frozen weights and all mask logits; gradients are all-reduced.
- ``fsdp``: ``fully_shard`` per transformer block and on the root (FSDP2): the frozen weights, the
  logits, their gradients and AdamW's state are sharded over the ranks; a block's weights and
  logits are gathered for its forward (the soft mask is sampled there) and backward, then freed.

Checkpoints go through ``torch.distributed.checkpoint`` (each rank writes its own shard) into a
temporary folder renamed as a whole once complete, so a killed run never leaves a half checkpoint
that is loaded; a checkpoint written by N ranks loads on any other number of ranks.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.config import Learn, Sparsity
from pipeline.data.tokens import sample_windows
from pipeline.io import atomic_path
from pipeline.maskllm.kernel import kernel_name
from pipeline.maskllm.masks import MaskSet, Schedule, attach_masks, make_optimizer, train_step
from pipeline.model.nm import NMError, find_blocks

STEP_SEED = 1_000_003  # the batch of step t: sample_windows(seed * STEP_SEED + t)


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def device(self, default: str) -> str:
        """This rank's device: its own GPU under torchrun, else ``default``."""
        if default == "cuda" and self.world > 1:
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return default


def local_batch(train: torch.Tensor, cfg: Learn, t: int, d: Dist) -> torch.Tensor:
    """This rank's rows of the global batch of step t -> ``[batch_size / world, seqlen]``."""
    batch = sample_windows(train, cfg.batch_size, cfg.seqlen, seed=cfg.seed * STEP_SEED + t)
    return batch[d.rank :: d.world]


# what does not change the trajectory: a checkpoint of the same run resumes across these
NOT_IN_FINGERPRINT = {"checkpoint_every", "nproc", "parallel", "activation_checkpointing", "recompute_masked_weights"}


def fingerprint(cfg: Learn, sp: Sparsity, prior_file: Path | None, extra: str = "") -> str:
    """Identity of a run: a checkpoint of another run (other params or prior) is never resumed."""
    learn = cfg.model_dump(mode="json", exclude=NOT_IN_FINGERPRINT)
    h = hashlib.sha256(json.dumps(learn, sort_keys=True).encode() + sp.model_dump_json().encode() + extra.encode())
    if prior_file is not None:
        h.update(prior_file.read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ parallel wrappers

def shard_blocks(model: torch.nn.Module, d: Dist, device: str) -> Callable[[int], None]:
    """For ``attach_masks(on_block=...)``: FSDP2 ``fully_shard`` of each block as its masks exist."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (d.world,))
    _, blocks = find_blocks(model)

    def on_block(b: int) -> None:
        fully_shard(blocks[b], mesh=mesh)
    on_block.mesh = mesh  # the root is sharded with the same mesh once every block is
    return on_block


def prepare(model: torch.nn.Module, priors: dict | None, cfg: Learn, sp: Sparsity, d: Dist, device: str
            ) -> tuple[torch.nn.Module, MaskSet]:
    """Masks attached, the model sharded (FSDP) or wrapped (DDP) for ``learn.parallel`` -> (net, masks)."""
    strength = cfg.prior_strength if priors is not None else 0.0
    if cfg.activation_checkpointing:  # recompute each block in backward: the noise is keyed, so the same masks
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise NMError(f"learn.activation_checkpointing: {type(model).__name__} is no transformers model; "
                          "set it to false")
    fsdp = cfg.parallel == "fsdp" and d.world > 1
    on_block = shard_blocks(model, d, device) if fsdp else None
    masks = attach_masks(model, sp.n, sp.m, priors=priors, prior_strength=strength, seed=cfg.seed,
                         ignore=sp.ignore, on_block=on_block)
    masks.recompute_weights = cfg.recompute_masked_weights
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=on_block.mesh)
        masks.reset_diagnostics()
        masks.recompute_weights = False  # a recipe would read unsharded weights that FSDP frees after the forward
        return model, masks
    model.to(device)
    if d.world > 1:
        return torch.nn.parallel.DistributedDataParallel(model), masks
    return model, masks


# ------------------------------------------------------------------ checkpoints

@dataclass
class Checkpoint:
    """Sharded, resumable checkpoints of one run: ``<folder>/step_<t>/`` (DCP shards + meta.json).

    The logits (the only trainable parameters) and AdamW's state go through
    ``torch.distributed.checkpoint``; the step, the lr schedule and the curve so far through
    ``meta.json``, written last, inside the temporary folder, before the atomic rename.
    """

    folder: Path
    run_id: str

    def _steps(self) -> list[Path]:
        found = [p for p in self.folder.glob("step_*") if re.fullmatch(r"step_\d+", p.name)
                 and (p / "meta.json").is_file()] if self.folder.is_dir() else []
        return sorted(found, key=lambda p: int(p.name.split("_")[1]))

    def save(self, net, masks: MaskSet, opt, lr_schedule, step: int, curve: list[dict], d: Dist) -> None:
        import torch.distributed.checkpoint as dcp

        final, tmp = self.folder / f"step_{step:06d}", self.folder / f".step_{step:06d}.tmp"
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        d.barrier()
        dcp.save(_state(net, opt), checkpoint_id=str(tmp), no_dist=d.world == 1)
        if d.main:
            meta = {"run_id": self.run_id, "step": step, "world_size": d.world, "curve": curve,
                    "lr_schedule": lr_schedule.state_dict()}
            with atomic_path(tmp / "meta.json") as f:
                f.write_text(json.dumps(meta))
            os.replace(tmp, final)  # the checkpoint exists only once it is whole
            for old in self._steps():
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        d.barrier()

    def load(self, net, masks: MaskSet, opt, lr_schedule, d: Dist) -> tuple[int, list[dict]]:
        """Restore the latest complete checkpoint of this run -> (step to resume from, curve so far)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        if d.main:  # leftovers of a save that was killed are never loaded
            for stale in self.folder.glob(".step_*.tmp") if self.folder.is_dir() else []:
                shutil.rmtree(stale, ignore_errors=True)
        steps = self._steps()
        if not steps:
            return 0, []
        meta = json.loads((steps[-1] / "meta.json").read_text())
        if meta.get("run_id") != self.run_id:
            return 0, []  # another configuration's checkpoint: start afresh
        state = _state(net, opt)
        dcp.load(state, checkpoint_id=str(steps[-1]), no_dist=d.world == 1)
        # not strict: the frozen weights are not in a checkpoint (dcp.load already failed on a missing logit)
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_model_state_dict(net, state["model"], options=options)
        set_optimizer_state_dict(net, opt, state["optim"], options=options)
        lr_schedule.load_state_dict(meta["lr_schedule"])
        masks.reset_diagnostics()
        return int(meta["step"]), list(meta["curve"])

    def clear(self) -> None:
        """Remove every checkpoint (the folder stays, empty: the next run resumes from nothing)."""
        for path in self.folder.iterdir() if self.folder.is_dir() else []:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _state(net, opt) -> dict:
    """What a checkpoint holds: the trainable parameters (the logits) and the optimizer state, keyed by
    parameter name, whatever the wrapper (none, DDP, FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(net, opt, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_sd, "optim": optim_sd}


# ------------------------------------------------------------------ the loop

@dataclass
class LearnResult:
    masks: MaskSet
    curve: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step run here


def learn_masks(model, priors: dict | None, train: torch.Tensor, cfg: Learn, sp: Sparsity, ckpt: Checkpoint,
                log: Callable[[dict, int], None] | None = None, d: Dist | None = None,
                log_every: int | None = None, progress: bool = True, device: str = "cpu") -> LearnResult:
    """Learn N:M masks of ``model`` (frozen) on ``train`` tokens; ``log(metrics, step)`` on rank 0."""
    d = d or Dist()
    if cfg.batch_size % d.world:
        raise ValueError(f"learn.batch_size={cfg.batch_size} must be divisible by the {d.world} processes "
                         "(learn.nproc)")
    kernel_name(device, math.comb(sp.m, sp.n))  # build the mask kernel (first use) before any step is timed
    net, masks = prepare(model, priors, cfg, sp, d, device)
    opt, lr_schedule = make_optimizer(masks, cfg.lr, cfg.steps, cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps)
    schedule = Schedule(cfg.steps, cfg.tau, cfg.tau_end, cfg.kappa, cfg.kappa_end, cfg.weight_reg)
    start, curve = ckpt.load(net, masks, opt, lr_schedule, d)
    log_every = log_every or max(1, cfg.steps // 100)
    result = LearnResult(masks, curve, resumed_from=start)
    t0 = time.time()
    model.train()
    bar = tqdm(range(start, cfg.steps), desc="learn masks", initial=start, total=cfg.steps,
               disable=not (progress and d.main))
    for t in bar:
        step_start = time.perf_counter()
        batch = local_batch(train, cfg, t, d).to(device)
        logging = (t + 1) % log_every == 0 or t == start or t + 1 == cfg.steps
        masks.state.track_confidence = logging
        metrics = train_step(net, masks, batch, opt, lr_schedule, schedule, t, cfg.grad_clip)
        if d.world > 1:  # each rank saw its share of the batch: log the mean over the global batch
            losses = torch.tensor([metrics["ce"], metrics["loss"]], dtype=torch.float64, device=device)
            dist.all_reduce(losses)
            metrics["ce"], metrics["loss"] = (losses / d.world).tolist()
        result.step_seconds.append(time.perf_counter() - step_start)
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
            ckpt.save(net, masks, opt, lr_schedule, done, result.curve, d)
    model.eval()
    result.seconds = time.time() - t0
    return result


def write_curve(path: Path, curve: list[dict]) -> None:
    """Per-step diagnostics as CSV (DVC plots); no wall times: it is an input of other stages."""
    keys = ["step", "ce", "loss", "regularizer", "temperature", "logit_scale", "lr", "flip_rate",
            "confidence", "prior_agreement"]
    keys = [k for k in keys if any(k in row for row in curve)]
    with atomic_path(path) as tmp:
        lines = [",".join(keys)] + [",".join(json.dumps(row.get(k, "")) for k in keys) for row in curve]
        tmp.write_text("\n".join(lines) + "\n")

"""The MaskLLM training loop: the global batch in micro-batches, schedules, checkpoints, logging.

A step takes ``learn.batch_size`` sequences (the global batch), cut into micro-batches of
``learn.micro_batch_size``; each micro-batch is one forward with a Gumbel sample of its own (as the
authors draw one per micro-batch) and one backward, the gradients accumulate, and AdamW steps once.
With P processes (``learn.nproc`` x ``learn.nnodes``) process r takes micro-batches r, r + P, r + 2P, ...:
``batch_size / (micro_batch_size * P)`` accumulation steps each.

Every source of randomness at step t is a pure function of (seed, t): the batch, and the Gumbel
noise (keyed by seed, step, micro-batch and layer in ``pipeline.maskllm.kernel``). So a run resumed
from a checkpoint ends with the same logits as one that never stopped, and P processes draw the
samples one process draws: only the float summation order of the gradient differs.

The frozen model stays in eval mode while learning (dropout off, as the authors train; gradients
still reach the logits).
"""
from __future__ import annotations

import hashlib
import json
import math
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
from pipeline.maskllm.checkpoint import Checkpoint
from pipeline.maskllm.distributed import Dist, peak_host_bytes, prepare
from pipeline.maskllm.kernel import kernel_name
from pipeline.maskllm.masks import MaskSet, Schedule, make_optimizer, train_step

STEP_SEED = 1_000_003  # the batch of step t: sample_windows(seed * STEP_SEED + t)

# what does not change the trajectory: a checkpoint of the same run resumes across these
NOT_IN_FINGERPRINT = {"checkpoint_every", "nproc", "nnodes", "rdzv_endpoint", "parallel", "activation_checkpointing",
                      "recompute_masked_weights"}


def fingerprint(cfg: Learn, sp: Sparsity, prior_file: Path | None, extra: str = "", world: int = 1) -> str:
    """Identity of a run: a checkpoint of another run (other params or prior) is never resumed. The
    micro-batch size counts as it runs (the samples drawn), the processes that share them do not."""
    learn = cfg.model_dump(mode="json", exclude=NOT_IN_FINGERPRINT)
    learn["micro_batch_size"] = cfg.micro(world)
    h = hashlib.sha256(json.dumps(learn, sort_keys=True).encode() + sp.model_dump_json().encode() + extra.encode())
    if prior_file is not None:
        h.update(prior_file.read_bytes())
    return h.hexdigest()[:16]


def micro_batches(train: torch.Tensor, cfg: Learn, t: int, d: Dist) -> list[tuple[int, torch.Tensor]]:
    """This process's micro-batches of step t: ``[(k, rows k*b .. (k+1)*b of the global batch)]`` for
    k = rank, rank + P, ... (b = learn.micro_batch_size, P processes)."""
    batch = sample_windows(train, cfg.batch_size, cfg.seqlen, seed=cfg.seed * STEP_SEED + t)
    b = cfg.micro(d.world)
    return [(k, batch[k * b:(k + 1) * b]) for k in range(d.rank, cfg.batch_size // b, d.world)]


@dataclass
class LearnResult:
    masks: MaskSet
    curve: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step run here
    peak_host_bytes: int = 0  # the largest peak resident memory of a process, up to its first step


def learn_masks(model, priors: dict | None, train: torch.Tensor, cfg: Learn, sp: Sparsity, ckpt: Checkpoint,
                log: Callable[[dict, int], None] | None = None, d: Dist | None = None,
                log_every: int | None = None, progress: bool = True, device: str = "cpu",
                fill: Callable[[str | None], None] | None = None) -> LearnResult:
    """Learn N:M masks of ``model`` (frozen) on ``train`` tokens; ``log(metrics, step)`` on rank 0.

    ``fill``: the model was built on the meta device and this reads its weights, part by part
    (``pipeline.maskllm.distributed.prepare``)."""
    d = d or Dist()
    if cfg.batch_size % (cfg.micro(d.world) * d.world):
        raise ValueError(f"learn.batch_size={cfg.batch_size} must be a multiple of learn.micro_batch_size="
                         f"{cfg.micro(d.world)} x {d.world} process(es)")
    kernel_name(device, math.comb(sp.m, sp.n))  # build the mask kernel (first use) before any step is timed
    prepared = prepare(model, priors, cfg, sp, d, device, fill)
    net, masks = prepared.net, prepared.masks
    opt, lr_schedule = make_optimizer(masks, cfg.lr, cfg.steps, cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps)
    schedule = Schedule(cfg.steps, cfg.tau, cfg.tau_end, cfg.kappa, cfg.kappa_end, cfg.weight_reg)
    start, curve = ckpt.load(net, masks, opt, lr_schedule, d)
    log_every = log_every or max(1, cfg.steps // 100)
    result = LearnResult(masks, curve, resumed_from=start)
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), desc="learn masks", initial=start, total=cfg.steps,
               disable=not (progress and d.main))
    for t in bar:
        step_start = time.perf_counter()
        batches = [(k, ids.to(device)) for k, ids in micro_batches(train, cfg, t, d)]
        logging = (t + 1) % log_every == 0 or t == start or t + 1 == cfg.steps
        masks.state.track_confidence = logging
        metrics = train_step(net, masks, batches, opt, lr_schedule, schedule, t, cfg.grad_clip, prepared.no_sync)
        if d.world > 1:  # each process saw its share of the batch: log the mean over the global batch
            losses = torch.tensor([metrics["ce"], metrics["loss"], metrics["regularizer"]], dtype=torch.float64,
                                  device=device)
            dist.all_reduce(losses)
            metrics["ce"], metrics["loss"], metrics["regularizer"] = (losses / d.world).tolist()
        result.step_seconds.append(time.perf_counter() - step_start)
        if t == start:
            result.peak_host_bytes = int(d.max(peak_host_bytes()))
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

"""Where ``learn`` runs: one process, or a torchrun job on one node or several; DDP or FSDP2.

- ``launch``: ``learn.nproc`` processes on this node, and with ``learn.nnodes > 1`` a node of a job
  that meets at ``learn.rdzv_endpoint`` (torchrun's c10d rendezvous). Every node runs the same
  command; an external launcher that sets the torch.distributed environment itself (``srun`` around
  ``torchrun``, a cluster's own) runs the ranks directly (:func:`Dist.from_env`).
- ``prepare``: the masks attached, the model wrapped (DDP) or sharded per block (FSDP2). Under FSDP the
  frozen weights are read from the checkpoint block by block onto a model built on the meta device,
  and each block is sharded as soon as its masks exist: a rank holds its shards plus one block, so
  the host memory of a node stays near one copy of the model whatever the ranks per node.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from pipeline.config import Learn, Sparsity
from pipeline.maskllm.masks import MaskSet, attach_masks
from pipeline.model.nm import NMError, find_blocks


class LaunchError(ValueError):
    """The distributed settings cannot work as given; the message names the keys and the fix."""


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
    def from_env(cls, cfg: Learn | None = None) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if cfg is not None and world != cfg.nproc * cfg.nnodes:
            raise LaunchError(f"the launcher started {world} processes but learn.nproc={cfg.nproc} x "
                              f"learn.nnodes={cfg.nnodes} = {cfg.nproc * cfg.nnodes}: set them to the job's shape "
                              "(the micro-batches each process takes follow from them)")
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

    def max(self, value: float) -> float:
        """The largest ``value`` over the processes."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)


def rendezvous_id(cfg: Learn) -> str:
    """The same on every node of one job, different for another configuration."""
    return "maskllm-" + hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:12]


def torchrun_command(cfg: Learn, module: str = "stages.learn") -> list[str]:
    """torchrun for this node: standalone on one node, c10d rendezvous at ``learn.rdzv_endpoint`` on several."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.nproc}"]
    if cfg.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={cfg.nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={cfg.rdzv_endpoint}",
                f"--rdzv_id={rendezvous_id(cfg)}"]
    return cmd + ["-m", module]


def launch(cfg: Learn, module: str = "stages.learn") -> str:
    """Run ``module`` as this node's ``learn.nproc`` torchrun processes (of ``learn.nnodes`` nodes)."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # torchrun would pin every process to 1 thread
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.nproc))
    code = subprocess.call(torchrun_command(cfg, module), env=env)
    if code:
        raise SystemExit(code)  # the failing rank printed its error
    return f"{cfg.nproc} process(es) x {cfg.nnodes} node(s) ({cfg.parallel}) done"


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


def peak_host_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# ------------------------------------------------------------------ wrapping the model

@dataclass
class Prepared:
    """The model as the training step calls it, its masks, and how to skip the gradient sync of a
    micro-batch that is not the step's last on this process."""

    net: torch.nn.Module
    masks: MaskSet
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None


@contextlib.contextmanager
def _fsdp_no_sync(net) -> Iterator[None]:
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing of every block: transformers' own, switched on per block.

    ``learn`` keeps the model in eval mode (dropout off, as the authors train), and transformers only
    checkpoints a layer in training mode: the blocks alone are marked training, not their submodules,
    whose dropout stays off."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise NMError(f"learn.activation_checkpointing: {type(model).__name__} is no transformers model; "
                      "set it to false")
    model.eval()
    for block in find_blocks(model)[1]:
        block.training = True  # the flag transformers reads; children keep eval (no dropout)


def prepare(model: torch.nn.Module, priors, cfg: Learn, sp: Sparsity, d: Dist, device: str,
            fill: Callable[[str], None] | None = None) -> Prepared:
    """Masks attached, the model sharded (FSDP) or wrapped (DDP) for ``learn.parallel``.

    ``fill(prefix)``: for a model built on the meta device, reads the parameters under ``prefix``
    from the checkpoint (FSDP: block by block, each sharded once its masks exist)."""
    strength = cfg.prior_strength if priors is not None else 0.0
    fsdp = cfg.parallel == "fsdp" and d.world > 1
    on_block = before_block = None
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(torch.device(device).type, (d.world,))
        prefix, blocks = find_blocks(model)

        def on_block(b: int) -> None:
            fully_shard(blocks[b], mesh=mesh)

        if fill is not None:
            def before_block(b: int) -> None:
                fill(f"{prefix}.{b}.")
    elif fill is not None:
        fill("")
    if fill is not None and fsdp:
        fill(None)  # everything outside the blocks (embeddings, final norm, LM head)
    masks = attach_masks(model, sp.n, sp.m, priors=priors, prior_strength=strength, seed=cfg.seed,
                         ignore=sp.ignore, on_block=on_block, before_block=before_block)
    if before_block is not None:  # a block left wholly dense (sparsity.ignore) got no masks: read it now
        for b, block in enumerate(blocks):
            if any(p.is_meta for p in block.parameters()):
                before_block(b)
                on_block(b)
    masks.recompute_weights = cfg.recompute_masked_weights
    if cfg.activation_checkpointing:  # recompute each block in backward: the noise is keyed, so the same masks
        checkpoint_blocks(model)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=mesh)
        masks.reset_diagnostics()
        masks.recompute_weights = False  # a recipe would read unsharded weights that FSDP frees after the forward
        return Prepared(model, masks, lambda: _fsdp_no_sync(model))
    model.to(device)
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
        return Prepared(net, masks, net.no_sync)
    return Prepared(model, masks)

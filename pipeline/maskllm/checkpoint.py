"""Resumable, sharded checkpoints of a ``learn`` run (``torch.distributed.checkpoint``).

The logits (the only trainable parameters) and AdamW's state go through DCP (each rank writes its own
shard) into a temporary folder renamed as a whole once complete, so a killed run never leaves a half
checkpoint that is loaded; a checkpoint written by N ranks loads on any other number of ranks.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.io import atomic_path
from pipeline.maskllm.distributed import Dist
from pipeline.maskllm.masks import MaskSet


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

"""Masks on disk: safetensors (ours), packed ``.npz`` (the MaskLLM authors'), sparse HF checkpoints.

A mask is keyed by its parameter name (``model.layers.0.mlp.up_proj.weight``) and shaped
like the stored parameter (GPT-2 ``Conv1D``: ``[in, out]``; fused experts 3-D, e.g. Mixtral's
``model.layers.0.mlp.experts.gate_up_proj`` ``[E, 2I, H]``, GPT-OSS's ``[E, H, 2I]``). Every
writer goes through a temporary path in the target directory and renames at the end, so a
killed run leaves no half-written file.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.io import atomic_dir, atomic_path

PACKED_SUFFIX = ".mask"  # the authors' npz keys: "<parameter name>.mask"


def save_masks(path: str | Path, masks: dict[str, torch.Tensor]) -> None:
    """Write masks as uint8 safetensors: {parameter name: 0/1 tensor shaped like the parameter}."""
    tensors = {name: mask.detach().to("cpu", torch.uint8).contiguous() for name, mask in sorted(masks.items())}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "nm-masks"})


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Read masks written by ``save_masks`` -> {parameter name: bool tensor}."""
    return {name: mask.bool() for name, mask in load_file(str(path)).items()}


class LazyMasks(Mapping):
    """``load_masks`` one mask at a time: a mask is read when it is looked up (a rank that holds one
    block at a time holds one block's prior masks at a time)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = str(path)
        with safe_open(self.path, framework="pt") as f:
            self._names = list(f.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._names:
            raise KeyError(name)
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(name).bool()

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _checked_params(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's tensors for every mask name; a missing or mis-shaped name raises, naming it."""
    state = model.state_dict(keep_vars=True)
    for name, mask in masks.items():
        if name not in state:
            raise ValueError(f"mask {name!r}: {type(model).__name__} has no parameter of that name")
        if tuple(mask.shape) != tuple(state[name].shape):
            raise ValueError(
                f"mask {name!r}: shape {tuple(mask.shape)} does not match the parameter's {tuple(state[name].shape)}"
            )
    return {name: state[name] for name in masks}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place (to +0.0) for every parameter name in ``masks``."""
    for name, param in _checked_params(model, masks).items():
        # masked_fill, not W *= mask: a pruned negative weight times 0 is -0.0, which 2:4 packers
        # and serving stacks that test bit patterns do not read as a zero.
        param.masked_fill_(~masks[name].to(param.device, torch.bool), 0.0)


def export_packed_npz(path: str | Path, masks: dict[str, torch.Tensor]) -> None:
    """The authors' released format: ``np.savez_compressed`` of ``{name + ".mask": np.packbits(mask.flatten())}``.

    Only the bits are stored, not the shapes: importing needs the model's parameter shapes.
    """
    arrays = {
        name + PACKED_SUFFIX: np.packbits(mask.detach().cpu().bool().numpy().ravel()) for name, mask in masks.items()
    }

    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: savez would append ".npz" to a bare path
        np.savez_compressed(f, **arrays)


def import_packed_npz(path: str | Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Read an authors'-format ``.npz``; ``shapes`` = {parameter name: shape}, e.g. from ``model.state_dict()``."""
    masks = {}
    with np.load(path) as packed:
        for key in packed.files:
            name = key[: -len(PACKED_SUFFIX)] if key.endswith(PACKED_SUFFIX) else key
            if name not in shapes:
                raise ValueError(f"{path}: mask {key!r} names no parameter of the model")
            shape = tuple(shapes[name])
            bits = packed[key]
            if bits.size != math.ceil(math.prod(shape) / 8):
                raise ValueError(f"{path}: mask {key!r} holds {bits.size} bytes, not the packed size of shape {shape}")
            masks[name] = torch.from_numpy(np.unpackbits(bits, count=math.prod(shape)).reshape(shape).astype(bool))
    return masks


@torch.no_grad()
def export_sparse_checkpoint(
    model: nn.Module, masks: dict[str, torch.Tensor], out_dir: str | Path, tokenizer=None
) -> None:
    """``save_pretrained`` with the pruned weights +0.0 (the model itself is left untouched).

    Pruned entries are set by the mask, never ``W * mask`` (-0.0 for a negative weight); a kept
    weight that is itself 0.0 (dequantised 4-bit weights) stays, so a group may hold more zeros
    than M - N: the mask, not the zeros, says which weights were pruned.
    """
    params = _checked_params(model, masks)
    state = model.state_dict()
    for name, param in params.items():
        state[name] = torch.where(masks[name].to(param.device, torch.bool), param.detach(), 0.0)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def save_weights(path: str | Path, weights: dict[str, torch.Tensor]) -> None:
    """Updated weights (SparseGPT's OBS update) as safetensors keyed by parameter name."""
    tensors = {name: w.detach().to("cpu").contiguous() for name, w in sorted(weights.items())}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "weights"})


@torch.no_grad()
def load_weights(model: nn.Module, path: str | Path) -> None:
    """Copy saved weights into the model's parameters of the same names (checked)."""
    weights = load_file(str(path))
    for name, param in _checked_params(model, weights).items():
        param.copy_(weights[name].to(param.device, param.dtype))

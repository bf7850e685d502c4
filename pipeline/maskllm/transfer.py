"""A mask file as MaskLLM's prior (``learn.prior: file``): transfer of a learned general mask.

MaskLLM's transfer recipe (MASKLLM.md): a mask learned on general text initialises the
logits of a new run on a downstream domain, the same way a one-shot prior does
(``alpha * kappa`` on the candidates that agree with it). This module writes such a mask
with its provenance and reads one back for the learn stage:

    python -m pipeline.maskllm.transfer export masks/general.safetensors   # the hardened mask of the workspace
    dvc add masks/general.safetensors
    dvc exp run -S data.source=shakespeare -S learn.prior=file -S learn.prior_file=masks/general.safetensors

Accepted files: our safetensors masks (``harden``, ``prior@<method>``, or an export of them)
and the MaskLLM authors' released packed ``.npz``. A mask learned for other dense weights
is a silent mistake (same shapes, meaningless prior), so an export records the dense
model's fingerprint and the learn stage refuses a file made for another model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.io import atomic_path, sha256_files
from pipeline.model.masks_io import import_packed_npz, load_masks
from pipeline.model.nm import NMError, block_weights, check_nm, find_prunable_layers

FORMAT = "nm-masks"
DENSE_WEIGHTS = "model.safetensors"


class PriorFileError(ValueError):
    """learn.prior_file cannot be used as the prior of this model (message names file and fix)."""


def dense_fingerprint(dense_dir: str | Path) -> str:
    """sha256 (first 16 hex) of the dense stage's weights file: which model a mask was made for."""
    return sha256_files(Path(dense_dir) / DENSE_WEIGHTS)[:16]


def read_metadata(path: str | Path) -> dict[str, str]:
    """The provenance stored in a safetensors mask's header ({} for an .npz or a bare file)."""
    if Path(path).suffix != ".safetensors":
        return {}
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def export_mask(src: str | Path, out: str | Path, *, dense_dir: str | Path, n: int, m: int,
                learned_on: str, method: str, params_hash: str) -> dict[str, str]:
    """Copy the mask file ``src`` to ``out`` with its provenance in the safetensors header."""
    masks = load_masks(src)
    meta = {"format": FORMAT, "n": str(n), "m": str(m), "dense_sha256": dense_fingerprint(dense_dir),
            "learned_on": learned_on, "method": method, "params_hash": params_hash,
            "source_file": str(src)}
    tensors = {k: v.to(torch.uint8).contiguous() for k, v in sorted(masks.items())}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return meta


def load_prior_file(path: str | Path, model, n: int, m: int, dense_dir: str | Path,
                    ignore=()) -> tuple[dict, dict]:
    """The masks of ``learn.prior_file`` for ``model`` -> ({param name: bool mask}, provenance).

    Checks, naming the file: it exists and is a mask format, its N:M (when recorded) is
    ``sparsity``, it names no parameter that is not an N:M target of the model, it has a
    mask for every target not named by ``ignore`` (``sparsity.ignore``), every mask has its
    parameter's shape (fused experts: ``[E, out, in]`` or as stored) and is exactly N:M
    along the input dim, and it was made for these dense weights (when recorded).
    """
    path = Path(path)
    if not path.is_file():
        raise PriorFileError(f"learn.prior_file={str(path)!r} does not exist: export a mask first "
                             "(python -m pipeline.maskllm.transfer export <file>) or fix the path")
    layers = {layer.param_name: layer for layer in block_weights(model).targets}
    wanted = [layer.param_name for layer in find_prunable_layers(model, m, ignore)]
    if path.suffix == ".npz":  # the MaskLLM authors' packed format: shapes come from the model
        masks = import_packed_npz(path, {k: tuple(v.param().shape) for k, v in layers.items()})
        meta = {}
    elif path.suffix == ".safetensors":
        masks, meta = load_masks(path), read_metadata(path)
    else:
        raise PriorFileError(f"learn.prior_file={str(path)!r}: expected a .safetensors mask (ours) or "
                             "an .npz (the MaskLLM authors' packed masks)")
    extra = sorted(set(masks) - set(layers))
    if extra:
        raise PriorFileError(f"learn.prior_file={str(path)!r} has masks for {len(extra)} parameter(s) that are "
                             f"no prunable layer of this model, e.g. {extra[0]!r}: was it made for another model?")
    if "n" in meta and (int(meta["n"]), int(meta["m"])) != (n, m):
        raise PriorFileError(f"learn.prior_file={str(path)!r} is a {meta['n']}:{meta['m']} mask but "
                             f"sparsity is {n}:{m}: set sparsity.n/m to match or export a {n}:{m} mask")
    missing = [name for name in wanted if name not in masks]
    if missing:
        raise PriorFileError(f"learn.prior_file={str(path)!r} has no mask for {len(missing)} N:M target(s) of this "
                             f"model, e.g. {missing[0]!r}: export a mask that covers them, or leave them dense "
                             "with sparsity.ignore")
    for name, mask in masks.items():
        layer = layers[name]
        if tuple(mask.shape) != tuple(layer.param().shape):
            raise PriorFileError(f"learn.prior_file={str(path)!r}: mask {name!r} has shape {tuple(mask.shape)}, "
                                 f"the parameter {tuple(layer.param().shape)}: was it made for another model?")
        try:
            check_nm(layer.logical(mask), n, m, name)
        except NMError as e:
            raise PriorFileError(f"learn.prior_file={str(path)!r}: {e} (not a {n}:{m} mask)") from None
    if "dense_sha256" in meta:
        here = dense_fingerprint(dense_dir)
        if meta["dense_sha256"] != here:
            raise PriorFileError(
                f"learn.prior_file={str(path)!r} was made for other dense weights (fingerprint "
                f"{meta['dense_sha256']}, this pipeline's {here}): a mask only transfers to the model it was "
                "learned on. With model.source=tiny the dense model is retrained on each data.source; "
                "use a fixed model (smollm2 or hf) or export the mask from this model")
    return masks, meta


def _export_cli(args) -> None:
    from pipeline.config import load_params_or_exit
    from pipeline.records.ledger import params_hash

    params = load_params_or_exit()
    src = Path(args.source)
    if not src.is_file():
        raise SystemExit(f"error: {src} does not exist: run `dvc repro harden` first (or pass --from)")
    method = "maskllm" if src.parts[:2] == ("artifacts", "harden") else src.parent.name
    meta = export_mask(src, args.out, dense_dir=args.dense, n=params.sparsity.n, m=params.sparsity.m,
                       learned_on=params.data.source, method=method, params_hash=params_hash(params))
    print(f"[transfer] {args.out}: {method} {meta['n']}:{meta['m']} mask learned on {meta['learned_on']} "
          f"(dense {meta['dense_sha256']}); use it with -S learn.prior=file -S learn.prior_file={args.out}")
    if args.json:
        print(json.dumps(meta, indent=1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.maskllm.transfer", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write a mask file with its provenance, for learn.prior=file")
    ex.add_argument("out", help="e.g. masks/general.safetensors")
    ex.add_argument("--from", dest="source", default="artifacts/harden/mask.safetensors",
                    help="mask to export (default: the hardened MaskLLM mask of the workspace)")
    ex.add_argument("--dense", default="artifacts/dense", help="the dense stage's output folder")
    ex.add_argument("--json", action="store_true", help="also print the provenance")
    args = ap.parse_args(argv)
    _export_cli(args)


if __name__ == "__main__":
    sys.exit(main())

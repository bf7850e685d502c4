"""How much of a model a set of N:M masks covers, and a check that nothing was left dense by accident.

The issue this answers: with transformers 5, MoE experts are fused 3-D parameters, not
nn.Linear, so a discovery that only knew nn.Linear masked 11 % of a Mixtral's block
weights while every stage said "2:4". Here every weight matrix in the transformer blocks
is accounted for: under an exact N:M mask (covered), named by ``sparsity.ignore``
(ignored), a router / gate (dense by design, see ``pipeline.model.nm``), or **uncovered**,
which :func:`check_coverage` turns into an error naming the parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.model.nm import NMError, block_weights, check_nm, stored_parameters


@dataclass(frozen=True)
class Coverage:
    """Coverage of one mask set: counts in weights (elements), names of the block weight matrices by status."""

    n: int
    m: int
    block_weights: int  # elements of every weight matrix inside the transformer blocks
    nm_weights: int  # of those, under an exact N:M mask
    target_weights: int  # of those, the ones meant to be N:M: not a gate, not ignored (or masked anyway)
    model_params: int  # every parameter of the model (tied ones once)
    pruned: int  # weights the masks remove
    covered: tuple[str, ...]
    ignored: tuple[str, ...]  # named by sparsity.ignore, no mask
    gates: tuple[str, ...]  # routers / gates: dense by design
    uncovered: tuple[str, ...]  # dense, and neither ignored nor a gate: an error

    @property
    def nm_fraction(self) -> float:
        """Fraction of the block weights under N:M."""
        return self.nm_weights / self.block_weights if self.block_weights else 0.0

    @property
    def target_fraction(self) -> float:
        """Fraction of the weights meant to be N:M (not gates, not ignored) that are: 1.0 unless any is uncovered."""
        return self.nm_weights / self.target_weights if self.target_weights else 1.0

    @property
    def model_sparsity(self) -> float:
        """Fraction of all the model's parameters that the masks prune."""
        return self.pruned / self.model_params if self.model_params else 0.0

    def as_dict(self, names: bool = True) -> dict:
        """JSON-ready: the figures, and the dense weights by name (``names=False``: their counts, for DVC metrics)."""
        listed = {key: list(value) if names else len(value)
                  for key, value in (("ignored", self.ignored), ("gates", self.gates), ("uncovered", self.uncovered))}
        return {"nm_fraction": self.nm_fraction, "target_fraction": self.target_fraction,
                "model_sparsity": self.model_sparsity, "block_weights": self.block_weights,
                "nm_weights": self.nm_weights, "target_weights": self.target_weights,
                "model_params": self.model_params, "pruned": self.pruned, "covered": len(self.covered), **listed}

    def metrics(self, prefix: str = "coverage") -> dict[str, float]:
        """The figures alone, flat (MLflow metrics)."""
        return {f"{prefix}.nm_fraction": self.nm_fraction, f"{prefix}.target_fraction": self.target_fraction,
                f"{prefix}.model_sparsity": self.model_sparsity, f"{prefix}.uncovered": float(len(self.uncovered))}

    def summary(self) -> str:
        """One line for a stage summary."""
        dense = [f"{len(self.gates)} gate(s)"] if self.gates else []
        dense += [f"{len(self.ignored)} ignored"] if self.ignored else []
        dense += [f"{len(self.uncovered)} UNCOVERED"] if self.uncovered else []
        return (f"{self.n}:{self.m} on {100 * self.nm_fraction:.1f} % of block weights"
                + (f" ({100 * self.target_fraction:.1f} % of the targets; dense: {', '.join(dense)})" if dense else "")
                + f", model sparsity {100 * self.model_sparsity:.1f} %")


def measure_coverage(model: nn.Module, masks: dict[str, torch.Tensor], n: int, m: int, ignore=()) -> Coverage:
    """Coverage of ``masks`` ({parameter name: bool mask shaped like the parameter}) on ``model``.

    Every mask must be an N:M target of the model and exactly N:M along its input dim
    (raises, naming it, otherwise). ``ignore``: the ``sparsity.ignore`` patterns.
    """
    weights = block_weights(model)
    targets = {layer.param_name: layer for layer in weights.targets}
    ignored = weights.ignored_by(ignore)
    stray = sorted(set(masks) - set(targets))
    if stray:
        raise NMError(f"{len(stray)} mask(s) for parameters that are no N:M target of {type(model).__name__}, "
                      f"e.g. {stray[0]!r}")
    pruned = 0
    for name, mask in masks.items():
        layer = targets[name]
        if tuple(mask.shape) != tuple(layer.param().shape):
            raise NMError(f"{name}: mask shape {tuple(mask.shape)} is not the parameter's {tuple(layer.param().shape)}")
        check_nm(layer.logical(mask), n, m, name)
        pruned += int((~mask.bool()).sum())
    names = weights.names()
    covered = tuple(name for name in names if name in masks)
    gates = tuple(name for name in names if name in weights.gates and name not in masks)
    dense = [name for name in names if name not in masks and name not in weights.gates]
    ignored_dense = tuple(name for name in dense if name in ignored)
    return Coverage(
        n, m,
        block_weights=sum(weights.numel.values()),
        nm_weights=sum(weights.numel[name] for name in covered),
        target_weights=sum(weights.numel[name] for name in names if name not in gates and name not in ignored_dense),
        model_params=sum(param.numel() for *_, param in stored_parameters(model)),
        pruned=pruned,
        covered=covered,
        ignored=ignored_dense,
        gates=gates,
        uncovered=tuple(name for name in dense if name not in ignored),
    )


def check_coverage(coverage: Coverage) -> None:
    """Raise, naming them, if block weights were left dense that ``sparsity.ignore`` does not name."""
    if coverage.uncovered:
        shown = ", ".join(coverage.uncovered[:8]) + (", ..." if len(coverage.uncovered) > 8 else "")
        raise NMError(f"N:M coverage: {len(coverage.uncovered)} weight matrices inside the transformer blocks have "
                      f"no {coverage.n}:{coverage.m} mask and are not named by sparsity.ignore: {shown} "
                      f"({100 * coverage.nm_fraction:.1f} % of block weights covered). Prune them, or leave them "
                      "dense on purpose with a pattern in sparsity.ignore")

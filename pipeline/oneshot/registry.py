"""The one-shot methods, one entry each: what config validation, the rows, the figures, the memory plan
and the pruning driver know about a method; and the comparison's rows (``comparison``). Torch-free, so
that what only names methods (params validation, tables, figures) does not load torch.

A method is a module of ``pipeline/oneshot/`` with one function,

    prune_layers(layers: [(W [out, in], InputStats), ...], n, m, options: Options)
        -> [(keep bool [out, in], W' [out, in]), ...]

(W' = W with the pruned weights zeroed, or SparseGPT's updated weights; ``InputStats`` holds the
``statistics`` the entry asks for), plus its entry below; an optional ``check(n, m, options)``
rejects settings before any work.
``docs/development.md`` walks through adding one. ``pipeline.oneshot.prune`` calibrates block by
block, collects the ``statistics`` an entry asks for, and calls the module.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    """The prior.* settings a method may read (SparseGPT's)."""

    percdamp: float = 0.01  # dampening, a fraction of the mean Hessian diagonal
    blocksize: int = 128  # columns per lazy-update block


@dataclass(frozen=True)
class Row:
    """One row of the comparison that a method adds: its mask, with the method's updated weights or the dense ones."""

    name: str
    label: str
    colour: str
    updated_weights: bool = False  # evaluate the method's updated weights (else the dense weights under its mask)


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    module: str  # the module holding prune_layers
    # per-layer input statistics the calibration pass collects: "norms" (||X_j||^2 per input j),
    # "hessian" (2 X^T X / nsamples); none: no calibration pass (magnitude)
    statistics: frozenset[str]
    rows: tuple[Row, ...]
    # the method writes new weights (SparseGPT's OBS update): they are saved next to its mask
    updates_weights: bool = False
    # every block calibrated on the dense model's activations and the masks applied at the end
    # (the MaskLLM authors' prior), instead of on the outputs of the blocks pruned before it
    dense_inputs: bool = False
    # each output row is scored on its own, so layers fed the same input (q/k/v) may be pruned as one
    # stacked matrix; False for a score that reads a whole layer (RIA's column sums)
    rows_independent: bool = True
    paper: str = ""  # the reference, for the citation block


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("magnitude", "magnitude", "pipeline.oneshot.magnitude", frozenset(),
           (Row("magnitude", "magnitude", "#95a5a6"),)),
    Method("wanda", "Wanda", "pipeline.oneshot.wanda", frozenset({"norms"}),
           (Row("wanda", "Wanda", "#2980b9"),),
           paper="Sun et al., A Simple and Effective Pruning Approach for Large Language Models, ICLR 2024"),
    Method("sparsegpt", "SparseGPT", "pipeline.oneshot.sparsegpt", frozenset({"hessian"}),
           (Row("sparsegpt", "SparseGPT", "#2c3e50", updated_weights=True),
            Row("sparsegpt_maskonly", "SparseGPT mask only", "#7f8c8d")),
           updates_weights=True,
           paper="Frantar & Alistarh, SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot, "
                 "ICML 2023"),
    Method("sparsegpt_noupdate", "SparseGPT, no update (MaskLLM prior)", "pipeline.oneshot.sparsegpt_noupdate",
           frozenset({"hessian"}), (Row("sparsegpt_noupdate", "SparseGPT, no update (MaskLLM prior)", "#8e44ad"),),
           dense_inputs=True,
           paper="Fang et al., MaskLLM: Learnable Semi-Structured Sparsity for Large Language Models, NeurIPS 2024"),
    Method("ria", "RIA", "pipeline.oneshot.ria", frozenset({"norms"}), (Row("ria", "RIA", "#16a085"),),
           rows_independent=False,  # its column sums read a whole layer: q, k and v are scored apart
           paper="Zhang et al., Plug-and-Play: An Efficient Post-training Pruning Method for Large Language "
                 "Models, ICLR 2024"),
)}


def get(name: str) -> Method:
    """The entry of a method, or an error naming the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown one-shot method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def rows() -> tuple[Row, ...]:
    """Every row the one-shot methods add, in registry order."""
    return tuple(row for method in METHODS.values() for row in method.rows)


# the two rows of the comparison that no one-shot method adds: the model before pruning and MaskLLM's mask
DENSE = Row("dense", "dense", "#27ae60")
MASKLLM = Row("maskllm", "MaskLLM", "#c0392b")


def comparison() -> tuple[Row, ...]:
    """Every row of the comparison, in table order: dense, the one-shot methods' rows, MaskLLM."""
    return (DENSE, *rows(), MASKLLM)


def method_of_row(row: str) -> Method:
    """The method whose mask a one-shot row evaluates."""
    for method in METHODS.values():
        if any(r.name == row for r in method.rows):
            return method
    raise ValueError(f"{row!r} is no one-shot row; one of {', '.join(r.name for r in rows())}")

"""The results of the current pipeline state, read from its metrics files (what `dvc repro` wrote):
perplexities, zero-shot results, the best one-shot row and the gap MaskLLM closes. Pure readers:
the plot stage depends on this module and nothing of MLflow's."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import zeroshot_leaves
from pipeline.rows import ROWS

# every row that prunes in one shot (magnitude, Wanda, SparseGPT and its variants): the rows
# MaskLLM has to beat; a row added to ROWS joins them
ONE_SHOT = tuple(r for r in ROWS if r not in ("dense", "maskllm"))


def read_ppl(metrics: Path, domains: list[str]) -> dict[str, dict[str, float]]:
    """PPL of every row on every domain that has a metrics file -> {row: {domain: ppl}}."""
    return {r: {d: json.loads(f.read_text())["ppl"] for d in domains if (f := metrics / r / f"{d}.json").is_file()}
            for r in ROWS}


def read_zeroshot(metrics: Path, tasks: list[str], domains: list[str] = ()) -> dict[str, dict[str, dict]]:
    """Zero-shot results of every row -> {row: {lm-eval task: {metrics, stderr, examples, chance, ...}}},
    tasks in the order of ``tasks`` (evaluate.zeroshot_tasks), ``lastword`` in the order of ``domains``."""
    order = {leaf: i for i, leaf in enumerate(leaf for t in tasks for leaf in zeroshot_leaves(t, list(domains)))}
    out = {}
    for r in ROWS:
        for t in tasks:
            f = metrics / r / "zeroshot" / f"{t}.json"
            if f.is_file():
                out.setdefault(r, {}).update(json.loads(f.read_text())["results"])
    return {r: dict(sorted(res.items(), key=lambda kv: order.get(kv[0], len(order)))) for r, res in out.items()}


def best_one_shot(ppl: dict[str, float]) -> str | None:
    """The one-shot row with the lowest PPL (of those in ``ppl``)."""
    rows = [r for r in ONE_SHOT if r in ppl]
    return min(rows, key=lambda r: ppl[r]) if rows else None


def gap_closed(ppl: dict[str, float]) -> tuple[float, str] | None:
    """(PPL_best - PPL_MaskLLM) / (PPL_best - PPL_dense) with best = the best one-shot row -> (gap, best)."""
    best = best_one_shot(ppl)
    if best is None or not {"dense", "maskllm"} <= set(ppl):
        return None
    return (ppl[best] - ppl["maskllm"]) / (ppl[best] - ppl["dense"]), best

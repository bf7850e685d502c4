"""The one reader of the metrics files the stages write (``metrics/``): perplexities, zero-shot results
and the stages' own figures, as typed records and as one state's flat metrics; the best one-shot row
and the gap MaskLLM closes. Torch-free and MLflow-free: the plot stage and the report use it too."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import zeroshot_leaves
from pipeline.evaluation.rows import ONE_SHOT, ROWS

METRICS = Path("metrics")


@dataclass(frozen=True)
class MetricsFile:
    """One metrics file: ``kind`` ppl (``row`` on ``domain``'s test split), validation (``row`` on the
    training corpus's validation split), zeroshot (``row`` on a task entry) or stage (a stage's own
    figures: ``stage`` prior@<method>, learn, harden); ``data`` its content."""

    kind: str
    path: Path
    data: dict
    row: str = ""
    domain: str = ""
    task: str = ""
    stage: str = ""


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def read_files(params, root: Path = METRICS) -> list[MetricsFile]:
    """Every metrics file of the current state (those that exist), in row, domain, task order."""
    out = []
    for row in ROWS:
        for domain in params.evaluate.domains:
            f = root / row / f"{domain}.json"
            if f.is_file():
                out.append(MetricsFile("ppl", f, _load(f), row=row, domain=domain))
        f = root / row / "validation" / f"{params.data.source}.json"
        if row in params.evaluate.validation_rows and f.is_file():
            out.append(MetricsFile("validation", f, _load(f), row=row, domain=params.data.source))
        for task in params.evaluate.zeroshot_tasks:
            f = root / row / "zeroshot" / f"{task}.json"
            if f.is_file():
                out.append(MetricsFile("zeroshot", f, _load(f), row=row, task=task))
    stages = {f"prior@{m}": root / "prior" / f"{m}.json" for m in params.prior.methods}
    stages |= {"learn": root / "learn.json", "harden": root / "harden.json"}
    out += [MetricsFile("stage", f, _load(f), stage=s) for s, f in stages.items() if f.is_file()]
    return out


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def stage_figures(f: MetricsFile) -> dict[str, float]:
    """A stage file's numbers, flat: its own and its coverage's (``coverage.nm_fraction``)."""
    return {**_numbers(f.data), **_numbers(f.data.get("coverage", {}), "coverage.")}


def zeroshot_values(result: dict) -> dict[str, float]:
    """One lm-eval task's metrics and their standard errors (``acc``, ``acc_stderr``)."""
    return {**result["metrics"], **{f"{k}_stderr": v for k, v in result["stderr"].items() if v is not None}}


def flat(files: list[MetricsFile]) -> dict[str, float]:
    """A state's results as flat metrics (the ledger's): ``ppl.<row>.<domain>`` (test),
    ``validation_ppl.<row>.<domain>``, ``zeroshot.<row>.<task>.<metric>``, ``coverage.<stage>.<figure>``
    (stage with ``.`` for ``@``) and the learn stage's ``learn.<figure>`` (final CE, seconds, ...)."""
    out = {}
    for f in files:
        if f.kind == "ppl":
            out[f"ppl.{f.row}.{f.domain}"] = f.data["ppl"]
        elif f.kind == "validation":
            out[f"validation_ppl.{f.row}.{f.domain}"] = f.data["ppl"]
        elif f.kind == "zeroshot":
            for task, r in f.data["results"].items():
                out.update({f"zeroshot.{f.row}.{task}.{k}": v for k, v in zeroshot_values(r).items()})
        else:
            values = stage_figures(f)
            if f.stage == "learn":
                out.update({f"learn.{k}": v for k, v in values.items() if not k.startswith("coverage.")})
            out.update({f"coverage.{f.stage.replace('@', '.')}.{k}": values[f"coverage.{k}"]
                        for k in ("nm_fraction", "target_fraction", "model_sparsity", "uncovered")
                        if f"coverage.{k}" in values})
    return out


def read_ppl(root: Path, domains: list[str]) -> dict[str, dict[str, float]]:
    """PPL of every row on every domain that has a metrics file -> {row: {domain: ppl}}."""
    return {r: {d: _load(f)["ppl"] for d in domains if (f := root / r / f"{d}.json").is_file()} for r in ROWS}


def read_zeroshot(root: Path, tasks: list[str], domains: list[str] = ()) -> dict[str, dict[str, dict]]:
    """Zero-shot results of every row -> {row: {lm-eval task: {metrics, stderr, examples, chance, ...}}},
    tasks in the order of ``tasks`` (evaluate.zeroshot_tasks), ``lastword`` in the order of ``domains``."""
    order = {leaf: i for i, leaf in enumerate(leaf for t in tasks for leaf in zeroshot_leaves(t, list(domains)))}
    out = {}
    for r in ROWS:
        for t in tasks:
            f = root / r / "zeroshot" / f"{t}.json"
            if f.is_file():
                out.setdefault(r, {}).update(_load(f)["results"])
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

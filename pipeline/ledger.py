"""The ledger: every pipeline state MLflow holds, committed to git (``plots/states.json``).

MLflow's store (``mlflow.db``) is local and git-ignored, so a fresh clone starts with an empty
one; the sweep, seed and transfer figures that ``track`` draws from the pipeline states
(pipeline/sweeps.py) would then lose every state not rerun in that clone, and the README would
point at figures nobody can redraw. The ledger is the committed record of each state: its
parent run's params, its results (metrics) and its identity tags. ``track`` restores into MLflow
the states the store lacks, then writes back every state the store holds, so the record, the
figures and the MLflow UI survive a clone.

A state keeps the id it was first logged under (``ledger_id`` on a restored run), so restoring
and writing back is a fixed point: an unchanged store rewrites the ledger byte for byte.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.io import atomic_path

LEDGER = Path("plots/states.json")
VERSION = 1
ROLE = "pipeline"


class LedgerError(ValueError):
    pass


def state_id(run) -> str:
    return run.data.tags.get("ledger_id") or run.info.run_id


def entry(run, experiment: str) -> dict:
    """A parent run as a ledger entry (MLflow's own ``mlflow.*`` tags stay out: the store sets them)."""
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") and k != "ledger_id"}
    return {"id": state_id(run), "experiment": experiment, "run_name": run.info.run_name,
            "start_time": run.info.start_time, "end_time": run.info.end_time, "status": run.info.status,
            "tags": dict(sorted(tags.items())), "params": dict(sorted(run.data.params.items())),
            "metrics": {k: v for k, v in sorted(run.data.metrics.items()) if math.isfinite(v)}}


def _order(entries) -> list[dict]:
    return sorted(entries, key=lambda e: (e["experiment"], e["start_time"] or 0, e["id"]))


def read(path: Path = LEDGER) -> list[dict]:
    """The ledger's entries; none when the file does not exist yet."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LedgerError(f"{path}: not valid JSON ({e}); restore it with `git checkout -- {path}`") from e
    if not isinstance(raw, dict) or raw.get("version") != VERSION or not isinstance(raw.get("states"), list):
        raise LedgerError(f"{path}: expected {{'version': {VERSION}, 'states': [...]}}; "
                          f"restore it with `git checkout -- {path}`")
    for i, e in enumerate(raw["states"]):
        missing = {"id", "experiment", "start_time", "tags", "params", "metrics"} - set(e)
        if missing:
            raise LedgerError(f"{path}: state {i} lacks {sorted(missing)}; restore it with `git checkout -- {path}`")
    return raw["states"]


def write(entries, path: Path = LEDGER) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"version": VERSION, "states": _order(entries)}, indent=1) + "\n")


def parents(c) -> dict[str, list]:
    """{experiment name: its pipeline parent runs} across the whole store."""
    out = {}
    for exp in c.search_experiments():
        runs = c.search_runs([exp.experiment_id], f"tags.role = '{ROLE}'", max_results=50000)
        if runs:
            out[exp.name] = runs
    return out


def _identity(run_or_tags) -> tuple:
    """What makes two parents one pipeline state (pipeline/tracking.Pipeline.open): params and commit."""
    tags = run_or_tags if isinstance(run_or_tags, dict) else run_or_tags.data.tags
    return tags.get("params_hash"), tags.get("baseline_rev")


def restore(c, entries) -> int:
    """Bring into MLflow every ledger state the store lacks (with its start time, params, metrics
    and tags, under its ledger id); returns how many.

    A state the store already holds under a run of its own, without a ledger id, is merged into
    that run rather than created twice: in a fresh clone, a stage that logs live (``learn``) opens
    the current state's parent before ``track`` restores the ledger, and two parents of one state
    would split its results (the one holds the learn curves, the other the PPLs) and give the
    sweeps and the seed spread a state without results."""
    from pipeline.tracking import _log_params, artifact_location

    runs = {name: list(rs) for name, rs in parents(c).items()}
    held = {state_id(r) for rs in runs.values() for r in rs}
    created = 0
    for e in _order(entries):
        if e["id"] in held:
            continue
        twin = next((r for r in runs.get(e["experiment"], []) if "ledger_id" not in r.data.tags
                     and _identity(r) == _identity(e["tags"]) and None not in _identity(r)), None)
        if twin is not None:
            _merge(c, twin, e)
            runs[e["experiment"]].remove(twin)  # one ledger state per run: a second twin entry gets its own
        else:
            exp = c.get_experiment_by_name(e["experiment"])
            exp_id = exp.experiment_id if exp else c.create_experiment(e["experiment"], artifact_location=artifact_location())
            run = c.create_run(exp_id, start_time=e["start_time"], run_name=e.get("run_name"),
                               tags={**e["tags"], "role": ROLE, "ledger_id": e["id"]})
            _log_params(c, run.info.run_id, e["params"])
            _log_metrics(c, run.info.run_id, e["metrics"], e["start_time"])
            c.set_terminated(run.info.run_id, e.get("status") or "FINISHED", end_time=e.get("end_time"))
        held.add(e["id"])
        created += 1
    return created


def _log_metrics(c, run_id: str, metrics: dict[str, float], timestamp) -> None:
    from mlflow.entities import Metric

    batch = [Metric(k, float(v), timestamp or 0, 0) for k, v in metrics.items()]
    for i in range(0, len(batch), 500):  # MLflow's batch limit
        c.log_batch(run_id, metrics=batch[i:i + 500])


def _merge(c, run, e: dict) -> None:
    """The ledger state ``e`` into ``run``, the same state opened in this store before the ledger was
    restored: the run keeps what it has (its params are this checkout's, its results the newer) and
    takes the ledger's id and whatever else it lacks."""
    from pipeline.tracking import _log_params

    rid = run.info.run_id
    _log_params(c, rid, {k: v for k, v in e["params"].items() if k not in run.data.params})
    _log_metrics(c, rid, {k: v for k, v in e["metrics"].items() if k not in run.data.metrics}, e["start_time"])
    for k, v in {**e["tags"], "ledger_id": e["id"]}.items():
        if k not in run.data.tags or k == "ledger_id":
            c.set_tag(rid, k, v)


def load(c, path: Path = LEDGER) -> int:
    """Restore the ledger's states the store lacks; returns how many."""
    return restore(c, read(path))


def save(c, path: Path = LEDGER) -> int:
    """Write every state the store holds to the ledger (a ledger state the store could not take
    keeps its entry); returns how many states the ledger holds."""
    old = read(path)
    now = {state_id(r): entry(r, name) for name, runs in parents(c).items() for r in runs}
    entries = [*now.values(), *(e for e in old if e["id"] not in now)]
    write(entries, path)
    return len(entries)

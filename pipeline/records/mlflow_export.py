"""MLflow, a one-way export of the ledger (``pipeline.records.ledger``), laid out for the UI.

Nothing here is read back: the ledger is the record, MLflow the view. Layout: one experiment per
``model/dataset/N:M``, declared a model-training experiment (the UI opens on its runs). In it one
**parent run per pipeline state** (tag ``state_id``: the ledger id), named by what the state changed
from the defaults, holding the state's params and results as metrics (``ppl.<row>.<domain>``, ...),
so the compare view puts states side by side. The current state also gets one child run per result:
per (row, domain) the metric ``ppl`` with the evaluation protocol as params (role ``result``), per
(row, lm-eval task) the zero-shot metrics (role ``zeroshot``), per stage its coverage and timings
(role ``stage``), and the MaskLLM ``learn`` child with its per-step curves.

Idempotence: the track stage runs at every ``dvc repro`` and DVC skips cached stages, so the export
looks each run up by its identity tags and creates it only if missing, or if its ``input_hash`` (the
hash of the result it logged) differs. The learn stage logs live (curves while it trains) under the
parent of the state it runs in, and resumes its own run after a kill; the export replays the curve
only when no learn child of the state has it (a cache hit under new params).

The SQLite store path is absolute at the repository root because ``dvc exp run --queue`` runs
stages in temporary copies; writers take a file lock, so ``dvc queue start -j 2`` loses nothing.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import math
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pipeline.io import sha256_files
from pipeline.records import ledger
from pipeline.records.metrics import MetricsFile, stage_figures, zeroshot_values

# MLflow >= 3 opens an experiment on its GenAI overview unless it declares what it is
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, unwritable store)."""


# ------------------------------------------------------------------ where runs go

def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ledger.repo_root() / 'mlflow.db'}"


def artifact_location() -> str | None:
    """Artifacts of the SQLite store live beside it (MLflow's default, ./mlruns of the current
    folder, would be a throw-away copy under ``dvc exp run --queue``); a server decides its own."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail in seconds, naming the fix, instead of after MLflow's minutes of retries."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
                return
        except (urllib.error.URLError, OSError) as e:
            raise TrackingError(
                f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable ({getattr(e, 'reason', e)}). "
                "Start it, or unset MLFLOW_TRACKING_URI to log to the repository's sqlite store; "
                "the DVC outputs and the ledger are written already: rerun `dvc repro` once it is up.") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: folder {folder} is not writable; "
                                "set MLFLOW_TRACKING_URI to a writable store")


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise find-or-create against a SQLite store (parallel queued experiments share it)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    with open(uri[len("sqlite:///"):] + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def client():
    """An MlflowClient on the project's store, checked reachable first."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    uri = tracking_uri()
    check_reachable(uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _log_params(c, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        c.log_batch(run_id, params=items[i:i + 100])


def _log_metrics(c, run_id: str, metrics: dict[str, float], step: int = 0, timestamp: int | None = None) -> None:
    from mlflow.entities import Metric

    ts = timestamp or int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    for i in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[i:i + 500])


def _provenance_params(metrics: dict) -> dict[str, str]:
    return {f"provenance.{k}": str(v) for k, v in metrics.get("provenance", {}).items()}


# ------------------------------------------------------------------ parent runs: one per ledger state

def _experiment(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name, artifact_location=artifact_location(), tags=EXPERIMENT_KIND)
    if exp.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
        c.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND["mlflow.experimentKind"])
    return exp.experiment_id


def _parent(c, exp_id: str, sid: str):
    found = c.search_runs([exp_id], f"tags.role = 'pipeline' and tags.state_id = '{sid}'", max_results=1)
    return found[0] if found else None


def _create_parent(c, exp_id: str, entry: dict):
    run = c.create_run(exp_id, start_time=entry.get("start_time"), run_name=entry.get("run_name"),
                       tags={**entry.get("tags", {}), "role": "pipeline", "state_id": entry["id"]})
    _log_params(c, run.info.run_id, entry.get("params", {}))
    return run


@dataclass
class Parent:
    """The parent run of one state: found by its ledger id, or created."""

    client: object
    experiment_id: str
    run_id: str

    @classmethod
    def of(cls, c, entry: dict) -> "Parent":
        exp_id = _experiment(c, entry["experiment"])
        run = _parent(c, exp_id, entry["id"]) or _create_parent(c, exp_id, entry)
        return cls(c, exp_id, run.info.run_id)

    def children(self, role: str, **tags: str) -> list:
        query = f"tags.mlflow.parentRunId = '{self.run_id}' and tags.role = '{role}'"
        query += "".join(f" and tags.{k} = '{v}'" for k, v in tags.items())
        return self.client.search_runs([self.experiment_id], query, order_by=["attributes.start_time ASC"])

    def new_child(self, role: str, run_name: str, tags: dict[str, str]):
        return self.client.create_run(self.experiment_id, run_name=run_name, tags={
            "mlflow.parentRunId": self.run_id, "role": role, **ledger.dvc_tags(), **tags})


def export_states(c, entries: list[dict]) -> int:
    """Every ledger state as a parent run with its metrics (created where missing, metrics brought up
    to date where they changed); returns how many runs were created or updated."""
    changed, held = 0, {}
    for name in sorted({e["experiment"] for e in entries}):
        exp_id = _experiment(c, name)
        runs = c.search_runs([exp_id], "tags.role = 'pipeline'", max_results=50000)
        held[name] = (exp_id, {r.data.tags.get("state_id"): r for r in runs})
    for entry in entries:
        exp_id, runs = held[entry["experiment"]]
        run = runs.get(entry["id"])
        created = run is None
        if created:
            run = _create_parent(c, exp_id, entry)
        have = {} if created else run.data.metrics
        todo = {k: v for k, v in entry["metrics"].items() if have.get(k) != v}
        tags = {} if created else {k: v for k, v in entry.get("tags", {}).items() if run.data.tags.get(k) != v}
        for k, v in tags.items():
            c.set_tag(run.info.run_id, k, v)
        if todo or created or tags:
            _log_metrics(c, run.info.run_id, todo, timestamp=entry.get("end_time"))
            c.set_terminated(run.info.run_id, entry.get("status") or "FINISHED", end_time=entry.get("end_time"))
            changed += 1
    return changed


# ------------------------------------------------------------------ the learn run (live)

@dataclass
class LearnTracker:
    client: object
    run_id: str

    def log(self, metrics: dict, step: int) -> None:
        _log_metrics(self.client, self.run_id, {k: v for k, v in metrics.items() if k != "step"}, step)

    def finish(self, curve_file: Path) -> None:
        """Mark the run complete: the export then recognises this curve as logged."""
        self.client.set_tag(self.run_id, "curve_hash", sha256_files(curve_file)[:16])
        self.client.log_artifact(self.run_id, str(curve_file))


@contextlib.contextmanager
def learn_run(params, key: str, extra_params: dict | None = None) -> Iterator[LearnTracker]:
    """The learn child of the current state; a killed run (same ``key``) is resumed, not duplicated."""
    c = client()
    entry = {"id": ledger.state_id(params), "experiment": ledger.experiment_of(params),
             "run_name": ledger.state_name(params), "params": ledger.flat_params(params),
             "tags": {"params_hash": ledger.params_hash(params), "baseline_rev": ledger.baseline_rev()}}
    with store_lock(tracking_uri()):
        p = Parent.of(c, entry)
    unfinished = [r for r in p.children("learn", learn_key=key) if r.info.status != "FINISHED"]
    if unfinished:
        run_id = unfinished[-1].info.run_id
        c.update_run(run_id, status="RUNNING")
    else:
        run_id = p.new_child("learn", "maskllm-learn", {"method": "maskllm", "learn_key": key}).info.run_id
        flat = ledger.flat_params(params)
        _log_params(c, run_id, {k: v for k, v in flat.items() if k.startswith(("learn.", "sparsity."))}
                    | {k: str(v) for k, v in (extra_params or {}).items()})
    tracker = LearnTracker(c, run_id)
    try:
        yield tracker
    except BaseException as e:
        c.set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    c.set_terminated(run_id, "FINISHED")
    for r in p.children("learn"):  # a finished learn run of another curve under this state is stale
        if r.info.run_id != run_id and r.info.status == "FINISHED":
            c.delete_run(r.info.run_id)


# ------------------------------------------------------------------ children: the current state's results

@dataclass
class Child:
    """One result as an MLflow child run: ``identity`` tags locate it under its parent."""

    role: str  # "result" (perplexity) | "zeroshot" | "stage"
    name: str
    identity: dict[str, str]
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    input_hash: str  # what the result says: a new one replaces the child


def children_of(f: MetricsFile) -> list[Child]:
    d = f.data
    if f.kind == "validation":
        return [Child("result", f"{f.row} @ {f.domain} validation", {"method": f.row, "domain": f.domain,
                                                                     "split": "validation"}, {"in_domain": "true"},
                      {**d.get("protocol", {}), **_provenance_params(d)},
                      {"ppl": d["ppl"], "nll": d.get("nll", float("nan"))}, sha256_files(f.path)[:16])]
    if f.kind == "ppl":
        return [Child("result", f"{f.row} @ {f.domain}", {"method": f.row, "domain": f.domain, "split": "test"},
                      {"in_domain": str(d.get("protocol", {}).get("in_domain", "")).lower()},
                      {**d.get("protocol", {}), **_provenance_params(d)},
                      {"ppl": d["ppl"], "nll": d.get("nll", float("nan"))}, sha256_files(f.path)[:16])]
    if f.kind == "zeroshot":
        protocol = {k: json.dumps(v) if isinstance(v, (dict, list)) else str(v) for k, v in d["protocol"].items()}
        out = []
        for task, r in d["results"].items():
            params = {**protocol, "harness": d["harness"], "limit": str(d["limit"]), "task_version": str(r["version"]),
                      "examples": str(r["examples"]), "examples_available": str(r["examples_available"]),
                      "output_type": r["output_type"], "chance": str(r["chance"]), **_provenance_params(d)}
            # this task's part of the file: a rerun of another task in the same file keeps this child
            h = hashlib.sha256(json.dumps([d["protocol"], d["harness"], d["limit"], r], sort_keys=True,
                                          default=str).encode()).hexdigest()[:16]
            out.append(Child("zeroshot", f"{f.row} @ {task}", {"method": f.row, "task": task},
                             {"task_group": d["task"]}, params, zeroshot_values(r), h))
        return out
    return [Child("stage", f.stage, {"stage": f.stage}, {}, _provenance_params(d), stage_figures(f),
                  sha256_files(f.path)[:16])]


@dataclass
class ExportReport:
    parent: str
    created: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    kept: int = 0
    states: int = 0


def export(entries: list[dict], current: dict, files: list[MetricsFile], curve_file: Path | None = None,
           artifacts: list[Path] = (), curve_provenance: dict | None = None) -> ExportReport:
    """The ledger's states as parent runs, and the ``current`` state's results as its children."""
    c = client()
    with store_lock(tracking_uri()):
        changed = export_states(c, entries)
        p = Parent.of(c, current)
        report = ExportReport(p.run_id, states=changed)
        children = [ch for f in files for ch in children_of(f)]
        existing: dict[tuple, list] = {}  # one search per role, not one per result
        for role in sorted({ch.role for ch in children}):
            for run in p.children(role):
                key = (role, *sorted((k, run.data.tags.get(k, "")) for k in ("method", "domain", "split", "task", "stage")
                                     if k in run.data.tags))
                existing.setdefault(key, []).append(run)
        for ch in children:
            _sync_child(p, ch, existing.get((ch.role, *sorted(ch.identity.items())), []), report)
        if curve_file is not None and Path(curve_file).is_file():
            _sync_curve(p, Path(curve_file), report, curve_provenance or {})
    for path in artifacts:
        if Path(path).is_file():
            c.log_artifact(p.run_id, str(path))
    return report


def _sync_child(p: Parent, ch: Child, existing: list, report: ExportReport) -> None:
    """Keep the child that logged this very result, else (re)create it; a parent never holds two."""
    c, label = p.client, "@".join(ch.identity.values())
    keep = [e for e in existing if e.data.tags.get("input_hash") == ch.input_hash]
    for e in existing:
        if not keep or e.info.run_id != keep[0].info.run_id:
            c.delete_run(e.info.run_id)
    if keep:
        report.kept += 1
        return
    (report.replaced if existing else report.created).append(label)
    run = p.new_child(ch.role, ch.name, {**ch.identity, **ch.tags, "input_hash": ch.input_hash})
    _log_params(c, run.info.run_id, ch.params)
    _log_metrics(c, run.info.run_id, ch.metrics)
    c.set_terminated(run.info.run_id, "FINISHED")


def _sync_curve(p: Parent, curve_file: Path, report: ExportReport, provenance: dict) -> None:
    """Replay the learn curve into a learn child unless one of this state already has it."""
    h = sha256_files(curve_file)[:16]
    learns = p.children("learn")
    if any(r.data.tags.get("curve_hash") == h for r in learns):
        report.kept += 1
        return
    for r in learns:
        if r.info.status == "FINISHED":
            p.client.delete_run(r.info.run_id)
    run = p.new_child("learn", "maskllm-learn", {"method": "maskllm", "curve_hash": h, "replayed": "true"})
    _log_params(p.client, run.info.run_id, _provenance_params({"provenance": provenance}))
    with open(curve_file) as f:
        for row in csv.DictReader(f):
            step = int(float(row.pop("step")))
            _log_metrics(p.client, run.info.run_id, {k: float(v) for k, v in row.items() if v not in ("", None)}, step)
    p.client.log_artifact(run.info.run_id, str(curve_file))
    p.client.set_terminated(run.info.run_id, "FINISHED")
    report.created.append("maskllm-learn (replayed)")

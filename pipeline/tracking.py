"""MLflow, laid out for comparison, and idempotent under DVC's caching.

Layout: one experiment per ``model/dataset/N:M``. In it, one **parent run per pipeline
state** (code revision + hash of params.yaml), tagged with the DVC experiment names that
produced it; under a parent, one child run per (method, domain) with the metric ``ppl`` and
the evaluation protocol as params (role ``result``), one per (method, lm-eval task) with the
zero-shot metrics and their standard errors (role ``zeroshot``), and the MaskLLM ``learn``
child with its per-step curves. Every run records what produced it as ``provenance.*`` params
(library versions, device, dtype, threads): a child the provenance in its metrics file, a
parent the one of the process that created it.

Idempotence: DVC skips a cached stage, so results are not logged by the stage that computes
them but synced by the track stage (``always_changed``) from the metrics files of the current
state: a child is looked up by (parent, role, identity) and created only if missing or if
its ``input_hash`` (the hash of the result it logged) differs; a stale one is deleted, so a
parent holds exactly one run per result. The learn stage logs live (curves while it trains)
and resumes its own run after a kill; the sync replays the curve only when no learn child of
this state has it (a cache hit under new params).

The SQLite store path is absolute at the repository root because ``dvc exp run --queue``
runs stages in temporary copies: a relative path would scatter runs over throw-away folders.
Writers of that store take a file lock, so ``dvc queue start -j 2`` loses nothing.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pipeline.io import sha256_files

DVC_TAGS = ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", "DVC_ROOT")


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, unwritable store)."""


# ------------------------------------------------------------------ where runs go

def repo_root() -> Path:
    """The main repository's root, also from a DVC temporary experiment workspace."""
    # dvc exp run --queue/--temp works in a copy under .dvc/tmp/exps: walk up past it.
    here = Path(os.environ.get("DVC_ROOT", os.getcwd())).resolve()
    parts = here.parts
    if ".dvc" in parts:
        return Path(*parts[: parts.index(".dvc")])
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True)
        if out.returncode == 0:
            return Path(out.stdout.strip())
    except FileNotFoundError:
        pass
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


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
                "the DVC outputs already written are kept: rerun `dvc repro` once it is up.") from None
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


# ------------------------------------------------------------------ identity of a pipeline state

def experiment_name(model: str, dataset: str, n: int, m: int) -> str:
    return f"{model}/{dataset}/{n}:{m}"


def model_label(params) -> str:
    if params.model.source == "hf" and params.model.hf_id:
        return Path(params.model.hf_id.rstrip("/")).name or params.model.hf_id
    return params.model.source


def flat_params(params) -> dict[str, str]:
    """params.yaml as ``section.key`` -> value strings (MLflow params)."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, (list, type(None))) else str(value)

    walk("", params.model_dump(mode="json"))
    return out


def params_hash(params) -> str:
    return hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def baseline_rev() -> str:
    rev = os.environ.get("DVC_EXP_BASELINE_REV")
    if rev:
        return rev
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def dvc_tags() -> dict[str, str]:
    return {k: os.environ[k] for k in DVC_TAGS if os.environ.get(k)}


def file_hash(path: Path) -> str:
    return sha256_files(path)[:16]


@dataclass
class Pipeline:
    """The parent run of the current pipeline state, found or created."""

    client: object
    experiment_id: str
    run_id: str
    created: bool

    @classmethod
    def open(cls, params, dataset: str) -> "Pipeline":
        c = client()
        exp_name = experiment_name(model_label(params), dataset, params.sparsity.n, params.sparsity.m)
        h, rev = params_hash(params), baseline_rev()
        dvc_exp = os.environ.get("DVC_EXP_NAME", "workspace")
        with store_lock(tracking_uri()):
            exp = c.get_experiment_by_name(exp_name)
            exp_id = exp.experiment_id if exp else c.create_experiment(exp_name, artifact_location=artifact_location())
            found = c.search_runs([exp_id], f"tags.role = 'pipeline' and tags.params_hash = '{h}' "
                                            f"and tags.baseline_rev = '{rev}'", order_by=["attributes.start_time ASC"])
            if found:
                run = found[0]
                names = [n for n in run.data.tags.get("dvc_exp_names", "").split(",") if n]
                if dvc_exp not in names:
                    c.set_tag(run.info.run_id, "dvc_exp_names", ",".join(names + [dvc_exp]))
                c.set_tag(run.info.run_id, "dvc_exp_name", dvc_exp)
                return cls(c, exp_id, run.info.run_id, False)
            run = c.create_run(exp_id, run_name=dvc_exp if dvc_exp != "workspace" else f"workspace-{h[:8]}", tags={
                "role": "pipeline", "params_hash": h, "baseline_rev": rev, "dvc_exp_name": dvc_exp,
                "dvc_exp_names": dvc_exp, **dvc_tags()})
            _log_params(c, run.info.run_id, flat_params(params) | parent_provenance(params))
            c.set_terminated(run.info.run_id, "FINISHED")
            return cls(c, exp_id, run.info.run_id, True)

    def children(self, role: str, **tags: str) -> list:
        query = f"tags.mlflow.parentRunId = '{self.run_id}' and tags.role = '{role}'"
        query += "".join(f" and tags.{k} = '{v}'" for k, v in tags.items())
        return self.client.search_runs([self.experiment_id], query, order_by=["attributes.start_time ASC"])

    def new_child(self, role: str, run_name: str, tags: dict[str, str]):
        return self.client.create_run(self.experiment_id, run_name=run_name, tags={
            "mlflow.parentRunId": self.run_id, "role": role, **dvc_tags(), **tags})


def _run_provenance(dtype: str) -> dict[str, str]:
    """``provenance.*`` params of this process: libraries, the device the stages use, ``dtype``, threads."""
    from pipeline.stage import default_device
    from pipeline.provenance import provenance

    return {f"provenance.{k}": str(v) for k, v in provenance(default_device(), dtype).items()}


def parent_provenance(params) -> dict[str, str]:
    """A parent's provenance: the process that created it, at the evaluation dtype (each child
    records the provenance of its own result)."""
    return _run_provenance(params.evaluate.dtype)


def _log_params(c, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        c.log_batch(run_id, params=items[i:i + 100])


def _log_metrics(c, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    for i in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[i:i + 500])


# ------------------------------------------------------------------ the learn run (live)

@dataclass
class LearnTracker:
    client: object
    run_id: str

    def log(self, metrics: dict, step: int) -> None:
        _log_metrics(self.client, self.run_id, {k: v for k, v in metrics.items() if k != "step"}, step)

    def finish(self, curve_file: Path) -> None:
        """Mark the run complete: the sync then recognises this curve as logged."""
        self.client.set_tag(self.run_id, "curve_hash", file_hash(curve_file))
        self.client.log_artifact(self.run_id, str(curve_file))


@contextlib.contextmanager
def learn_run(params, dataset: str, key: str, extra_params: dict | None = None) -> Iterator[LearnTracker]:
    """The learn child of the current state; a killed run (same ``key``) is resumed, not duplicated."""
    p = Pipeline.open(params, dataset)
    c = p.client
    unfinished = [r for r in p.children("learn", learn_key=key) if r.info.status != "FINISHED"]
    if unfinished:
        run_id = unfinished[-1].info.run_id
        c.update_run(run_id, status="RUNNING")
    else:
        run_id = p.new_child("learn", "maskllm-learn", {"method": "maskllm", "learn_key": key}).info.run_id
        _log_params(c, run_id, {k: v for k, v in flat_params(params).items() if k.startswith(("learn.", "sparsity."))}
                    | _run_provenance(getattr(params.learn, "dtype", "float32"))
                    | {k: str(v) for k, v in (extra_params or {}).items()})
    tracker = LearnTracker(c, run_id)
    try:
        yield tracker
    except BaseException as e:
        c.set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    c.set_terminated(run_id, "FINISHED")
    # a finished learn run of another curve under this state is stale
    for r in p.children("learn"):
        if r.info.run_id != run_id and r.info.status == "FINISHED":
            c.delete_run(r.info.run_id)


# ------------------------------------------------------------------ sync of results (track stage)

@dataclass
class Child:
    """One result as an MLflow child run: ``identity`` tags locate it under its parent."""

    role: str  # "result" (perplexity) | "zeroshot"
    name: str
    identity: dict[str, str]  # e.g. method + domain; method + task
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    parent_metrics: dict[str, float]  # the same numbers as columns of the parent
    input_hash: str  # what the result was computed from and what it says: a new one replaces the child


def _provenance_params(metrics: dict) -> dict[str, str]:
    return {f"provenance.{k}": str(v) for k, v in metrics.get("provenance", {}).items()}


@dataclass
class Result:
    """One evaluated (method, domain): what its metrics file says."""

    method: str
    domain: str
    in_domain: bool
    metrics: dict  # ppl, nll, protocol, provenance
    source: Path  # the metrics file (its hash identifies the result)

    def children(self) -> list[Child]:
        return [Child("result", f"{self.method} @ {self.domain}", {"method": self.method, "domain": self.domain},
                      {"in_domain": str(self.in_domain).lower()},
                      {**self.metrics.get("protocol", {}), **_provenance_params(self.metrics)},
                      {"ppl": self.metrics["ppl"], "nll": self.metrics.get("nll", float("nan"))},
                      {f"ppl.{self.method}.{self.domain}": self.metrics["ppl"]}, file_hash(self.source))]


@dataclass
class ZeroShotResult:
    """One zero-shot metrics file (one row, one entry of evaluate.zeroshot_tasks): a child per lm-eval task."""

    method: str
    metrics: dict  # task, harness, limit, results {task: ...}, protocol, provenance
    source: Path

    def children(self) -> list[Child]:
        m, out = self.metrics, []
        protocol = {k: json.dumps(v) if isinstance(v, (dict, list)) else str(v) for k, v in m["protocol"].items()}
        for task, r in m["results"].items():
            values = {**r["metrics"], **{f"{k}_stderr": v for k, v in r["stderr"].items() if v is not None}}
            params = {**protocol, "harness": m["harness"], "limit": str(m["limit"]), "task_version": str(r["version"]),
                      "examples": str(r["examples"]), "examples_available": str(r["examples_available"]),
                      "output_type": r["output_type"], "chance": str(r["chance"]), **_provenance_params(m)}
            # this task's part of the file: a rerun of another task in the same file keeps this child
            h = hashlib.sha256(json.dumps([m["protocol"], m["harness"], m["limit"], r], sort_keys=True,
                                          default=str).encode()).hexdigest()[:16]
            out.append(Child("zeroshot", f"{self.method} @ {task}", {"method": self.method, "task": task},
                             {"task_group": m["task"]}, params, values,
                             {f"zeroshot.{self.method}.{task}.{k}": v for k, v in values.items()}, h))
        return out


@dataclass
class StageResult:
    """A stage's own metrics file (``metrics/prior/<method>.json``, ``learn.json``, ``harden.json``):
    its coverage (block weights under N:M, the model's sparsity) and timings as a child run."""

    stage: str  # prior@<method> | learn | harden
    metrics: dict
    source: Path

    def children(self) -> list[Child]:
        def numbers(d: dict, prefix: str = "") -> dict[str, float]:
            return {f"{prefix}{k}": float(v) for k, v in d.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}

        values = {**numbers(self.metrics), **numbers(self.metrics.get("coverage", {}), "coverage.")}
        parent = {f"coverage.{self.stage.replace('@', '.')}.{k}": values[f"coverage.{k}"]
                  for k in ("nm_fraction", "target_fraction", "model_sparsity", "uncovered")
                  if f"coverage.{k}" in values}
        return [Child("stage", self.stage, {"stage": self.stage}, {}, _provenance_params(self.metrics),
                      values, parent, file_hash(self.source))]


@dataclass
class SyncReport:
    parent: str
    created: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    kept: int = 0


def sync(params, dataset: str, results: list, curve_file: Path | None = None,
         artifacts: list[Path] = (), curve_provenance: dict | None = None) -> SyncReport:
    """Make MLflow hold exactly the current state's results (``Result``, ``ZeroShotResult``),
    whatever DVC ran or restored; ``curve_provenance``: the learn stage's, for a replayed curve."""
    p = Pipeline.open(params, dataset)
    c = p.client
    report = SyncReport(p.run_id)
    children = [ch for r in results for ch in r.children()]
    with store_lock(tracking_uri()):
        existing: dict[tuple, list] = {}  # one search per role, not one per result
        for role in sorted({ch.role for ch in children}):
            for run in p.children(role):
                key = (role, *sorted((k, run.data.tags.get(k, "")) for k in ("method", "domain", "task", "stage")
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


def _sync_child(p: "Pipeline", ch: Child, existing: list, report: SyncReport) -> None:
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
    _log_metrics(c, p.run_id, ch.parent_metrics)


def _sync_curve(p: Pipeline, curve_file: Path, report: SyncReport, provenance: dict) -> None:
    """Replay the learn curve into a learn child unless one of this state already has it."""
    import csv

    h = file_hash(curve_file)
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

"""MLflow, laid out for comparison, and idempotent under DVC's caching.

Layout: one experiment per ``model/dataset/N:M``. In it, one **parent run per pipeline
state** (code revision + hash of params.yaml), tagged with the DVC experiment names that
produced it; under a parent, one child run per (method, domain) with the metric ``ppl`` and
the evaluation protocol as params, and the MaskLLM ``learn`` child with its per-step curves.

Idempotence: DVC skips a cached stage, so results are not logged by the stage that computes
them but synced by the plot stage (``always_changed``) from the metrics files of the current
state: a child is looked up by (parent, method, domain) and created only if missing or if
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
            _log_params(c, run.info.run_id, flat_params(params))
            c.set_terminated(run.info.run_id, "FINISHED")
            return cls(c, exp_id, run.info.run_id, True)

    def children(self, role: str, **tags: str) -> list:
        query = f"tags.mlflow.parentRunId = '{self.run_id}' and tags.role = '{role}'"
        query += "".join(f" and tags.{k} = '{v}'" for k, v in tags.items())
        return self.client.search_runs([self.experiment_id], query, order_by=["attributes.start_time ASC"])

    def new_child(self, role: str, run_name: str, tags: dict[str, str]):
        return self.client.create_run(self.experiment_id, run_name=run_name, tags={
            "mlflow.parentRunId": self.run_id, "role": role, **dvc_tags(), **tags})


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


# ------------------------------------------------------------------ sync of results (plot stage)

@dataclass
class Result:
    """One evaluated (method, domain): what its metrics file says."""

    method: str
    domain: str
    in_domain: bool
    metrics: dict  # ppl, nll, protocol
    source: Path  # the metrics file (its hash identifies the result)


@dataclass
class SyncReport:
    parent: str
    created: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    kept: int = 0


def sync(params, dataset: str, results: list[Result], curve_file: Path | None = None,
         artifacts: list[Path] = ()) -> SyncReport:
    """Make MLflow hold exactly the current state's results, whatever DVC ran or restored."""
    p = Pipeline.open(params, dataset)
    c = p.client
    report = SyncReport(p.run_id)
    with store_lock(tracking_uri()):
        for r in results:
            h = file_hash(r.source)
            existing = p.children("result", method=r.method, domain=r.domain)
            if any(e.data.tags.get("input_hash") == h for e in existing):
                report.kept += 1
                for e in existing:  # keep the one matching run, drop stale ones
                    if e.data.tags.get("input_hash") != h:
                        c.delete_run(e.info.run_id)
                continue
            for e in existing:
                c.delete_run(e.info.run_id)
            (report.replaced if existing else report.created).append(f"{r.method}@{r.domain}")
            run = p.new_child("result", f"{r.method} @ {r.domain}", {
                "method": r.method, "domain": r.domain, "in_domain": str(r.in_domain).lower(), "input_hash": h})
            _log_params(c, run.info.run_id, r.metrics.get("protocol", {}))
            _log_metrics(c, run.info.run_id, {"ppl": r.metrics["ppl"], "nll": r.metrics.get("nll", float("nan"))})
            c.set_terminated(run.info.run_id, "FINISHED")
            _log_metrics(p.client, p.run_id, {f"ppl.{r.method}.{r.domain}": r.metrics["ppl"]})
        if curve_file is not None and Path(curve_file).is_file():
            _sync_curve(p, Path(curve_file), report)
    for path in artifacts:
        if Path(path).is_file():
            c.log_artifact(p.run_id, str(path))
    return report


def _sync_curve(p: Pipeline, curve_file: Path, report: SyncReport) -> None:
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
    with open(curve_file) as f:
        for row in csv.DictReader(f):
            step = int(float(row.pop("step")))
            _log_metrics(p.client, run.info.run_id, {k: float(v) for k, v in row.items() if v not in ("", None)}, step)
    p.client.log_artifact(run.info.run_id, str(curve_file))
    p.client.set_terminated(run.info.run_id, "FINISHED")
    report.created.append("maskllm-learn (replayed)")


# ------------------------------------------------------------------ ablations across pipeline states

SWEEPS = ("learn.tau", "learn.kappa", "learn.prior_strength", "learn.prior", "learn.weight_reg", "learn.steps",
          "learn.lr")
# params that do not change any result (a sweep point may differ in them)
IRRELEVANT = ("plot.", "harden.", "learn.checkpoint_every")


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _defaults() -> dict[str, str]:
    """Flat default params: a parent logged before a param existed had its default value."""
    from pipeline.config import Params

    return flat_params(Params())


def _matches(p: dict[str, str], current: dict[str, str], free: tuple[str, ...], defaults: dict[str, str]) -> bool:
    return all(p.get(k, defaults.get(k)) == v for k, v in current.items() if k not in free)


def _parents(c, experiment: str) -> list:
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], "tags.role = 'pipeline'", max_results=5000,
                         order_by=["attributes.start_time ASC"])


def prior_label(p: dict[str, str]) -> str:
    """``learn.prior`` as a reader should see it: a prior file by its name."""
    prior = p.get("learn.prior", "")
    return f"file:{Path(p['learn.prior_file']).stem}" if prior == "file" and p.get("learn.prior_file") else prior


def sweep_points(params, dataset: str, metric: str) -> dict[str, list[tuple[object, float]]]:
    """For each swept param: (value, metric) of every pipeline state that differs from the
    current one in that param alone (latest run per value)."""
    c = client()
    parents = _parents(c, experiment_name(model_label(params), dataset, params.sparsity.n, params.sparsity.m))
    current = {k: v for k, v in flat_params(params).items() if not k.startswith(IRRELEVANT)}
    defaults = _defaults()
    out = {}
    for swept in SWEEPS:
        # the prior and its file are one choice
        free = (swept, "learn.prior_file") if swept == "learn.prior" else (swept,)
        points = {}
        for run in parents:
            p = run.data.params
            if metric in run.data.metrics and swept in p and _matches(p, current, free, defaults):
                points[prior_label(p) if swept == "learn.prior" else p[swept]] = run.data.metrics[metric]
        if len(points) >= 2:
            out[swept] = [(_value(k), v) for k, v in points.items()]
    return out


# a transfer run differs from the general one in its training domain and its prior only
TRANSFER_FREE = ("data.source", "learn.prior", "learn.prior_file", "evaluate.domains")


def transfer_states(params) -> dict[str, list[dict]]:
    """Pipeline states of the same model, N:M and hyperparameters learned on another domain D
    (a transfer sweep) -> {D: [{"prior": label, "ppl": {method: PPL on D}}]}; only domains
    where at least one state used a mask file as its prior (``learn.prior=file``)."""
    from pipeline.config import Data

    c = client()
    current = {k: v for k, v in flat_params(params).items() if not k.startswith(IRRELEVANT)}
    defaults = _defaults()
    out = {}
    for domain in Data.model_fields["source"].annotation.__args__:
        if domain == params.data.source:
            continue
        states = {}
        for run in _parents(c, experiment_name(model_label(params), domain, params.sparsity.n, params.sparsity.m)):
            p, metrics = run.data.params, run.data.metrics
            if p.get("data.source") != domain or not _matches(p, current, TRANSFER_FREE, defaults):
                continue
            ppl = {k.split(".")[1]: v for k, v in metrics.items() if k.startswith("ppl.") and k.endswith(f".{domain}")}
            if "maskllm" in ppl:
                states[prior_label(p)] = {"prior": prior_label(p), "ppl": ppl}  # latest run per prior
        if any(label.startswith("file:") for label in states):
            out[domain] = list(states.values())
    return out

"""The record of pipeline states: ``records/states.json``, committed to git. The one master.

A **pipeline state** is one set of params run by one revision of the code (its params hash and the
commit ``dvc repro`` / ``dvc exp run`` started from). Its entry holds its params (flat,
``learn.kappa``), its results (flat metrics, ``ppl.<row>.<domain>``, ``ppl_validation.<row>.<domain>``,
``zeroshot.<row>.<task>.<metric>``, ``coverage.<stage>.<figure>``) and its identity tags. The track
stage writes the current state's entry from the metrics files (``pipeline.records.metrics``); the
sweep, seed and budget figures read the ledger; MLflow gets a one-way export of it
(``pipeline.records.mlflow_export``), so a fresh clone's empty MLflow store is refilled from here
and nothing is ever read back from MLflow.

The file lives at the root of the main repository, not in DVC's temporary experiment folders:
``dvc exp run --queue`` runs each experiment in a copy under ``.dvc/tmp/exps``, and every one of
them records its state here (under a file lock), as it did in the MLflow store before.
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
from pathlib import Path
from typing import Iterator

from pipeline.io import atomic_path

VERSION = 1
DVC_TAGS = ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", "DVC_ROOT")

# Keys that entries recorded before the key existed lack, and the value they ran with: a state is
# compared with the current params as if it held these (sweeps, seeds). The one place where
# "the value before this key existed" is written down; add a key here when a param is added.
IMPLIED: dict[str, str] = {
    "learn.recompute_masked_weights": "True",  # same bits either way
    "learn.micro_batch_size": "null",  # one micro-batch per process (every state before it ran one process)
    "learn.nnodes": "1",
    "learn.rdzv_endpoint": "null",
    "data.validation_fraction": "0.0",  # no validation split: every article was train or test
    # every row was evaluated on validation (a choice of what to evaluate: no result depends on it)
    "evaluate.validation_rows": json.dumps(["dense", "magnitude", "wanda", "sparsegpt", "sparsegpt_maskonly",
                                            "sparsegpt_noupdate", "ria", "maskllm"]),
}


class LedgerError(ValueError):
    pass


# ------------------------------------------------------------------ where the record lives

def repo_root() -> Path:
    """The main repository's root, also from a DVC temporary experiment workspace."""
    here = Path(os.environ.get("DVC_ROOT", os.getcwd())).resolve()
    parts = here.parts
    if ".dvc" in parts:  # dvc exp run --queue/--temp works in a copy under .dvc/tmp/exps: walk up past it
        return Path(*parts[: parts.index(".dvc")])
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True)
        if out.returncode == 0:
            return Path(out.stdout.strip())
    except FileNotFoundError:
        pass
    return here


def ledger_path() -> Path:
    return Path(os.environ.get("MASKLLM_LEDGER") or repo_root() / "records" / "states.json")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise read-modify-write of the ledger (queued experiments run side by side)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------ the identity of a state

def flat_params(params) -> dict[str, str]:
    """params.yaml as ``section.key`` -> value strings."""
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


def model_label(params) -> str:
    if params.model.source == "hf" and params.model.hf_id:
        return Path(params.model.hf_id.rstrip("/")).name or params.model.hf_id
    return params.model.source


def experiment_name(model: str, dataset: str, n: int, m: int) -> str:
    return f"{model}/{dataset}/{n}:{m}"


def experiment_of(params) -> str:
    return experiment_name(model_label(params), params.data.source, params.sparsity.n, params.sparsity.m)


def baseline_rev() -> str:
    rev = os.environ.get("DVC_EXP_BASELINE_REV")
    if rev:
        return rev
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def state_id(params, rev: str | None = None) -> str:
    """The id of the current state: a function of its experiment, params and revision."""
    key = f"{experiment_of(params)}|{params_hash(params)}|{rev or baseline_rev()}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def changes_from_defaults(params) -> dict[str, str]:
    """The params that differ from params.yaml's own defaults (``pipeline.config``): what a state changed."""
    from pipeline.config import Params

    defaults, now = flat_params(Params()), flat_params(params)
    return {k: v for k, v in now.items() if defaults.get(k) != v}


def state_name(params) -> str:
    """A readable name: the changes from the defaults (``learn.kappa=100, learn.seed=1``), or ``defaults``."""
    changes = changes_from_defaults(params)
    return ", ".join(f"{k}={v}" for k, v in changes.items()) or "defaults"


def dvc_tags() -> dict[str, str]:
    return {k: os.environ[k] for k in DVC_TAGS if os.environ.get(k)}


# ------------------------------------------------------------------ the file

def _order(entries) -> list[dict]:
    return sorted(entries, key=lambda e: (e["experiment"], e["start_time"] or 0, e["id"]))


def read(path: Path | None = None) -> list[dict]:
    """The ledger's entries; none when the file does not exist yet."""
    path = Path(path or ledger_path())
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


def write(entries, path: Path | None = None) -> None:
    with atomic_path(path or ledger_path()) as tmp:
        tmp.write_text(json.dumps({"version": VERSION, "states": _order(entries)}, indent=1) + "\n")


def record(params, metrics: dict[str, float], path: Path | None = None, now: float | None = None) -> dict:
    """Write the current state's entry: its params, tags and ``metrics`` (the whole current set: the
    metrics files are the truth of a state, so a result that went away goes from its entry too)."""
    path = Path(path or ledger_path())
    now_ms = int(1000 * (now if now is not None else time.time()))
    rev, exp_name = baseline_rev(), os.environ.get("DVC_EXP_NAME", "workspace")
    sid = state_id(params, rev)
    with locked(path):
        entries = read(path)
        entry = next((e for e in entries if e["id"] == sid), None)
        if entry is None:
            entry = {"id": sid, "experiment": experiment_of(params), "start_time": now_ms, "status": "FINISHED",
                     "tags": {"role": "pipeline", "params_hash": params_hash(params), "baseline_rev": rev,
                              "dvc_exp_names": exp_name}}
            entries.append(entry)
        names = [n for n in entry["tags"].get("dvc_exp_names", "").split(",") if n]
        entry["tags"] = {**entry["tags"], **dvc_tags(), "dvc_exp_name": exp_name,
                         "dvc_exp_names": ",".join(names + [exp_name] if exp_name not in names else names)}
        entry["tags"] = dict(sorted(entry["tags"].items()))
        entry["run_name"] = state_name(params)
        entry["end_time"] = now_ms
        entry["params"] = dict(sorted(flat_params(params).items()))
        entry["metrics"] = {k: v for k, v in sorted(metrics.items()) if isinstance(v, (int, float)) and math.isfinite(v)}
        write(entries, path)
    return entry


def states(experiment: str, path: Path | None = None) -> list[dict]:
    """Every recorded state of one experiment (model/dataset/N:M), oldest first."""
    return sorted((e for e in read(path) if e["experiment"] == experiment), key=lambda e: (e["start_time"] or 0, e["id"]))


def param(entry: dict, key: str) -> str | None:
    """A state's value of a flat param: recorded, else the value ``IMPLIED`` for states before it existed."""
    return entry["params"].get(key, IMPLIED.get(key))

"""MLflow runs against the repository's SQLite store (or ``MLFLOW_TRACKING_URI``).

The store path is absolute because ``dvc exp run --queue`` runs stages in temporary
copies of the repository: a relative path would scatter runs over throw-away folders.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

DVC_TAGS = ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", "DVC_ROOT")


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


def dvc_tags() -> dict[str, str]:
    return {k: os.environ[k] for k in DVC_TAGS if os.environ.get(k)}


def experiment_name(model: str, dataset: str, n: int, m: int) -> str:
    return f"{model}/{dataset}/{n}:{m}"


@contextlib.contextmanager
def start_run(experiment: str, run_name: str, tags: dict | None = None):
    """An MLflow run in ``experiment``, tagged with the DVC experiment context."""
    import mlflow

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags={**dvc_tags(), **(tags or {})}) as run:
        yield run

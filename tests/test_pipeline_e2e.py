"""The DVC pipeline end to end on the micro profile, in a temporary copy of the repository."""
import json
import math


import pytest

from pipeline.rows import ROWS
from tests.conftest import BIN, run, set_params


@pytest.fixture(scope="module")
def micro_repo(micro_base):
    return micro_base


def test_repro_writes_finite_metrics_with_protocol(micro_repo):
    repo, res = micro_repo
    metrics = json.loads((repo / "metrics" / "dense.json").read_text())
    assert math.isfinite(metrics["ppl"]) and 1 < metrics["ppl"] < 512  # below the uniform PPL of the vocab
    proto = metrics["protocol"]
    assert proto == {"dataset": "wiki", "split": "test", "seqlen": 64, "windows": proto["windows"],
                     "tokens": proto["windows"] * 64, "dtype": "float32", "model": "tiny", "sparsity": "dense"}
    assert 1 <= proto["windows"] <= 16
    stats = json.loads((repo / "artifacts" / "data" / "stats.json").read_text())
    assert stats["train"]["articles"] + stats["test"]["articles"] == 400
    assert "[evaluate dense] dense: PPL" in res.stdout  # the one-line stage summary
    shown = run([str(BIN / "dvc"), "metrics", "show", "--json"], repo).stdout
    assert "ppl" in shown


def test_second_repro_does_nothing(micro_repo):
    repo, _ = micro_repo
    res = run([str(BIN / "dvc"), "repro"], repo)
    assert "Running stage" not in res.stdout, res.stdout
    assert "didn't change, skipping" in res.stdout


def stages_run(stdout: str) -> list[str]:
    return sorted(line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage"))


def test_changing_evaluate_seqlen_reruns_only_evaluation(micro_copy):
    set_params(micro_copy, {"evaluate.seqlen": 32})
    res = run([str(BIN / "dvc"), "repro"], micro_copy)
    ran = stages_run(res.stdout)
    assert ran == sorted([f"evaluate@{row}" for row in ROWS] + ["plot"]), res.stdout
    assert json.loads((micro_copy / "metrics" / "dense.json").read_text())["protocol"]["seqlen"] == 32


def test_learn_ablation_reruns_only_the_maskllm_branch(micro_copy):
    run(["git", "add", "-A"], micro_copy)
    run(["git", "commit", "-qm", "reproduced"], micro_copy)
    res = run([str(BIN / "dvc"), "exp", "run", "-S", "learn.tau=2"], micro_copy)
    assert stages_run(res.stdout) == ["evaluate@maskllm", "harden", "learn", "plot"], res.stdout


def test_dense_evaluation_is_logged_to_mlflow(micro_repo):
    import mlflow

    repo, _ = micro_repo
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tiny/wiki/2:4"], filter_string="tags.method = 'dense'")
    assert len(runs) >= 1
    run = runs.iloc[0]
    assert math.isfinite(run["metrics.ppl"]) and run["params.seqlen"] in ("64", "32")
    assert run["params.dataset"] == "wiki" and run["tags.DVC_STAGE"].startswith("evaluate@dense")


def test_every_row_and_the_plots_are_produced(micro_repo):
    repo, res = micro_repo
    ppl = {row: json.loads((repo / "metrics" / f"{row}.json").read_text())["ppl"] for row in ROWS}
    assert all(math.isfinite(v) for v in ppl.values()), ppl
    # Even the micro model is hurt by magnitude pruning at 2:4.
    assert ppl["magnitude"] > ppl["dense"], ppl
    for name in ("ppl.png", "learn_curves.png", "agreement.png"):
        data = (repo / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    shown = run([str(BIN / "dvc"), "plots", "show", "--json"], repo)
    assert "learn_curve.csv" in shown.stdout and "ppl.csv" in shown.stdout
    harden = json.loads((repo / "artifacts" / "harden" / "stats.json").read_text())
    assert len(harden["layers"]) == 14 and 0.5 < harden["mean"]["sparsegpt"]["agreement"] <= 1.0

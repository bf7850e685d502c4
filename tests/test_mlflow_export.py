"""MLflow as a one-way export of the ledger: layout and idempotence, against a private SQLite store and
ledger (no DVC, no model)."""
import json
import socket
import time

import pytest
import yaml

from pipeline.records import ledger, mlflow_export
from pipeline.records.metrics import MetricsFile, flat
from pipeline.config import parse_params
from tests.conftest import ROOT


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MASKLLM_LEDGER", str(tmp_path / "states.json"))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    return tmp_path


def params(**learn):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["learn"].update(learn)
    return parse_params(raw)


def result(tmp_path, method, domain, ppl):
    f = tmp_path / f"{method}-{domain}.json"
    f.write_text(json.dumps({"ppl": ppl, "nll": 1.0, "protocol": {"seqlen": 512, "domain": domain}}))
    return MetricsFile("ppl", f, json.loads(f.read_text()), row=method, domain=domain)


def sync(p, files, curve_file=None, curve_provenance=None):
    """What the track stage does: record the state in the ledger, then export the ledger."""
    entry = ledger.record(p, flat(files))
    return mlflow_export.export(ledger.read(), entry, files, curve_file=curve_file, curve_provenance=curve_provenance)


def runs(role=None):
    import mlflow

    mlflow.set_tracking_uri(mlflow_export.tracking_uri())
    df = mlflow.search_runs(search_all_experiments=True)
    return df if role is None else df[df["tags.role"] == role]


def test_sync_is_idempotent_and_replaces_changed_results(store):
    p = params()
    res = [result(store, "dense", "wiki", 14.0), result(store, "sparsegpt", "wiki", 50.0),
           result(store, "sparsegpt", "shakespeare", 80.0)]
    first = sync(p, res)
    assert sorted(first.created) == ["dense@wiki@test", "sparsegpt@shakespeare@test", "sparsegpt@wiki@test"]
    again = sync(p, res)  # everything cached: nothing new
    assert again.created == [] and again.replaced == [] and again.kept == 3
    assert len(runs("pipeline")) == 1 and len(runs("result")) == 3

    res[1] = result(store, "sparsegpt", "wiki", 49.0)  # the same state, a recomputed result
    third = sync(p, res)
    assert third.replaced == ["sparsegpt@wiki@test"]
    df = runs("result")
    assert len(df) == 3 and sorted(df["metrics.ppl"]) == [14.0, 49.0, 80.0]
    assert set(df["tags.mlflow.parentRunId"]) == {first.parent}
    assert (df["experiment_id"].nunique(), df["params.seqlen"].iloc[0]) == (1, "512")


def test_each_pipeline_state_gets_its_own_parent_tagged_with_its_experiments(store, monkeypatch):
    sync(params(), [result(store, "maskllm", "wiki", 40.0)])
    sync(params(tau=2.0), [result(store, "maskllm", "wiki", 41.0)])
    monkeypatch.setenv("DVC_EXP_NAME", "exp-b")  # same params again under another experiment
    sync(params(), [result(store, "maskllm", "wiki", 40.0)])
    parents = runs("pipeline")
    assert len(parents) == 2 and len(runs("result")) == 2
    tags = dict(zip(parents["params.learn.tau"], parents["tags.dvc_exp_names"]))
    assert tags == {"4.0": "exp-a,exp-b", "2.0": "exp-a"}
    exp = ledger.experiment_name("smollm2", "wiki", 2, 4)
    import mlflow

    assert mlflow.get_experiment_by_name(exp) is not None


def test_learn_run_resumes_a_killed_run_and_the_sync_does_not_replay_it(store, tmp_path):
    p = params()
    with pytest.raises(RuntimeError):
        with mlflow_export.learn_run(p, key="k1") as t:
            t.log({"ce": 5.0, "step": 1}, 1)
            raise RuntimeError("killed")
    with mlflow_export.learn_run(p, key="k1") as t:  # resumed: same run
        t.log({"ce": 4.0, "step": 2}, 2)
        curve = tmp_path / "learn_curve.csv"
        curve.write_text("step,ce\n1,5.0\n2,4.0\n")
        t.finish(curve)
    learns = runs("learn")
    assert len(learns) == 1 and learns["status"].iloc[0] == "FINISHED"
    import mlflow

    history = mlflow.tracking.MlflowClient().get_metric_history(learns["run_id"].iloc[0], "ce")
    assert [(m.step, m.value) for m in history] == [(1, 5.0), (2, 4.0)]
    report = sync(p, [], curve_file=curve)
    assert report.created == [] and len(runs("learn")) == 1


def test_sync_replays_the_curve_for_a_state_whose_learn_stage_was_cached(store, tmp_path):
    curve = tmp_path / "learn_curve.csv"
    curve.write_text("step,ce,temperature\n1,5.0,4.0\n2,4.5,2.0\n")
    report = sync(params(), [], curve_file=curve)
    assert report.created == ["maskllm-learn (replayed)"]
    assert sync(params(), [], curve_file=curve).created == []
    learns = runs("learn")
    assert len(learns) == 1 and learns["metrics.ce"].iloc[0] == 4.5


def test_unreachable_server_fails_fast_with_the_fix(store, monkeypatch):
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(mlflow_export.TrackingError, match="unreachable.*MLFLOW_TRACKING_URI"):
        sync(params(), [])
    assert time.monotonic() - t0 < 30  # MLflow alone would retry for minutes


def zeroshot_file(tmp_path, method, accs: dict, name="lastword"):
    f = tmp_path / f"{method}-{name}.json"
    f.write_text(json.dumps({
        "task": name, "harness": "lm-eval 0.4.13", "limit": 40,
        "results": {t: {"version": 1.0, "output_type": "loglikelihood", "examples": 40, "examples_available": 500,
                        "metrics": {"acc": a, "perplexity": 30.0}, "stderr": {"acc": 0.07, "perplexity": 9.0},
                        "chance": None} for t, a in accs.items()},
        "protocol": {"row": method, "seqlen": 64, "local_data": {}},
        "provenance": {"version.lm_eval": "0.4.13", "device": "cpu", "threads": 2}}))
    return MetricsFile("zeroshot", f, json.loads(f.read_text()), row=method, task=name)


def test_zeroshot_results_get_a_child_per_task_and_only_a_changed_task_is_replaced(store):
    p = params()
    res = [zeroshot_file(store, "maskllm", {"lastword_wiki": 0.4, "lastword_pydocs": 0.3}),
           result(store, "maskllm", "wiki", 40.0)]
    first = sync(p, res)
    assert sorted(first.created) == ["maskllm@lastword_pydocs", "maskllm@lastword_wiki", "maskllm@wiki@test"]
    assert sync(p, res).kept == 3
    zs = runs("zeroshot")
    assert sorted(zip(zs["tags.task"], zs["metrics.acc"], zs["metrics.acc_stderr"])) == [
        ("lastword_pydocs", 0.3, 0.07), ("lastword_wiki", 0.4, 0.07)]
    assert set(zs["params.harness"]) == {"lm-eval 0.4.13"} and set(zs["params.examples"]) == {"40"}
    assert set(zs["params.provenance.version.lm_eval"]) == {"0.4.13"} and set(zs["tags.task_group"]) == {"lastword"}
    res[0] = zeroshot_file(store, "maskllm", {"lastword_wiki": 0.4, "lastword_pydocs": 0.35})  # one task rerun
    again = sync(p, res)
    assert again.replaced == ["maskllm@lastword_pydocs"] and again.created == [] and again.kept == 2
    parent = runs("pipeline").iloc[0]
    assert parent["metrics.zeroshot.maskllm.lastword_pydocs.acc"] == 0.35
    assert parent["metrics.zeroshot.maskllm.lastword_wiki.acc_stderr"] == 0.07
    assert len(runs("zeroshot")) == 2


def test_every_run_records_its_provenance(store, tmp_path):
    f = tmp_path / "dense-wiki.json"
    f.write_text(json.dumps({"ppl": 14.0, "nll": 2.6, "protocol": {"seqlen": 512},
                             "provenance": {"version.torch": "9.9", "device": "cuda:0", "threads": 8}}))
    curve = tmp_path / "learn_curve.csv"
    curve.write_text("step,ce\n1,5.0\n")
    sync(params(), [MetricsFile("ppl", f, json.loads(f.read_text()), row="dense", domain="wiki")],
         curve_file=curve, curve_provenance={"version.torch": "8.8", "device": "cpu"})
    child = runs("result").iloc[0]  # the provenance of the result, not of the syncing process
    assert (child["params.provenance.version.torch"], child["params.provenance.device"]) == ("9.9", "cuda:0")
    assert runs("learn").iloc[0]["params.provenance.version.torch"] == "8.8"


def test_each_stage_coverage_reaches_mlflow_as_a_child_and_parent_columns(store, tmp_path):
    f = tmp_path / "sparsegpt.json"
    f.write_text(json.dumps({
        "seconds": 12.5, "magnitude_fallbacks": 0,
        "coverage": {"nm_fraction": 1.0, "target_fraction": 1.0, "model_sparsity": 0.3822, "ignored": 0,
                     "gates": 0, "uncovered": 0, "covered": 210},
        "provenance": {"version.torch": "9.9", "device": "cpu", "threads": 2}}))
    res = [MetricsFile("stage", f, json.loads(f.read_text()), stage="prior@sparsegpt")]
    assert sync(params(), res).created == ["prior@sparsegpt"]
    assert sync(params(), res).kept == 1  # unchanged file: the child stays
    child = runs("stage").iloc[0]
    assert (child["tags.stage"], child["metrics.coverage.model_sparsity"], child["metrics.seconds"]) == (
        "prior@sparsegpt", 0.3822, 12.5)
    assert child["params.provenance.device"] == "cpu"
    parent = runs("pipeline").iloc[0]
    assert parent["metrics.coverage.prior.sparsegpt.nm_fraction"] == 1.0
    assert parent["metrics.coverage.prior.sparsegpt.uncovered"] == 0.0

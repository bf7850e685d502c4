"""The committed ledger of pipeline states (pipeline/ledger.py): a fresh clone's empty MLflow store
gets every state back, with the same sweeps, and an unchanged store rewrites it byte for byte."""
import json

import pytest

from pipeline import ledger, sweeps, tracking
from tests.test_sweeps import log_state, params


def use_store(monkeypatch, path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")


@pytest.fixture
def logged(tmp_path, monkeypatch):
    """A store with three states of the default params: the current one and two tau points."""
    use_store(monkeypatch, tmp_path / "a.db")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    for name, tau, ppl in [("current", 4.0, 40.0), ("tau-1", 1.0, 55.5), ("tau-8", 8.0, 47.25)]:
        monkeypatch.setenv("DVC_EXP_NAME", name)
        log_state(tmp_path, params(tau=tau), {"maskllm": ppl, "sparsegpt": 50.0}, name)
    return tmp_path


def states_by_id(c):
    return {ledger.state_id(r): r for runs in ledger.parents(c).values() for r in runs}


def test_a_fresh_store_gets_every_state_back(logged, monkeypatch):
    path = logged / "states.json"
    assert ledger.save(tracking.client(), path) == 3
    before = states_by_id(tracking.client())
    current = params()
    points = sweeps.sweep_points(current, "wiki", "ppl.maskllm.wiki")
    assert sorted(points["learn.tau"]) == [(1.0, 55.5), (4.0, 40.0), (8.0, 47.25)]

    use_store(monkeypatch, logged / "fresh.db")  # a fresh clone: an empty store, the committed ledger
    c = tracking.client()
    assert sweeps.sweep_points(current, "wiki", "ppl.maskllm.wiki") == {}
    assert ledger.load(c, path) == 3
    after = states_by_id(c)
    assert after.keys() == before.keys()
    for i, run in after.items():
        assert run.info.run_id != i  # a new run in the new store, under the id it was first logged with
        old = before[i]
        assert run.data.params == old.data.params and run.data.metrics == old.data.metrics
        assert run.info.start_time == old.info.start_time and run.info.run_name == old.info.run_name
        assert {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") and k != "ledger_id"} == \
               {k: v for k, v in old.data.tags.items() if not k.startswith("mlflow.")}
    assert sweeps.sweep_points(current, "wiki", "ppl.maskllm.wiki") == points
    # loading again restores nothing more, and writing back is a fixed point
    text = path.read_text()
    assert ledger.load(c, path) == 0 and ledger.save(c, path) == 3
    assert path.read_text() == text


def test_the_current_state_reuses_its_restored_parent(logged, monkeypatch):
    path = logged / "states.json"
    ledger.save(tracking.client(), path)
    use_store(monkeypatch, logged / "fresh.db")
    c = tracking.client()
    ledger.load(c, path)
    monkeypatch.setenv("DVC_EXP_NAME", "current")
    log_state(logged, params(), {"maskllm": 40.0, "dense": 14.0}, "again")  # same params, same commit
    assert len(states_by_id(c)) == 3  # no second parent for the same state
    ledger.save(c, path)
    saved = {e["id"]: e for e in ledger.read(path)}
    assert len(saved) == 3
    current = [e for e in saved.values() if e["params"]["learn.tau"] == "4.0"]
    assert len(current) == 1 and current[0]["metrics"]["ppl.dense.wiki"] == 14.0


def test_a_state_the_store_lacks_keeps_its_entry(logged):
    path = logged / "states.json"
    ledger.save(tracking.client(), path)
    raw = json.loads(path.read_text())
    ghost = dict(raw["states"][0], id="ghost", experiment="other/wiki/2:4", start_time=1)
    path.write_text(json.dumps({"version": 1, "states": raw["states"] + [ghost]}))
    assert ledger.save(tracking.client(), path) == 4
    assert "ghost" in {e["id"] for e in ledger.read(path)}


@pytest.mark.parametrize("text, says", [
    ("{not json", "not valid JSON"),
    ('{"version": 99, "states": []}', "expected {'version': 1"),
    ('{"version": 1, "states": [{"id": "x"}]}', "state 0 lacks"),
])
def test_a_broken_ledger_is_named_with_its_fix(tmp_path, text, says):
    path = tmp_path / "states.json"
    path.write_text(text)
    with pytest.raises(ledger.LedgerError, match=says) as e:
        ledger.read(path)
    assert str(path) in str(e.value) and "git checkout --" in str(e.value)


def test_no_ledger_yet_is_empty(tmp_path):
    assert ledger.read(tmp_path / "none.json") == []


def test_a_parent_opened_before_the_ledger_is_merged_not_doubled(logged, monkeypatch):
    """A fresh clone whose ``learn`` reruns: it opens the current state's parent (for its live
    curves) in the empty store before ``track`` restores the ledger; the ledger's entry for that
    state must land in that parent, or the state splits in two and the newer, result-less parent
    hides the results from the seed spread."""
    path = logged / "states.json"
    ledger.save(tracking.client(), path)
    before = {e["params"]["learn.tau"]: e for e in ledger.read(path)}
    use_store(monkeypatch, logged / "fresh.db")
    c = tracking.client()
    monkeypatch.setenv("DVC_EXP_NAME", "current")
    opened = tracking.Pipeline.open(params(), "wiki")  # what learn does first; no results yet
    assert opened.created
    assert ledger.load(c, path) == 3
    by_tau = {r.data.params["learn.tau"]: r for runs in ledger.parents(c).values() for r in runs}
    assert len(states_by_id(c)) == 3  # the opened parent took the ledger's state: no fourth run
    merged = by_tau["4.0"]
    assert merged.info.run_id == opened.run_id and ledger.state_id(merged) == before["4.0"]["id"]
    assert merged.data.metrics["ppl.maskllm.wiki"] == 40.0  # the ledger's results, now in that run
    # the seed spread of the current state is its own result, not hidden by a result-less twin
    assert sweeps.seed_spread(params(), "wiki")["ppl.maskllm.wiki"]["n"] == 1
    assert tracking.Pipeline.open(params(), "wiki").run_id == opened.run_id
    assert ledger.load(c, path) == 0 and ledger.save(c, path) == 3


def test_the_seed_spread_skips_a_parent_without_results(logged):
    """A parent with no PPL yet (a learn running, or one that failed) is not a seed state: the
    latest run of the seed pair that holds results stands for it."""
    c = tracking.client()
    exp = c.get_experiment_by_name(next(iter(ledger.parents(c))))
    c.create_run(exp.experiment_id, tags={"role": "pipeline", "params_hash": "other", "baseline_rev": "later"})
    run = c.search_runs([exp.experiment_id], "tags.params_hash = 'other'")[0]
    tracking._log_params(c, run.info.run_id, tracking.flat_params(params()))
    states = sweeps.seed_states(params(), "wiki")
    assert [s.data.metrics.get("ppl.maskllm.wiki") for s in states] == [40.0]

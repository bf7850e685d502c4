"""The ledger (pipeline/records/ledger.py): the one record of pipeline states, and MLflow as its one-way export."""
import json
import multiprocessing
import os

import pytest

from pipeline.records import ledger, mlflow_export, sweeps
from tests.test_sweeps import log_state, params


@pytest.fixture
def book(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKLLM_LEDGER", str(tmp_path / "states.json"))
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    return tmp_path


def test_a_rerun_of_a_state_updates_its_one_entry(book, monkeypatch):
    first = ledger.record(params(), {"ppl.maskllm.wiki": 40.0, "ppl.dense.wiki": 14.0}, now=100.0)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-b")
    again = ledger.record(params(), {"ppl.maskllm.wiki": 39.0}, now=200.0)
    entries = ledger.read()
    assert len(entries) == 1 and first["id"] == again["id"] == ledger.state_id(params(), "abc123")
    e = entries[0]
    # the metrics files are the truth of a state: the whole set is replaced, a result gone is gone
    assert e["metrics"] == {"ppl.maskllm.wiki": 39.0}
    assert (e["start_time"], e["end_time"]) == (100_000, 200_000)
    assert e["tags"]["dvc_exp_names"] == "exp-a,exp-b" and e["tags"]["baseline_rev"] == "abc123"
    assert e["params"]["learn.kappa"] == "100.0" and e["experiment"] == "smollm2/wiki/2:4"


def test_another_revision_or_other_params_are_other_states(book, monkeypatch):
    ledger.record(params(), {"ppl.maskllm.wiki": 40.0}, now=1)
    ledger.record(params(tau=2.0), {"ppl.maskllm.wiki": 41.0}, now=2)
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "def456")
    ledger.record(params(), {"ppl.maskllm.wiki": 40.5}, now=3)
    entries = ledger.states("smollm2/wiki/2:4")
    assert [e["metrics"]["ppl.maskllm.wiki"] for e in entries] == [40.0, 41.0, 40.5]  # oldest first
    assert len({e["id"] for e in entries}) == 3


def test_a_state_is_named_by_what_it_changed_from_the_defaults(book):
    from pipeline.config import Params

    assert ledger.state_name(Params()) == "defaults"
    changed = Params.model_validate({"learn": {"kappa": 100.0, "seed": 1}})
    assert ledger.state_name(changed) == "learn.kappa=100.0, learn.seed=1"
    assert ledger.record(changed, {}, now=1)["run_name"] == "learn.kappa=100.0, learn.seed=1"


def test_a_queued_experiment_records_in_the_main_repositorys_ledger(tmp_path, monkeypatch):
    monkeypatch.delenv("MASKLLM_LEDGER", raising=False)
    queued = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc"
    queued.mkdir(parents=True)
    monkeypatch.chdir(queued)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert ledger.ledger_path() == tmp_path / "repo" / "records" / "states.json"
    assert ledger.repo_root() == tmp_path / "repo"


def _record_many(path: str, offset: int) -> None:
    os.environ["MASKLLM_LEDGER"] = path
    for i in range(12):
        ledger.record(params(tau=1.0 + offset + i / 100), {"ppl.maskllm.wiki": float(offset + i)})


def test_experiments_recording_side_by_side_lose_nothing(book):
    path = str(book / "states.json")
    procs = [multiprocessing.get_context("spawn").Process(target=_record_many, args=(path, k)) for k in (0, 50)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(e["metrics"]["ppl.maskllm.wiki"] for e in ledger.read()) == [float(k + i) for k in (0, 50)
                                                                                for i in range(12)]


def test_an_older_state_lacking_a_key_counts_with_its_implied_value(book):
    log_state(book, params(), {"maskllm": 40.0}, "current")
    log_state(book, params(learn_seed=1), {"maskllm": 42.0}, "seed1")
    current = ledger.flat_params(params())
    same = [k for k, v in ledger.IMPLIED.items() if current[k] == v]
    assert "learn.recompute_masked_weights" in same and "data.validation_fraction" not in same

    def older(*keys):  # the seed-1 state as recorded before these keys existed
        raw = json.loads((book / "states.json").read_text())
        for key in keys:
            raw["states"][1]["params"].pop(key, None)
        (book / "states.json").write_text(json.dumps(raw))
        return sweeps.seed_spread(params(), "wiki")["ppl.maskllm.wiki"]["n"]

    assert older(*same) == 2  # it ran with the values the current params have
    # before the validation split its train split held the validation articles: another state
    assert older("data.validation_fraction") == 1


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


def test_mlflow_is_refilled_from_the_ledger_and_nothing_is_read_back(book, monkeypatch):
    """A fresh clone: an empty MLflow store and the committed ledger. The export gives every state a
    parent run with its params, results and name, in a model-training experiment; it changes no byte of
    the ledger, and a second export changes nothing in MLflow."""
    for name, tau, ppl in [("current", 4.0, 40.0), ("tau-1", 1.0, 55.5), ("tau-8", 8.0, 47.25)]:
        log_state(book, params(tau=tau), {"maskllm": ppl, "sparsegpt": 50.0}, name)
    text = (book / "states.json").read_text()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{book / 'fresh.db'}")
    c = mlflow_export.client()
    assert mlflow_export.export_states(c, ledger.read()) == 3
    assert mlflow_export.export_states(c, ledger.read()) == 0
    assert (book / "states.json").read_text() == text
    exp = c.get_experiment_by_name("smollm2/wiki/2:4")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.data.tags["state_id"]: r for r in c.search_runs([exp.experiment_id], "tags.role = 'pipeline'")}
    for e in ledger.read():
        run = runs[e["id"]]
        assert run.data.metrics == e["metrics"] and run.data.params == e["params"]
        assert run.info.run_name == e["run_name"] and run.info.start_time == e["start_time"]
    assert sorted(r.info.run_name for r in runs.values()) == ["learn.kappa=100.0, learn.weight_reg=1e-05",
                                                            "learn.tau=1.0, learn.kappa=100.0, learn.weight_reg=1e-05",
                                                            "learn.tau=8.0, learn.kappa=100.0, learn.weight_reg=1e-05"]

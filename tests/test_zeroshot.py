"""Zero-shot accuracy through lm-evaluation-harness (pipeline/evaluation/zeroshot.py, tasks/, stages/zeroshot.py).

The task YAMLs load in lm-eval; the harness's scores on a tiny random LLaMA equal an independent
reimplementation (log-likelihoods, greedy match, multiple-choice argmax); a hub task without the
hub fails in seconds naming the fix; a local stand-in in the hub dataset's format runs lm-eval's
own task definition; the task names are validated with the params; the micro pipeline writes
and logs the results.
"""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.evaluation import zeroshot
from pipeline.config import HUB_TASKS, Data, ParamsError, parse_params
from pipeline.evaluation.lastword import interleave, split_target
from pipeline.evaluation.rows import ROWS
from tests.conftest import BIN, ROOT, repo_env

ARTICLES = [
    "The old lighthouse stood on the cliff above the harbour for two hundred years. Sailors saw its light "
    "from far away at night. The keeper climbed the stairs every evening to light the lamp. One winter a "
    "storm broke the glass and the keeper repaired it before the ships came home.",
    "Bees collect nectar from many flowers during the warm months of the year. They turn the nectar into "
    "honey inside the hive. A strong colony can hold thousands of workers and a single queen. The workers "
    "guard the entrance and fan their wings to cool the honey.",
    "A river starts as a small stream high in the mountains and grows as other streams join it. It carves "
    "valleys through the rock over thousands of years. Near the sea it slows down and drops its sand and mud.",
]
PIQA = [  # lm-eval's piqa reads these columns (baber/piqa): goal, sol1, sol2, label
    {"goal": "How do I keep bread fresh?", "sol1": "Store it in a sealed bag.", "sol2": "Leave it in the rain.", "label": 0},
    {"goal": "How to cool a drink quickly?", "sol1": "Put it in the oven.", "sol2": "Put it in ice water.", "label": 1},
    {"goal": "How to open a jar?", "sol1": "Tap the lid and twist.", "sol2": "Paint the jar blue.", "label": 0},
    {"goal": "How to dry wet shoes?", "sol1": "Stuff them with paper.", "sol2": "Fill them with soup.", "label": 0},
    {"goal": "How to light a dark room?", "sol1": "Close the curtains.", "sol2": "Switch on a lamp.", "label": 1},
]


@pytest.fixture(scope="module")
def tiny():
    """A tiny random LLaMA and a BPE tokenizer trained on the articles (like the micro profile's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.model.tokenizer import train_bpe

    tok = train_bpe(ARTICLES + [f"{r['goal']} {r['sol1']} {r['sol2']}" for r in PIQA], 320)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True)).eval()
    return model, tok


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A pipeline-shaped folder (the task YAMLs read artifacts/domains/<d>/test.jsonl from the cwd)."""
    (tmp_path / "artifacts/domains/wiki").mkdir(parents=True)
    (tmp_path / "artifacts/domains/wiki/test.jsonl").write_text("".join(json.dumps({"text": a}) + "\n" for a in ARTICLES))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def loglikelihood(model, tok, context: str, continuation: str, seqlen: int) -> tuple[float, bool]:
    """log P(continuation | context) and whether it is the greedy continuation, written out by hand:
    encode the pair, keep the last seqlen + 1 tokens, one forward, sum the continuation's log-probs."""
    whole = tok(context + continuation)["input_ids"]
    n_ctx = len(tok(context)["input_ids"])
    cont = whole[n_ctx:]
    ids = whole[-(seqlen + 1):][:-1]  # the model sees seqlen tokens; the last one is only a target
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    rows = logp[-len(cont):]
    target = torch.tensor(cont)
    return rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


# ------------------------------------------------------------------ the task YAMLs in lm-eval

def test_every_domain_has_a_lastword_task_reading_its_test_articles():
    manager = zeroshot.task_manager([])
    for domain in Data.model_fields["source"].annotation.__args__:
        entry = manager.task_index[f"lastword_{domain}"]
        cfg = yaml.safe_load(Path(entry.yaml_path).read_text())
        assert cfg["dataset_kwargs"]["data_files"] == {"test": f"artifacts/domains/{domain}/test.jsonl"}
    assert not [t for t in manager.all_tasks if t in HUB_TASKS]  # lm-eval's own tasks are not indexed


def test_hub_tasks_are_lm_evals_own_definitions():
    """The folders indexed for the hub tasks hold the very YAMLs lm-eval's full index names."""
    from lm_eval.tasks import TaskManager

    assert set(zeroshot.HUB_FOLDERS) == set(HUB_TASKS)
    manager, full = zeroshot.task_manager(list(HUB_TASKS)), TaskManager()
    for task in HUB_TASKS:
        assert manager.task_index[task].yaml_path == full.task_index[task].yaml_path


def test_lastword_docs_are_the_interleaved_passages_in_lambadas_format(workdir):
    task = zeroshot.load_tasks(["lastword_wiki"])["lastword_wiki"]
    docs = list(task.test_docs())
    assert [d["text"] for d in docs] == interleave(ARTICLES) and len(docs) > 6
    for doc in docs[:5]:
        assert (task.doc_to_text(doc), task.doc_to_target(doc)) == split_target(doc["text"])



def test_a_domain_without_any_last_word_passage_is_refused_by_name(workdir):
    (workdir / "artifacts/domains/pydocs").mkdir(parents=True)
    (workdir / "artifacts/domains/pydocs/test.jsonl").write_text(json.dumps({"text": "f(x) returns x plus 1."}) + "\n")
    with pytest.raises(zeroshot.ZeroShotError, match=r"lastword_pydocs: .*domain 'pydocs'.*no last-word passage.*"
                                                     r"evaluate\.zeroshot_tasks"):
        zeroshot.load_tasks(["lastword_wiki", "lastword_pydocs"])

def test_lastword_scores_equal_an_independent_reimplementation(workdir, tiny):
    model, tok = tiny
    seqlen = 24  # shorter than most contexts: the cut from the left is exercised too
    tasks = zeroshot.load_tasks(["lastword_wiki"])
    results = zeroshot.evaluate(model, tok, tasks, limit=None, seqlen=seqlen, batch_size=4)
    got = zeroshot.summarize(results)["lastword_wiki"]
    passages = interleave(ARTICLES)
    mine = [loglikelihood(model, tok, *split_target(p), seqlen) for p in passages]
    harness = {s["doc"]["text"]: s["resps"][0][0][0] for s in results["samples"]["lastword_wiki"]}
    assert [harness[p] for p in passages] == pytest.approx([ll for ll, _ in mine], abs=1e-4)
    acc = [float(greedy) for _, greedy in mine]
    assert got["examples"] == got["examples_available"] == len(passages)
    assert got["metrics"]["acc"] == sum(acc) / len(acc)
    assert got["metrics"]["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in mine) / len(mine)), rel=1e-4)
    mean = sum(acc) / len(acc)  # the standard error of a mean (Bessel-corrected): the harness's own
    assert got["stderr"]["acc"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in acc) / (len(acc) - 1) / len(acc)))
    assert got["stderr"]["perplexity"] > 0 and got["chance"] is None and got["output_type"] == "loglikelihood"


def test_limit_takes_the_first_passages(workdir, tiny):
    model, tok = tiny
    results = zeroshot.evaluate(model, tok, zeroshot.load_tasks(["lastword_wiki"]), limit=3, seqlen=32, batch_size=2)
    assert [s["doc"]["text"] for s in results["samples"]["lastword_wiki"]] == interleave(ARTICLES)[:3]
    assert zeroshot.summarize(results)["lastword_wiki"]["examples"] == 3


def test_an_answer_longer_than_the_context_length_names_the_param(workdir, tiny):
    model, tok = tiny
    with pytest.raises(zeroshot.ZeroShotError, match="evaluate.zeroshot_seqlen=1: raise it"):
        zeroshot.evaluate(model, tok, zeroshot.load_tasks(["lastword_wiki"]), limit=4, seqlen=1, batch_size=2)


# ------------------------------------------------------------------ hub tasks

def write_piqa(folder: Path, splits=("train", "validation")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PIQA))
    return folder


def test_a_local_piqa_stand_in_runs_lm_evals_piqa(workdir, tiny):
    """The hub-format stand-in goes through lm-eval's own piqa definition; only the data's place changes."""
    model, tok = tiny
    local = write_piqa(workdir / "piqa")
    task = zeroshot.load_tasks(["piqa"], {"piqa": str(local)})["piqa"]
    assert task.config.dataset_path == str(local.resolve()) and task.config.doc_to_text == "Question: {{goal}}\nAnswer:"
    results = zeroshot.evaluate(model, tok, {"piqa": task}, limit=None, seqlen=64, batch_size=4)
    got = zeroshot.summarize(results)["piqa"]
    correct = []
    for r in PIQA:  # multiple choice: the answer with the highest log-likelihood after " "
        lls = [loglikelihood(model, tok, f"Question: {r['goal']}\nAnswer:", f" {s}", 64)[0] for s in (r["sol1"], r["sol2"])]
        correct.append(float(lls.index(max(lls)) == r["label"]))
    assert got["metrics"]["acc"] == sum(correct) / len(correct) and got["examples"] == len(PIQA)
    assert got["chance"] == 0.5 and got["output_type"] == "multiple_choice" and "acc_norm" in got["metrics"]


def test_a_local_copy_without_a_split_names_the_splits(workdir):
    local = write_piqa(workdir / "piqa", splits=("validation",))
    with pytest.raises(zeroshot.ZeroShotError, match=r"evaluate.zeroshot_data.piqa: .*\['train', 'validation'\]"):
        zeroshot.load_tasks(["piqa"], {"piqa": str(local)})


def offline_load(tmp_path, **env) -> tuple[subprocess.CompletedProcess, float]:
    """load_tasks(['piqa']) in a fresh process with an empty Hugging Face cache."""
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", "from pipeline.evaluation import zeroshot; zeroshot.load_tasks(['piqa'])"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**{k: v for k, v in repo_env(HF_HOME=str(tmp_path / "hf")).items()
                                 if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}, **env})
    return res, time.monotonic() - t0


@pytest.mark.parametrize("setting", ["HF_HUB_OFFLINE", "refused", "silent"])
def test_a_hub_task_without_the_hub_fails_in_seconds_naming_the_fix(tmp_path, setting):
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            refused = s.getsockname()[1]  # bound, not listening: connections are refused
        env = {"HF_HUB_OFFLINE": {"HF_HUB_OFFLINE": "1"},
               "refused": {"HF_ENDPOINT": f"http://127.0.0.1:{refused}"},
               "silent": {"HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}"}}[setting]
        res, took = offline_load(tmp_path, **env)
    assert res.returncode != 0
    err = res.stderr.splitlines()[-1]
    assert err.startswith("pipeline.evaluation.zeroshot.ZeroShotError: zero-shot task 'piqa' needs its dataset"), res.stderr[-3000:]
    assert "evaluate.zeroshot_data.piqa" in err and "remove 'piqa' from evaluate.zeroshot_tasks" in err
    assert ("HF_HUB_OFFLINE is set" if setting == "HF_HUB_OFFLINE" else "is unreachable") in err
    assert took < 90  # a process start and imports; the hub's own retries would take minutes


def test_the_stage_stops_on_an_offline_hub_task_before_building_the_model(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["evaluate"]["zeroshot_tasks"] = ["lastword", "piqa"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = repo_env(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    res = subprocess.run([str(BIN / "python"), "-m", "stages.zeroshot", "dense", "piqa"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    # no artifacts/dense here: the error is the hub's, so it came before the model
    assert res.returncode == 1 and "[zeroshot dense @ piqa] error: zero-shot task 'piqa' needs" in res.stderr, res.stderr
    assert not (tmp_path / "metrics").exists()


# ------------------------------------------------------------------ params

def params_with(**evaluate):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["evaluate"].update(evaluate)
    return parse_params(raw)


def test_task_names_are_validated_with_the_key_and_the_fix():
    assert params_with(zeroshot_tasks=["lastword", *HUB_TASKS]).evaluate.zeroshot_tasks[1:] == list(HUB_TASKS)
    assert params_with(zeroshot_tasks=["lastword_numpy", "piqa"], zeroshot_data={"piqa": "/d"}).evaluate.zeroshot_data
    bad = {"hellaswag2": r"unknown task 'hellaswag2' \(one of \['lastword', 'lastword_wiki'",
           "lastword_c4": r"unknown task 'lastword_c4' \(lastword_c4 needs 'c4' in evaluate.domains\)"}
    for task, message in bad.items():
        with pytest.raises(ParamsError, match=f"evaluate.zeroshot_tasks: {message}"):
            params_with(zeroshot_tasks=["lastword", task])
    with pytest.raises(ParamsError, match="names a task twice"):
        params_with(zeroshot_tasks=["lastword", "lastword_wiki"])
    with pytest.raises(ParamsError, match="names a task twice"):
        params_with(zeroshot_tasks=["piqa", "piqa"])
    with pytest.raises(ParamsError, match="evaluate.zeroshot_data.boolq: 'boolq' is not in evaluate.zeroshot_tasks"):
        params_with(zeroshot_tasks=["piqa"], zeroshot_data={"boolq": "/d"})
    with pytest.raises(ParamsError, match="evaluate.zeroshot_data.lastword"):
        params_with(zeroshot_data={"lastword": "/d"})
    with pytest.raises(ParamsError, match="zeroshot_limit"):
        params_with(zeroshot_limit=0)


def test_lastword_runs_one_task_per_evaluation_domain():
    assert zeroshot.leaves("lastword", ["wiki", "pydocs"]) == ["lastword_wiki", "lastword_pydocs"]
    assert zeroshot.leaves("piqa", ["wiki"]) == ["piqa"]


def test_chance_is_the_mean_inverse_number_of_choices():
    samples = [{"arguments": [1, 2]}, {"arguments": [1, 2, 3, 4]}]
    assert zeroshot.chance(samples, "multiple_choice") == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert zeroshot.chance(samples, "loglikelihood") is None


# ------------------------------------------------------------------ the micro pipeline

@pytest.fixture(scope="module")
def micro_zeroshot(micro_base, tmp_path_factory):
    repo = tmp_path_factory.mktemp("micro_zeroshot") / "repo"
    shutil.copytree(micro_base[0], repo, symlinks=True)
    return repo, micro_base[1]


def test_micro_pipeline_writes_and_logs_zero_shot_results(micro_zeroshot):
    repo, res = micro_zeroshot
    params = yaml.safe_load((repo / "params.yaml").read_text())
    domains, limit = params["evaluate"]["domains"], params["evaluate"]["zeroshot_limit"]
    for row in ROWS:
        m = json.loads((repo / "metrics" / row / "zeroshot" / "lastword.json").read_text())
        assert m["harness"] == "lm-eval 0.4.13" and m["limit"] == limit and m["provenance"]["version.lm_eval"] == "0.4.13"
        assert {"device", "dtype", "threads", "version.torch"} <= set(m["provenance"])
        assert sorted(m["results"]) == sorted(f"lastword_{d}" for d in domains)
        for r in m["results"].values():
            assert r["examples"] == min(limit, r["examples_available"]) and r["version"] == 1.0
            assert 0 <= r["metrics"]["acc"] <= 1 and r["stderr"]["acc"] >= 0 and math.isfinite(r["metrics"]["perplexity"])
    assert "[zeroshot dense @ lastword] dense @ lastword: lastword_wiki acc" in res.stdout
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tiny/wiki/2:4"])
    zs = runs[runs["tags.role"] == "zeroshot"]
    assert sorted(zip(zs["tags.method"], zs["tags.task"])) == sorted((r, f"lastword_{d}") for r in ROWS for d in domains)
    assert zs["metrics.acc"].between(0, 1).all() and (zs["params.harness"] == "lm-eval 0.4.13").all()
    assert (zs["params.provenance.version.lm_eval"] == "0.4.13").all()
    parent = runs[runs["tags.role"] == "pipeline"].iloc[0]
    assert parent[f"metrics.zeroshot.maskllm.lastword_{domains[0]}.acc"] == pytest.approx(
        json.loads((repo / "metrics/maskllm/zeroshot/lastword.json").read_text())
        ["results"][f"lastword_{domains[0]}"]["metrics"]["acc"])
    recorded = json.loads((repo / "records" / "states.json").read_text())["states"][-1]["metrics"]
    assert recorded[f"zeroshot.maskllm.lastword_{domains[0]}.acc"] == parent[f"metrics.zeroshot.maskllm.lastword_{domains[0]}.acc"]
    assert (repo / "plots" / "zeroshot.png").read_bytes()[:4] == b"\x89PNG"
    assert os.path.getsize(repo / "plots" / "zeroshot.png") > 10_000

"""params.yaml validation: every bad value names its key path; stages stop before any write."""
import subprocess
import sys

import pytest
import yaml

from pipeline.config import ParamsError, load_params, parse_params
from tests.conftest import ROOT, repo_env


def test_repository_params_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert (p.sparsity.n, p.sparsity.m) == (2, 4)
    assert p.model.source == "smollm2" and p.data.source == "wiki"


@pytest.mark.parametrize(
    "raw, key, hint",
    [
        ({"sparsity": {"n": 4, "m": 4}}, "sparsity", "n must be smaller than m"),
        ({"sparsity": {"n": 0}}, "sparsity.n", "greater than or equal to 1"),
        ({"data": {"source": "imagenet"}}, "data.source", "'wiki'"),
        ({"data": {"test_fraction": 0.9}}, "data.test_fraction", "less than 0.5"),
        ({"model": {"source": "gpt5"}}, "model.source", "'smollm2'"),
        ({"model": {"source": "hf"}}, "model", "needs model.hf_id"),
        ({"model": {"tiny": {"hidden_size": 66, "num_attention_heads": 4}}}, "model.tiny", "divisible"),
        ({"prior": {"methods": ["magnitude", "obs"]}}, "prior.methods.1", "'sparsegpt'"),
        ({"prior": {"methods": []}}, "prior.methods", "non-empty"),
        ({"learn": {"tau": 0}}, "learn.tau", "greater than 0"),
        ({"learn": {"temperature": 4}}, "learn.temperature", "unknown key"),
        ({"learn": {"prior": "wanda"}, "prior": {"methods": ["sparsegpt"]}}, "(top level)", "add it to prior.methods"),
        ({"evaluate": {"dtype": "int8"}}, "evaluate.dtype", "'float32'"),
        ({"evaluate": {"seqlen": "long"}}, "evaluate.seqlen", "integer"),
        ({"plots": {}}, "plots", "unknown key"),
        ({"evaluate": {"domains": ["wiki", "wiki"]}}, "evaluate.domains", "without repeats"),
        ({"evaluate": {"domains": ["wiki", "klingon"]}}, "evaluate.domains.1", "'pydocs'"),
        ({"evaluate": {"domains": ["shakespeare"]}}, "(top level)", "must include the training domain"),
        ({"evaluate": {"validation_rows": ["dense", "sparsegpt", "maskllm", "obs"]}}, "evaluate",
         "unknown row 'obs'"),
        ({"evaluate": {"validation_rows": ["dense", "maskllm"]}}, "evaluate", "lacks ['sparsegpt']: the choices read"),
    ],
)
def test_bad_values_name_the_key(raw, key, hint):
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    msg = str(err.value)
    assert f"  {key}:" in msg, msg
    assert hint in msg, msg


def test_unreadable_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("learn: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_stage_rejects_bad_params_before_any_write(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["evaluate"]["dtype"] = "int8"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    res = subprocess.run([sys.executable, "-m", "stages.data"], cwd=tmp_path, capture_output=True, text=True,
                         env=repo_env(PYTHONPATH=str(ROOT)), timeout=120)
    assert res.returncode == 2
    assert "evaluate.dtype: must be one of" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_the_code_defaults_are_params_yaml_and_every_knob_is_in_it():
    """pipeline/config.py's defaults equal params.yaml's values, key for key: a knob only in the code
    could not be set with `dvc exp run -S`, and a default in two places would drift."""
    import yaml

    from pipeline.config import Params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())

    def keys(d, prefix=""):
        return {f"{prefix}{k}" for k, v in d.items() for f in ([k] if not isinstance(v, dict) or k in ("zeroshot_data",)
                                                                else [None]) if f} | \
            {x for k, v in d.items() if isinstance(v, dict) and k != "zeroshot_data" for x in keys(v, f"{prefix}{k}.")}

    assert keys(raw) == keys(Params().model_dump(mode="json"))
    assert Params().model_dump(mode="json") == parse_params(raw).model_dump(mode="json")


def test_validation_rows_accept_exactly_the_rows_of_the_comparison():
    """Config validation and the evaluation stages read one list of rows (the registry's comparison):
    every row the stages evaluate is accepted on validation, and the error names that same list."""
    from pipeline.evaluation.rows import ROWS
    from pipeline.oneshot import registry

    assert ROWS == tuple(r.name for r in registry.comparison())
    assert ROWS[0] == "dense" and ROWS[-1] == "maskllm" and set(ROWS[1:-1]) == {r.name for r in registry.rows()}
    assert parse_params({"evaluate": {"validation_rows": list(ROWS)}}).evaluate.validation_rows == list(ROWS)
    with pytest.raises(ParamsError) as err:
        parse_params({"evaluate": {"validation_rows": ["dense", "sparsegpt", "maskllm", "obs"]}})
    assert f"one of {list(ROWS)}" in str(err.value)

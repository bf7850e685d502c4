"""The prior stage: what `learn` depends on holds no run-to-run noise; magnitude needs no calibration pass."""
import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.oneshot import calibration
from pipeline.config import parse_params
from pipeline.io import sha256_files

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A repository root with a tiny dense model and a train split, as the dense and data stages leave them."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=256)).save_pretrained(tmp_path / "artifacts/dense")
    (tmp_path / "artifacts/data").mkdir(parents=True)
    np.save(tmp_path / "artifacts/data/train.npy", np.random.default_rng(0).integers(0, 256, 4000).astype(np.int32))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASKLLM_DEVICE", "cpu")
    return tmp_path


def params(**prior):
    return parse_params({"prior": {"nsamples": 4, "seqlen": 32, **prior}})


def outputs(root, method):
    return {f.name: sha256_files(f) for f in sorted((root / "artifacts/prior" / method).iterdir())}


@pytest.mark.parametrize("method", ["sparsegpt", "sparsegpt_noupdate", "wanda"])
def test_rerun_leaves_the_prior_byte_identical_and_times_only_metrics(workdir, method):
    from stages.prior import main

    main(params(), method)
    first = outputs(workdir, method)
    main(params(), method)
    assert outputs(workdir, method) == first  # learn and harden depend on these: nothing reruns
    stats = json.loads((workdir / "artifacts/prior" / method / "stats.json").read_text())
    assert "seconds" not in stats and "reconstruction_error" not in stats and "mean_reconstruction_error" not in stats
    metrics = json.loads((workdir / "metrics/prior" / f"{method}.json").read_text())
    layers = json.loads((workdir / "metrics/prior" / f"{method}_layers.json").read_text())["reconstruction_error"]
    assert metrics["seconds"] > 0 and metrics["provenance"]["threads"] == torch.get_num_threads()
    assert stats["calibration"]["dtype"] == "float64" == metrics["provenance"]["dtype"]  # prior.dtype's default
    if method == "sparsegpt":  # swept in float64, stored in the dense checkpoint's float32
        from safetensors.torch import load_file
        assert {w.dtype for w in load_file(workdir / "artifacts/prior/sparsegpt/weights.safetensors").values()} == {
            torch.float32}
    if method == "wanda":  # prior.reconstruction_error is false by default: Wanda reports none
        assert "reconstruction_error" not in metrics and layers == {}
    else:  # the SparseGPT methods have their Hessians anyway
        assert len(layers) == 14 and 0 < metrics["reconstruction_error"]["mean"] <= metrics["reconstruction_error"]["max"] < 1


def test_magnitude_runs_no_calibration_pass_unless_its_error_is_asked_for(workdir, monkeypatch):
    from stages.prior import main

    calls = []
    capture = calibration.capture_block_inputs
    monkeypatch.setattr(calibration, "capture_block_inputs", lambda *a, **k: calls.append(1) or capture(*a, **k))
    main(params(), "magnitude")
    assert calls == []
    stats = json.loads((workdir / "artifacts/prior/magnitude/stats.json").read_text())
    assert stats["calibration"] is None and "reconstruction_error" not in json.loads(
        (workdir / "metrics/prior/magnitude.json").read_text())
    main(params(reconstruction_error=True), "magnitude")
    assert calls == [1]
    metrics = json.loads((workdir / "metrics/prior/magnitude.json").read_text())
    assert 0 < metrics["reconstruction_error"]["mean"] < 1

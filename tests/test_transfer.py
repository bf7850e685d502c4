"""learn.prior=file: exporting a learned mask with its provenance and reading it back as a prior."""
import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from pipeline.records import ledger
from pipeline.config import ParamsError, parse_params
from pipeline.maskllm.masks import attach_masks
from pipeline.model.masks_io import export_packed_npz, save_masks
from pipeline.maskllm.transfer import PriorFileError, dense_fingerprint, export_mask, load_prior_file, main
from tests.conftest import ROOT
from tests.test_masks_io import magnitude_masks, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")


def dense_dir(tmp_path, model, name="dense"):
    d = tmp_path / name
    d.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if "lm_head" not in k}, d / "model.safetensors")
    return d


@pytest.fixture
def exported(tmp_path):
    model = tiny_llama()
    dense = dense_dir(tmp_path, model)
    masks = magnitude_masks(model)
    save_masks(tmp_path / "harden.safetensors", masks)
    meta = export_mask(tmp_path / "harden.safetensors", tmp_path / "masks" / "general.safetensors", dense_dir=dense,
                       n=2, m=4, learned_on="wiki", method="maskllm", params_hash="p")
    return model, dense, masks, tmp_path / "masks" / "general.safetensors", meta


def test_export_round_trip_keeps_the_masks_and_records_the_provenance(exported):
    model, dense, masks, path, meta = exported
    loaded, read = load_prior_file(path, model, 2, 4, dense)
    assert loaded.keys() == masks.keys() and all(torch.equal(loaded[k], masks[k]) for k in masks)
    assert read == meta and read["dense_sha256"] == dense_fingerprint(dense) and read["learned_on"] == "wiki"
    assert (read["n"], read["m"], read["method"]) == ("2", "4", "maskllm")


def test_a_file_prior_initialises_the_logits_on_its_mask(exported):
    model, dense, masks, path, _ = exported
    priors, _ = load_prior_file(path, model, 2, 4, dense)
    hard = attach_masks(model, 2, 4, priors=priors, prior_strength=3.0, seed=0).hard_masks()
    # alpha * std(pi) per overlapping position: the file's candidate leads by 3 std in every
    # group, so nearly every group's most likely mask is the file's (~6 % of groups without it)
    agree = sum(int((hard[k] == masks[k]).sum()) for k in masks) / sum(m.numel() for m in masks.values())
    assert agree > 0.97


def test_the_authors_packed_npz_is_accepted_without_provenance(tmp_path):
    model = tiny_gpt2()  # Conv1D: masks are stored [in, out]
    masks = magnitude_masks(model)
    export_packed_npz(tmp_path / "released.npz", masks)
    loaded, meta = load_prior_file(tmp_path / "released.npz", model, 2, 4, tmp_path)
    assert meta == {} and all(torch.equal(loaded[k], masks[k]) for k in masks)


def test_a_mask_made_for_other_dense_weights_is_refused(exported, tmp_path):
    model, _, _, path, meta = exported
    other = tiny_llama()
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.add_(1.0)
    with pytest.raises(PriorFileError, match=r"other dense weights.*" + meta["dense_sha256"]):
        load_prior_file(path, other, 2, 4, dense_dir(tmp_path, other, "other"))


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"),
    ("pattern", "is a 2:4 mask but sparsity is 4:8"),
    ("foreign", "no prunable layer of this model"),
    ("suffix", "expected a .safetensors mask"),
])
def test_bad_prior_files_name_the_key_and_the_fix(exported, tmp_path, case, match):
    model, dense, masks, path, _ = exported
    n, m = (4, 8) if case == "pattern" else (2, 4)
    if case == "missing":
        path = tmp_path / "nope.safetensors"
    elif case == "foreign":
        save_masks(path, {**masks, "transformer.h.0.attn.c_attn.weight": torch.ones(4, 4, dtype=torch.bool)})
    elif case == "suffix":
        path = tmp_path / "mask.pt"
        path.write_bytes(b"x")
    with pytest.raises(PriorFileError, match="learn.prior_file") as err:
        load_prior_file(path, model, n, m, dense)
    assert match in str(err.value)


def test_params_need_a_file_with_prior_file_and_only_then():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["learn"].update(prior="file")
    with pytest.raises(ParamsError, match="learn.prior=file needs learn.prior_file"):
        parse_params(raw)
    raw["learn"].update(prior="sparsegpt", prior_file="masks/general.safetensors")
    with pytest.raises(ParamsError, match="set learn.prior=file to use it"):
        parse_params(raw)
    raw["learn"].update(prior="file")
    assert parse_params(raw).learn.prior_file == "masks/general.safetensors"


def test_export_cli_refuses_a_missing_source(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    with pytest.raises(SystemExit, match="dvc repro harden"):
        main(["export", "masks/general.safetensors"])
    assert not (tmp_path / "masks").exists()


# ------------------------------------------------------------- the transfer figure's data

def state(store, source, prior, ppl, prior_file=None):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["source"] = source
    raw["learn"].update(prior=prior, prior_file=prior_file)
    params = parse_params(raw)
    ledger.record(params, {f"ppl.{method}.shakespeare": value for method, value in ppl.items()})
    return params


def test_transfer_states_pair_the_general_state_with_the_runs_learned_on_the_new_domain(tmp_path, monkeypatch):
    from pipeline.records.sweeps import transfer_bars, transfer_states

    monkeypatch.setenv("MASKLLM_LEDGER", str(tmp_path / "states.json"))
    general = state(tmp_path, "wiki", "sparsegpt", {"dense": 50.0, "sparsegpt": 205.0, "maskllm": 231.0})
    state(tmp_path, "shakespeare", "sparsegpt", {"dense": 50.0, "sparsegpt": 150.0, "maskllm": 120.0})
    state(tmp_path, "shakespeare", "file", {"dense": 50.0, "sparsegpt": 150.0, "maskllm": 100.0},
          prior_file="masks/general.safetensors")
    # another hyperparameter: not a transfer of this state
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["source"], raw["learn"]["tau"] = "shakespeare", 1.0
    ledger.record(parse_params(raw), {"ppl.maskllm.shakespeare": 1.0})

    states = transfer_states(general)
    assert list(states) == ["shakespeare"]
    assert sorted((s["prior"], s["ppl"]["maskllm"]) for s in states["shakespeare"]) == [
        ("file:general", 100.0), ("sparsegpt", 120.0)]
    table = {"dense": {"shakespeare": 50.0}, "sparsegpt": {"shakespeare": 205.0}, "maskllm": {"shakespeare": 231.0}}
    bars, dense = transfer_bars("shakespeare", states["shakespeare"], table, "wiki")
    assert [(label, v) for label, v, _ in bars] == [
        ("SparseGPT, wiki mask (no transfer)", 205.0), ("MaskLLM, wiki mask (no transfer)", 231.0),
        ("SparseGPT calibrated on shakespeare", 150.0), ("MaskLLM on shakespeare, prior: sparsegpt", 120.0),
        ("MaskLLM on shakespeare, prior: wiki MaskLLM mask (general)", 100.0)]
    assert dense == 50.0
    # seen from a state learned on shakespeare, wiki has no file-prior run: no transfer figure
    assert transfer_states(parse_params({**raw, "learn": {**raw["learn"], "tau": 4.0}})) == {}


# ------------------------------------------------------------- fused experts (3-D masks)

@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "dbrx"])
def test_a_fused_expert_mask_file_is_accepted_as_a_prior(tmp_path, arch):
    from tests.test_coverage import ARCHS

    model = ARCHS[arch]()
    dense = dense_dir(tmp_path, model)
    masks = magnitude_masks(model)
    assert any(mask.ndim == 3 for mask in masks.values()) or arch == "dbrx"  # DBRX stacks experts in 2-D
    save_masks(tmp_path / "harden.safetensors", masks)
    export_mask(tmp_path / "harden.safetensors", tmp_path / "general.safetensors", dense_dir=dense, n=2, m=4,
                learned_on="wiki", method="maskllm", params_hash="p")
    export_packed_npz(tmp_path / "released.npz", masks)
    for path in (tmp_path / "general.safetensors", tmp_path / "released.npz"):
        loaded, _ = load_prior_file(path, model, 2, 4, dense)
        assert loaded.keys() == masks.keys() and all(torch.equal(loaded[k], masks[k]) for k in masks)


def test_a_fused_expert_prior_is_checked_expert_by_expert(tmp_path):
    from tests.test_coverage import ARCHS

    model = ARCHS["mixtral"]()
    masks = magnitude_masks(model)
    name = "model.layers.0.mlp.experts.down_proj"  # [E, out 64, in 128]
    cases = {
        "transposed": ({**masks, name: masks[name].transpose(1, 2).contiguous()}, r"has shape \(4, 128, 64\)"),
        "not n:m": ({**masks, name: masks[name].clone().index_fill_(2, torch.tensor([0, 1, 2]), True)},
                    r"down_proj: .* groups do not keep exactly 2 of 4 \(not a 2:4 mask\)"),
        "missing": ({k: v for k, v in masks.items() if k != name}, r"no mask for 1 N:M target.*down_proj"),
    }
    for case, (bad, match) in cases.items():
        save_masks(tmp_path / f"{case}.safetensors", bad)
        with pytest.raises(PriorFileError, match=match):
            load_prior_file(tmp_path / f"{case}.safetensors", model, 2, 4, tmp_path)
    # the missing expert weight is fine once sparsity.ignore leaves it dense
    loaded, _ = load_prior_file(tmp_path / "missing.safetensors", model, 2, 4, tmp_path,
                                ignore=[r"layers\.0\.mlp\.experts\.down_proj"])
    assert name not in loaded

"""Mask files: safetensors and packed-npz round trips, applying masks, sparse HF checkpoints."""
import copy
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.oneshot.magnitude import magnitude_mask
from pipeline.model.masks_io import (
    apply_masks,
    export_packed_npz,
    export_sparse_checkpoint,
    import_packed_npz,
    load_masks,
    load_weights,
    save_masks,
    save_weights,
)
from pipeline.model.nm import find_prunable_layers
from tests.tiny_models import tiny_gpt2, tiny_llama


pytestmark = pytest.mark.usefixtures("single_thread")


def magnitude_masks(model):
    """2:4 masks of every prunable layer, shaped like the stored parameter (fused experts: 3-D)."""
    return {layer.param_name: layer.stored(magnitude_mask(layer.weight(), 2, 4)).contiguous()
            for layer in find_prunable_layers(model, 4)}


def test_safetensors_round_trip(tmp_path):
    masks = magnitude_masks(tiny_llama())
    path = tmp_path / "sub" / "masks.safetensors"
    save_masks(path, masks)
    loaded = load_masks(path)
    assert loaded.keys() == masks.keys()
    assert all(loaded[k].dtype == torch.bool and torch.equal(loaded[k], masks[k]) for k in masks)
    assert os.listdir(path.parent) == ["masks.safetensors"]  # no temporary file left behind


def test_packed_npz_round_trip_in_the_authors_format(tmp_path):
    model = tiny_gpt2()
    masks = magnitude_masks(model)
    path = tmp_path / "mask_compressed.npz"
    export_packed_npz(path, masks)
    with np.load(path) as raw:  # keys "<param>.mask", values np.packbits of the flattened mask
        name = "transformer.h.0.attn.c_attn.weight"
        assert raw[name + ".mask"].dtype == np.uint8
        assert np.array_equal(np.unpackbits(raw[name + ".mask"]).reshape(64, 192), masks[name].numpy())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    loaded = import_packed_npz(path, shapes)
    assert loaded.keys() == masks.keys() and all(torch.equal(loaded[k], masks[k]) for k in masks)
    with pytest.raises(ValueError, match="names no parameter"):
        import_packed_npz(path, {"x.weight": (4, 4)})
    with pytest.raises(ValueError, match="not the packed size"):
        import_packed_npz(path, {**shapes, name: (64, 64)})


def test_weights_round_trip(tmp_path):
    source, target = tiny_llama(), tiny_llama()
    name = "model.layers.0.mlp.up_proj.weight"
    with torch.no_grad():
        source.state_dict()[name].mul_(2)
    save_weights(tmp_path / "w.safetensors", {name: source.state_dict()[name]})
    load_weights(target, tmp_path / "w.safetensors")
    assert torch.equal(target.state_dict()[name], source.state_dict()[name])
    save_weights(tmp_path / "bad.safetensors", {"lm_head.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match="'lm_head.bias'"):
        load_weights(target, tmp_path / "bad.safetensors")


def test_apply_masks_checks_names_and_shapes():
    model = tiny_llama()
    masks = magnitude_masks(model)
    name = "model.layers.1.mlp.down_proj.weight"
    before = model.state_dict()[name].clone()
    apply_masks(model, masks)
    after = model.state_dict()[name]
    assert torch.equal(after, before * masks[name])
    with pytest.raises(ValueError, match=r"'model\.layers\.9\.mlp\.up_proj\.weight': .* no parameter"):
        apply_masks(model, {"model.layers.9.mlp.up_proj.weight": masks[name]})
    with pytest.raises(ValueError, match=rf"'{name}': shape \(128, 64\) does not match"):
        apply_masks(model, {name: masks[name].t()})


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_sparse_checkpoint_reloads_with_identical_logits(tmp_path, build):
    model = build()
    masks = magnitude_masks(model)
    out = tmp_path / "sparse"
    export_sparse_checkpoint(model, masks, out)
    assert torch.count_nonzero(model.state_dict()[next(iter(masks))]) == masks[next(iter(masks))].numel()  # untouched
    masked = copy.deepcopy(model)
    apply_masks(masked, masks)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = masked(tokens).logits, reloaded(tokens).logits
    assert torch.equal(want, got)
    for name, mask in masks.items():
        assert (reloaded.state_dict()[name][~mask] == 0).all()
    export_sparse_checkpoint(model, masks, out)  # overwriting an export works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sparse"]


@pytest.mark.parametrize("arch, stored_in_out", [("mixtral", False), ("gpt_oss", True)])
def test_fused_expert_masks_round_trip_and_apply(tmp_path, arch, stored_in_out):
    """3-D masks [E, out, in] (Mixtral) or [E, in, out] (GPT-OSS): files, the authors' npz, applying them."""
    from tests.test_coverage import ARCHS

    model = ARCHS[arch]()
    masks = magnitude_masks(model)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    param = model.get_parameter(name)
    assert masks[name].shape == param.shape and masks[name].ndim == 3
    # the mask of expert 2, built here by hand from its [out, in] matrix, is the stored one's slice
    w2 = param[2].t() if stored_in_out else param[2]
    hand = magnitude_mask(w2, 2, 4)
    assert torch.equal(masks[name][2], hand.t() if stored_in_out else hand)
    save_masks(tmp_path / "m.safetensors", masks)
    loaded = load_masks(tmp_path / "m.safetensors")
    assert all(torch.equal(loaded[k], masks[k]) for k in masks) and loaded[name].shape == param.shape
    export_packed_npz(tmp_path / "m.npz", masks)
    with np.load(tmp_path / "m.npz") as raw:  # C-order bits of the stored 3-D mask
        bits = np.unpackbits(raw[name + ".mask"], count=param.numel()).reshape(tuple(param.shape))
        assert np.array_equal(bits, masks[name].numpy())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert all(torch.equal(v, masks[k]) for k, v in import_packed_npz(tmp_path / "m.npz", shapes).items())
    before = param.detach().clone()
    apply_masks(model, masks)
    assert torch.equal(param, torch.where(masks[name], before, torch.zeros(())))
    with pytest.raises(ValueError, match=rf"'{name}': shape .* does not match"):
        apply_masks(model, {name: masks[name].transpose(1, 2)})
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(0, 256, (1, 16))).logits).all()

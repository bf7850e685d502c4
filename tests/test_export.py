"""Sparse export and apply_masks: pruned weights are +0.0 (not -0.0), exactly M - N pruned per group by the
mask, the checkpoint loads with plain transformers and gives the masked model's perplexity."""
import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline.evaluation.perplexity import perplexity
from pipeline.oneshot.magnitude import magnitude_mask
from pipeline.model.masks_io import apply_masks, export_sparse_checkpoint
from pipeline.model.nm import find_prunable_layers
from tests.tiny_models import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")


def with_kept_zeros(model, every=7):
    """Set every ``every``-th weight of the prunable layers to 0.0, as dequantised 4-bit weights have."""
    with torch.no_grad():
        for layer in find_prunable_layers(model):
            layer.module.weight.view(-1)[::every] = 0.0
    return model


def nm_masks(model, n, m):
    """{parameter name: bool mask shaped like the stored parameter}, N:M along the input dim, by |W|."""
    masks = {}
    for layer in find_prunable_layers(model, m):
        mask = magnitude_mask(torch.randn(layer.weight().shape), n, m)  # random: pruned weights of both signs
        masks[layer.param_name] = mask.t().contiguous() if layer.transposed else mask
    return masks, {layer.param_name: layer.transposed for layer in find_prunable_layers(model)}


def out_in(t, transposed):
    return t.t() if transposed else t


def test_w_times_mask_makes_negative_zeros():
    # The bug: a pruned negative weight times 0 is -0.0, which 2:4 packers that test bits read as nonzero.
    w = torch.tensor([-1.5, 2.0, -0.25, 3.0])
    mask = torch.tensor([False, True, False, True])
    assert torch.signbit(w * mask).tolist() == [True, False, True, False]
    model = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w)
    apply_masks(model, {"weight": mask.view(1, 4)})
    assert torch.signbit(model.weight.view(-1)).tolist() == [False, False, False, False]
    assert model.weight.view(-1).tolist() == [0.0, 2.0, 0.0, 3.0]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_apply_masks_writes_positive_zeros_and_keeps_the_rest_bit_for_bit(build):
    model = with_kept_zeros(build())
    masks, _ = nm_masks(model, 2, 4)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    assert any((before[name][~mask] < 0).any() for name, mask in masks.items())  # the case that made -0.0
    apply_masks(model, masks)
    after = model.state_dict()
    for name, mask in masks.items():
        assert not torch.signbit(after[name][~mask]).any() and (after[name][~mask] == 0).all(), name
        assert torch.equal(after[name][mask].view(torch.int32), before[name][mask].view(torch.int32)), name
    for name in set(before) - set(masks):
        assert torch.equal(after[name], before[name]), name


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8)])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_export_zeros_are_positive_and_exactly_nm_by_the_mask(tmp_path, build, pattern):
    n, m = pattern
    model = with_kept_zeros(build())
    masks, transposed = nm_masks(model, n, m)
    source = {name: t.clone() for name, t in model.state_dict().items()}
    export_sparse_checkpoint(model, masks, tmp_path / "sparse")
    saved = load_file(str(tmp_path / "sparse" / "model.safetensors"))  # the bits on disk
    more_zeros = 0
    for name, mask in masks.items():
        w = saved[name]
        assert torch.equal(w[~mask].view(torch.int32), torch.zeros_like(w[~mask], dtype=torch.int32)), name  # +0.0 bits
        assert torch.equal(w[mask].view(torch.int32), source[name][mask].view(torch.int32)), name  # kept, unchanged
        # Per group of m inputs: exactly m - n pruned, counted with the mask. Counted by value, a group
        # holds more zeros exactly where a kept weight is itself 0.0, and never fewer.
        groups = out_in(mask, transposed[name]).reshape(-1, m)
        assert ((~groups).sum(dim=1) == m - n).all(), name
        zeros = (out_in(w, transposed[name]) == 0).reshape(-1, m).sum(dim=1)
        kept_zeros = (out_in(mask & (source[name] == 0), transposed[name])).reshape(-1, m).sum(dim=1)
        assert torch.equal(zeros, (m - n) + kept_zeros), name
        more_zeros += int((kept_zeros > 0).sum())
    assert more_zeros > 0  # the kept-zero case was exercised
    assert torch.equal(model.state_dict()[name], source[name])  # the model itself is untouched


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_export_loads_with_plain_transformers_and_gives_the_masked_models_ppl(tmp_path, build):
    model = with_kept_zeros(build())
    masks, _ = nm_masks(model, 2, 4)
    export_sparse_checkpoint(model, masks, tmp_path / "sparse")
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse", output_loading_info=True)
    reloaded.eval()
    assert type(reloaded) is type(model)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    masked = copy.deepcopy(model)
    apply_masks(masked, masks)
    state = reloaded.state_dict()
    for name, mask in masks.items():
        assert not torch.signbit(state[name][~mask]).any() and (state[name][~mask] == 0).all(), name
    tokens = torch.randint(0, 256, (16 * 10 + 5,), generator=torch.Generator().manual_seed(0))
    want = perplexity(masked, tokens, seqlen=16, batch_size=4)
    got = perplexity(reloaded, tokens, seqlen=16, batch_size=4)
    assert got == want and got["windows"] == 10
    dense = perplexity(model, tokens, seqlen=16, batch_size=4)
    assert dense["ppl"] != got["ppl"]  # the masks do change the model


def test_export_of_fused_expert_weights_writes_positive_zeros(tmp_path):
    # Mixtral's experts are one [E, 2I, H] parameter per block: masks of any rank go through the same path.
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, num_local_experts=4, num_experts_per_tok=2)).eval()
    masks = {layer.param_name: layer.stored(magnitude_mask(torch.randn(layer.weight().shape), 2, 4))
             for layer in find_prunable_layers(model, 4)}
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert masks[name].ndim == 3
    export_sparse_checkpoint(model, masks, tmp_path / "sparse")
    source = model.state_dict()
    assert (source[name][~masks[name]] < 0).any()
    # save_pretrained writes the experts in the per-expert layout of the original checkpoints:
    # no zero on disk carries a sign bit, and reloaded (fused again) the pruned entries are +0.0 bits
    for key, t in load_file(str(tmp_path / "sparse" / "model.safetensors")).items():
        assert not torch.signbit(t[t == 0]).any(), key
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse").state_dict()
    for key, mask in masks.items():
        pruned = reloaded[key][~mask]
        assert torch.equal(pruned.view(torch.int32), torch.zeros_like(pruned, dtype=torch.int32)), key
        assert torch.equal(reloaded[key][mask], source[key][mask])

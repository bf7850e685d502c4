"""Magnitude and Wanda by hand, N:M properties of all methods, block-sequential prune_oneshot end to end."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

from pipeline.oneshot.calibration import InputStats, capture_block_inputs, observe_block
from pipeline.data.tokens import sample_windows
from pipeline.oneshot.magnitude import magnitude_mask
from pipeline.model.nm import NMError, find_blocks, find_prunable_layers, is_nm
from pipeline.oneshot.prune import prune_oneshot
from pipeline.oneshot.sparsegpt import sparsegpt_prune
from pipeline.oneshot.wanda import wanda_mask
from tests.tiny_models import tiny_gpt2, tiny_llama


pytestmark = pytest.mark.usefixtures("single_thread")


W8 = torch.tensor([
    [1.0, -4.0, 3.0, 2.0, -8.0, 5.0, -6.0, 7.0],
    [-2.0, 1.0, 0.6, 3.0, 6.0, -1.0, 2.0, -7.0],
    [9.0, -9.5, 0.1, 0.2, 1.0, 2.0, 3.0, 4.0],
    [0.3, -0.2, 0.4, -0.1, -5.0, 4.0, -3.0, 2.0],
    [0.0, 0.01, -0.02, 0.03, 10.0, -20.0, 30.0, -40.0],
    [5.0, 4.0, -3.0, -6.0, 0.5, -0.6, 0.7, 0.8],
    [-1.0, -2.0, -3.0, -4.0, 4.0, 3.0, 2.5, 1.0],
    [2.5, -1.5, 1.5, -2.0, -0.9, 0.8, -0.7, 0.6],
])


def test_magnitude_2_4_by_hand():
    expected = torch.tensor([
        [0, 1, 1, 0, 1, 0, 0, 1],
        [1, 0, 0, 1, 1, 0, 0, 1],
        [1, 1, 0, 0, 0, 0, 1, 1],
        [1, 0, 1, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0, 0, 1, 1],
        [1, 0, 0, 1, 0, 0, 1, 1],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [1, 0, 0, 1, 1, 1, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(magnitude_mask(W8, 2, 4), expected)


def test_wanda_2_4_by_hand():
    # one calibration token per row of X: ||X_j||_2 = [1, 1, 4, 1, 0.5, 2, 1, 1]
    X = torch.tensor([[1.0, -1.0, 4.0, 1.0, 0.5, -2.0, 1.0, 1.0]])
    stats = InputStats(8, X.device, norms=True)
    stats.add_batch(X)
    assert torch.equal(stats.sq_norms, torch.tensor([1, 1, 16, 1, 0.25, 4, 1, 1], dtype=torch.float64))
    expected = torch.tensor([
        [0, 1, 1, 0, 0, 1, 0, 1],
        [0, 0, 1, 1, 1, 0, 0, 1],
        [1, 1, 0, 0, 0, 1, 0, 1],
        [1, 0, 1, 0, 0, 1, 1, 0],
        [0, 0, 1, 1, 0, 1, 0, 1],
        [0, 0, 1, 1, 0, 1, 0, 1],
        [0, 0, 1, 1, 0, 1, 1, 0],
        [1, 0, 1, 0, 0, 1, 1, 0],
    ], dtype=torch.bool)
    assert torch.equal(wanda_mask(W8, stats.sq_norms, 2, 4), expected)


@settings(max_examples=25, deadline=None)
@given(
    pattern=st.sampled_from([(1, 4), (2, 4), (4, 8), (2, 8)]),
    rows=st.integers(1, 12),
    groups=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_every_method_gives_exact_nm(pattern, rows, groups, seed):
    n, m = pattern
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, groups * m, generator=gen)
    X = torch.randn(3 * groups * m, groups * m, generator=gen)
    H = 2 * X.t() @ X
    sq_norms = X.double().square().sum(dim=0)
    sparse_mask, sparse = sparsegpt_prune(W, H, n, m, blocksize=m)
    for mask in (magnitude_mask(W, n, m), wanda_mask(W, sq_norms, n, m), sparse_mask):
        assert mask.dtype == torch.bool and mask.shape == W.shape
        assert is_nm(mask, n, m)
    assert (sparse[~sparse_mask] == 0).all()


# ---------------------------------------------------------------- whole models

def calib_tokens(nsamples=6, seqlen=32):
    tokens = torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(1))
    return sample_windows(tokens, nsamples, seqlen, seed=0)  # what the prior stage calibrates on


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_oneshot_end_to_end(build, method):
    model = build()
    dense = copy.deepcopy(model)
    result = prune_oneshot(model, method, calib_tokens(), 2, 4, batch_size=4, progress=False)
    state = model.state_dict()
    layers = find_prunable_layers(model)
    assert set(result.masks) == {layer.param_name for layer in layers}
    for layer in layers:
        mask, weight = result.masks[layer.param_name], state[layer.param_name]
        assert mask.dtype == torch.bool and mask.shape == weight.shape  # stored orientation
        assert is_nm(mask.t() if layer.transposed else mask, 2, 4)
        assert (weight[~mask] == 0).all()
        if method != "sparsegpt":  # the kept weights are untouched
            assert torch.equal(weight[mask], dense.state_dict()[layer.param_name][mask])
    assert 0 < min(result.errors.values()) and max(result.errors.values()) < 1
    assert set(result.errors) == set(result.masks)
    if method == "sparsegpt":
        assert set(result.updated_weights) == set(result.masks)
        assert all(torch.equal(w, state[name]) for name, w in result.updated_weights.items())
    else:
        assert result.updated_weights is None
    for name, param in state.items():  # embeddings, norms, head: untouched
        if name not in result.masks:
            assert torch.equal(param, dense.state_dict()[name]), name


@pytest.mark.parametrize("model", [
    OPTForCausalLM(OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
        word_embed_proj_dim=64, max_position_embeddings=64,
    )),
    Qwen2ForCausalLM(Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256,
    )),
], ids=["opt", "qwen2"])
def test_prune_oneshot_other_architectures(model):
    result = prune_oneshot(model.eval(), "sparsegpt", calib_tokens(), 2, 4, batch_size=4, progress=False)
    assert set(result.masks) == {layer.param_name for layer in find_prunable_layers(model)}
    assert all(is_nm(mask, 2, 4) for mask in result.masks.values())
    assert max(result.errors.values()) < 1


def test_magnitude_needs_no_calibration():
    model = tiny_llama()
    result = prune_oneshot(model, "magnitude", None, 2, 4, progress=False)
    assert len(result.masks) == 14 and result.errors == {}
    with pytest.raises(ValueError, match="needs calibration"):
        prune_oneshot(model, "wanda", None, 2, 4)
    with pytest.raises(ValueError, match="unknown one-shot method 'obs'"):
        prune_oneshot(model, "obs", None, 2, 4)
    with pytest.raises(NMError, match="not divisible by m=3"):
        prune_oneshot(model, "magnitude", None, 1, 3)


def _block1_q_inputs(model, calib):
    """Inputs of block 1's q_proj over a full forward of ``model`` on calib."""
    seen = []
    q_proj = model.model.layers[1].self_attn.q_proj
    handle = q_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    handle.remove()
    return torch.cat(seen)


def test_wanda_calibrates_block1_on_pruned_block0():
    model, calib = tiny_llama(), calib_tokens()
    dense_x = _block1_q_inputs(copy.deepcopy(model), calib)
    seen = []  # what block 1's q_proj receives during prune_oneshot's passes
    handle = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].detach().clone())
    )
    prune_oneshot(model, "wanda", calib, 2, 4, batch_size=3, progress=False)
    handle.remove()
    calibrated_x = torch.cat(seen[:2])  # the statistics pass (2 batches), before block 1 is pruned
    pruned_x = _block1_q_inputs(model, calib)  # block 0 pruned now; block 1's input norm is before its pruning
    dense_norms, calibrated_norms = dense_x.square().sum(dim=(0, 1)), calibrated_x.square().sum(dim=(0, 1))
    torch.testing.assert_close(calibrated_x, pruned_x, rtol=1e-5, atol=1e-5)
    assert (calibrated_norms - dense_norms).abs().max() > 1e-3 * dense_norms.max()


def test_shared_inputs_share_statistics():
    model = tiny_llama()
    _, blocks = find_blocks(model)
    layers = [layer for layer in find_prunable_layers(model) if layer.block == 0]
    with torch.no_grad():
        calls = capture_block_inputs(model, calib_tokens(), batch_size=4)
        stats = observe_block(blocks[0], layers, calls, lambda l: InputStats(l.in_features, "cpu", hessian=True))
    assert all(expert is None for _, expert in stats)  # keyed (parameter name, expert): no experts here
    ids = {name.split(".")[-2]: id(s) for (name, _), s in stats.items()}
    assert ids["q_proj"] == ids["k_proj"] == ids["v_proj"] and ids["gate_proj"] == ids["up_proj"]
    assert len({ids["q_proj"], ids["o_proj"], ids["gate_proj"], ids["down_proj"]}) == 4
    assert all(s.nsamples == 6 for s in stats.values())  # every sample of every batch seen once
    assert len(calls) == 2 and calls[0].hidden.shape == (4, 32, 64)

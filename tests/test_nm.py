"""N:M core: candidate sets, validation, prunable-weight discovery (Linear, fused experts) on tiny models."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MixtralConfig,
    MixtralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from pipeline.model.nm import (
    NMError,
    PrunableLayer,
    candidates,
    check_nm,
    find_blocks,
    find_prunable_layers,
    is_nm,
    topn_mask,
)
from pipeline.model.observe import Layout, LinearUses, locate
from tests.tiny_models import tiny_llama


# ---------------------------------------------------------------- candidates

def test_candidates_2_4_exact_rows_in_order():
    expected = torch.tensor([
        [1, 1, 0, 0],
        [1, 0, 1, 0],
        [1, 0, 0, 1],
        [0, 1, 1, 0],
        [0, 1, 0, 1],
        [0, 0, 1, 1],
    ], dtype=torch.float32)
    assert torch.equal(candidates(2, 4), expected)


def test_candidates_1_4_one_hot():
    assert torch.equal(candidates(1, 4), torch.eye(4))


@pytest.mark.parametrize("n, m, count", [(4, 8, 70), (2, 8, 28), (2, 4, 6), (1, 4, 4)])
def test_candidates_count_and_validity(n, m, count):
    cand = candidates(n, m)
    assert cand.shape == (count, m) == (math.comb(m, n), m)
    assert (cand.sum(dim=1) == n).all()
    assert len({tuple(row.tolist()) for row in cand}) == count  # all distinct
    assert is_nm(cand, n, m)


@pytest.mark.parametrize("n, m", [(0, 4), (5, 4), (2, 0)])
def test_bad_pattern_raises(n, m):
    with pytest.raises(NMError):
        candidates(n, m)


# ---------------------------------------------------------------- is_nm / check_nm

def test_is_nm_hand_cases():
    good = torch.tensor([[1, 0, 1, 0, 0, 0, 1, 1], [0, 1, 1, 0, 1, 1, 0, 0]])
    assert is_nm(good, 2, 4)
    assert not is_nm(good, 1, 4)
    assert is_nm(good, 4, 8)
    three_kept = torch.tensor([[1, 1, 1, 0]])
    assert not is_nm(three_kept, 2, 4)
    not_binary = torch.tensor([[2, 0, 0, 0]])  # sums to 2 but is not a mask
    assert not is_nm(not_binary, 2, 4)
    assert is_nm(torch.tensor([[True, False, False, True]]), 2, 4)


def test_check_nm_names_the_layer():
    check_nm(torch.tensor([[1, 1, 0, 0]]), 2, 4, "ok")
    with pytest.raises(NMError, match=r"q_proj: 1 of 2 groups"):
        check_nm(torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0]]), 2, 4, "q_proj")
    with pytest.raises(NMError, match=r"fc: input width 6 is not divisible by m=4"):
        check_nm(torch.ones(2, 6), 2, 4, "fc")


def test_topn_mask_hand_case():
    score = torch.tensor([[0.1, 0.9, 0.5, 0.3, 4.0, 3.0, 2.0, 1.0]])
    assert torch.equal(topn_mask(score, 2, 4), torch.tensor([[0, 1, 1, 0, 1, 1, 0, 0]], dtype=torch.bool))
    assert torch.equal(topn_mask(score, 1, 4), torch.tensor([[0, 1, 0, 0, 1, 0, 0, 0]], dtype=torch.bool))


# ---------------------------------------------------------------- layer discovery

def _names(model):
    return [layer.name for layer in find_prunable_layers(model, 4)]


def test_llama_layers():
    expected = [
        f"model.layers.{b}.{sub}"
        for b in range(2)
        for sub in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    ]
    layers = find_prunable_layers(tiny_llama(), 4)
    assert [layer.name for layer in layers] == expected
    assert [layer.block for layer in layers] == [0] * 7 + [1] * 7
    assert all(not layer.transposed for layer in layers)
    assert layers[1].param_name == "model.layers.0.self_attn.k_proj.weight"
    assert layers[1].weight().shape == (32, 64)  # 2 kv heads x 16


def test_gpt2_conv1d_layers_transposed():
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64))
    layers = find_prunable_layers(model, 4)
    assert [layer.name for layer in layers] == [
        f"transformer.h.{b}.{sub}" for b in range(2) for sub in ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    ]
    c_attn = layers[0]
    assert c_attn.transposed
    assert c_attn.module.weight.shape == (64, 192)  # Conv1D stores [in, out]
    assert c_attn.weight().shape == (192, 64)  # normalised to [out, in]
    assert c_attn.weight().data_ptr() == c_attn.module.weight.data_ptr()  # a view, not a copy


def test_opt_layers():
    model = OPTForCausalLM(OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=256,
        word_embed_proj_dim=64, max_position_embeddings=64,
    ))
    assert _names(model) == [
        f"model.decoder.layers.0.{sub}"
        for sub in ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"]
    ]


def test_qwen2_layers_exclude_embeddings_and_head():
    model = Qwen2ForCausalLM(Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256,
    ))
    names = _names(model)
    assert len(names) == 7 and names[0] == "model.layers.0.self_attn.q_proj"
    assert not any("embed" in n or "lm_head" in n for n in names)


def test_indivisible_layer_raises_naming_it():
    model = tiny_llama(intermediate_size=130)  # down_proj has 130 inputs
    with pytest.raises(NMError, match=r"model\.layers\.0\.mlp\.down_proj: input width 130 is not divisible by m=4"):
        find_prunable_layers(model, 4)
    assert len(find_prunable_layers(model, 2)) == 14  # fine for m=2


def test_topn_mask_keeps_leading_dims():
    score = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    mask = topn_mask(score, 2, 4)
    assert mask.shape == score.shape
    assert all(torch.equal(mask[e], topn_mask(score[e], 2, 4)) for e in range(3))


# ---------------------------------------------------------------- weights that are not nn.Linear

def test_prunable_layer_views_of_fused_and_stacked_experts():
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.in_out = nn.Parameter(torch.randn(3, 8, 5))  # [E, in, out] (GPT-OSS style)
            self.stacked = nn.Parameter(torch.randn(3 * 5, 8))  # [E * out, in] (DBRX style)

    mod = Experts()
    fused = PrunableLayer("m.experts", mod, 0, "in_out", experts=3, transposed=True)
    stacked = PrunableLayer("m.experts", mod, 0, "stacked", experts=3)
    assert fused.param_name == "m.experts.in_out" and fused.weight().shape == (3, 5, 8) == stacked.weight().shape
    assert (fused.in_features, fused.out_features) == (8, 5)
    assert torch.equal(fused.weight()[1], mod.in_out[1].t())  # expert 1's [out, in]
    assert torch.equal(stacked.weight()[1], mod.stacked[5:10])
    with torch.no_grad():  # views: writes reach the parameters
        fused.weight()[2, 0, 0] = 7.0
        stacked.weight()[2, 0, 0] = 9.0
    assert mod.in_out[2, 0, 0] == 7.0 and mod.stacked[10, 0] == 9.0
    mask = torch.rand(3, 5, 8) > 0.5
    for layer in (fused, stacked):
        assert layer.stored(mask).shape == layer.param().shape
        assert torch.equal(layer.logical(layer.stored(mask)), mask)


def test_locate_reads_expert_and_input_dim_from_strides():
    P = torch.zeros(4, 6, 8)  # [E, a, b]
    assert locate(P[2], P) == ([1, 2], 4, 2)  # F.linear(x, P[2]): in = dim 2
    assert locate(P[3].t(), P) == ([2, 1], 4, 3)
    assert locate(P, P) == ([0, 1, 2], 4, None)  # bmm over all experts
    Q = torch.zeros(4 * 6, 8)  # experts stacked along the rows
    assert locate(Q.view(4, 6, 8)[1], Q) == ([1, 2], 4, 1)
    assert locate(Q.view(4, 6, 8)[1].t(), Q) == ([2, 1], 4, 1)
    assert locate(Q, Q) == ([0, 1], None, None)
    assert "partial slice" in locate(P[1, :3], P)  # a half of an expert: no whole matrix
    assert "partial slice" in locate(Q[:5], Q)  # 5 rows do not divide 24


def test_linear_uses_give_layout_expert_and_inputs():
    E, out, inp = 3, 4, 8
    P = torch.randn(E, inp, out)  # stored [E, in, out]
    x = torch.randn(5, inp)
    uses = []
    with LinearUses({"p": P}, uses.append):
        x @ P[1]  # GPT-OSS
        torch.bmm(x.expand(E, 5, inp), P)  # Llama 4
        F.linear(x, P[2].t())  # another reading of the same storage: same layout
    assert [(u.param, u.layout, u.expert) for u in uses] == \
        [("p", Layout(E, True), 1)] + [("p", Layout(E, True), e) for e in range(E)] + [("p", Layout(E, True), 2)]
    assert all(torch.equal(u.inputs, x) for u in uses)
    with LinearUses({"p": P}, uses.append) as watch:
        x[:, :4] @ P[0, :4]  # half of an expert
    assert "p" in watch.unreadable


def test_moe_blocks_are_found_and_gates_left_dense():
    model = MixtralForCausalLM(MixtralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, num_local_experts=4, num_experts_per_tok=2,
    ))
    prefix, blocks = find_blocks(model)
    assert prefix == "model.layers" and len(blocks) == 2
    names = [layer.param_name for layer in find_prunable_layers(model, 4)]
    assert names[:6] == [f"model.layers.0.{s}" for s in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj")]
    assert "model.layers.0.mlp.gate.weight" not in names and len(names) == 12


def test_shapes_are_read_without_running_a_parametrization():
    """MaskLLM parametrizes the weights: asking a layer for its widths must not draw a mask."""
    from torch.nn.utils import parametrize

    class Counting(nn.Module):
        calls = 0

        def forward(self, w):
            Counting.calls += 1
            return w

    experts = nn.Module()
    experts.gate_up_proj = nn.Parameter(torch.randn(3, 8, 6))  # [E, in, out]
    parametrize.register_parametrization(experts, "gate_up_proj", Counting(), unsafe=True)
    layer = PrunableLayer("e", experts, 0, "gate_up_proj", experts=3, transposed=True)
    before = Counting.calls
    assert (layer.in_features, layer.out_features, tuple(layer.shape)) == (8, 6, (3, 8, 6))
    assert layer.stored(torch.zeros(3, 6, 8)).shape == (3, 8, 6)
    assert Counting.calls == before

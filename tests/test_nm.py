"""N:M core: candidate sets, validation and prunable-layer discovery on tiny HF models."""
import math

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from pipeline.nm import NMError, candidates, check_nm, find_prunable_layers, is_nm, topn_mask


def tiny_llama(intermediate_size=128):
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
    ))


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

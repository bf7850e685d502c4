"""Full N:M coverage on tiny random models of dense and mixture-of-experts architectures.

Every weight matrix inside the blocks is an N:M target (nn.Linear, Conv1D, fused experts
in every storage layout transformers 5 uses), a router / gate (dense by design) or named by
``sparsity.ignore``; every one-shot method covers every target with an exact N:M mask
along each expert's input dim; Wanda / SparseGPT calibrate each expert on exactly the
tokens routed to it (checked against an independent reimplementation of the routing);
an expert no token reaches falls back to the magnitude choice.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from pipeline.oneshot import calibration
from pipeline.oneshot.calibration import InputStats, capture_block_inputs, observe_block
from pipeline.config import ParamsError, parse_params
from pipeline.model.coverage import check_coverage, measure_coverage
from pipeline.data.tokens import sample_windows
from pipeline.oneshot.magnitude import magnitude_mask
from pipeline.model.nm import NMError, _probe_layouts, block_weights, find_blocks, find_prunable_layers, is_nm
from pipeline.oneshot.prune import prune_oneshot

pytestmark = pytest.mark.usefixtures("single_thread")

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)


def _seeded(build):
    def make():
        torch.manual_seed(0)
        return build().eval()
    make.__name__ = build.__name__
    return make


# name -> builder; every config is tiny (2 blocks, width 64, 4 experts)
ARCHS = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**BASE)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64,
                                                     bos_token_id=0, eos_token_id=0)),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                                  num_attention_heads=4, vocab_size=256, word_embed_proj_dim=64,
                                                  max_position_embeddings=64)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**BASE)),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**BASE, head_dim=16)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**BASE, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**BASE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
        **BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)),
    "qwen3_moe": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
        **BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16)),
    "olmoe": lambda: tf.OlmoeForCausalLM(tf.OlmoeConfig(**BASE, num_experts=4, num_experts_per_tok=2,
                                                        eos_token_id=1, pad_token_id=0)),
    "gpt_oss": lambda: tf.GptOssForCausalLM(tf.GptOssConfig(
        **BASE, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
        layer_types=["sliding_attention", "full_attention"])),
    "deepseek_v3": lambda: tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
        **BASE, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
        n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16)),
    "llama4": lambda: tf.Llama4ForCausalLM(tf.Llama4TextConfig(
        **BASE, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128, head_dim=16,
        interleave_moe_layer_step=1)),
    "dbrx": lambda: tf.DbrxForCausalLM(tf.DbrxConfig(
        d_model=64, n_heads=4, n_layers=2, vocab_size=256, max_seq_len=64,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2))),
    "jetmoe": lambda: tf.JetMoeForCausalLM(tf.JetMoeConfig(**BASE, num_local_experts=4, num_experts_per_tok=2)),
}
ARCHS = {name: _seeded(build) for name, build in ARCHS.items()}
DENSE = ("llama", "gpt2", "opt", "qwen2", "gemma", "phi3")
MOE = tuple(name for name in ARCHS if name not in DENSE)

# what each MoE architecture's experts look like (written from the transformers sources, not
# computed by the code under test): {parameter suffix: (E, stored [.., in, out])}, gates by suffix
EXPERTS = {
    "mixtral": {"mlp.experts.gate_up_proj": (4, False), "mlp.experts.down_proj": (4, False)},
    "qwen2_moe": {"mlp.experts.gate_up_proj": (4, False), "mlp.experts.down_proj": (4, False)},
    "qwen3_moe": {"mlp.experts.gate_up_proj": (4, False), "mlp.experts.down_proj": (4, False)},
    "olmoe": {"mlp.experts.gate_up_proj": (4, False), "mlp.experts.down_proj": (4, False)},
    "gpt_oss": {"mlp.experts.gate_up_proj": (4, True), "mlp.experts.down_proj": (4, True)},
    "deepseek_v3": {"mlp.experts.gate_up_proj": (4, False), "mlp.experts.down_proj": (4, False)},
    "llama4": {"feed_forward.experts.gate_up_proj": (4, True), "feed_forward.experts.down_proj": (4, True)},
    # DBRX stacks its experts along the rows of 2-D [E * ffn, hidden] weights; w2 is used as x @ w2
    "dbrx": {"ffn.experts.mlp.w1": (4, False), "ffn.experts.mlp.v1": (4, False), "ffn.experts.mlp.w2": (4, True)},
    "jetmoe": {"mlp.input_linear.weight": (4, False), "mlp.output_linear.weight": (4, False),
               "self_attention.experts.input_linear.weight": (4, False),
               "self_attention.experts.output_linear.weight": (4, False)},
}
GATES = {
    "mixtral": ["mlp.gate.weight"], "qwen2_moe": ["mlp.gate.weight", "mlp.shared_expert_gate.weight"],
    "qwen3_moe": ["mlp.gate.weight"], "olmoe": ["mlp.gate.weight"], "gpt_oss": ["mlp.router.weight"],
    "deepseek_v3": ["mlp.gate.weight"], "llama4": ["feed_forward.router.weight"],
    "dbrx": ["ffn.router.layer.weight"],
    "jetmoe": ["mlp.router.layer.weight", "self_attention.experts.router.layer.weight"],
}


def calib_tokens(nsamples=6, seqlen=32):
    tokens = torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(1))
    return sample_windows(tokens, nsamples, seqlen, seed=0)


def logical(mask: torch.Tensor, experts: int | None, transposed: bool) -> torch.Tensor:
    """Independent of PrunableLayer: a stored mask -> [.., out, in] from the EXPERTS table."""
    if experts is not None and mask.ndim == 2:
        mask = mask.reshape(experts, -1, mask.shape[-1])
    return mask.transpose(-1, -2) if transposed else mask


def expected_layout(arch: str, name: str) -> tuple[int | None, bool]:
    for suffix, layout in EXPERTS.get(arch, {}).items():
        if name.endswith(suffix):
            return layout
    return None, arch == "gpt2"  # GPT-2's Conv1D stores [in, out]


# ---------------------------------------------------------------- discovery

@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_block_weight_matrix_is_a_target_or_a_gate(arch):
    model = ARCHS[arch]()
    weights = block_weights(model)
    assert weights.unclassified == {}
    prefix, blocks = find_blocks(model)
    matrices = {f"{prefix}.{b}.{n}" for b, block in enumerate(blocks) for n, p in block.named_parameters()
                if p.ndim >= 2 and not n.endswith("bias")}
    targets = {layer.param_name: layer for layer in weights.targets}
    assert set(targets) | set(weights.gates) == matrices == set(weights.numel)
    assert not set(targets) & set(weights.gates)
    assert {g.split(".", 3)[-1] for g in weights.gates} == set(GATES.get(arch, []))
    for name, layer in targets.items():
        assert (layer.experts, layer.transposed) == expected_layout(arch, name), name
        w = layer.weight()
        assert w.ndim == (3 if layer.experts else 2) and w.untyped_storage().data_ptr() == \
            layer.param().untyped_storage().data_ptr()  # a view: writes reach the parameter
    if arch in MOE:
        assert any(layer.experts for layer in targets.values())


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3"])
def test_the_probe_reads_the_layout_transformers_declares(arch):
    """The observed layout of transformers' fused experts equals their declared ``is_transposed``."""
    model = ARCHS[arch]()
    experts = [layer for layer in block_weights(model).targets if layer.experts]
    layouts = _probe_layouts(model, {layer.param_name: layer.param() for layer in experts})
    for layer in experts:
        assert (layouts[layer.param_name].experts, layouts[layer.param_name].transposed) == \
            (layer.experts, bool(layer.module.is_transposed))


def test_a_weight_the_probe_cannot_read_is_refused_until_ignored():
    """Jamba's Mamba mixer holds A_log [C, S], used by exp(), not as a matrix product."""
    torch.manual_seed(0)
    model = tf.JambaForCausalLM(tf.JambaConfig(
        **BASE, num_experts=4, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
        expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_expand=2)).eval()
    weights = block_weights(model)
    assert list(weights.unclassified) == ["model.layers.0.mamba.A_log"]
    assert "not the weight of any F.linear" in weights.unclassified["model.layers.0.mamba.A_log"]
    assert list(weights.other) == ["model.layers.0.mamba.conv1d.weight"]  # a convolution: not counted
    with pytest.raises(NMError, match=r"model\.layers\.0\.mamba\.A_log.*sparsity\.ignore"):
        find_prunable_layers(model, 4)
    layers = find_prunable_layers(model, 4, ignore=[r"mamba\.A_log$"])
    result = prune_oneshot(model, "sparsegpt", calib_tokens(), 2, 4, batch_size=4, progress=False,
                           ignore=[r"mamba\.A_log$"])
    cov = measure_coverage(model, result.masks, 2, 4, ignore=[r"mamba\.A_log$"])
    check_coverage(cov)
    assert cov.ignored == ("model.layers.0.mamba.A_log",) and cov.target_fraction == 1.0
    assert set(result.masks) == {layer.param_name for layer in layers}
    assert {"model.layers.1.feed_forward.experts.gate_up_proj", "model.layers.0.mamba.in_proj.weight"} <= \
        set(result.masks)


def test_discovery_and_coverage_see_through_a_parametrization():
    """With MaskLLM's masks attached (parametrizations holding logits), the targets and counts are the same."""
    from torch.nn.utils import parametrize

    class Masked(torch.nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.zeros(shape[-1] // 4, 6))  # a 2-D parameter: not a weight

        def forward(self, w):
            return w

    model = ARCHS["mixtral"]()
    before = [(layer.param_name, layer.experts, layer.transposed) for layer in find_prunable_layers(model, 4)]
    masks = {layer.param_name: layer.stored(magnitude_mask(layer.weight(), 2, 4))
             for layer in find_prunable_layers(model, 4)}
    reference = measure_coverage(model, masks, 2, 4)
    for layer in find_prunable_layers(model, 4):
        parametrize.register_parametrization(layer.module, layer.attr, Masked(layer.shape), unsafe=True)
    assert [(layer.param_name, layer.experts, layer.transposed) for layer in find_prunable_layers(model, 4)] == before
    assert measure_coverage(model, masks, 2, 4) == reference


# ---------------------------------------------------------------- every method covers every target

CASES = [(arch, method) for arch in ARCHS for method in ("sparsegpt",)] + \
        [(arch, method) for arch in ("mixtral", "gpt_oss", "dbrx") for method in ("magnitude", "wanda")]


@pytest.mark.parametrize("arch, method", CASES)
def test_every_method_covers_every_target_with_exact_nm(arch, method):
    model = ARCHS[arch]()
    dense = copy.deepcopy(model).state_dict()
    calib = calib_tokens()
    implementation = model.get_experts_implementation()
    result = prune_oneshot(model, method, calib, 2, 4, batch_size=4, progress=False)
    assert model.get_experts_implementation() == implementation  # eager only while calibrating
    cov = measure_coverage(model, result.masks, 2, 4)
    check_coverage(cov)
    assert cov.uncovered == () and cov.target_fraction == 1.0 and cov.nm_fraction > 0.99
    assert cov.gates == tuple(sorted(cov.gates, key=list(block_weights(model).numel).index))
    assert result.fallbacks == [] and set(result.errors) == set(result.masks)
    state = model.state_dict()
    for name, mask in result.masks.items():
        assert mask.dtype == torch.bool and mask.shape == state[name].shape  # stored layout
        experts, transposed = expected_layout(arch, name)
        assert is_nm(logical(mask, experts, transposed), 2, 4), name  # along each expert's input dim
        assert (state[name][~mask] == 0).all()
        if method != "sparsegpt":
            assert torch.equal(state[name][mask], dense[name][mask])
    for name, param in state.items():  # gates, norms, biases, embeddings: untouched
        if name not in result.masks:
            assert torch.equal(param, dense[name]), name
    # whole-model sparsity: exactly half of the covered weights, over all parameters
    assert cov.pruned == cov.nm_weights // 2
    assert cov.model_sparsity == pytest.approx(cov.pruned / sum(p.numel() for p in model.parameters()))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calib[:2]).logits).all()


def test_coverage_figures_by_hand_on_llama():
    model = ARCHS["llama"]()
    masks = {layer.param_name: magnitude_mask(layer.weight(), 2, 4) for layer in find_prunable_layers(model, 4)}
    cov = measure_coverage(model, masks, 2, 4)
    per_block = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 128 * 64  # q, k, v, o, gate, up, down
    total = 256 * 64 * 2 + 5 * 64 + 2 * per_block  # untied embeddings and head, 5 norms
    assert (cov.block_weights, cov.nm_weights, cov.pruned) == (2 * per_block, 2 * per_block, per_block)
    assert cov.model_params == total == sum(p.numel() for p in model.parameters())
    assert cov.nm_fraction == 1.0 and cov.model_sparsity == pytest.approx(per_block / total)
    assert cov.as_dict(names=False)["uncovered"] == 0 and "100.0 % of block weights" in cov.summary()


def test_linear_only_masks_cover_a_fraction_of_a_mixtral_and_fail_naming_the_experts():
    """The bug this fixes: nn.Linear-only discovery masked only the attention of a Mixtral."""
    model = ARCHS["mixtral"]()
    masks = {layer.param_name: magnitude_mask(layer.weight(), 2, 4) for layer in find_prunable_layers(model, 4)
             if isinstance(layer.module, torch.nn.Linear)}
    cov = measure_coverage(model, masks, 2, 4)
    attention, experts = 2 * (64 * 64 * 2 + 32 * 64 * 2), 2 * (4 * 256 * 64 + 4 * 64 * 128)
    assert cov.nm_fraction == pytest.approx(attention / (attention + experts + 2 * 4 * 64))
    assert cov.nm_fraction < 0.2
    with pytest.raises(NMError, match=r"4 weight matrices .* model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        check_coverage(cov)


def test_bad_masks_are_refused_by_name():
    model = ARCHS["mixtral"]()
    masks = {layer.param_name: layer.stored(magnitude_mask(layer.weight(), 2, 4))
             for layer in find_prunable_layers(model, 4)}
    name = "model.layers.1.mlp.experts.down_proj"
    bad = dict(masks, **{name: masks[name].clone()})
    bad[name][2, 0, :4] = True  # expert 2, row 0: 4 of 4 kept
    with pytest.raises(NMError, match=rf"{name}: 1 of .* groups"):
        measure_coverage(model, bad, 2, 4)
    with pytest.raises(NMError, match="no N:M target"):
        measure_coverage(model, dict(masks, **{"model.layers.0.mlp.gate.weight": torch.ones(4, 64, dtype=bool)}), 2, 4)


# ---------------------------------------------------------------- sparsity.ignore

def test_ignore_leaves_the_named_weights_dense_and_counts_them():
    model = ARCHS["qwen2_moe"]()
    dense = copy.deepcopy(model).state_dict()
    ignore = [r"layers\.0\.mlp\.experts\.down_proj", r"shared_expert\.up_proj"]
    result = prune_oneshot(model, "wanda", calib_tokens(), 2, 4, batch_size=4, progress=False, ignore=ignore)
    left = {"model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.shared_expert.up_proj.weight",
            "model.layers.1.mlp.shared_expert.up_proj.weight"}
    assert not left & set(result.masks)
    assert all(torch.equal(model.state_dict()[name], dense[name]) for name in left)
    cov = measure_coverage(model, result.masks, 2, 4, ignore)
    check_coverage(cov)
    assert set(cov.ignored) == left and cov.target_fraction == 1.0
    with pytest.raises(NMError, match="model.layers.0.mlp.experts.down_proj"):  # not ignored: uncovered
        check_coverage(measure_coverage(model, result.masks, 2, 4, ignore[1:]))


def test_ignore_patterns_that_match_nothing_or_do_not_compile_are_errors():
    model = ARCHS["llama"]()
    with pytest.raises(NMError, match=r"sparsity.ignore: pattern 'experts' matches no weight matrix"):
        find_prunable_layers(model, 4, ignore=["q_proj", "experts"])
    with pytest.raises(NMError, match=r"matches no weight matrix"):
        find_prunable_layers(model, 4, ignore=["lm_head"])  # outside the blocks: dense anyway
    with pytest.raises(NMError, match="not a valid regular expression"):
        find_prunable_layers(model, 4, ignore=["q_proj("])
    with pytest.raises(ParamsError, match=r"sparsity.ignore: .*\[1\] 'o_proj\(' is not a valid regular expression"):
        parse_params({"sparsity": {"ignore": ["q_proj", "o_proj("]}})
    with pytest.raises(ParamsError, match="sparsity.ignore: .*must not repeat"):
        parse_params({"sparsity": {"ignore": ["q_proj", "q_proj"]}})
    assert parse_params({"sparsity": {"ignore": [r"mlp\.gate"]}}).sparsity.ignore == [r"mlp\.gate"]


def test_an_indivisible_layer_can_be_left_dense_by_name():
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**BASE, "intermediate_size": 130})).eval()
    with pytest.raises(NMError, match=r"down_proj: input width 130 is not divisible by m=4.*sparsity\.ignore"):
        find_prunable_layers(model, 4)
    result = prune_oneshot(model, "magnitude", None, 2, 4, progress=False, ignore=[r"down_proj"])
    assert len(result.masks) == 12
    check_coverage(measure_coverage(model, result.masks, 2, 4, ignore=[r"down_proj"]))


def test_a_router_whose_width_is_not_divisible_is_dense_by_design():
    """Hidden width 66: the layers reading the hidden state are left dense by name; the routers need no name."""
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(tf.MixtralConfig(**{**BASE, "hidden_size": 66, "num_attention_heads": 6,
                                                      "num_key_value_heads": 2, "head_dim": 16},
                                                   num_local_experts=4, num_experts_per_tok=2)).eval()
    with pytest.raises(NMError, match="q_proj: input width 66"):
        find_prunable_layers(model, 4)
    ignore = [r"(q|k|v)_proj", r"gate_up_proj"]
    result = prune_oneshot(model, "magnitude", None, 2, 4, progress=False, ignore=ignore)
    assert sorted(name.split(".", 3)[-1] for name in result.masks) == \
        ["mlp.experts.down_proj", "mlp.experts.down_proj", "self_attn.o_proj.weight", "self_attn.o_proj.weight"]
    cov = measure_coverage(model, result.masks, 2, 4, ignore)
    check_coverage(cov)
    assert cov.gates == ("model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight")
    assert len(cov.ignored) == 8 and cov.target_fraction == 1.0


# ---------------------------------------------------------------- calibration per expert

def _routed_inputs_by_hand(model, calib, block: int):
    """Independent reimplementation: each expert's gate_up and down_proj inputs in ``block`` of a Mixtral."""
    moe = model.model.layers[block].mlp
    seen = []
    handle = moe.register_forward_pre_hook(lambda mod, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for batch in calib.split(4):
            model(input_ids=batch, use_cache=False)
    handle.remove()
    x = torch.cat(seen)  # [tokens, hidden]: what the MoE block receives
    probs = torch.softmax(x @ moe.gate.weight.t(), dim=-1)
    chosen = probs.topk(model.config.num_experts_per_tok, dim=-1).indices  # [tokens, k]
    out = {}
    for e in range(model.config.num_local_experts):
        xe = x[(chosen == e).any(dim=-1)]
        gate, up = (xe @ moe.experts.gate_up_proj[e].t()).chunk(2, dim=-1)
        out[e] = (xe, F.silu(gate) * up)
    return out


def test_each_expert_is_calibrated_on_exactly_the_tokens_routed_to_it():
    model, calib = ARCHS["mixtral"](), calib_tokens()
    expected = _routed_inputs_by_hand(model, calib, block=0)
    layers = [layer for layer in find_prunable_layers(model, 4) if layer.block == 0]
    _, blocks = find_blocks(model)
    with torch.no_grad(), calibration.eager_experts(model):
        calls = capture_block_inputs(model, calib, batch_size=4)
        stats = observe_block(blocks[0], layers, calls,
                              lambda layer: InputStats(layer.in_features, "cpu", norms=True, hessian=True))
    prefix = "model.layers.0.mlp.experts"
    routed = {e for e, (xe, _) in expected.items() if len(xe)}
    assert {e for (name, e) in stats if name == f"{prefix}.gate_up_proj"} == routed == {0, 1, 2, 3}
    for e, (xe, he) in expected.items():
        for param, x in ((f"{prefix}.gate_up_proj", xe), (f"{prefix}.down_proj", he)):
            st = stats[(param, e)]
            torch.testing.assert_close(st.sq_norms, x.double().square().sum(0), rtol=1e-5, atol=1e-6)
            # H = 2 X^T X / nsamples (one sample per call that reached the expert): X^T X recovered
            torch.testing.assert_close(st.hessian * st.nsamples / 2, x.t() @ x, rtol=1e-4, atol=1e-4)
    assert stats[("model.layers.0.self_attn.q_proj.weight", None)].nsamples == 6  # Linear layers as before


def test_an_expert_no_token_reaches_falls_back_to_magnitude_and_is_reported():
    model = ARCHS["gpt_oss"]()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.bias[3] = -1e4  # expert 3 is never among the top 2
    dense = copy.deepcopy(model)
    result = prune_oneshot(model, "sparsegpt", calib_tokens(), 2, 4, batch_size=4, progress=False)
    assert sorted(result.fallbacks) == sorted(f"model.layers.{b}.mlp.experts.{p}[3]"
                                             for b in range(2) for p in ("gate_up_proj", "down_proj"))
    for b in range(2):
        for p in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{b}.mlp.experts.{p}"
            w_dense = dense.get_parameter(name)[3].t()  # GPT-OSS stores [E, in, out]
            mask = result.masks[name][3].t()
            assert torch.equal(mask, magnitude_mask(w_dense, 2, 4))
            assert torch.equal(model.get_parameter(name)[3].t(), w_dense * mask)  # no OBS update without inputs
            assert not torch.equal(result.masks[name][0].t(), magnitude_mask(dense.get_parameter(name)[0].t(), 2, 4))
    check_coverage(measure_coverage(model, result.masks, 2, 4))


# ---------------------------------------------------------------- one block on the compute device

def test_only_the_block_being_pruned_and_its_batch_visit_the_compute_device(monkeypatch):
    """The model stays home (CPU); ``cpu:0`` stands for the accelerator: a distinct device name, same memory."""
    model, compute = ARCHS["mixtral"](), torch.device("cpu", 0)
    blocks = model.model.layers
    where = {id(block): "home" for block in blocks}
    on_device, captured, checked, capturing = {}, [], [], []  # on_device: id -> tensor, kept alive (ids unique)
    real_place, real_capture = calibration.place, calibration.capture_block_inputs

    def place(obj, device):
        out = real_place(obj, device)
        if isinstance(obj, torch.nn.Module):
            where[id(obj)] = "device" if torch.device(device) == compute else "home"
        elif isinstance(obj, calibration.BlockCall) and torch.device(device) == compute:
            out.hidden = out.hidden.clone()  # a new tensor: "on the device"
            on_device[id(out.hidden)] = out.hidden
        return out

    def capture(*args, **kwargs):  # block 0's inputs, computed at home: the block is not run
        capturing.append(True)
        captured.extend(real_capture(*args, **kwargs))
        capturing.clear()
        return captured

    def check(block):
        def hook(module, args, kwargs):
            if capturing:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            assert [where[id(b)] for b in blocks] == ["device" if b is block else "home" for b in blocks]
            assert id(hidden) in on_device  # this batch was moved for the pass
            assert not any(id(call.hidden) in on_device for call in captured)  # the stored ones stay home
            checked.append(block)
        return hook

    reference = prune_oneshot(copy.deepcopy(model), "sparsegpt", calib_tokens(), 2, 4, batch_size=4, progress=False)
    monkeypatch.setattr(calibration, "place", place)
    monkeypatch.setattr(calibration, "capture_block_inputs", capture)
    for block in blocks:
        block.register_forward_pre_hook(check(block), with_kwargs=True)
    result = prune_oneshot(model, "sparsegpt", calib_tokens(), 2, 4, batch_size=4, progress=False, device=compute)
    assert len(checked) == 2 * 2 * 2  # 2 blocks x (statistics + output pass) x 2 batches
    assert set(where.values()) == {"home"}
    assert all(torch.equal(result.masks[k], reference.masks[k]) for k in reference.masks)
    assert all(torch.equal(result.updated_weights[k], reference.updated_weights[k]) for k in reference.masks)

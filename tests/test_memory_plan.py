"""pipeline/maskllm/memory_plan.py: shapes vs published counts, meta-tensor counts vs real CPU runs, the plan's rules."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pipeline.maskllm import memory_plan as mp

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ROOT / "pipeline" / "maskllm" / "model_configs"
# the parameter counts the model cards / hubs publish (embeddings and a tied head counted once)
PUBLISHED = {"smollm2-135m": 134_515_008, "llama-3.2-1b": 1_235_814_400, "llama-2-7b": 6_738_415_616,
             "llama-3.1-8b": 8_030_261_248, "llama-2-70b": 68_976_648_192}
SMOL = str(CONFIGS / "smollm2-135m.json")


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_shipped_configs_build_the_published_models(name):
    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    shapes = mp.shapes_of(mp.meta_model(CONFIGS / f"{name}.json"), 4)
    assert shapes.params == PUBLISHED[name]
    h, i, L = raw["hidden_size"], raw["intermediate_size"], raw["num_hidden_layers"]
    head_dim = raw.get("head_dim") or h // raw["num_attention_heads"]
    kv = raw["num_key_value_heads"] * head_dim
    # q and o [h, h], k and v [kv, h], gate/up [i, h], down [h, i]: every linear of every block
    assert shapes.prunable == L * (2 * h * h + 2 * kv * h + 3 * i * h)
    assert shapes.blocks == L and shapes.vocab == raw["vocab_size"] and shapes.hidden == h


def test_mask_state_is_24_bytes_per_weight_at_2_4_and_140_at_4_8():
    for (n, m), per_weight in (((2, 4), 24), ((4, 8), 140)):  # 4 float32 tensors of C(M, N) / M per weight
        plan = mp.plan_learn(SMOL, mp.LearnSetup(n=n, m=m, device="cpu"))
        assert plan.mask_state_bytes == per_weight * plan.prunable


def test_fsdp_shards_the_mask_state_and_ddp_adds_its_buckets():
    single = mp.plan_learn(SMOL, mp.LearnSetup(device="cpu"))
    fsdp = mp.plan_learn(SMOL, mp.LearnSetup(world=2, parallel="fsdp", device="cpu", micro_batch=1))
    ddp = mp.plan_learn(SMOL, mp.LearnSetup(world=2, parallel="ddp", device="cpu", micro_batch=1))
    targets = len(mp.shapes_of(mp.meta_model(SMOL), 4).targets)
    # half, plus at most one padded row of [G, C] per tensor and target
    assert single.mask_state_bytes / 2 <= fsdp.mask_state_bytes <= single.mask_state_bytes / 2 + 4 * targets * 6 * 4
    assert ddp.moments["optimizer step"] - single.moments["optimizer step"] == single.terms["logits"]
    # the root (embeddings) stays gathered under FSDP: sharded weights plus it
    step = fsdp.moments["optimizer step"]
    assert step < single.moments["optimizer step"] * 0.6


def test_bfloat16_halves_the_frozen_weights_and_activation_checkpointing_lowers_a_big_batch():
    f32 = mp.plan_learn(SMOL, mp.LearnSetup(device="cpu"))
    bf16 = mp.plan_learn(SMOL, mp.LearnSetup(device="cpu", dtype="bfloat16"))
    assert f32.terms["frozen weights"] == 2 * bf16.terms["frozen weights"] == 4 * f32.params
    big = dict(device="cpu", batch=16, micro_batch=16, seqlen=1024)
    assert (mp.plan_learn(SMOL, mp.LearnSetup(activation_checkpointing=True, **big)).device_peak_bytes
            < mp.plan_learn(SMOL, mp.LearnSetup(**big)).device_peak_bytes / 2)


def test_the_peak_is_the_largest_moment_and_the_sum_of_its_terms():
    plan = mp.plan_learn(SMOL, mp.LearnSetup(device="cuda", dtype="bfloat16", batch=2, seqlen=256))
    assert plan.device_peak_bytes == max(plan.moments.values()) == sum(plan.terms.values())
    assert plan.moments[plan.moment] == plan.device_peak_bytes
    assert set(plan.moments) >= {"loss forward", "loss backward", "optimizer step", "backward block 0"}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=3), st.integers(1, 64))
def test_fsdp_shards_cover_the_parameter_with_less_than_a_row_per_rank_of_padding(shape, world):
    shape = tuple(shape)
    rows = math.prod(shape[1:])
    total = mp._shard(shape, world) * world
    assert math.prod(shape) <= total < math.prod(shape) + world * rows


# ------------------------------------------------------------------ counting on meta tensors

def test_live_bytes_follows_lifetimes_views_and_tensors_autograd_keeps():
    tracker = mp.LiveBytes()
    with tracker:
        a = torch.empty(1000, device="meta")  # 4000 bytes
        b = a + 1  # 8000
        del a
        c = b.view(10, 100)  # a view: no new bytes
        del b
        assert tracker.live == 4000
        del c
        assert tracker.live == 0
        w = torch.empty(50, 20, device="meta")
    assert tracker.peak == 8000
    outside = torch.empty(50, 20, device="meta")
    with tracker:
        view = outside.t()  # a view of a tensor made before the mode: no new memory
        assert tracker.live == 4000  # w, made inside
        del w
        assert tracker.live == 0
    x = torch.empty(100, device="meta", requires_grad=True)
    with tracker:
        y = x.exp()  # exp keeps its result for backward
        z = y.sum()
        del y
        assert tracker.live == 400 + 4
        del z  # the graph goes, and y with it
        assert tracker.live == 0


def _real_block_saved(config: str, seqlen: int, dtype: torch.dtype) -> int:
    """What block 0 of a real CPU model (random weights) keeps for backward, counted by data pointer."""
    from transformers import AutoModelForCausalLM

    raw = json.loads(Path(config).read_text())
    raw["num_hidden_layers"] = 1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(mp.load_config_dict(raw), dtype=dtype)
    block = model.model.layers[0]
    call = {}

    def grab(module, args, kwargs):
        call["args"], call["kwargs"] = args, kwargs
        raise mp._Stop
    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    with pytest.raises(mp._Stop):
        model(input_ids=torch.zeros(1, seqlen, dtype=torch.long), use_cache=False)
    handle.remove()
    hidden = torch.randn(1, seqlen, raw["hidden_size"], dtype=dtype, requires_grad=True)
    for p in block.parameters():
        p.requires_grad_(p.ndim >= 2)
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {t.untyped_storage().data_ptr() for t in call["kwargs"]["position_embeddings"]}
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in exclude:
            seen[key] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(hidden, *call["args"][1:], **call["kwargs"])
    return sum(seen.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_block_count_on_meta_equals_a_real_cpu_block(dtype):
    # CPU's SDPA (flash) keeps q, k, v, out and the logsumexp: what the plan's stand-in keeps
    real = _real_block_saved(SMOL, 64, mp.DTYPES[dtype])
    assert mp.block_saved_per_sequence(SMOL, dtype, 64, "flash") == real


def test_mask_cost_on_meta_equals_the_torch_path_on_real_cpu_tensors():
    from pipeline.maskllm.kernel import masked_weight_reference
    from pipeline.model.nm import candidates

    shape, cands = (16, 32), candidates(2, 4)
    weight = torch.randn(shape)
    logits = (torch.randn(128, 6) * 0.01).requires_grad_(True)
    tracker = mp.LiveBytes()
    exclude = {t.untyped_storage()._cdata for t in (weight, logits, cands)}
    with tracker, mp.saved_bytes(exclude) as saved:
        out, sq, _ = masked_weight_reference(weight, logits, cands, (1, 2), 1.0, 100.0)
    cost = mp.mask_cost(shape, 2, 4, "float32")
    assert cost.saved == saved[0]
    # softmax keeps y [G, C] float32, the subnormal flush its condition (bool), and ||out||^2 the
    # float64 copy of out it squares; the flushed y feeds a product with the constant candidates only
    groups = 128
    assert saved[0] == groups * 6 * (4 + 1) + 16 * 32 * 8
    del out, sq


def test_the_cpu_kernel_keeps_only_its_inputs():
    from pipeline.maskllm.kernel import kernel_name, masked_weight
    from pipeline.model.nm import candidates

    assert kernel_name("cpu", 6) == "cpp"  # the plan's device=cpu assumes the C++ kernel
    weight, cands = torch.randn(16, 32), candidates(2, 4)
    logits = (torch.randn(128, 6) * 0.01).requires_grad_(True)
    exclude = {t.untyped_storage()._cdata for t in (weight, logits, cands)}
    with mp.saved_bytes(exclude) as saved:
        masked_weight(weight, logits, cands, (1, 2), 1.0, 100.0)
    assert saved[0] == 0


def test_loss_cost_holds_the_logits_and_their_log_probabilities():
    vocab, tokens, hidden = 1000, 64, 32
    tv = 4 * tokens * vocab  # one float32 [tokens, vocab]
    forward, backward = mp.loss_cost(vocab, hidden, tokens, "float32")
    # forward: the logits and their log-softmax (+ the labels, a few bytes); the head's transpose is no memory
    assert tv * 2 <= forward < tv * 2 + 1024
    # backward: the kept log-probabilities, the gradient of the loss and the one of the log-softmax
    assert tv * 3 <= backward < tv * 3 + 4 * tokens * hidden + 1024
    fwd16, _ = mp.loss_cost(vocab, hidden, tokens, "bfloat16")
    assert tv * 5 // 2 <= fwd16 < tv * 5 // 2 + 1024  # bfloat16 logits, their float32 copy, the log-softmax


# ------------------------------------------------------------------ the command line and bad input

def test_bad_input_is_named_before_any_work():
    with pytest.raises(mp.PlanError, match="batch=3 must be a multiple of micro_batch=1 x world=2"):
        mp.plan_learn(SMOL, mp.LearnSetup(batch=3, micro_batch=1, world=2))
    with pytest.raises(mp.PlanError, match="no such config.*llama-2-7b"):
        mp.load_config("pipeline/maskllm/model_configs/llama-9-1b.json")
    res = subprocess.run([sys.executable, "-m", "pipeline.maskllm.memory_plan", SMOL, "--nm", "2-4"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "--nm '2-4': write N:M" in res.stderr


def test_command_line_prints_the_peak_and_its_terms():
    res = subprocess.run([sys.executable, "-m", "pipeline.maskllm.memory_plan", "smollm2-135m", "--device", "cpu",
                          "--json"], cwd=ROOT, capture_output=True, text=True, check=True)
    plan = json.loads(res.stdout)
    assert plan["device_peak_bytes"] == sum(plan["terms"].values()) and plan["model"] == "smollm2-135m"


# ------------------------------------------------------------------ params, profiles, host memory per node

def test_a_profile_is_planned_from_params_and_the_fit_is_said():
    res = subprocess.run([sys.executable, "-m", "pipeline.maskllm.memory_plan", "--profile", "gpu-1b", "--json"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    plan = json.loads(res.stdout)
    setup = plan["setup"]
    # what profiles/gpu-1b.yaml sets on top of params.yaml
    assert (setup["world"], setup["micro_batch"], setup["batch"], setup["seqlen"], setup["dtype"]) == (
        1, 4, 256, 4096, "bfloat16") and setup["activation_checkpointing"] and plan["model"] == "llama-3.2-1b"
    assert plan["device_peak_bytes"] < 0.92 * 80e9  # the profile's promise: one 80 GB GPU
    text = subprocess.run([sys.executable, "-m", "pipeline.maskllm.memory_plan", "--profile", "gpu-1b"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    assert "fits a 80 GB GPU" in text and "64 micro-batch(es) of 4 per rank and step" in text


def test_a_run_that_does_not_fit_stops_with_the_plans_figures():
    setup = mp.LearnSetup(batch=8, micro_batch=8, seqlen=4096, dtype="bfloat16")
    with pytest.raises(mp.PlanError, match=r"will not fit.*GiB.*learn.micro_batch_size.*memory_plan --params"):
        mp.check_fits(str(CONFIGS / "llama-3.2-1b.json"), setup, 24e9)
    assert mp.check_fits(SMOL, mp.LearnSetup(), 80e9).device_peak_bytes < 0.92 * 80e9


def test_fsdp_ranks_read_their_shards_so_host_memory_per_node_stays_near_one_model():
    """Each FSDP rank holds its shards of the frozen weights plus one block as read (its weights and its
    logits before they are sharded): 8 ranks of a node hold about two models' worth, not eight (DDP's
    ranks each load it whole)."""
    seven_b = str(CONFIGS / "llama-2-7b.json")
    fsdp = mp.plan_learn(seven_b, mp.LearnSetup(world=8, parallel="fsdp", batch=8, micro_batch=1, seqlen=4096,
                                                dtype="bfloat16", activation_checkpointing=True))
    ddp = mp.plan_learn(seven_b, mp.LearnSetup(world=8, parallel="ddp", batch=8, micro_batch=1, seqlen=4096,
                                               dtype="bfloat16", activation_checkpointing=True))
    model = fsdp.params * 2  # bfloat16
    assert ddp.host_per_node_bytes >= 8 * model
    assert fsdp.host_per_node_bytes == 8 * fsdp.host_peak_bytes < 2.5 * model
    assert fsdp.host_terms["frozen weight shards"] <= model / 8 * 1.01

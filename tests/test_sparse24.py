"""2:4 surgery: eligibility rules, the packed form in plain torch, the swap with a CPU stand-in, and the
speed bench's refusal without CUDA (the CUDA-only parts run in bench/sparse24_speed.py on a GPU)."""
import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pipeline.oneshot.magnitude import magnitude_mask
from pipeline.model.nm import NMError, find_prunable_layers
from bench.sparse24 import (
    FUSED_EXPERTS,
    NOT_A_TARGET,
    OUTSIDE_BLOCKS,
    SemiStructuredLinear,
    eligibility,
    layer_reason,
    min_shape,
    pack_nm,
    packed_round_trip,
    pattern_reason,
    shape_reason,
    sparsify_24,
    unpack_nm,
    weight_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "sparse24_speed.py"
pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_llama(dtype=torch.float16, hidden=64, masked=True):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256,
    )).eval()
    if masked:
        magnitude_24(model)
    return model.to(dtype)


def magnitude_24(model, skip=()):
    with torch.no_grad():
        for layer in find_prunable_layers(model, 4):
            if layer.name not in skip:
                w = layer.weight()
                w.masked_fill_(~magnitude_mask(w, 2, 4), 0)


def load_bench():
    spec = importlib.util.spec_from_file_location("sparse24_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bits(t):
    """Bit patterns, so that -0.0 and +0.0 differ."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


# ---------------------------------------------------------------- eligibility rules

def test_min_shapes_are_torchs_documented_constraints():
    # torch/sparse/semi_structured.py, _DTYPE_SHAPE_CONSTRAINTS (sparse_min_rows, sparse_min_cols)
    assert min_shape("cusparselt", torch.float16) == min_shape("cusparselt", torch.bfloat16) == (16, 16)
    assert min_shape("cusparselt", torch.int8) == (32, 32)
    assert min_shape("cusparselt", torch.float32) is None
    assert min_shape("cutlass", torch.float16) == min_shape("cutlass", torch.bfloat16) == (32, 64)
    assert min_shape("cutlass", torch.int8) == (16, 128)
    assert min_shape("cutlass", torch.float32) == (32, 32)
    with pytest.raises(ValueError, match="backend 'cusparse'.*cusparselt, cutlass"):
        min_shape("cusparse", torch.float16)


@pytest.mark.parametrize("backend, dtype, out, inp, ok", [
    ("cusparselt", torch.float16, 16, 16, True),
    ("cusparselt", torch.float16, 48, 576, True),
    ("cusparselt", torch.bfloat16, 8, 64, False),  # fewer rows than 16
    ("cusparselt", torch.float16, 24, 64, False),  # 24 is not a multiple of 16
    ("cutlass", torch.float16, 32, 64, True),
    ("cutlass", torch.float16, 192, 576, True),  # SmolLM2's k/v projections
    ("cutlass", torch.bfloat16, 32, 96, False),  # 96 is not a multiple of 64
    ("cutlass", torch.float16, 16, 64, False),
    ("cusparselt", torch.float32, 64, 64, False),  # no float32 kernel in cuSPARSELt
])
def test_shape_reason_hand_cases(backend, dtype, out, inp, ok):
    reason = shape_reason(out, inp, dtype, backend)
    assert (reason is None) == ok
    if not ok:
        assert backend in reason and (f"[{out}, {inp}]" in reason or "has no" in reason)


def test_pattern_reason_counts_groups_and_accepts_kept_zeros():
    w = torch.tensor([[1.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],   # 2:4; a group with one nonzero (a kept 0.0)
                      [1.0, 2.0, 3.0, 0.0, 1.0, 1.0, 1.0, 1.0]],  # two groups with 3 and 4 nonzeros
                     dtype=torch.float16)
    assert pattern_reason(w[:1]) is None
    assert pattern_reason(w).startswith("2 of 4 groups of 4 inputs hold more than 2 nonzeros")
    assert pattern_reason(-0.0 * torch.ones(1, 4, dtype=torch.float16)) is None  # -0.0 is a zero to the packers
    # float32 runs 1:2 on sparse tensor cores: a 2:4 row is not 1:2 in general
    assert "not 1:2 sparse" in pattern_reason(torch.tensor([[1.0, 2.0, 0.0, 0.0]]))
    assert pattern_reason(torch.tensor([[1.0, 0.0, 0.0, 2.0]])) is None


def test_layer_reason_bias_dtype():
    w = torch.zeros(16, 16, dtype=torch.float16)
    assert layer_reason(w, torch.zeros(16, dtype=torch.float16), "cusparselt") is None
    assert "bias dtype" in layer_reason(w, torch.zeros(16), "cusparselt")


# ---------------------------------------------------------------- the packed form

def test_pack_hand_case():
    w = torch.tensor([[1.0, 0.0, 0.0, -2.0, 0.0, 5.0, 6.0, 0.0],
                      [0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    values, positions = pack_nm(w)
    # kept = the nonzeros, ascending; a group short of nonzeros is filled with its first zeros
    assert torch.equal(values, torch.tensor([[1.0, -2.0, 5.0, 6.0], [0.0, 3.0, 0.0, 0.0]]))
    assert torch.equal(positions, torch.tensor([[0, 3, 1, 2], [0, 3, 0, 1]], dtype=torch.uint8))
    assert torch.equal(unpack_nm(values, positions), w)


def test_pack_with_mask_keeps_a_kept_zero_and_drops_the_rest():
    w = torch.tensor([[7.0, 0.0, -3.0, 9.0]])
    mask = torch.tensor([[False, True, True, False]])  # keeps a 0.0 and -3.0; 7 and 9 are pruned
    values, positions = pack_nm(w, mask=mask)
    assert torch.equal(values, torch.tensor([[0.0, -3.0]])) and positions.tolist() == [[1, 2]]
    assert torch.equal(unpack_nm(values, positions), torch.tensor([[0.0, 0.0, -3.0, 0.0]]))
    with pytest.raises(NMError, match="do not keep exactly 2 of 4"):
        pack_nm(w, mask=torch.tensor([[True, True, True, False]]))


def test_pack_refuses_a_weight_that_is_not_nm():
    with pytest.raises(NMError, match=r"1 groups hold more than 2 nonzeros; pass its 2:4 mask"):
        pack_nm(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    with pytest.raises(NMError, match="not divisible by m=4"):
        pack_nm(torch.ones(2, 6))


@settings(max_examples=40, deadline=None)
@given(pattern=st.sampled_from([(2, 4), (1, 2), (4, 8), (1, 4)]), rows=st.integers(1, 5), groups=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_pack_round_trip_is_exact_with_positive_zeros(pattern, rows, groups, dtype, seed):
    n, m = pattern
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * m, generator=gen).to(dtype)
    w[torch.rand(w.shape, generator=gen) < 0.15] = 0.0  # kept weights that are 0.0 (dequantised 4-bit)
    mask = magnitude_mask(torch.rand(w.shape, generator=gen), n, m)
    pruned = w.masked_fill(~mask, -0.0)  # the old export's -0.0 must not survive the packing
    values, positions = pack_nm(pruned, n, m)
    assert values.shape == positions.shape == (rows, groups * n) and positions.dtype == torch.uint8
    assert (positions.reshape(rows, groups, n).diff(dim=-1) > 0).all()  # ascending within a group
    dense = unpack_nm(values, positions, n, m)
    assert torch.equal(dense, pruned)
    assert not torch.signbit(dense[dense == 0]).any()  # every zero is +0.0, the pruned ones included
    assert torch.equal(bits(dense[pruned != 0]), bits(w[pruned != 0]))  # the nonzeros bit for bit
    with_mask = unpack_nm(*pack_nm(w, n, m, mask=mask), n, m)  # the mask decides: same weights
    assert torch.equal(bits(with_mask), bits(w.masked_fill(~mask | (w == 0), 0.0)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pack_agrees_with_torchs_cutlass_packer(dtype):
    # An independent implementation: torch's CUTLASS layout, in plain torch, runs on the CPU.
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass,
        sparse_semi_structured_to_dense_cutlass,
    )

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen).to(dtype)
    w = w.masked_fill(~magnitude_mask(w, 2, 4), 0.0)
    w[:, 8:16] = 0.0  # groups with no nonzero
    w[:, 16:32] = 0.0
    w[:, [16, 21, 26, 31]] = 1.5  # groups with one nonzero, in each of the 4 positions
    values, positions = pack_nm(w)
    packed, meta = sparse_semi_structured_from_dense_cutlass(w)
    assert torch.equal(unpack_nm(values, positions), sparse_semi_structured_to_dense_cutlass(packed, meta))
    # Same kept values in the same order where a group holds 2 nonzeros; where it holds fewer, each
    # packer fills in zeros by its own rule (torch's is chosen for its logic circuit, ours is the first zeros).
    full = ((w != 0).reshape(64, 32, 4).sum(-1) == 2).repeat_interleave(2, dim=1)
    assert full.sum() == 64 * (32 - 2 - 4) * 2
    assert torch.equal(values[full], packed[full])


# ---------------------------------------------------------------- the surgery with a CPU stand-in

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_surgery_keeps_logits_identical(dtype, backend):
    model = tiny_llama(dtype)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        sparse = copy.deepcopy(model)
        report = sparsify_24(sparse, backend, convert=packed_round_trip)
        got = sparse(ids).logits
    names = [layer.name for layer in find_prunable_layers(model)]
    assert report.replaced == names and len(names) == 14
    assert report.skipped == {"lm_head": OUTSIDE_BLOCKS}
    assert all(isinstance(sparse.get_submodule(name), SemiStructuredLinear) for name in names)
    assert isinstance(sparse.lm_head, torch.nn.Linear)
    assert torch.equal(got, want)
    assert weight_bytes(sparse) == weight_bytes(model)  # the stand-in holds dense weights


def test_surgery_leaves_ineligible_layers_dense_and_says_why():
    # hidden 48: q, o [48, 48], k, v [24, 48], gate, up [96, 48], down [48, 96]; one layer left dense
    skip = "model.layers.1.mlp.up_proj"
    model = tiny_llama(torch.float32, hidden=48, masked=False)
    magnitude_24(model, skip={skip})
    model = model.to(torch.float16)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
        cutlass = copy.deepcopy(model)
        report = sparsify_24(cutlass, "cutlass", convert=packed_round_trip)
        assert torch.equal(cutlass(ids).logits, want)
    assert report.replaced == []  # CUTLASS fp16 needs (32, 64) multiples: no layer has them
    assert report.skipped["model.layers.0.self_attn.q_proj"] == (
        "weight [out, in] = [48, 48]: cutlass float16 needs both dims multiples of (32, 64)")
    with torch.no_grad():
        report = sparsify_24(model, "cusparselt", convert=packed_round_trip)
        assert torch.equal(model(ids).logits, want)
    # cuSPARSELt fp16 needs (16, 16) multiples: all but k, v ([24, 48]) and the unmasked layer
    assert len(report.replaced) == 2 * 5 - 1 and skip not in report.replaced
    assert "needs both dims multiples of (16, 16)" in report.skipped["model.layers.0.self_attn.k_proj"]
    assert report.skipped[skip] == ("1152 of 1152 groups of 4 inputs hold more than 2 nonzeros: "
                                    "the weight is not 2:4 sparse (apply a 2:4 mask first)")
    assert isinstance(model.get_submodule(skip), torch.nn.Linear)
    assert isinstance(model.get_submodule("model.layers.1.mlp.gate_proj"), SemiStructuredLinear)


def test_surgery_refuses_float32_and_changes_nothing():
    model = tiny_llama(torch.float32)
    report = sparsify_24(model, "cusparselt", convert=packed_round_trip)
    assert report.replaced == []
    assert report.skipped["model.layers.0.mlp.down_proj"].startswith("dtype float32 has no cusparselt sparse kernel")
    assert not any(isinstance(mod, SemiStructuredLinear) for mod in model.modules())


def test_surgery_on_gpt2_conv1d():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)).eval()
    magnitude_24(model)
    model = model.to(torch.float16)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
        sparse = copy.deepcopy(model)
        report = sparsify_24(sparse, "cusparselt", convert=packed_round_trip)
        got = sparse(ids).logits
    assert len(report.replaced) == 8
    attn = sparse.get_submodule("transformer.h.0.attn.c_attn")
    assert (attn.out_features, attn.in_features) == (192, 64)
    # Conv1D stores [in, out]; the module holds [out, in], the same numbers
    assert torch.equal(attn.weight, model.get_submodule("transformer.h.0.attn.c_attn").weight.t())
    # Conv1D multiplies its [in, out] storage, the module the [out, in] copy: another fp16 summation order
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3)


def test_semi_structured_linear_takes_non_contiguous_input():
    w = torch.randn(32, 16).masked_fill(~magnitude_mask(torch.randn(32, 16), 2, 4), 0)
    module = SemiStructuredLinear(w, torch.randn(32), "cusparselt")
    x = torch.randn(16, 3, 5).transpose(0, 2)  # [5, 3, 16], not viewable as [15, 16]
    torch.testing.assert_close(module(x), F.linear(x, w, module.bias), rtol=1e-6, atol=1e-6)
    assert "backend=cusparselt" in repr(module)


@pytest.mark.filterwarnings("ignore:The PyTorch API of SparseSemiStructuredTensor is in prototype stage")
def test_module_holds_torchs_sparse_tensor_and_counts_its_packed_bytes():
    # torch's CUTLASS subclass built on the CPU from torch's own packer (its matmul needs CUDA; its
    # storage and to_dense do not): the module keeps it as its weight, weight_bytes counts what it stores.
    from torch.sparse import SparseSemiStructuredTensorCUTLASS
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).half()
    w = w.masked_fill(~magnitude_mask(w, 2, 4), 0)
    packed, meta = sparse_semi_structured_from_dense_cutlass(w)
    sparse = SparseSemiStructuredTensorCUTLASS(w.shape, packed=packed, meta=meta, packed_t=None, meta_t=None,
                                               compressed_swizzled_bitmask=None)
    module = SemiStructuredLinear(sparse, None, "cutlass")
    assert isinstance(module.weight, SparseSemiStructuredTensorCUTLASS) and not module.weight.requires_grad
    assert torch.equal(module.weight.to_dense(), w)
    # half the values (2 of 4) + 2 bits of metadata per kept value: 9/16 of the dense fp16 bytes
    assert weight_bytes(module) == 64 * 64 * 2 + 64 * 128 // 8 == w.numel() * 2 * 9 // 16


@pytest.mark.parametrize("config", sorted((ROOT / "pipeline" / "maskllm" / "model_configs").glob("*.json")), ids=lambda p: p.stem)
def test_shipped_configs_every_block_linear_is_eligible(config):
    from transformers import AutoModelForCausalLM

    bench = load_bench()
    cfg = bench.load_config({"kind": "config", "path": str(config)})
    with torch.device("meta"):  # shapes only: no memory, no weights
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    for backend in ("cusparselt", "cutlass"):
        report = eligibility(model, backend)
        assert len(report.replaced) == cfg.num_hidden_layers * 7, report.skipped
        assert set(report.skipped.values()) == {OUTSIDE_BLOCKS}


def test_shipped_configs_include_the_two_named_models():
    names = {p.stem for p in (ROOT / "pipeline" / "maskllm" / "model_configs").glob("*.json")}
    assert {"smollm2-135m", "llama-3.2-1b"} <= names
    for path in (ROOT / "pipeline" / "maskllm" / "model_configs").glob("*.json"):
        assert "model_type" in json.loads(path.read_text()), path


# ---------------------------------------------------------------- the speed bench without CUDA

def test_bench_stops_at_once_without_cuda(monkeypatch, tmp_path, capsys):
    bench = load_bench()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "bench_model", lambda *a, **k: pytest.fail("built a model without CUDA"))
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as stop:
        bench.main(["--config", str(ROOT / "pipeline/maskllm/model_configs/smollm2-135m.json"), "--out", str(out)])
    assert "need a CUDA GPU of compute capability >= 8.0" in str(stop.value.code)
    assert "Nothing measured, nothing written" in str(stop.value.code)
    assert not out.exists()


def test_bench_stops_on_a_gpu_older_than_ampere(monkeypatch, tmp_path):
    bench = load_bench()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(bench, "bench_model", lambda *a, **k: pytest.fail("built a model on a pre-Ampere GPU"))
    with pytest.raises(SystemExit) as stop:
        bench.main(["--config", str(ROOT / "pipeline/maskllm/model_configs/smollm2-135m.json"), "--out", str(tmp_path / "r.json")])
    assert "Tesla T4 has compute capability 7.5" in str(stop.value.code)


def test_bench_names_a_missing_config_before_anything(tmp_path, capsys):
    bench = load_bench()
    with pytest.raises(SystemExit) as stop:
        bench.main(["--config", str(tmp_path / "nope.json")])
    assert stop.value.code == 2
    assert f"--config {tmp_path / 'nope.json'}: no such file" in capsys.readouterr().err


DRIVER = """
import json, runpy, sys
sys.argv = ["sparse24_speed.py", *json.loads(sys.argv[1])]
runpy.run_path({bench!r}, run_name="__main__")
print("MODULES " + json.dumps(sorted({{m.split(".")[0] for m in sys.modules}})))
"""


def test_bench_dry_run_on_cpu_imports_only_what_the_gpu_machine_has(tmp_path):
    """The whole script on the CPU (stand-in conversion), in a fresh interpreter: its JSON, and no module
    the GPU machine lacks (it has torch, transformers, safetensors; no dvc, mlflow, pydantic, gguf)."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "vocab_size": 256, "tie_word_embeddings": True}))
    out = tmp_path / "result.json"
    argv = ["--config", str(config), "--dry-run-cpu", "--batch-sizes", "1", "2", "--seqlens", "8",
            "--decode-tokens", "2", "--repeat", "1", "--gemm-min-time", "0.001", "--out", str(out)]
    res = subprocess.run([sys.executable, "-c", DRIVER.format(bench=str(BENCH)), json.dumps(argv)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    modules = set(json.loads(res.stdout.split("MODULES ")[-1]))
    assert not modules & {"pydantic", "dvc", "mlflow", "gguf", "datasets", "lm_eval", "matplotlib"}
    record = json.loads(out.read_text())
    assert record["dry_run"] is True and record["complete"] is True and "provenance" in record
    model = record["models"][0]
    assert set(model["variants"]) == {"dense", "cusparselt", "cutlass"}
    for backend in ("cusparselt", "cutlass"):
        variant = model["variants"][backend]
        assert variant["status"] == "ok" and len(variant["replaced"]) == 14
        assert variant["not_eligible"] == {"lm_head": OUTSIDE_BLOCKS}
        assert variant["logits_vs_dense"]["relative_l2"] == 0.0
        assert [(r["batch"], r["seqlen"]) for r in variant["runs"]] == [(1, 8), (2, 8)]
    # shapes [32, 64] (k, v), [64, 64] (q, o), [128, 64] (gate, up), [64, 128] (down) x tokens {1, 2, 8, 16}
    assert len(model["gemm"]) == 4 * 4
    assert {(g["out"], g["in"]) for g in model["gemm"]} == {(32, 64), (64, 64), (128, 64), (64, 128)}
    assert len(model["speedups"]) == 2 * 2


def test_surgery_on_a_mixture_of_experts_says_what_stays_dense():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, num_local_experts=4, num_experts_per_tok=2)).eval()
    magnitude_24(model)  # experts included: [E, out, in] targets
    model = model.to(torch.float16)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids).logits
        report = sparsify_24(model, "cusparselt", convert=packed_round_trip)
        assert torch.equal(model(ids).logits, want)
    assert report.replaced == [f"model.layers.{b}.self_attn.{p}_proj" for b in range(2) for p in "qkvo"]
    assert report.skipped == {
        **{f"model.layers.{b}.mlp.experts.{w}": FUSED_EXPERTS for b in range(2) for w in ("gate_up_proj", "down_proj")},
        **{f"model.layers.{b}.mlp.gate.weight": NOT_A_TARGET for b in range(2)},
        "lm_head": OUTSIDE_BLOCKS,
    }


def test_bench_names_a_config_without_model_type(tmp_path, capsys):
    bench = load_bench()
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(SystemExit) as stop:
        bench.main(["--config", str(config)])
    assert stop.value.code == 2 and f"--config {config}: no model_type key" in capsys.readouterr().err


def test_bench_records_a_failing_backend_and_goes_on(tmp_path, monkeypatch, capsys):
    bench = load_bench()
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "vocab_size": 256}))

    def no_kernel(weight):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(bench, "packed_round_trip", no_kernel)
    record = bench.main(["--config", str(config), "--dry-run-cpu", "--batch-sizes", "1", "--seqlens", "4",
                         "--decode-tokens", "1", "--repeat", "1", "--out", str(tmp_path / "r.json")])
    variants = record["models"][0]["variants"]
    assert variants["dense"]["runs"] and record["complete"]
    for backend in ("cusparselt", "cutlass"):
        assert variants[backend]["status"] == "failed"
        assert variants[backend]["error"].startswith(
            f"RuntimeError: model.layers.0.self_attn.q_proj: {backend} conversion failed: CUDA error: no kernel")
    assert record["models"][0]["gemm"] == [] and record["models"][0]["speedups"] == []
    assert json.loads((tmp_path / "r.json").read_text())["models"][0]["variants"]["cutlass"]["status"] == "failed"
    assert "cutlass: failed: RuntimeError" in capsys.readouterr().err

"""MaskLLM's differentiable mask against hand-computed cases, on tiny random models."""
import math
import re
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.maskllm import kernel as mk
from pipeline.maskllm import masks as ml
from pipeline.model.nm import candidates, find_prunable_layers, is_nm
from tests.tiny_models import tiny_llama

S24 = candidates(2, 4)  # (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=128)).eval()


def ids(vocab=256, shape=(2, 16)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


def soft_forward(model, masks, vocab=256, reg_weight=1e-2):
    """One training forward under a single sample -> (CE, regulariser)."""
    x = ids(vocab)
    with parametrize.cached():
        ce = model(input_ids=x, labels=x).loss
    return ce, masks.regularizer(reg_weight)


# ------------------------------------------------------------------ the math on one layer

def test_candidate_mix_is_the_weighted_sum_of_candidates():
    y = torch.softmax(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)), dim=-1)  # 6 groups
    expected = torch.zeros(6, 4)
    for g in range(6):
        for i in range(6):
            expected[g] += y[g, i] * S24[i]
    torch.testing.assert_close(ml.soft_mask(y, S24, (3, 8)), expected.reshape(3, 8))


def test_low_temperature_and_a_dominant_logit_give_that_candidate():
    chosen = torch.tensor([4, 0, 5, 2])  # one candidate per group
    logits = torch.zeros(4, 6)
    logits[torch.arange(4), chosen] = 1.0
    torch.manual_seed(0)
    y = ml.sample_candidate_weights(logits, temperature=1e-3, logit_scale=1e2)
    assert torch.equal(ml.soft_mask(y, S24, (2, 8)), S24[chosen].reshape(2, 8))


def test_samples_follow_the_scaled_softmax_distribution():
    # Gumbel-max: at a low temperature the soft sample's argmax ~ softmax(kappa * pi)
    pi = torch.tensor([0.5, -1.0, 2.0, 0.0, 0.3, -0.2]) / 4  # kappa = 4 below
    torch.manual_seed(0)
    y = ml.sample_candidate_weights(pi.expand(20000, 6).contiguous(), temperature=1e-2, logit_scale=4.0)
    freq = torch.bincount(y.argmax(-1), minlength=6) / 20000
    torch.testing.assert_close(freq, torch.softmax(4 * pi, 0), atol=0.015, rtol=0)
    torch.testing.assert_close(y.sum(-1), torch.ones(20000))


def test_samples_match_torch_gumbel_softmax_in_distribution():
    # the same law as F.gumbel_softmax (whose noise is -log Exp(1)): compare mean and spread
    logits = torch.tensor([0.4, -0.3, 0.1, 0.0, 0.25, -0.5]).expand(40000, 6).contiguous()
    torch.manual_seed(1)
    ours = ml.sample_candidate_weights(logits, temperature=0.8, logit_scale=2.0)
    theirs = torch.nn.functional.gumbel_softmax(2.0 * logits, tau=0.8, dim=-1)
    torch.testing.assert_close(ours.mean(0), theirs.mean(0), atol=6e-3, rtol=0)
    torch.testing.assert_close(ours.std(0), theirs.std(0), atol=6e-3, rtol=0)


def test_high_temperature_flattens_the_sample():
    logits = torch.tensor([[3.0, 0, 0, 0, 0, 0]])
    torch.manual_seed(0)
    y = ml.sample_candidate_weights(logits.expand(1000, 6).contiguous(), temperature=1e4, logit_scale=1.0)
    torch.testing.assert_close(y, torch.full_like(y, 1 / 6), atol=2e-3, rtol=0)


def test_prior_raises_exactly_the_overlapping_candidates():
    prior = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1]], dtype=torch.bool)  # groups 1100 and 0101
    overlap = torch.tensor([[2, 1, 1, 1, 1, 0],  # 1100 vs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
                            [1, 0, 1, 1, 2, 1]], dtype=torch.float32)  # 0101
    torch.testing.assert_close(ml.prior_overlap(prior, S24), overlap)
    logits = ml.init_logits(2, 6, torch.Generator().manual_seed(0))
    raised = ml.apply_prior(logits, prior, S24, prior_strength=3.0)
    torch.testing.assert_close(raised - logits, 3.0 * logits.std() * overlap)
    assert raised.is_contiguous()  # FSDP shards contiguous parameters only


def test_init_logits_are_small_gaussians_in_float32():
    logits = ml.init_logits(5000, 6, torch.Generator().manual_seed(0))
    assert logits.shape == (5000, 6) and logits.dtype == torch.float32
    assert abs(float(logits.std()) - 0.01) < 5e-4 and abs(float(logits.mean())) < 5e-4


@settings(max_examples=25, deadline=None)
@given(pattern=st.sampled_from([(1, 4), (2, 4), (4, 8), (2, 8)]), rows=st.integers(1, 4),
       groups=st.integers(1, 4), seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_hardened_masks_are_nm(pattern, rows, groups, seed, scale):
    n, m = pattern
    cands = candidates(n, m)
    logits = torch.randn(rows * groups, cands.shape[0], generator=torch.Generator().manual_seed(seed)) * scale
    hard = ml.harden(logits, cands, (rows, groups * m))
    assert hard.dtype == torch.bool and is_nm(hard, n, m)
    assert torch.equal(hard.reshape(-1, m).float(), cands[logits.argmax(-1)])


def test_schedules_by_hand():
    s = ml.Schedule(steps=100)
    assert (s.temperature_at(0), s.logit_scale_at(0), s.reg_weight_at(0)) == (4.0, 100.0, 1e-5)
    assert s.temperature_at(50) == pytest.approx(2.025)
    assert s.logit_scale_at(50) == pytest.approx(300.0)
    assert s.reg_weight_at(50) == pytest.approx(5e-6)
    assert s.temperature_at(100) == pytest.approx(0.05)
    assert s.logit_scale_at(100) == pytest.approx(500.0)
    assert s.reg_weight_at(100) == 0.0


def sparse_weight_regularizer(weights, masks, reg_weight):
    """The paper's -lambda * sum_layers ||W * M||_F^2, written out: the reference of MaskSet.regularizer."""
    return -reg_weight * sum((w * m).square().sum() for w, m in zip(weights, masks))


@pytest.mark.parametrize("kernel", ["cpp", "torch"])
def test_layer_gradients_equal_the_formula(kernel, monkeypatch):
    """Through the parametrization (the fused kernel or the torch path): the output and the grads of
    the logits equal plain autograd of W * sum_i y_i s_i and -lambda ||W * M||^2 for the same noise."""
    monkeypatch.setattr(ml, "masked_weight", lambda *a, recipe=None: (mk._MaskedWeight.apply if kernel == "cpp"
                                                                       else mk.masked_weight_reference)(*a))
    weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    logits0 = ml.init_logits(8, 6, torch.Generator().manual_seed(3)) * 30
    upstream = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    state = ml.MaskState(temperature=0.7, logit_scale=3.0, seed=5, step=9)
    layer = ml.LearnableMask(logits0.clone(), S24, state, index=2)
    out = layer(weight)
    ((out * upstream).sum() - 0.3 * layer.sq_norm).backward()

    logits = torch.nn.Parameter(logits0.clone())  # the same draw, then the paper's formula under plain autograd
    noise = mk.gumbel(8, 6, mk.noise_key(5, 9, 2))
    y = torch.softmax((3.0 * logits + noise) / 0.7, dim=-1)
    mask = ml.soft_mask(y, S24, weight.shape)
    ref = weight * mask
    ((ref * upstream).sum() + sparse_weight_regularizer([weight], [mask], 0.3)).backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(layer.logits.grad, logits.grad, rtol=1e-4, atol=1e-5)
    assert layer.logits.grad.abs().sum() > 0


def test_sparse_weight_regularizer_by_hand():
    w = [torch.tensor([[1.0, -2.0, 3.0, 0.5]]), torch.tensor([[2.0, 2.0, 2.0, 2.0]])]
    m = [torch.tensor([[1.0, 0.0, 0.5, 0.5]]), torch.tensor([[0.0, 1.0, 1.0, 0.0]])]
    expected = -0.1 * ((1 + 0 + 2.25 + 0.0625) + (0 + 4 + 4 + 0))
    assert float(sparse_weight_regularizer(w, m, 0.1)) == pytest.approx(expected)


# ------------------------------------------------------------------ on a model

def test_attach_freezes_weights_and_shapes_the_logits():
    model = tiny_llama()
    masks = ml.attach_masks(model, 2, 4)
    assert len(masks.layers) == 14  # 2 blocks x (q k v o gate up down)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in masks.parameters()}
    q = masks.layers["model.layers.0.self_attn.q_proj.weight"][1].logits
    assert q.shape == (64 * 64 // 4, 6) and q.dtype == torch.float32


def test_gradients_reach_the_logits_and_not_the_weights():
    model = tiny_llama()
    masks = ml.attach_masks(model, 2, 4)
    ce, reg = soft_forward(model, masks)
    (ce + reg).backward()
    for name, (_, mask) in masks.layers.items():
        assert mask.logits.grad is not None and mask.logits.grad.abs().sum() > 0, name
    for name, p in model.named_parameters():
        if not name.endswith(".logits"):
            assert p.grad is None, name


def test_regularizer_uses_the_masks_of_the_forward_pass():
    model = tiny_llama()
    masks = ml.attach_masks(model, 2, 4)
    torch.manual_seed(0)
    x = ids()
    with parametrize.cached():
        model(input_ids=x, labels=x)
        masked = {name: layer.module.weight.detach() for name, (layer, _) in masks.layers.items()}  # cached sample
    reg = masks.regularizer(0.01)
    expected = -0.01 * sum(float((w.double() ** 2).sum()) for w in masked.values())
    assert float(reg.detach()) == pytest.approx(expected, rel=1e-5)
    for name, (layer, _) in masks.layers.items():  # what the forward used is W * (a convex mix of candidates)
        w = layer.module.parametrizations.weight.original
        soft = (masked[name] / w).reshape(-1, 4)
        assert soft.min() >= -1e-6 and soft.max() <= 1 + 1e-6
        torch.testing.assert_close(soft.sum(-1), torch.full((soft.shape[0],), 2.0))
    with pytest.raises(RuntimeError, match="no soft mask sampled"):
        masks.regularizer(0.01)  # consumed: a second call would count a stale sample


def test_hard_mode_applies_the_hardened_masks():
    model = tiny_llama()
    masks = ml.attach_masks(model, 2, 4)
    hard = masks.hard_masks()
    with masks.hard(), torch.no_grad():
        for name, (layer, _) in masks.layers.items():
            w = layer.module.parametrizations.weight.original
            assert torch.equal(layer.module.weight, w * hard[name]), name
    assert not masks.state.hard


@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (4, 8)])
def test_any_nm_pattern_hardens_valid_masks_shaped_like_the_parameters(pattern):
    n, m = pattern
    model = tiny_llama()
    masks = ml.attach_masks(model, n, m)
    ce, reg = soft_forward(model, masks)
    (ce + reg).backward()
    for name, mask in masks.hard_masks().items():
        param = model.get_submodule(name.rsplit(".", 1)[0]).parametrizations.weight.original
        assert mask.shape == param.shape and is_nm(mask, n, m), name
        assert masks.layers[name][1].logits.shape[1] == math.comb(m, n)


def test_gpt2_conv1d_masks_the_input_dimension():
    model = tiny_gpt2()
    masks = ml.attach_masks(model, 2, 4)
    ce, reg = soft_forward(model, masks, vocab=128)
    (ce + reg).backward()
    hard = masks.hard_masks()
    for name, (layer, mask) in masks.layers.items():
        stored = layer.module.parametrizations.weight.original  # [in, out]
        assert layer.transposed and hard[name].shape == stored.shape
        assert is_nm(hard[name].t(), 2, 4), name  # groups run along `in`
        assert mask.logits.grad.abs().sum() > 0
    with masks.hard(), torch.no_grad():
        layer = masks.layers["transformer.h.0.mlp.c_fc.weight"][0]
        assert torch.equal(layer.module.weight, layer.module.parametrizations.weight.original * hard[layer.param_name])


def test_prior_shapes_the_initial_choice_and_is_checked():
    model = tiny_llama()
    priors = {layer.param_name: torch.ones_like(layer.weight(), dtype=torch.bool).reshape(-1, 4)
              .index_fill(1, torch.tensor([2, 3]), False).reshape(layer.weight().shape)
              for layer in find_prunable_layers(model, 4)}  # keep positions 0,1 everywhere
    masks = ml.attach_masks(model, 2, 4, priors=priors, prior_strength=100.0)
    assert masks.diagnostics()["prior_agreement"] == 1.0
    for name, hard in masks.hard_masks().items():
        assert torch.equal(hard, priors[name]), name
    masks.remove()
    bad = dict(priors)
    name = next(iter(bad))
    bad[name] = torch.ones_like(bad[name])  # 4:4, not 2:4
    with pytest.raises(ValueError, match=re.escape(name)):
        ml.attach_masks(model, 2, 4, priors=bad)


def test_diagnostics_track_flips_confidence_and_the_regularizer():
    model = tiny_llama()
    masks = ml.attach_masks(model, 2, 4)
    masks.state.track_confidence = True
    soft_forward(model, masks)
    d = masks.diagnostics()
    assert d["flip_rate"] == 0.0 and "prior_agreement" not in d
    assert 1 / 6 <= d["confidence"] <= 1.0 and d["regularizer"] < 0
    layer = masks.layers["model.layers.1.mlp.down_proj.weight"][1]
    with torch.no_grad():  # move every group of one layer to a new argmax
        best = layer.logits.argmax(-1)
        layer.logits[torch.arange(len(best)), (best + 1) % 6] += 1.0
    groups = sum(mask.logits.shape[0] for _, mask in masks.layers.values())
    assert masks.diagnostics()["flip_rate"] == pytest.approx(layer.logits.shape[0] / groups)
    assert masks.diagnostics()["flip_rate"] == 0.0  # relative to the previous call


def test_train_steps_move_the_logits_with_the_cosine_schedule():
    model = tiny_llama()
    masks = ml.attach_masks(model, 2, 4)
    before = {k: v.clone() for k, v in masks.logits_state_dict().items()}
    opt, lr_schedule = ml.make_optimizer(masks, lr=1e-2, steps=4)
    assert opt.param_groups[0]["weight_decay"] == 0.1
    schedule = ml.Schedule(steps=4)
    x = ids()
    for t in range(4):
        metrics = ml.train_step(model, masks, x, opt, lr_schedule, schedule, t)
        assert math.isfinite(metrics["loss"]) and metrics["regularizer"] < 0
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # cosine decay to a tenth
    after = masks.logits_state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)


def run_steps(model, recompute: bool, steps: int = 3):
    """``steps`` MaskLLM steps of ``model`` -> (losses, final logits, the last step's RecomputedWeights or None)."""
    masks = ml.attach_masks(model, 2, 4, seed=4)
    masks.recompute_weights = recompute
    opt, lr_schedule = ml.make_optimizer(masks, lr=1e-2, steps=steps)
    schedule = ml.Schedule(steps=steps)
    losses = [ml.train_step(model, masks, ids(vocab=model.config.vocab_size), opt, lr_schedule, schedule, t)["loss"]
              for t in range(steps)]
    return losses, masks.logits_state_dict()


@pytest.mark.parametrize("kernel", ["cpp", "torch"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_recomputing_masked_weights_in_backward_changes_no_bit(kernel, make, monkeypatch):
    """train_step keeps a recipe, not W * mask, for the products' backward (RecomputedWeights): the
    recomputation (on the kernel, with the sample it leaves for the mask's backward) gives the very same
    steps as keeping the masked weights. GPT-2's Conv1D saves the weight itself, LLaMA's Linear a
    transposed view of it."""
    if kernel == "torch":
        monkeypatch.setattr(mk, "kernel_name", lambda device, n_candidates: "torch")
    kept, recomputed = run_steps(make(), recompute=False), run_steps(make(), recompute=True)
    assert kept[0] == recomputed[0]
    assert kept[1].keys() == recomputed[1].keys()
    for name in kept[1]:
        assert torch.equal(kept[1][name], recomputed[1][name]), name


@pytest.mark.parametrize("kernel", ["cpp", "torch"])
def test_no_masked_weight_is_kept_from_the_forward_to_the_backward(kernel, monkeypatch):
    """After a training forward under RecomputedWeights, no masked weight is alive (autograd keeps their
    recipes); backward recomputes each of them, and its mask backward releases what it recomputed."""
    if kernel == "torch":
        monkeypatch.setattr(mk, "kernel_name", lambda device, n_candidates: "torch")
    model = tiny_llama()
    masks = ml.attach_masks(model, 2, 4)
    masks.set_step(ml.Schedule(steps=2), 0)
    calls, entries, recomputed = [], [], ml.RecomputedWeights()
    call, register = mk.Recipe.__call__, recomputed.register
    monkeypatch.setattr(mk.Recipe, "__call__", lambda self: calls.append(self) or call(self))
    recomputed.register = lambda out, recipe: entries.append((weakref.ref(out), recipe)) or register(out, recipe)
    x = ids()
    with recomputed.active(masks.state):
        loss = model(input_ids=x, labels=x).loss
    assert len(entries) == len(masks.layers)  # every masked weight was registered ...
    assert all(ref() is None for ref, _ in entries)  # ... and none outlived the forward
    (loss + masks.regularizer(1e-2)).backward()
    # each one recomputed in backward where it is needed: the products' input gradients; block 0's q/k/v
    # read the embeddings, which need none, so autograd kept their inputs only
    names = {id(ml._original(layer)): name for name, (layer, _) in masks.layers.items()}
    unused = {names[id(recipe.args[0])] for _, recipe in entries} - {names[id(r.args[0])] for r in calls}
    assert unused == {f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"}
    assert len(calls) == len(entries) - 3  # once each
    assert all(recipe.out is None and recipe.y is None for _, recipe in entries)  # and released by it
    assert all(mask.logits.grad is not None for _, mask in masks.layers.values())


def test_remove_restores_the_original_weights_exactly():
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    masks = ml.attach_masks(model, 2, 4)
    opt, lr_schedule = ml.make_optimizer(masks, lr=1e-2, steps=2)
    ml.train_step(model, masks, ids(), opt, lr_schedule, ml.Schedule(steps=2), 0)
    masks.remove()
    assert not any(parametrize.is_parametrized(mod) for mod in model.modules())
    restored = model.state_dict()
    assert restored.keys() == original.keys()
    for k in original:
        assert torch.equal(restored[k], original[k]), k


def test_logits_round_trip_through_safetensors(tmp_path):
    model = tiny_llama()
    masks = ml.attach_masks(model, 2, 4, seed=1)
    opt, lr_schedule = ml.make_optimizer(masks, lr=1e-2, steps=2)
    ml.train_step(model, masks, ids(), opt, lr_schedule, ml.Schedule(steps=2), 0)
    save_file(masks.logits_state_dict(), tmp_path / "logits.safetensors")
    hard = masks.hard_masks()

    other = ml.attach_masks(tiny_llama(), 2, 4, seed=2)
    loaded = load_file(str(tmp_path / "logits.safetensors"))
    assert set(loaded) == set(masks.layers) and all(k.endswith(".weight") for k in loaded)
    other.load_logits_state_dict(loaded)
    for name, logits in masks.logits_state_dict().items():
        assert torch.equal(other.logits_state_dict()[name], logits), name
        assert torch.equal(other.hard_masks()[name], hard[name]), name
    wrong = ml.attach_masks(tiny_llama(), 1, 4)
    with pytest.raises(ValueError, match="logits shape"):
        wrong.load_logits_state_dict(loaded)


@pytest.mark.parametrize("recompute", [True, False])
def test_learn_recompute_masked_weights_reaches_the_masks_and_not_the_fingerprint(recompute):
    """learn.recompute_masked_weights switches RecomputedWeights; it changes no bit of the run (tested
    above), so a checkpoint of the run resumes across it."""
    from pipeline.config import Learn, Sparsity
    from pipeline.maskllm.distributed import Dist, prepare
    from pipeline.maskllm.train import fingerprint

    cfg = Learn(recompute_masked_weights=recompute)
    masks = prepare(tiny_llama(), None, cfg, Sparsity(), Dist(), "cpu").masks
    assert masks.recompute_weights is recompute
    assert fingerprint(cfg, Sparsity(), None) == fingerprint(Learn(), Sparsity(), None)

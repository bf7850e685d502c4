"""The learn loop in process (pipeline/maskllm/train.py): dropout off, a Gumbel sample per micro-batch,
accumulation equal to one large micro-batch's mean gradient, activation checkpointing in eval mode."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.config import Learn, Sparsity
from pipeline.maskllm.checkpoint import Checkpoint
from pipeline.maskllm.distributed import Dist
from pipeline.maskllm.train import learn_masks, micro_batches
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")
TRAIN = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(3))


def dropout_gpt2(p: float) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=256,
                                      resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)).eval()


def run(model, tmp_path, **learn):
    cfg = Learn(**{"steps": 3, "batch_size": 2, "seqlen": 16, "kappa": 100.0, "checkpoint_every": 100, **learn})
    return learn_masks(model, None, TRAIN, cfg, Sparsity(), Checkpoint(tmp_path / "ckpt", "t"), progress=False)


def logits_of(result):
    return result.masks.logits_state_dict()


def test_dropout_is_off_while_learning_and_the_run_is_deterministic(tmp_path):
    """GPT-2 with dropout 0.1 everywhere learns exactly what the same model without dropout learns:
    no dropout module is in training mode during a step, and two runs are equal bit for bit."""
    model = dropout_gpt2(0.1)
    seen = []
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    with_dropout = logits_of(run(model, tmp_path / "a"))
    assert seen and not any(seen)
    again = logits_of(run(dropout_gpt2(0.1), tmp_path / "b"))
    without = logits_of(run(dropout_gpt2(0.0), tmp_path / "c"))
    for name in with_dropout:
        assert torch.equal(with_dropout[name], again[name]) and torch.equal(with_dropout[name], without[name]), name


def test_each_micro_batch_has_its_own_sample_keyed_by_its_index(tmp_path):
    batches = micro_batches(TRAIN, Learn(batch_size=4, micro_batch_size=1, seqlen=16), 0, Dist())
    assert [k for k, _ in batches] == [0, 1, 2, 3]
    rank1 = micro_batches(TRAIN, Learn(batch_size=4, micro_batch_size=1, seqlen=16, nproc=2), 0, Dist(1, 2))
    assert [k for k, _ in rank1] == [1, 3] and torch.equal(rank1[1][1], batches[3][1])
    # one micro-batch of 2 (one sample for both sequences) learns otherwise than two of 1
    one = logits_of(run(tiny_llama(), tmp_path / "a", batch_size=2, micro_batch_size=2))
    two = logits_of(run(tiny_llama(), tmp_path / "b", batch_size=2, micro_batch_size=1))
    assert max(float((one[k] - two[k]).abs().max()) for k in one) > 1e-4


def test_activation_checkpointing_recomputes_the_blocks_with_dropout_still_off(tmp_path):
    model = dropout_gpt2(0.1)
    calls = []
    # transformers checkpoints a block's forward, inside its hooks: count a submodule's calls
    model.transformer.h[0].mlp.register_forward_pre_hook(lambda mod, args: calls.append(mod.training))
    plain = logits_of(run(dropout_gpt2(0.1), tmp_path / "a", steps=1))
    checkpointed = logits_of(run(model, tmp_path / "b", steps=1, activation_checkpointing=True))
    assert calls == [False, False]  # the forward and its recomputation in backward, dropout off in both
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6)

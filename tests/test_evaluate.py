"""The perplexity protocol against hand-computed cases."""
import math

import torch
from torch import nn

from pipeline.evaluation.perplexity import perplexity, window_losses


class FixedLogits(nn.Module):
    """A 'model' whose next-token distribution is the same fixed softmax at every position."""

    def __init__(self, logits):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(logits, dtype=torch.float32))

    def forward(self, input_ids, use_cache=False):
        b, l = input_ids.shape
        return type("Out", (), {"logits": self.w.expand(b, l, -1)})()


def test_ppl_of_a_uniform_model_is_the_vocab_size():
    model = FixedLogits([0.0] * 7)
    out = perplexity(model, torch.randint(0, 7, (100,)), seqlen=10, batch_size=3)
    assert math.isclose(out["ppl"], 7.0, rel_tol=1e-6)
    assert (out["windows"], out["tokens"]) == (10, 100)


def test_ppl_hand_computed():
    # p = softmax([log 1, log 3]) = [1/4, 3/4]; tokens 0,1,1,1 | 1,0,0,0 (+ tail 1, dropped)
    model = FixedLogits([0.0, math.log(3.0)])
    tokens = torch.tensor([0, 1, 1, 1, 1, 0, 0, 0, 1])
    # window 1 predicts 1,1,1 -> -log(3/4) each; window 2 predicts 0,0,0 -> -log(1/4) each
    w1, w2 = -math.log(0.75), -math.log(0.25)
    out = perplexity(model, tokens, seqlen=4, batch_size=1)
    assert math.isclose(out["nll"], (w1 + w2) / 2, rel_tol=1e-6)
    assert math.isclose(out["ppl"], math.exp((w1 + w2) / 2), rel_tol=1e-6)
    assert out["windows"] == 2


def test_window_losses_shift_by_one():
    logits = torch.full((1, 3, 4), -1e9)
    logits[0, 0, 2] = 0  # position 0 predicts token 2 (the token at position 1)
    logits[0, 1, 3] = 0  # position 1 predicts token 3 (a miss: position 2 holds 1)
    loss = window_losses(logits, torch.tensor([[9 % 4, 2, 1]]))
    assert loss.shape == (1,) and math.isclose(loss.item(), 1e9 / 2, rel_tol=1e-6)


def test_batch_size_does_not_change_the_result():
    torch.manual_seed(0)
    model = FixedLogits(torch.randn(11).tolist())
    tokens = torch.randint(0, 11, (257,))
    a = perplexity(model, tokens, 16, batch_size=1)
    b = perplexity(model, tokens, 16, batch_size=5)
    assert math.isclose(a["ppl"], b["ppl"], rel_tol=1e-12) and a["windows"] == 16


def test_max_windows_caps():
    out = perplexity(FixedLogits([0.0] * 3), torch.zeros(100, dtype=torch.long), 10, max_windows=4)
    assert out["windows"] == 4 and out["tokens"] == 40

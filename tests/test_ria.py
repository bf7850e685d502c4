"""RIA (pipeline/oneshot/ria.py): its score by hand and against a loop, and the driver scoring q, k and v apart."""
import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.model.nm import find_prunable_layers, is_nm
from pipeline.oneshot.prune import prune_oneshot
from pipeline.oneshot.ria import ria_mask, ria_score
from pipeline.oneshot.wanda import wanda_mask
from tests.test_oneshot import calib_tokens
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")


def test_ria_2_4_by_hand():
    W = torch.tensor([[1.0, -2.0, 3.0, 4.0], [2.0, 2.0, -1.0, 0.0]])
    sq_norms = torch.tensor([1.0, 4.0, 9.0, 16.0])  # ||X_j|| = 1, 2, 3, 4; to the power 0.5: 1, sqrt 2, sqrt 3, 2
    # column sums of |W| 3, 4, 4, 4; row sums 10, 5
    expected = torch.tensor([
        [(1 / 3 + 1 / 10) * 1, (2 / 4 + 2 / 10) * 2 ** 0.5, (3 / 4 + 3 / 10) * 3 ** 0.5, (4 / 4 + 4 / 10) * 2],
        [(2 / 3 + 2 / 5) * 1, (2 / 4 + 2 / 5) * 2 ** 0.5, (1 / 4 + 1 / 5) * 3 ** 0.5, 0.0]])
    torch.testing.assert_close(ria_score(W, sq_norms), expected)
    assert ria_mask(W, sq_norms, 2, 4).tolist() == [[False, False, True, True], [True, True, False, False]]
    # Wanda (|W| ||X||: 2, 4, 3, 0 in row 1) keeps other weights there: RIA's row and column shares matter
    assert wanda_mask(W, sq_norms, 2, 4)[1].tolist() == [False, True, True, False]


def ria_loop(W: np.ndarray, sq: np.ndarray, a: float = 0.5) -> np.ndarray:
    """The paper's formula written out weight by weight."""
    out = np.zeros_like(W)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            col, row = np.abs(W[:, j]).sum(), np.abs(W[i, :]).sum()
            rel = (abs(W[i, j]) / col if col else 0.0) + (abs(W[i, j]) / row if row else 0.0)
            out[i, j] = rel * np.sqrt(sq[j]) ** a
    return out


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 4), seed=st.integers(0, 10_000), scale=st.floats(0.01, 100.0))
def test_ria_matches_the_formula_and_ignores_the_scale_of_weights_and_inputs(rows, groups, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, 4 * groups, generator=gen, dtype=torch.float64)
    W[:, 0] = 0.0  # a dead input: its column scores 0, not 0/0
    sq = torch.rand(4 * groups, generator=gen, dtype=torch.float64) * 10
    np.testing.assert_allclose(ria_score(W, sq).numpy(), ria_loop(W.numpy(), sq.numpy()), rtol=1e-12, atol=1e-15)
    mask = ria_mask(W, sq, 2, 4)
    assert is_nm(mask, 2, 4)
    # relative importance is scale-free in W, and a common factor on the inputs scales every score alike
    assert torch.equal(ria_mask(W * scale, sq * scale, 2, 4), mask)


def test_the_driver_scores_q_k_and_v_each_on_its_own_columns():
    """q, k and v read one input; RIA's column sums must be each layer's, not the stacked matrix's."""
    model, calib = tiny_llama(), calib_tokens()
    seen = []
    q_proj = model.model.layers[0].self_attn.q_proj
    handle = q_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().reshape(-1, 64)))
    with torch.no_grad():
        copy.deepcopy(model)(input_ids=calib, use_cache=False)  # block 0's inputs are the dense model's anyway
    handle.remove()
    sq = torch.cat(seen).double().square().sum(0)
    expected = ria_mask(q_proj.weight.detach(), sq, 2, 4)
    result = prune_oneshot(model, "ria", calib, 2, 4, batch_size=3, progress=False)
    assert torch.equal(result.masks["model.layers.0.self_attn.q_proj.weight"], expected)
    assert all(is_nm(result.masks[layer.param_name], 2, 4) for layer in find_prunable_layers(model))
    assert result.updated_weights is None and len(result.masks) == 14

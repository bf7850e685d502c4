"""The MaskLLM authors' SparseGPT prior (sparsegpt_noupdate): by hand, against their loop, on a whole model."""
import copy

import pytest
import torch

from pipeline.oneshot.calibration import InputStats
from pipeline.config import ParamsError, parse_params
from pipeline.data.tokens import sample_windows
from pipeline.oneshot.magnitude import magnitude_mask
from pipeline.model.nm import NMError, find_prunable_layers, is_nm
from pipeline.oneshot.prune import prune_oneshot
from pipeline.oneshot.sparsegpt_noupdate import inverse_hessian_factor, noupdate_mask, sparsegpt_noupdate_layers
from pipeline.oneshot.wanda import wanda_mask
from tests.tiny_models import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")


def test_mask_by_hand():
    # two independent pairs of inputs: [[2, 1], [1, 2]] (correlated) and [[4, 0], [0, 1]].
    # Upper Cholesky U of H^-1 for a pair [[a, b], [b, c]]: U_11^2 = c / (ac - b^2), U_22^2 = 1 / c,
    # so 1 / U_jj^2 = [3/2, 2, 4, 1] and the scores are w^2 * [1.5, 2, 4, 1] (percdamp 0)
    H = torch.tensor([[2.0, 1, 0, 0], [1, 2, 0, 0], [0, 0, 4, 0], [0, 0, 0, 1]])
    U, dead = inverse_hessian_factor(H, percdamp=0.0)
    torch.testing.assert_close(1 / U.diagonal().square(), torch.tensor([1.5, 2, 4, 1]))
    W = torch.tensor([
        [1.0, 1.0, 1.0, 1.0],  # scores 1.5, 2, 4, 1: prune columns 3 and 0 (magnitude: all tied)
        [1.2, 1.0, 0.6, 1.1],  # 2.16, 2, 1.44, 1.21: prune 3 and 2 (magnitude keeps 0 and 3)
        [1.0, 2.0, 0.0, 1.3],  # 1.5, 8, 0, 1.69: prune 2 and 0 (diag(H) alone, Wanda's view, keeps 0 and 1)
    ])
    want = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0], [0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(noupdate_mask(W, U, 2, 4), want)
    assert not torch.equal(magnitude_mask(W[1:2], 2, 4), want[1:2])
    assert not torch.equal(wanda_mask(W[2:3], H.diagonal().double(), 2, 4), want[2:3])
    (mask, new), = sparsegpt_noupdate_layers([(W, H)], 2, 4, percdamp=0.0)
    assert torch.equal(mask, want) and torch.equal(new, W * want)  # no weight update


def authors_noupdate(W, H, prunen, prunem, blocksize=128, percdamp=0.01):
    """NVlabs/MaskLLM HessianPruner.prune for N:M without --update-weight, transcribed loop for loop."""
    W, H = W.clone().float(), H.clone()
    rows, columns = W.shape
    M = torch.ones_like(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, M1, Hinv1 = W[:, i1:i2].clone(), M[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1) == 1  # True = pruned
        for i in range(i2 - i1):
            if i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            m = M1[:, i]
            m[mask1[:, i]] = 0
            M1[:, i] = m
        M[:, i1:i2] = M1
    return M.bool()


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_authors_loop_ties_included(n, m, seed):
    gen = torch.Generator().manual_seed(seed)
    width = 64
    # dequantised 4-bit weights: few distinct values, so many ties in |w|
    W = (torch.randint(0, 16, (24, width), generator=gen) - 8) * 0.25
    X = torch.randn(256, width, generator=gen) @ (torch.randn(width, width, generator=gen) / 8 + torch.eye(width))
    X[:, 3] = 0  # a dead input
    H = 2 * X.t() @ X / 256
    H[40:48, :] = H[:, 40:48] = 0  # inputs 40..47: one uniform diagonal, so equal U_jj and tied scores
    H[40:48, 40:48] = torch.eye(8)
    got, _ = sparsegpt_noupdate_layers([(W, H)], n, m)[0]
    assert torch.equal(got, authors_noupdate(W, H, m - n, m))
    assert is_nm(got, n, m)


def test_width_not_divisible_by_m_names_the_method():
    with pytest.raises(NMError, match="sparsegpt_noupdate: input width 30"):
        sparsegpt_noupdate_layers([(torch.randn(4, 30), torch.eye(30))], 2, 4)


def dense_hessians(model, calib, batch_size):
    """H of every layer from plain forward passes of the dense model (hooks on all layers at once, as the authors)."""
    stats, handles = {}, []
    for layer in find_prunable_layers(model):
        stats[layer.param_name] = InputStats(layer.in_features, "cpu", hessian=True)
        handles.append(layer.module.register_forward_pre_hook(
            lambda mod, args, st=stats[layer.param_name]: st.add_batch(args[0])))
    with torch.no_grad():
        for batch in calib.split(batch_size):
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: st.hessian for name, st in stats.items()}


def test_whole_model_uses_the_dense_models_hessians_and_keeps_its_weights():
    model = tiny_llama(layers=3)
    dense = copy.deepcopy(model)
    calib = sample_windows(torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(1)), 6, 32, 0)
    result = prune_oneshot(model, "sparsegpt_noupdate", calib, 2, 4, batch_size=4, progress=False)
    hessians = dense_hessians(dense, calib, batch_size=4)
    state, dense_state = model.state_dict(), dense.state_dict()
    assert set(result.masks) == set(hessians) and result.updated_weights is None
    for name, H in hessians.items():
        W = dense_state[name]
        want, _ = sparsegpt_noupdate_layers([(W, H)], 2, 4)[0]
        assert torch.equal(result.masks[name], want), name
        assert torch.equal(state[name], W * want), name  # the dense weights, masked: no OBS update
        assert 0 < result.errors[name] < 1
    # block-sequential SparseGPT calibrates later blocks on pruned outputs: other masks there
    seq = prune_oneshot(copy.deepcopy(dense), "sparsegpt", calib, 2, 4, batch_size=4, progress=False)
    later = [name for name in hessians if ".layers.2." in name]
    assert any(not torch.equal(seq.masks[name], result.masks[name]) for name in later)


def test_config_accepts_it_as_a_method_and_as_learns_prior():
    p = parse_params({"prior": {"methods": ["sparsegpt_noupdate"]}, "learn": {"prior": "sparsegpt_noupdate"}})
    assert p.learn.prior == "sparsegpt_noupdate" and p.prior.reconstruction_error is False
    with pytest.raises(ParamsError, match="add it to prior.methods"):
        parse_params({"prior": {"methods": ["sparsegpt"]}, "learn": {"prior": "sparsegpt_noupdate"}})


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_one_pass_per_block_on_dense_inputs_gives_the_two_pass_bits(make):
    """With dense_inputs one forward per block both observes and feeds the next block: every block's
    statistics (so every later block's inputs) are bit for bit those of observing and running apart."""
    from pipeline.oneshot.calibration import prune_blockwise

    calib = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))
    seen = {}
    for one_pass in (False, True):
        model, record = make(seed=1).double(), []

        def prune_block(layers, stats):  # chooses nothing, records what it was given
            record.extend((layer.param_name, stats[(layer.param_name, None)].hessian.clone(),
                           stats[(layer.param_name, None)].sq_norms.clone()) for layer in layers)

        prune_blockwise(model, calib, prune_block, lambda layer: InputStats(layer.in_features, "cpu", norms=True, hessian=True),
                        batch_size=4, progress=False, dense_inputs=one_pass)
        seen[one_pass] = record
    assert [r[0] for r in seen[True]] == [r[0] for r in seen[False]] and len({r[0] for r in seen[True]}) >= 8
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(seen[True], seen[False]))

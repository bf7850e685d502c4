"""SparseGPT against a textbook OBS reimplementation, and its layer error against Wanda and magnitude."""
import pytest
import torch

from pipeline.oneshot.calibration import InputStats
from pipeline.oneshot.magnitude import magnitude_mask
from pipeline.model.nm import NMError, is_nm
from pipeline.oneshot.prune import relative_error
from pipeline.oneshot.sparsegpt import (
    compiled_sweep,
    inverse_hessian_factor,
    obs_sweep,
    one_thread,
    sparsegpt_prune,
    sparsegpt_prune_layers,
)
from pipeline.oneshot.wanda import wanda_mask


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: OpenMP fork/join costs more than it saves, and stalls on a busy machine."""
    with one_thread():
        yield


def textbook_sparsegpt(W, H, n, m, percdamp=0.01):
    """Column-by-column OBS with the full inverse Hessian and sequential elimination, float64."""
    W, H = W.double().clone(), H.double().clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    H += percdamp * H.diagonal().mean() * torch.eye(len(H), dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    keep = torch.zeros(W.shape, dtype=torch.bool)
    for q in range(W.shape[1]):
        if q % m == 0:
            # saliency w^2 / [H^-1]_jj, with [H^-1]_jj as it will be when column j is reached
            ahead, d2 = Hinv.clone(), []
            for j in range(q, q + m):
                d2.append(ahead[j, j].item())
                ahead -= torch.outer(ahead[:, j], ahead[j, :]) / ahead[j, j]
            score = W[:, q : q + m] ** 2 / torch.tensor(d2, dtype=W.dtype)
            best = score.argsort(dim=1, descending=True)[:, :n]
            keep[torch.arange(len(W))[:, None], q + best] = True
        # fix column q at its masked value; compensate with the not yet fixed columns
        err = W[:, q] * ~keep[:, q] / Hinv[q, q]
        W -= torch.outer(err, Hinv[q, :])
        Hinv -= torch.outer(Hinv[:, q], Hinv[q, :]) / Hinv[q, q]
    W[~keep] = 0
    return keep, W


def correlated_inputs(tokens, width, seed):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=gen) / width**0.5 + torch.eye(width)
    scales = torch.rand(width, generator=gen) * 3 + 0.1
    return (torch.randn(tokens, width, generator=gen) @ mixing) * scales


def hessian_of(X, batches=4):
    stats = InputStats(X.shape[1], X.device, hessian=True)
    for chunk in X.chunk(batches):
        stats.add_batch(chunk[None])  # one sample per chunk
    return stats.hessian


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_matches_textbook_obs(n, m):
    gen = torch.Generator().manual_seed(0)
    X = correlated_inputs(256, 32, seed=1)
    X[:, 5] = 0  # a dead input: its weights must be zeroed
    W = torch.randn(16, 32, generator=gen)
    H = hessian_of(X)
    mask, new = sparsegpt_prune(W, H, n, m, percdamp=0.01, blocksize=8)  # 4 blocks: lazy updates used
    want_mask, want = textbook_sparsegpt(W, H, n, m)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(new.double(), want, rtol=0, atol=1e-5)
    assert is_nm(mask, n, m)
    assert (new[~mask] == 0).all() and (new[:, 5] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("out, width, n, m, blocksize", [
    (24, 64, 2, 4, 16), (24, 64, 1, 4, 128), (16, 64, 4, 8, 24), (7, 48, 2, 4, 12), (40, 96, 2, 8, 32)])
def test_compiled_sweep_is_the_python_loop_bit_for_bit(out, width, n, m, blocksize, dtype):
    sweep = compiled_sweep()
    assert sweep is not None, "the C++ sweep did not build (see the warning above)"
    gen = torch.Generator().manual_seed(width + out)
    X = correlated_inputs(4 * width, width, seed=out).to(dtype)
    X[:, 3] = 0
    U, dead = inverse_hessian_factor(hessian_of(X), 0.01)
    assert U.dtype == dtype  # a float64 calibration stays float64 (prior.dtype)
    W = ((torch.randint(0, 16, (out, width), generator=gen) - 8) * 0.125).masked_fill(dead[None, :], 0)  # ties
    want_mask, want = obs_sweep(W, U, n, m, blocksize)
    mask, new = sweep(W, U, n, m, blocksize)
    assert new.dtype == want.dtype == dtype
    assert torch.equal(mask, want_mask) and torch.equal(new, want)
    assert mask.shape == new.shape == W.shape and is_nm(mask, n, m)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_python_sweep_matches_textbook_obs(n, m):
    """The fallback where the C++ sweep cannot be built (sparsegpt_prune runs the compiled one here)."""
    X = correlated_inputs(256, 32, seed=1)
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    H = hessian_of(X)
    U, _ = inverse_hessian_factor(H, 0.01)
    mask, new = obs_sweep(W, U, n, m, blocksize=8)
    want_mask, want = textbook_sparsegpt(W, H, n, m)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(new.double(), want, rtol=0, atol=1e-5)


def test_hessian_is_running_mean_of_2xxt():
    X = correlated_inputs(64, 8, seed=2)
    torch.testing.assert_close(hessian_of(X, batches=4), 2 * X.t() @ X / 4, rtol=1e-5, atol=1e-4)
    H = hessian_of(X.double(), batches=4)  # float64 inputs: accumulated in float64, not rounded to float32
    assert H.dtype == torch.float64
    torch.testing.assert_close(H, 2 * X.double().t() @ X.double() / 4, rtol=1e-13, atol=1e-12)
    assert hessian_of(X.bfloat16()).dtype == torch.float32


def test_float64_sparsegpt_matches_textbook_obs_closely():
    """prior.dtype=float64: the same method, with weights 1e-12 from the float64 textbook (float32: 1e-5)."""
    X = correlated_inputs(256, 32, seed=1).double()
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)).double()
    H = hessian_of(X)
    mask, new = sparsegpt_prune(W, H, 2, 4, blocksize=8)
    want_mask, want = textbook_sparsegpt(W, H, 2, 4)
    assert new.dtype == torch.float64 and torch.equal(mask, want_mask)
    torch.testing.assert_close(new, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_inverse_hessian_factor_is_upper_cholesky_of_inverse(dtype, tol):
    H = hessian_of(correlated_inputs(128, 16, seed=3)).to(dtype)
    U, dead = inverse_hessian_factor(H, percdamp=0.01)
    damped = H.double() + 0.01 * H.double().diagonal().mean() * torch.eye(16, dtype=torch.float64)
    assert U.dtype == dtype and torch.equal(U, U.triu()) and not dead.any()
    torch.testing.assert_close(U.double().t() @ U.double(), torch.linalg.inv(damped), rtol=100 * tol, atol=tol)
    # the three-step form of the SparseGPT reference gives the same factor
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    torch.testing.assert_close(U.double(), reference, rtol=tol, atol=tol)


def test_layers_pruned_concurrently_match_one_by_one():
    """A block's layers pruned a thread each: the masks and weights of one layer after the other, bit for bit."""
    gen = torch.Generator().manual_seed(7)
    layers = [(torch.randn(out, width, generator=gen), hessian_of(correlated_inputs(256, width, seed=out)))
              for out, width in ((24, 32), (8, 32), (16, 64))]
    alone = [sparsegpt_prune(W, H, 2, 4, blocksize=16) for W, H in layers]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        together = sparsegpt_prune_layers(layers, 2, 4, blocksize=16, workers=3)
        assert torch.get_num_threads() == 2  # one thread per sweep while they run, then restored
    finally:
        torch.set_num_threads(threads)
    assert len(together) == len(layers)
    for (mask_a, new_a), (mask_b, new_b) in zip(alone, together):
        assert torch.equal(mask_a, mask_b) and torch.equal(new_a, new_b)
    with pytest.raises(NMError, match="input width 30"):
        sparsegpt_prune_layers([*layers, (torch.randn(4, 30), torch.eye(30))], 2, 4, workers=2)


def test_blocksize_must_be_a_multiple_of_m():
    with pytest.raises(NMError, match="blocksize=6"):
        sparsegpt_prune(torch.randn(4, 16), torch.eye(16), 2, 4, blocksize=6)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_error_below_wanda_and_magnitude(n, m):
    X = correlated_inputs(512, 64, seed=4)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    H = hessian_of(X)
    sq_norms = X.double().square().sum(dim=0)
    _, sparse = sparsegpt_prune(W, H, n, m)
    err = {
        "sparsegpt": relative_error(W, sparse, H),
        "wanda": relative_error(W, W * wanda_mask(W, sq_norms, n, m), H),
        "magnitude": relative_error(W, W * magnitude_mask(W, n, m), H),
    }
    # the same numbers measured directly on the inputs
    direct = ((X @ (W - sparse).t()).square().sum() / (X @ W.t()).square().sum()).item()
    assert err["sparsegpt"] == pytest.approx(direct, rel=1e-3)
    assert err["sparsegpt"] < err["wanda"] and err["sparsegpt"] < err["magnitude"], err

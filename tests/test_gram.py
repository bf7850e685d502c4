"""pipeline.oneshot.gram: the accumulated upper triangle of X^T X, in row panels."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.oneshot import gram
from pipeline.oneshot.calibration import InputStats


@settings(max_examples=30, deadline=None)
@given(width=st.integers(1, 450), tokens=st.integers(1, 70), beta=st.sampled_from([0.0, 0.5, 1.0]),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_upper_triangle_is_beta_c_plus_alpha_xtx(width, tokens, beta, dtype):
    """Against the full product in float64: widths across the 192-row panels, any token count."""
    gen = torch.Generator().manual_seed(width * 1000 + tokens)
    x = torch.randn(tokens, width, generator=gen, dtype=torch.float64)
    c0 = torch.randn(width, width, generator=gen, dtype=torch.float64)
    expected = (beta * c0 + 0.75 * x.t() @ x).triu()
    upper = c0.to(dtype).clone()
    gram.accumulate_gram(upper, x.to(dtype), alpha=0.75, beta=beta)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-4}
    torch.testing.assert_close(upper.triu().double(), expected, **tol)


def test_the_flop_count_is_the_staircase():
    # widths 2 and 200: one panel of 2 rows; one of 192 rows then one of 8 (below the first's 192 columns)
    assert gram.gram_flops(2, 5) == 2 * 2 * 2 * 5
    assert gram.gram_flops(200, 1) == 2 * (192 * 200 + 8 * 8)


def test_a_non_contiguous_batch_and_the_running_mean():
    """InputStats' Hessian 2 X^T X / nsamples over batches, from a transposed (non-contiguous) input."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(3, 40, 300, generator=gen, dtype=torch.float64)
    stats = InputStats(300, "cpu", hessian=True)
    for sample in X:
        stats.add_batch(sample.t().contiguous().t())  # [tokens, in] as a view of a transposed tensor
    flat = X.reshape(-1, 300)
    torch.testing.assert_close(stats.hessian, 2 * flat.t() @ flat / 3, rtol=1e-12, atol=1e-12)
    assert torch.equal(stats.hessian, stats.hessian.t())

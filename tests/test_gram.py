"""pipeline.oneshot.gram: the accumulated upper triangle of X^T X, through MKL's syrk and through the panels."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.oneshot import gram
from pipeline.oneshot.calibration import InputStats


def test_torch_carries_mkl_syrk_on_this_x86_build():
    """The fast path is not silently absent where torch ships MKL (the x86 wheels CI installs)."""
    if "mkl" not in torch.__config__.show().lower():
        pytest.skip("this torch build has no MKL: the panels run (tested below)")
    assert gram.mkl_syrk(torch.float64) is not None and gram.mkl_syrk(torch.float32) is not None


@pytest.mark.parametrize("path", ["syrk", "panels"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=15, deadline=None)
@given(width=st.integers(1, 450), tokens=st.integers(1, 70), beta=st.sampled_from([0.0, 0.5, 1.0]))
def test_upper_triangle_is_beta_c_plus_alpha_xtx(path, dtype, width, tokens, beta):
    """Both paths against the full product in float64: widths across the 192-row panels, any token count."""
    if path == "syrk" and gram.mkl_syrk(dtype) is None:
        pytest.skip("no MKL syrk in this torch build")
    gen = torch.Generator().manual_seed(width * 1000 + tokens)
    x = torch.randn(tokens, width, generator=gen, dtype=torch.float64)
    c0 = torch.randn(width, width, generator=gen, dtype=torch.float64)
    expected = (beta * c0 + 0.75 * x.t() @ x).triu()
    upper = c0.to(dtype).clone()
    syrk = gram.mkl_syrk
    try:
        if path == "panels":
            gram.mkl_syrk = lambda dtype: None
        gram.accumulate_gram(upper, x.to(dtype), alpha=0.75, beta=beta)
    finally:
        gram.mkl_syrk = syrk
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-4}
    torch.testing.assert_close(upper.triu().double(), expected, **tol)


def test_a_non_contiguous_batch_and_the_running_mean(monkeypatch):
    """InputStats' Hessian 2 X^T X / nsamples over batches, from a transposed (non-contiguous) input."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(3, 40, 300, generator=gen, dtype=torch.float64)
    stats = InputStats(300, "cpu", hessian=True)
    for sample in X:
        stats.add_batch(sample.t().contiguous().t())  # [tokens, in] as a view of a transposed tensor
    flat = X.reshape(-1, 300)
    torch.testing.assert_close(stats.hessian, 2 * flat.t() @ flat / 3, rtol=1e-12, atol=1e-12)
    assert torch.equal(stats.hessian, stats.hessian.t())


def test_syrk_can_be_turned_off(monkeypatch):
    gram.mkl_syrk.cache_clear()
    monkeypatch.setenv("MASKLLM_SYRK", "torch")
    try:
        assert gram.mkl_syrk(torch.float64) is None
    finally:
        monkeypatch.delenv("MASKLLM_SYRK")
        gram.mkl_syrk.cache_clear()

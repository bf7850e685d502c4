"""The fused mask kernel (C++) against its torch reference, the noise against Gumbel(0, 1), and the
properties the learn loop relies on: no subnormals late in the schedule, no dependence on threads."""
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.maskllm import kernel as mk
from pipeline.model.nm import candidates


def lowbias32(x: int) -> int:
    """The hash, written out on Python ints: the independent reference of mask_kernel.uniform."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@settings(max_examples=30, deadline=None)
@given(index=st.integers(0, 2**40), k0=st.integers(0, 2**32 - 1), k1=st.integers(0, 2**32 - 1))
def test_uniform_is_the_hash_on_the_exact_lattice(index, k0, k1):
    h = lowbias32(lowbias32((index & 0xFFFFFFFF) ^ k0) ^ k1 ^ (index >> 32))
    expected = (2 * (h >> 9) + 1) / 2**24
    got = float(mk.uniform(torch.tensor([index]), (k0, k1)))
    assert got == expected and 0 < got < 1


def test_noise_is_gumbel_and_keyed():
    g = mk.gumbel(100_000, 6, mk.noise_key(0, 1, 2)).flatten().double()
    assert abs(float(g.mean()) - 0.5772157) < 0.01  # Euler-Mascheroni: the mean of Gumbel(0, 1)
    assert abs(float(g.var()) - math.pi**2 / 6) < 0.03
    # the CDF exp(-exp(-x)) at a few points
    for x in (-1.0, 0.0, 1.0, 3.0):
        assert abs(float((g <= x).double().mean()) - math.exp(-math.exp(-x))) < 0.005, x
    assert float(g.max()) <= 16.7 and float(g.min()) >= -2.9  # the lattice (0, 1) bounds it
    same = mk.gumbel(10, 6, mk.noise_key(0, 1, 2))
    assert torch.equal(same, mk.gumbel(10, 6, mk.noise_key(0, 1, 2)))
    for other in (mk.noise_key(0, 2, 2), mk.noise_key(0, 1, 3), mk.noise_key(1, 1, 2)):
        assert not torch.equal(same, mk.gumbel(10, 6, other))
    # neighbouring keys give unrelated noise, not shifted copies
    a, b = mk.gumbel(50_000, 6, mk.noise_key(0, 1, 2)), mk.gumbel(50_000, 6, mk.noise_key(0, 2, 2))
    assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.01


VIEWS = {  # stored shape (every dim divisible by 8), view to the logical [out, in] / [E, out, in]
    "linear": ((24, 16), None),
    "conv1d": ((16, 24), lambda t: t.t()),
    "experts": ((3, 8, 16), None),
    "experts_transposed": ((3, 16, 8), lambda t: t.transpose(-1, -2)),
}


@pytest.fixture(scope="module")
def kernel():
    k = mk.cpp_kernel()
    assert k is not None, "the C++ mask kernel did not build (see the warning above)"
    return k


@pytest.mark.parametrize("impl", ["cpp", "torch"])
@pytest.mark.parametrize("layout", sorted(VIEWS))
@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (4, 8), (3, 8)])  # 3:8: the kernel's generic path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_the_reference(kernel, impl, layout, pattern, dtype):
    """Both fused implementations (the C++ kernel, and the torch ops that recompute in backward, the
    CUDA path) against the formula under plain autograd."""
    shape, view = VIEWS[layout]
    n, m = pattern
    S = candidates(n, m)
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(shape, generator=gen).to(dtype)
    groups = weight.numel() // m
    logits0 = torch.randn(groups, S.shape[0], generator=gen) * 0.01
    key = mk.noise_key(3, 7, 11)
    upstream = torch.randn(shape, generator=gen).to(dtype)
    results = []
    fused = mk._MaskedWeight if impl == "cpp" else mk._MaskedWeightTorch
    for fn in (fused.apply, mk.masked_weight_reference):
        logits = logits0.clone().requires_grad_()
        out, sq, conf = fn(weight, logits, S, key, 0.7, 100.0, view)
        ((out.float() * upstream.float()).sum() - 0.3 * sq).backward()
        results.append((out, sq, conf, logits.grad))
    (out, sq, conf, grad), (rout, rsq, rconf, rgrad) = results
    assert out.shape == weight.shape and out.dtype == dtype and out.stride() == weight.stride()
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(out, rout, **tol)
    torch.testing.assert_close(sq, rsq, rtol=1e-5, atol=0)
    torch.testing.assert_close(conf, rconf, rtol=1e-5, atol=0)
    # bfloat16: the reference rounds the regulariser's gradient 2 * out to bfloat16, the kernel keeps it
    # in float32, so they agree to bfloat16's precision only
    rel = 1e-3 if dtype == torch.float32 else (4e-2 if impl == "cpp" else 1e-3)
    torch.testing.assert_close(grad, rgrad, rtol=rel, atol=rel * float(rgrad.abs().max()))
    assert grad.abs().sum() > 0


def test_kernel_is_the_same_for_any_thread_count(kernel):
    S = candidates(2, 4)
    weight = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))  # 4,800 groups: many tiles
    logits = torch.randn(weight.numel() // 4, 6, generator=torch.Generator().manual_seed(1)) * 0.01
    grad_out = torch.randn_like(weight)
    runs, before = [], torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)  # the kernel runs on torch's pool: give it that many threads
            out = torch.empty_like(weight)
            sq, conf, _ = kernel.forward(weight[None], out[None], logits, S, 1, 2, 100.0, 0.5, threads, False)
            again = torch.empty_like(weight)
            _, _, y = kernel.forward(weight[None], again[None], logits, S, 1, 2, 100.0, 0.5, threads, True)
            assert torch.equal(again, out)
            g = kernel.backward(grad_out[None], -0.1, weight[None], logits, S, 1, 2, 100.0, 0.5, threads, None)
            g_from_y = kernel.backward(grad_out[None], -0.1, weight[None], logits, S, 1, 2, 100.0, 0.5, threads, y)
            runs.append((out, sq, conf, g, y, g_from_y))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (4, 8), (3, 8)])
@pytest.mark.parametrize("temperature", [4.0, 0.5, 0.05])
def test_kernel_backward_from_the_forwards_sample_is_the_same(kernel, pattern, temperature):
    """The sample a recomputing forward keeps (y, in the kernel's tiles of 64 groups) is the sample the
    reference draws, its W * mask is the first forward's, and the backward reading y gives the very
    bits of the backward drawing it again, at every point of the schedule (tau 0.05: most entries
    flushed to 0). 3:8 takes the generic path."""
    n, m = pattern
    S = candidates(n, m)
    C = S.shape[0]
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(70, 8 * m, generator=gen)  # 560 groups: a partial last tile
    logits = torch.randn(weight.numel() // m, C, generator=gen) * 0.05
    grad_out = torch.randn_like(weight)
    out, again = torch.empty_like(weight), torch.empty_like(weight)
    sq, _, none = kernel.forward(weight[None], out[None], logits, S, 5, 6, 500.0, temperature, 2, False)
    zero, _, y = kernel.forward(weight[None], again[None], logits, S, 5, 6, 500.0, temperature, 2, True)
    assert torch.equal(again, out) and none.numel() == 0 and float(sq) > 0 and float(zero) == 0
    groups = logits.shape[0]
    tiles = -(-groups // 64)
    assert y.shape == (tiles * C * 64,)
    as_groups = y.view(tiles, C, 64).transpose(1, 2).reshape(-1, C)[:groups]
    reference = mk.sample_reference(logits, (5, 6), temperature, 500.0)
    torch.testing.assert_close(as_groups, reference, rtol=1e-4, atol=1e-5)  # z is 1/tau times larger at tau 0.05
    drawn = kernel.backward(grad_out[None], -0.2, weight[None], logits, S, 5, 6, 500.0, temperature, 2, None)
    read = kernel.backward(grad_out[None], -0.2, weight[None], logits, S, 5, 6, 500.0, temperature, 2, y)
    assert torch.equal(drawn, read)
    with pytest.raises(RuntimeError, match="the one masked_weight_forward kept"):
        kernel.backward(grad_out[None], -0.2, weight[None], logits, S, 5, 6, 500.0, temperature, 2, y[:-1])


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_no_subnormals_at_the_end_of_the_schedule(kernel, impl):
    """tau at its end value (0.05) and kappa at 500 make most soft-mask entries underflow: they must be
    exactly 0, not subnormal, or every CPU op reading the masked weights slows down (up to ~80x)."""
    fn = mk._MaskedWeight.apply if impl == "cpp" else mk._MaskedWeightTorch.apply
    S = candidates(2, 4)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=gen)
    logits = (torch.randn(weight.numel() // 4, 6, generator=gen) * 0.05).requires_grad_()
    out, sq, _ = fn(weight, logits, S, mk.noise_key(0, 63, 0), 0.05, 500.0, None)
    (out.sum() + sq).backward()
    tiny = torch.finfo(torch.float32).tiny
    for t in (out, logits.grad, mk.sample_reference(logits.detach(), mk.noise_key(0, 63, 0), 0.05, 500.0)):
        subnormal = (t != 0) & (t.abs() < tiny)
        assert int(subnormal.sum()) == 0
    y = mk.sample_reference(logits.detach(), mk.noise_key(0, 63, 0), 4.0, 100.0)
    assert (y > 0).all()  # early in the schedule nothing is flushed


def test_underflowing_candidates_are_exactly_the_references_zeros(kernel):
    """At the end of the schedule most exps of the softmax underflow; the kernel takes them as 0
    without calling exp on them (libmvec's slow scalar path). The sample must still be the formula's:
    the same zeros, the same surviving values."""
    S = candidates(2, 4)
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5_000, 6, generator=gen) * 0.05
    key = mk.noise_key(0, 63, 1)
    y, _ = kernel.sample(logits, S, key[0], key[1], 500.0, 0.05)
    ref = mk.sample_reference(logits, key, 0.05, 500.0)
    assert float((ref == 0).float().mean()) > 0.5  # the case this is about: most lanes underflow
    assert torch.equal(y == 0, ref == 0)
    # z = (kappa * pi + G) / tau reaches ~1e3 here, where one rounding of z moves exp(z - max) by ~1e-4
    torch.testing.assert_close(y, ref, rtol=1e-3, atol=0)
    torch.testing.assert_close(y.sum(-1), torch.ones(5_000), rtol=1e-6, atol=0)


def test_masked_weight_dispatches_by_device_and_candidates(kernel):
    assert mk.kernel_name("cpu", 6) == "cpp"
    assert mk.kernel_name("cpu", mk.MAX_CPP_CANDIDATES + 1) == "torch"  # e.g. 8:16 (12,870 candidates)
    assert mk.kernel_name("meta", 6) == "torch"  # any non-CPU device: the torch ops


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_fused_paths_keep_nothing_but_their_inputs_for_backward(kernel, impl):
    """What autograd keeps of a layer's mask: only its inputs (the weight and the logits are parameters
    anyway), so activation checkpointing and long forwards do not pay per-weight memory for the sample;
    the plain-autograd formula keeps float tensors per group."""
    fused = mk._MaskedWeight if impl == "cpp" else mk._MaskedWeightTorch
    S = candidates(2, 4)
    weight = torch.randn(64, 128)
    logits = (torch.randn(weight.numel() // 4, 6) * 0.01).requires_grad_()
    inputs = {weight.data_ptr(), logits.data_ptr(), S.data_ptr()}
    for fn, lean in ((fused.apply, True), (mk.masked_weight_reference, False)):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            out, sq, _ = fn(weight, logits, S, mk.noise_key(0, 1, 2), 1.0, 100.0, None)
        extra = sum(t.numel() * t.element_size() for t in kept if t.data_ptr() not in inputs)
        assert (extra == 0) == lean, (fn, extra)


@pytest.mark.long(155)
def test_a_compiler_without_openmp_builds_the_same_kernel_on_one_thread(kernel, tmp_path):
    """Where -fopenmp is refused (Apple clang), the kernel is built without it, says so, and computes the
    same bits (its tiles in order on one thread) instead of falling back to the 19x slower torch ops.
    In a subprocess: the two builds register the same torch.ops namespace."""
    S = candidates(2, 4)
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(300, 64, generator=gen)
    logits = torch.randn(weight.numel() // 4, 6, generator=gen) * 0.01
    grad_out = torch.randn_like(weight)
    out = torch.empty_like(weight)
    kernel.forward(weight[None], out[None], logits, S, 1, 2, 100.0, 0.5, 2, False)
    grad = kernel.backward(grad_out[None], -0.1, weight[None], logits, S, 1, 2, 100.0, 0.5, 2, None)
    torch.save({"weight": weight, "logits": logits, "grad_out": grad_out, "out": out, "grad": grad, "S": S},
               tmp_path / "case.pt")
    script = textwrap.dedent(f"""
        import warnings, torch, torch.utils.cpp_extension as ce
        real = ce.load
        def load(*args, **kwargs):
            if "-fopenmp" in kwargs.get("extra_cflags", []):
                raise RuntimeError("clang: error: unsupported option '-fopenmp'")
            return real(*args, **kwargs)
        ce.load = load
        from pipeline.maskllm import kernel as mk
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            k = mk.cpp_kernel()
        assert k is not None, [str(w.message) for w in caught]
        assert any("without OpenMP" in str(w.message) for w in caught), [str(w.message) for w in caught]
        c = torch.load({str(tmp_path / "case.pt")!r})
        out = torch.empty_like(c["weight"])
        k.forward(c["weight"][None], out[None], c["logits"], c["S"], 1, 2, 100.0, 0.5, 2, False)
        grad = k.backward(c["grad_out"][None], -0.1, c["weight"][None], c["logits"], c["S"], 1, 2, 100.0, 0.5, 2, None)
        assert torch.equal(out, c["out"]) and torch.equal(grad, c["grad"])
        print("same bits")
    """)
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "same bits" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]

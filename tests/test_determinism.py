"""Same params, same machine, same bits: learn's first steps from two fresh processes whose memory
holds other data at other addresses, on a model with the default model's shapes (SmolLM2-135M's widths
and vocabulary, 2 of its 30 blocks), so that every GEMM and kernel is the default run's."""
import subprocess
import sys

import pytest

from tests.conftest import ROOT, repo_env
from tests.determinism_probe import probe, save_model


@pytest.mark.long(135)
def test_two_fresh_processes_with_different_allocation_histories_learn_the_same_bits(tmp_path):
    save_model(tmp_path / "model")
    env = repo_env(OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")  # the stages' threads, not the tests' one
    # a fresh process as a stage starts, and one whose allocator holds other blocks
    runs = [probe(tmp_path / "model", junk, env) for junk in (0, 1)]
    assert len(runs[0]["ce"]) == 3
    assert runs[1] == runs[0], runs


def test_stages_ask_mkl_for_strict_reproducibility(tmp_path):
    import pytest
    import torch

    if "mkl" not in torch.__config__.show().lower():
        pytest.skip("this torch build has no MKL (its BLAS has no CNR modes to set)")
    code = ("import torch\nfrom pipeline.stage import run_stage\n"
            "run_stage('probe', lambda p: str(float((torch.randn(64, 64) @ torch.randn(64, 64)).sum())))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**repo_env(), "MKL_VERBOSE": "1"},
                         capture_output=True, text=True, check=True)
    gemm = next(line for line in res.stdout.splitlines() if "SGEMM" in line)
    assert "CNR:AUTO,STRICT" in gemm and "Dyn:0" in gemm  # the first MKL call already in strict, fixed-thread mode

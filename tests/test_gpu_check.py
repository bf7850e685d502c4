"""bench/gpu_check.sh --cpu-dry-run: every part of the GPU check runs here, on CPU, without the pipeline's extras."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("pydantic", "mlflow", "dvc", "gguf")  # absent on the GPU machine


def _env(tmp_path: Path) -> dict:
    """This venv's Python, with the packages the GPU machine lacks made unimportable."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\n")
    return {**os.environ, "PYTHONPATH": str(site), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "GPU_CHECK_LIMIT_S": "3000", "MASKLLM_DEVICE": "cpu"}


@pytest.mark.long(40)
def test_dry_run_runs_every_part_without_dvc_mlflow_pydantic_or_gguf(tmp_path):
    from bench.gpu_check import LEARN_RUNS

    env = _env(tmp_path)
    blocked = subprocess.run([sys.executable, "-c", "import pydantic"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0  # the blocking works: the check below really runs without them
    out = tmp_path / "gpu_check.json"
    # no budget: a busy machine must not skip parts (the budget is for the GPU run)
    res = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-dry-run", "--out", str(out), "--steps", "2",
                          "--budget-s", "100000"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(out.read_text())
    parts = result["parts"]
    assert set(parts) == {"sdpa", "same_masks", "prior: sparsegpt", *(f"learn: {run[0]}" for run in LEARN_RUNS)}
    for name, part in parts.items():
        assert "error" not in part and "skipped" not in part, (name, part)
    assert parts["sdpa"]["float32"] in ("flash", "math")
    for run in LEARN_RUNS:
        part = parts[f"learn: {run[0]}"]
        assert part["dtype"] == run[3] and part["nm"] == f"{run[4][0]}:{run[4][1]}" and len(part["step_s"]) == 2
        assert part["peak_bytes"] > 0 and part["tokens_per_s"] > 0
        # the plan for the same run, against the tensors measured on CPU (memory_plan.LiveBytes)
        assert abs(part["error_vs_plan"]) < 0.25, (run[0], part["error_vs_plan"], part["plan_terms"])
    same = parts["same_masks"]
    assert same["soft_mask_max_abs_diff"] < 1e-6  # the torch ops against the C++ kernel, one sample
    assert same["agreement"] == 1.0
    assert parts["prior: sparsegpt"]["layers"] == 14  # 2 blocks x 7 linears
    assert result["provenance"]["device"] == "cpu" and result["dry_run"] is True


def test_without_cuda_it_says_so_and_how_to_dry_run(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu_check.py would run the GPU check, not refuse")
    res = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path / "x.json")],
                         cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True)
    assert res.returncode == 2 and "--cpu-dry-run" in res.stderr and not (tmp_path / "x.json").exists()

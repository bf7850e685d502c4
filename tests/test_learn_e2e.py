"""The learn stage for real: resume after SIGKILL under `dvc repro`, and DDP (gloo, 2 CPU processes)."""
import os
import signal
import subprocess
import time

import torch
from safetensors.torch import load_file

from tests.conftest import BIN, repo_env, run, set_params

LEARN = {"learn.steps": 30, "learn.checkpoint_every": 3, "learn.batch_size": 2}


def logits(repo):
    return load_file(str(repo / "artifacts" / "learn" / "logits.safetensors"))


def checkpoint_step(repo) -> int:
    state = repo / "artifacts" / "learn_ckpt" / "state.pt"
    try:
        return int(torch.load(state, weights_only=True)["step"])
    except Exception:  # not written yet, or being replaced right now
        return 0


def test_sigkilled_learn_resumes_to_the_same_logits(micro_copy):
    repo = micro_copy
    set_params(repo, LEARN)
    proc = subprocess.Popen([str(BIN / "dvc"), "repro", "learn"], cwd=repo, env=repo_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while checkpoint_step(repo) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: dvc and the stage
    proc.wait()
    killed_at = checkpoint_step(repo)
    assert proc.returncode == -signal.SIGKILL and 6 <= killed_at < 30, (proc.returncode, killed_at)
    res = run([str(BIN / "dvc"), "repro", "learn"], repo)
    assert f"resumed at {killed_at}" in res.stdout, res.stdout[-2000:]
    resumed = logits(repo)
    assert not (repo / "artifacts" / "learn_ckpt" / "state.pt").exists()  # cleared when finished

    run([str(BIN / "dvc"), "repro", "--force", "learn"], repo)  # the same run, uninterrupted
    fresh = logits(repo)
    assert resumed.keys() == fresh.keys() and len(fresh) == 14  # 2 blocks x 7 linear layers
    for name in fresh:
        assert torch.equal(resumed[name], fresh[name]), name


def test_ddp_two_processes_match_one_process(micro_copy):
    repo = micro_copy
    set_params(repo, {**LEARN, "learn.steps": 6, "learn.batch_size": 4})
    env = repo_env(OMP_NUM_THREADS="1")
    run([str(BIN / "python"), "-m", "stages.learn"], repo, env=env)
    single = logits(repo)
    res = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "stages.learn"], repo, env=env)
    assert "6 steps (fresh)" in res.stdout
    ddp = logits(repo)
    worst = max((ddp[k] - single[k]).abs().max().item() for k in single)
    moved = max((single[k] - single[k].mean()).abs().max().item() for k in single)
    # Same global batch and the same Gumbel sample on every rank: only the all-reduce's
    # float summation order differs from the single process.
    assert worst < 1e-4, worst
    agree = sum(int((ddp[k].argmax(-1) == single[k].argmax(-1)).sum()) for k in single)
    total = sum(single[k].shape[0] for k in single)
    assert agree / total > 0.999 and moved > 1e-3

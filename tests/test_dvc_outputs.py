"""A queued `dvc exp run` works in a workspace made from a git commit plus the DVC cache: an
output DVC does not cache must be in git, or it is missing there and DVC reruns its stage (and,
through it, everything downstream whose inputs it cannot prove unchanged) in every experiment."""
import subprocess
from pathlib import Path

from dvc.repo import Repo

ROOT = Path(__file__).resolve().parent.parent
# stages whose uncached output git does not carry, and why their rerun costs nothing
RERUN_IS_FREE = {
    "learn_prior": "always runs anyway (the path and sha256 of the prior mask), instantly",
    "row@": "a fingerprint of files, under a second; its rerun writes the same bytes, so the evaluations stay cached",
}


def test_every_uncached_output_travels_with_git():
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split())
    missing = []
    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            for out in stage.outs:
                path = out.def_path.rstrip("/")
                if out.use_cache or path in tracked or any(t.startswith(path + "/") for t in tracked):
                    continue
                if not any(stage.addressing.startswith(k) for k in RERUN_IS_FREE):
                    missing.append(f"{stage.addressing}: {path}")
    assert not missing, ("uncached outputs git does not carry (a queued experiment reruns their stage): "
                         + ", ".join(missing) + "; cache them, commit them, or leave them undeclared")

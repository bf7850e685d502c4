import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Outputs of an earlier run in the developer's checkout never leak into a test copy.
SKIP = ("tests/", "notebooks/", "bench/", "artifacts/", "metrics/", "plots/", "records/", "mlflow")


def repo_env(**extra) -> dict:
    """Environment for DVC/stage subprocesses: the venv first on PATH, 2 threads, no hub."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
                # The micro model is too small to gain from intra-op threads; one thread per
                # process avoids oversubscription when several tools share the 2 cores.
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def run(cmd, cwd, check=True, env=None, timeout=1500):
    res = subprocess.run(cmd, cwd=cwd, env=env or repo_env(), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def copy_repo(dest: Path, overrides: dict | None = None) -> Path:
    """A fresh git+DVC copy of the tracked project files, params overridden (dotted keys)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if not (ROOT / f).is_file() or f.startswith(SKIP) or f == "dvc.lock":
            continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    if overrides:
        set_params(dest, overrides)
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "copy"], dest)
    return dest


def micro_overrides(**extra) -> dict:
    from pipeline.profile import load_profile

    return {**load_profile("micro"), **extra}


def set_params(repo: Path, overrides: dict) -> None:
    from pipeline.profile import apply_overrides

    raw = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(apply_overrides(raw, overrides), sort_keys=False))


# fixtures that need the micro pipeline build: its learn stage and what it depends on (LEARN_BASE),
# or all of it
LEARN_BASE = ("micro_learn_copy",)
MICRO = ("micro_base", "micro_copy", "micro_repo", *LEARN_BASE)


def seconds(item) -> float:
    """A ``long(seconds)`` test's typical seconds in `make test` (0 for the others)."""
    mark = item.get_closest_marker("long")
    if mark is None:
        return 0
    if len(mark.args) != 1 or not isinstance(mark.args[0], (int, float)):
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.long takes the test's typical seconds in "
                                "`make test`, e.g. @pytest.mark.long(90)")
    return mark.args[0]


def pytest_collection_modifyitems(config, items):
    """Tests on the micro build last, those that need its learn stage only first among them: the unit
    tests run while it builds in the background, the learn tests while the rest of it does. Within
    each phase the tests marked ``long`` start first, the longest first, so that the session ends on
    short tests that even out the workers, not on one worker running a long test while the others
    idle. xdist hands tests out in this order, and a worker that starts a test takes the next one in
    reserve: so each long test is followed by a short one, which the worker that starts the long test
    holds, instead of the next long test waiting behind it (it did: the two longest ran one after the
    other on one worker while the others idled for 170 s)."""
    def phase(item):
        return (any(name in item.fixturenames for name in MICRO),
                not any(name in item.fixturenames for name in LEARN_BASE))

    ordered = []
    for key in sorted({phase(item) for item in items}):
        mine = [item for item in items if phase(item) == key]
        longs = sorted((item for item in mine if seconds(item)), key=lambda item: -seconds(item))
        shorts = [item for item in mine if not seconds(item)]
        for i, item in enumerate(longs):
            ordered += [item, *shorts[i:i + 1]]
        ordered += shorts[len(longs):]
    items[:] = ordered


def shared_home(tmp_path_factory, config) -> Path:
    root = tmp_path_factory.getbasetemp()
    if hasattr(config, "workerinput"):  # an xdist worker: basetemp is per worker
        root = root.parent
    return root


@pytest.fixture(scope="session", autouse=True)
def _micro_build(tmp_path_factory, request):
    """Start the micro profile's `dvc repro` in the background as the session starts, once
    for all xdist workers (file lock), if any selected test needs it."""
    if not any(name in item.fixturenames for item in request.session.items for name in MICRO):
        return
    from filelock import FileLock

    root = shared_home(tmp_path_factory, request.config)
    home = root / "micro-shared"
    with FileLock(str(root / "micro-shared.lock")):
        if not (home / "started").is_file():
            shutil.rmtree(home, ignore_errors=True)
            repo = copy_repo(home / "learn", micro_overrides())
            # `dvc repro learn` first (the learn tests start from it), then the rest in a copy
            dvc = BIN / "dvc"
            script = (f'"{dvc}" repro learn >../learn.stdout 2>../learn.stderr; rc=$?; echo $rc >../learn.rc; '
                      f'if [ $rc -ne 0 ]; then echo "learn base: $rc" >../repro.rc; exit; fi; '
                      f'cp -a ../learn ../repo && cd ../repo && "{dvc}" repro >../repro.stdout 2>../repro.stderr; '
                      f'echo $? >../repro.rc')
            subprocess.Popen(["sh", "-c", script], cwd=repo, env=repo_env(), start_new_session=True)
            (home / "started").touch()


def _wait_for(home: Path, phase: str) -> str:
    """The stdout of a phase of the micro build (``learn``, ``repro``) once it succeeded; its log if not."""
    rc, deadline = home / f"{phase}.rc", time.monotonic() + 1500
    while not (rc.is_file() and rc.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(1)
    code = rc.read_text().strip() if rc.is_file() else "still running after 1500 s"
    logs = [home / f"{p}.{s}" for p in ("learn", phase) for s in ("stdout", "stderr")]
    if code != "0":
        raise AssertionError(f"micro `dvc repro` ({phase}) failed ({code}):\n"
                             + "".join(f.read_text()[-4000:] for f in dict.fromkeys(logs) if f.is_file()))
    return (home / f"{phase}.stdout").read_text()


@pytest.fixture(scope="session")
def micro_base(_micro_build, tmp_path_factory, request):
    """The micro profile's whole pipeline reproduced once (in the background, from the
    session's start); tests work on copies of it. The xdist workers share the one build."""
    home = shared_home(tmp_path_factory, request.config) / "micro-shared"
    stdout = _wait_for(home, "learn") + _wait_for(home, "repro")
    return home / "repo", SimpleNamespace(stdout=stdout)


@pytest.fixture
def micro_learn_copy(_micro_build, tmp_path_factory, request, tmp_path):
    """A private copy of the micro build once its `learn` stage and what it depends on are reproduced
    (the rest of the build goes on in another folder)."""
    home = shared_home(tmp_path_factory, request.config) / "micro-shared"
    _wait_for(home, "learn")
    repo = tmp_path / "repo"
    shutil.copytree(home / "learn", repo, symlinks=True)
    return repo


@pytest.fixture
def micro_copy(micro_base, tmp_path):
    """A private copy of the reproduced micro repository (git, DVC cache, outputs and all)."""
    repo = tmp_path / "repo"
    shutil.copytree(micro_base[0], repo, symlinks=True)
    return repo


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: OpenMP fork/join costs more than it saves, and stalls on a busy machine."""
    from pipeline.oneshot.sparsegpt import one_thread

    with one_thread():
        yield

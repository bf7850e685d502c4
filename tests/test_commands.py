"""Every command in the README and docs/, tested as a user types it.

The commands are read from the ```bash blocks. Those that are fast run for real on a reproduced micro
pipeline (a profile, the memory plan, `make micro`, `dvc exp show`, ...); the long ones (a full `dvc
repro`, an ablation's `dvc exp run -S`, GPU and hub runs, SLURM) go through the parsers and validation
they would meet (`make -n`, DVC's own -S parser and the params validation, argparse) without running.
A command no handler knows fails the test: a new documented command needs its check here.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, ROOT, repo_env

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def documented() -> list[tuple[str, str]]:
    """(file, command) of every line of every bash block: continuations joined, comments dropped."""
    out = []
    for path in DOCS:
        for block in FENCE.findall(path.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    out.append((path.name, line.split(" #")[0].strip()))
    return out


COMMANDS = documented()


def expand(command: str, cwd: Path) -> list[str]:
    """The words the shell would pass: ``$(python -m pipeline.profile NAME)`` replaced by its output."""
    def profile(m):
        res = subprocess.run([str(BIN / "python"), "-m", "pipeline.profile", m.group(1)], cwd=cwd, env=repo_env(),
                             capture_output=True, text=True, check=True)
        return res.stdout.strip()
    command = re.sub(r"\$\(python -m pipeline\.profile ([\w-]+)\)", profile, command)
    command = command.replace("$(hostname)", "node001").replace('"$PWD"', str(cwd))
    return shlex.split(command)


def check_overrides(words: list[str], params: Path) -> int:
    """Every -S of a `dvc exp run` through DVC's own override parser (sweeps expanded as DVC expands
    them) onto a copy of params.yaml, then through the params validation -> how many runs it makes."""
    from dvc.utils.hydra import apply_overrides, get_hydra_sweeps

    from pipeline.config import parse_params

    overrides = [words[i + 1] for i, w in enumerate(words) if w in ("-S", "--set-param")]
    runs = [r["params.yaml"] for r in get_hydra_sweeps({"params.yaml": overrides})] if overrides else [[]]
    for run in runs:
        copy = params.parent / "checked.yaml"
        copy.write_text(params.read_text())
        apply_overrides(copy, run)
        parse_params(yaml.safe_load(copy.read_text()), f"params.yaml with {run}")
    return len(runs)


# pure-Python commands run in this process: torch and the meta models are built once for all of them
IN_PROCESS = ("pipeline.maskllm.memory_plan", "pipeline.profile")


def run(words, cwd, **kw):
    res = subprocess.run(words, cwd=cwd, env=repo_env(), capture_output=True, text=True, timeout=900, **kw)
    assert res.returncode == 0, f"{' '.join(words)} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res


def in_process(module: str, args: list[str]) -> str:
    """``python -m module *args`` through the module's main in this interpreter (torch and the libraries
    are imported once for all such commands) -> what it printed; a non-zero exit fails."""
    import runpy
    from contextlib import redirect_stdout
    from io import StringIO

    argv, cwd = sys.argv, os.getcwd()
    sys.argv, out = [module, *args], StringIO()
    os.chdir(ROOT)
    try:
        with redirect_stdout(out):
            runpy.run_module(module, run_name="__main__")
    except SystemExit as e:
        assert e.code in (0, None), f"python -m {module} {' '.join(args)} exited {e.code}"
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return out.getvalue()


# commands that are not the project's to run here: their checks
def check(words: list[str], repo: Path, tmp: Path) -> str:
    head = words[0]
    if head == "source":  # source .venv/bin/activate
        assert (ROOT / words[1]).is_file() or Path(sys.prefix, "bin", "activate").is_file()
        return "environment"
    if head in ("python3", ".venv/bin/pip") and "venv" in words:
        return "environment"
    if head == ".venv/bin/pip" or words[:3] == ["python3", "-m", "pip"]:
        from packaging.requirements import Requirement

        specs = [w for w in words[2:] if not w.startswith("-") and not w.startswith("http")]
        assert all(Requirement(s) for s in specs) and "https://download.pytorch.org/whl/" in " ".join(words)
        return "pip (parsed)"
    if head == "make":
        target = words[1]
        if target == "micro":
            run(["make", "micro"], repo)  # as typed, in a reproduced micro copy (.venv links the test's venv)
            return "ran"
        run(["make", "-n", *words[1:]], ROOT)
        return "make -n"
    if head == "dvc":
        sub = words[1:3]
        if sub == ["exp", "run"]:
            # a MaskLLM run each (minutes on the default profile): parsed and validated here; that an
            # ablation reruns only the MaskLLM branch is run for real in tests/test_pipeline_e2e.py
            n = check_overrides(words, repo / "params.yaml")
            return f"parsed ({n} run{'s' if n > 1 else ''})"
        if sub[0] in ("repro",):
            run(["dvc", *words[1:], "--dry"], repo)
            return "dry run"
        if sub[0] in ("metrics", "plots") or sub == ["exp", "show"]:
            run(words, repo)
            return "ran"
        if sub[0] in ("commit", "queue"):
            run(["dvc", *words[1:3], "--help"], repo)
            stage = words[-1]
            if sub[0] == "commit":
                assert stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
            return "parsed"
    if head == "python" and words[1] == "-m":
        module = words[2]
        if module.startswith("bench."):  # measurements: argparse checks the flags, nothing runs
            assert "usage:" in in_process(module, [*words[3:], "--help"])
            return "argparse"
        if module == "stages.learn":  # srun's command on every node of a SLURM job
            run(["python", "-c", "import stages.learn"], ROOT)
            return "import"
        if module == "pipeline.profile" and "--write" in words:
            params = tmp / "params.yaml"
            params.write_text((ROOT / "params.yaml").read_text())
            run(["python", *words[1:words.index("--write") + 1], str(params)], ROOT)
            return "ran (on a copy)"
        if module == "pipeline.records.docs":
            run(["python", *words[1:], "--check"], ROOT)
            return "ran --check"
        if module in IN_PROCESS:  # the same argv through the module's main, without a new interpreter
            assert in_process(module, words[3:]).strip(), f"{' '.join(words)} printed nothing"
            return "ran (in process)"
        run(["python", *words[1:]], ROOT)
        return "ran"
    if head == "bash":
        run(["bash", "-n", *words[1:2]], ROOT)
        return "bash -n"
    if head == "git":
        if words[1] == "clone":
            run(["git", "clone", "-q", str(ROOT), str(tmp / "fresh")], tmp)
            return "ran"
        run(words, ROOT)
        return "ran"
    if head == "srun":
        return check(words[1:], repo, tmp)
    if head == "cd":
        return "shell"
    raise AssertionError(f"no check for the documented command {' '.join(words)!r}: add one to tests/test_commands.py")


@pytest.mark.long(85)
def test_every_documented_command_runs_or_parses(micro_copy, tmp_path):
    (micro_copy / ".venv").symlink_to(Path(sys.prefix))
    env_path = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    os.environ["PATH"] = env_path  # `make`, `dvc` and `python` as the activated venv provides them
    assert len(COMMANDS) > 30
    done = {}
    for source, command in COMMANDS:
        for part in command.split("&&"):
            words = expand(part.strip(), micro_copy)
            done[f"{source}: {part.strip()}"] = check(words, micro_copy, tmp_path)
    assert "ran" in done.values() and any("parsed" in v for v in done.values())


def test_a_broken_command_or_override_fails_the_check(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    assert check_overrides(["dvc", "exp", "run", "-S", "learn.seed=0,1,2", "-S", "learn.kappa=100"], params) == 3
    from dvc.exceptions import InvalidArgumentError

    with pytest.raises(InvalidArgumentError):  # a key params.yaml lacks: DVC's -S refuses it
        check_overrides(["dvc", "exp", "run", "-S", "learn.nprocs=2"], params)
    from pipeline.config import ParamsError

    with pytest.raises(ParamsError, match="learn.batch_size=2 must be a multiple"):
        check_overrides(["dvc", "exp", "run", "-S", "learn.nproc=2", "-S", "learn.parallel=fsdp",
                         "-S", "learn.micro_batch_size=2"], params)
    with pytest.raises(AssertionError, match="no check for the documented command"):
        check(["rm", "-rf", "artifacts"], ROOT, tmp_path)


def test_a_profile_prints_one_shell_word_per_override():
    from pipeline.profile import command_words, load_profile

    for name in ("micro", "paper", "gpu-1b", "authors-recipe"):
        words = command_words(load_profile(name))
        assert words[::2] == ["-S"] * (len(words) // 2)
        assert not any(" " in w for w in words), name
    out = subprocess.run(["bash", "-c", "printf '%s\\n' $(python -m pipeline.profile micro)"], cwd=ROOT,
                         env=repo_env(), capture_output=True, text=True, check=True).stdout.splitlines()
    assert "evaluate.domains=[wiki,shakespeare]" in out  # one word through the shell's splitting

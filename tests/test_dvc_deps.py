"""Every DVC stage depends on every file of pipeline/ and stages/ its script imports (transitively)
and on nothing of them it does not: an edit to any imported module reruns the stage, so a result is
never silently stale, and an edit elsewhere reruns nothing."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE = ("pipeline", "stages")
# files other than Python modules that a module reads at run time (by module path)
READS = {
    "pipeline/maskllm/kernel.py": ["pipeline/maskllm/csrc/masked_weight.cpp"],  # compiled on first use
    "pipeline/oneshot/sparsegpt.py": ["pipeline/oneshot/csrc/obs_sweep.cpp"],  # compiled on first use
    "pipeline/evaluation/zeroshot.py": ["tasks"],  # the embedded lm-eval task YAMLs and their hooks
}


def registry_modules() -> list[str]:
    """The method modules the pruning driver imports by name (pipeline/oneshot/registry.py)."""
    from pipeline.oneshot import registry

    return [method.module.replace(".", "/") + ".py" for method in registry.METHODS.values()]


# modules imported by name at run time, not by an import statement
IMPORTS_BY_NAME = {"pipeline/oneshot/prune.py": registry_modules()}

READ_PATHS = {path for paths in READS.values() for path in paths}


def module_file(name: str) -> Path | None:
    """pipeline.x -> pipeline/x.py (or a package's __init__.py); None outside pipeline/ and stages/."""
    if name.split(".")[0] not in CODE:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise AssertionError(f"import of {name!r}: no such module under {ROOT}")


def imported_modules(path: Path) -> set[Path]:
    """The pipeline/stages modules a file imports anywhere in it (lazy imports in functions too)."""
    out = {ROOT / m for m in IMPORTS_BY_NAME.get(str(path.relative_to(ROOT)), [])}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            try:
                found = module_file(name)
            except AssertionError:
                if name in names[1:]:  # `from pipeline.x import y`: y is a name, not a module
                    continue
                raise
            if found is not None and found.name != "__init__.py":
                out.add(found)
    return out


def closure(script: Path) -> set[str]:
    """The script and every module it imports, transitively, plus the files they read (repo paths).
    Python files inside what a module reads (the task hooks in tasks/) are followed too."""
    seen, reads, todo = set(), set(), [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for extra in READS.get(str(path.relative_to(ROOT)), []):
            reads.add(extra)
            todo.extend(sorted((ROOT / extra).rglob("*.py")) if (ROOT / extra).is_dir() else [])
        todo.extend(imported_modules(path) - seen)
    code = {str(p.relative_to(ROOT)) for p in seen}
    return {f for f in code if f.split("/")[0] in CODE} | reads


def expand(dep: str) -> set[str]:
    """A directory of code (a package) stands for its files: DVC hashes all of them."""
    path = ROOT / dep
    if dep in READ_PATHS or not path.is_dir():
        return {dep}
    return {str(f.relative_to(ROOT)) for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts
            and f.name != "__init__.py"}


def dvc_stages() -> list[tuple[str, str, set[str]]]:
    """(stage name, script, code deps) of every stage, foreach/matrix entries resolved by DVC itself."""
    from dvc.repo import Repo

    out = []
    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            if not getattr(stage, "cmd", None):
                continue
            match = re.match(r"python -m (stages\.\w+)", stage.cmd)
            assert match, f"stage {stage.addressing}: cmd {stage.cmd!r} is not `python -m stages.<name> ...`"
            deps = {str(Path(d.def_path)) for d in stage.deps}
            code = {d for d in deps if d.split("/")[0] in CODE or d in READ_PATHS}
            out.append((stage.addressing, str(module_file(match.group(1)).relative_to(ROOT)),
                        {f for d in code for f in expand(d)}))
    return out


STAGES = dvc_stages()


@pytest.mark.parametrize("name,script,deps", STAGES, ids=[s[0] for s in STAGES])
def test_stage_depends_on_exactly_the_code_it_imports(name, script, deps):
    needed = closure(ROOT / script)
    missing, extra = sorted(needed - deps), sorted(deps - needed)
    assert not missing, f"dvc.yaml stage {name!r} imports but does not depend on: {missing}"
    assert not extra, f"dvc.yaml stage {name!r} depends on code it never imports: {extra}"


def test_the_import_scan_sees_lazy_imports_and_transitive_ones(tmp_path):
    learn = closure(ROOT / "stages" / "learn.py")
    assert {"stages/learn.py", "pipeline/maskllm/train.py", "pipeline/maskllm/masks.py", "pipeline/maskllm/kernel.py",
            "pipeline/maskllm/csrc/masked_weight.cpp", "pipeline/config.py"} <= learn
    assert "pipeline/records/plots.py" not in learn  # learning draws nothing
    assert len(STAGES) > 10 and {s[0] for s in STAGES} >= {"data", "dense", "learn", "harden"}


def test_the_rows_are_listed_once_and_match_the_registry():
    """dvc.yaml's `rows` var (every per-row stage's list) is dense, the one-shot methods' rows in registry
    order, and MaskLLM: a method added to the registry without its rows here (or the reverse) fails."""
    import yaml

    from pipeline.evaluation.rows import ROWS

    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    rows = next(v["rows"] for v in raw["vars"] if isinstance(v, dict) and "rows" in v)
    assert tuple(rows) == ROWS
    text = (ROOT / "dvc.yaml").read_text()
    assert text.count("${rows}") == 3  # row, evaluate, zeroshot: no stage keeps a list of its own
    # validate runs the rows the choices read, a params list the params validation checks against ROWS
    assert raw["stages"]["validate"]["foreach"] == "${evaluate.validation_rows}"

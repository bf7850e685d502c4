"""The numbers in README.md and docs/ are generated from the committed files (pipeline/records/docs.py):
every generated block is what its files say, and a changed number fails the check."""
import subprocess
import sys

import pytest

from pipeline.records import docs
from tests.conftest import ROOT, repo_env


def test_every_generated_block_is_what_its_files_say():
    res = subprocess.run([sys.executable, "-m", "pipeline.records.docs", "--check"], cwd=ROOT, env=repo_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    names = {m.group("name") for path in docs.DOCS for m in docs.BLOCK.finditer(path.read_text())}
    assert names == set(docs.BLOCKS)  # every generator is used, and every block has one


def test_a_number_changed_by_hand_is_caught(monkeypatch):
    monkeypatch.chdir(ROOT)
    text = (ROOT / "docs" / "results.md").read_text()
    block = next(m for m in docs.BLOCK.finditer(text) if m.group("name") == "results")
    assert docs.render(text) == text
    edited = text.replace(block.group("body"), block.group("body").replace("|", "| 1.00 ", 1))
    assert edited != text and docs.render(edited) == text  # the check would rewrite it back
    with pytest.raises(ValueError, match="unknown generated block 'nope'"):
        docs.render("<!-- generated: nope -->\n<!-- end: nope -->")


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_a_difference_is_only_called_one_outside_the_seed_range():
    base = [33.0, 34.0]
    assert docs.verdict(base, base) == "—"
    assert docs.verdict([35.0], base) == "worse by 1.50, outside the defaults' seed range"
    assert docs.verdict([31.0, 32.0], base) == "better by 2.00, outside the defaults' seed range"
    assert docs.verdict([33.5, 36.0], base) == "+1.25, within the seed range: no difference"

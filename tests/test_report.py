"""The Markdown results table and the gap-closed figure, on hand-written metrics."""
import json

import pytest

from pipeline.report import gap_closed, table


def test_gap_closed_by_hand():
    assert gap_closed({"dense": 14.0, "sparsegpt": 56.0, "maskllm": 47.0}) == pytest.approx(9 / 42)
    assert gap_closed({"dense": 10.0, "sparsegpt": 20.0, "maskllm": 25.0}) == pytest.approx(-0.5)
    assert gap_closed({"dense": 14.0, "sparsegpt": 56.0}) is None


def test_table_puts_the_training_domain_first(tmp_path):
    for row, domain, ppl in [("dense", "wiki", 14.0), ("dense", "pydocs", 13.0), ("sparsegpt", "wiki", 56.0),
                             ("maskllm", "wiki", 47.0), ("maskllm", "pydocs", 30.0)]:
        (tmp_path / row).mkdir(exist_ok=True)
        (tmp_path / row / f"{domain}.json").write_text(json.dumps({"ppl": ppl}))
    text = table(tmp_path, ["pydocs", "wiki"], "wiki")
    lines = text.splitlines()
    assert lines[0] == "| method | wiki (in domain) | pydocs (out of domain) |"
    assert "| SparseGPT | 56.00 | — |" in lines and "| MaskLLM | 47.00 | 30.00 |" in lines
    assert "wiki: 21.4 %" in text and "pydocs" not in text.split("closed by MaskLLM")[1]

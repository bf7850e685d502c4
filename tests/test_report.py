"""The Markdown results tables and the gap closed, on hand-written metrics."""
import json

import pytest

from pipeline.records.report import table, zeroshot_table
from pipeline.records.metrics import ONE_SHOT, best_one_shot, gap_closed
from pipeline.evaluation.rows import ROWS

README = {  # the default run's wiki and pydocs PPLs (README)
    "wiki": {"dense": 14.01, "magnitude": 1566.70, "wanda": 128.05, "sparsegpt": 50.61, "sparsegpt_maskonly": 78.72,
             "maskllm": 36.09},
    "pydocs": {"dense": 12.98, "magnitude": 1770.35, "wanda": 109.04, "sparsegpt": 132.63,
               "sparsegpt_maskonly": 174.07, "maskllm": 162.04},
}


def test_one_shot_rows_are_every_row_but_dense_and_maskllm():
    assert set(ONE_SHOT) == set(ROWS) - {"dense", "maskllm"} and {"magnitude", "wanda", "sparsegpt"} <= set(ONE_SHOT)


def test_gap_closed_against_the_best_one_shot_row_by_hand():
    assert gap_closed(README["wiki"]) == (pytest.approx((50.61 - 36.09) / (50.61 - 14.01)), "sparsegpt")
    # on Python's docs Wanda is the best one-shot row, and MaskLLM is worse than it
    assert gap_closed(README["pydocs"]) == (pytest.approx((109.04 - 162.04) / (109.04 - 12.98)), "wanda")
    assert gap_closed({"dense": 14.0, "sparsegpt": 56.0, "maskllm": 47.0}) == (pytest.approx(9 / 42), "sparsegpt")
    assert gap_closed({"dense": 14.0, "sparsegpt": 56.0}) is None and gap_closed({"dense": 1.0, "maskllm": 2.0}) is None


def test_any_one_shot_row_can_be_the_best():
    for row in ONE_SHOT:  # sparsegpt_noupdate too, once it is a row
        ppl = {**README["wiki"], row: 20.0}
        assert best_one_shot(ppl) == row and gap_closed(ppl) == (pytest.approx((20.0 - 36.09) / (20.0 - 14.01)), row)
    assert best_one_shot({"dense": 1.0, "maskllm": 2.0}) is None


def write(tmp_path, rows: dict[str, dict[str, float]]):
    for row, by_domain in rows.items():
        for domain, ppl in by_domain.items():
            (tmp_path / row).mkdir(exist_ok=True)
            (tmp_path / row / f"{domain}.json").write_text(json.dumps({"ppl": ppl}))


def test_table_puts_the_training_domain_first_and_names_the_best_row(tmp_path):
    write(tmp_path, {"dense": {"wiki": 14.0, "pydocs": 13.0}, "sparsegpt": {"wiki": 56.0},
                     "wanda": {"wiki": 60.0, "pydocs": 100.0}, "maskllm": {"wiki": 47.0, "pydocs": 30.0}})
    text = table(tmp_path, ["pydocs", "wiki"], "wiki")
    lines = text.splitlines()
    assert lines[0] == "| method | wiki (in domain) | pydocs (out of domain) |"
    assert "| SparseGPT | 56.00 | — |" in lines and "| MaskLLM | 47.00 | 30.00 |" in lines
    assert "wiki: 21.4 % (vs SparseGPT), pydocs: 80.5 % (vs Wanda)" in text  # 70 / 87 = 0.8046
    assert "[min–max]" not in text


def test_table_shows_the_spread_over_seeds(tmp_path):
    write(tmp_path, {"dense": {"wiki": 14.0}, "maskllm": {"wiki": 47.0}})
    write(tmp_path, {"sparsegpt": {"wiki": 50.0}})
    spread = {"ppl.maskllm.wiki": {"min": 45.5, "max": 49.25, "n": 3, "mean": 47.0, "std": 1.0},
              "ppl.dense.wiki": {"min": 14.0, "max": 14.0, "n": 1, "mean": 14.0, "std": 0.0},
              # a one-shot row under learn seeds only: the same value three times, no range
              "ppl.sparsegpt.wiki": {"min": 50.0, "max": 50.0, "n": 3, "mean": 50.0, "std": 0.0},
              # the same row evaluated on two CPU models (float32 kernels): 1e-7 apart, no range either
              "ppl.wanda.wiki": {"min": 128.2932647, "max": 128.2932677, "n": 2, "mean": 128.2932662, "std": 0.0}}
    write(tmp_path, {"wanda": {"wiki": 128.2932677}})
    text = table(tmp_path, ["wiki"], "wiki", spread, "prior.seed 0; learn.seed 0, 1, 2")
    assert "| MaskLLM | 47.00 [45.50–49.25] |" in text and "| dense | 14.00 |" in text
    assert "| SparseGPT | 50.00 |" in text and "| Wanda | 128.29 |" in text
    assert "the same pipeline state under 3 seed pairs (prior.seed 0; learn.seed 0, 1, 2)" in text


def test_zeroshot_table_with_standard_errors_and_chance(tmp_path):
    for row, acc in [("dense", 0.425), ("maskllm", 0.3)]:
        (tmp_path / row / "zeroshot").mkdir(parents=True)
        (tmp_path / row / "zeroshot" / "lastword.json").write_text(json.dumps({"results": {
            "lastword_wiki": {"metrics": {"acc": acc}, "stderr": {"acc": 0.079}, "examples": 40, "chance": None}}}))
        (tmp_path / row / "zeroshot" / "piqa.json").write_text(json.dumps({"results": {
            "piqa": {"metrics": {"acc": 0.6}, "stderr": {"acc": 0.01}, "examples": 1838, "chance": 0.5}}}))
    text = zeroshot_table(tmp_path, ["lastword", "piqa"], ["wiki"])
    lines = text.splitlines()
    assert lines[0] == "| method | lastword_wiki | piqa |"
    assert "| dense | 0.425 ± 0.079 | 0.600 ± 0.010 |" in lines and "| MaskLLM | 0.300 ± 0.079 | 0.600 ± 0.010 |" in lines
    assert "examples per task: lastword_wiki 40, piqa 1838; chance: piqa 0.500" in text
    assert zeroshot_table(tmp_path, []) == ""


def test_zeroshot_tasks_keep_the_order_of_the_params(tmp_path):
    (tmp_path / "dense" / "zeroshot").mkdir(parents=True)
    entry = {"metrics": {"acc": 0.5}, "stderr": {"acc": 0.1}, "examples": 40, "chance": None}
    # the metrics file holds its tasks sorted by name
    (tmp_path / "dense" / "zeroshot" / "lastword.json").write_text(json.dumps({"results": {
        f"lastword_{d}": entry for d in sorted(["wiki", "shakespeare", "pydocs"])}}, sort_keys=True))
    (tmp_path / "dense" / "zeroshot" / "boolq.json").write_text(json.dumps({"results": {"boolq": entry}}))
    text = zeroshot_table(tmp_path, ["boolq", "lastword"], ["wiki", "shakespeare", "pydocs"])
    assert text.splitlines()[0] == "| method | boolq | lastword_wiki | lastword_shakespeare | lastword_pydocs |"

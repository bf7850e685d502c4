"""Figures (pipeline/records/plots.py), checked on the drawn matplotlib objects, not on pixels."""
from itertools import combinations

import matplotlib.pyplot as plt
import pytest

from pipeline.records import plots

# the README's transfer figure: these labels overlapped ("3x10^2" over "4x10^2")
TRANSFER = [("SparseGPT, wiki mask (no transfer)", 205.40, "sparsegpt"), ("MaskLLM, wiki mask (no transfer)", 231.61, "maskllm"),
            ("SparseGPT calibrated on shakespeare", 96.05, "sparsegpt"),
            ("MaskLLM on shakespeare, prior: sparsegpt", 102.97, "maskllm"),
            ("MaskLLM on shakespeare, prior: wiki MaskLLM mask (general)", 81.90, "maskllm")]


@pytest.fixture
def figures(monkeypatch, tmp_path):
    """The figures the plot functions draw, kept open instead of saved."""
    kept = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi: kept.append(fig))
    yield kept
    for fig in kept:
        plt.close(fig)


def labels(fig, axis):
    """(text, box) of every tick label drawn inside the axis's view, major and minor, left to right."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    lo, hi = sorted(axis.get_view_interval())
    ticks = [*zip(axis.get_majorticklocs(), axis.get_majorticklabels()),
             *zip(axis.get_minorticklocs(), axis.get_minorticklabels())]
    return [(t.get_text(), t.get_window_extent(renderer)) for loc, t in sorted(ticks, key=lambda x: x[0])
            if lo <= loc <= hi and t.get_text()]


def overlap(boxes) -> list:
    return [(a, b) for (a, x), (b, y) in combinations(boxes, 2) if x.overlaps(y)]


def test_transfer_figure_tick_labels_do_not_overlap(figures, tmp_path, monkeypatch):
    plots.transfer("shakespeare", TRANSFER, 50.64, tmp_path / "t.png")
    ticks = labels(figures[-1], figures[-1].axes[0].xaxis)
    assert not overlap(ticks)
    assert [t for t, _ in ticks] == ["50", "100", "200", "500"]  # plain numbers at 1, 2, 5 x 10^k
    monkeypatch.setattr(plots, "plain_log_axis", lambda *a: None)  # matplotlib's default labels: the bug
    plots.transfer("shakespeare", TRANSFER, 50.64, tmp_path / "t.png")
    assert overlap(labels(figures[-1], figures[-1].axes[0].xaxis))


def test_ppl_figure_names_the_best_one_shot_row_and_its_labels_do_not_overlap(figures, tmp_path):
    ppl = {"dense": 14.01, "magnitude": 1566.7, "wanda": 128.05, "sparsegpt": 50.61, "maskllm": 36.09,
           "sparsegpt_maskonly": 78.72}
    plots.ppl_bars(ppl, {"model": "smollm2"}, tmp_path / "p.png", gap=(0.397, "sparsegpt"))
    ax = figures[-1].axes[0]
    assert "MaskLLM closes 39.7 % of the gap between SparseGPT (best one-shot) and dense" in ax.get_title()
    ticks = labels(figures[-1], ax.xaxis)
    assert not overlap(ticks) and [t for t, _ in ticks] == ["10", "100", "1000"]  # > 2.5 decades: 10^k only
    assert [t.get_text() for t in ax.get_yticklabels()] == [plots.label(r) for r in plots.ROWS if r in ppl and r != "dense"]


def panel(domain, points, references, spread=None, in_domain=False):
    return {"domain": domain, "in_domain": in_domain, "points": points, "references": references, "spread": spread or {}}


def test_sweep_figure_draws_the_seed_spread(figures, tmp_path):
    spread = {"maskllm": {"min": 34.0, "max": 39.0, "n": 3}, "sparsegpt": {"min": 49.0, "max": 53.0, "n": 3},
              "dense": {"min": 14.01, "max": 14.01, "n": 3}}
    plots.sweep("learn.tau", [panel("wiki", [(1.0, 45.0), (4.0, 36.09), (8.0, 40.0)],
                                    {"dense": 14.01, "sparsegpt": 50.61}, spread, in_domain=True)],
                tmp_path / "s.png", current=4.0)
    ax = figures[-1].axes[0]
    bar = next(c for c in ax.containers if c.get_label().startswith("MaskLLM over 3 seeds"))
    (segment,) = bar.lines[2][0].get_segments()
    assert segment.tolist() == [[4.0, 34.0], [4.0, 39.0]]  # min to max at the current tau
    bands = [p for p in ax.patches if p.get_alpha() == 0.12]
    assert len(bands) == 2  # sparsegpt (49-53) and dense (a zero-width band)
    assert sorted(round(p.get_extents().height, 0) > 0 for p in bands) == [False, True]
    assert not overlap(labels(figures[-1], ax.yaxis))
    plots.sweep("learn.tau", [panel("wiki", [(1.0, 45.0), (4.0, 36.09)], {"dense": 14.01},
                                    {"maskllm": {"min": 36.09, "max": 36.09, "n": 1}})],
                tmp_path / "s.png", current=4.0)  # one seed: nothing drawn
    ax = figures[-1].axes[0]
    assert not [c for c in ax.containers if c.get_label().startswith("MaskLLM over")] and not ax.patches


def test_sweep_figure_draws_the_spread_of_other_points_run_under_several_seeds(figures, tmp_path):
    wiki = panel("wiki", [(30.0, 43.5), (100.0, 34.1), (1000.0, 30.6)], {"dense": 14.0},
                 {"maskllm": {"min": 34.1, "max": 39.0, "n": 3}}, in_domain=True)
    wiki["point_spread"] = {1000.0: {"min": 29.0, "max": 31.5, "n": 3}, 30.0: {"min": 43.5, "max": 43.5, "n": 1}}
    plots.sweep("learn.kappa", [wiki], tmp_path / "s.png", current=100.0)
    ax = figures[-1].axes[0]
    bars = {c.get_label(): c.lines[2][0].get_segments()[0].tolist() for c in ax.containers
            if c.get_label().startswith("MaskLLM")}
    # one seed (kappa 30): no bar; the current point's and kappa 1000's own, each min to max
    assert bars == {"MaskLLM over 3 seeds": [[100.0, 34.1], [100.0, 39.0]],
                    "MaskLLM at 1000 over 3 seeds": [[1000.0, 29.0], [1000.0, 31.5]]}
    assert ax.get_ylim()[0] < 29.0  # the axis holds the whole range


def test_sweep_figure_draws_the_sweep_around_another_centre_as_its_own_curve(figures, tmp_path):
    wiki = panel("wiki", [(2.0, 29.0), (4.0, 30.6)], {"dense": 14.0}, {"maskllm": {"min": 30.6, "max": 31.0, "n": 3}},
                 in_domain=True)
    wiki["others"] = [{"label": "learn.kappa=100.0", "points": [(1.0, 42.0), (4.0, 34.1), (8.0, 39.4), (2.0, 33.6)],
                       "point_spread": {4.0: {"min": 34.1, "max": 39.0, "n": 3}}}]
    plots.sweep("learn.tau", [wiki], tmp_path / "s.png", current=4.0)
    ax = figures[-1].axes[0]
    curves = {line.get_label(): line.get_xydata().tolist() for line in ax.lines if line.get_label().startswith("MaskLLM")}
    assert curves == {"MaskLLM": [[2.0, 29.0], [4.0, 30.6]],  # in order of the value
                      "MaskLLM, learn.kappa=100.0": [[1.0, 42.0], [2.0, 33.6], [4.0, 34.1], [8.0, 39.4]]}
    bars = {c.get_label(): c.lines[2][0].get_segments()[0].tolist() for c in ax.containers}
    assert bars == {"MaskLLM over 3 seeds": [[4.0, 30.6], [4.0, 31.0]],
                    "MaskLLM, learn.kappa=100.0 at 4 over 3 seeds": [[4.0, 34.1], [4.0, 39.0]]}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8"]  # every value of both curves
    # a categorical sweep: one group of bars per value, the centres side by side
    prior = panel("wiki", [("sparsegpt", 30.6)], {"dense": 14.0}, in_domain=True)
    prior["others"] = [{"label": "learn.kappa=100.0", "points": [("none", 60.0), ("sparsegpt", 34.1)]}]
    plots.sweep("learn.prior", [prior], tmp_path / "p.png", current="sparsegpt")
    ax = figures[-1].axes[0]
    centres = sorted((round(p.get_x() + p.get_width() / 2, 2), p.get_height()) for p in ax.patches)
    assert centres == [(-0.2, 30.6), (0.2, 34.1), (1.2, 60.0)]  # each centre keeps its side
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sparsegpt", "none"]


def test_sweep_figure_has_a_panel_per_domain_with_its_own_references(figures, tmp_path):
    plots.sweep("learn.prior_strength", [
        panel("wiki", [(3.0, 36.4), (0.0, 80.0), (1.0, 40.0), (10.0, 37.0)], {"dense": 14.0, "sparsegpt": 49.8},
              in_domain=True),
        panel("pydocs", [(3.0, 146.9), (0.0, 300.0), (1.0, 150.0), (10.0, 140.0)], {"dense": 13.0, "wanda": 110.6})],
        tmp_path / "s.png", current=3.0)
    fig = figures[-1]
    wiki, pydocs = fig.axes
    assert wiki.get_title() == "wiki (in domain)" and pydocs.get_title() == "pydocs (out of domain)"
    assert sorted(line.get_ydata()[0] for line in pydocs.lines if line.get_linestyle() == "--") == [13.0, 110.6]
    (curve,) = [line for line in pydocs.lines if line.get_label() == "MaskLLM"]
    assert list(curve.get_xdata()) == [0.0, 1.0, 3.0, 10.0] and list(curve.get_ydata()) == [300.0, 150.0, 146.9, 140.0]
    # 0 (no prior) stays on an axis that spreads 1 .. 10 like a log axis, each value labelled
    assert wiki.get_xscale() == "symlog"
    fig.canvas.draw()
    assert [t.get_text() for t in wiki.get_xticklabels()] == ["0", "1", "3", "10"]
    plots.sweep("learn.tau", [panel("wiki", [(1.0, 45.0), (4.0, 36.09), (8.0, 40.0)], {"dense": 14.0})],
                tmp_path / "s.png", current=4.0)
    assert figures[-1].axes[0].get_xscale() == "log"


def test_zeroshot_figure_marks_chance_and_standard_errors(figures, tmp_path):
    def r(acc, se, chance):
        return {"metrics": {"acc": acc}, "stderr": {"acc": se}, "examples": 40, "chance": chance}

    results = {"dense": {"lastword_wiki": r(0.425, 0.079, None), "piqa": r(0.6, 0.01, 0.5)},
               "maskllm": {"lastword_wiki": r(0.3, 0.072, None), "piqa": r(0.55, 0.01, 0.5)}}
    plots.zeroshot_bars(results, tmp_path / "z.png")
    ax = figures[-1].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["lastword_wiki", "piqa"]
    heights = sorted(round(p.get_height(), 3) for p in ax.patches)
    assert heights == [0.3, 0.425, 0.55, 0.6]
    (chance,) = [c for c in ax.collections if c.get_label() == "chance (uniform guess)"]
    ((x0, y0), (x1, y1)), = chance.get_segments()
    assert y0 == y1 == 0.5 and x0 < 1 < x1  # across the piqa group only
    # each bar's error bar spans acc ± its standard error
    errors = sorted(round((seg[1][1] - seg[0][1]) / 2, 3) for c in ax.containers if getattr(c, "errorbar", None)
                    for seg in c.errorbar.lines[2][0].get_segments())
    assert errors == [0.01, 0.01, 0.072, 0.079]
    assert "chance ≈ 0 on lastword_wiki (open vocabulary)" in ax.get_title()


def test_seed_figure_shows_each_rows_range(figures, tmp_path):
    plots.seed_spread({"dense": 14.0, "sparsegpt": 50.0, "maskllm": 36.0},
                      {"sparsegpt": {"min": 49.0, "max": 53.0, "n": 3}, "maskllm": {"min": 34.0, "max": 39.0, "n": 3}},
                      "wiki", tmp_path / "seeds.png", seeds="prior.seed 0, 1, 2; learn.seed 0, 1, 2")
    ax = figures[-1].axes[0]
    # dense is not in the spread (it did not vary with the seeds: sweeps.varied): no bar, no range in its label
    ranges = sorted(tuple(seg[:, 0]) for c in ax.collections for seg in c.get_segments())
    assert ranges == [(34.0, 39.0), (49.0, 53.0)]
    assert [t.get_text() for t in ax.texts][0] == "14.0"
    assert "spread over 3 seed pairs (prior.seed 0, 1, 2; learn.seed 0, 1, 2)" in ax.get_title()
    assert not overlap(labels(figures[-1], ax.xaxis))


def test_zeroshot_figure_without_tasks_says_why(figures, tmp_path):
    plots.zeroshot_bars({}, tmp_path / "z.png")
    (text,) = figures[-1].axes[0].texts
    assert text.get_text() == "no zero-shot results: evaluate.zeroshot_tasks is empty"


def test_budget_figure_has_a_line_per_recipe_with_seed_ranges_and_the_references(figures, tmp_path):
    def point(tokens, mean, lo=None, hi=None, n=1):
        return {"tokens": tokens, "runs": n, "spread": {"validation_ppl.maskllm.wiki": {
            "mean": mean, "min": lo or mean, "max": hi or mean, "n": n}}}
    curves = {"tuned": {64: point(65536, 30.0, 29.5, 31.0, 3), 128: point(131072, 28.0)},
              "authors' recipe": {64: point(65536, 38.0, 36.0, 39.0, 3), 128: point(131072, 33.0)}}
    plots.budget(curves, {"dense": 15.0, "sparsegpt": 50.0}, "wiki", tmp_path / "b.png")
    ax = figures[0].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["MaskLLM, tuned"].get_xdata()) == [65536, 131072]
    assert list(lines["MaskLLM, authors' recipe"].get_ydata()) == [38.0, 33.0]
    assert {"dense 15.0", "SparseGPT 50.0"} <= set(lines)
    assert len(ax.containers) == 2  # one min–max bar per point run under several seeds
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"


def test_token_counts_read_as_round_thousands_and_millions():
    assert [plots.token_count(t) for t in (65536, 131072, 262144, 524288)] == ["66k", "131k", "262k", "524k"]
    assert [plots.token_count(t) for t in (1048576, 2 ** 21)] == ["1.05M", "2.1M"]

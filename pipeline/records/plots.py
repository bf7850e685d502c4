"""Figures a researcher would put in a paper (PNG) and the tables behind them (DVC plots)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: stages run headless
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from pipeline.io import atomic_path  # noqa: E402
from pipeline.evaluation.rows import ROWS, colour, label  # noqa: E402



def token_count(v: float, _=None) -> str:
    """A token count as a tick label: 65,536 -> "66k", 1,048,576 -> "1.05M"."""
    return f"{v / 1e3:.0f}k" if v < 1e6 else f"{v / 1e6:.3g}M"


def plain_log_axis(axis, lo: float, hi: float) -> None:
    """Plain-number labels on a log axis, only at 1, 2, 5 x 10^k (1 x 10^k beyond ~2.5 decades):
    matplotlib's default also labels minor ticks on a short axis, where 3x10^2 and 4x10^2 collide."""
    subs = (1.0, 2.0, 5.0) if hi / lo <= 10 ** 2.5 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _save(fig, path: Path, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)


def ppl_bars(ppl: dict[str, float], protocol: dict, path: Path, dpi: int = 150,
             gap: tuple[float, str] | None = None) -> None:
    """PPL per method on a log axis, the dense model as a reference line; ``gap``: (share of the gap
    to dense MaskLLM closes, the best one-shot row it is measured against), see report.gap_closed."""
    rows = [r for r in ROWS if r in ppl and r != "dense"]
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(rows) + 1.4))
    vals = [ppl[r] for r in rows]
    ax.barh([label(r) for r in rows], vals, color=[colour(r, "#888") for r in rows])
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.1f}", va="center", fontsize=9)
    if "dense" in ppl:
        ax.axvline(ppl["dense"], color="k", ls="--", lw=1)
        ax.text(ppl["dense"], len(rows) - 0.45, f" dense {ppl['dense']:.1f}", fontsize=9)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("test perplexity (log scale, lower is better)")
    title = (f"{protocol.get('model', '')} {protocol.get('sparsity', '')} on {protocol.get('dataset', '')} "
             f"(seqlen {protocol.get('seqlen')}, {protocol.get('windows')} windows)")
    if gap is not None:
        title += f"\nMaskLLM closes {100 * gap[0]:.1f} % of the gap between {label(gap[1])} (best one-shot) and dense"
    ax.set_title(title, fontsize=10)
    everything = vals + ([ppl["dense"]] if "dense" in ppl else [])
    # log axis: bars need an explicit left edge (they start at 0 otherwise, off the axis)
    ax.set_xlim(left=min(everything) / 1.5, right=max(everything) * 3)
    plain_log_axis(ax.xaxis, min(everything) / 1.5, max(everything) * 3)
    _save(fig, path, dpi)


def learn_curves(curve: list[dict], path: Path, dpi: int = 150) -> None:
    """Loss, temperature/logit scale, flip rate and confidence against steps."""
    steps = [float(r["step"]) for r in curve]  # CSV rows hold strings: a numeric axis, not categories
    panels = [("ce", "LM loss (CE)", False), ("temperature", "temperature τ", False),
              ("logit_scale", "logit scale κ", False), ("flip_rate", "mask flip rate", True),
              ("confidence", "mean max probability", False), ("prior_agreement", "agreement with prior", False)]
    panels = [p for p in panels if any(k in r and r[k] != "" for r in curve for k in [p[0]])]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (key, title, log) in zip(axes.flat, panels):
        ys = [float(r[key]) if r.get(key, "") != "" else float("nan") for r in curve]
        ax.plot(steps, ys, color="#c0392b", lw=1.5)
        if log and all(y > 0 for y in ys if y == y):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path, dpi)


def layer_agreement(stats: dict, path: Path, dpi: int = 150) -> None:
    """Per-layer agreement of the MaskLLM mask with each one-shot mask, in forward order."""
    names = list(stats)
    methods = sorted({m for s in stats.values() for m in s})
    fig, ax = plt.subplots(figsize=(max(6.4, len(names) * 0.06), 3.6))
    for method in methods:
        ax.plot(range(len(names)), [stats[n][method]["agreement"] for n in names], marker=".", ms=3, lw=1,
                label=label(method), color=colour(method))
    ax.set_xlabel("prunable layer (forward order)")
    ax.set_ylabel("weights with the same keep/prune decision")
    ax.set_title("MaskLLM mask vs one-shot masks, per layer", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path, dpi)


def domain_heatmap(table: dict[str, dict[str, float]], domains: list[str], in_domain: str, path: Path,
                   dpi: int = 150) -> None:
    """PPL of every method (rows) on every domain (columns), log-coloured, in-domain first."""
    import numpy as np

    rows = [r for r in ROWS if r in table]
    cols = [in_domain] + [d for d in domains if d != in_domain]
    vals = np.array([[table[r].get(d, float("nan")) for d in cols] for r in rows])
    # colour each column by its own log-range: domains differ by orders of magnitude
    logv = np.log(vals)
    lo, hi = np.nanmin(logv, axis=0), np.nanmax(logv, axis=0)
    shade = (logv - lo) / np.where(hi > lo, hi - lo, 1.0)
    fig, ax = plt.subplots(figsize=(1.7 * len(cols) + 2.2, 0.45 * len(rows) + 1.3))
    ax.imshow(shade, cmap="RdYlGn_r", aspect="auto", vmin=0, vmax=1)
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = vals[i, j]
            ax.text(j, i, "—" if v != v else (f"{v:.1f}" if v < 1000 else f"{v:.0f}"), ha="center", va="center",
                    fontsize=9, fontweight="bold" if rows[i] == "maskllm" else None)
    ax.set_xticks(range(len(cols)), [f"{d}\n(in-domain)" if d == in_domain else f"{d}\n(out-of-domain)" for d in cols],
                  fontsize=9)
    ax.set_yticks(range(len(rows)), [label(r) for r in rows], fontsize=9)
    ax.axvline(0.5, color="k", lw=1.5)
    ax.set_title("test perplexity by domain (colour: per-column log scale, green = best)", fontsize=10)
    _save(fig, path, dpi)


def _band(ax, row: str, spread: dict | None) -> None:
    """The spread over seeds of a reference row (min to max), behind its line."""
    if spread and spread["n"] > 1:
        ax.axhspan(spread["min"], spread["max"], color=colour(row, "k"), alpha=0.12, lw=0)


def sweep(param: str, panels: list[dict], path: Path, dpi: int = 150, current: object = None) -> None:
    """MaskLLM PPL against one swept parameter, one panel per evaluation domain (in-domain first);
    the one-shot rows and dense of that domain as reference lines.

    panels: ``{"domain", "in_domain", "points": [(value, PPL)], "references": {row: PPL},
    "spread": {row: {"min", "max", "n"}}, "point_spread": {value: {"min", "max", "n"}}, "others":
    [{"label", "points", "point_spread"}]}``: ``spread`` (sweeps.seed_spread of that domain) is the
    current state under other seeds, drawn as an error bar at MaskLLM's ``current`` value and as
    bands around the references; ``point_spread`` (optional, sweeps.point_spreads) the same for
    other points run under several seeds, as error bars there; ``others`` (optional) the same sweep
    run around other centres (sweeps.other_centres, e.g. a former default), each a curve of its own.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels) + 0.6, 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        _sweep_panel(ax, param, panel, current)
    banded = any(s["n"] > 1 for panel in panels for s in panel.get("spread", {}).values())
    fig.suptitle(f"ablation: {param}" + (" (error bar and bands: other seeds, min–max)" if banded else ""), fontsize=10)
    _save(fig, path, dpi)


# the current params' curve, then each other centre's (sweeps.other_centres): colour, marker, line
_CURVE_STYLES = [(colour("maskllm"), "o", "-"), ("#e67e22", "s", "--"), ("#7f8c8d", "^", ":")]


def _sweep_panel(ax, param: str, panel: dict, current: object) -> None:
    references, spread = panel["references"], panel.get("spread") or {}
    # the current params' sweep first (its point spread includes the current state's seeds)
    curves = [{"label": "MaskLLM", "points": panel["points"],
               "point_spread": {**(panel.get("point_spread") or {}), current: spread.get("maskllm")}}]
    curves += [{**c, "label": f"MaskLLM, {c['label']}"} for c in panel.get("others", [])]
    xs_all = [x for c in curves for x, _ in c["points"]]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs_all)
    categories = list(dict.fromkeys(str(x) for x in xs_all))
    width = 0.8 / len(curves)
    bounds = []
    for i, (curve, (color, marker, ls)) in enumerate(zip(curves, _CURVE_STYLES * len(curves))):
        xs = [x for x, _ in curve["points"]]
        ys = [y for _, y in curve["points"]]
        if not xs:
            continue
        if numeric:
            order = sorted(range(len(xs)), key=lambda j: xs[j])
            ax.plot([xs[j] for j in order], [ys[j] for j in order], marker=marker, ls=ls, color=color,
                    label=curve["label"])
            where = xs
        else:  # bars side by side, one group per category
            where = [categories.index(str(x)) + (i - (len(curves) - 1) / 2) * width for x in xs]
            ax.bar(where, ys, width=width, color=color, label=curve["label"])
        for x, y in zip(where, ys):
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(6, 4), ha="left", fontsize=7,
                        color=color if i else "k")
        # min-max over seeds at every point run under several
        for x, s in (curve.get("point_spread") or {}).items():
            if not (s and s["n"] > 1 and x in xs):
                continue
            y = ys[xs.index(x)]
            at = "" if (i == 0 and x == current) else f" at {x:g}" if numeric else f" at {x}"
            ax.errorbar([where[xs.index(x)]], [y], yerr=[[y - s["min"]], [s["max"] - y]], fmt="none",
                        ecolor="k" if i == 0 else color, capsize=4, lw=1.2,
                        label=f"{curve['label']}{at} over {s['n']} seeds")
            bounds += [s["min"], s["max"]]
        bounds += ys
    if numeric:
        positive = [x for x in xs_all if x > 0]
        if len(positive) >= 2 and max(positive) / min(positive) >= 8:  # tau 1 .. 8, kappa 10 .. 3000, lambda 1e-5 .. 1e-4
            # 0 (no prior, no regulariser) stays on the axis: linear below the smallest positive value
            if min(xs_all) > 0:
                ax.set_xscale("log")
            else:
                ax.set_xscale("symlog", linthresh=min(positive), linscale=0.5)
            ax.set_xticks(sorted(set(xs_all)), [f"{x:g}" for x in sorted(set(xs_all))])
            ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_xticks(range(len(categories)), categories)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    for row, v in references.items():
        _band(ax, row, spread.get(row))
        ax.axhline(v, ls="--", lw=1, color=colour(row, "k"), label=f"{label(row)} {v:.1f}")
    ax.set_yscale("log")
    values = bounds + list(references.values()) + [b for s in spread.values() if s["n"] > 1 for b in (s["min"], s["max"])]
    plain_log_axis(ax.yaxis, min(values), max(values))  # PPLs are read as values
    ax.set_ylabel("validation PPL")  # no x label: the title above the panels names the param, the ticks its values
    ax.set_title(f"{panel['domain']} ({'in domain' if panel.get('in_domain') else 'out of domain'})", fontsize=9)
    # below the axes: inside, it hid the bars of a categorical sweep (learn.prior)
    # one column once other centres add their long labels: two would spill into the next panel's legend
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1 if numeric else -0.2),
              ncol=1 if len(curves) > 1 else 2, borderaxespad=0)
    ax.margins(x=0.1)  # room for the value labels of the end points
    ax.grid(alpha=0.3)


def transfer(domain: str, bars: list[tuple[str, float, str]], dense: float | None, path: Path,
             dpi: int = 150) -> None:
    """Transfer to ``domain``: PPL on its test text of the general masks and of the masks learned
    on it from each prior (a learned general mask vs a one-shot mask). bars: (label, PPL, row)."""
    fig, ax = plt.subplots(figsize=(6.8, 0.5 * len(bars) + 1.5))
    labels = [b[0] for b in bars]
    vals = [b[1] for b in bars]
    ax.barh(labels, vals, color=[colour(b[2], "#888") for b in bars])
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.1f}", va="center", fontsize=9)
    if dense is not None:
        ax.axvline(dense, color="k", ls="--", lw=1)
        ax.text(dense, len(bars) - 0.45, f" dense {dense:.1f}", fontsize=9)
    ax.set_xscale("log")
    ax.invert_yaxis()
    everything = vals + ([dense] if dense is not None else [])
    lo, hi = min(everything) / 1.5, max(everything) * 3
    ax.set_xlim(left=lo, right=hi)
    plain_log_axis(ax.xaxis, lo, hi)
    ax.set_xlabel(f"{domain} test perplexity (log scale, lower is better)")
    ax.set_title(f"transfer to {domain}: learned general mask vs one-shot mask as the prior", fontsize=10)
    _save(fig, path, dpi)


def zeroshot_bars(results: dict[str, dict[str, dict]], path: Path, dpi: int = 150) -> None:
    """Zero-shot accuracy per lm-eval task (groups) and row (bars), ± the harness's standard error;
    a task's chance level (a uniform guess over its choices) as a dotted line across its group.
    results: {row: {task: {"metrics": {"acc"}, "stderr": {"acc"}, "examples", "chance"}}}."""
    rows = [r for r in ROWS if r in results]
    tasks = list(dict.fromkeys(t for r in rows for t in results[r] if "acc" in results[r][t]["metrics"]))
    if not tasks:  # a declared output: say why it is empty
        fig, ax = plt.subplots(figsize=(6.4, 1.2))
        ax.text(0.5, 0.5, "no zero-shot results: evaluate.zeroshot_tasks is empty", ha="center", va="center")
        ax.axis("off")
        _save(fig, path, dpi)
        return
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(tasks) * max(1, len(rows)) * 0.35 + 2), 4.0))
    for i, r in enumerate(rows):
        xs = [j - 0.4 + width * (i + 0.5) for j, t in enumerate(tasks) if t in results[r]]
        got = [results[r][t] for t in tasks if t in results[r]]
        ax.bar(xs, [g["metrics"]["acc"] for g in got], width, yerr=[g["stderr"].get("acc") or 0 for g in got],
               color=colour(r, "#888"), label=label(r), capsize=2, error_kw={"lw": 0.8})
    open_vocabulary, labelled = [], False
    for j, t in enumerate(tasks):
        chance = next((results[r][t]["chance"] for r in rows if t in results[r]), None)
        if chance is None:
            open_vocabulary.append(t)  # any word of the vocabulary: chance is ~0
            continue
        ax.hlines(chance, j - 0.45, j + 0.45, colors="k", linestyles=":", lw=1.2,
                  label=None if labelled else "chance (uniform guess)")
        labelled = True
    n = sorted({results[r][t]["examples"] for r in rows for t in results[r]})
    ax.set_xticks(range(len(tasks)), tasks, fontsize=9, rotation=15 if len(tasks) > 4 else 0)
    ax.set_ylabel("accuracy (± standard error, lm-eval)")
    ax.set_ylim(0, 1)
    note = f"; chance ≈ 0 on {', '.join(open_vocabulary)} (open vocabulary)" if open_vocabulary else ""
    ax.set_title(f"zero-shot accuracy, {'/'.join(map(str, n))} examples per task{note}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path, dpi)


def seed_spread(in_domain: dict[str, float], spread: dict[str, dict], dataset: str, path: Path, dpi: int = 150,
                seeds: str = "prior.seed, learn.seed") -> None:
    """In-domain PPL of every row in the current state (dots) and its range over the same state
    under other seeds (bars, min to max): differences inside the ranges are not real.
    spread: {row: {"min", "max", "n"}} of the rows that varied with the seeds (sweeps.seed_spread,
    filtered by sweeps.varied); seeds: the seed values spanned (sweeps.describe_seeds). A row that
    ``spread`` lacks gets no bar."""
    rows = [r for r in ROWS if r in in_domain]
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(rows) + 1.4))
    for y, r in enumerate(rows):
        s = spread.get(r)
        if s:
            ax.hlines(y, s["min"], s["max"], color=colour(r, "#888"), lw=6, alpha=0.35)
        ax.plot([in_domain[r]], [y], "o", color=colour(r, "#888"))
        ax.annotate(f"{in_domain[r]:.1f}" + (f"  [{s['min']:.1f}–{s['max']:.1f}]" if s else ""),
                    (in_domain[r], y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [label(r) for r in rows], fontsize=9)
    ax.set_xscale("log")
    values = list(in_domain.values()) + [b for s in spread.values() for b in (s["min"], s["max"])]
    lo, hi = min(values) / 1.3, max(values) * 1.3
    ax.set_xlim(lo, hi)
    plain_log_axis(ax.xaxis, lo, hi)
    ax.set_ylim(len(rows) - 0.5, -0.7)
    n = max((s["n"] for s in spread.values()), default=1)
    ax.set_xlabel(f"{dataset} test perplexity (log scale)")
    ax.set_title(f"spread over {n} seed pairs ({seeds}):\nmin–max bars, this state's value as dots", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path, dpi)


def budget(curves: dict[str, dict[int, dict]], references: dict[str, float], dataset: str, path: Path,
           dpi: int = 150) -> None:
    """MaskLLM's validation PPL against its training tokens, one line per recipe (min–max over seeds
    where several ran), with the one-shot references and dense as horizontal lines (sweeps.budget)."""
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    values = list(references.values())
    for (name, points), (color, marker, ls) in zip(curves.items(), _CURVE_STYLES * len(curves)):
        xs = [p["tokens"] for p in points.values()]
        stats = [p["spread"][f"validation_ppl.maskllm.{dataset}"] for p in points.values()]
        ys = [s["mean"] for s in stats]
        ax.plot(xs, ys, marker=marker, ls=ls, color=color, label=f"MaskLLM, {name}")
        for x, y, s in zip(xs, ys, stats):
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, color=color)
            if s["n"] > 1:
                ax.errorbar([x], [y], yerr=[[y - s["min"]], [s["max"] - y]], fmt="none", ecolor=color, capsize=4)
                values += [s["min"], s["max"]]
        values += ys
    for row, v in references.items():
        ax.axhline(v, ls="--", lw=1, color=colour(row, "k"), label=f"{label(row)} {v:.1f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain_log_axis(ax.yaxis, min(values), max(values))
    ax.xaxis.set_major_formatter(FuncFormatter(token_count))
    ax.set_xlabel("training tokens (steps x batch x sequence length)")
    ax.set_ylabel(f"{dataset} validation PPL")
    ax.set_title("MaskLLM's budget curve (error bars: min–max over seeds)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, path, dpi)

"""Figures a researcher would put in a paper (PNG) and the tables behind them (DVC plots)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: stages run headless
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.io import atomic_path  # noqa: E402

LABELS = {"dense": "dense", "magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT",
          "sparsegpt_maskonly": "SparseGPT mask only", "maskllm": "MaskLLM"}
COLORS = {"maskllm": "#c0392b", "sparsegpt": "#2c3e50", "sparsegpt_maskonly": "#7f8c8d",
          "wanda": "#2980b9", "magnitude": "#95a5a6"}


def _save(fig, path: Path, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)


def ppl_bars(ppl: dict[str, float], protocol: dict, path: Path, dpi: int = 150) -> None:
    """PPL per method on a log axis, the dense model as a reference line."""
    rows = [r for r in LABELS if r in ppl and r != "dense"]
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(rows) + 1.4))
    vals = [ppl[r] for r in rows]
    ax.barh([LABELS[r] for r in rows], vals, color=[COLORS.get(r, "#888") for r in rows])
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.1f}", va="center", fontsize=9)
    if "dense" in ppl:
        ax.axvline(ppl["dense"], color="k", ls="--", lw=1)
        ax.text(ppl["dense"], len(rows) - 0.45, f" dense {ppl['dense']:.1f}", fontsize=9)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("test perplexity (log scale, lower is better)")
    ax.set_title(f"{protocol.get('model', '')} {protocol.get('sparsity', '')} on {protocol.get('dataset', '')} "
                 f"(seqlen {protocol.get('seqlen')}, {protocol.get('windows')} windows)", fontsize=10)
    everything = vals + ([ppl["dense"]] if "dense" in ppl else [])
    # log axis: bars need an explicit left edge (they start at 0 otherwise, off the axis)
    ax.set_xlim(left=min(everything) / 1.5, right=max(everything) * 3)
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
                label=LABELS.get(method, method), color=COLORS.get(method))
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

    rows = [r for r in LABELS if r in table]
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
    ax.set_yticks(range(len(rows)), [LABELS[r] for r in rows], fontsize=9)
    ax.axvline(0.5, color="k", lw=1.5)
    ax.set_title("test perplexity by domain (colour: per-column log scale, green = best)", fontsize=10)
    _save(fig, path, dpi)


def sweep(param: str, points: list[tuple[object, float]], references: dict[str, float], path: Path,
          dpi: int = 150, ylabel: str = "MaskLLM test PPL (in-domain)") -> None:
    """MaskLLM PPL against one swept parameter; the one-shot rows and dense as reference lines."""
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    if numeric:
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o", color=COLORS["maskllm"], label="MaskLLM")
        if param.endswith(("steps", "kappa", "weight_reg")) and min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log")
    else:
        ax.bar([str(x) for x in xs], ys, color=COLORS["maskllm"], label="MaskLLM")
    for i, (x, y) in enumerate(points):
        ax.annotate(f"{y:.1f}", (x if numeric else i, y), textcoords="offset points", xytext=(0, 5), ha="center",
                    fontsize=8)
    for row, v in references.items():
        ax.axhline(v, ls="--", lw=1, color=COLORS.get(row, "k"), label=f"{LABELS.get(row, row)} {v:.1f}")
    ax.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter

    for axis in (ax.yaxis,):  # plain numbers on the log axis: PPLs are read as values
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel(param)
    ax.set_ylabel(ylabel)
    ax.set_title(f"ablation: {param}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, path, dpi)


def transfer(domain: str, bars: list[tuple[str, float, str]], dense: float | None, path: Path,
             dpi: int = 150) -> None:
    """Transfer to ``domain``: PPL on its test text of the general masks and of the masks learned
    on it from each prior (a learned general mask vs a one-shot mask). bars: (label, PPL, row)."""
    fig, ax = plt.subplots(figsize=(6.8, 0.5 * len(bars) + 1.5))
    labels = [b[0] for b in bars]
    vals = [b[1] for b in bars]
    ax.barh(labels, vals, color=[COLORS.get(b[2], "#888") for b in bars])
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.1f}", va="center", fontsize=9)
    if dense is not None:
        ax.axvline(dense, color="k", ls="--", lw=1)
        ax.text(dense, len(bars) - 0.45, f" dense {dense:.1f}", fontsize=9)
    ax.set_xscale("log")
    ax.invert_yaxis()
    everything = vals + ([dense] if dense is not None else [])
    ax.set_xlim(left=min(everything) / 1.5, right=max(everything) * 3)
    ax.set_xlabel(f"{domain} test perplexity (log scale, lower is better)")
    ax.set_title(f"transfer to {domain}: learned general mask vs one-shot mask as the prior", fontsize=10)
    _save(fig, path, dpi)

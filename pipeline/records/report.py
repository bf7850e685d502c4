"""The results tables of the current pipeline state, as Markdown: ``python -m pipeline.records.report``.

Reads ``metrics/<row>/<domain>.json`` and ``metrics/<row>/zeroshot/<task>.json`` (what `dvc repro`
wrote) and prints PPL per method and domain, in-domain first, with the share of the gap between
the best one-shot row and the dense model that MaskLLM closes on each domain, then the zero-shot
accuracies with the harness's standard errors. When the ledger holds the same state under other
seeds (``prior.seed``, ``learn.seed``), each PPL shows its range over them.
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.config import load_params_or_exit
from pipeline.records import sweeps
from pipeline.records.metrics import gap_closed, read_ppl, read_zeroshot
from pipeline.evaluation.rows import ROWS, label


def _cell(value: float, spread: dict | None) -> str:
    text = f"{value:,.2f}"
    # a row that does not depend on the seeds varied (one-shot rows under learn.seed) shows no range
    if sweeps.varied(spread):
        text += f" [{spread['min']:,.2f}–{spread['max']:,.2f}]"
    return text


def table(metrics: Path, domains: list[str], in_domain: str, spread: dict[str, dict] | None = None,
          seeds: str = "prior.seed, learn.seed", extra: dict[str, dict] | None = None) -> str:
    """PPL per row (lines) and domain (columns, in-domain first); ``spread``: sweeps.seed_spread,
    ``seeds``: the seed values it spans (sweeps.describe_seeds); ``extra``: more MaskLLM rows,
    {label: the flat metrics of their recorded state} (another recipe), after MaskLLM's."""
    cols = [in_domain] + [d for d in domains if d != in_domain]
    ppl = read_ppl(metrics, cols)
    spread = spread or {}
    head = "| method | " + " | ".join(f"{d} ({'in' if d == in_domain else 'out of'} domain)" for d in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for r in ROWS:
        if ppl[r]:
            lines.append(f"| {label(r)} | " + " | ".join(
                _cell(ppl[r][d], spread.get(f"ppl.{r}.{d}")) if d in ppl[r] else "—" for d in cols) + " |")
    for name, m in (extra or {}).items():
        lines.append(f"| {name} | " + " | ".join(
            f"{m[f'ppl.maskllm.{d}']:,.2f}" if f"ppl.maskllm.{d}" in m else "—" for d in cols) + " |")
    n_seeds = max((s["n"] for k, s in spread.items() if k.startswith("ppl.")), default=1)
    if n_seeds > 1:
        lines.append(f"\n[min–max]: the same pipeline state under {n_seeds} seed pairs ({seeds}), from the ledger; "
                     "a value without a range did not vary with them")
    for name, m in [("MaskLLM", None), *(extra or {}).items()]:
        def ppl_on(d):
            row = {r: ppl[r][d] for r in ROWS if d in ppl[r]}
            if m is not None:
                row.pop("maskllm", None)
                row.update({"maskllm": m[f"ppl.maskllm.{d}"]} if f"ppl.maskllm.{d}" in m else {})
            return row
        gaps = [f"{d}: {100 * g[0]:.1f} % (vs {label(g[1])})" for d in cols if (g := gap_closed(ppl_on(d))) is not None]
        if gaps:
            lines.append(f"\nGap to dense closed by {name}, against the best one-shot row of each domain: {', '.join(gaps)}")
    return "\n".join(lines)


def zeroshot_table(metrics: Path, tasks: list[str], domains: list[str] = ()) -> str:
    """Zero-shot accuracy per row (lines) and lm-eval task (columns), ± the harness's standard error."""
    res = read_zeroshot(metrics, tasks, domains)
    names = list(dict.fromkeys(t for r in res.values() for t in r))
    if not names:
        return ""
    head = "| method | " + " | ".join(names) + " |"
    lines = [head, "|---" * (len(names) + 1) + "|"]
    for r in ROWS:
        if r in res:
            cells = []
            for t in names:
                x = res[r].get(t)
                cells.append("—" if x is None or "acc" not in x["metrics"] else
                             f"{x['metrics']['acc']:.3f} ± {x['stderr'].get('acc') or 0:.3f}")
            lines.append(f"| {label(r)} | " + " | ".join(cells) + " |")
    first = next(iter(res.values()))
    sizes = ", ".join(f"{t} {first[t]['examples']}" for t in names if t in first)
    chance = ", ".join(f"{t} {first[t]['chance']:.3f}" for t in names if t in first and first[t]["chance"] is not None)
    lines.append(f"\nZero-shot accuracy (lm-evaluation-harness, ± its standard error); examples per task: {sizes}"
                 + (f"; chance: {chance}" if chance else ""))
    return "\n".join(lines)


def seed_spread_or_note(params) -> tuple[dict, str, str]:
    """The current state's spread over seeds from the ledger and the seeds it spans, or a note
    saying why there is none."""
    states = sweeps.states(params, params.data.source)
    runs = sweeps.seed_states(params, params.data.source, states)
    if len(runs) < 2:
        return {}, "", "(no spread over seeds: the ledger holds no other seeds of these params)"
    return sweeps.seed_spread(params, params.data.source, states), sweeps.describe_seeds(sweeps.seed_values(runs)), ""


def main() -> int:
    params = load_params_or_exit()
    spread, seeds, note = seed_spread_or_note(params)
    print(table(Path("metrics"), params.evaluate.domains, params.data.source, spread, seeds))
    if note:
        print(note)
    zs = zeroshot_table(Path("metrics"), params.evaluate.zeroshot_tasks, params.evaluate.domains)
    if zs:
        print("\n" + zs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

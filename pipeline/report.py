"""The results table of the current pipeline state, as Markdown: ``python -m pipeline.report``.

Reads ``metrics/<row>/<domain>.json`` (what `dvc repro` wrote) and prints PPL per method and
domain, in-domain first, with the share of the SparseGPT -> dense gap MaskLLM closes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.config import load_params_or_exit
from pipeline.plots import LABELS
from pipeline.rows import ROWS


def gap_closed(ppl: dict[str, float]) -> float | None:
    """(PPL_SparseGPT - PPL_MaskLLM) / (PPL_SparseGPT - PPL_dense)."""
    if not {"dense", "sparsegpt", "maskllm"} <= set(ppl):
        return None
    return (ppl["sparsegpt"] - ppl["maskllm"]) / (ppl["sparsegpt"] - ppl["dense"])


def table(metrics: Path, domains: list[str], in_domain: str) -> str:
    cols = [in_domain] + [d for d in domains if d != in_domain]
    ppl = {r: {d: json.loads(f.read_text())["ppl"] for d in cols if (f := metrics / r / f"{d}.json").is_file()}
           for r in ROWS}
    head = "| method | " + " | ".join(f"{d} ({'in' if d == in_domain else 'out of'} domain)" for d in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for r in ROWS:
        if ppl[r]:
            lines.append(f"| {LABELS[r]} | " + " | ".join(f"{ppl[r][d]:,.2f}" if d in ppl[r] else "—" for d in cols)
                         + " |")
    gaps = [f"{d}: {100 * g:.1f} %" for d in cols
            if (g := gap_closed({r: ppl[r][d] for r in ROWS if d in ppl[r]})) is not None]
    if gaps:
        lines.append(f"\nGap SparseGPT → dense closed by MaskLLM: {', '.join(gaps)}")
    return "\n".join(lines)


def main() -> int:
    params = load_params_or_exit()
    print(table(Path("metrics"), params.evaluate.domains, params.data.source))
    return 0


if __name__ == "__main__":
    sys.exit(main())

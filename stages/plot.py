"""DVC stage `plot`: figures (PNG) and plot data for `dvc plots show/diff`."""
import csv
import json
from pathlib import Path

from pipeline.io import atomic_path
from pipeline.plots import layer_agreement, learn_curves, ppl_bars
from pipeline.rows import ROWS
from pipeline.stage import run_stage

METRICS, PLOTS = Path("metrics"), Path("plots")


def main(params):
    results = {r: json.loads((METRICS / f"{r}.json").read_text()) for r in ROWS if (METRICS / f"{r}.json").is_file()}
    ppl = {r: m["ppl"] for r, m in results.items()}
    protocol = results.get("maskllm", next(iter(results.values())))["protocol"]
    dpi = params.plot.dpi
    ppl_bars(ppl, protocol, PLOTS / "ppl.png", dpi)
    with atomic_path(PLOTS / "ppl.csv") as tmp:  # DVC bar chart data
        tmp.write_text("method,ppl\n" + "".join(f"{r},{v}\n" for r, v in ppl.items()))
    with open(PLOTS / "learn_curve.csv") as f:
        learn_curves(list(csv.DictReader(f)), PLOTS / "learn_curves.png", dpi)
    stats = json.loads(Path("artifacts/harden/stats.json").read_text())["layers"]
    layer_agreement(stats, PLOTS / "agreement.png", dpi)
    return f"{len(ppl)} rows plotted -> {PLOTS}/ppl.png, learn_curves.png, agreement.png"


if __name__ == "__main__":
    run_stage("plot", main)

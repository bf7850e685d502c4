"""DVC stage `plot`: figures (PNG) and plot data for `dvc plots`, from the metrics files and the
learn / harden outputs only. Cached: it reruns when one of them changes; MLflow and the figures
drawn from it (sweeps, transfers) are the track stage's.
"""
import csv
import json
from pathlib import Path

from pipeline.records import plots
from pipeline.io import atomic_path
from pipeline.records.metrics import gap_closed, read_ppl, read_zeroshot
from pipeline.stage import run_stage

METRICS, PLOTS = Path("metrics"), Path("plots")
CURVE, HARDEN_STATS = PLOTS / "learn_curve.csv", Path("artifacts/harden/stats.json")


def main(params):
    dpi, dataset, domains = params.plot.dpi, params.data.source, params.evaluate.domains
    table = {r: t for r, t in read_ppl(METRICS, domains).items() if t}
    if not table:
        raise FileNotFoundError(f"no results under {METRICS}/<row>/<domain>.json; run `dvc repro` first")
    in_domain = {row: t[dataset] for row, t in table.items() if dataset in t}
    shown = next((r for r in in_domain if r != "dense"), next(iter(in_domain)))
    protocol = json.loads((METRICS / shown / f"{dataset}.json").read_text())["protocol"]
    gap = gap_closed(in_domain)
    plots.ppl_bars(in_domain, protocol, PLOTS / "ppl.png", dpi, gap=gap)
    with atomic_path(PLOTS / "ppl.csv") as tmp:  # DVC bar chart data (in-domain)
        tmp.write_text("method,ppl\n" + "".join(f"{r},{v}\n" for r, v in in_domain.items()))
    plots.domain_heatmap(table, domains, dataset, PLOTS / "domains.png", dpi)
    with open(CURVE) as f:
        plots.learn_curves(list(csv.DictReader(f)), PLOTS / "learn_curves.png", dpi)
    plots.layer_agreement(json.loads(HARDEN_STATS.read_text())["layers"], PLOTS / "agreement.png", dpi)
    zeroshot = read_zeroshot(METRICS, params.evaluate.zeroshot_tasks, domains)
    plots.zeroshot_bars(zeroshot, PLOTS / "zeroshot.png", dpi)
    tasks = sorted({t for r in zeroshot.values() for t in r})
    return (f"{sum(map(len, table.values()))} PPL results ({len(table)} methods x {len(domains)} domains), "
            f"{sum(map(len, zeroshot.values()))} zero-shot results ({len(tasks)} tasks) plotted"
            + (f"; MaskLLM closes {100 * gap[0]:.1f} % of the gap {plots.label(gap[1])} -> dense on {dataset}"
               if gap else ""))


if __name__ == "__main__":
    run_stage("plot", main)

"""DVC stage `plot`: figures (PNG), plot data for `dvc plots`, and the MLflow sync.

Always runs (``always_changed``): it is where MLflow catches up with results that DVC
restored from its cache instead of running (see pipeline/tracking.py).
"""
import csv
import json
from pathlib import Path

from pipeline import plots
from pipeline.io import atomic_dir, atomic_path
from pipeline.rows import ROWS
from pipeline.stage import run_stage
from pipeline.tracking import Result, sweep_points, sync, transfer_states

METRICS, PLOTS = Path("metrics"), Path("plots")
CURVE, HARDEN_STATS = PLOTS / "learn_curve.csv", Path("artifacts/harden/stats.json")


def read_results(params) -> list[Result]:
    out = []
    for row in ROWS:
        for domain in params.evaluate.domains:
            f = METRICS / row / f"{domain}.json"
            if f.is_file():
                out.append(Result(row, domain, domain == params.data.source, json.loads(f.read_text()), f))
    return out


def main(params):
    dpi, dataset = params.plot.dpi, params.data.source
    results = read_results(params)
    if not results:
        raise FileNotFoundError(f"no results under {METRICS}/<row>/<domain>.json; run `dvc repro` first")
    table = {}
    for r in results:
        table.setdefault(r.method, {})[r.domain] = r.metrics["ppl"]
    in_domain = {row: t[dataset] for row, t in table.items() if dataset in t}
    here = [r for r in results if r.domain == dataset]
    protocol = next((r.metrics["protocol"] for r in here if r.method != "dense"), here[0].metrics["protocol"])
    plots.ppl_bars(in_domain, protocol, PLOTS / "ppl.png", dpi)
    with atomic_path(PLOTS / "ppl.csv") as tmp:  # DVC bar chart data (in-domain)
        tmp.write_text("method,ppl\n" + "".join(f"{r},{v}\n" for r, v in in_domain.items()))
    plots.domain_heatmap(table, params.evaluate.domains, dataset, PLOTS / "domains.png", dpi)
    with open(CURVE) as f:
        plots.learn_curves(list(csv.DictReader(f)), PLOTS / "learn_curves.png", dpi)
    plots.layer_agreement(json.loads(HARDEN_STATS.read_text())["layers"], PLOTS / "agreement.png", dpi)

    report = sync(params, dataset, results, curve_file=CURVE)
    # ablations: MaskLLM's in-domain PPL across pipeline states that differ in one param
    sweeps = sweep_points(params, dataset, f"ppl.maskllm.{dataset}")
    refs = {r: in_domain[r] for r in ("dense", "sparsegpt", "sparsegpt_maskonly") if r in in_domain}
    transfers = {d: transfer_bars(d, states, table, dataset) for d, states in transfer_states(params).items()}
    with atomic_dir(PLOTS / "sweeps") as tmp:
        for param, points in sweeps.items():
            plots.sweep(param, points, refs, tmp / f"{param.replace('.', '_')}.png", dpi)
        for domain, (bars, dense) in transfers.items():
            plots.transfer(domain, bars, dense, tmp / f"transfer_{domain}.png", dpi)
        (tmp / "index.md").write_text(
            "# Ablation figures\n\n" + "".join(f"- `{p}`: {len(v)} values -> {p.replace('.', '_')}.png\n"
                                                for p, v in sweeps.items())
            + "".join(f"- transfer to {d}: {len(b)} masks -> transfer_{d}.png\n" for d, (b, _) in transfers.items())
            + ("" if sweeps or transfers else "None yet: queue a sweep (`make sweep-tau`, see the README).\n"))
    figures = sorted(PLOTS.glob("*.png")) + sorted((PLOTS / "sweeps").glob("*.png"))
    sync(params, dataset, [], artifacts=[*figures, HARDEN_STATS, PLOTS / "ppl.csv", CURVE])
    return (f"{len(results)} results ({len(table)} methods x {len(params.evaluate.domains)} domains) plotted; "
            f"{len(sweeps) + len(transfers)} sweep figure(s); MLflow parent {report.parent[:8]}: {len(report.created)} run(s) "
            f"logged, {len(report.replaced)} replaced, {report.kept} already there")


def transfer_bars(domain: str, states: list[dict], table: dict, source: str):
    """The bars of a transfer figure: this state's general masks on ``domain``, then the masks
    learned on ``domain`` (SparseGPT calibrated there, MaskLLM from each prior)."""
    bars = []
    for row in ("sparsegpt", "maskllm"):
        if domain in table.get(row, {}):
            bars.append((f"{plots.LABELS[row]}, {source} mask (no transfer)", table[row][domain], row))
    one_shot = next((s["ppl"]["sparsegpt"] for s in states if "sparsegpt" in s["ppl"]), None)
    if one_shot is not None:
        bars.append((f"SparseGPT calibrated on {domain}", one_shot, "sparsegpt"))
    for s in sorted(states, key=lambda s: (s["prior"].startswith("file:"), s["prior"])):
        prior = f"{source} MaskLLM mask ({s['prior'][5:]})" if s["prior"].startswith("file:") else s["prior"]
        bars.append((f"MaskLLM on {domain}, prior: {prior}", s["ppl"]["maskllm"], "maskllm"))
    dense = next((s["ppl"]["dense"] for s in states if "dense" in s["ppl"]), table.get("dense", {}).get(domain))
    return bars, dense


if __name__ == "__main__":
    run_stage("plot", main)

"""DVC stage `track` (always runs, seconds): the current pipeline state goes into the ledger
(``records/states.json``, the record of every state), the sweep / transfer / seed figures are drawn
from the ledger, and MLflow gets a one-way export of it.

DVC cannot know what the ledger holds: a cached evaluation writes nothing, and a new pipeline state
(another param) reuses cached results; so this stage records the state from its metrics files.
"""
import json
from pathlib import Path

from pipeline.io import atomic_dir
from pipeline.profile import profile_params
from pipeline.records import ledger, metrics, mlflow_export, plots, sweeps
from pipeline.stage import run_stage

METRICS, PLOTS = Path("metrics"), Path("plots")
AUTHORS = "authors-recipe"  # profiles/authors-recipe.yaml: the budget curve's second recipe
CURVE, HARDEN_STATS, LEARN = PLOTS / "learn_curve.csv", Path("artifacts/harden/stats.json"), METRICS / "learn.json"


def main(params):
    dpi, dataset = params.plot.dpi, params.data.source
    files = metrics.read_files(params, METRICS)
    if not any(f.kind == "ppl" for f in files):
        raise FileNotFoundError(f"no results under {METRICS}/<row>/; run `dvc repro` first")
    learn = json.loads(LEARN.read_text()) if LEARN.is_file() else {}
    entry = ledger.record(params, metrics.flat(files))

    table, validation = {}, {}  # {row: {domain: PPL}}: test (results), validation (sweeps)
    for f in files:
        if f.kind in ("ppl", "validation"):
            (table if f.kind == "ppl" else validation).setdefault(f.row, {})[f.domain] = f.data["ppl"]
    in_domain = {row: t[dataset] for row, t in table.items() if dataset in t}
    states = sweeps.states(params, dataset)
    spread = sweeps.seed_spread(params, dataset, states)
    seed_values = sweeps.describe_seeds(sweeps.seed_values(sweeps.seed_states(params, dataset, states)))

    seeds = max((s["n"] for s in sweeps.row_spread(spread, table, dataset).values()), default=1)
    # ablations: MaskLLM across pipeline states that differ in one param; a sweep is one with
    # two or more in-domain points, drawn and tabled on every domain, around the current params and
    # around every former default (a state `dvc repro` ran) where a point of that sweep ran too
    curves = sweeps.sweep_curves(params, dataset, states)
    spreads = {param: [sweeps.point_spreads(params, dataset, states, {param: points}).get(param, {})
                       for _, points in cs] for param, cs in curves.items()}
    panels = sweeps.sweep_panels(curves, spreads, validation, [dataset], dataset, spread)
    transfers = {d: sweeps.transfer_bars(d, learned, table, dataset) for d, learned in sweeps.transfer_states(params).items()}
    # the budget curve: these params and the authors' recipe at every learn.steps recorded
    recipes = {"defaults (params.yaml)": params, "authors' recipe": profile_params(AUTHORS)}
    commands = {"defaults (params.yaml)": "dvc exp run",
                "authors' recipe": f"dvc exp run $(python -m pipeline.profile {AUTHORS})"}
    curves_by_budget = {k: v for k, v in sweeps.budget(recipes, dataset, states).items() if v}
    references = {r: validation[r][dataset] for r in ("dense", "sparsegpt") if dataset in validation.get(r, {})}
    with atomic_dir(PLOTS / "sweeps") as tmp:
        for param, cs in curves.items():
            name = param.replace(".", "_")
            current = sweeps.current_value(params, param)
            plots.sweep(param, panels[param], tmp / f"{name}.png", dpi, current=current)
            tables = [sweeps.sweep_table(param, points, dataset, [dataset], current, spread, own_spread, around=c)
                      for (c, points), own_spread in zip(cs, spreads[param])]
            if len(cs) > 1:  # one section per centre; the current one may hold the current point alone
                tables = [f"## Around {'the current params' if c is None else f'`{sweeps.describe_centre(c)}` (the current params otherwise)'}"
                          f"\n\n{t}" for (c, _), t in zip(cs, tables)]
            (tmp / f"{name}.md").write_text(
                f"# MaskLLM against `{param}` ({dataset} validation split)\n\n"
                "Each point differs from the current params (or, in a section of its own, from another centre)\n"
                "in this param alone (the latest run of each);\n"
                "gap closed: of the gap between the best one-shot row (named) and dense, on validation.\n\n"
                + "\n\n".join(tables) + "\n")
        if sum(len(points) for points in curves_by_budget.values()) >= 2:
            plots.budget(curves_by_budget, references, dataset, tmp / "budget.png", dpi)
            (tmp / "budget.md").write_text(
                f"# MaskLLM's budget curve ({dataset} validation split)\n\n"
                "Every recorded state of these params (tuned) or of the authors' recipe (`profiles/authors-recipe.yaml`)\n"
                "that differs in `learn.steps` and the seeds alone; a budget run under several seeds shows their mean\n"
                "and range. Gap closed: of the gap between the best one-shot row (named) and dense, on validation.\n\n"
                + sweeps.budget_table(curves_by_budget, dataset, commands) + "\n")
        for domain, (bars, dense) in transfers.items():
            plots.transfer(domain, bars, dense, tmp / f"transfer_{domain}.png", dpi)
        if seeds > 1:
            plots.seed_spread(in_domain, {r: s for r, s in sweeps.row_spread(spread, table, dataset).items()
                                          if sweeps.varied(s)}, dataset, tmp / "seeds.png", dpi, seed_values)
        near = sweeps.neighbours(params, dataset, states)
        (tmp / "states.md").write_text(
            f"# MaskLLM in the logged pipeline states near the current params ({dataset})\n\n"
            "Every state MLflow holds that differs from the current params in at most two params,\n"
            "the latest run of each; `reproduce` is the one command that recreates it.\n\n"
            + sweeps.neighbours_table(near, dataset, [dataset]) + "\n")
        (tmp / "index.md").write_text(
            "# Ablation figures\n\n" + "".join(
                f"- `{p}`: " + ", ".join(f"{len(points)} value{'s' if len(points) != 1 else ''} around "
                                         + (f"`{sweeps.describe_centre(c)}`" if c else "the current params")
                                         for c, points in cs)
                + f" -> {p.replace('.', '_')}.png, {p.replace('.', '_')}.md (table)\n" for p, cs in curves.items())
            + "".join(f"- transfer to {d}: {len(b)} masks -> transfer_{d}.png\n" for d, (b, _) in transfers.items())
            + ("- the budget curve: validation PPL against training tokens, both recipes -> budget.png, budget.md\n"
               if sum(len(points) for points in curves_by_budget.values()) >= 2 else "")
            + (f"- seeds: {seeds} states of these params ({seed_values}) -> seeds.png\n" if seeds > 1 else "")
            + "- every state within two params of these, with the command that reproduces it -> states.md\n"
            + ("" if curves or transfers or seeds > 1 else
               "None yet: queue a sweep (`make sweep-tau`, see the README) or other seeds.\n"))
    figures = sorted(PLOTS.glob("*.png")) + sorted((PLOTS / "sweeps").glob("*.png"))
    report = mlflow_export.export(ledger.read(), entry, files, curve_file=CURVE,
                                  artifacts=[*figures, HARDEN_STATS, PLOTS / "ppl.csv", CURVE],
                                  curve_provenance=learn.get("provenance"))
    n = len(curves) + len(transfers) + (seeds > 1)
    return (f"state {entry['run_name']!r} recorded in {ledger.ledger_path().name} "
            f"({len(states)} state(s) of this experiment); {n} sweep figure(s); {seeds} seed(s) of this state; "
            f"MLflow: {len(report.created)} run(s) logged, {len(report.replaced)} replaced, {report.kept} already "
            f"there, {report.states} state(s) exported")


if __name__ == "__main__":
    run_stage("track", main)

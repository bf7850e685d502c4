"""Ablations across the recorded pipeline states: sweeps, transfers and the spread over seeds.

Every pipeline state is an entry of the ledger (``pipeline.records.ledger``) with every param and its
results as metrics (``ppl.<row>.<domain>``, ``zeroshot.<row>.<task>.<metric>``). A state belongs to
- the sweep of param P when it differs from the current state in P alone, or from another centre
  (a former default: params ``dvc repro`` ran in the workspace before) in P alone (other_centres);
- the transfer to domain D when it was learned on D (``data.source``), from a one-shot prior
  or from a mask file, and matches the current state otherwise;
- the seeds of the current state when it differs from it in the seeds (``SEEDS``) alone: the
  spread of a result over those states says which differences between methods are real.
"""
from __future__ import annotations

import math
from pathlib import Path

from pipeline.records.metrics import best_one_shot, gap_closed
from pipeline.evaluation.rows import label
from pipeline.records import ledger
from pipeline.records.ledger import experiment_name, flat_params, model_label

SWEEPS = ("learn.tau", "learn.kappa", "learn.prior_strength", "learn.prior", "learn.weight_reg", "learn.steps",
          "learn.lr")
# params that do not change any result (a sweep point may differ in them)
IRRELEVANT = ("plot.", "harden.", "learn.checkpoint_every", "evaluate.validation_rows")
# the seeds of a run: calibration windows of the one-shot priors, MaskLLM's sampling and batches
SEEDS = ("prior.seed", "learn.seed")
# what sweeps are drawn and chosen on: the validation split's PPL (``validation_ppl.<row>.<domain>``);
# the test split's (``ppl.<row>.<domain>``) is reported once, for the chosen settings
CHOICE = "validation_ppl"
# a transfer run differs from the general one in its training domain and its prior only
TRANSFER_FREE = ("data.source", "learn.prior", "learn.prior_file", "evaluate.domains")


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _matches(p: dict[str, str], current: dict[str, str], free: tuple[str, ...], defaults: dict[str, str]) -> bool:
    return all(p.get(k, defaults.get(k)) == v for k, v in current.items() if k not in free)


def relevant(params) -> dict[str, str]:
    """The flat params that can change a result (``IRRELEVANT`` aside): what identifies a state's results."""
    return {k: v for k, v in flat_params(params).items() if not k.startswith(IRRELEVANT)}


def _parents(experiment: str) -> list[dict]:
    return ledger.states(experiment)


def states(params, dataset: str) -> list:
    """Every recorded pipeline state of the current model, dataset and N:M, oldest first."""
    return _parents(experiment_name(model_label(params), dataset, params.sparsity.n, params.sparsity.m))


def current_value(params, param: str):
    """The current state's value of a swept param, as sweep_points reports it."""
    p = flat_params(params)
    return prior_label(p) if param == "learn.prior" else _value(p[param])


def prior_label(p: dict[str, str]) -> str:
    """``learn.prior`` as a reader should see it: a prior file by its name."""
    prior = p.get("learn.prior", "")
    return f"file:{Path(p['learn.prior_file']).stem}" if prior == "file" and p.get("learn.prior_file") else prior


def _no_prior(p: dict[str, str], defaults: dict[str, str]) -> bool:
    """Whether a state learns without a prior: ``learn.prior=none`` or ``learn.prior_strength=0``
    (stages/learn.py loads no prior then: both start from the same logits and learn the same masks)."""
    return (p.get("learn.prior", defaults.get("learn.prior")) == "none"
            or float(p.get("learn.prior_strength", defaults.get("learn.prior_strength"))) == 0.0)


def _as_point(p: dict[str, str], swept: str, current: dict[str, str], defaults: dict[str, str]) -> dict[str, str]:
    """A no-prior state in the words of the sweep it is a point of: strength 0 under the current
    prior in the prior-strength sweep, prior ``none`` under the current strength in the prior sweep,
    so one run serves both."""
    if swept not in ("learn.prior", "learn.prior_strength") or not _no_prior(p, defaults) or _no_prior(current, defaults):
        return p
    if swept == "learn.prior_strength":
        same = {k: current[k] for k in ("learn.prior", "learn.prior_file") if k in current}
        return {**p, **same, "learn.prior_strength": "0.0"}
    return {**p, "learn.prior": "none", "learn.prior_file": current.get("learn.prior_file", "null"),
            "learn.prior_strength": current["learn.prior_strength"]}


def _centre(params, around: dict[str, str] | None) -> dict[str, str]:
    """The flat params a sweep is run around: the current ones, but ``around`` (other_centres)."""
    return {**relevant(params), **(around or {})}


def _free(swept: str) -> tuple[str, ...]:
    # the prior and its file are one choice
    return (swept, "learn.prior_file") if swept == "learn.prior" else (swept,)


def _point_key(p: dict[str, str], swept: str) -> str:
    return prior_label(p) if swept == "learn.prior" else p[swept]


def sweep_runs(params, dataset: str, metric: str, parents: list | None = None, around: dict[str, str] | None = None,
               min_points: int = 2) -> dict[str, dict[str, tuple[dict, object]]]:
    """For each swept param: {value: (params as a point of that sweep, run)} of every pipeline state
    with ``metric`` that differs from the current one (but ``around``, other_centres) in that param
    alone (latest run per value), where ``min_points`` values or more ran. A state without a prior
    is a point of both the prior sweep (``none``) and the prior-strength sweep (0)."""
    parents = states(params, dataset) if parents is None else parents
    current, defaults = _centre(params, around), ledger.IMPLIED
    out = {}
    for swept in SWEEPS:
        points = {}
        for run in parents:
            p = _as_point(run["params"], swept, current, defaults)
            if metric in run["metrics"] and swept in p and _matches(p, current, _free(swept), defaults):
                points[_point_key(p, swept)] = (p, run)
        if len(points) >= min_points:
            out[swept] = points
    return out


def former_defaults(parents: list, metric: str) -> list:
    """The states ``dvc repro`` ran in the workspace (``dvc_exp_names`` holds ``workspace``), i.e.
    every set of params that was the default at some time, with ``metric``: the centres a sweep may
    have run around (other_centres)."""
    return [run for run in parents if metric in run["metrics"]
            and "workspace" in run["tags"].get("dvc_exp_names", "").split(",")]


def other_centres(params, dataset: str, metric: str, parents: list | None = None,
                  min_points: int = 2) -> dict[str, list[dict[str, str]]]:
    """For each swept param: the other centres its sweep ran around, as ``{param: value}`` changes
    from the current params, where ``min_points`` values or more ran. A centre is a former default
    (former_defaults) under the current seeds (seeds make spreads, not sweeps), less the swept param;
    fewest changes first, then most values. When a default moves (learn.kappa 100 -> 1000, then
    learn.weight_reg 1e-5 -> 1e-4), the sweeps run around each former default stay on the figures
    as a curve of their own instead of vanishing, and a sweep rerun around the new default is drawn
    next to them; a single sweep point run around a former default (a ``dvc exp run``) makes no
    centre of its own, so the figures hold no two-point curves of every pair of changes."""
    parents = states(params, dataset) if parents is None else parents
    current, defaults = relevant(params), ledger.IMPLIED
    former = former_defaults(parents, metric)
    out = {}
    for swept in SWEEPS:
        def diff(p: dict[str, str]) -> tuple:
            return tuple(sorted((k, p.get(k, defaults.get(k))) for k, v in current.items()
                                if k not in _free(swept) and p.get(k, defaults.get(k)) != v))
        keys = {d for d in (diff(run["params"]) for run in former)
                if d and not any(k in SEEDS for k, _ in d)}
        values: dict[tuple, set] = {}
        for run in parents:
            p = _as_point(run["params"], swept, current, defaults)
            if metric in run["metrics"] and swept in p and (centre := diff(p)) in keys:
                values.setdefault(centre, set()).add(_point_key(p, swept))
        centres = sorted((k for k, v in values.items() if len(v) >= min_points), key=lambda k: (len(k), -len(values[k]), k))
        if centres:
            out[swept] = [dict(k) for k in centres]
    return out


def describe_centre(around: dict[str, str]) -> str:
    """``{"learn.kappa": "100.0"}`` -> ``"learn.kappa=100.0"`` (a prior file by its name)."""
    if "learn.prior" in around:
        around = {**{k: v for k, v in around.items() if k != "learn.prior_file"}, "learn.prior": prior_label(around)}
    return ", ".join(f"{k}={v}" for k, v in around.items())


def values_of(points: dict[str, tuple[dict, object]], metric: str) -> list[tuple[object, float]]:
    """(value, metric) of every point of a sweep (sweep_runs) that has ``metric``."""
    return [(_value(k), run["metrics"][metric]) for k, (_, run) in points.items() if metric in run["metrics"]]


def sweep_points(params, dataset: str, metric: str, parents: list | None = None) -> dict[str, list[tuple[object, float]]]:
    """For each swept param: (value, metric) of every point of its sweep around the current params (sweep_runs)."""
    return {swept: values_of(points, metric) for swept, points in sweep_runs(params, dataset, metric, parents).items()}


def sweep_curves(params, dataset: str, parents: list | None = None) -> dict[str, list[tuple[dict | None, dict]]]:
    """Every sweep to show, on the validation PPL: {param: [(centre, points)]} (points: sweep_runs),
    the current params' first (centre None; the current point alone when only another centre ran a
    sweep of that param, so the figure shows where the current params stand), then each of
    other_centres."""
    parents = states(params, dataset) if parents is None else parents
    metric = f"{CHOICE}.maskllm.{dataset}"
    centres = other_centres(params, dataset, metric, parents)
    own = sweep_runs(params, dataset, metric, parents, min_points=1)
    out = {}
    for param in SWEEPS:
        if len(own.get(param, {})) >= 2 or param in centres:
            out[param] = [(None, own.get(param, {}))] + [
                (c, sweep_runs(params, dataset, metric, parents, around=c)[param]) for c in centres.get(param, [])]
    return out


def sweep_panels(curves: dict[str, list[tuple[dict | None, dict]]], spreads: dict[str, list[dict]],
                 table: dict[str, dict[str, float]], domains: list[str], dataset: str,
                 spread: dict[str, dict]) -> dict[str, list[dict]]:
    """The panels of each sweep figure (plots.sweep), one per domain that holds two points or more
    over all curves: the current params' curve (``curves``: sweep_curves) with its points' seed
    ranges (``spreads``: point_spreads of each curve), the other centres' curves under ``others``,
    the references of that domain (dense, its best one-shot row, SparseGPT and SparseGPT's mask
    alone, from ``table``: {row: {domain: PPL}}) and their seed ranges (``spread``: seed_spread)."""
    panels = {param: [] for param in curves}
    for domain in domains:
        ppl = {row: t[domain] for row, t in table.items() if domain in t}
        best = best_one_shot(ppl)
        refs = {r: ppl[r] for r in dict.fromkeys(("dense", best, "sparsegpt", "sparsegpt_maskonly")) if r in ppl}
        m = f"{CHOICE}.maskllm.{domain}"
        for param, cs in curves.items():
            # the figure's legend is narrow: the centre's params without their "learn." section
            lines = [{"label": describe_centre(c).replace("learn.", "") if c else "", "points": values_of(points, m),
                      "point_spread": {x: s[m] for x, s in spread_of.items() if m in s}}
                     for (c, points), spread_of in zip(cs, spreads[param])]
            if sum(len(line["points"]) for line in lines) >= 2:
                panels[param].append({"domain": domain, "in_domain": domain == dataset, "points": lines[0]["points"],
                                      "point_spread": lines[0]["point_spread"], "others": lines[1:],
                                      "references": refs, "spread": row_spread(spread, table, domain, CHOICE)})
    return panels


def row_spread(spread: dict[str, dict], rows, domain: str, prefix: str = "ppl") -> dict[str, dict]:
    """{row: spread of its PPL on ``domain``} for each of ``rows`` that ``spread`` (seed_spread) holds."""
    return {row: spread[f"{prefix}.{row}.{domain}"] for row in rows if f"{prefix}.{row}.{domain}" in spread}


def _ppl_in(metrics: dict[str, float], domain: str, prefix: str = "ppl") -> dict[str, float]:
    """A state's PPL of every row on ``domain``, from its ``<prefix>.<row>.<domain>`` metrics."""
    return {k.split(".")[1]: v for k, v in metrics.items() if k.startswith(f"{prefix}.") and k.endswith(f".{domain}")}


def _maskllm_cells(metrics: dict[str, float], domains: list[str]) -> list[str]:
    return [f"{metrics[f'{CHOICE}.maskllm.{d}']:,.2f}" if f"{CHOICE}.maskllm.{d}" in metrics else "—" for d in domains]


def sweep_table(param: str, points: dict[str, tuple[dict, object]], dataset: str, domains: list[str],
                current, spread: dict[str, dict] | None = None,
                point_spread: dict[object, dict[str, dict]] | None = None, around: dict[str, str] | None = None) -> str:
    """Markdown: one row per value of ``param`` (sweep_runs), in order: MaskLLM's validation PPL, the
    gap it closes there, its validation PPL on the other ``domains`` and the one command that reproduces the
    point; ``spread`` (seed_spread) adds the range of the current point over seeds, ``point_spread``
    (point_spreads of this sweep) that of every other point run under several seeds. A sweep
    ``around`` another centre (other_centres) names its centre point so and reproduces every point
    with that centre's change too."""
    cols = [dataset] + [d for d in domains if d != dataset]
    lines = [f"| `{param}` | MaskLLM {dataset} validation PPL | gap closed ({dataset} validation) | "
             + "".join(f"MaskLLM {d} | " for d in cols[1:]) + "reproduce |", "|---" * (len(cols) + 3) + "|"]
    numeric = all(isinstance(_value(k), (int, float)) for k in points)
    ordered = sorted(points, key=lambda k: _value(k) if numeric else k)
    centre = "current" if not around else "centre"
    for key in ordered:
        p, run = points[key]
        m = run["metrics"]
        gap = gap_closed(_ppl_in(m, dataset, CHOICE))
        cells = _maskllm_cells(m, cols)
        here = _value(key) == current
        sets = {k: v for k, v in (around or {}).items() if v != "null"}
        if not here:
            sets[param] = p[param]
            if param == "learn.prior" and p.get("learn.prior") == "file":
                sets["learn.prior_file"] = p["learn.prior_file"]
        value = f"**{key}** ({centre})" if here else key
        lines.append(f"| {value} | {cells[0]} | {'—' if gap is None else f'{100 * gap[0]:.1f} % of {label(gap[1])}'} | "
                     + "".join(f"{c} | " for c in cells[1:]) + f"`{command(sets)}` |")
    # the centre's range: the current state's seeds (spread), or the other centre's own (point_spread)
    ranges = [(centre, spread if not around else (point_spread or {}).get(current))]
    ranges += [(key, (point_spread or {}).get(_value(key), {})) for key in ordered if _value(key) != current]
    for name, metrics in ranges:
        s = {d: (metrics or {}).get(f"{CHOICE}.maskllm.{d}") for d in cols}
        if s[dataset] and s[dataset]["n"] > 1:
            rng = [f"{s[d]['min']:,.2f}–{s[d]['max']:,.2f}" if s[d] else "—" for d in cols]
            lines.append(f"| {name}, {s[dataset]['n']} seeds (min–max) | {rng[0]} | | " + "".join(f"{r} | " for r in rng[1:]) + "|")
    return "\n".join(lines)


def transfer_states(params) -> dict[str, list[dict]]:
    """Pipeline states of the same model, N:M and hyperparameters learned on another domain D
    (a transfer sweep) -> {D: [{"prior": label, "ppl": {method: PPL on D}}]}; only domains
    where at least one state used a mask file as its prior (``learn.prior=file``)."""
    from pipeline.config import Data

    current, defaults = relevant(params), ledger.IMPLIED
    out = {}
    for domain in Data.model_fields["source"].annotation.__args__:
        if domain == params.data.source:
            continue
        states = {}
        for run in _parents(experiment_name(model_label(params), domain, params.sparsity.n, params.sparsity.m)):
            p, metrics = run["params"], run["metrics"]
            if p.get("data.source") != domain or not _matches(p, current, TRANSFER_FREE, defaults):
                continue
            ppl = _ppl_in(metrics, domain)
            if "maskllm" in ppl:
                states[prior_label(p)] = {"prior": prior_label(p), "ppl": ppl}  # latest run per prior
        if any(label.startswith("file:") for label in states):
            out[domain] = list(states.values())
    return out


def transfer_bars(domain: str, learned: list[dict], table: dict, source: str):
    """The bars of a transfer figure: this state's general masks on ``domain``, then the masks
    ``learned`` on it (transfer_states: SparseGPT calibrated there, MaskLLM from each prior)
    -> ([(label, PPL, row)], dense PPL)."""
    bars = []
    for row in ("sparsegpt", "maskllm"):
        if domain in table.get(row, {}):
            bars.append((f"{label(row)}, {source} mask (no transfer)", table[row][domain], row))
    one_shot = next((s["ppl"]["sparsegpt"] for s in learned if "sparsegpt" in s["ppl"]), None)
    if one_shot is not None:
        bars.append((f"SparseGPT calibrated on {domain}", one_shot, "sparsegpt"))
    for s in sorted(learned, key=lambda s: (s["prior"].startswith("file:"), s["prior"])):
        prior = f"{source} MaskLLM mask ({s['prior'][5:]})" if s["prior"].startswith("file:") else s["prior"]
        bars.append((f"MaskLLM on {domain}, prior: {prior}", s["ppl"]["maskllm"], "maskllm"))
    dense = next((s["ppl"]["dense"] for s in learned if "dense" in s["ppl"]), table.get("dense", {}).get(domain))
    return bars, dense


def spread(values: list[float]) -> dict:
    """mean, min, max, sample standard deviation (0 for one value) and n of ``values``."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "min": min(values), "max": max(values), "std": std, "n": n}


# One state evaluated on two CPU models differs by ~1e-7 of the perplexity (float32 kernels): a spread
# over seed states narrower than this share of its value is that, not the seeds, and shows no range.
SEED_NOISE = 1e-5


def varied(s: dict | None) -> bool:
    """Whether a spread over seed states (``spread``) shows a range: more than one state, and wider
    than SEED_NOISE."""
    return bool(s) and s["n"] > 1 and s["max"] - s["min"] > SEED_NOISE * abs(s["max"])


def seed_states(params, dataset: str, parents: list | None = None) -> list:
    """The parents that differ from the current state in the seeds alone, the latest per seed
    pair that holds results (the current state's own parent among them once it is logged; a parent
    without any PPL yet, e.g. opened by a running ``learn``, would hide an earlier run's results)."""
    parents = states(params, dataset) if parents is None else parents
    return _seed_runs(relevant(params), parents, ledger.IMPLIED)


def _seed_runs(centre: dict[str, str], parents: list, defaults: dict[str, str]) -> list:
    """The parents that differ from ``centre`` (flat params) in the seeds alone, latest per seed pair with results."""
    latest = {}
    for run in parents:  # oldest first: a later run of the same seeds replaces an earlier one
        p = run["params"]
        has_results = any(k.startswith("ppl.") for k in run["metrics"])
        if has_results and _matches(p, centre, SEEDS, defaults):
            latest[tuple(p.get(k, defaults.get(k)) for k in SEEDS)] = run
    return list(latest.values())


def _metric_spreads(runs: list) -> dict[str, dict]:
    values: dict[str, list[float]] = {}
    for run in runs:
        for k, v in run["metrics"].items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                values.setdefault(k, []).append(float(v))
    return {k: spread(v) for k, v in values.items()}


def point_spreads(params, dataset: str, parents: list | None = None,
                  runs: dict | None = None) -> dict[str, dict[object, dict[str, dict]]]:
    """For each sweep (``runs``: sweep_runs on the in-domain PPL, computed when not given): {value:
    {metric: spread}} of every point that ran under more than one seed pair, over that point's own
    seed states (as seed_spread gives the current point's): a point off the current value is then
    compared with the current one by both spreads, not by one run."""
    parents = states(params, dataset) if parents is None else parents
    runs = sweep_runs(params, dataset, f"{CHOICE}.maskllm.{dataset}", parents) if runs is None else runs
    current, defaults = relevant(params), ledger.IMPLIED
    out = {}
    for swept, points in runs.items():
        for key, (_, run) in points.items():
            # the run's own params (a no-prior point is not rewritten here), on the current keys
            centre = {k: run["params"].get(k, defaults.get(k)) for k in current}
            seeds = _seed_runs(centre, parents, defaults)
            if len(seeds) > 1:
                out.setdefault(swept, {})[_value(key)] = _metric_spreads(seeds)
    return out


def seed_values(states: list) -> dict[str, list[int]]:
    """The values of each seed param over ``states`` (seed_states): which sources of noise a
    spread includes (a one-shot row varies with ``prior.seed`` only)."""
    defaults = ledger.IMPLIED
    return {k: sorted({int(s["params"].get(k, defaults.get(k))) for s in states}) for k in SEEDS}


def describe_seeds(values: dict[str, list[int]]) -> str:
    """``{"prior.seed": [0], "learn.seed": [0, 1, 2]}`` -> ``"prior.seed 0; learn.seed 0, 1, 2"``."""
    return "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in values.items())


def seed_spread(params, dataset: str, parents: list | None = None) -> dict[str, dict]:
    """Every metric of the current state's seed states -> its spread over them,
    e.g. ``{"ppl.maskllm.wiki": {"mean", "min", "max", "std", "n"}}`` (n = seeds with that metric)."""
    return _metric_spreads(seed_states(params, dataset, parents))


def neighbours(params, dataset: str, parents: list | None = None, max_changes: int = 2) -> list[dict]:
    """The current state and every logged state that differs from it in at most ``max_changes``
    params (sweep points, seeds, paired changes such as AdamW's betas and eps), latest run per
    change, fewest changes first: ``{"changes": {param: label}, "sets": {param: value} (for
    command), "metrics": {...}, "exp": DVC name}`` (a prior file is one change, ``file:<name>``)."""
    parents = states(params, dataset) if parents is None else parents
    current, defaults = relevant(params), ledger.IMPLIED
    latest = {}
    for run in parents:
        p = run["params"]
        sets = {k: p.get(k, defaults.get(k)) for k, v in current.items() if p.get(k, defaults.get(k)) != v}
        changes = dict(sets)
        if "learn.prior_file" in changes or "learn.prior" in changes:  # the prior and its file are one choice
            prior = {k: p.get(k, defaults.get(k)) for k in ("learn.prior", "learn.prior_file")}
            changes.pop("learn.prior_file", None)
            changes["learn.prior"] = prior_label(prior)
            sets.update((k, v) for k, v in prior.items() if k == "learn.prior" or v != "null")
        if len(changes) <= max_changes and f"{CHOICE}.maskllm.{dataset}" in run["metrics"]:
            latest[tuple(sorted(changes.items()))] = {"changes": changes, "sets": sets, "metrics": dict(run["metrics"]),
                                                      "exp": run["tags"].get("dvc_exp_name", "")}
    return sorted(latest.values(), key=lambda s: (len(s["changes"]), sorted(s["changes"].items())))


def command(sets: dict[str, str]) -> str:
    """The one command that reproduces a state from the current params (``neighbours``' sets)."""
    if not sets:
        return "dvc repro"
    out = []
    for k, v in sets.items():
        value = v.replace(" ", "") if v.startswith("[") else v
        out.append(f"-S '{k}={value}'" if any(c in value for c in "[],") else f"-S {k}={value}")
    return "dvc exp run " + " ".join(out)


def neighbours_table(rows: list[dict], dataset: str, domains: list[str]) -> str:
    """Markdown: MaskLLM's validation PPL (in-domain first) of each state from ``neighbours``,
    the gap it closes there, and the command that reproduces it."""
    cols = [dataset] + [d for d in domains if d != dataset]
    lines = ["| change from the current params | " + " | ".join(f"MaskLLM {d} validation" for d in cols)
             + f" | gap closed ({dataset} validation) | reproduce |", "|---" * (len(cols) + 3) + "|"]
    for r in rows:
        m = r["metrics"]
        gap = gap_closed(_ppl_in(m, dataset, CHOICE))
        change = ", ".join(f"`{k}={v}`" for k, v in r["changes"].items()) or "(current)"
        cells = _maskllm_cells(m, cols)
        lines.append(f"| {change} | " + " | ".join(cells) + f" | {'—' if gap is None else f'{100 * gap[0]:.1f} %'} | "
                     f"`{command(r['sets'])}` |")
    return "\n".join(lines)



def budget(recipes: dict[str, object], dataset: str, parents: list) -> dict[str, dict[int, dict]]:
    """The budget curve of each recipe ({name: its Params}): every recorded state equal to the recipe but
    in ``learn.steps`` and the seeds -> {name: {steps: {"tokens", "spread": {metric: spread over its seed
    states}, "runs": n}}}, steps in order."""
    out = {}
    for name, params in recipes.items():
        centre, defaults = relevant(params), ledger.IMPLIED
        by_steps: dict[int, list] = {}
        for run in parents:
            p = run["params"]
            if f"{CHOICE}.maskllm.{dataset}" in run["metrics"] and _matches(p, centre, ("learn.steps", *SEEDS), defaults):
                by_steps.setdefault(int(p["learn.steps"]), []).append(run)
        tokens = params.learn.batch_size * params.learn.seqlen
        out[name] = {steps: {"tokens": steps * tokens, "runs": len(_seed_runs({**centre, "learn.steps": str(steps)},
                                                                             runs, defaults)),
                             "spread": _metric_spreads(_seed_runs({**centre, "learn.steps": str(steps)}, runs, defaults))}
                     for steps, runs in sorted(by_steps.items())}
    return out


def budget_table(curves: dict[str, dict[int, dict]], dataset: str, commands: dict[str, str]) -> str:
    """Markdown: per recipe and budget, MaskLLM's validation PPL (mean, and min–max over the seeds run),
    the gap it closes there (its mean against the best one-shot row's and dense's) and the command."""
    lines = [f"| recipe | steps | training tokens | MaskLLM {dataset} validation PPL | seeds | gap closed (validation) "
             "| reproduce |", "|---" * 7 + "|"]
    for name, points in curves.items():
        for steps, point in points.items():
            s = point["spread"]
            m = s[f"{CHOICE}.maskllm.{dataset}"]
            ppl = {row: s[k]["mean"] for k in s if k.startswith(f"{CHOICE}.") and k.endswith(f".{dataset}")
                   for row in [k.split(".")[1]]}
            gap = gap_closed(ppl)
            cell = f"{m['mean']:,.2f}" + (f" ({m['min']:,.2f}–{m['max']:,.2f})" if m["n"] > 1 else "")
            lines.append(f"| {name} | {steps} | {point['tokens']:,} | {cell} | {m['n']} | "
                         f"{'—' if gap is None else f'{100 * gap[0]:.1f} % of {label(gap[1])}'} | "
                         f"`{commands[name]} -S learn.steps={steps}` |")
    return "\n".join(lines)

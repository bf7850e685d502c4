"""The numbers in README.md and docs/*.md, generated from the committed files: ``python -m pipeline.records.docs``.

A block between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->`` is rewritten by ``BLOCKS[NAME]``
from the files that hold its numbers (metrics/, plots/, records/states.json, bench/results/, params.yaml,
profiles/); ``--check`` rewrites nothing and fails, naming them, when a block differs from what its files
say (tests/test_docs.py runs it). Nothing else in those files is touched.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

import yaml

from pipeline.config import load_params
from pipeline.evaluation.rows import ROWS, label
from pipeline.io import atomic_path
from pipeline.profile import load_profile, profile_params
from pipeline.records import ledger, report, sweeps

DOCS = [Path("README.md"), *sorted(Path("docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S)
RESULTS = Path("bench/results")


def _json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def _state(params) -> dict | None:
    """The latest recorded state of exactly these params (any revision; params that change no result aside)."""
    want = sweeps.relevant(params)
    found = [s for s in ledger.states(ledger.experiment_of(params)) if all(ledger.param(s, k) == v for k, v in want.items())]
    return found[-1] if found else None


def results() -> str:
    """Test PPL per row and domain, the authors' recipe as a second MaskLLM row, seed ranges, gap closed."""
    params = load_params()
    authors = _state(profile_params("authors-recipe"))
    extra = {"MaskLLM, authors' recipe": authors["metrics"]} if authors else {}
    spread, seeds, note = report.seed_spread_or_note(params)
    text = report.table(Path("metrics"), params.evaluate.domains, params.data.source, spread, seeds, extra=extra)
    if not authors:
        text += ("\n\nThe authors' recipe row: not recorded yet "
                 "(`dvc exp run -n authors-recipe $(python -m pipeline.profile authors-recipe)`)")
    return text


def zeroshot() -> str:
    params = load_params()
    return report.zeroshot_table(Path("metrics"), params.evaluate.zeroshot_tasks, params.evaluate.domains)


def validation() -> str:
    """Validation PPL per row (what defaults are chosen on), and the choices the defaults rest on."""
    params = load_params()
    dataset = params.data.source
    states = sweeps.states(params, dataset)
    spread = sweeps.seed_spread(params, dataset, states)
    lines = [f"| setting | MaskLLM {dataset} validation PPL: mean (min–max) | seeds | against the defaults | reproduce |",
             "|---|---|---|---|---|"]
    base, missing = None, []  # the current defaults' values; the choices not recorded yet
    centre = ledger.flat_params(params)
    for name, overrides in CHOICES.items():
        point = _apply(params, overrides)
        runs = sweeps.seed_states(point, dataset, states) if point else []
        values = [r["metrics"][f"{sweeps.CHOICE}.maskllm.{dataset}"] for r in runs
                  if f"{sweeps.CHOICE}.maskllm.{dataset}" in r["metrics"]]
        if not values:
            missing.append(name)
            continue
        changed = {k: v for k, v in ledger.flat_params(point).items() if centre.get(k) != v}
        command = sweeps.command(changed)
        cell = f"{sum(values) / len(values):,.2f} ({min(values):,.2f}–{max(values):,.2f})"
        base = values if overrides == {} else base
        lines.append(f"| {name} | {cell} | {len(values)} | {verdict(values, base) if base else 'no defaults run'} | `{command}` |")
    refs = {r: spread.get(f"{sweeps.CHOICE}.{r}.{dataset}") for r in ("dense", "sparsegpt")}
    if missing:
        lines.append("\nNot run on validation yet (`make choices` queues them): " + "; ".join(missing) + ".")
    lines.append("\nReferences on the same split: " + ", ".join(
        f"{label(r)} {s['mean']:,.2f}" for r, s in refs.items() if s))
    return "\n".join(lines)


def verdict(values: list[float], base: list[float]) -> str:
    """How a setting's validation PPLs stand against the defaults': a difference is only called one when
    every seed of the one lies outside the range of the other's seeds."""
    if values is base:
        return "—"
    diff = sum(values) / len(values) - sum(base) / len(base)
    if min(values) > max(base):
        return f"worse by {diff:,.2f}, outside the defaults' seed range"
    if max(values) < min(base):
        return f"better by {-diff:,.2f}, outside the defaults' seed range"
    return f"{diff:+,.2f}, within the seed range: no difference"


# the choices the defaults were made on (docs/results.md), each against the current params
CHOICES = {
    "current defaults (params.yaml)": {},
    "learn.kappa 100 (the authors')": {"learn.kappa": 100.0},
    "learn.weight_reg 1e-5 (the authors')": {"learn.weight_reg": 1.0e-5},
    "AdamW betas (0.9, 0.95), eps 1e-5 (the authors')": {"learn.betas": [0.9, 0.95], "learn.eps": 1.0e-5},
    "learn.prior sparsegpt_noupdate (the authors')": {"learn.prior": "sparsegpt_noupdate"},
    "the authors' recipe (all of the above)": "authors-recipe",
}


def _apply(params, overrides):
    from pipeline.config import Params

    raw = params.model_dump(mode="json")
    items = load_profile(overrides) if isinstance(overrides, str) else overrides
    for dotted, value in items.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return Params.model_validate(raw)


def budget() -> str:
    path = Path("plots/sweeps/budget.md")
    if not path.is_file():
        return "Not recorded yet: `make budget` queues the runs."
    return path.read_text().split("\n\n", 2)[-1].strip()


def learn_curve() -> str:
    rows = list(csv.DictReader(Path("plots/learn_curve.csv").open()))
    first, last = rows[0], rows[-1]
    harden = _json("metrics/harden.json")
    learn = _json("metrics/learn.json")
    agree = ", ".join(f"{label(m)} {100 * v['agreement']:.1f} %" for m, v in harden.items()
                      if isinstance(v, dict) and "agreement" in v)
    return (f"- cross-entropy {float(first['ce']):.3f} at step {first['step']} -> {float(last['ce']):.3f} at step "
            f"{last['step']}; flip rate at the last log step {float(last['flip_rate']):.5f}; "
            f"agreement with the prior's candidates {100 * float(last['prior_agreement']):.1f} % of groups\n"
            f"- the hardened mask agrees, weight for weight, with: {agree}\n"
            f"- {learn['steps']} steps in {learn['seconds']:.0f} s ({learn['seconds'] / learn['steps']:.2f} s/step), "
            f"{learn['processes']} process(es), mask kernel `{learn['mask_kernel']}`, "
            f"on {learn['provenance']['device_name']}")


def stage_times() -> str:
    path = RESULTS / "repro_times.json"
    if not path.is_file():
        return "Not measured yet: `python -m bench.repro_times`."
    data = _json(path)
    lines = ["| stage | runs | seconds |", "|---|---|---|"]
    for group, (runs, seconds) in sorted(data["groups"].items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {group} | {runs} | {seconds:,.0f} |")
    lines.append(f"| **all** (`{data['command']}`, wall) | {data['stages']} | {data['wall_seconds']:,.0f} "
                 f"({data['wall_seconds'] / 60:.1f} min) |")
    return "\n".join(lines) + f"\n\nMeasured on {data['provenance']['device_name']}, {data['provenance']['threads']} threads."


def memory_table() -> str:
    data = _json(RESULTS / "memory_plan_table.json")
    gb = 1e9
    lines = ["| model | N:M | mask state (GB) | DDP: GPUs | FSDP: GPUs | FSDP: GB per GPU | host GB per 8-GPU node |",
             "|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        fsdp = row["fsdp"]
        lines.append(f"| {row['model']} | {row['nm']} | {row['mask_state_bytes'] / gb:,.1f} | "
                     f"{row['ddp']['gpus'] or 'no fit'} | {fsdp['gpus'] or 'no fit'} | "
                     f"{fsdp['per_rank_bytes'] / gb:,.1f} | {fsdp['host_per_node_bytes'] / gb:,.1f} |")
    return "\n".join(lines) + (f"\n\n{data['gpu_gb']:g} GB GPUs ({100 * data['headroom']:.0f} % usable), "
                               f"{data['dtype']} weights, {data['seqlen']} tokens and 1 sequence per GPU and forward, "
                               "activation checkpointing.")


def deviations() -> str:
    """Each setting where the default run departs from the authors' recipe: the paper, params.yaml, the profile."""
    paper, params = load_profile("paper"), ledger.flat_params(load_params())
    authors = load_profile("authors-recipe")
    lines = ["| setting | the authors (profiles/paper.yaml) | default (params.yaml) | authors-recipe profile | why the default differs |",
             "|---|---|---|---|---|"]
    for key, value in paper.items():
        mine = params.get(key)
        theirs = json.dumps(value) if isinstance(value, list) else str(value)
        if key in WHY and mine != theirs:
            row_auth = authors.get(key, "= default")
            lines.append(f"| `{key}` | {theirs} | {mine} | {row_auth} | {WHY[key]} |")
    return "\n".join(lines)


WHY = yaml.safe_load(Path(__file__).with_name("deviations.yaml").read_text())


def coverage() -> str:
    """Per architecture: the block weights under N:M, of the targets, what a Linear-only discovery covered."""
    data = _json(RESULTS / "coverage.json")
    lines = [f"| architecture | block weights under {data['pattern']} | of the targets | `nn.Linear` only | "
             "model sparsity | dense by design |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['arch']} | {100 * r['nm_fraction']:.1f} % | {100 * r['target_fraction']:.1f} % | "
                     f"{100 * r['linear_only_fraction']:.0f} % | {100 * r['model_sparsity']:.1f} % | "
                     f"{len(r['gates'])} router(s) |")
    return "\n".join(lines) + f"\n\n`python -m bench.coverage`, on {data['provenance']['device_name']}."


def layout() -> str:
    """The packages of pipeline/ with each module's first docstring line."""
    out = []
    for pkg in sorted(p for p in Path("pipeline").iterdir() if p.is_dir() and (p / "__init__.py").is_file()):
        names = sorted(f.stem for f in pkg.glob("*.py") if f.stem != "__init__")
        out.append(f"pipeline/{pkg.name + '/':12s} {', '.join(names)}")
    return "```\n" + "\n".join(out) + "\n```"


def profiles() -> str:
    """Each profile with what it is for (the first sentence of its own header comment)."""
    from pipeline.profile import PROFILES, purpose

    return "\n".join(["| profile | what it is for |", "|---|---|",
                      *(f"| `{path.stem}` | {purpose(path)} |" for path in sorted(PROFILES.glob("*.yaml")))])


BLOCKS = {"results": results, "zeroshot": zeroshot, "validation": validation, "budget": budget, "coverage": coverage,
          "learn-curve": learn_curve, "stage-times": stage_times, "memory-table": memory_table,
          "deviations": deviations, "layout": layout, "profiles": profiles}


def render(text: str) -> str:
    def one(m):
        if m.group("name") not in BLOCKS:
            raise ValueError(f"unknown generated block {m.group('name')!r}; known: {', '.join(BLOCKS)}")
        return m.group(1) + BLOCKS[m.group("name")]().rstrip() + "\n" + m.group(4)
    return BLOCK.sub(one, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 naming every stale block")
    args = ap.parse_args(argv)
    stale = []
    for path in DOCS:
        text = path.read_text()
        new = render(text)
        if new != text:
            stale += [f"{path}: {m.group('name')}" for m, n in zip(BLOCK.finditer(text), BLOCK.finditer(new))
                      if m.group(0) != n.group(0)]
            if not args.check:
                with atomic_path(path) as tmp:
                    tmp.write_text(new)
    if args.check and stale:
        print("generated blocks that differ from their files (run `python -m pipeline.records.docs`):\n  "
              + "\n  ".join(stale), file=sys.stderr)
        return 1
    print(f"{len(stale)} block(s) {'stale' if args.check else 'rewritten'} in {len(DOCS)} file(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

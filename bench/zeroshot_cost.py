"""What the zero-shot stages add to `make repro`: one zeroshot@<row>-<task> stage against one
evaluate@<row>-<domain> stage (the README's stage times are of the latter), as ratios measured
in one run, process start-up included (both run as DVC runs them: `python -m stages.X`).

    .venv/bin/python -m bench.zeroshot_cost --repeat 2          # the default params.yaml

In a scratch folder (artifacts/dense and artifacts/data linked from this checkout, the domain
stages run there), the two stages alternate ``--repeat`` times so that load from other processes
hits both alike; wall and CPU seconds (user + sys of the child) of each run are kept. The cost
of the default run's zero-shot stages is projected as ratio x the evaluate stage's time on an
idle machine (``--evaluate-idle-s``, the README's 85-100 s) x the number of rows.
Writes bench/results/zeroshot_cost.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from pipeline.config import load_params
from pipeline.provenance import provenance
from pipeline.evaluation.rows import ROWS

RESULTS = ROOT / "bench" / "results" / "zeroshot_cost.json"


def timed(cmd: list[str], cwd: Path, env: dict) -> dict:
    """Run one stage; its wall and CPU seconds, the load average before, its summary line."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary = next((line for line in res.stdout.splitlines() if line.startswith("[")), "")
    return {"wall_s": wall, "cpu_s": cpu, "load_before": load, "summary": summary}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--row", default="dense")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--evaluate-idle-s", type=float, nargs=2, default=(85.0, 100.0),
                    help="one evaluate stage alone on the reference machine (README)")
    args = ap.parse_args()
    params = load_params(args.params)
    ev = params.evaluate
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    py = [sys.executable, "-m"]
    with tempfile.TemporaryDirectory(prefix="zeroshot-cost-") as tmp:
        work = Path(tmp)
        (work / "artifacts").mkdir()
        for name in ("dense", "data"):
            (work / "artifacts" / name).symlink_to(ROOT / "artifacts" / name)
        shutil.copy(args.params, work / "params.yaml")
        for domain in ev.domains:
            timed(py + ["stages.domain", domain], work, env)
        runs = {"evaluate": [], "zeroshot": []}
        task = ev.zeroshot_tasks[0]
        for _ in range(args.repeat):
            runs["zeroshot"].append(timed(py + ["stages.zeroshot", args.row, task], work, env))
            runs["evaluate"].append(timed(py + ["stages.evaluate", args.row, params.data.source], work, env))
    ratio = {k: statistics.median(z[k] / e[k] for z, e in zip(runs["zeroshot"], runs["evaluate"]))
             for k in ("wall_s", "cpu_s")}
    lo, hi = sorted(ratio.values())
    per_stage = (lo * args.evaluate_idle_s[0], hi * args.evaluate_idle_s[1])
    rows = len(ROWS) * len(ev.zeroshot_tasks)
    out = {"params": {"zeroshot_tasks": ev.zeroshot_tasks, "zeroshot_limit": ev.zeroshot_limit,
                      "zeroshot_seqlen": ev.zeroshot_seqlen, "domains": ev.domains, "row": args.row},
           "runs": runs, "ratio_zeroshot_over_evaluate": ratio, "evaluate_idle_s": args.evaluate_idle_s,
           "projected_zeroshot_stage_idle_s": per_stage, "stages": rows,
           "projected_total_idle_s": (per_stage[0] * rows, per_stage[1] * rows),
           "provenance": provenance("cpu", ev.dtype)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"| run | stage | wall s | CPU s | load before |\n|---|---|---|---|---|")
    for i in range(args.repeat):
        for kind in ("zeroshot", "evaluate"):
            r = runs[kind][i]
            print(f"| {i + 1} | {kind} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['load_before']:.1f} |")
    print(f"\nzeroshot / evaluate (median): wall {ratio['wall_s']:.2f}, CPU {ratio['cpu_s']:.2f}")
    print(f"projected on an idle machine: {per_stage[0]:.0f}-{per_stage[1]:.0f} s per zero-shot stage, "
          f"{out['projected_total_idle_s'][0]:.0f}-{out['projected_total_idle_s'][1]:.0f} s for the {rows} "
          f"stages of the default run (budget 300 s) -> {RESULTS.relative_to(ROOT)}")
    for r in runs["zeroshot"][:1]:
        print(r["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

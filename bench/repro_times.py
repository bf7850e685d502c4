"""Wall time of `dvc repro` (or `make repro`) per stage, from the stages' own summary lines.

    python -m bench.repro_times                       # runs `dvc repro` here, prints a table, writes JSON
    python -m bench.repro_times --log repro.log       # reads the output of a run made already

Every stage ends with one line ``[stage name] summary (12.3 s)``; the groups are the stage kinds
(evaluate, zeroshot, prior, ...). Writes bench/results/repro_times.json (docs/reproducibility.md).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from pipeline.io import write_json
from pipeline.provenance import provenance

RESULTS = Path(__file__).resolve().parent / "results" / "repro_times.json"
SUMMARY = re.compile(r"^\[(?P<stage>[^\]]+)\] .*\((?P<seconds>[\d.]+) s\)$")


def parse(text: str) -> dict[str, list[float]]:
    """{stage kind: [seconds of each stage of that kind]} from a run's output."""
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        m = SUMMARY.match(line.strip())
        if m:
            out.setdefault(m.group("stage").split()[0], []).append(float(m.group("seconds")))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", help="the output of a run made already (its wall time: --wall)")
    ap.add_argument("--wall", type=float, help="with --log: the run's wall time in seconds")
    ap.add_argument("--command", default="dvc repro")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.log:
        text, wall = Path(args.log).read_text(), args.wall
    else:
        t0 = time.time()
        res = subprocess.run(args.command.split(), capture_output=True, text=True)
        text, wall = res.stdout + res.stderr, time.time() - t0
        if res.returncode:
            sys.exit(f"{args.command} failed ({res.returncode}):\n{text[-3000:]}")
    groups = {k: [len(v), sum(v)] for k, v in parse(text).items()}
    record = {"command": args.command, "wall_seconds": wall, "stages": sum(n for n, _ in groups.values()),
              "groups": groups, "provenance": provenance("cpu", "float32")}
    write_json(args.out, record)
    for k, (n, s) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        print(f"{k:12s} {n:3d} stage(s) {s:8.1f} s")
    print(f"{'all':12s} {record['stages']:3d} stage(s) {wall or 0:8.1f} s wall -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

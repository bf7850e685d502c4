"""Does `learn` give the same bits in every fresh process on this machine, with and without MKL's strict
reproducibility mode? ``python -m bench.determinism [--runs 3] [--out bench/results/determinism.json]``

Runs ``tests.determinism_probe`` (3 MaskLLM steps on SmolLM2-135M's widths and vocabulary, 2 blocks,
random weights) in fresh processes whose allocators hold different blocks (``junk`` 0, 1, 2, ...), once
with the stages' setting (``MKL_CBWR=AUTO,STRICT``, pipeline.stage.reproducible_math) and once with
MKL's default (``MKL_CBWR=AUTO``: code paths may depend on each buffer's alignment). Prints, per run,
the first step's CE, the logits' hash and whether both equal the first run's of that mode.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from pipeline.provenance import provenance

ROOT = Path(__file__).resolve().parent.parent
MODES = {"strict (the stages)": "AUTO,STRICT", "MKL default": "AUTO"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per mode (allocation histories 0..runs-1)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "determinism.json")
    args = ap.parse_args()
    from tests.determinism_probe import probe, save_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        save_model(model)
        for mode, cbwr in MODES.items():
            env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "MKL_CBWR": cbwr, "HF_HUB_OFFLINE": "1"}
            first = None
            for junk in range(args.runs):
                t0 = time.perf_counter()
                out = probe(model, junk, env)
                first = first or out
                rows.append({"mode": mode, "MKL_CBWR": cbwr, "junk": junk, "ce": out["ce"], "logits": out["logits"],
                             "same_as_first": out == first, "seconds": round(time.perf_counter() - t0, 1)})
    print(f"{'mode':<22} {'junk':>4} {'step-1 CE':>20} {'logits sha256':>14} {'= first run':>11}")
    for r in rows:
        print(f"{r['mode']:<22} {r['junk']:>4} {float.fromhex(r['ce'][0]):>20.15f} {r['logits'][:12]:>14} "
              f"{str(r['same_as_first']):>11}")
    result = {"provenance": {**provenance("cpu", "float32"), "threads": 2}, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    tmp_out.replace(args.out)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

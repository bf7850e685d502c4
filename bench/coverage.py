"""N:M coverage of every one-shot method on tiny random models of dense and MoE architectures.

    .venv/bin/python -m bench.coverage                       # SparseGPT 2:4 on every architecture
    .venv/bin/python -m bench.coverage --methods magnitude wanda sparsegpt

The architectures are the tests' (``tests/test_coverage.py: ARCHS``: 2 blocks, width 64,
4 experts). For each it prints the fraction of the block weights under N:M, the fraction
of the N:M targets covered (routers / gates are dense by design), the whole model's
sparsity, and what stays dense, next to what an nn.Linear-only discovery would have masked.
Writes bench/results/coverage.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from pipeline.model.coverage import check_coverage, measure_coverage
from pipeline.model.nm import _is_linear, block_weights
from pipeline.oneshot.prune import prune_oneshot
from pipeline.provenance import provenance
from tests.test_coverage import ARCHS, calib_tokens


def linear_only_fraction(model) -> float:
    """Share of the block weights an nn.Linear / Conv1D-only discovery (the old one) would mask."""
    weights = block_weights(model)
    linear = sum(numel for name, numel in weights.numel.items()
                 if name.endswith(".weight") and _is_linear(model.get_submodule(name.rpartition(".")[0])))
    return linear / sum(weights.numel.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["sparsegpt"])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--out", default="bench/results/coverage.json")
    args = parser.parse_args()
    rows = []
    print(f"{'architecture':<13}{'method':<11}{'N:M / block':>12}{'N:M / targets':>14}{'model sparsity':>15}"
          f"{'Linear-only':>12}  dense")
    for arch in args.archs:
        for method in args.methods:
            model = ARCHS[arch]()
            old = linear_only_fraction(model)
            start = time.perf_counter()
            result = prune_oneshot(model, method, calib_tokens(), 2, 4, batch_size=4, progress=False)
            cov = measure_coverage(model, result.masks, 2, 4)
            check_coverage(cov)
            dense = ", ".join(sorted({name.split(".", 3)[-1] for name in cov.gates})) or "-"
            rows.append({"arch": arch, "method": method, **cov.as_dict(), "linear_only_fraction": old,
                         "fallbacks": len(result.fallbacks), "seconds": time.perf_counter() - start})
            print(f"{arch:<13}{method:<11}{100 * cov.nm_fraction:>11.2f}%{100 * cov.target_fraction:>13.1f}%"
                  f"{100 * cov.model_sparsity:>14.1f}%{100 * old:>11.1f}%  {dense}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"pattern": "2:4", "rows": rows, "provenance": provenance("cpu", "float32")},
                              indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()

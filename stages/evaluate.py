"""DVC stage `evaluate@<row>-<domain>`: test perplexity of one method on one domain.

Results go to ``metrics/<row>/<domain>.json`` with their protocol and provenance (library
versions, device, dtype, threads); the track stage logs them to MLflow (idempotently: a cached
evaluation is still logged for a new pipeline state).
"""
import json
import sys
from pathlib import Path

from pipeline.data.tokens import load_tokens
from pipeline.evaluation.perplexity import perplexity
from pipeline.io import write_json
from pipeline.provenance import provenance
from pipeline.evaluation.row_model import build_row_model
from pipeline.stage import run_stage

DOMAINS = Path("artifacts/domains")


def main(params, row, domain):
    ev = params.evaluate
    stats = json.loads((DOMAINS / domain / "stats.json").read_text())
    tokens = load_tokens(DOMAINS / domain / "test.npy")
    model = build_row_model(row, ev.dtype)
    result = perplexity(model, tokens, ev.seqlen, ev.batch_size, ev.max_windows, desc=f"ppl {row} @ {domain}")
    protocol = {"dataset": domain, "in_domain": stats["in_domain"], "split": "test", "seqlen": ev.seqlen,
                "windows": result["windows"], "tokens": result["tokens"], "dtype": ev.dtype,
                "model": params.model.source, "train_dataset": params.data.source,
                "sparsity": "dense" if row == "dense" else f"{params.sparsity.n}:{params.sparsity.m}"}
    device = str(next(model.parameters()).device)
    write_json(Path("metrics") / row / f"{domain}.json", {"ppl": result["ppl"], "nll": result["nll"], "protocol": protocol,
                                                          "provenance": provenance(device, ev.dtype)})
    return (f"{row} @ {domain}: PPL {result['ppl']:.3f} ({result['windows']} x {ev.seqlen} tokens, "
            f"{'in' if stats['in_domain'] else 'out of'} domain, {ev.dtype})")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m stages.evaluate <row> <domain>")
    run_stage(f"evaluate {sys.argv[1]} @ {sys.argv[2]}", lambda p: main(p, sys.argv[1], sys.argv[2]))

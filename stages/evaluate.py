"""DVC stages `evaluate@<row>-<domain>` (test perplexity of one method on one domain) and
`validate@<row>` (its perplexity on the training corpus's validation split).

    python -m stages.evaluate ROW DOMAIN              # -> metrics/<row>/<domain>.json
    python -m stages.evaluate ROW SOURCE validation   # -> metrics/<row>/validation/<source>.json

Results go with their protocol and provenance (library versions, device, dtype, threads); the track
stage records them. Defaults and sweeps are chosen on validation; the results table reports test.
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

DATA, DOMAINS = Path("artifacts/data"), Path("artifacts/domains")
SPLITS = ("test", "validation")


def main(params, row, domain, split="test"):
    ev = params.evaluate
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: one of {SPLITS}")
    if split == "validation":  # the training corpus's own validation split
        if domain != params.data.source:
            raise ValueError(f"the validation split is data.source's ({params.data.source!r}), not {domain!r}")
        stats, tokens = {"in_domain": True}, load_tokens(DATA / "validation.npy")
        out = Path("metrics") / row / "validation" / f"{domain}.json"
    else:
        stats = json.loads((DOMAINS / domain / "stats.json").read_text())
        tokens, out = load_tokens(DOMAINS / domain / "test.npy"), Path("metrics") / row / f"{domain}.json"
    model = build_row_model(row, ev.dtype)
    result = perplexity(model, tokens, ev.seqlen, ev.batch_size, ev.max_windows, desc=f"ppl {row} @ {domain} {split}")
    protocol = {"dataset": domain, "in_domain": stats["in_domain"], "split": split, "seqlen": ev.seqlen,
                "windows": result["windows"], "tokens": result["tokens"], "dtype": ev.dtype,
                "model": params.model.source, "train_dataset": params.data.source,
                "sparsity": "dense" if row == "dense" else f"{params.sparsity.n}:{params.sparsity.m}"}
    device = str(next(model.parameters()).device)
    write_json(out, {"ppl": result["ppl"], "nll": result["nll"], "protocol": protocol,
                     "provenance": provenance(device, ev.dtype)})
    return (f"{row} @ {domain} {split}: PPL {result['ppl']:.3f} ({result['windows']} x {ev.seqlen} tokens, "
            f"{'in' if stats['in_domain'] else 'out of'} domain, {ev.dtype})")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit("usage: python -m stages.evaluate <row> <domain> [validation]")
    run_stage(f"evaluate {' '.join(sys.argv[1:])}", lambda p: main(p, *sys.argv[1:]))

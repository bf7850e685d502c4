"""DVC stage `evaluate@<row>`: test perplexity of one method under the shared protocol."""
import json
import sys
from pathlib import Path

from pipeline.data import load_tokens
from pipeline.evaluate import perplexity
from pipeline.io import write_json
from pipeline.rows import build_row_model
from pipeline.stage import run_stage
from pipeline.tracking import experiment_name, start_run

DATA = Path("artifacts/data")


def main(params, row):
    ev = params.evaluate
    stats = json.loads((DATA / "stats.json").read_text())
    model = build_row_model(row, ev.dtype)
    tokens = load_tokens(DATA / "test.npy")
    result = perplexity(model, tokens, ev.seqlen, ev.batch_size, ev.max_windows, desc=f"ppl {row}")
    protocol = {"dataset": stats["source"], "split": "test", "seqlen": ev.seqlen, "windows": result["windows"],
                "tokens": result["tokens"], "dtype": ev.dtype, "model": params.model.source,
                "sparsity": "dense" if row == "dense" else f"{params.sparsity.n}:{params.sparsity.m}"}
    metrics = {"ppl": result["ppl"], "nll": result["nll"], "protocol": protocol}
    exp = experiment_name(params.model.source, stats["source"], params.sparsity.n, params.sparsity.m)
    with start_run(exp, row, tags={"method": row}):
        import mlflow

        mlflow.log_params(protocol)
        mlflow.log_metrics({"ppl": result["ppl"], "nll": result["nll"]})
    write_json(Path("metrics") / f"{row}.json", metrics)
    return f"{row}: PPL {result['ppl']:.3f} on {stats['source']} test ({result['windows']} x {ev.seqlen} tokens, {ev.dtype})"


if __name__ == "__main__":
    row = sys.argv[1] if len(sys.argv) > 1 else "dense"
    run_stage(f"evaluate {row}", lambda p: main(p, row))

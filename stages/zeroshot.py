"""DVC stage `zeroshot@<row>-<task>`: zero-shot accuracy of one row on one lm-eval task.

``task`` is an entry of evaluate.zeroshot_tasks: ``lastword`` (every domain's LAMBADA-style
last-word task, in one process: start-up costs more than a task here), ``lastword_<domain>``
or a hub task. Results go to ``metrics/<row>/zeroshot/<task>.json``; the track stage logs them
to MLflow.
"""
import sys
from pathlib import Path

from pipeline.evaluation import zeroshot
from pipeline.io import write_json
from pipeline.model.loading import default_device  # torch before run_stage: its flush-to-zero reaches torch's threads
from pipeline.provenance import provenance
from pipeline.evaluation.row_model import build_row_model
from pipeline.evaluation.rows import DENSE
from pipeline.stage import run_stage
from pipeline.model.tokenizer import load_tokenizer


def main(params, row, task):
    ev = params.evaluate
    if task not in ev.zeroshot_tasks:
        raise zeroshot.ZeroShotError(f"zero-shot task {task!r} is not in evaluate.zeroshot_tasks {ev.zeroshot_tasks}")
    names = zeroshot.leaves(task, ev.domains)
    tasks = zeroshot.load_tasks(names, ev.zeroshot_data)  # a hub task offline stops here, before the model
    model = build_row_model(row, ev.dtype)
    # as many tokens per forward as the perplexity evaluation (the same memory)
    batch_size = max(1, ev.batch_size * ev.seqlen // ev.zeroshot_seqlen)
    results = zeroshot.evaluate(model, load_tokenizer(DENSE), tasks, ev.zeroshot_limit, ev.zeroshot_seqlen, batch_size)
    summary = zeroshot.summarize(results)
    write_json(Path("metrics") / row / "zeroshot" / f"{task}.json", {
        "task": task, "harness": f"lm-eval {results['lm_eval_version']}", "limit": ev.zeroshot_limit,
        "results": summary,
        "protocol": {"row": row, "model": params.model.source, "train_dataset": params.data.source,
                     "sparsity": "dense" if row == "dense" else f"{params.sparsity.n}:{params.sparsity.m}",
                     "seqlen": ev.zeroshot_seqlen, "num_fewshot": 0, "batch_size": batch_size, "dtype": ev.dtype,
                     "local_data": {n: ev.zeroshot_data[n] for n in names if n in ev.zeroshot_data}},
        "provenance": provenance(default_device(), ev.dtype)})
    return f"{row} @ {task}: " + ", ".join(
        f"{n} acc {r['metrics']['acc']:.3f} ± {r['stderr'].get('acc') or 0:.3f} (n={r['examples']})"
        for n, r in summary.items() if "acc" in r["metrics"])


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m stages.zeroshot <row> <task>")
    run_stage(f"zeroshot {sys.argv[1]} @ {sys.argv[2]}", lambda p: main(p, sys.argv[1], sys.argv[2]))

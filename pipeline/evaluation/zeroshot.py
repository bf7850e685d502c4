"""Zero-shot accuracy through lm-evaluation-harness, on a row's masked model built in memory.

Tasks are lm-eval tasks, loaded by name through its ``TaskManager``:
- embedded (``tasks/*.yaml``, the include path): ``lastword_<domain>``, LAMBADA-style last word
  on the test articles a ``domain@`` stage wrote (pipeline/evaluation/lastword.py); offline;
- the MaskLLM paper's hub tasks (``config.HUB_TASKS``), lm-eval's own definitions: their datasets
  come from the hub, or from a local copy (``evaluate.zeroshot_data``) through a YAML that
  includes lm-eval's and changes only where the data is read from.
A hub task that can be neither downloaded nor read from the cache or a local copy stops the
stage before the model is built, with the fix in the message.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.config import HUB_TASKS, zeroshot_leaves

TASKS_DIR = Path(__file__).resolve().parents[2] / "tasks"  # the embedded task YAMLs
# where lm-eval (pinned in pyproject.toml) defines the hub tasks: indexing only these folders takes
# milliseconds, all of its ~200 task folders tens of seconds
HUB_FOLDERS = {"hellaswag": "hellaswag", "piqa": "piqa", "arc_easy": "arc", "arc_challenge": "arc",
               "winogrande": "winogrande", "boolq": "super_glue/boolq"}
BOOTSTRAP_ITERS = 1000  # resamples for the perplexity's standard error (lm-eval's default 100000 takes minutes)


class ZeroShotError(RuntimeError):
    """A task cannot run here (hub unreachable, no local copy); the message names the fix."""


def leaves(task: str, domains: list[str]) -> list[str]:
    """An entry of evaluate.zeroshot_tasks -> the lm-eval tasks it runs."""
    return zeroshot_leaves(task, domains)


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be used from here (None if it can), in seconds, not minutes."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as e:
        return f"{endpoint} is unreachable ({getattr(e, 'reason', e)})"


def go_offline() -> None:
    """Read hub datasets from the local cache only: a missing one then fails at once."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    # both libraries read the flag when imported; a process that imported them already is told too
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True


def _fix(task: str, reason: str) -> str:
    return (f"zero-shot task {task!r} needs its dataset from the Hugging Face hub, and {reason}; "
            f"it is not in the local cache either. Fix: run on a machine that reaches the hub (the dataset "
            f"is cached there for later offline runs), or set evaluate.zeroshot_data.{task} to a local copy "
            f"(a folder with the task's splits as data files, e.g. validation.jsonl, in the hub dataset's "
            f"format), or remove {task!r} from evaluate.zeroshot_tasks")


def _local_yaml(task: str, manager, local: str, folder: Path) -> Path:
    """A task YAML that includes lm-eval's definition of ``task`` and reads ``local`` instead of the hub."""
    import yaml

    entry = manager.task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise ZeroShotError(f"lm-eval {harness_version()} has no task {task!r}")
    if not Path(local).exists():
        raise FileNotFoundError(f"evaluate.zeroshot_data.{task}: {local} does not exist")
    path = folder / f"{task}.yaml"
    path.write_text(yaml.safe_dump({"include": str(entry.yaml_path), "task": task,
                                    "dataset_path": str(Path(local).resolve()), "dataset_name": None}))
    return path


def task_manager(names: list[str]):
    """lm-eval's TaskManager over the embedded tasks and the folders of the hub tasks in ``names``."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    own = Path(lm_eval.tasks.__file__).parent
    folders = sorted({str(own / HUB_FOLDERS[t]) for t in names if t in HUB_FOLDERS})
    return TaskManager(include_path=[str(TASKS_DIR), *folders], include_defaults=False)


def harness_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def check_lastword(name: str, domains: Path = Path("artifacts/domains")) -> None:
    """A ``lastword_<domain>`` task needs passages: a domain whose test text has none (no sentence
    ending in a plain word after enough context) is refused by name, not left to fail in lm-eval."""
    from pipeline.evaluation.lastword import MIN_CONTEXT_WORDS, interleave

    domain = name.removeprefix("lastword_")
    f = domains / domain / "test.jsonl"
    if not f.is_file():
        return  # lm-eval names the missing file
    articles = [json.loads(line)["text"] for line in f.read_text().splitlines() if line.strip()]
    if not interleave(articles):
        raise ZeroShotError(
            f"{name}: the test text of domain {domain!r} ({f}, {len(articles)} article(s)) holds no last-word "
            f"passage (a sentence ending in a plain word of 3+ letters after {MIN_CONTEXT_WORDS}+ words); "
            f"list the other tasks in evaluate.zeroshot_tasks instead of 'lastword', e.g. "
            f"[{', '.join(t for t in ('lastword_wiki', 'lastword_shakespeare') if t != name)}]")


def load_tasks(names: list[str], local: dict[str, str] | None = None) -> dict:
    """lm-eval task objects, datasets loaded -> {name: Task}; hub tasks fail fast with the fix."""
    local = local or {}
    hub = [t for t in names if t in HUB_TASKS and t not in local]
    reason = hub_unreachable() if hub else None
    if reason:
        go_offline()  # a dataset cached on an earlier online run still works
    manager = task_manager(names)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = {}
        for name in names:
            if name.startswith("lastword_"):
                check_lastword(name)
            spec = str(_local_yaml(name, manager, local[name], Path(tmp))) if name in local else name
            try:
                tasks.update(manager.load([spec])["tasks"])
            except Exception as e:  # datasets raises many kinds (connection, not found, offline)
                if name in hub:
                    raise ZeroShotError(_fix(name, reason or f"loading it failed ({type(e).__name__}: {e})")) from None
                if name in local:
                    cfg = manager.task_index[name].cfg or {}
                    splits = [cfg[k] for k in ("training_split", "validation_split", "test_split") if cfg.get(k)]
                    raise ZeroShotError(
                        f"evaluate.zeroshot_data.{name}: cannot read {local[name]} as the {name} dataset "
                        f"({type(e).__name__}: {e}); lm-eval's {name} reads the splits {splits} of "
                        f"{cfg.get('dataset_path')}: give each as a data file named after it "
                        f"(e.g. {splits[0] if splits else 'test'}.jsonl) with that dataset's columns") from None
                raise
    missing = [n for n in names if n not in tasks]
    if missing:
        raise ZeroShotError(f"lm-eval loaded no task named {missing} (from {TASKS_DIR} and its own tasks)")
    return tasks


class _DropTruncation(logging.Filter):
    """Contexts longer than evaluate.zeroshot_seqlen are cut on purpose: not one warning per example."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Combined length of context")


def evaluate(model, tokenizer, tasks: dict, limit: int | None, seqlen: int, batch_size: int) -> dict:
    """lm-eval's ``simple_evaluate`` of the in-memory ``model`` on loaded ``tasks`` -> its results dict."""
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # the bootstrap in-process: no pool of forked copies
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval.models.huggingface").addFilter(_DropTruncation())
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=seqlen)
    # the tasks are built already: a manager without lm-eval's own index, which takes seconds to build
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    try:
        return simple_evaluate(lm, tasks=list(tasks.values()), num_fewshot=0, limit=limit,
                               bootstrap_iters=BOOTSTRAP_ITERS, log_samples=True, task_manager=manager)
    except AssertionError as e:  # HFLM cuts contexts, never an answer: it asserts one fits
        raise ZeroShotError(f"an answer of {sorted(tasks)} has more tokens than the context length "
                            f"evaluate.zeroshot_seqlen={seqlen}: raise it until the longest answer fits "
                            f"(the hub tasks' answers are sentences, not words)") from e


def chance(samples: list[dict], output_type: str) -> float | None:
    """Accuracy of a uniform guess: mean of 1 / choices over the examples (multiple choice only)."""
    if output_type != "multiple_choice" or not samples:
        return None
    return sum(1 / len(s["arguments"]) for s in samples) / len(samples)


def summarize(results: dict) -> dict[str, dict]:
    """lm-eval's results -> per task: version, examples, metrics and their standard errors, chance."""
    out = {}
    for task, res in results["results"].items():
        metrics = {k.split(",")[0]: v for k, v in res.items()
                   if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
        stderr = {k.split(",")[0].replace("_stderr", ""): (v if isinstance(v, (int, float)) else None)
                  for k, v in res.items() if "_stderr," in k}
        output_type = results["configs"][task]["output_type"]
        out[task] = {"version": results["versions"][task], "output_type": output_type,
                     "examples": results["n-samples"][task]["effective"],
                     "examples_available": results["n-samples"][task]["original"],
                     "metrics": metrics, "stderr": stderr,
                     "chance": chance(results.get("samples", {}).get(task, []), output_type)}
    return out

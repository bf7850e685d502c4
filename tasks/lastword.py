"""lm-eval hooks of the lastword_* tasks: test articles -> LAMBADA-style passages."""
import datasets

from pipeline.evaluation.lastword import interleave


def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Articles ``{"text"}`` -> passages ``{"text"}``, round-robin over articles (see pipeline/evaluation/lastword.py)."""
    return datasets.Dataset.from_dict({"text": interleave(list(dataset["text"]))})

"""DVC stage `domain@<name>`: the test text of one evaluation domain, in the model's tokens
(``test.npy``, for perplexity) and as articles (``test.jsonl``, for the zero-shot tasks).

The training domain's test split is the data stage's own (the same articles); any other
domain is held out from a corpus no stage trains on, split the same way (article level,
``data.test_fraction``, ``data.seed``).
"""
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.data.corpora import load_corpus, split_corpus

from pipeline.data.tokens import DataError, tokenize
from pipeline.io import atomic_dir, write_json
from pipeline.stage import run_stage
from pipeline.model.tokenizer import load_tokenizer

DATA, OUT = Path("artifacts/data"), Path("artifacts/domains")


def main(params, domain):
    d = params.data
    in_domain = domain == d.source
    if in_domain:
        data_stats = json.loads((DATA / "stats.json").read_text())
        ids = np.load(DATA / "test.npy")
        stats = {"licence": data_stats["licence"], "source_sha256": data_stats["source_sha256"],
                 "articles": data_stats["test"]["articles"]}
        # --- zero-shot tasks read the test articles as text: the data stage's very split ---
        test = split_corpus(load_corpus(domain, d.hf_path, d.pydocs_path), d.test_fraction, d.seed,
                            d.max_articles, d.validation_fraction)["test"]
        if not np.array_equal(tokenize(load_tokenizer(DATA / "tokenizer"), test), ids):
            raise DataError(f"{DATA / 'test.npy'} is not the test split of the current data params: "
                             "run `dvc repro data` first")
        # ---
    else:
        corpus = load_corpus(domain, None, d.pydocs_path)
        test = split_corpus(corpus, d.test_fraction, d.seed)["test"]
        ids = tokenize(load_tokenizer(DATA / "tokenizer"), test)
        stats = {"licence": corpus.licence, "source_sha256": corpus.source_hash, "articles": len(test)}
    stats.update({"domain": domain, "in_domain": in_domain, "tokens": int(ids.size)})
    with atomic_dir(OUT / domain) as tmp:
        np.save(tmp / "test.npy", ids)
        # the test articles as text, one {"text"} per line: the lastword_<domain> zero-shot tasks
        (tmp / "test.jsonl").write_text("".join(json.dumps({"text": a}) + "\n" for a in test), encoding="utf-8")
        write_json(tmp / "stats.json", stats)
    kind = "in-domain" if in_domain else "out-of-domain"
    return f"{domain} ({kind}): {stats['articles']} test articles, {stats['tokens']:,} tokens"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m stages.domain <domain>")
    run_stage(f"domain {sys.argv[1]}", lambda p: main(p, sys.argv[1]))

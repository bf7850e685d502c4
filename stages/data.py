"""DVC stage `data`: corpus -> article-level train / validation / test split -> tokenizer -> token arrays + stats."""
from pathlib import Path

from pipeline.data.corpora import load_corpus, split_corpus
from pipeline.data.tokens import tokenize, write_split
from pipeline.io import atomic_dir, write_json
from pipeline.stage import run_stage
from pipeline.model.tokenizer import build_tokenizer

OUT = Path("artifacts/data")


def main(params):
    d = params.data
    corpus = load_corpus(d.source, d.hf_path, d.pydocs_path)
    splits = split_corpus(corpus, d.test_fraction, d.seed, d.max_articles, d.validation_fraction)
    tokenizer = build_tokenizer(params, splits["train"])
    stats = {"source": corpus.name, "licence": corpus.licence, "source_sha256": corpus.source_hash,
             "tokenizer": type(tokenizer).__name__, "vocab_size": len(tokenizer)}
    with atomic_dir(OUT) as tmp:
        tokenizer.save_pretrained(tmp / "tokenizer")
        for split, docs in splits.items():
            ids = tokenize(tokenizer, docs)
            write_split(tmp, split, ids)
            stats[split] = {"articles": len(docs), "tokens": int(ids.size)}
        write_json(tmp / "stats.json", stats)
    return f"{corpus.name}: " + ", ".join(f"{s} {stats[s]['articles']} articles / {stats[s]['tokens']:,} tokens"
                                          for s in ("train", "validation", "test"))


if __name__ == "__main__":
    run_stage("data", main)

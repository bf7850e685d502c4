"""Corpora, the article-level split, tokens and windows."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.corpora import load_corpus, load_shakespeare, load_wiki, split_articles, split_corpus
from pipeline.data.tokens import DataError, sample_windows, tokenize, windows


def test_wiki_is_the_embedded_10033_articles():
    corpus = load_wiki()
    assert len(corpus.articles) == 10033
    assert all(isinstance(a, str) and a for a in corpus.articles)
    assert len(corpus.source_hash) == 64 and "CC BY-SA" in corpus.licence


def test_shakespeare_one_article_per_scene():
    corpus = load_shakespeare()
    assert len(corpus.articles) > 500  # ~37 plays x ~20 scenes
    hamlet = [a for a in corpus.articles if a.startswith("Hamlet, ACT I, SCENE I.")]
    assert len(hamlet) == 1 and "Who's there?" in hamlet[0]
    assert "**" not in hamlet[0]  # markdown emphasis stripped


@settings(max_examples=40, deadline=None)
@given(n=st.integers(20, 3000), frac=st.floats(0.01, 0.4), seed=st.integers(0, 10**6))
def test_split_is_disjoint_complete_and_deterministic(n, frac, seed):
    train, validation, test = split_articles(n, frac, seed, validation_fraction=frac)
    assert set(train).isdisjoint(test) and set(train).isdisjoint(validation) and set(validation).isdisjoint(test)
    assert len(train) + len(validation) + len(test) == n
    assert len(test) == len(validation) == max(1, round(frac * n))
    again = split_articles(n, frac, seed, validation_fraction=frac)
    assert all(np.array_equal(a, b) for a, b in zip((train, validation, test), again))
    # the validation split takes articles from train only: the test split is the one without it
    assert np.array_equal(split_articles(n, frac, seed)[2], test) and len(split_articles(n, frac, seed)[1]) == 0


def test_wiki_split_has_no_test_article_in_train():
    corpus = load_wiki()
    splits = split_corpus(corpus, 0.02, seed=0)
    assert len(splits["test"]) == 201
    assert not set(splits["test"]) & set(splits["train"])


def test_max_articles_caps_before_the_split():
    splits = split_corpus(load_wiki(), 0.1, seed=0, max_articles=100)
    assert (len(splits["train"]), len(splits["test"])) == (90, 10)


def test_hub_source_with_local_stand_in(tmp_path):
    # Same code path as the hub (datasets.load_dataset), pointed at local json files.
    import json

    for split, n in (("train", 30), ("validation", 4), ("test", 5)):
        rows = [{"text": f"{split} line {i}"} for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    corpus = load_corpus("wikitext2", str(tmp_path))
    assert len(corpus.presplit["train"]) == 30 and corpus.presplit["test"][0] == "test line 0"
    splits = split_corpus(corpus, 0.02, 0, validation_fraction=0.02)
    assert splits == corpus.presplit  # hub corpora keep their own splits
    (tmp_path / "validation.jsonl").unlink()
    with pytest.raises(DataError, match="has no split 'validation'.*data.hf_path needs splits"):
        load_corpus("wikitext2", str(tmp_path))


def test_hub_source_offline_error_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="data.hf_path"):
        load_corpus("c4", str(tmp_path / "missing"))


class CharTokenizer:
    def __call__(self, text, return_attention_mask=False):
        return {"input_ids": [ord(c) for c in text]}


def test_tokenize_joins_with_blank_line():
    ids = tokenize(CharTokenizer(), ["ab", "c"])
    assert ids.dtype == np.uint32 and "".join(map(chr, ids)) == "ab\n\nc"


def test_windows_drop_the_tail_and_sample_is_seeded():
    t = torch.arange(10)
    assert windows(t, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    a, b = sample_windows(torch.arange(1000), 4, 16, seed=1), sample_windows(torch.arange(1000), 4, 16, seed=1)
    assert torch.equal(a, b) and a.shape == (4, 16)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 15, dtype=torch.long))


def test_pydocs_reads_rst_sources_one_article_per_file(tmp_path):
    from pipeline.data.corpora import load_pydocs

    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "os.rst.txt").write_text(":mod:`os` --- Miscellaneous interfaces\n====\n")
    (tmp_path / "tutorial.rst.txt").write_text("An Informal Introduction\n****\n")
    (tmp_path / "notes.txt").write_text("not a doc source")
    corpus = load_pydocs(str(tmp_path))
    assert corpus.name == "pydocs" and len(corpus.articles) == 2
    assert corpus.articles[0].startswith(":mod:`os`")  # sorted by path: library/ before tutorial
    with pytest.raises(DataError, match="data.pydocs_path.*python3.11-doc.*evaluate.domains"):
        load_pydocs(str(tmp_path / "missing"))

"""LAMBADA-style last-word passages (pipeline/evaluation/lastword.py): hand-checked cases and invariants."""
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.evaluation.lastword import TARGET, interleave, passages, split_target

WORDS = " ".join(f"w{i}" for i in range(20))  # 20 context words that are never targets (digits)


def test_passages_by_hand():
    article = f"{WORDS} and then the cat sat. Next it ran away! Was it fast? Yes: 42. Mr. X met Dr. Who."
    got = passages(article, max_words=400, min_words=20)
    # targets: sentence ends on plain words of 3+ letters preceded by a space: "sat", "away",
    # "fast", "Who"; not "42" (digits) nor "Mr" / "Dr" (2 letters); "X" is not followed by a full stop
    assert [split_target(p)[1] for p in got] == [" sat", " away", " fast", " Who"]
    assert got[0] == f"{WORDS} and then the cat sat"
    assert got[1] == f"{WORDS} and then the cat sat. Next it ran away"


def test_context_needs_min_words_and_is_cut_to_max_words():
    article = "one two three four five six. " + WORDS + " last words here."
    # "six" has 5 context words, "here" 28
    assert passages(article, min_words=30) == []
    assert passages(article, max_words=5, min_words=5) == ["one two three four five six", "w17 w18 w19 last words here"]
    assert passages(article, max_words=40, min_words=6) == [article[:-len(".")]]


def test_context_cut_keeps_the_article_whitespace():
    article = "alpha beta\ngamma  delta epsilon zeta eta theta."
    assert passages(article, max_words=5, min_words=3) == ["gamma  delta epsilon zeta eta theta"]
    assert passages(article, max_words=3, min_words=3) == ["epsilon zeta eta theta"]


def test_split_target_matches_the_lambada_template():
    """lm-eval's lambada_openai: doc_to_text = text.split(' ')[:-1] joined by ' ', target ' ' + last word."""
    text = "Line one.\nThe  dog barked at the mailman"
    context, target = split_target(text)
    assert context == " ".join(text.split(" ")[:-1]) and target == " " + text.split(" ")[-1]


article = st.lists(st.sampled_from(["the", "cat", "dog", "sat.", "ran!", "why?", "42.", "Mr.", "a", "\n", "went", "home."]),
                   min_size=0, max_size=120).map(" ".join)


@settings(max_examples=200, deadline=None)
@given(article, st.integers(1, 30), st.integers(0, 10))
def test_every_passage_is_article_text_ending_on_a_sentence_final_word(text, max_words, min_words):
    for p in passages(text, max_words=max_words, min_words=min_words):
        context, target = split_target(p)
        word = target[1:]
        assert re.fullmatch(r"[A-Za-z]{3,}", word)
        at = text.find(p)
        assert at >= 0, "a passage is a verbatim piece of its article"
        assert re.match(r"[.!?](\s|$)", text[at + len(p):]), "the target ends a sentence"
        assert min(min_words, max_words) <= len(context.split()) <= max_words


@settings(max_examples=100, deadline=None)
@given(st.lists(article, min_size=1, max_size=8), st.integers(0, 3))
def test_interleave_is_a_seeded_permutation_of_all_passages(articles, seed):
    got = interleave(articles, seed)
    assert sorted(got) == sorted(p for a in articles for p in passages(a))
    assert got == interleave(articles, seed)  # deterministic


def test_interleave_takes_one_passage_of_every_article_before_a_second_of_any():
    def article(tag, n):  # n sentences whose targets carry the article's tag
        return " ".join(f"{WORDS} {tag}{'x' * (i + 2)}." for i in range(n))

    articles = [article("aaa", 3), article("bbb", 1), article("ccc", 2)]
    got = [split_target(p)[1][1:4] for p in interleave(articles, seed=0)]
    assert sorted(got[:3]) == ["aaa", "bbb", "ccc"] and sorted(got[3:5]) == ["aaa", "ccc"] and got[5:] == ["aaa"]
    assert interleave(articles, seed=1) != interleave(articles, seed=0)  # the order is the seed's


def test_target_pattern_needs_a_space_before_the_word():
    assert TARGET.search("x\nword.") is None and TARGET.search("x word.").group(1) == "word"

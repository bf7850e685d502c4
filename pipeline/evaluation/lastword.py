"""LAMBADA-style last-word passages cut from a domain's test articles (the `lastword_*` tasks).

LAMBADA (Paperno et al., 2016) asks a model for the final word of a passage; lm-eval scores it
as the log-likelihood of ``" " + word`` after the passage's other words (accuracy: is the word
the greedy continuation; perplexity: exp of the mean negative log-likelihood of the word).
Here a passage ends where a sentence of a test article ends on an ordinary word: the target is
that word without its full stop, the context the article's text before it (at most
``max_words`` words; the model wrapper cuts it further to its context length, from the left).
Passages are in the LAMBADA format (one ``text`` field, the target after the last space), so
the task YAML is lm-eval's own ``lambada_openai`` template.
"""
from __future__ import annotations

import random
import re
from bisect import bisect_left
from itertools import zip_longest

# A target: a plain word of 3+ letters (no digits, no markup, not "Mr"), preceded by one space
# and followed by the end of a sentence (., ! or ? then whitespace or the end of the article).
TARGET = re.compile(r"(?<=\S) ([A-Za-z]{3,})[.!?](?=\s|$)")
MIN_CONTEXT_WORDS = 20  # a last word needs something to be predicted from
MAX_CONTEXT_WORDS = 400  # beyond any context length used here; bounds the tokenizer's work


def passages(article: str, max_words: int = MAX_CONTEXT_WORDS, min_words: int = MIN_CONTEXT_WORDS) -> list[str]:
    """Every LAMBADA-style passage of one article -> ``["<context> <target>", ...]``, in text order."""
    out = []
    starts = [m.start() for m in re.finditer(r"\S+", article)]
    for m in TARGET.finditer(article):
        n = bisect_left(starts, m.start())  # words in the context
        if n < min_words:
            continue
        start = starts[max(0, n - max_words)]
        out.append(f"{article[start:m.start()]} {m.group(1)}")
    return out


def split_target(text: str) -> tuple[str, str]:
    """A passage -> (context, target with its leading space): what lm-eval's template computes."""
    context, word = text.rsplit(" ", 1)
    return context, f" {word}"


def interleave(articles: list[str], seed: int = 0) -> list[str]:
    """All passages, round-robin over articles in a seeded order, so that the first N passages
    (lm-eval's ``limit``) come from as many different articles as possible."""
    rng = random.Random(seed)
    per_article = [passages(a) for a in articles]
    for ps in per_article:
        rng.shuffle(ps)
    rng.shuffle(per_article)
    return [p for rnd in zip_longest(*per_article) for p in rnd if p is not None]

"""BM25 over chunks, through `bm25s`.

Terms are words, not the model's tokens: a BPE tokenizer splits names into pieces that match
unrelated words, which is what lexical retrieval must not do. `terms()` lower-cases, keeps
runs of two or more word characters (scikit-learn's rule, bm25s's default) and drops English
stop words (bm25s's English list), so "What is the capital of Arvia?" searches for
["what", "capital", "arvia"].

Scores are bm25s's Lucene variant (Kamphuis et al. 2020):

    score(q, d) = sum over terms t of q in d:  idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl))
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def terms(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, lower=True, stopwords="en", return_ids=False, show_progress=False)


def build(term_lists: list[list[str]], *, k1: float, b: float):
    """A bm25s index of the chunks, in order (row i = chunk i)."""
    import bm25s

    bm25 = bm25s.BM25(k1=k1, b=b, method="lucene")
    bm25.index(term_lists, show_progress=False)
    return bm25


def search(bm25, query_terms: list[str], k: int) -> list[tuple[int, float]]:
    """The best `k` rows with a positive score, best first (ties: lower row first)."""
    n = bm25.scores["num_docs"]
    known = [t for t in query_terms if t in bm25.vocab_dict]
    if not known or n == 0:
        return []
    scores = bm25.get_scores(known)
    k = min(k, n)
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.lexsort((top, -scores[top]))]
    return [(int(i), float(scores[i])) for i in top if scores[i] > 0]


def save(bm25, folder: Path) -> None:
    bm25.save(str(folder), show_progress=False)


def load(folder: Path):
    import bm25s

    return bm25s.BM25.load(str(folder), load_corpus=False, mmap=False)

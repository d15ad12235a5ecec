"""Retrieval quality on questions whose gold passage is known: recall@k and MRR.

A question row names its gold passage by `evidence` (text that the passage must contain,
compared after casefolding and collapsing whitespace) or by `source` (the document key or
file path it must come from); a retrieved passage is relevant if it matches.

    recall@k = share of questions with a relevant passage among the first k retrieved
    MRR      = mean over questions of 1 / rank of the first relevant passage (0 if none retrieved)
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.data.formats import OnBadRows, ReadStats, iter_records
from lmforge.errors import LmforgeError
from lmforge.retrieval.index import Index, Passage


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answer: str | None  # None: the documents cannot answer it
    evidence: str | None = None
    source: str | None = None
    where: str = ""


def read_questions(path: str, *, on_bad_rows: OnBadRows = "error", stats: ReadStats | None = None) -> list[Question]:
    """Rows {question, answer (null/absent = unanswerable), evidence?, source?, id?}; a malformed
    row is one error naming file, line and field (or, with on_bad_rows skip, a counted skip)."""
    from lmforge.data.formats import BadRows

    stats = stats if stats is not None else ReadStats()
    bad = BadRows(on_bad_rows, stats)
    out: list[Question] = []
    for rec in iter_records(path, on_bad_rows=on_bad_rows, stats=stats):
        v = rec.values
        problem = _problem(v)
        if problem:
            bad("malformed question", f"{rec.where}: {problem}")
            continue
        out.append(Question(str(v.get("id", f"q{len(out):04d}")), v["question"], v.get("answer"),
                            v.get("evidence"), v.get("source"), rec.where))
    if not out:
        raise LmforgeError(f"The question file {path} holds no questions.")
    return out


def _problem(v: dict) -> str | None:
    if not isinstance(v.get("question"), str) or not v["question"].strip():
        return "field 'question' must be non-empty text"
    for f in ("answer", "evidence", "source"):
        if v.get(f) is not None and not isinstance(v[f], str):
            return f"field {f!r} must be text (or null), not {type(v[f]).__name__}"
    return None


def _norm(s: str) -> str:
    return " ".join(s.casefold().split())


def relevant(p: Passage, q: Question) -> bool:
    if q.evidence is not None and _norm(q.evidence) in _norm(p.text):
        return True
    return q.source is not None and (p.doc == q.source or p.doc.split(" ")[0] == q.source)


def first_relevant_rank(passages: list[Passage], q: Question) -> int | None:
    return next((i for i, p in enumerate(passages, 1) if relevant(p, q)), None)


def recall_mrr(ranks: list[int | None], ks: list[int]) -> dict:
    """{"recall@k": ..., "mrr": ..., "n": ...} from each question's first relevant rank."""
    n = len(ranks)
    out: dict = {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / n for k in ks}
    out["mrr"] = sum(1.0 / r for r in ranks if r is not None) / n
    out["n"] = n
    return out


def evaluate(index: Index, questions: list[Question], *, ks: list[int], mode: str = "auto") -> dict:
    """recall@k and MRR over the questions that name a gold passage (the others are counted)."""
    gold = [q for q in questions if q.evidence is not None or q.source is not None]
    if not gold:
        raise LmforgeError("No question names its gold passage (`evidence` or `source`); retrieval quality "
                           "cannot be measured.")
    depth = max(ks)
    ranks = [first_relevant_rank(index.search(q.question, depth, mode=mode), q) for q in gold]
    return {**recall_mrr(ranks, ks), "without_gold": len(questions) - len(gold), "mode": mode}

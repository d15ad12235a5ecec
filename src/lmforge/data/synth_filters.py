"""Filters for teacher-written rows (issue 17's `synth` stage; the stage itself is not written yet).

    rows ──exact duplicates (curate.dedup_key), against existing data and earlier rows──
         ──near duplicates (curate's MinHash LSH, the same settings as curate's near_dedup)──
         ──decontamination: word n-gram overlap with the evaluation rows──> kept rows

Every kept row gets `provenance.filters` (each filter's score: the nearest duplicate's estimated
Jaccard, the largest share of an evaluation item's n-grams it contains); every removal is counted
per filter with its first examples; the contaminated pairs are listed (row, evaluation row,
share). A filter that removes every remaining row is one sentence naming it and the counts,
never an empty file passed on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from lmforge.data.curate import DocIndex, MinHasher, NearDedupConfig, dedup_key, key_hash
from lmforge.errors import LmforgeError


def row_text(row: dict) -> str:
    """The text a row carries: its messages' contents, prompt + completion/response, or text."""
    if isinstance(row.get("messages"), list):
        return "\n".join(str(m.get("content", "")) for m in row["messages"] if isinstance(m, dict))
    parts = [row.get(k) for k in ("prompt", "instruction", "input", "completion", "response", "output", "text")]
    return "\n".join(str(p) for p in parts if p)


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of the normalised text (curate.dedup_key); a text shorter than n gives itself."""
    words = dedup_key(text).split()
    return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()


def contamination(texts: list[str], eval_texts: list[str], *, n: int, threshold: float) -> list[tuple[int, int, float]]:
    """(row, evaluation row, share) for each pair where the row holds at least `threshold` of the
    evaluation row's word n-grams; the share is 1.0 when the whole evaluation item is inside the row."""
    index: dict[tuple[str, ...], list[int]] = {}
    sizes = []
    for j, t in enumerate(eval_texts):
        grams = word_ngrams(t, n)
        sizes.append(len(grams))
        for g in grams:
            index.setdefault(g, []).append(j)
    out = []
    for i, t in enumerate(texts):
        hits: Counter = Counter(j for g in word_ngrams(t, n) for j in index.get(g, ()))
        out += [(i, j, c / sizes[j]) for j, c in sorted(hits.items()) if sizes[j] and c / sizes[j] >= threshold]
    return out


@dataclass
class Filtered:
    rows: list[dict]  # kept, each with provenance.filters
    removed: Counter = field(default_factory=Counter)  # per filter
    examples: dict[str, list[str]] = field(default_factory=dict)  # per filter: the first removed texts
    contaminated: list[dict] = field(default_factory=list)  # {row, eval_row, share, text, eval_text}: indices in the inputs


def apply_filters(rows: list[dict], *, eval_rows: list[dict] = (), existing: list[dict] = (),
                  near: NearDedupConfig | None = None, decontam_ngram: int = 8, decontam_threshold: float = 0.5,
                  n_examples: int = 3) -> Filtered:
    """Exact and near duplicates (against `existing` and earlier rows), then decontamination."""
    near = near or NearDedupConfig()
    res = Filtered([])
    n_in = len(rows)

    def drop(name: str, text: str) -> None:
        res.removed[name] += 1
        res.examples.setdefault(name, [])
        if len(res.examples[name]) < n_examples:
            res.examples[name].append(text[:200])

    def check_left(name: str, before: int, left: list) -> None:
        if before and not left:
            raise LmforgeError(f"synth: the {name} filter removed all {before} remaining rows (of {n_in} generated; "
                               f"removed so far: {dict(res.removed)}); nothing would be written.")

    hasher = MinHasher(near.num_perm, near.ngram, near.seed)
    index = DocIndex(hasher, near.threshold, near.lsh_weights)
    seen: set[int] = set()
    for r in existing:
        key = dedup_key(row_text(r))
        seen.add(key_hash(key))
        index.add(hasher.signatures([hasher.shingle_hashes(key)])[0], 0, 0, 0)
    stage: list[tuple[int, dict, dict]] = []  # (index in `rows`, row, scores)
    for n, r in enumerate(rows):
        key = dedup_key(row_text(r))
        if key_hash(key) in seen:
            drop("exact_duplicate", row_text(r))
            continue
        seen.add(key_hash(key))
        sig = hasher.signatures([hasher.shingle_hashes(key)])[0]
        nearest = max((s for _, s in index.similar(sig)), default=0.0)
        if nearest >= near.threshold:
            drop("near_duplicate", row_text(r))
            continue
        index.add(sig, 0, 0, 0)
        stage.append((n, r, {"near_duplicate_jaccard": round(nearest, 4)}))
    check_left("exact/near duplicate", n_in, stage)

    texts, eval_texts = [row_text(r) for _, r, _ in stage], [row_text(e) for e in eval_rows]
    worst: dict[int, float] = {}  # every row's largest overlap, kept in its provenance
    for i, j, share in contamination(texts, eval_texts, n=decontam_ngram, threshold=0.0):
        worst[i] = max(worst.get(i, 0.0), share)
        if share >= decontam_threshold:
            res.contaminated.append({"row": stage[i][0], "eval_row": j, "share": round(share, 4), "text": texts[i][:200],
                                     "eval_text": eval_texts[j][:200]})
    for i, (_, r, scores) in enumerate(stage):
        if worst.get(i, 0.0) >= decontam_threshold:
            drop("decontamination", texts[i])
            continue
        prov = dict(r.get("provenance") or {})
        prov["filters"] = {**prov.get("filters", {}), **scores, "eval_ngram_share": round(worst.get(i, 0.0), 4)}
        res.rows.append({**r, "provenance": prov})
    check_left("decontamination", len(stage), res.rows)
    return res

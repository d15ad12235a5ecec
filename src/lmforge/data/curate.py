"""The `curate` stage: raw text in, clean de-duplicated train/validation/test Parquet shards out.

    read ─> 1 normalise ─> 2 quality filters ─> 3 exact dedup ─> 4 near dedup (MinHash LSH)
         ─> 5 PII scrub ─> 6 split by hash ─> 7 leakage check ─> shards + curation report

One streaming pass, in input order. Every step is switchable and counted; a removed document
is counted under the first rule that removed it, and a few examples of each are kept for the
report (`curation_report.md` / `.json` next to the shards).

Memory is bounded by one batch of documents plus, per document kept, what de-duplication must
remember (see `DocIndex`): texts are never accumulated. Train shards are written as documents
arrive; validation/test documents go to a spill file first because a later train document may
reveal that one of them leaks, and they are copied to their final shards at the end.

Decisions do not depend on batching: exact dedup inserts each hash as it is seen and near dedup
queries-then-inserts one document at a time, so "keep the first" means first in input order.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import shutil
import time
import unicodedata
import zlib
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from lmforge.config import Schema
from lmforge.data.formats import ReadStats, estimate_records, iter_text_records
from lmforge.errors import LmforgeError
from lmforge.progress import Progress
from lmforge.rundir import RunDir, atomic_write_json, atomic_write_text, staged_dir

ARTIFACT = "data"
PROVIDES = ("data",)
INPUTS = {"inputs": None}
SPLITS = ("train", "validation", "test")


# --------------------------------------------------------------------------------------------
# Configuration


class NormalizeConfig(Schema):
    """Step 1: Unicode normalisation and clean-up (never removes a document that has text)."""

    enabled: bool = Field(True, description="Run this step.")
    unicode_form: Literal["NFC", "NFKC", "none"] = Field(
        "NFC", description="Unicode normal form. NFKC also folds compatibility characters (ﬁ -> fi, full-width -> ASCII).")
    remove_control: bool = Field(
        True, description="Drop C0/C1 control characters (keeping tab and newline), zero-width spaces and BOMs.")
    whitespace: bool = Field(
        True, description="Unify line ends and non-breaking spaces, drop trailing spaces, collapse runs of spaces "
        "inside lines and of blank lines, strip the document.")


class QualityConfig(Schema):
    """Step 2: Gopher-style quality rules (Rae et al. 2021, appendix A). None switches a rule off.

    Words are whitespace-separated tokens; character fractions count the characters of words
    (or of lines/paragraphs), not whitespace. The defaults follow Gopher except `min_words`
    (Gopher: 50), so short clean documents of a small corpus survive.
    """

    enabled: bool = Field(True, description="Run this step.")
    min_words: int | None = Field(5, ge=0, description="Remove documents with fewer words (Gopher: 50).")
    max_words: int | None = Field(100_000, ge=1, description="Remove documents with more words.")
    min_chars: int | None = Field(None, ge=0, description="Remove documents with fewer characters.")
    max_chars: int | None = Field(None, ge=1, description="Remove documents with more characters.")
    mean_word_length: tuple[float, float] | None = Field(
        None, description="Keep documents whose mean word length is in [lo, hi] (Gopher: [3, 10]; off by default "
        "because a short clean sentence can average under 3).")
    max_symbol_word_ratio: float | None = Field(
        0.1, ge=0, description="Remove documents with more '#' per word, or more ellipses ('...', '…') per word, than this.")
    max_bullet_lines_frac: float | None = Field(
        0.9, ge=0, le=1, description="Remove documents where more than this fraction of lines start with a bullet.")
    max_ellipsis_lines_frac: float | None = Field(
        0.3, ge=0, le=1, description="Remove documents where more than this fraction of lines end with an ellipsis.")
    min_alpha_words_frac: float | None = Field(
        None, ge=0, le=1, description="Remove documents where fewer words than this contain a letter (Gopher: 0.8; "
        "off by default because numbers and code fail it).")
    min_stop_words: int | None = Field(
        None, ge=0, description="Remove documents containing fewer than this many English stop words (the, be, to, of, "
        "and, that, have, with; Gopher: 2). Catches markup, hex dumps and keyword lists; off by default because it "
        "removes every non-English document.")
    max_dup_line_frac: float | None = Field(
        0.3, ge=0, le=1, description="Remove documents where more than this fraction of non-empty lines repeat an earlier line.")
    max_dup_line_chars_frac: float | None = Field(
        0.2, ge=0, le=1, description="Remove documents where repeated lines hold more than this fraction of line characters.")
    max_dup_para_frac: float | None = Field(
        0.3, ge=0, le=1, description="As max_dup_line_frac, for blank-line-separated paragraphs.")
    max_dup_para_chars_frac: float | None = Field(
        0.2, ge=0, le=1, description="As max_dup_line_chars_frac, for paragraphs.")
    max_top_ngram_frac: dict[int, float] = Field(
        {2: 0.20, 3: 0.18, 4: 0.16},
        description="n -> limit: remove documents where the most frequent word n-gram (occurring at least twice) "
        "covers more than this fraction of word characters, counting every occurrence.")
    max_dup_ngram_frac: dict[int, float] = Field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> limit: remove documents where words inside repeated word n-grams (every occurrence "
        "after the first) hold more than this fraction of word characters.")

    @model_validator(mode="after")
    def _ngram_sizes(self) -> "QualityConfig":
        for name in ("max_top_ngram_frac", "max_dup_ngram_frac"):
            bad = [n for n in getattr(self, name) if n < 1 or n > 50]
            if bad:
                raise ValueError(f"{name} keys are n-gram sizes between 1 and 50, got {bad}")
        return self


class DedupConfig(Schema):
    """Step 3: exact de-duplication on a hash of the normalised text."""

    enabled: bool = Field(True, description="Run this step (lowercase, punctuation stripped, whitespace collapsed).")


class NearDedupConfig(Schema):
    """Step 4: near-duplicate removal with MinHash LSH; the first document of a cluster is kept.

    The MinHash settings here are also used by the leakage check.
    """

    enabled: bool = Field(True, description="Run this step.")
    threshold: float = Field(0.8, gt=0, lt=1, description="Estimated Jaccard similarity of shingle sets at or above "
                             "which a document is a near duplicate of an earlier kept one.")
    ngram: int = Field(5, ge=1, le=50, description="Shingles are word n-grams of this size of the normalised text.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (memory: 4 bytes each per kept document).")
    seed: int = Field(1, description="Seed of the MinHash permutations.")
    lsh_weights: tuple[float, float] = Field(
        (0.1, 0.9), description="(false-positive, false-negative) weights used to choose the LSH bands. Recall-heavy "
        "because every candidate is then checked against `threshold` with its signature.")


class PiiConfig(Schema):
    """Step 5: replace personal data by placeholders."""

    enabled: bool = Field(False, description="Run this step.")
    emails: bool = Field(True, description="E-mail addresses -> <EMAIL>.")
    phones: bool = Field(True, description="Phone numbers (+country code, (area) code, or 3-3-4 digit groups) -> <PHONE>.")
    ips: bool = Field(True, description="IPv4 and IPv6 addresses -> <IP>.")


class SplitConfig(Schema):
    """Step 6: split fractions. A document's split is a function of its own normalised hash."""

    train: float = Field(0.98, gt=0, le=1, description="Fraction of documents in train.")
    validation: float = Field(0.01, ge=0, le=1, description="Fraction of documents in validation.")
    test: float = Field(0.01, ge=0, le=1, description="Fraction of documents in test.")

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitConfig":
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test must be 1, got {total:g}")
        return self


class LeakageConfig(Schema):
    """Step 7: no near-duplicate pair may span two splits."""

    enabled: bool = Field(True, description="Run this step.")
    threshold: float | None = Field(
        None, gt=0, lt=1, description="Estimated Jaccard at or above which a pair leaks; None = near_dedup.threshold.")
    on_leak: Literal["remove", "error"] = Field(
        "remove", description="remove: drop the validation/test member of a leaking pair (train wins, then "
        "validation); error: stop naming both documents.")


class Config(Schema):
    """The curate stage: read raw text, clean, filter, de-duplicate, split, write Parquet shards."""

    inputs: list[str] = Field(
        min_length=1, description="Files, folders or globs to read (.jsonl/.json/.parquet/.csv/.tsv/.txt/.md, "
        "optionally .gz, or folders saved by datasets.save_to_disk).")
    text_field: str = Field("text", description="Column/key holding the text in structured rows.")
    text_mode: Literal["file", "blocks"] = Field(
        "file", description="Plain-text files: one document per file, or per blank-line-separated block.")
    dataset_split: str | None = Field(None, description="Split to read from a saved DatasetDict (None = all splits).")
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="A malformed row (bad JSON, missing text field): stop with an error naming it, or skip and count it.")
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig, description="Step 1.")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="Step 2.")
    exact_dedup: DedupConfig = Field(default_factory=DedupConfig, description="Step 3.")
    near_dedup: NearDedupConfig = Field(default_factory=NearDedupConfig, description="Step 4.")
    pii: PiiConfig = Field(default_factory=PiiConfig, description="Step 5.")
    splits: SplitConfig = Field(default_factory=SplitConfig, description="Step 6.")
    leakage: LeakageConfig = Field(default_factory=LeakageConfig, description="Step 7.")
    shard_mb: float = Field(128.0, gt=0, description="Start a new Parquet shard after about this many MB of text.")
    batch_docs: int = Field(512, ge=1, description="Documents read and MinHashed together (memory ~ one batch).")
    engine: Literal["local", "datatrove"] = Field(
        "local", description="local: one streaming process with an in-memory LSH index (~5 KB per kept document). "
        "datatrove: the same rules as datatrove jobs (one task per input file; MinHash signatures sorted on disk "
        "per band, so memory per task does not grow with the corpus; a rerun resumes unfinished tasks). See "
        "README 'Curation at scale' for where its near dedup differs.")
    workers: int = Field(2, ge=1, description="engine: datatrove: processes of its local executor.")
    examples: int = Field(3, ge=0, description="Examples of each removed kind kept in the report.")
    example_chars: int = Field(300, ge=20, description="Examples are truncated to this many characters.")


# --------------------------------------------------------------------------------------------
# Step 1: normalisation

# C0/C1 controls except tab and newline, zero-width space, word joiner, BOM. ZWJ/ZWNJ stay:
# emoji sequences and Persian/Indic text need them.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u2060\ufeff]")
_CRLF = re.compile(r"\r\n?")
_HSPACE = re.compile(r"[^\S\n\t ]")  # Unicode spaces other than ' ', tab and newline (NBSP, thin space, ...)
_TRAILING = re.compile(r"[ \t]+(?=\n|$)")
_INNER_RUN = re.compile(r"(?<=\S) {2,}")  # runs after text only: leading indentation is kept
_BLANK_RUN = re.compile(r"\n{3,}")


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    # The `in` guards skip a regex pass when it cannot match: most documents need few of them.
    if cfg.unicode_form != "none":
        text = unicodedata.normalize(cfg.unicode_form, text)
    if (cfg.remove_control or cfg.whitespace) and "\r" in text:
        text = _CRLF.sub("\n", text)  # before control removal, which would drop a bare \r
    if cfg.remove_control:
        text = _CONTROL.sub("", text)
    if cfg.whitespace:
        if not text.isascii():
            text = _HSPACE.sub(" ", text)
        if " \n" in text or "\t\n" in text:
            text = _TRAILING.sub("", text)
        if "  " in text:
            text = _INNER_RUN.sub(" ", text)
        if "\n\n\n" in text:
            text = _BLANK_RUN.sub("\n\n", text)
        text = text.strip()
    return text


# --------------------------------------------------------------------------------------------
# Step 2: quality rules

_BULLETS = ("•", "-", "*", "·", "●", "‣", "▪", "◦", "–")
_ELLIPSES = ("...", "…")
_LETTER = re.compile(r"[^\W\d_]")
_PARAS = re.compile(r"\n\s*\n")
_NGRAM_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the n-gram polynomial hash


def _dup_fractions(parts: list[str]) -> tuple[float, float]:
    """(fraction of parts equal to an earlier part, fraction of characters in those parts)."""
    seen: set[str] = set()
    dup = dup_chars = total_chars = 0
    for p in parts:
        total_chars += len(p)
        if p in seen:
            dup += 1
            dup_chars += len(p)
        else:
            seen.add(p)
    return dup / len(parts), (dup_chars / total_chars if total_chars else 0.0)


def _repeats(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort n-gram hashes once: (positions in stable sorted order, mask of 'same as the previous')."""
    order = np.argsort(g, kind="stable")  # equal hashes keep position order: the first comes first
    s = g[order]
    return order, np.concatenate(([False], s[1:] == s[:-1]))


def top_ngram_frac(g: np.ndarray, n: int, cum_chars: np.ndarray) -> float:
    """Characters covered by the most frequent n-gram (all occurrences) / all word characters.

    Equals: Counter(ngrams).most_common(1) -> count * chars(ngram) / chars(words), except that
    an n-gram seen only once is no repetition (0.0), and ties go to the longest n-gram.
    """
    order, same = _repeats(g)
    if not same.any():
        return 0.0
    run_starts = np.flatnonzero(~same)  # one run per distinct n-gram, in sorted order
    counts = np.diff(np.append(run_starts, len(g)))
    top = counts.max()
    if top < 2:
        return 0.0
    firsts = order[run_starts[counts == top]]
    chars = (cum_chars[firsts + n] - cum_chars[firsts]).max()
    return float(top * chars / cum_chars[-1])


def dup_ngram_frac(g: np.ndarray, n: int, word_chars: np.ndarray) -> float:
    """Characters of words inside any repeated n-gram occurrence (not the first) / all word characters.

    Equals: mark every word of every n-gram occurrence whose n-gram appeared earlier, then
    sum(len(w) for marked w) / sum(len(w) for all w); each word counts once.
    """
    order, same = _repeats(g)
    starts = order[same]
    if not len(starts):
        return 0.0
    edges = np.bincount(starts, minlength=len(word_chars) + 1) - np.bincount(starts + n, minlength=len(word_chars) + 1)
    covered = np.cumsum(edges[:-1]) > 0
    return float(word_chars[covered].sum() / word_chars.sum())


# Gopher's stop-word rule (Rae et al. 2021, A.1.1): real English prose has at least two of these.
_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_STOP_STRIP = ".,;:!?\"'()[]{}"


def quality_failure(text: str, q: QualityConfig) -> tuple[str, str] | None:
    """The first rule `text` fails, as (rule, measured value vs limit), or None if it passes.

    Cheap rules run first; a document is counted under its first failure only.
    """
    words = text.split()
    n = len(words)
    if q.min_words is not None and n < q.min_words:
        return "min_words", f"{n} words < {q.min_words}"
    if q.max_words is not None and n > q.max_words:
        return "max_words", f"{n} words > {q.max_words}"
    if q.min_chars is not None and len(text) < q.min_chars:
        return "min_chars", f"{len(text)} characters < {q.min_chars}"
    if q.max_chars is not None and len(text) > q.max_chars:
        return "max_chars", f"{len(text)} characters > {q.max_chars}"
    if n == 0:
        return None  # nothing below is defined without words
    word_chars = np.fromiter(map(len, words), dtype=np.int64, count=n)
    if q.mean_word_length is not None:
        lo, hi = q.mean_word_length
        mean = float(word_chars.mean())
        if not lo <= mean <= hi:
            return "mean_word_length", f"mean word length {mean:.2f} outside [{lo:g}, {hi:g}]"
    if q.max_symbol_word_ratio is not None:
        for name, count in (("'#'", text.count("#")), ("ellipsis", text.count("...") + text.count("…"))):
            if count / n > q.max_symbol_word_ratio:
                return "symbol_word_ratio", f"{name} per word {count / n:.3f} > {q.max_symbol_word_ratio:g}"
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if ln]
    if q.max_bullet_lines_frac is not None:
        frac = sum(ln.startswith(_BULLETS) for ln in lines) / len(lines)
        if frac > q.max_bullet_lines_frac:
            return "bullet_lines", f"bullet lines {frac:.3f} > {q.max_bullet_lines_frac:g}"
    if q.max_ellipsis_lines_frac is not None:
        frac = sum(ln.endswith(_ELLIPSES) for ln in lines) / len(lines)
        if frac > q.max_ellipsis_lines_frac:
            return "ellipsis_lines", f"lines ending in an ellipsis {frac:.3f} > {q.max_ellipsis_lines_frac:g}"
    if q.min_stop_words is not None:
        found = sum(1 for w in words if w.lower().strip(_STOP_STRIP) in _STOP_WORDS)
        if found < q.min_stop_words:
            return "stop_words", f"{found} stop words < {q.min_stop_words}"
    if q.min_alpha_words_frac is not None:
        frac = sum(1 for w in words if _LETTER.search(w)) / n
        if frac < q.min_alpha_words_frac:
            return "alpha_words", f"words with a letter {frac:.3f} < {q.min_alpha_words_frac:g}"
    for unit, parts, lim_n, lim_c in (
        ("line", lines, q.max_dup_line_frac, q.max_dup_line_chars_frac),
        ("para", [p.strip() for p in _PARAS.split(text) if p.strip()], q.max_dup_para_frac, q.max_dup_para_chars_frac),
    ):
        if lim_n is None and lim_c is None:
            continue
        frac_n, frac_c = _dup_fractions(parts)
        if lim_n is not None and frac_n > lim_n:
            return f"dup_{unit}_frac", f"repeated {unit}s {frac_n:.3f} > {lim_n:g}"
        if lim_c is not None and frac_c > lim_c:
            return f"dup_{unit}_chars_frac", f"characters in repeated {unit}s {frac_c:.3f} > {lim_c:g}"
    # Python's str hash is salted per process, but only equality of words matters here (a 64-bit
    # collision between two different words is negligible), so decisions are reproducible.
    word_hash = np.fromiter(map(hash, words), dtype=np.int64, count=n).view(np.uint64)
    cum_chars = np.concatenate(([0], np.cumsum(word_chars)))
    dup_limits = sorted(q.max_dup_ngram_frac.items())
    last = max([*q.max_top_ngram_frac, *q.max_dup_ngram_frac], default=0)
    g = word_hash
    for k in range(1, min(last, n) + 1):
        if k > 1:
            g = g[:-1] * _NGRAM_MUL + word_hash[k - 1:]  # hash of the k-gram at each position, mod 2^64
        if (limit := q.max_top_ngram_frac.get(k)) is not None and (frac := top_ngram_frac(g, k, cum_chars)) > limit:
            return f"top_{k}gram", f"most frequent {k}-gram covers {frac:.3f} > {limit:g}"
        if (limit := q.max_dup_ngram_frac.get(k)) is not None:
            frac = dup_ngram_frac(g, k, word_chars)
            if frac > limit:
                return f"dup_{k}gram", f"repeated {k}-grams cover {frac:.3f} > {limit:g}"
            # Words covered by repeated (k+1)-grams are covered by repeated k-grams, so this fraction
            # only falls as k grows: under every later limit, no later dup rule can fail.
            later = [lim for m, lim in dup_limits if m > k]
            if frac <= min(later, default=1.0) and all(m <= k for m in q.max_top_ngram_frac):
                break
    return None


def rule_setting(rule: str, cfg: Config) -> tuple[str, object]:
    """The config key (and its value) that controls `rule`, for reports and error hints."""
    q = cfg.quality
    if m := re.fullmatch(r"top_(\d+)gram", rule):
        return f"quality.max_top_ngram_frac.{m[1]}", q.max_top_ngram_frac[int(m[1])]
    if m := re.fullmatch(r"dup_(\d+)gram", rule):
        return f"quality.max_dup_ngram_frac.{m[1]}", q.max_dup_ngram_frac[int(m[1])]
    key = {"symbol_word_ratio": "max_symbol_word_ratio", "bullet_lines": "max_bullet_lines_frac",
           "ellipsis_lines": "max_ellipsis_lines_frac", "alpha_words": "min_alpha_words_frac",
           "stop_words": "min_stop_words",
           "dup_line_frac": "max_dup_line_frac", "dup_line_chars_frac": "max_dup_line_chars_frac",
           "dup_para_frac": "max_dup_para_frac", "dup_para_chars_frac": "max_dup_para_chars_frac"}.get(rule, rule)
    if key in QualityConfig.model_fields:
        return f"quality.{key}", getattr(q, key)
    if rule == "near_duplicate":
        return "near_dedup.threshold", cfg.near_dedup.threshold
    if rule.startswith("leak_"):
        return "leakage.threshold", cfg.leakage.threshold or cfg.near_dedup.threshold
    if rule == "exact_duplicate":
        return "exact_dedup.enabled", cfg.exact_dedup.enabled
    return "normalize", "-"


# --------------------------------------------------------------------------------------------
# Steps 3 and 6: the normalised key, its hash, and the split it decides

_PUNCT = re.compile(r"[^\w\s]+")
# The same deletion for ASCII text through str.translate: 5x faster than the regex.
_ASCII_PUNCT = {i: None for i in range(128) if _PUNCT.fullmatch(chr(i))}


def dedup_key(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: what 'the same text' means here."""
    text = text.lower()
    text = text.translate(_ASCII_PUNCT) if text.isascii() else _PUNCT.sub("", text)
    return " ".join(text.split())


def key_hash(key: str) -> int:
    """64-bit hash of a key (collision chance ~ n^2 / 2^65: negligible below a billion documents)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def split_of(h: int, s: SplitConfig) -> str:
    """The split of a document with key hash `h`: a fixed point in [0, 1) against cumulative fractions.

    Depends on nothing but `h` and the fractions, so adding documents never moves old ones.
    """
    u = h / 2.0**64
    if u < s.train:
        return "train"
    if u < s.train + s.validation or s.test == 0:  # `or`: fractions that sum to 1 only up to rounding
        return "validation" if s.validation > 0 else "train"
    return "test"


# --------------------------------------------------------------------------------------------
# Step 4: MinHash signatures, computed for a batch at once with numpy


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (a bijection), as datasketch applies before permuting."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class MinHasher:
    """Shingle hashes and MinHash signatures matching datasketch's default "affine32" scheme.

    `signatures([h])[0]` equals the hashvalues of `MinHash(num_perm, seed)` after
    `update_batch(h)` with an identity `hashfunc`, computed for many documents in one go:
    per batch, shingles (S,) -> permuted (chunk, num_perm) -> segment minima per document.
    """

    # Shingles per permutation block: CHUNK * num_perm * 4 bytes (512 KiB at 128) stays in cache;
    # measured 2.5x faster than 16384-shingle blocks.
    CHUNK = 1024

    def __init__(self, num_perm: int, ngram: int, seed: int):
        from datasketch import MinHash

        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        self.permutations = MinHash(num_perm=num_perm, seed=seed).permutations  # (2, P) uint32, a odd
        self.a, self.b = self.permutations[0], self.permutations[1]
        rng = np.random.RandomState(seed)
        self._mix = rng.randint(1, 2**63, size=max(ngram, 1), dtype=np.uint64) * np.uint64(2) + np.uint64(1)

    def shingle_hashes(self, key: str) -> np.ndarray:
        """32-bit hashes of the word n-grams of a normalised key (all words if fewer than n)."""
        words = key.encode("utf-8").split()
        if not words:
            return np.empty(0, dtype=np.uint32)
        w = np.fromiter(map(zlib.crc32, words), dtype=np.uint64, count=len(words))
        k = min(self.ngram, len(w))
        m = len(w) - k + 1
        h = np.zeros(m, dtype=np.uint64)
        for i in range(k):  # sum_i word[j + i] * odd_i, mod 2^64
            h += w[i:i + m] * self._mix[i]
        return (h >> np.uint64(32)).astype(np.uint32)  # the high half is the well-mixed one

    def signatures(self, shingles: list[np.ndarray]) -> np.ndarray:
        """(D, num_perm) uint32 signatures; an empty shingle set gives all 0xFFFFFFFF."""
        out = np.full((len(shingles), self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        docs = [i for i, s in enumerate(shingles) if len(s)]
        i = 0
        while i < len(docs):
            j, total = i, 0
            while j < len(docs) and (j == i or total + len(shingles[docs[j]]) <= self.CHUNK):
                total += len(shingles[docs[j]])
                j += 1
            group = docs[i:j]
            flat = _fmix32(np.concatenate([shingles[d] for d in group]))
            if len(group) == 1:  # one document, maybe longer than CHUNK: fold its blocks
                for c in range(0, len(flat), self.CHUNK):
                    block = flat[c:c + self.CHUNK, None] * self.a + self.b  # (c, P), wraps mod 2^32
                    out[group[0]] = np.minimum(out[group[0]], block.min(axis=0))
            else:
                starts = np.cumsum([0] + [len(shingles[d]) for d in group[:-1]])
                out[group] = np.minimum.reduceat(flat[:, None] * self.a + self.b, starts, axis=0)
            i = j
        return out


class DocIndex:
    """Everything near dedup and the leakage check remember about each kept document.

    Per indexed document: its signature (4 * num_perm bytes: 512 B at 128), its split (1 B),
    where it came from (8 B), and its entries in the LSH tables (per band a bytes key and a
    one-element set, plus the key table: about 4.6 KB at 128 permutations and 14 bands). So
    ~5.2 KB per kept document in all (measured by bench/bench_curate.py): ~5 GB per million.
    That is the only per-document memory besides the exact-dedup hash set (~60 B per document).
    """

    BLOCK = 1 << 16  # signatures are stored in fixed blocks: no reallocation as the index grows

    def __init__(self, hasher: MinHasher, threshold: float, weights: tuple[float, float]):
        from datasketch import MinHashLSH

        self.hasher = hasher
        self.lsh = MinHashLSH(threshold=threshold, num_perm=hasher.num_perm, weights=weights)
        self.blocks: list[np.ndarray] = []
        self.split = bytearray()
        self.source = np.zeros(0, dtype=np.uint32)
        self.row = np.zeros(0, dtype=np.uint32)
        self.n = 0

    def _minhash(self, sig: np.ndarray):
        from datasketch import MinHash

        return MinHash(seed=self.hasher.seed, hashvalues=sig, permutations=self.hasher.permutations,
                       scheme="affine32")

    def similar(self, sig: np.ndarray) -> list[tuple[int, float]]:
        """(key, estimated Jaccard) of indexed documents that LSH finds as candidates."""
        keys = self.lsh.query(self._minhash(sig))
        if not keys:
            return []
        sigs = np.stack([self.blocks[k // self.BLOCK][k % self.BLOCK] for k in keys])
        est = (sigs == sig).mean(axis=1)
        return list(zip(keys, est.tolist()))

    def add(self, sig: np.ndarray, split: int, source: int, row: int) -> int:
        k = self.n
        if k % self.BLOCK == 0:
            self.blocks.append(np.empty((self.BLOCK, self.hasher.num_perm), dtype=np.uint32))
            self.source = np.resize(self.source, k + self.BLOCK)
            self.row = np.resize(self.row, k + self.BLOCK)
        self.blocks[-1][k % self.BLOCK] = sig
        self.split.append(split)
        self.source[k], self.row[k] = source, min(row, 2**32 - 1)
        self.lsh.insert(k, self._minhash(sig), check_duplication=False)
        self.n += 1
        return k

    def remove(self, k: int) -> None:
        self.lsh.remove(k)


# --------------------------------------------------------------------------------------------
# Step 5: PII

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]*\w)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")  # checked with ipaddress
# +CC groups, (area) groups, or US-style 3-3-4; 7-15 digits. Dates and plain numbers do not match.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
    r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}"
    r"|\d{3}[ .-]\d{3}[ .-]\d{4})(?![\w])"
)


def _ipv6(m: re.Match) -> str:
    try:
        ipaddress.IPv6Address(m[0])
    except ValueError:
        return m[0]
    return "<IP>"


def scrub_pii(text: str, cfg: PiiConfig) -> tuple[str, Counter]:
    """Replace e-mails, IP addresses and phone numbers by placeholders; count each kind."""
    counts: Counter = Counter()
    if cfg.emails:
        text, counts["email"] = _EMAIL.subn("<EMAIL>", text)
    if cfg.ips:
        text, counts["ip"] = _IPV4.subn("<IP>", text)
        if ":" in text:
            before = text.count("<IP>")
            text = _IPV6.sub(_ipv6, text)
            counts["ip"] += text.count("<IP>") - before
    if cfg.phones:
        def phone(m: re.Match) -> str:
            digits = sum(c.isdigit() for c in m[0])
            return "<PHONE>" if 7 <= digits <= 15 else m[0]

        before = text.count("<PHONE>")
        text = _PHONE.sub(phone, text)
        counts["phone"] = text.count("<PHONE>") - before
    return text, counts


# --------------------------------------------------------------------------------------------
# Output: Parquet shards written as documents arrive

_SCHEMA = pa.schema([("text", pa.string())])
_SPILL_SCHEMA = pa.schema([("key", pa.int64()), ("text", pa.string())])


class ShardWriter:
    """`<split>-00000.parquet`, ...: a new shard after `shard_bytes` of text, a row group per flush."""

    GROUP_DOCS, GROUP_BYTES = 2048, 32 << 20  # the buffer: at most this much text in memory

    def __init__(self, folder: Path, split: str, shard_bytes: float, schema: pa.Schema = _SCHEMA):
        self.folder, self.split, self.shard_bytes, self.schema = folder, split, shard_bytes, schema
        self.columns: dict[str, list] = {name: [] for name in schema.names}
        self.buffered = self.shard_size = 0
        self.writer: pq.ParquetWriter | None = None
        self.shards: list[str] = []
        self.docs = self.chars = 0

    def add(self, text: str, key: int | None = None) -> None:
        self.columns["text"].append(text)
        if "key" in self.columns:
            self.columns["key"].append(key)
        self.buffered += len(text)
        self.docs += 1
        self.chars += len(text)
        if (len(self.columns["text"]) >= self.GROUP_DOCS or self.buffered >= self.GROUP_BYTES
                or self.shard_size + self.buffered >= self.shard_bytes):
            self.flush()

    def flush(self) -> None:
        if not self.columns["text"] and self.writer is not None:
            return
        if self.writer is None:
            name = f"{self.split}-{len(self.shards):05d}.parquet"
            self.writer = pq.ParquetWriter(self.folder / name, self.schema, compression="zstd")
            self.shards.append(name)
        self.writer.write_table(pa.table(self.columns, schema=self.schema))
        self.shard_size += self.buffered
        self.columns = {name: [] for name in self.schema.names}
        self.buffered = 0
        if self.shard_size >= self.shard_bytes:
            self.writer.close()
            self.writer, self.shard_size = None, 0

    def close(self) -> list[str]:
        if self.columns["text"] or not self.shards:  # an empty split still gets one (empty) shard
            self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return self.shards


# --------------------------------------------------------------------------------------------
# The report


def clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + " [...]"


def _report_markdown(rep: dict) -> str:
    lines = ["# Curation report", "",
             f"{rep['documents_in']} documents in, {rep['documents_out']} out "
             f"({rep['seconds']:.1f} s, {rep['docs_per_s']:.0f} documents/s).", ""]
    r = rep["read"]
    lines += [f"Read {r['records']} records from {len(r['files'])} file(s); "
              f"{r['skipped_total']} bad rows skipped" + (f" ({', '.join(f'{k}: {v}' for k, v in r['skipped'].items())})."
                                                           if r["skipped"] else "."), ""]
    for msg in r["skipped_examples"]:
        lines.append(f"- skipped: {msg}")
    lines += ["", "## Removed", "", "| rule | setting | removed |", "|---|---|---|"]
    for rule, info in rep["removed"].items():
        lines.append(f"| {rule} | `{info['setting']}` = {info['value']} | {info['count']} |")
    if rep["pii"]:
        lines += ["", "## PII replaced", "", "| kind | replacements |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rep["pii"].items()]
    lines += ["", "## Splits", "", "| split | documents | characters | shards |", "|---|---|---|---|"]
    for name, s in rep["splits"].items():
        lines.append(f"| {name} | {s['documents']} | {s['chars']} | {', '.join(s['shards'])} |")
    if any(rep["examples"].values()):
        lines += ["", "## Examples of removed documents"]
        for rule, exs in rep["examples"].items():
            if exs:
                lines += ["", f"### {rule}", ""]
                for ex in exs:
                    body = ex["text"].replace("\n", " ").replace("`", "'")
                    lines.append(f"- {ex['where']}: {ex['detail']}  \n  `{body}`")
    return "\n".join(lines) + "\n"


def _empty_error(n_in: int, removed: Counter, stats: ReadStats, cfg: Config) -> LmforgeError:
    if n_in == 0:
        skipped = f" ({stats.total_skipped} bad rows skipped)" if stats.total_skipped else ""
        return LmforgeError(f"The inputs {', '.join(cfg.inputs)} hold no documents{skipped}; check the files and text_field.")
    parts = ", ".join(f"{rule} removed {n}" for rule, n in removed.most_common() if n)
    worst = removed.most_common(1)[0][0]
    if worst == "empty":
        hint = f"the documents are empty after normalisation; check text_field ({cfg.text_field!r})"
    else:
        key, value = rule_setting(worst, cfg)
        hint = f"relax {key} (now {value}) or check the inputs"
    return LmforgeError(f"Curation left no documents: of {n_in} read, {parts}; {hint}.")


# --------------------------------------------------------------------------------------------
# The stage


def run(cfg: Config, rd: RunDir, resume: bool = False) -> dict:
    """Curate `cfg.inputs` into `rd.artifact`. Local: one pass, `resume` restarts it (no checkpoints);
    datatrove: a rerun resumes the tasks a killed run left unfinished."""
    if cfg.engine == "datatrove":
        from lmforge.data import curate_datatrove  # imported here: datatrove is only needed for this engine

        return curate_datatrove.run(cfg, rd, resume)
    t0 = time.time()
    with staged_dir(rd.artifact) as tmp:
        return _curate(cfg, rd, tmp, t0)


def _curate(cfg: Config, rd: RunDir, out: Path, t0: float) -> dict:
    stats = ReadStats()
    removed: Counter = Counter()
    examples: dict[str, list[dict]] = {}
    pii_counts: Counter = Counter()

    def drop(rule: str, text: str, where: str, detail: str) -> None:
        removed[rule] += 1
        exs = examples.setdefault(rule, [])
        if len(exs) < cfg.examples:
            exs.append({"where": where, "detail": detail, "text": clip(text, cfg.example_chars)})

    # Near dedup and the leakage check share one LSH index, built at the lower of their thresholds;
    # each candidate is then checked against its own threshold with the stored signatures.
    dup_t = cfg.near_dedup.threshold if cfg.near_dedup.enabled else None
    leak_t = (cfg.leakage.threshold or cfg.near_dedup.threshold) if cfg.leakage.enabled else None
    index = None
    if dup_t is not None or leak_t is not None:
        hasher = MinHasher(cfg.near_dedup.num_perm, cfg.near_dedup.ngram, cfg.near_dedup.seed)
        index = DocIndex(hasher, min(t for t in (dup_t, leak_t) if t is not None), cfg.near_dedup.lsh_weights)
    seen_hashes: set[int] = set()  # exact dedup: ~60 bytes per distinct document
    sources: dict[str, int] = {}
    leaked: dict[int, str] = {}  # index key of a validation/test doc -> why it leaks (found later)
    split_rank = {name: i for i, name in enumerate(SPLITS)}  # on a leak the higher rank loses

    shard_bytes = cfg.shard_mb * 1e6
    active = [s for s in SPLITS if getattr(cfg.splits, s) > 0]
    writers = {s: ShardWriter(out, s, shard_bytes) for s in active}
    spill_dir = out / "_spill"
    spills = {}
    if leak_t is not None:  # validation/test wait in a spill until every train document has been seen
        spill_dir.mkdir()
        spills = {s: ShardWriter(spill_dir, s, float("inf"), _SPILL_SCHEMA) for s in active if s != "train"}

    records = iter_text_records(cfg.inputs, text_field=cfg.text_field, text_mode=cfg.text_mode,
                                dataset_split=cfg.dataset_split, on_bad_rows=cfg.on_bad_rows, stats=stats)
    n_in = 0
    with Progress("curate", total=max(1, estimate_records(cfg.inputs, text_mode=cfg.text_mode,
                                                          dataset_split=cfg.dataset_split)),
                  every=cfg.batch_docs * 20) as progress:
        while batch := [r for _, r in zip(range(cfg.batch_docs), records)]:
            n_in += len(batch)
            survivors = []  # (text, record, key hash, dedup key) after steps 1-3
            for text, rec in batch:
                # 1. normalise
                if cfg.normalize.enabled:
                    text = normalize_text(text, cfg.normalize)
                if not text.strip():
                    drop("empty", text, rec.where, "no text after normalisation")
                    continue
                # 2. quality
                if cfg.quality.enabled and (fail := quality_failure(text, cfg.quality)):
                    drop(fail[0], text, rec.where, fail[1])
                    continue
                # 3. exact dedup
                key = dedup_key(text)
                h = key_hash(key)
                if cfg.exact_dedup.enabled:
                    if h in seen_hashes:
                        drop("exact_duplicate", text, rec.where, "same normalised text as an earlier document")
                        continue
                    seen_hashes.add(h)
                survivors.append((text, rec, h, key))

            sigs = index.hasher.signatures([index.hasher.shingle_hashes(k) for *_, k in survivors]) if index else None
            for i, (text, rec, h, key) in enumerate(survivors):
                split = split_of(h, cfg.splits)  # 6. split: a function of the hash alone
                sig = sigs[i] if index and key else None  # a key without words has no shingles
                if sig is not None:
                    similar = index.similar(sig)
                    # 4. near dedup: keep the first of each cluster
                    if dup_t is not None and similar and (best := max(similar, key=lambda kv: kv[1]))[1] >= dup_t:
                        drop("near_duplicate", text, rec.where,
                             f"Jaccard ~{best[1]:.2f} with {_where(index, best[0], sources)}")
                        continue
                    # 7. leakage: a pair across splits loses its validation/test member
                    if leak_t is not None:
                        leaks = [(k, j) for k, j in similar
                                 if j >= leak_t and k not in leaked and index.split[k] != split_rank[split]]
                        if leaks and cfg.leakage.on_leak == "error":
                            k, j = max(leaks, key=lambda kv: kv[1])
                            raise LmforgeError(
                                f"{split} document {rec.where} is a near duplicate (Jaccard ~{j:.2f}) of "
                                f"{SPLITS[index.split[k]]} document {_where(index, k, sources)}; remove one, "
                                "or set leakage.on_leak: remove.")
                        if winners := [(k, j) for k, j in leaks if index.split[k] < split_rank[split]]:
                            k, j = max(winners, key=lambda kv: kv[1])
                            drop(f"leak_{split}", text, rec.where,
                                 f"Jaccard ~{j:.2f} with {SPLITS[index.split[k]]} document {_where(index, k, sources)}")
                            continue
                        for k, j in leaks:  # this document outranks earlier validation/test ones
                                leaked[k] = f"Jaccard ~{j:.2f} with {split} document {rec.where}"
                                index.remove(k)
                src = sources.setdefault(f"{rec.source} {rec.unit}", len(sources))
                ikey = index.add(sig, split_rank[split], src, rec.row) if sig is not None else -1
                # 5. PII (after dedup, which compares the original text)
                if cfg.pii.enabled:
                    text, counts = scrub_pii(text, cfg.pii)
                    pii_counts.update(counts)
                    pii_counts["documents_changed"] += any(counts.values())
                if split in spills:
                    spills[split].add(text, ikey)
                else:
                    writers[split].add(text)
            rate = n_in / max(time.time() - t0, 1e-9)
            progress.update(n_in, kept=sum(w.docs for w in writers.values()) + sum(s.docs for s in spills.values()),
                            docs_s=int(rate))

    # Validation/test: copy the spill to the final shards, leaving out documents found leaking.
    for split, spill in spills.items():
        spill.close()
        for name in spill.shards:
            for b in pq.ParquetFile(spill_dir / name).iter_batches(batch_size=4096):
                for ikey, text in zip(b.column("key").to_pylist(), b.column("text").to_pylist()):
                    if ikey in leaked:
                        drop(f"leak_{split}", text, _where(index, ikey, sources), leaked[ikey])
                    else:
                        writers[split].add(text)
    if spills:
        shutil.rmtree(spill_dir)
    return finish(cfg, rd, out, n_in=n_in, removed=removed, examples=examples, pii_counts=pii_counts,
                  stats=stats, writers=writers, t0=t0)


def finish(cfg: Config, rd: RunDir, out: Path, *, n_in: int, removed: Counter, examples: dict[str, list[dict]],
           pii_counts: Counter, stats: ReadStats, writers: dict[str, "ShardWriter"], t0: float) -> dict:
    """Close the shards and write the curation report: one format whichever engine ran."""
    shards = {s: w.close() for s, w in writers.items()}
    n_out = sum(w.docs for w in writers.values())
    if n_out == 0:
        raise _empty_error(n_in, removed, stats, cfg)

    seconds = time.time() - t0
    rules = _rules(cfg)
    report = {
        "documents_in": n_in,
        "documents_out": n_out,
        "read": stats.as_dict(),
        "removed": {r: {"count": removed.get(r, 0), "setting": rule_setting(r, cfg)[0],
                        "value": rule_setting(r, cfg)[1]} for r in rules + sorted(set(removed) - set(rules))},
        "pii": dict(pii_counts) if cfg.pii.enabled else {},
        "splits": {s: {"documents": writers[s].docs, "chars": writers[s].chars, "shards": shards[s]} for s in writers},
        "examples": {r: examples.get(r, []) for r in rules if examples.get(r)},
        "seconds": round(seconds, 3),
        "docs_per_s": round(n_in / max(seconds, 1e-9), 1),
    }
    atomic_write_json(out / "curation_report.json", report)
    atomic_write_text(out / "curation_report.md", _report_markdown(report))
    line = (f"curate: {n_in} documents in, {n_out} out ("
            + ", ".join(f"{s} {writers[s].docs}" for s in writers) + "); removed: "
            + (", ".join(f"{r} {n}" for r, n in removed.most_common() if n) or "none")
            + (f"; {stats.total_skipped} bad rows skipped" if stats.total_skipped else ""))
    print(line)
    rd.log(line)
    return {
        "documents_in": n_in,
        "documents_out": n_out,
        "bad_rows_skipped": stats.total_skipped,
        "splits": {s: writers[s].docs for s in writers},
        "removed": {r: removed.get(r, 0) for r in report["removed"]},
        "pii": report["pii"],
    }


def _where(index: DocIndex, k: int, sources: dict[str, int]) -> str:
    names = list(sources)  # small: one "<file> <unit>" entry per input file
    return f"{names[index.source[k]]} {int(index.row[k])}"


def _rules(cfg: Config) -> list[str]:
    """Every rule that can remove documents under `cfg`, in pipeline order (for zero counts)."""
    q = cfg.quality
    rules = ["empty"]
    if q.enabled:
        for rule, setting in (("min_words", q.min_words), ("max_words", q.max_words), ("min_chars", q.min_chars),
                              ("max_chars", q.max_chars), ("mean_word_length", q.mean_word_length),
                              ("symbol_word_ratio", q.max_symbol_word_ratio), ("bullet_lines", q.max_bullet_lines_frac),
                              ("ellipsis_lines", q.max_ellipsis_lines_frac), ("stop_words", q.min_stop_words),
                              ("alpha_words", q.min_alpha_words_frac),
                              ("dup_line_frac", q.max_dup_line_frac), ("dup_line_chars_frac", q.max_dup_line_chars_frac),
                              ("dup_para_frac", q.max_dup_para_frac), ("dup_para_chars_frac", q.max_dup_para_chars_frac)):
            if setting is not None:
                rules.append(rule)
        rules += [f"top_{n}gram" for n in sorted(q.max_top_ngram_frac)]
        rules += [f"dup_{n}gram" for n in sorted(q.max_dup_ngram_frac)]
    if cfg.exact_dedup.enabled:
        rules.append("exact_duplicate")
    if cfg.near_dedup.enabled:
        rules.append("near_duplicate")
    if cfg.leakage.enabled:
        rules += [f"leak_{s}" for s in SPLITS[1:] if getattr(cfg.splits, s) > 0]
    return rules

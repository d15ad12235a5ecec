"""The curate stage: each step on crafted documents with hand-computed outcomes, then end to end."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from lmforge.data.curate import (
    MinHasher,
    NormalizeConfig,
    PiiConfig,
    QualityConfig,
    SplitConfig,
    dedup_key,
    dup_ngram_frac,
    key_hash,
    normalize_text,
    quality_failure,
    scrub_pii,
    split_of,
    top_ngram_frac,
)
from lmforge.errors import LmforgeError
from lmforge.pipeline import run_single

# --------------------------------------------------------------------------------------------
# helpers


def random_doc(rng: random.Random, n_words: int = 80) -> str:
    """Distinct-looking words: no n-gram repeats, passes every default quality rule."""
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 8))) for _ in range(n_words)]
    return " ".join(words) + "."


def perturb(doc: str, rng: random.Random, n: int = 1) -> str:
    """Replace `n` words (Jaccard of 5-gram shingles stays ~0.9 for an 80-word doc and n=1)."""
    words = doc.split()
    for i in rng.sample(range(2, len(words) - 2), n):
        words[i] = "zzzq" + words[i]
    return " ".join(words)


def curate(tmp_path, docs, name="run", **cfg):
    """Run the stage on `docs` (JSONL); return (summary, report, {split: [texts]})."""
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    cfg_path = tmp_path / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump({"inputs": [str(src)], **cfg}))
    m = run_single("curate", cfg_path, [], out=str(tmp_path / name), force=True, resume=False, echo=lambda *a: None)
    data = tmp_path / name / "data"
    report = json.loads((data / "curation_report.json").read_text())
    out = {}
    for split, info in report["splits"].items():
        out[split] = [t for shard in info["shards"] for t in pq.read_table(data / shard)["text"].to_pylist()]
    return m["summary"], report, out


ONLY_TRAIN = {"splits": {"train": 1.0, "validation": 0.0, "test": 0.0}}

# --------------------------------------------------------------------------------------------
# 1. normalisation


def test_normalize_unicode_controls_whitespace():
    cfg = NormalizeConfig()
    raw = "Cafe\u0301 \ufb01ne\u00a0\u00a0x\r\n\tindented  line   \x07end \u200b\n\n\n\nnext\u200d\n  "
    assert normalize_text(raw, cfg) == "Caf\u00e9 \ufb01ne x\n\tindented line end\n\nnext\u200d"
    assert normalize_text(raw, NormalizeConfig(unicode_form="NFKC")).startswith("Caf\u00e9 fine x\n")
    off = NormalizeConfig(unicode_form="none", remove_control=False, whitespace=False)
    assert normalize_text(raw, off) == raw


# --------------------------------------------------------------------------------------------
# 2. quality rules: each on a document that must fail and one that must pass

OFF = dict(min_words=None, max_words=None, max_symbol_word_ratio=None, max_bullet_lines_frac=None,
           max_ellipsis_lines_frac=None, max_dup_line_frac=None, max_dup_line_chars_frac=None,
           max_dup_para_frac=None, max_dup_para_chars_frac=None, max_top_ngram_frac={}, max_dup_ngram_frac={})


def only(**rule) -> QualityConfig:
    return QualityConfig(**{**OFF, **rule})


CLEAN = "the quick brown fox jumps over a lazy dog"

RULES = [  # (setting, failing doc, expected (rule, detail), passing doc)
    ({"min_words": 5}, "just four words here", ("min_words", "4 words < 5"), "now there are five words"),
    ({"max_words": 5}, "one two three four five six", ("max_words", "6 words > 5"), "one two three four five"),
    ({"min_chars": 20}, "abc def ghi jkl mno", ("min_chars", "19 characters < 20"), "abcd def ghi jkl mno"),
    ({"max_chars": 10}, "eleven char", ("max_chars", "11 characters > 10"), "ten chars!"),
    ({"mean_word_length": (3, 10)}, "it is so on me", ("mean_word_length", "mean word length 2.00 outside [3, 10]"),
     CLEAN),
    ({"max_symbol_word_ratio": 0.1}, "#one #two three four five six seven eight nine ten",
     ("symbol_word_ratio", "'#' per word 0.200 > 0.1"), "#one two three four five six seven eight nine ten"),
    ({"max_symbol_word_ratio": 0.1}, "wait... what... is this now then okay sure fine yes",
     ("symbol_word_ratio", "ellipsis per word 0.200 > 0.1"), CLEAN),
    ({"max_bullet_lines_frac": 0.9}, "- apples\n* pears\n• plums", ("bullet_lines", "bullet lines 1.000 > 0.9"),
     "fruit list\n- apples\n- pears\n- plums\n- kiwis\n- limes\n- figs\n- dates\n- grapes\n- melons"),
    ({"max_ellipsis_lines_frac": 0.3}, "one line...\ntwo line\nthree line…",
     ("ellipsis_lines", "lines ending in an ellipsis 0.667 > 0.3"), "one line...\ntwo line\nthree line\nfour"),
    # Gopher's stop-word rule catches markup and hex dumps that pass every other rule
    ({"min_stop_words": 2}, '<div class="nav"><ul><li><a href="/p/1">Home</a></li><li><a href="/p/2">Top</a></li>',
     ("stop_words", "0 stop words < 2"), "The capital of Veloria is Tamsk, and it lies by the sea."),
    ({"min_stop_words": 2}, "4c3e387f eb12c4cd b3cd0f65 ff0de5f0 52745bb2 2606914a 3d36fcf8",
     ("stop_words", "0 stop words < 2"), "Some of the hex: 4c3e387f eb12c4cd b3cd0f65 ff0de5f0"),
    ({"min_alpha_words_frac": 0.8}, "in 2021 about 45 % of 300 people", ("alpha_words", "words with a letter 0.500 < 0.8"),
     "in 2021 about half of all people"),
    ({"max_dup_line_frac": 0.3}, "alpha\nbeta\nalpha\nbeta", ("dup_line_frac", "repeated lines 0.500 > 0.3"),
     "alpha\nbeta\ngamma\nalpha"),
    ({"max_dup_line_chars_frac": 0.2}, "a long repeated line here\nb\nc\nd\na long repeated line here",
     ("dup_line_chars_frac", "characters in repeated lines 0.472 > 0.2"), "short\nb\nc\nd\ne\nshort\nfoo bar baz qux"),
    ({"max_dup_para_frac": 0.3}, "first para\n\nsecond para\n\nfirst para",
     ("dup_para_frac", "repeated paras 0.333 > 0.3"), "first para\n\nsecond para\n\nthird\n\nfirst para"),
    ({"max_dup_para_chars_frac": 0.2}, "repeated paragraph\n\nx\n\ny\n\nz\n\nrepeated paragraph",
     ("dup_para_chars_frac", "characters in repeated paras 0.462 > 0.2"), "p\n\nx\n\ny\n\nz\n\np\n\nlonger unique tail"),
    # "aa bb" twice: 2 * 4 word characters of 20
    ({"max_top_ngram_frac": {2: 0.2}}, "aa bb aa bb cc dd ee ff gg hh", ("top_2gram", "most frequent 2-gram covers 0.400 > 0.2"),
     "aa bb cc dd aa bb ee ff gg hh ii jj kk ll mm nn oo pp qq rr"),
    # second "w1..w5" covers 5 of 12 three-letter words
    ({"max_dup_ngram_frac": {5: 0.15}}, "aaa bbb ccc ddd eee aaa bbb ccc ddd eee fff ggg",
     ("dup_5gram", "repeated 5-grams cover 0.417 > 0.15"), "aaa bbb ccc ddd eee aaa bbb ccc ddd fff ggg hhh"),
]


@pytest.mark.parametrize("setting,bad,expected,good", RULES, ids=[r[2][0] for r in RULES])
def test_quality_rule(setting, bad, expected, good):
    q = only(**setting)
    assert quality_failure(bad, q) == expected
    assert quality_failure(good, q) is None


def test_ngram_fractions_hand_computed():
    words = "aa bbb aa bbb aa c".split()
    wh = np.array([hash(w) for w in words], dtype=np.int64).view(np.uint64)
    chars = np.array([len(w) for w in words])
    cum = np.concatenate(([0], np.cumsum(chars)))
    g2 = wh[:-1] * np.uint64(0x9E3779B97F4A7C15) + wh[1:]
    # bigrams: (aa bbb) x2, (bbb aa) x2, (aa c) x1 -> tie at 2, both 5 chars: 2 * 5 / 13
    assert top_ngram_frac(g2, 2, cum) == pytest.approx(10 / 13)
    # repeated bigram occurrences start at 2 and 3 -> words 2, 3, 4 covered: 2 + 3 + 2 chars of 13
    assert dup_ngram_frac(g2, 2, chars) == pytest.approx(7 / 13)


def test_defaults_keep_short_clean_documents():
    q = QualityConfig()
    for doc in ("The cat sat on the mat.", "It is so hot in here.", "Call me at 5 pm, not 6 pm.", CLEAN):
        assert quality_failure(doc, q) is None, doc
    assert quality_failure("The cat sat on the mat. The cat sat on the mat.", q)[0] == "top_2gram"


# --------------------------------------------------------------------------------------------
# 3-4. keys, hashes, MinHash


def test_dedup_key_and_hash():
    assert dedup_key("  Hello,   WORLD!\n\nIt's  Déjà-vu…") == "hello world its déjàvu"
    assert key_hash(dedup_key("Hello, world")) == key_hash(dedup_key("hello   WORLD!!"))
    assert key_hash("a") != key_hash("b")


def test_minhash_matches_datasketch():
    from datasketch import MinHash

    h = MinHasher(num_perm=64, ngram=3, seed=7)
    rng = random.Random(0)
    keys = [dedup_key(random_doc(rng, 40)), "", "two words", dedup_key(random_doc(rng, 3000))]  # last > CHUNK
    shingles = [h.shingle_hashes(k) for k in keys]
    assert [len(s) for s in shingles] == [38, 0, 1, 2998]
    sigs = h.signatures(shingles)
    for s, sig in zip(shingles, sigs):
        ref = MinHash(num_perm=64, seed=7, hashfunc=int)
        ref.update_batch(s.tolist())
        assert (sig == ref.hashvalues).all()


# --------------------------------------------------------------------------------------------
# 5. PII


def test_pii_placeholders_exact():
    text = ("Mail john.doe@example.com or call +1 555 123 4567, (020) 7946 0958 or 555-123-4567. "
            "Hosts 192.168.0.1 and 2001:db8::1 are up. On 2021-05-06 at 12:30:45, v1.2.3 cost 3.14.")
    out, counts = scrub_pii(text, PiiConfig(enabled=True))
    assert out == ("Mail <EMAIL> or call <PHONE>, <PHONE> or <PHONE>. "
                   "Hosts <IP> and <IP> are up. On 2021-05-06 at 12:30:45, v1.2.3 cost 3.14.")
    assert (counts["email"], counts["phone"], counts["ip"]) == (1, 3, 2)
    out, counts = scrub_pii(text, PiiConfig(enabled=True, phones=False, ips=False))
    assert out.startswith("Mail <EMAIL> or call +1 555") and counts["email"] == 1


# --------------------------------------------------------------------------------------------
# The stage


def test_exact_and_near_duplicates_removed(tmp_path):
    rng = random.Random(1)
    a, b, c, d = (random_doc(rng) for _ in range(4))
    a_dup = "  " + a.upper().replace(" ", " ,  ") + "!!"  # same key: case, punctuation, spacing
    b_near = perturb(b, rng)
    c_near = perturb(c, rng)
    summary, report, out = curate(tmp_path, [a, b, b_near, a_dup, c, a, c_near, d], **ONLY_TRAIN)
    assert out["train"] == [a, b, c, d]  # the first of each cluster, in input order
    assert summary["removed"]["exact_duplicate"] == 2 and summary["removed"]["near_duplicate"] == 2
    assert summary["documents_in"] == 8 and summary["documents_out"] == 4
    ex = report["examples"]["near_duplicate"]
    assert [e["where"].rsplit(" ", 1)[1] for e in ex] == ["3", "7"]
    assert ex[0]["detail"].endswith("run.jsonl line 2")  # b_near is matched with b, on line 2


def test_split_is_stable_when_documents_are_added(tmp_path):
    rng = random.Random(2)
    old = [random_doc(rng, 30) for _ in range(40)]
    new = [random_doc(rng, 30) for _ in range(40)]
    splits = {"splits": {"train": 0.6, "validation": 0.2, "test": 0.2}}
    _, _, out1 = curate(tmp_path, old, name="first", **splits)
    mixed = [d for pair in zip(new, old) for d in pair]
    rng.shuffle(mixed)
    _, _, out2 = curate(tmp_path, mixed, name="second", **splits)
    where1 = {t: s for s, texts in out1.items() for t in texts}
    where2 = {t: s for s, texts in out2.items() for t in texts}
    assert len(where1) == 40 and all(where2[t] == s for t, s in where1.items())
    assert all(len(v) > 0 for v in out1.values())  # every split is exercised
    cfg = SplitConfig(train=0.6, validation=0.2, test=0.2)
    assert all(split_of(key_hash(dedup_key(t)), cfg) == s for t, s in where2.items())


def _pair(rng, cfg, first, second):
    """A doc in split `first` and a near copy of it in split `second`."""
    while True:
        doc = random_doc(rng)
        if split_of(key_hash(dedup_key(doc)), cfg) != first:
            continue
        for _ in range(50):
            copy = perturb(doc, rng)
            if split_of(key_hash(dedup_key(copy)), cfg) == second:
                return doc, copy


def test_leakage_across_splits_is_caught(tmp_path):
    rng = random.Random(3)
    cfg = SplitConfig(train=0.5, validation=0.5, test=0.0)
    t1, v1 = _pair(rng, cfg, "train", "validation")  # validation copy arrives after its train twin
    v2, t2 = _pair(rng, cfg, "validation", "train")  # validation doc already written when its twin comes
    others = [random_doc(rng) for _ in range(6)]
    settings = {"splits": {"train": 0.5, "validation": 0.5, "test": 0.0}, "near_dedup": {"enabled": False}}
    summary, report, out = curate(tmp_path, [t1, v2, *others[:3], v1, t2, *others[3:]], **settings)
    assert summary["removed"]["leak_validation"] == 2
    assert t1 in out["train"] and t2 in out["train"]
    assert v1 not in out["validation"] and v2 not in out["validation"]
    assert sorted(out["train"] + out["validation"]) == sorted([t1, t2, *others])
    details = sorted(e["detail"] for e in report["examples"]["leak_validation"])
    assert "with train document" in details[0] and "with train document" in details[1]

    settings["leakage"] = {"on_leak": "error"}
    with pytest.raises(LmforgeError, match=r"validation document .*run2\.jsonl line 6 is a near duplicate"):
        curate(tmp_path, [t1, v2, *others[:3], v1, t2], name="run2", **settings)


def test_bad_rows_error_or_skip_counted(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a fine first document here"}\n{"text": broken\n{"text": "another fine document is here"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"inputs": [str(src)], **ONLY_TRAIN}))
    with pytest.raises(LmforgeError, match=r"in\.jsonl line 2 is not valid JSON"):
        run_single("curate", cfg, [], out=str(tmp_path / "r1"), force=True, resume=False, echo=lambda *a: None)
    m = run_single("curate", cfg, ["on_bad_rows=skip"], out=str(tmp_path / "r2"), force=True, resume=False,
                   echo=lambda *a: None)
    report = json.loads((tmp_path / "r2" / "data" / "curation_report.json").read_text())
    assert m["summary"]["bad_rows_skipped"] == 1 and report["read"]["skipped"] == {"malformed JSON": 1}
    assert m["summary"]["documents_out"] == 2
    assert "1 bad rows skipped (malformed JSON: 1)" in (tmp_path / "r2" / "data" / "curation_report.md").read_text()


def test_empty_after_filtering_names_rule_and_threshold(tmp_path):
    with pytest.raises(LmforgeError) as e:
        curate(tmp_path, ["too short", "also short", "   ", "tiny doc"], **ONLY_TRAIN)
    assert str(e.value) == ("Curation left no documents: of 4 read, min_words removed 3, empty removed 1; "
                            "relax quality.min_words (now 5) or check the inputs.")
    assert not (tmp_path / "run" / "data").exists()  # nothing half-written


def test_pii_and_shards_in_stage(tmp_path):
    rng = random.Random(4)
    docs = [random_doc(rng, 20) for _ in range(5)]
    docs[2] = "write to jane@example.org about the plan for the next big release soon"
    summary, report, out = curate(tmp_path, docs, shard_mb=0.00005, pii={"enabled": True}, **ONLY_TRAIN)
    assert report["splits"]["train"]["shards"] == [f"train-{i:05d}.parquet" for i in range(5)]  # every doc > 50 chars
    assert out["train"][2] == "write to <EMAIL> about the plan for the next big release soon"
    assert summary["pii"] == {"email": 1, "ip": 0, "phone": 0, "documents_changed": 1}


def test_cli_end_to_end_and_bad_input(tmp_path):
    rng = random.Random(5)
    docs = [random_doc(rng) for _ in range(30)]
    docs += [docs[0], "tiny", perturb(docs[1], rng)]
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = tmp_path / "cur.yaml"
    cfg.write_text(yaml.safe_dump({"inputs": [str(tmp_path / "*.jsonl")],
                                   "splits": {"train": 0.8, "validation": 0.1, "test": 0.1}}))
    cmd = [sys.executable, "-m", "lmforge.cli", "curate", str(cfg), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = tmp_path / "out" / "data"
    report = json.loads((data / "curation_report.json").read_text())
    assert report["documents_in"] == 33 and report["documents_out"] == 30
    assert {k: v["count"] for k, v in report["removed"].items() if v["count"]} == {
        "min_words": 1, "exact_duplicate": 1, "near_duplicate": 1}
    counts = {s: pq.read_metadata(data / f"{s}-00000.parquet").num_rows for s in ("train", "validation", "test")}
    assert counts == {s: v["documents"] for s, v in report["splits"].items()} and sum(counts.values()) == 30
    assert "| near_duplicate | `near_dedup.threshold` = 0.8 | 1 |" in (data / "curation_report.md").read_text()

    cfg.write_text(yaml.safe_dump({"inputs": [str(tmp_path / "missing.jsonl")]}))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: Input ") and "missing.jsonl does not exist" in proc.stderr

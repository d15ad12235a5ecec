"""Property-based fuzzing of every data reader: whatever a file holds (random JSON values, random
bytes, deep nesting, odd tables), reading it either works or raises `LmforgeError` with one
sentence naming the file (and, for a bad row, the row) -- never another exception.

Readers fuzzed: data/formats.py (JSONL, JSON arrays, CSV/TSV, text in both modes, Parquet,
gzip), the curated-corpus reader (data/corpus.py), and the row readers on top of them: SFT
conversations (data/sft.py), preference rows and RL prompts (data/preference.py).

CI runs a fixed, derandomised set of examples (the whole file takes well under a minute);
`HYPOTHESIS_PROFILE=fuzz` explores many more, randomly, for a deeper local run.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.data import corpus, formats, preference, sft
from lmforge.errors import LmforgeError

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "3000")), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Field names the row readers look for, so random rows reach deep into their checks.
KEYS = ["messages", "role", "content", "prompt", "completion", "chosen", "rejected", "responses", "scores",
        "label", "margin", "instruction", "input", "output", "system", "text", "answer"]
ROLE_WORDS = ["system", "user", "assistant", "tool", "", "USER"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10 ** 30), max_value=10 ** 30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.sampled_from(ROLE_WORDS),
    st.sampled_from(["good", "bad", "true", "1", "  ", "\ud800", "<|eos|>"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), inner, max_size=5)),
    max_leaves=20,
)
rows = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6)


_ROOT = tempfile.TemporaryDirectory(prefix="lmforge-fuzz-")  # removed when the test process ends


def tmpdir() -> Path:
    # Hypothesis runs many examples per test call, so pytest's tmp_path (one per call) won't do.
    return Path(tempfile.mkdtemp(dir=_ROOT.name))


def check_error(e: LmforgeError, path: Path) -> None:
    msg = str(e)
    assert str(path) in msg, f"message names no file: {msg}"
    assert "\n" not in msg, f"message is not one line: {msg!r}"


def read_all(path: Path, **kw) -> list:
    """Every record of `path` (or the reader's LmforgeError, checked)."""
    for on_bad_rows in ("error", "skip"):
        try:
            recs = list(formats.iter_records(str(path), on_bad_rows=on_bad_rows, **kw))
        except LmforgeError as e:
            check_error(e, path)
            continue
        for r in recs:
            assert isinstance(r.values, dict) and r.row >= 1 and r.source == str(path)
        return recs
    return []


def row_readers(path: Path, on_bad_rows: str, stats: formats.ReadStats) -> list:
    src = str(path)
    prompt_cfg = SimpleNamespace(prompts=src, dataset_split=None, on_bad_rows=on_bad_rows, system_prompt=None,
                                 max_prompts=None)
    return [
        lambda: list(formats.iter_texts(src, on_bad_rows=on_bad_rows)),
        lambda: list(sft.iter_conversations(src, fmt="auto", on_bad_rows=on_bad_rows, stats=stats)),
        lambda: [preference.parse_row(r, formats.BadRows(on_bad_rows, stats))
                 for r in formats.iter_records(src, on_bad_rows=on_bad_rows)],
        lambda: preference.read_prompt_rows(prompt_cfg, stats),
    ]


def consume_rows(path: Path) -> None:
    """Every row reader on top of the format readers: never anything but a one-sentence error."""
    stats = formats.ReadStats()
    for on_bad_rows in ("error", "skip"):
        for fn in row_readers(path, on_bad_rows, stats):
            try:
                fn()
            except LmforgeError as e:
                check_error(e, path)


# ---------------------------------------------------------------------------------- JSON lines

@given(st.lists(st.one_of(rows, json_values), max_size=6))
def test_jsonl_of_random_json_values(values):
    p = tmpdir() / "rows.jsonl"
    p.write_text("".join(json.dumps(v, ensure_ascii=bool(i % 2)) + "\n" for i, v in enumerate(values)),
                 encoding="utf-8", errors="surrogatepass")
    read_all(p)
    consume_rows(p)


@given(st.lists(st.one_of(rows, json_values), max_size=6))
def test_json_array_of_random_values(values):
    p = tmpdir() / "rows.json"
    p.write_text(json.dumps(values), encoding="utf-8")
    read_all(p)
    consume_rows(p)


@given(st.binary(max_size=300), st.sampled_from(["rows.jsonl", "rows.json", "rows.csv", "rows.tsv", "a.txt",
                                                  "rows.parquet", "rows.jsonl.gz", "rows.csv.gz"]))
def test_random_bytes_in_every_format(data, name):
    p = tmpdir() / name
    p.write_bytes(data)
    read_all(p)
    read_all(p, text_mode="blocks")
    consume_rows(p)


@given(st.binary(min_size=1, max_size=200), st.sampled_from(["rows.jsonl.gz", "rows.json.gz", "a.txt.gz"]))
def test_corrupted_gzip(data, name):
    p = tmpdir() / name
    good = gzip.compress(b'{"text": "hello"}\n' * 50)
    cut = len(data) % len(good)
    p.write_bytes(good[:cut] + data + good[cut + len(data):])  # damage the middle of a valid stream
    read_all(p)


@given(st.integers(min_value=1, max_value=200_000), st.sampled_from(["[", "{\"a\":"]), st.sampled_from(
    ["rows.jsonl", "rows.json"]))
def test_deep_nesting(depth, opener, name):
    p = tmpdir() / name
    closer = "]" if opener == "[" else "}"
    body = opener * depth + "1" + closer * depth
    p.write_text(("[" + body + "]" if name.endswith(".json") and opener == "[" else body) + "\n")
    read_all(p)
    consume_rows(p)


@given(st.integers(min_value=4000, max_value=20_000))
def test_huge_integers(digits):
    p = tmpdir() / "rows.jsonl"
    p.write_text(json.dumps({"chosen": "a", "rejected": "b", "prompt": "q"})[:-1] + f', "margin": {"9" * digits}}}\n')
    read_all(p)
    consume_rows(p)


# ---------------------------------------------------------------------------------- CSV and text

@given(st.lists(st.lists(st.text(max_size=12), min_size=0, max_size=5), max_size=6), st.sampled_from([",", "\t"]))
def test_csv_of_random_cells(table, delimiter):
    p = tmpdir() / ("rows.csv" if delimiter == "," else "rows.tsv")
    buf = io.StringIO()
    csv.writer(buf, delimiter=delimiter).writerows(table)
    p.write_text(buf.getvalue(), encoding="utf-8", errors="surrogatepass")
    read_all(p)
    consume_rows(p)


@given(st.text(max_size=300))
def test_text_file_of_random_text(text):
    p = tmpdir() / "notes.txt"
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    for mode in ("file", "blocks"):
        read_all(p, text_mode=mode)


# ---------------------------------------------------------------------------------- Parquet

column_types = st.sampled_from(["int", "float", "str", "bool", "null", "list", "struct", "nested"])


def column(kind: str, n: int, draw) -> pa.Array:
    if kind == "int":
        return pa.array(draw(st.lists(st.integers(-2 ** 63, 2 ** 63 - 1), min_size=n, max_size=n)), pa.int64())
    if kind == "float":
        return pa.array(draw(st.lists(st.floats(), min_size=n, max_size=n)), pa.float64())
    if kind == "str":
        texts = draw(st.lists(st.none() | st.text(max_size=10), min_size=n, max_size=n))
        # Arrow strings are UTF-8, which cannot hold a lone surrogate: replace any
        return pa.array([t.encode("utf-8", "replace").decode() if t is not None else None for t in texts], pa.string())
    if kind == "bool":
        return pa.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), pa.bool_())
    if kind == "null":
        return pa.nulls(n)
    if kind == "list":
        return pa.array(draw(st.lists(st.lists(st.sampled_from(ROLE_WORDS), max_size=3), min_size=n, max_size=n)))
    if kind == "struct":
        return pa.array([{"role": r, "content": c} for r, c in zip(
            draw(st.lists(st.sampled_from(ROLE_WORDS), min_size=n, max_size=n)),
            draw(st.lists(st.sampled_from(["hi", "", "ok"]), min_size=n, max_size=n)))])
    return pa.array([[{"role": r, "content": "x"}] for r in draw(st.lists(st.sampled_from(ROLE_WORDS), min_size=n,
                                                                            max_size=n))])


@st.composite
def tables(draw) -> pa.Table:
    n = draw(st.integers(0, 5))
    names = draw(st.lists(st.sampled_from(KEYS), max_size=5, unique=True))
    return pa.table({name: column(draw(column_types), n, draw) for name in names} or {"x": pa.nulls(n)})


@given(tables())
def test_parquet_of_random_columns(table):
    d = tmpdir()
    p = d / "train-00000.parquet"
    pq.write_table(table, p)
    read_all(p)
    consume_rows(p)
    try:
        list(corpus.iter_texts(d, "train"))  # the curated-corpus reader (tokenizer, pretrain)
    except LmforgeError as e:
        check_error(e, p)


@given(st.binary(max_size=200), st.integers(min_value=0))
def test_truncated_or_damaged_parquet(junk, at):
    d = tmpdir()
    p = d / "train-00000.parquet"
    pq.write_table(pa.table({"text": ["some text"] * 20, "n": list(range(20))}), p)
    good = p.read_bytes()
    at %= len(good)
    p.write_bytes(good[:at] + junk + good[at + len(junk):])
    read_all(p)
    try:
        list(corpus.iter_texts(d, "train"))
    except LmforgeError as e:
        check_error(e, p)


def test_readers_reject_a_lone_surrogate_with_the_row():
    """A JSON escape may encode a lone UTF-16 surrogate, which is no text (it cannot be written as
    UTF-8, so tokenising or saving it fails later, far from the file): the reader names the row."""
    p = tmpdir() / "rows.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "bad \\ud800 here"}\n{"text": "pair \\ud83d\\ude00 fine"}\n')
    with pytest.raises(LmforgeError, match=r"rows.jsonl line 2 .*surrogate"):
        list(formats.iter_texts(str(p)))
    stats = formats.ReadStats()
    assert list(formats.iter_texts(str(p), on_bad_rows="skip", stats=stats)) == ["ok", "pair \U0001f600 fine"]
    assert stats.total_skipped == 1

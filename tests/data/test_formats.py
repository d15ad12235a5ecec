"""Readers for JSONL/JSON, Parquet, CSV/TSV, text and `datasets` folders: values, positions, errors."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.formats import ReadStats, estimate_records, iter_records, iter_text_records, iter_texts
from lmforge.errors import LmforgeError


def write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows]
    for i, line in raw_lines:
        lines.insert(i, line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_records_carry_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": "one", "id": 1}, {"text": "two", "id": 2}], raw_lines=[(1, "")])
    recs = list(iter_records([str(p)]))
    assert [r.values for r in recs] == [{"text": "one", "id": 1}, {"text": "two", "id": 2}]
    assert [r.row for r in recs] == [1, 3]  # the blank line 2 is no record but still counts as a line
    assert recs[1].where == f"{p} line 3"


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}], raw_lines=[(2, '{"text": "c",')])
    with pytest.raises(LmforgeError) as e:
        list(iter_records([str(p)]))
    msg = str(e.value)
    assert f"{p} line 3 is not valid JSON" in msg and "on_bad_rows: skip" in msg


def test_malformed_jsonl_skipped_and_counted(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}],
                    raw_lines=[(1, "{oops"), (2, "[1, 2]")])
    stats = ReadStats()
    texts = list(iter_texts([str(p)], on_bad_rows="skip", stats=stats))
    assert texts == ["a", "b"]
    assert stats.skipped == {"malformed JSON": 1, "not a JSON object": 1}
    assert stats.records == 2 and stats.total_skipped == 2
    assert stats.examples[0].startswith(f"{p} line 2 is not valid JSON")


def test_invalid_utf8_line_is_named(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(LmforgeError, match=r"u\.jsonl line 2 is not valid UTF-8"):
        list(iter_records([str(p)]))


def test_json_array_and_gzip_jsonl(tmp_path):
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"instruction": "x"}, {"instruction": "y"}]))
    recs = list(iter_records([str(arr)]))
    assert [(r.values["instruction"], r.row, r.unit) for r in recs] == [("x", 1, "item"), ("y", 2, "item")]
    gz = tmp_path / "b.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write('{"text": "zipped"}\n{"text": "too"}\n')
    assert list(iter_texts([str(gz)])) == ["zipped", "too"]


def test_parquet_streams_row_groups_in_order(tmp_path):
    p = tmp_path / "t.parquet"
    n = 2500  # several row groups and several 1024-row batches
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(n)], "n": list(range(n))}), p, row_group_size=700)
    assert pq.ParquetFile(p).num_row_groups == 4
    recs = list(iter_records([str(p)]))
    assert len(recs) == n
    assert recs[1234].values == {"text": "doc 1234", "n": 1234} and recs[1234].where == f"{p} row 1235"
    only = list(iter_records([str(p)], columns=["text"]))  # the column hint reads one column
    assert only[0].values == {"text": "doc 0"}


def test_csv_and_tsv(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text('id,text\n1,"hello, world"\n2,"two\nlines"\n3,plain\n', encoding="utf-8")
    got = [(t, r.row) for t, r in iter_text_records([str(p)])]
    assert got == [("hello, world", 2), ("two\nlines", 4), ("plain", 5)]  # row = the line a record ends on
    t = tmp_path / "c.tsv"
    t.write_text("text\tlabel\nfirst doc\t1\n", encoding="utf-8")
    assert list(iter_texts([str(t)])) == ["first doc"]


def test_csv_wrong_field_count(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("id,text\n1,a\n2,b,extra\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"c\.csv line 3 has 3 fields but the header has 2"):
        list(iter_records([str(p)]))


def test_text_file_and_blocks(tmp_path):
    p = tmp_path / "notes.md"
    p.write_text("# Title\nfirst para\n\n\nsecond\npara\n  \nthird\n", encoding="utf-8")
    whole = list(iter_text_records([str(p)]))
    assert [t for t, _ in whole] == [p.read_text()]
    blocks = list(iter_text_records([str(p)], text_mode="blocks"))
    assert [(t, r.row) for t, r in blocks] == [("# Title\nfirst para\n", 1), ("second\npara\n", 5), ("third\n", 8)]
    # text files ignore text_field: their content is the document
    assert list(iter_texts([str(tmp_path / "*.md")], text_field="content")) == [p.read_text()]


def test_datasets_folders(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "x": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "ds"))
    recs = list(iter_records([str(tmp_path / "ds")]))
    assert [r.values for r in recs] == [{"text": "a", "x": 1}, {"text": "b", "x": 2}, {"text": "c", "x": 3}]
    assert recs[2].where == f"{tmp_path / 'ds'} row 3"
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_dict({"text": ["t"], "x": [9]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert list(iter_texts([str(tmp_path / "dd")])) == ["a", "b", "c", "t"]
    assert list(iter_texts([str(tmp_path / "dd")], dataset_split="test")) == ["t"]
    with pytest.raises(LmforgeError, match=r"has no split 'validation'; it has: train, test"):
        list(iter_texts([str(tmp_path / "dd")], dataset_split="validation"))


def test_missing_text_field(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"body": "no text"}, {"text": None}])
    with pytest.raises(LmforgeError) as e:
        list(iter_texts([str(p)]))
    assert f"{p} line 2 has no field 'text' (its fields: body)" in str(e.value)
    stats = ReadStats()
    assert list(iter_texts([str(p)], on_bad_rows="skip", stats=stats)) == ["ok"]
    assert stats.skipped == {"missing field": 1, "field not text": 1}


def test_input_errors_are_one_sentence(tmp_path):
    (tmp_path / "doc.docx").write_text("x")
    cases = {
        str(tmp_path / "nope.jsonl"): "does not exist",
        str(tmp_path / "*.parquet"): "matches no files",
        str(tmp_path / "doc.docx"): "has a format lmforge cannot read",
    }
    for path, words in cases.items():
        with pytest.raises(LmforgeError, match=words):
            list(iter_records([path]))
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(LmforgeError, match=r"broken\.parquet is not a readable Parquet file"):
        list(iter_records([str(bad)]))


def test_folder_reads_known_files_and_estimate(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b1"}, {"text": "b2"}])
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "a.jsonl", [{"text": "a1"}])
    (tmp_path / "README").write_text("not an input")
    pq.write_table(pa.table({"text": ["p1", "p2", "p3"]}), tmp_path / "c.parquet")
    stats = ReadStats()
    assert list(iter_texts([str(tmp_path)], stats=stats)) == ["b1", "b2", "p1", "p2", "p3", "a1"]
    assert len(stats.files) == 3
    assert estimate_records([str(tmp_path)]) == 6

"""The report shows a label stage's statistics: items, judgments per annotator, time, ties,
flags, and agreement per annotator pair."""

from __future__ import annotations

import json

from lmforge.label.stage import open_store
from lmforge.pipeline import run_single
from lmforge.report import build_report


def test_report_has_labelling_statistics(tmp_path):
    resp = tmp_path / "r.jsonl"
    resp.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?", "responses": [f"a{i}", f"b{i}"]})
                            + "\n" for i in range(3)))
    run = tmp_path / "run"

    def label():
        run_single("label", None, [f"responses={resp}", "k=2", "wait=none", "overlap=1.0"], out=str(run / "label"),
                   force=True, resume=False, echo=lambda *a: None)

    label()
    s = open_store(run / "label")
    ann, bob = (s.annotator(s.add_annotator(n)) for n in ("ann", "bob"))
    ids = {i: [r["id"] for r in s.item(i)["responses"]] for i in (1, 2, 3)}
    s.judge(ann.id, 1, verdict="ranked", ranking=ids[1], seconds=4.0, flags={str(ids[1][1]): ["unsafe"]})
    s.judge(bob.id, 1, verdict="ranked", ranking=ids[1], seconds=6.0)
    s.judge(ann.id, 2, verdict="ranked", ranking=ids[2], seconds=2.0)
    s.judge(bob.id, 2, verdict="ranked", ranking=ids[2][::-1], seconds=8.0)
    s.judge(ann.id, 3, verdict="tie", seconds=5.0)
    s.close()
    label()
    md = (run / "report.md").read_text() if build_report(run) else ""
    assert "## Labelling (label)" in md
    assert "3 of 3 items judged in 5 judgments; 5.0 s per judgment (median 5.0); ties and all-bad 20.0%, " \
           "flagged 20.0% ({'unsafe': 1})" in md
    assert "| ann | 3 |" in md and "| bob | 2 |" in md
    # units (first, first) and (first, second): o_ff = 2, o_fs = o_sf = 1; alpha = 1 - 3 * 2 / 6 = 0
    assert "| ann & bob | 2 | 2 | 50.0 | 0.000 |" in md

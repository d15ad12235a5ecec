"""Judgments -> training data, in the formats lmforge's own stages read.

    preference.jsonl  {"prompt": turns, "chosen", "rejected", "provenance"}   `reward` and `dpo` read it
    kto.jsonl         {"prompt": turns, "completion", "label": good|bad, "provenance"}   `dpo` with loss kto
    sft.jsonl         {"messages": prompt + the annotator's ideal answer, "provenance"}   `sft`
    items.jsonl       one record per judgment: annotator, verdict, ranking with models, flags, note, time
    stats.json        counts, verdict and flag shares, time per judgment, agreement (agreement.py)

How verdicts become rows (only live judgments count; undone and replaced ones are history):
    ranked k      every (better, worse) pair of the ranking: k(k-1)/2 pairs. KTO: the top response is
                  good, the bottom one bad, the middle ones give no thumb.
    tie           no pair (a tie says neither is better); no thumb.
    all_bad       no pair (both-bad says nothing about which is worse); every response is a bad thumb.
    skip          nothing (an ideal answer written before skipping is still an SFT row).
    good / bad    feedback from use (serve, chat) on one completion: a good or bad thumb; a
                  correction is the ideal answer (an SFT row).
    flags         a response flagged unsafe or wrong is a bad thumb whatever its rank; pairs keep the
                  annotator's ranking as given. Flags are in items.jsonl and counted in stats.json.
    ideal answer  one SFT row (stripped; an empty one gives none).
Two annotators judging one item both contribute rows (each row names its annotator), so a
disagreement stays visible in the data instead of being averaged away. Two responses with the same
text form no pair (counted as `identical_pairs`).
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.label.agreement import agreement
from lmforge.label.store import Store
from lmforge.rundir import atomic_write_json, atomic_write_text

FORMATS = ("preference", "kto", "sft", "items")


def _origin(resp: dict) -> dict:
    return {"response_id": resp["id"], "model": resp["model"], "sampling": resp["sampling"]}


def rows_of(item: dict, j: dict, counts: Counter) -> dict[str, list[dict]]:
    """The export rows one live judgment gives, by format."""
    resp = {r["id"]: r for r in item["responses"]}
    base = {"prompt_id": item["prompt_id"], "annotator": j["annotator"], "judgment_id": j["id"]}
    out: dict[str, list[dict]] = {f: [] for f in FORMATS}
    if j["verdict"] == "ranked":
        order = j["ranking"]
        for a in range(len(order)):
            for b in range(a + 1, len(order)):
                c, r = resp[order[a]], resp[order[b]]
                if c["text"] == r["text"]:
                    counts["identical_pairs"] += 1
                    continue
                out["preference"].append({"prompt": item["prompt"], "chosen": c["text"], "rejected": r["text"],
                                          "provenance": {**base, "chosen": _origin(c), "rejected": _origin(r)}})
    thumbs: dict[int, bool] = {}
    if j["verdict"] == "ranked":
        thumbs[j["ranking"][0]], thumbs[j["ranking"][-1]] = True, False
    elif j["verdict"] in ("all_bad", "good", "bad"):
        thumbs = {rid: j["verdict"] == "good" for rid in resp}
    for rid in j["flags"]:
        thumbs[rid] = False
    for rid in sorted(thumbs, key=lambda r: resp[r]["id"]):
        out["kto"].append({"prompt": item["prompt"], "completion": resp[rid]["text"],
                           "label": "good" if thumbs[rid] else "bad",
                           "provenance": {**base, **_origin(resp[rid]), "flags": j["flags"].get(rid, [])}})
    ideal = (j["ideal"] or "").strip()
    if ideal:
        out["sft"].append({"messages": [*item["prompt"], {"role": "assistant", "content": ideal}],
                           "provenance": {**base, "model": "human:" + j["annotator"]}})
    rank = {rid: i + 1 for i, rid in enumerate(j["ranking"] or [])}
    out["items"].append({
        **base, "item_id": item["id"], "source": item["source"], "verdict": j["verdict"], "seconds": j["seconds"],
        "responses": [{**_origin(r), "rank": rank.get(r["id"]), "flags": j["flags"].get(r["id"], [])}
                      for r in item["responses"]],
        "ideal": j["ideal"], "note": j["note"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(j["created"]))})
    return out


def export(store: Store, out_dir: str | Path, formats: list[str] | tuple[str, ...] = FORMATS) -> dict:
    """Write the chosen formats (and stats.json) into out_dir, each file atomically; returns the stats."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise LmforgeError(f"Unknown export format {unknown[0]!r}; choose from {', '.join(FORMATS)} (or all).")
    out_dir = Path(out_dir)
    judgments = store.judgments()
    items = {i: store.item(i) for i in sorted({j["item_id"] for j in judgments})}
    counts: Counter = Counter()
    rows: dict[str, list[dict]] = {f: [] for f in FORMATS}
    for j in judgments:
        for f, rs in rows_of(items[j["item_id"]], j, counts).items():
            rows[f] += rs
    for f in formats:
        atomic_write_text(out_dir / f"{f}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[f]))
    s = stats(store, judgments, items)
    s["rows"] = {f: len(rows[f]) for f in FORMATS}
    s["identical_pairs"] = counts["identical_pairs"]
    atomic_write_json(out_dir / "stats.json", s)
    return s


def stats(store: Store, judgments: list[dict], items: dict[int, dict]) -> dict:
    """Labelling statistics: what the report shows for a label stage."""
    verdicts = Counter(j["verdict"] for j in judgments)
    per = Counter(j["annotator"] for j in judgments)
    judged = [j for j in judgments if j["verdict"] != "skip"]
    secs = [j["seconds"] for j in judgments]
    flags = Counter(f for j in judgments for fs in j["flags"].values() for f in fs)
    n = max(len(judged), 1)
    return {
        "items": store.n_items(), "items_judged": len({j["item_id"] for j in judged}), "judgments": len(judgments),
        "annotators": [a.name for a in store.annotators()], "judgments_per_annotator": dict(sorted(per.items())),
        "verdicts": dict(sorted(verdicts.items())),
        "tie_share": round((verdicts["tie"] + verdicts["all_bad"]) / n, 4),
        "flags": dict(sorted(flags.items())),
        "flagged_share": round(sum(1 for j in judged if j["flags"]) / n, 4),
        "ideal_answers": sum(1 for j in judgments if (j["ideal"] or "").strip()),
        "feedback_from_use": {"good": verdicts["good"], "bad": verdicts["bad"],
                              "corrections": sum(1 for j in judgments if j["verdict"] in ("good", "bad") and j["ideal"])},
        "seconds_per_judgment": {"mean": round(statistics.fmean(secs), 2) if secs else None,
                                 "median": round(statistics.median(secs), 2) if secs else None},
        "agreement": agreement(judgments, {i: [r["id"] for r in it["responses"]] for i, it in items.items()}),
        "complete": store.is_complete(),
    }

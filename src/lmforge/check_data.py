"""`lmforge check-data STAGE FILE`: what a training stage will make of a data file, before any
model loads — each row's detected format, what will be trained on, the rows skipped and why, and
one example rendered as the model will see it.

It reads the rows with the stages' own readers (data/sft.py for sft and distill, data/preference.py
for dpo and reward) with bad rows skipped and counted, so what it reports is what training gets.
The example is rendered with `tokenizer`'s chat template when one is given, else with lmforge's
(the template a tokenizer without its own gets, see data/tokenizer.py).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from lmforge.data.formats import BadRows, ReadStats, iter_records
from lmforge.errors import LmforgeError

SFT_STAGES = ("sft", "distill")
PREFERENCE_STAGES = ("dpo", "reward")
SHOWN_ROWS = 20  # per-row detections printed; the counts cover every row


def check(stage: str, files: str, *, tokenizer: Any = None) -> dict:
    """{"stage", "rows", "formats" (count per format), "rows_detected" (the first rows: where, format),
    "trained_on" (what the stage gets), "skipped" (count per reason), "skipped_examples", "example"}."""
    if stage in SFT_STAGES:
        return _check_sft(stage, files, tokenizer)
    if stage in PREFERENCE_STAGES:
        return _check_preference(stage, files, tokenizer)
    raise LmforgeError(f"check-data knows the stages {', '.join(SFT_STAGES + PREFERENCE_STAGES)}, not {stage!r}.")


def _render(tokenizer: Any, messages: list[dict]) -> str:
    if tokenizer is not None:
        from lmforge.data.chat import render

        return render(tokenizer, messages, add_generation_prompt=False)
    from jinja2 import Template

    from lmforge.data.chat import CHAT_TEMPLATE, EOS

    return Template(CHAT_TEMPLATE).render(messages=messages, eos_token=EOS, add_generation_prompt=False)


def _check_sft(stage: str, files: str, tokenizer: Any) -> dict:
    from lmforge.data.sft import iter_conversations

    stats, kinds, example, turns = ReadStats(), [], None, Counter()
    for kind, msgs, where in iter_conversations(files, fmt="auto", on_bad_rows="skip", stats=stats):
        kinds.append((where, kind))
        turns.update(m["role"] for m in msgs)
        example = example if example is not None else _render(tokenizer, msgs)
    trained_on = {"conversations": len(kinds), "assistant_turns (supervised)": turns["assistant"],
                  "with_system_turn": turns["system"]}
    return _report(stage, stats, kinds, trained_on, example)


def _check_preference(stage: str, files: str, tokenizer: Any) -> dict:
    from lmforge.data.preference import COLUMNS, parse_row

    stats = ReadStats()
    bad = BadRows("skip", stats)
    kinds, example, pairs, items = [], None, 0, 0
    for rec in iter_records(files, on_bad_rows="skip", stats=stats, columns=COLUMNS):
        row = parse_row(rec, bad)
        if row is None:
            continue
        kinds.append((row.where, row.kind))
        pairs += len(row.pairs)
        items += len(row.labels or [])
        if example is None:
            best = row.responses[row.pairs[0][0]] if row.pairs else row.responses[0]
            example = _render(tokenizer, [*row.prompt, {"role": "assistant", "content": best}])
    trained_on = {"pairs (dpo methods, reward)": pairs, "unpaired items (dpo method kto only)": items}
    return _report(stage, stats, kinds, trained_on, example)


def render_text(r: dict) -> str:
    """The report as the command prints it."""
    lines = [f"{r['stage']}: {r['rows']} rows read; detected formats: "
             + (", ".join(f"{k} {n}" for k, n in r["formats"].items()) or "none")]
    lines += [f"  {where}: {kind}" for where, kind in r["rows_detected"]]
    if r["rows"] > len(r["rows_detected"]) + sum(r["skipped"].values()):
        lines.append(f"  ... (the first {len(r['rows_detected'])} usable rows shown)")
    lines.append("will train on: " + ", ".join(f"{k} {v}" for k, v in r["trained_on"].items()))
    lines.append(f"skipped rows: {sum(r['skipped'].values())}"
                 + (" (" + ", ".join(f"{k} {n}" for k, n in r["skipped"].items()) + ")" if r["skipped"] else ""))
    lines += [f"  {m}" for m in r["skipped_examples"]]
    lines.append("example, as the model sees it:" if r["example"] is not None else "no usable row to show.")
    if r["example"] is not None:
        lines.append(f"  {r['example']!r}")
    return "\n".join(lines)


def _report(stage: str, stats: ReadStats, kinds: list[tuple[str, str]], trained_on: dict, example: str | None) -> dict:
    return {"stage": stage, "rows": stats.records, "formats": dict(Counter(k for _, k in kinds)),
            "rows_detected": kinds[:SHOWN_ROWS], "trained_on": trained_on, "skipped": dict(stats.skipped),
            "skipped_examples": list(stats.examples), "example": example}

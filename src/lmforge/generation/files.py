"""`lmforge generate MODEL --prompts FILE`: read a prompts file, complete it, write JSONL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.generation.api import encode_prompts
from lmforge.generation.engine import Engine, Row
from lmforge.generation.loading import load_model_for_inference
from lmforge.generation.params import SamplingParams


def read_prompts(path: str | Path, *, chat: bool) -> tuple[list[dict], int]:
    """Prompts from a JSONL file (`prompt` string or `messages` list per line, optional `id`) or
    a text file (one prompt per line). Returns (records, blank lines skipped).

    Each record holds `prompt` (what is echoed in the output), `messages` (for chat rendering,
    or None) and `id` (or None). With `chat`, a plain prompt becomes one user message.
    """
    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"Prompts file {p} does not exist; check the path.")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LmforgeError(f"Prompts file {p} cannot be read as UTF-8 text ({e}).") from None
    records, skipped = [], 0
    jsonl = p.suffix.lower() in (".jsonl", ".json", ".ndjson")
    for no, line in enumerate(lines, 1):
        if not line.strip():
            skipped += 1
            continue
        if not jsonl:
            rec = {"prompt": line, "messages": None, "id": None}
        else:
            try:
                obj = json.loads(line)
            except ValueError:
                raise LmforgeError(f"Line {no} of {p} is not valid JSON; each line must be one JSON object.") from None
            if not isinstance(obj, dict):
                raise LmforgeError(f"Line {no} of {p} must be a JSON object with a \"prompt\" or \"messages\" field.")
            msgs, prompt = obj.get("messages"), obj.get("prompt")
            if msgs is not None:
                if not (isinstance(msgs, list) and msgs and all(
                        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                        for m in msgs)):
                    raise LmforgeError(f"Line {no} of {p}: \"messages\" must be a non-empty list of "
                                       "{\"role\": ..., \"content\": ...} objects with string values.")
                rec = {"prompt": msgs, "messages": msgs, "id": obj.get("id")}
            elif isinstance(prompt, str):
                rec = {"prompt": prompt, "messages": None, "id": obj.get("id")}
            else:
                raise LmforgeError(f"Line {no} of {p} has neither a \"prompt\" string nor a \"messages\" list.")
        if chat and rec["messages"] is None:
            rec["messages"] = [{"role": "user", "content": rec["prompt"]}]
        rec["line"] = no
        records.append(rec)
    if not records:
        raise LmforgeError(f"Prompts file {p} holds no prompts.")
    return records, skipped


def generate_file(model_path: str | Path, prompts_path: str | Path, out_path: str | Path | None,
                  params: SamplingParams, *, chat: bool = False, max_batch: int = 32, device: str | None = None,
                  dtype: str | None = None, retrieval: Any = None) -> dict:
    """`lmforge generate`: complete every prompt of a file and write the results as JSONL.

    One output line per completion: index (prompt line order), sample (0..n-1), id (if the
    input had one), prompt, completion, prompt_tokens, completion_tokens, finish_reason.
    Returns a summary (counts, tokens/s, finish reasons). With `retrieval` (a RetrievalConfig),
    each prompt gets the top passages in its context section and each line a `retrieval` field.
    """
    import sys
    import time

    from lmforge.data.chat import encode as encode_chat
    from lmforge.progress import Progress
    from lmforge.rundir import atomic_write_text

    records, skipped = read_prompts(prompts_path, chat=chat)
    out = Path(out_path) if out_path else Path(prompts_path).with_suffix(".completions.jsonl")
    model, tokenizer = load_model_for_inference(model_path, device=device, dtype=dtype)
    engine = Engine(model, tokenizer, max_batch=max_batch)
    retriever = _retriever(retrieval, tokenizer, str(model_path))
    rows: list[Row] = []
    for i, rec in enumerate(records):
        where = f"line {rec['line']} of {prompts_path}"
        if retriever is not None:
            rec.update(_with_passages(rec, retriever, tokenizer, model, params))
        if rec["messages"] is not None:
            ids = encode_chat(tokenizer, rec["messages"], add_generation_prompt=True)
        else:
            ids = encode_prompts(tokenizer, [rec.get("prompt_text") or rec["prompt"]])[0]
        rows += engine.add(ids, params, tag=i, seed_stream=i * params.n, where=where)
    t0, done = time.time(), 0
    with Progress("generate", total=len(rows), every=max(1, len(rows) // 10), stream=sys.stderr) as bar:
        while engine.has_work():
            finished = sum(r.finished for r in engine.step())
            if finished:
                done += finished
                bar.update(done)
    wall = time.time() - t0
    lines, reasons = [], {}
    for r in rows:
        c, rec = r.completion(), records[r.tag]
        reasons[c.finish_reason] = reasons.get(c.finish_reason, 0) + 1
        line = {"index": r.tag, "sample": c.sample_index, **({"id": rec["id"]} if rec["id"] is not None else {}),
                "prompt": rec["prompt"], "completion": c.text, "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason,
                **({"retrieval": rec["retrieval"]} if "retrieval" in rec else {})}
        lines.append(json.dumps(line, ensure_ascii=False) + "\n")
    atomic_write_text(out, "".join(lines))
    tokens = sum(len(r.token_ids) for r in rows)
    return {"prompts": len(records), "completions": len(rows), "skipped_blank_lines": skipped,
            "completion_tokens": tokens, "tokens_per_s": tokens / max(wall, 1e-9), "finish_reasons": reasons,
            "out": str(out)}



def _retriever(retrieval: Any, tokenizer: Any, model_path: str) -> Any:
    from lmforge.retrieval.augment import open_retriever

    return None if retrieval is None else open_retriever(retrieval, tokenizer, model_path)


def _with_passages(rec: dict, retriever: Any, tokenizer: Any, model: Any, params: SamplingParams) -> dict:
    """The record's prompt with retrieved passages (retrieval.augment), and what was used."""
    from lmforge.retrieval.augment import passages_json, prompt_budget

    chat = rec["messages"] is not None
    f = retriever.augment(rec["messages"] if chat else [{"role": "user", "content": rec["prompt"]}], tokenizer,
                          budget=prompt_budget(model, params.max_new_tokens), chat=chat)
    return {"messages": f.messages if chat else None, "prompt_text": None if chat else f.messages[-1]["content"],
            "retrieval": passages_json(f)}

"""Scoring (prompt, response) pairs: with a reward model, or with a Python function.

One place for what `lmforge score`, the reward stage's validation, rejection sampling and
(later) PPO need:

    rm = load_reward_model("runs/default/reward")
    rm.score([[{"role": "user", "content": "Hi"}]], ["Hello!"])   -> [0.83]
    fn = load_score_fn("mypkg.rules:score")                        # fn(prompt, response, row) -> float

A reward model is a Hugging Face `...ForSequenceClassification` with one label (the reward
stage saves one). The reward of a sequence is the head's output at its LAST token: for
lmforge's encoding (SFT's chat encoding of prompt + response), the end-of-turn token right
after the response. HF's own forward reads the last non-padding token, the same token whenever
the tokenizer's pad token is not its end-of-turn token (lmforge's tokenizers: <|pad|> vs <|eos|>).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.preference import PreferenceSet, collate
from lmforge.data.sft import ChatEncoder
from lmforge.errors import LmforgeError
from lmforge.rundir import resolve_artifact


def classifier_head(model) -> torch.nn.Module:
    """The sequence-classification head (`score` for Llama/Qwen/Mistral/GPT-2, `classifier` elsewhere)."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise LmforgeError(f"{type(model).__name__} has no `score` or `classifier` head; use a model whose "
                       "ForSequenceClassification class has one (Llama, Qwen, Mistral, GPT-2, ...).")


class RewardHead(torch.nn.Module):
    """Wraps a sequence-classification model (plain or peft) so that forward returns one reward per
    sequence, read at each sequence's last token (`ends` from `data.preference.collate`).

    Equals `model(input_ids=row[None]).logits[0, 0]` for each sequence alone, but runs the backbone
    once on packed rows and applies the head only at the sequence ends.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids, ends, position_ids=None, attention_mask=None, **_unused) -> torch.Tensor:
        core = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        backbone = getattr(core, core.base_model_prefix)
        hidden = backbone(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          use_cache=False).last_hidden_state  # (R, W, d)
        return classifier_head(core)(hidden.flatten(0, 1)[ends]).squeeze(-1).float()  # (S,)


def encode_responses(encoder: ChatEncoder, prompts: list[list[dict]], responses: list[str], *, max_length: int,
                     wheres: list[str] | None = None) -> tuple[PreferenceSet, int]:
    """(prompt, response) pairs as a PreferenceSet of sequences, through SFT's chat encoding (the
    encoding the reward model was trained on); sequences longer than max_length lose their end.
    Returns the set and how many were truncated."""
    from lmforge.data.preference import response_span

    wheres = wheres or [f"item {i}" for i in range(len(prompts))]
    convs = [([*p, {"role": "assistant", "content": r}], w) for p, r, w in zip(prompts, responses, wheres)]
    parts, plens, truncated = [], [], 0
    for ids, sup in encoder.encode_many(convs):
        start, end = response_span(sup)
        x = np.asarray(ids[:end], dtype=np.int32)
        if len(x) > max_length:
            x, truncated = x[:max_length], truncated + 1
        parts.append(x)
        plens.append(min(start, len(x) - 1))
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in parts], out=offsets[1:])
    empty = np.zeros(0, dtype=np.int64)
    data = PreferenceSet(ids=np.concatenate(parts) if parts else np.zeros(0, np.int32), offsets=offsets,
                         prompt_len=np.asarray(plens, dtype=np.int32), chosen=empty, rejected=empty,
                         margin=np.zeros(0, np.float32), item_seq=empty, desirable=np.zeros(0, bool))
    return data, truncated


class RewardModel:
    """A loaded reward model: `score(prompts, responses)` -> one float per pair."""

    def __init__(self, model, tokenizer, *, device: str | torch.device | None = None):
        from lmforge.models import context_length

        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = RewardHead(model.to(dev).eval())
        self.tokenizer, self.device = tokenizer, dev
        self.encoder = ChatEncoder(tokenizer)
        self.max_length = context_length(model) or sys.maxsize  # a config that states no context: no cut
        self.truncated = 0  # sequences scored after cutting them to the context (counted, never silent)

    @torch.no_grad()
    def score(self, prompts: list[list[dict] | str], responses: list[str], *, batch_size: int = 32,
              wheres: list[str] | None = None) -> list[float]:
        msgs = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
        data, cut = encode_responses(self.encoder, msgs, responses, max_length=self.max_length, wheres=wheres)
        self.truncated += cut
        out = np.zeros(data.n_seqs, dtype=np.float64)
        order = np.argsort(data.lengths, kind="stable")  # similar lengths together: little padding
        for s in range(0, len(order), batch_size):
            seqs = order[s:s + batch_size]
            b = collate(data, seqs, layout="pack", pad_id=self.tokenizer.pad_token_id)
            kw = {k: b[k].to(self.device) for k in ("input_ids", "ends", "position_ids") if k in b}
            out[seqs] = self.net(**kw).double().cpu().numpy()
        return out.tolist()


def is_reward_model(path: Path) -> bool:
    import json

    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    archs = cfg.get("architectures") or []
    labels = cfg.get("num_labels", len(cfg.get("id2label") or {}) or 2)
    return any(a.endswith("ForSequenceClassification") for a in archs) and labels == 1


def load_reward_model(path: str | Path, *, device: str | torch.device | None = None) -> RewardModel:
    """A reward model from a reward stage folder or a local HF sequence-classification folder."""
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models import load_model

    p = resolve_artifact(path, "reward model")
    if not (p / "config.json").is_file():
        raise LmforgeError(f"{p} is not a Hugging Face model folder (no config.json); point to a reward model.")
    if not is_reward_model(p):
        raise LmforgeError(f"{p} is not a reward model (a ...ForSequenceClassification with one label); train one "
                           "with the reward stage.")
    return RewardModel(load_model(p, head="reward"), load_tokenizer(p), device=device)


# --------------------------------------------------------------------------------------------
# Scoring functions


ScoreFn = Callable[[list[dict], str, dict], float]


def load_score_fn(spec: str) -> ScoreFn:
    """`package.module:function` or `path/to/file.py:function` -> the function.

    It is called as fn(prompt_turns, response_text, row) and returns a number (higher = better);
    `row` is the prompt row's fields (e.g. a reference `answer` to check against).
    """
    mod_name, _, fn_name = spec.rpartition(":")
    if not mod_name or not fn_name:
        raise LmforgeError(f"score_fn {spec!r} must look like module:function or path/to/file.py:function.")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise LmforgeError(f"score_fn {spec!r}: the file {path} does not exist.")
        name = f"lmforge_score_{abs(hash(str(path.resolve())))}"
        loader = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module
        try:
            loader.loader.exec_module(module)
        except Exception as e:
            raise LmforgeError(f"score_fn {spec!r}: {path} fails on import ({type(e).__name__}: {e}).") from None
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise LmforgeError(f"score_fn {spec!r}: module {mod_name!r} cannot be imported ({e}).") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise LmforgeError(f"score_fn {spec!r}: {mod_name} has no function {fn_name!r}.")
    return fn


def call_score_fn(fn: ScoreFn, spec: str, prompt: list[dict], response: str, row: dict[str, Any], where: str) -> float:
    """fn(prompt, response, row) as a finite float, or one sentence naming the row."""
    try:
        v = fn(prompt, response, row)
    except Exception as e:
        raise LmforgeError(f"score_fn {spec} failed on {where} ({type(e).__name__}: {e}).") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise LmforgeError(f"score_fn {spec} returned {v!r} for {where}; it must return a finite number.")
    return float(v)


# --------------------------------------------------------------------------------------------
# `lmforge score MODEL FILE`


def _row_items(rec, bad) -> tuple[list[dict], list[str], list[str]] | None:
    """(prompt turns, responses, output keys) of one row to score."""
    from lmforge.data.preference import parse_prompt, parse_response, parse_row
    from lmforge.data.sft import check_messages

    v, where = rec.values, rec.where
    if "chosen" in v or "rejected" in v:
        row = parse_row(rec, bad)
        return None if row is None else (row.prompt, row.responses, ["chosen_score", "rejected_score"])
    if "responses" in v:
        row = parse_row(rec, bad)
        return None if row is None else (row.prompt, row.responses, [f"score_{i}" for i in range(len(row.responses))])
    if "messages" in v:
        msgs = check_messages(v["messages"], where, bad)
        if msgs is None:
            return None
        if msgs[-1]["role"] != "assistant":
            bad("no response", f"{where} field 'messages' does not end with an assistant turn to score")
            return None
        return msgs[:-1], [msgs[-1]["content"]], ["score"]
    name = "response" if "response" in v else "completion"
    if "prompt" not in v or name not in v:
        bad("unknown format", f"{where} needs 'prompt' + 'response' (or 'completion'), 'prompt' + 'chosen' + "
            f"'rejected', or 'messages' (its fields: {', '.join(map(str, v))})")
        return None
    prompt = parse_prompt(v["prompt"], where, bad, None)
    text = parse_response(v[name], name, where, bad) if prompt is not None else None
    if text is None:
        return None
    if check_messages([*prompt, {"role": "assistant", "content": text}], where, bad) is None:
        return None
    return prompt, [text], ["score"]


def score_file(model: str | Path, file: str | Path, out: str | Path | None = None, *, batch_size: int = 32,
               device: str | None = None, chunk: int = 512) -> dict:
    """Score every row of `file` with a reward model; write the rows plus their scores as JSONL.

    Pair rows get chosen_score and rejected_score (and count toward pairwise accuracy); ranked rows
    score_0..score_k; prompt + response/completion rows and chat rows (last assistant turn) score.
    """
    import json
    import os

    from lmforge.data.formats import BadRows, ReadStats, iter_records

    rm = load_reward_model(model, device=device)
    out = Path(out) if out is not None else Path(Path(file).name.split(".")[0] + ".scored.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = ReadStats()
    bad = BadRows("error", stats, skip_option=None)  # `score` has no skip setting
    rows = scored = pairs = wins = 0
    total = 0.0
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            buf: list[tuple[dict, list[dict], list[str], list[str], str]] = []

            def flush() -> None:
                nonlocal scored, pairs, wins, total
                prompts = [p for _, p, rs, _, _ in buf for _ in rs]
                responses = [r for _, _, rs, _, _ in buf for r in rs]
                wheres = [w for _, _, rs, _, w in buf for _ in rs]
                scores = iter(rm.score(prompts, responses, batch_size=batch_size, wheres=wheres))
                for values, _, _, keys, _ in buf:
                    got = {k: next(scores) for k in keys}
                    if "chosen_score" in got:
                        pairs += 1
                        wins += got["chosen_score"] > got["rejected_score"]
                    scored += len(got)
                    total += sum(got.values())
                    f.write(json.dumps({**values, **got}, ensure_ascii=False, default=str) + "\n")
                buf.clear()

            for rec in iter_records(str(file), stats=stats, skip_option=None):
                item = _row_items(rec, bad)
                rows += 1
                buf.append((rec.values, *item, rec.where))
                if len(buf) >= chunk:
                    flush()
            flush()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    summary = {"rows": rows, "scored": scored, "mean_score": round(total / max(scored, 1), 4), "out": str(out)}
    if pairs:
        summary["pairwise_accuracy"] = round(wins / pairs, 4)
    if rm.truncated:
        summary["truncated_to_context"] = rm.truncated
    return summary

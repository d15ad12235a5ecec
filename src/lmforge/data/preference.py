"""Preference data: rows -> (prompt, response) sequences -> pairs or labelled items -> batches.

    JSONL/Parquet/CSV/datasets rows ──parse_row──> PrefRow(prompt turns, responses, pairs | labels)
        pairwise   {"prompt", "chosen", "rejected", "margin" (optional)}          -> 1 pair
        ranked     {"prompt", "responses": [best, ..., worst]}                    -> pairs
                   {"prompt", "responses": [...], "scores": [...]} (higher wins)  -> pairs (ties: none)
        unpaired   {"prompt", "completion", "label": good|bad}                    -> 1 KTO item
    ──ChatEncoder (SFT's)──> token ids + the response's start, per sequence
    ──PreferenceSet──> flat arrays: sequences; pairs (chosen seq, rejected seq); items (seq, label)
    ──PreferenceBatches──> one forward pass holding all chosen and rejected sequences of a micro-batch

`prompt` is plain text (one user turn) or a list of chat turns; a response is text, one
{"role": "assistant", "content"} turn, or a one-turn list (TRL's conversational format). TRL's
implicit-prompt rows (no `prompt`, `chosen`/`rejected` full conversations that share all but the
last turn) are accepted too.

Tokenisation goes through SFT's `ChatEncoder`, so a response's supervised tokens are exactly
what SFT would supervise for that assistant turn (its content and the end-of-turn token); only
the final turn counts. The prompt tokens are exactly `render(prompt, add_generation_prompt=True)`.

Batching concatenates the chosen and rejected sequences of a micro-batch into ONE forward pass.
`layout: pack` puts several sequences in a row (position ids restart at 0 for each, which
transformers turns into a block-diagonal causal mask when `use_cache=False`), rows no longer than
the longest sequence, so almost no padding is computed; `pad` gives each sequence its own row.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from lmforge.config import Schema
from lmforge.data.formats import BadRows, OnBadRows, ReadStats, Record, iter_records
from lmforge.data.sft import IGNORE, ChatEncoder, best_fit_decreasing, check_messages
from lmforge.errors import LmforgeError

RankedPairs = Literal["all", "best_vs_rest", "best_vs_worst"]
Overlong = Literal["truncate", "drop"]
Layout = Literal["pack", "pad"]
Unit = Literal["pairs", "items"]

COLUMNS = ["prompt", "chosen", "rejected", "responses", "scores", "completion", "label", "margin"]
_GOOD = {"good", "desirable", "chosen", "true", "yes", "1"}
_BAD = {"bad", "undesirable", "rejected", "false", "no", "0"}
N_EXAMPLES = 64  # rows whose texts are kept (mask check, greedy probe)


class DataFields(Schema):
    """Where the preference rows come from and how they become sequences (shared by reward and dpo)."""

    data: str | list[str] | None = Field(
        None, description="Preference rows: JSONL/Parquet/CSV files, globs, folders or a `datasets` folder.")
    val_data: str | list[str] | None = Field(
        None, description="Held-out rows for validation; None = hold out `val_fraction` of `data` by prompt.")
    val_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of prompts held out when val_data is unset (hash of the prompt, so "
        "every pair of one prompt lands on the same side).")
    dataset_split: str | None = Field(None, description="Split to read from a DatasetDict folder.")
    max_length: int | None = Field(
        None, ge=2, description="Prompt + response tokens per sequence; None = the model's context length.")
    overlong: Overlong = Field(
        "truncate", description="A sequence longer than max_length: truncate its response (counted) or drop the row.")
    on_bad_rows: OnBadRows = Field(
        "error", description="error = stop at the first bad row naming file and row; skip = skip and count them.")
    ranked_pairs: RankedPairs = Field(
        "all", description="Pairs from a ranked row: all = every better/worse pair, best_vs_rest, best_vs_worst.")
    system_prompt: str | None = Field(None, description="System turn put before text prompts that have none.")
    layout: Layout = Field(
        "pack", description="pack = several sequences per row, no padding computed; pad = one sequence per row.")


# --------------------------------------------------------------------------------------------
# Rows -> prompt turns and responses


@dataclass
class PrefRow:
    where: str
    prompt: list[dict]  # turns before the response (ends with a user turn)
    responses: list[str]  # distinct response texts
    pairs: list[tuple[int, int, float]]  # (better, worse, margin), indices into responses
    labels: list[bool] | None  # unpaired rows: desirability of each response
    kind: str  # pairwise | ranked | unpaired


def detect_kind(values: dict) -> str | None:
    if "chosen" in values or "rejected" in values:
        return "pairwise"
    if "responses" in values:
        return "ranked"
    if "completion" in values or "label" in values:
        return "unpaired"
    return None


def parse_response(value: Any, name: str, where: str, bad) -> str | None:
    """The response text of a field: text, one assistant turn, or a one-turn list."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant" or not isinstance(value.get("content"), str):
            bad("bad response", f"{where} field {name!r} must be an assistant turn {{role: assistant, content}}")
            return None
        value = value["content"]
    if value is None:
        bad("missing field", f"{where} field {name!r} is null")
        return None
    if not isinstance(value, str):
        what = f"a list of {len(value)} turns" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"
        bad("bad response", f"{where} field {name!r} is {what}; give the response as text or one assistant turn")
        return None
    if not value.strip():
        bad("empty response", f"{where} field {name!r} is an empty response")
        return None
    return value


def parse_prompt(value: Any, where: str, bad, system_prompt: str | None) -> list[dict] | None:
    if isinstance(value, str):
        if not value.strip():
            bad("empty prompt", f"{where} field 'prompt' is empty")
            return None
        return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": value}]
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        msgs = [dict(m) for m in value]
        if system_prompt and msgs[0].get("role") != "system":
            msgs = [{"role": "system", "content": system_prompt}, *msgs]
        return msgs
    what = "an empty list" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"
    bad("bad prompt", f"{where} field 'prompt' is {what}; give text or a list of {{role, content}} turns")
    return None


def _implicit_prompt(values: dict, where: str, bad) -> tuple[list[dict], Any, Any] | None:
    """TRL's implicit-prompt rows: chosen/rejected are whole conversations sharing all but the last turn."""
    c, r = values.get("chosen"), values.get("rejected")
    if not (isinstance(c, list) and isinstance(r, list) and len(c) >= 2 and len(r) >= 2):
        fields = ", ".join(map(str, values)) or "none"
        bad("missing field", f"{where} has no field 'prompt' (its fields: {fields})")
        return None
    if c[:-1] != r[:-1]:
        bad("prompt mismatch", f"{where} has no 'prompt' and its 'chosen' and 'rejected' conversations differ before "
            "the last turn, so the shared prompt is unclear")
        return None
    return list(c[:-1]), c[-1], r[-1]


def _number(v: Any) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer beyond float's range (JSON allows it)
        return False


def parse_row(rec: Record, bad, *, ranked_pairs: RankedPairs = "all", system_prompt: str | None = None) -> PrefRow | None:
    """A validated PrefRow, or None after `bad` reported why the row is unusable."""
    v, where = rec.values, rec.where
    kind = detect_kind(v)
    if kind is None:
        fields = ", ".join(map(str, v)) or "none"
        bad("unknown format", f"{where} has none of 'chosen'+'rejected', 'responses' or 'completion'+'label' "
            f"(its fields: {fields})")
        return None
    if kind == "pairwise":
        for name in ("chosen", "rejected"):
            if name not in v:
                bad("missing field", f"{where} has field {'rejected' if name == 'chosen' else 'chosen'!r} but no {name!r}")
                return None
        if "prompt" in v:
            prompt_v, cv, rv = v["prompt"], v["chosen"], v["rejected"]
        else:
            got = _implicit_prompt(v, where, bad)
            if got is None:
                return None
            prompt_v, cv, rv = got
        chosen, rejected = parse_response(cv, "chosen", where, bad), None
        if chosen is None:
            return None
        rejected = parse_response(rv, "rejected", where, bad)
        if rejected is None:
            return None
        if chosen == rejected:
            bad("chosen equals rejected", f"{where}: 'chosen' and 'rejected' are the same response, so the pair "
                "teaches nothing")
            return None
        margin = v.get("margin", 0.0)
        if margin is None:
            margin = 0.0
        if not _number(margin):
            bad("bad margin", f"{where} field 'margin' is {margin!r}, not a number")
            return None
        responses, pairs, labels = [chosen, rejected], [(0, 1, float(margin))], None
    elif kind == "ranked":
        prompt_v, raw = v.get("prompt"), v["responses"]
        if not isinstance(raw, (list, tuple)) or len(raw) < 2:
            bad("bad responses", f"{where} field 'responses' must list at least two responses, best first")
            return None
        responses = []
        for i, r in enumerate(raw):
            text = parse_response(r, f"responses[{i}]", where, bad)
            if text is None:
                return None
            responses.append(text)
        if len(set(responses)) < len(responses):
            bad("duplicate responses", f"{where} field 'responses' holds the same response twice")
            return None
        scores = v.get("scores")
        if scores is None:
            scores = [float(len(responses) - i) for i in range(len(responses))]  # best first
            use_margin = False
        elif not isinstance(scores, (list, tuple)) or len(scores) != len(responses) or not all(map(_number, scores)):
            bad("bad scores", f"{where} field 'scores' must hold one number per response ({len(responses)})")
            return None
        else:
            use_margin = True
        pairs = ranked_to_pairs([float(s) for s in scores], ranked_pairs, use_margin)
        if not pairs:
            bad("no preference", f"{where}: every response has the same score, so no pair can be formed")
            return None
        labels = None
    else:
        for name in ("prompt", "completion", "label"):
            if name not in v:
                bad("missing field", f"{where} has no field {name!r} (its fields: {', '.join(map(str, v))})")
                return None
        prompt_v = v["prompt"]
        text = parse_response(v["completion"], "completion", where, bad)
        if text is None:
            return None
        label = v["label"]
        key = str(label).strip().lower() if isinstance(label, (str, bool, int)) else None
        if key not in _GOOD and key not in _BAD:
            bad("bad label", f"{where} field 'label' is {label!r}; use good/bad (or true/false, desirable/undesirable)")
            return None
        responses, pairs, labels = [text], [], [key in _GOOD]
    if prompt_v is None:
        bad("missing field", f"{where} has no field 'prompt' (its fields: {', '.join(map(str, v))})")
        return None
    prompt = parse_prompt(prompt_v, where, bad, system_prompt)
    if prompt is None:
        return None
    # Validate the conversation (roles, order, non-empty turns) with SFT's rules.
    clean = check_messages([*prompt, {"role": "assistant", "content": responses[0]}], where, bad)
    if clean is None:
        return None
    return PrefRow(where, clean[:-1], responses, pairs, labels, kind)


def ranked_to_pairs(scores: list[float], how: RankedPairs, use_margin: bool) -> list[tuple[int, int, float]]:
    """(better, worse, margin) pairs from scores (higher is better); tied responses form no pair."""
    n = len(scores)
    best = max(range(n), key=lambda i: (scores[i], -i))
    worst = min(range(n), key=lambda i: (scores[i], i))
    if how == "best_vs_worst":
        cand = [(best, worst)]
    elif how == "best_vs_rest":
        cand = [(best, j) for j in range(n) if j != best]
    else:
        cand = [(i, j) for i in range(n) for j in range(n) if i != j]
    return [(i, j, scores[i] - scores[j] if use_margin else 0.0) for i, j in cand if scores[i] > scores[j]]


def prompt_key(prompt: list[dict]) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def in_validation(prompt: list[dict], fraction: float, seed: int = 0) -> bool:
    """Whether a prompt belongs to the held-out share (a stable hash, so splits never move)."""
    if fraction <= 0:
        return False
    h = zlib.crc32(f"{seed}:{prompt_key(prompt)}".encode())
    return (h % 1_000_000) < fraction * 1_000_000


# --------------------------------------------------------------------------------------------
# Tokenised sequences, pairs and items


@dataclass
class PreferenceSet:
    """Tokenised sequences and the pairs/items over them: sequence s is ids[offsets[s]:offsets[s+1]],
    whose tokens from prompt_len[s] on are the response (the supervised targets)."""

    ids: np.ndarray  # int32 (total tokens,)
    offsets: np.ndarray  # int64 (S + 1,)
    prompt_len: np.ndarray  # int32 (S,)
    chosen: np.ndarray  # int64 (P,) sequence of each pair's preferred response
    rejected: np.ndarray  # int64 (P,)
    margin: np.ndarray  # float32 (P,) from the row's `margin` or score difference (0 when absent)
    item_seq: np.ndarray  # int64 (I,) unpaired items (KTO)
    desirable: np.ndarray  # bool (I,)
    examples: list[dict] = field(default_factory=list)  # first rows: where, prompt, responses, seqs, pairs, texts
    stats: dict = field(default_factory=dict)

    @property
    def n_seqs(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_tokens(self) -> np.ndarray:
        """Supervised (response) tokens per sequence."""
        return self.lengths - self.prompt_len

    def seq(self, s: int) -> np.ndarray:
        return self.ids[self.offsets[s]:self.offsets[s + 1]]


def response_span(sup: list[bool]) -> tuple[int, int]:
    """(start, end) of the last run of supervised tokens: the final assistant turn."""
    end = len(sup)
    while end > 0 and not sup[end - 1]:
        end -= 1
    start = end
    while start > 0 and sup[start - 1]:
        start -= 1
    return start, end


class _Builder:
    """Accumulates one split's sequences, pairs and items as rows arrive."""

    def __init__(self):
        self.ids: list[np.ndarray] = []
        self.plens: list[int] = []
        self.chosen: list[int] = []
        self.rejected: list[int] = []
        self.margin: list[float] = []
        self.item_seq: list[int] = []
        self.desirable: list[bool] = []
        self.examples: list[dict] = []
        self.st = {"rows": 0, "kinds": {}, "pairs": 0, "items": 0, "sequences": 0, "truncated": 0,
                   "dropped_too_long": 0, "pairs_identical_after_truncation": 0, "ranked_middle_left_out": 0,
                   "tokens": 0, "response_tokens": 0}

    def add(self, r: PrefRow, seqs: list[np.ndarray], p: int, unit: Unit, bad, method: str, max_length: int,
            overlong: Overlong) -> None:
        st = self.st
        if any(len(s) > max_length for s in seqs):
            if overlong == "drop":
                st["dropped_too_long"] += 1
                return
            st["truncated"] += sum(len(s) > max_length for s in seqs)
            seqs = [s[:max_length] for s in seqs]
        rel: list[tuple[int, int, float]] = []
        if unit == "pairs":
            if r.labels is not None:
                bad("unpaired row", f"{r.where} is an unpaired (prompt, completion, label) row, but method {method} "
                    "trains on pairs; use method: kto, or give 'chosen' and 'rejected'")
                return
            rel = [(i, j, m) for i, j, m in r.pairs if not np.array_equal(seqs[i], seqs[j])]
            st["pairs_identical_after_truncation"] += len(r.pairs) - len(rel)
            if not rel:
                return
            used = sorted({i for i, _, _ in rel} | {j for _, j, _ in rel})
        else:
            if r.labels is not None:
                lab = dict(enumerate(r.labels))
            else:
                better = {i for i, _, _ in r.pairs}
                worse = {j for _, j, _ in r.pairs}
                lab = {i: i not in worse for i in range(len(r.responses)) if (i in better) != (i in worse)}
                st["ranked_middle_left_out"] += len(r.responses) - len(lab)
            used = sorted(lab)
        index = {i: len(self.plens) + k for k, i in enumerate(used)}
        for i in used:
            self.ids.append(seqs[i])
            self.plens.append(p)
        if unit == "pairs":
            for i, j, m in rel:
                self.chosen.append(index[i])
                self.rejected.append(index[j])
                self.margin.append(m)
        else:
            for i in used:
                self.item_seq.append(index[i])
                self.desirable.append(lab[i])
        st["rows"] += 1
        st["kinds"][r.kind] = st["kinds"].get(r.kind, 0) + 1
        if len(self.examples) < N_EXAMPLES:
            self.examples.append({"where": r.where, "prompt": r.prompt, "responses": [r.responses[i] for i in used],
                                  "seqs": [index[i] for i in used], "pairs": [(index[i], index[j]) for i, j, _ in rel],
                                  "pair_texts": [(r.responses[i], r.responses[j]) for i, j, _ in rel],
                                  "truncated": [len(seqs[i]) == max_length for i in used]})

    def build(self) -> PreferenceSet:
        lengths = [len(x) for x in self.ids]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        data = PreferenceSet(
            ids=np.concatenate(self.ids) if self.ids else np.zeros(0, np.int32), offsets=offsets,
            prompt_len=np.asarray(self.plens, dtype=np.int32), chosen=np.asarray(self.chosen, dtype=np.int64),
            rejected=np.asarray(self.rejected, dtype=np.int64), margin=np.asarray(self.margin, dtype=np.float32),
            item_seq=np.asarray(self.item_seq, dtype=np.int64), desirable=np.asarray(self.desirable, dtype=bool),
            examples=self.examples, stats=self.st)
        self.st.update(pairs=len(self.chosen), items=len(self.item_seq), sequences=data.n_seqs,
                       tokens=int(len(data.ids)), response_tokens=int(data.n_tokens.sum()))
        return data


def read_preferences(patterns: str | list[str], encoder: ChatEncoder, *, unit: Unit, max_length: int,
                     overlong: Overlong = "truncate", on_bad_rows: OnBadRows = "error",
                     ranked_pairs: RankedPairs = "all", system_prompt: str | None = None,
                     dataset_split: str | None = None, route: Callable[[list[dict]], str] | None = None,
                     stats: ReadStats | None = None, method: str = "dpo", chunk: int = 256) -> dict[str, PreferenceSet]:
    """Read, validate and tokenise preference rows, in one pass, into PreferenceSets by split.

    unit "pairs": pairwise and ranked rows give pairs; an unpaired row is a bad row.
    unit "items": unpaired rows give items; in a pair or ranked row, a response that is never the
    worse of a pair is desirable and one that is never the better is undesirable (for a plain pair:
    chosen good, rejected bad); responses in the middle of a ranking are left out (counted).
    `route(prompt)` names each row's split ("train" when None); every split named is returned.
    """
    stats = stats if stats is not None else ReadStats()
    bad = BadRows(on_bad_rows, stats)
    builders: dict[str, _Builder] = {"train": _Builder()}

    def flush(rows: list[PrefRow]) -> None:
        convs = [([*r.prompt, {"role": "assistant", "content": t}], r.where) for r in rows for t in r.responses]
        encoded = iter(encoder.encode_many(convs))
        for r in rows:
            seqs: list[np.ndarray] = []
            starts: list[int] = []
            for _ in r.responses:
                ids, sup = next(encoded)
                start, end = response_span(sup)
                seqs.append(np.asarray(ids[:end], dtype=np.int32))  # tokens after the response never count
                starts.append(start)
            p = starts[0]
            if len(set(starts)) != 1 or any(not np.array_equal(s[:p], seqs[0][:p]) for s in seqs):
                raise LmforgeError(f"{r.where}: the chat template tokenises this prompt differently before different "
                                   "responses, so they cannot be compared; use a template that renders turns independently.")
            if p >= max_length:
                bad("prompt too long", f"{r.where}: the prompt is {p} tokens, which leaves no room for a response within "
                    f"max_length {max_length}; shorten the prompt or raise max_length")
                continue
            split = route(r.prompt) if route is not None else "train"
            builders.setdefault(split, _Builder()).add(r, seqs, p, unit, bad, method, max_length, overlong)

    buf: list[PrefRow] = []
    for rec in iter_records(patterns, dataset_split=dataset_split, on_bad_rows=on_bad_rows, stats=stats,
                            columns=COLUMNS):
        row = parse_row(rec, bad, ranked_pairs=ranked_pairs, system_prompt=system_prompt)
        if row is None:
            continue
        buf.append(row)
        if len(buf) >= chunk:
            flush(buf)
            buf = []
    flush(buf)
    return {name: b.build() for name, b in builders.items()}


def response_mask_check(data: PreferenceSet, encoder: ChatEncoder, *, what: str = "preference data") -> str:
    """Decode the response tokens of the first rows and compare them with the response texts
    (content + end-of-turn; a prefix of it when truncated); raise on a mismatch. Returns one
    example with its response tokens marked ⟦ ⟧."""
    if data.n_seqs == 0:
        raise LmforgeError(f"The {what} has no usable row; check the data and the counts above.")
    tok = encoder.tok
    for ex in data.examples[:8]:
        for s, text, cut in zip(ex["seqs"], ex["responses"], ex["truncated"]):
            ids, p = data.seq(s), int(data.prompt_len[s])
            got = tok.decode(ids[p:].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
            want = text + encoder.eot_text
            if not (got == want or (cut and want.startswith(got))):
                raise LmforgeError(f"Mask check failed for {ex['where']}: the response tokens decode to {got!r} but "
                                   f"the response is {want!r}; the chat template and the tokenizer disagree.")
    ex = data.examples[0]
    s = ex["seqs"][0]
    ids, p = data.seq(s), int(data.prompt_len[s])
    dec = lambda x: tok.decode(x.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    return f"{ex['where']}: {dec(ids[:p])}⟦{dec(ids[p:])}⟧"


# --------------------------------------------------------------------------------------------
# Batches: all sequences of a micro-batch in one forward pass


def collate(data: PreferenceSet, seqs: np.ndarray, *, layout: Layout, pad_id: int) -> dict:
    """Model inputs for sequences `seqs` (slot k holds sequence seqs[k]).

    input_ids, labels (R, W)   labels already shifted: labels[t] = the response token at t + 1
    position_ids (pack) or attention_mask (pad) (R, W)
    token_slot (R, W)          slot of the sequence each token belongs to (-1: padding)
    ends (S,)                  flat index (row * W + column) of each sequence's last token
    n_tokens (S,)              response tokens per slot
    """
    seqs = np.asarray(seqs, dtype=np.int64)
    lengths = data.lengths[seqs]
    if layout == "pack":
        # Rows no longer than the longest sequence: attention cost stays that of padded rows.
        rows = best_fit_decreasing(lengths, int(lengths.max()))
    else:
        rows = [[k] for k in range(len(seqs))]
    width = max(int(lengths[r].sum()) for r in rows)
    R = len(rows)
    ids = np.full((R, width), pad_id, dtype=np.int64)
    lab = np.full((R, width), IGNORE, dtype=np.int64)
    slot = np.full((R, width), -1, dtype=np.int64)
    pos = np.zeros((R, width), dtype=np.int64)
    ends = np.zeros(len(seqs), dtype=np.int64)
    for b, r in enumerate(rows):
        c = 0
        for k in r:
            s = int(seqs[k])
            x = data.seq(s)
            n, p = len(x), int(data.prompt_len[s])
            ids[b, c:c + n] = x
            lab[b, c + p - 1:c + n - 1] = x[p:]
            slot[b, c:c + n] = k
            pos[b, c:c + n] = np.arange(n)
            ends[k] = b * width + c + n - 1
            c += n
        pos[b, c:] = np.arange(width - c)  # padding is its own "sequence" (pack); masked out (pad)
    out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(lab), "token_slot": torch.from_numpy(slot),
           "ends": torch.from_numpy(ends), "n_tokens": torch.from_numpy(data.n_tokens[seqs].astype(np.float32))}
    if layout == "pack":
        out["position_ids"] = torch.from_numpy(pos)
    else:
        out["attention_mask"] = torch.from_numpy((slot >= 0).astype(np.int64))
    return out


MODEL_KEYS = ("input_ids", "labels", "token_slot", "position_ids", "attention_mask")


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


class PreferenceBatches:
    """The shared loop's data source: `size` pairs (or KTO items) at global positions start...

    Position p is pair perm_epoch[p % n] (a seeded permutation per epoch), so the order is a pure
    function of the position, as exact resume needs. A pair batch of B pairs holds 2B slots:
    slots 0..B-1 the chosen sequences, B..2B-1 the rejected ones. With `ref` set (one reference
    log-prob per sequence), batches carry `ref_logps` per slot.
    """

    def __init__(self, data: PreferenceSet, *, unit: Unit, seed: int, pad_id: int, layout: Layout,
                 shuffle: bool = True, what: str = "training data"):
        self.data, self.unit, self.seed, self.pad_id, self.layout, self.shuffle = data, unit, seed, pad_id, layout, shuffle
        self.n = len(data.chosen) if unit == "pairs" else len(data.item_seq)
        if self.n == 0:
            kind = "pair" if unit == "pairs" else "item"
            raise LmforgeError(f"The {what} holds no usable {kind}; check the data and the counts reported above.")
        self.ref: np.ndarray | None = None
        self._perm: tuple[int, np.ndarray] | None = None

    def index_at(self, p: int) -> int:
        epoch, j = divmod(p, self.n)
        if not self.shuffle:
            return j
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][j])

    def batch(self, start: int, size: int) -> dict:
        return self.batch_of(np.array([self.index_at(p) for p in range(start, start + size)], dtype=np.int64))

    def slots(self, idx: np.ndarray) -> np.ndarray:
        d = self.data
        return np.concatenate([d.chosen[idx], d.rejected[idx]]) if self.unit == "pairs" else d.item_seq[idx]

    def batch_of(self, idx: np.ndarray) -> dict:
        seqs = self.slots(idx)
        out = collate(self.data, seqs, layout=self.layout, pad_id=self.pad_id)
        if self.unit == "pairs":
            out["margin"] = torch.from_numpy(self.data.margin[idx])
        else:
            out["desirable"] = torch.from_numpy(self.data.desirable[idx])
        if self.ref is not None:
            out["ref_logps"] = torch.from_numpy(self.ref[seqs].astype(np.float32))
        out["n"] = len(idx)
        return out

    def in_order(self, size: int, limit: int | None = None) -> Iterator[dict]:
        """Batches of the first `limit` pairs/items in data order (validation)."""
        n = self.n if limit is None else min(self.n, limit)
        for s in range(0, n, size):
            yield self.batch_of(np.arange(s, min(n, s + size), dtype=np.int64))


def sequence_chunks(data: PreferenceSet, size: int) -> Iterator[np.ndarray]:
    """Every sequence once, in chunks of `size` of similar length (the reference pass)."""
    order = np.argsort(data.lengths, kind="stable")
    for s in range(0, len(order), size):
        yield order[s:s + size]


# --------------------------------------------------------------------------------------------
# Loading the splits a stage trains and validates on


@dataclass
class Splits:
    train: PreferenceSet
    val: PreferenceSet | None
    encoder: ChatEncoder
    read: dict  # ReadStats of each split
    example: str  # one marked example (the mask check's output)


def load_splits(cfg: DataFields, tokenizer, *, unit: Unit, max_length: int, method: str) -> Splits:
    """Read cfg.data (and cfg.val_data, or a held-out share of cfg.data) through SFT's chat encoder."""
    if cfg.data is None:
        raise LmforgeError("The stage needs `data`: preference rows (prompt + chosen/rejected, ranked responses, "
                           "or prompt + completion + label).")
    encoder = ChatEncoder(tokenizer)
    common = dict(unit=unit, max_length=max_length, overlong=cfg.overlong, on_bad_rows=cfg.on_bad_rows,
                  ranked_pairs=cfg.ranked_pairs, system_prompt=cfg.system_prompt, dataset_split=cfg.dataset_split,
                  method=method)
    read_train, read_val = ReadStats(), ReadStats()
    if cfg.val_data is not None:
        train = read_preferences(cfg.data, encoder, stats=read_train, **common)["train"]
        val = read_preferences(cfg.val_data, encoder, stats=read_val, **common)["train"]
    else:
        frac = cfg.val_fraction
        sets = read_preferences(cfg.data, encoder, stats=read_train, **common,
                                route=lambda p: "validation" if in_validation(p, frac) else "train")
        train, val = sets["train"], sets.get("validation")
    example = response_mask_check(train, encoder, what="training data")
    if val is not None and (len(val.chosen) if unit == "pairs" else len(val.item_seq)) == 0:
        val = None
    return Splits(train, val, encoder, {"train": read_train.as_dict(), "validation": read_val.as_dict()}, example)


def read_prompt_rows(cfg, stats: ReadStats) -> list[tuple[list[dict], dict, str]]:
    """(prompt turns, the row's fields, where) of every usable prompt row of `cfg.prompts`.

    `cfg` is a prompt-reading stage's config (rejection, feedback, ppo, grpo): it has `prompts`,
    `dataset_split`, `on_bad_rows`, `system_prompt` and `max_prompts`. A row is {prompt: text or
    turns} or {messages} (a trailing assistant turn is dropped); roles and order follow SFT's rules."""
    bad = BadRows(cfg.on_bad_rows, stats)
    out: list[tuple[list[dict], dict, str]] = []
    for rec in iter_records(cfg.prompts, dataset_split=cfg.dataset_split, on_bad_rows=cfg.on_bad_rows, stats=stats):
        v, where = rec.values, rec.where
        if "prompt" in v:
            turns = parse_prompt(v["prompt"], where, bad, cfg.system_prompt)
        elif "messages" in v:
            msgs = v["messages"]
            if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
                msgs = msgs[:-1]
            turns = parse_prompt(msgs, where, bad, cfg.system_prompt)
        else:
            bad("missing field", f"{where} has neither 'prompt' nor 'messages' (its fields: {', '.join(map(str, v))})")
            continue
        # Validate roles and order with SFT's rules, as a conversation the answer would complete.
        if turns is None or check_messages([*turns, {"role": "assistant", "content": "x"}], where, bad) is None:
            continue
        out.append((turns, v, where))
        if cfg.max_prompts and len(out) >= cfg.max_prompts:
            break
    return out

"""Supervised fine-tuning data: records -> conversations -> tokens with a loss mask -> batches.

    JSONL/Parquet/CSV/datasets rows ──to_messages──> [{role, content}, ...]   (validated)
        ──ChatEncoder──> token ids + "supervised" flag per token   (through the chat template)
        ──SFTExamples──> flat int32 arrays (truncate/drop past seq_len, counted)
        ──PackedRows | LengthBatches──> {"input_ids", "labels", ...} for the shared loop

Formats (detected per row, or named by `fmt`):

    chat               {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    alpaca             {"instruction": "...", "input": "..." (optional), "output": "..."}
                       -> user = instruction (+ blank line + input), assistant = output
    prompt_completion  {"prompt": "..." | [messages], "completion": "..." | [assistant messages]}

The mask is computed through the chat template (`lmforge.data.chat.render`, the one place it is
applied), never by re-implementing it: for each assistant turn i the text rendered for turns
< i with the generation prompt is a prefix of the text rendered through turn i, and what lies
between is the assistant content followed by the template's end-of-turn token. Each prompt
part and each supervised part is tokenised on its own, so the prompt tokens are exactly what
`render(..., add_generation_prompt=True)` tokenises to at inference time, and the supervised
tokens decode to exactly `content + end-of-turn` (EOS for lmforge's template; `<|im_end|>`,
`<|eot_id|>`, ... for a reused tokenizer's own template).

Packing puts several examples in one row with position ids restarting at 0 for each example.
transformers (>= 4.53, and 5.x) turns restarting position ids into a block-diagonal causal mask
for the eager/SDPA/flex kernels and into variable-length attention for flash-attention, so no
token attends across an example boundary on CPU or GPU. (tests/data/test_sft_data.py checks
that the loss of a packed batch equals the sum of the examples' separate losses.)
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from lmforge.data.chat import ROLES, content_spans, encode_text, has_special_text, render
from lmforge.data.formats import BadRows, OnBadRows, ReadStats, Record, iter_records
from lmforge.errors import LmforgeError

Format = Literal["auto", "chat", "alpaca", "prompt_completion"]
Overlong = Literal["truncate", "drop"]
Batching = Literal["pack", "group", "pad"]
IGNORE = -100  # label of positions that carry no loss (torch's cross_entropy default ignore_index)

# Columns each format needs; `columns` hints let Parquet/datasets readers load only these.
FORMAT_FIELDS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}
_ALL_COLUMNS = ["messages", "instruction", "input", "output", "prompt", "completion", "system"]


# --------------------------------------------------------------------------------------------
# Rows -> validated conversations


def detect_format(values: dict) -> str | None:
    """The format a row is in, from its field names (None when it fits none)."""
    if "messages" in values:
        return "chat"
    if "instruction" in values or ("output" in values and "prompt" not in values):
        return "alpaca"
    if "prompt" in values or "completion" in values:
        return "prompt_completion"
    return None


def check_messages(msgs: Any, where: str, bad: Callable[[str, str], None]) -> list[dict] | None:
    """`msgs` as a clean [{role, content}] list, or None after reporting the first problem.

    Rules: a list of {role, content} objects; roles system/user/assistant; content non-empty
    text; a system turn only first; no two consecutive turns of the same role; the first turn
    after the system prompt is the user's; at least one assistant turn.
    """
    if not isinstance(msgs, (list, tuple)) or not msgs:
        kind = "empty" if isinstance(msgs, (list, tuple)) else f"a {type(msgs).__name__}, not a list"
        bad("bad messages", f"{where} field 'messages' is {kind}; it must be a list of {{role, content}} turns")
        return None
    out: list[dict] = []
    for i, m in enumerate(msgs):
        at = f"{where} messages[{i}]"
        if not isinstance(m, dict):
            bad("bad messages", f"{at} is a {type(m).__name__}, not a {{role, content}} object")
            return None
        for key in ("role", "content"):
            if m.get(key) is None:
                bad("missing field", f"{at} has no field {key!r}")
                return None
        role, content = m["role"], m["content"]
        if role not in ROLES:
            bad("unknown role", f"{at} has unknown role {role!r}; use one of {', '.join(ROLES)}")
            return None
        if not isinstance(content, str):
            bad("content not text", f"{at} content is a {type(content).__name__}, not text")
            return None
        if not content.strip():
            bad("empty content", f"{at} ({role}) has empty content")
            return None
        if role == "system" and i > 0:
            bad("misplaced system turn", f"{at} is a system turn; only the first turn may be a system turn")
            return None
        if out and out[-1]["role"] == role:
            bad("consecutive same-role turns", f"{where} messages[{i - 1}] and messages[{i}] are both {role!r} "
                "turns; merge them or insert the other role's turn")
            return None
        if role == "assistant" and (not out or out[-1]["role"] == "system"):
            bad("assistant speaks first", f"{at} is an assistant turn with no user turn before it")
            return None
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        bad("no assistant turn", f"{where} has no assistant turn, so nothing would be learned from it")
        return None
    return out


def _text_field(values: dict, name: str, where: str, bad, *, required: bool) -> str | None:
    v = values.get(name)
    if v is None:
        if required:
            fields = ", ".join(map(str, values)) or "none"
            bad("missing field", f"{where} has no field {name!r} (its fields: {fields})")
        return None
    if not isinstance(v, str):
        bad("field not text", f"{where} field {name!r} is a {type(v).__name__}, not text")
        return None
    if required and not v.strip():
        bad("empty content", f"{where} field {name!r} is empty")
        return None
    return v


def to_messages(rec: Record, fmt: Format, bad, *, system_prompt: str | None = None) -> tuple[str, list[dict]] | None:
    """(format, validated messages) of one row, or None after `bad` reported why it is unusable."""
    v, where = rec.values, rec.where
    kind = detect_format(v) if fmt == "auto" else fmt
    if kind is None:
        fields = ", ".join(map(str, v)) or "none"
        bad("unknown format", f"{where} has none of the fields 'messages', 'instruction'+'output' or "
            f"'prompt'+'completion' (its fields: {fields}); set format or rename the fields")
        return None
    msgs: Any
    if kind == "chat":
        if "messages" not in v:
            bad("missing field", f"{where} has no field 'messages' (its fields: {', '.join(map(str, v)) or 'none'})")
            return None
        msgs = v["messages"]
        if isinstance(msgs, (list, tuple)) and system_prompt and msgs and isinstance(msgs[0], dict) \
                and msgs[0].get("role") != "system":
            msgs = [{"role": "system", "content": system_prompt}, *msgs]
    elif kind == "alpaca":
        instruction = _text_field(v, "instruction", where, bad, required=True)
        if instruction is None:
            return None
        output = _text_field(v, "output", where, bad, required=True)
        if output is None:
            return None
        extra = v.get("input")
        if extra is not None and not isinstance(extra, str):
            bad("field not text", f"{where} field 'input' is a {type(extra).__name__}, not text")
            return None
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        system = v.get("system") if isinstance(v.get("system"), str) and v.get("system").strip() else system_prompt
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    else:
        prompt, completion = v.get("prompt"), v.get("completion")
        for name, val in (("prompt", prompt), ("completion", completion)):
            if val is None:
                bad("missing field", f"{where} has no field {name!r} (its fields: {', '.join(map(str, v)) or 'none'})")
                return None
        if isinstance(prompt, str):
            if not prompt.strip():
                bad("empty content", f"{where} field 'prompt' is empty")
                return None
            prompt = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": prompt}]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        if not isinstance(prompt, (list, tuple)) or not isinstance(completion, (list, tuple)):
            bad("bad messages", f"{where} fields 'prompt' and 'completion' must be text or lists of turns")
            return None
        msgs = [*prompt, *completion]
    clean = check_messages(msgs, where, bad)
    return None if clean is None else (kind, clean)


# --------------------------------------------------------------------------------------------
# Conversations -> tokens and mask, through the chat template


class ChatEncoder:
    """Tokenises conversations so that exactly each assistant turn's content + end-of-turn
    token is supervised (or everything, with `train_on_prompt`).

    The end-of-turn token is found once from a probe conversation: EOS for lmforge's template,
    or the first special token after the content (e.g. `<|im_end|>`) for another template.
    """

    def __init__(self, tokenizer, *, train_on_prompt: bool = False):
        self.tok, self.train_on_prompt = tokenizer, train_on_prompt
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        self.eot_text = ""
        self.segments(probe, "the probe conversation", find_eot=True)  # sets eot_text
        self.eot_id = self.tok.convert_tokens_to_ids(self.eot_text)

    def _render(self, msgs: list[dict], gen: bool, where: str) -> str:
        try:
            return render(self.tok, msgs, add_generation_prompt=gen)
        except Exception as e:  # jinja2 TemplateError and friends: templates may raise on purpose
            raise LmforgeError(f"{where}: the tokenizer's chat template failed on this conversation "
                               f"({str(e).splitlines()[0] if str(e) else type(e).__name__}).") from None

    def _find_eot(self, rest: str, where: str) -> str:
        eos = self.tok.eos_token
        if rest.startswith(eos):
            return eos
        ids = self.tok(rest, add_special_tokens=False)["input_ids"][:1]
        if ids and ids[0] in set(self.tok.all_special_ids):
            return self.tok.convert_ids_to_tokens(ids[0])
        raise LmforgeError(
            f"{where}: the chat template does not end an assistant turn with EOS or another special token "
            f"(it continues with {rest[:20]!r}), so the model could not learn where to stop; use a tokenizer "
            "whose template ends turns with a special token, or lmforge's own tokenizer.")

    def segments(self, msgs: list[dict], where: str, *, find_eot: bool = False) -> list[tuple[str, bool]]:
        """The rendered conversation as consecutive (text, supervised) pieces."""
        full = self._render(msgs, False, where)
        if self.train_on_prompt and not find_eot:
            return [(full, True)]
        pieces: list[tuple[str, bool]] = []
        pos = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self._render(msgs[:i], True, where)
            through = self._render(msgs[: i + 1], False, where)
            if not (through.startswith(before) and full.startswith(through) and len(before) >= pos):
                raise LmforgeError(
                    f"{where}: the chat template renders earlier turns differently once later turns are added, so "
                    "the assistant spans cannot be located; use a template whose output grows turn by turn.")
            delta = through[len(before):]
            content = m["content"]
            # a template may put whitespace before the content (which itself may start with some)
            lead = 0 if delta.startswith(content) else len(delta) - len(delta.lstrip())
            if not delta[lead:].startswith(content):
                raise LmforgeError(
                    f"{where}: the chat template changes the assistant content (e.g. strips or escapes it), so "
                    "the supervised span would not be that content; strip the content in the data or change the template.")
            after = delta[lead + len(content):]
            if find_eot:
                self.eot_text = self._find_eot(after, where)
            if not after.startswith(self.eot_text):
                raise LmforgeError(f"{where}: the chat template does not end this assistant turn with "
                                   f"{self.eot_text!r} right after the content.")
            start = len(before) + lead
            end = start + len(content) + len(self.eot_text)
            pieces.append((full[pos:start], False))
            pieces.append((full[start:end], True))
            pos = end
        pieces.append((full[pos:], False))
        return [(t, s) for t, s in pieces if t]

    def expected_spans(self, msgs: list[dict]) -> list[str]:
        """What the supervised tokens must decode to: each assistant content + end-of-turn."""
        return [m["content"] + self.eot_text for m in msgs if m["role"] == "assistant"]

    def encode_many(self, convs: list[tuple[list[dict], str]]) -> list[tuple[list[int], list[bool]]]:
        """Token ids and per-token supervised flags for each (messages, where), in one tokenizer call."""
        all_segs = [self.segments(msgs, where) for msgs, where in convs]
        flat = [t for segs in all_segs for t, _ in segs]
        enc = self.tok(flat, add_special_tokens=False)["input_ids"] if flat else []
        k = 0
        for (msgs, _), segs in zip(convs, all_segs):
            if has_special_text(self.tok, msgs):  # typed role markers stay text, as at inference (data/chat.py)
                full, spans = content_spans(self.tok, msgs, add_generation_prompt=False)
                cuts = list(itertools.accumulate(len(t) for t, _ in segs))[:-1]
                enc[k:k + len(segs)] = encode_text(self.tok, full, spans, cuts)
            k += len(segs)
        out, k = [], 0
        for segs in all_segs:
            ids: list[int] = []
            sup: list[bool] = []
            for _, s in segs:
                ids += enc[k]
                sup += [s] * len(enc[k])
                k += 1
            out.append((ids, sup))
        return out


# --------------------------------------------------------------------------------------------
# Reading a whole split into flat arrays


@dataclass
class SFTExamples:
    """Tokenised examples as flat arrays: example i is ids[offsets[i]:offsets[i+1]].

    `sup[t]` says token t is a training target (predicted from the tokens before it).
    """

    ids: np.ndarray  # int32 (total_tokens,)
    sup: np.ndarray  # bool  (total_tokens,)
    offsets: np.ndarray  # int64 (n + 1,)
    # (messages, where, index, truncated) of the first examples, for the start-up mask check
    checks: list[tuple[list[dict], str, int, bool]] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.offsets[i], self.offsets[i + 1]
        return self.ids[s:e], self.sup[s:e]


def pick_system(system_prompt: str | list[str] | None, share: float, seed: int, i: int) -> str | None:
    """Row i's system prompt: none, the one given, or one drawn from the list (seeded per row), for
    `share` of the rows: a model trained with and without one answers the same either way."""
    if not system_prompt or share <= 0:
        return None
    rng = random.Random(f"{seed}:{i}")
    if share < 1 and rng.random() >= share:
        return None
    return system_prompt if isinstance(system_prompt, str) else rng.choice(system_prompt)


def iter_conversations(patterns: list[str] | str, *, fmt: Format, on_bad_rows: OnBadRows, stats: ReadStats,
                       dataset_split: str | None = None, system_prompt: str | list[str] | None = None,
                       system_share: float = 1.0, seed: int = 0,
                       keep: Callable[[int], bool] | None = None) -> Iterator[tuple[str, list[dict], str]]:
    """(format, messages, where) for every usable row; bad rows raise or are counted in `stats`.

    `keep(i)` selects rows by their 0-based index among all rows read (for a held-out split).
    `system_prompt` (one, or a list sampled per row) goes into `system_share` of the rows that
    have none; the choice is seeded by `seed` and the row index, so stable across runs and resumes.
    """
    bad = BadRows(on_bad_rows, stats)
    for i, rec in enumerate(iter_records(patterns, dataset_split=dataset_split, on_bad_rows=on_bad_rows,
                                         stats=stats, columns=_ALL_COLUMNS)):
        if keep is not None and not keep(i):
            continue
        got = to_messages(rec, fmt, bad, system_prompt=pick_system(system_prompt, system_share, seed, i))
        if got is not None:
            yield got[0], got[1], rec.where


def tokenize_conversations(convs: Iterator[tuple[str, list[dict], str]], encoder: ChatEncoder, *, seq_len: int,
                           overlong: Overlong, n_checks: int = 8, chunk: int = 512) -> SFTExamples:
    """Tokenise every conversation; overlong ones are truncated to `seq_len` tokens or dropped.

    A truncated example that keeps no supervised token is dropped too. Every case is counted in
    `stats` (never silent).
    """
    ids_parts: list[np.ndarray] = []
    sup_parts: list[np.ndarray] = []
    lengths: list[int] = []
    checks: list[tuple[list[dict], str, int, bool]] = []
    st = {"examples": 0, "formats": {}, "truncated": 0, "dropped_too_long": 0,
          "dropped_no_target_after_truncation": 0, "supervised_tokens": 0, "tokens": 0}

    def flush(buf: list[tuple[str, list[dict], str]]) -> None:
        for (kind, msgs, where), (ids, sup) in zip(buf, encoder.encode_many([(m, w) for _, m, w in buf])):
            cut = len(ids) > seq_len
            if cut:
                if overlong == "drop":
                    st["dropped_too_long"] += 1
                    continue
                ids, sup = ids[:seq_len], sup[:seq_len]
                if not any(sup[1:]):
                    st["dropped_no_target_after_truncation"] += 1
                    continue
                st["truncated"] += 1
            if len(checks) < n_checks:
                checks.append((msgs, where, len(lengths), cut))
            st["formats"][kind] = st["formats"].get(kind, 0) + 1
            ids_parts.append(np.asarray(ids, dtype=np.int32))
            sup_parts.append(np.asarray(sup, dtype=bool))
            lengths.append(len(ids))

    buf: list[tuple[str, list[dict], str]] = []
    for item in convs:
        buf.append(item)
        if len(buf) >= chunk:
            flush(buf)
            buf = []
    flush(buf)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32)
    sup = np.concatenate(sup_parts) if sup_parts else np.zeros(0, bool)
    # A token is a target only if a token precedes it: the first of each example never is.
    sup[offsets[:-1][offsets[:-1] < len(sup)]] = False
    st["examples"] = len(lengths)
    st["tokens"] = int(len(ids))
    st["supervised_tokens"] = int(sup.sum())
    return SFTExamples(ids=ids, sup=sup, offsets=offsets, checks=checks, stats=st)


# --------------------------------------------------------------------------------------------
# The start-up mask check


def supervised_runs(ids: np.ndarray, sup: np.ndarray) -> list[list[int]]:
    """Maximal runs of consecutive supervised tokens, as id lists."""
    runs: list[list[int]] = []
    cur: list[int] = []
    for t, s in zip(ids.tolist(), sup.tolist()):
        if s:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def marked(tokenizer, ids: np.ndarray, sup: np.ndarray, open_: str = "⟦", close: str = "⟧") -> str:
    """The example's text with each supervised span wrapped in ⟦ ⟧."""
    out, cur, state = [], [], False
    for t, s in zip(ids.tolist(), sup.tolist()):
        if s != state and cur:
            text = _decode(tokenizer, cur)
            out.append(f"{open_}{text}{close}" if state else text)
            cur = []
        cur.append(t)
        state = s
    if cur:
        text = _decode(tokenizer, cur)
        out.append(f"{open_}{text}{close}" if state else text)
    return "".join(out)


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def mask_check(data: SFTExamples, encoder: ChatEncoder, *, what: str = "training data") -> str:
    """Decode the supervised tokens of the first examples and compare them with the assistant
    turns; raise on any mismatch or on an example with no target. Returns one marked example.
    """
    if len(data) == 0:
        raise LmforgeError(f"The {what} has no usable example; check the data and the counts above.")
    tok = encoder.tok
    for msgs, where, i, truncated in data.checks:
        ids, sup = data.example(i)
        if not sup.any():
            raise LmforgeError(f"Mask check: {where} has no supervised token; the loss would ignore it.")
        if encoder.train_on_prompt:
            continue
        runs = [_decode(tok, r) for r in supervised_runs(ids, sup)]
        want = encoder.expected_spans(msgs)
        ok = runs == want
        if not ok and truncated and 0 < len(runs) <= len(want):  # a truncated example: the last kept span is a prefix of its turn
            n = len(runs)
            ok = runs[: n - 1] == want[: n - 1] and want[n - 1].startswith(runs[-1])
        if not ok:
            raise LmforgeError(
                f"Mask check failed for {where}: the supervised tokens decode to {runs!r} but the assistant turns "
                f"are {want!r}; the chat template and the tokenizer disagree — fix the template or the tokenizer.")
    _, where, i, _ = data.checks[0]
    return f"{where}: " + marked(tok, *data.example(i))


# --------------------------------------------------------------------------------------------
# Batching: packed rows, or whole examples padded (in random or length-grouped order)


def _epoch_perm(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def _labels_for(ids: np.ndarray, sup: np.ndarray) -> np.ndarray:
    """labels[t] = ids[t+1] where token t+1 is supervised, else IGNORE (already shifted)."""
    lab = np.full(len(ids), IGNORE, dtype=np.int64)
    lab[:-1] = np.where(sup[1:], ids[1:], IGNORE)
    return lab


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of example indices whose lengths sum to <= capacity (best fit, longest first).

    Best-fit-decreasing fills rows to within a few tokens of `capacity` on typical SFT length
    distributions; O(n log n) plus list inserts.
    """
    order = np.argsort(-lengths, kind="stable")
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    bins: list[list[int]] = []
    for i in order.tolist():
        need = int(lengths[i])
        k = bisect.bisect_left(free, (need, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - need > 0:
            bisect.insort(free, (room - need, b))
    return bins


class PackedRows:
    """Examples packed into rows of at most `seq_len` tokens; position ids restart per example.

    Sample position p is row perm_epoch[p % n_rows] (a seeded permutation per epoch), so the
    data order is a pure function of the position, as the shared loop's exact resume needs.
    """

    def __init__(self, data: SFTExamples, seq_len: int, *, seed: int, pad_id: int, shuffle: bool = True):
        self.data, self.seq_len, self.seed, self.pad_id, self.shuffle = data, seq_len, seed, pad_id, shuffle
        if len(data) == 0:
            raise LmforgeError("No example is left to train on; check the data and the counts reported above.")
        self.rows = best_fit_decreasing(data.lengths, seq_len)
        self.row_examples = np.array([len(r) for r in self.rows])
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def n(self) -> int:
        return len(self.rows)

    def index_at(self, p: int) -> int:
        epoch, j = divmod(p, self.n)
        if not self.shuffle:
            return j
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, _epoch_perm(self.n, self.seed, epoch))
        return int(self._cache[1][j])

    def batch(self, start: int, size: int) -> dict:
        rows = [self.rows[self.index_at(p)] for p in range(start, start + size)]
        width = max(sum(int(self.data.lengths[i]) for i in r) for r in rows)
        ids = np.full((size, width), self.pad_id, dtype=np.int64)
        lab = np.full((size, width), IGNORE, dtype=np.int64)
        pos = np.zeros((size, width), dtype=np.int64)
        for b, r in enumerate(rows):
            c = 0
            for i in r:
                x, s = self.data.example(i)
                n = len(x)
                ids[b, c:c + n], lab[b, c:c + n], pos[b, c:c + n] = x, _labels_for(x, s), np.arange(n)
                c += n
            pos[b, c:] = np.arange(width - c)  # padding is its own "example": attends only to padding
        labels = torch.from_numpy(lab)
        return {"input_ids": torch.from_numpy(ids), "labels": labels, "position_ids": torch.from_numpy(pos),
                "n": int((labels != IGNORE).sum()), "examples": int(sum(len(r) for r in rows))}

    def examples_in(self, positions: int) -> int:
        """Examples visited in the first `positions` samples (rows)."""
        full, rest = divmod(positions, self.n)
        seen = full * len(self.data)
        return seen + sum(int(self.row_examples[self.index_at(full * self.n + j)]) for j in range(rest))


class LengthBatches:
    """One example per row, padded to the longest row of the micro-batch.

    grouped=True sorts each window of 64 micro-batches by length (then shuffles the
    micro-batches), so rows of a batch have similar lengths and little padding;
    grouped=False is plain random order (the padding baseline).
    """

    WINDOW = 64  # micro-batches per sorting window

    def __init__(self, data: SFTExamples, *, batch_size: int, seed: int, pad_id: int, grouped: bool,
                 shuffle: bool = True):
        if len(data) == 0:
            raise LmforgeError("No example is left to train on; check the data and the counts reported above.")
        self.data, self.bs, self.seed, self.pad_id = data, batch_size, seed, pad_id
        self.grouped, self.shuffle = grouped, shuffle
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def n(self) -> int:
        return len(self.data)

    def _order(self, epoch: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        perm = _epoch_perm(self.n, self.seed, epoch) if self.shuffle else np.arange(self.n)
        if self.grouped:
            lengths, w = self.data.lengths, self.bs * self.WINDOW
            rng = np.random.default_rng([self.seed, epoch, 1])
            parts = []
            for s in range(0, self.n, w):
                win = perm[s:s + w]
                win = win[np.argsort(-lengths[win], kind="stable")]
                chunks = [win[k:k + self.bs] for k in range(0, len(win), self.bs)]
                parts += [chunks[k] for k in (rng.permutation(len(chunks)) if self.shuffle else range(len(chunks)))]
            perm = np.concatenate(parts)
        self._cache = (epoch, perm)
        return perm

    def index_at(self, p: int) -> int:
        epoch, j = divmod(p, self.n)
        return int(self._order(epoch)[j])

    def batch(self, start: int, size: int) -> dict:
        idx = [self.index_at(p) for p in range(start, start + size)]
        width = max(int(self.data.lengths[i]) for i in idx)
        ids = np.full((size, width), self.pad_id, dtype=np.int64)
        lab = np.full((size, width), IGNORE, dtype=np.int64)
        att = np.zeros((size, width), dtype=np.int64)
        for b, i in enumerate(idx):
            x, s = self.data.example(i)
            n = len(x)
            ids[b, :n], lab[b, :n], att[b, :n] = x, _labels_for(x, s), 1
        labels = torch.from_numpy(lab)
        return {"input_ids": torch.from_numpy(ids), "labels": labels, "attention_mask": torch.from_numpy(att),
                "n": int((labels != IGNORE).sum()), "examples": size}

    def examples_in(self, positions: int) -> int:
        return positions


def make_batches(data: SFTExamples, batching: Batching, *, seq_len: int, batch_size: int, seed: int, pad_id: int,
                 shuffle: bool = True) -> PackedRows | LengthBatches:
    if batching == "pack":
        return PackedRows(data, seq_len, seed=seed, pad_id=pad_id, shuffle=shuffle)
    return LengthBatches(data, batch_size=batch_size, seed=seed, pad_id=pad_id, grouped=batching == "group",
                         shuffle=shuffle)

"""The batched sampler: left-padded prefill, one decode loop, per-row stopping, rows joining and
leaving between steps (continuous batching)."""

from __future__ import annotations

import inspect
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.generation.cache import is_buffered, new_cache
from lmforge.generation.fast_decode import FastDecode
from lmforge.generation.logits import (
    MIN_TEMPERATURE,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    sample_from_logits,
    top_k_filter,
    top_p_filter,
)
from lmforge.generation.params import SamplingParams
from lmforge.generation.text import decode_delta, find_stop, stop_holdback
from lmforge.models import cache_kwarg, context_length


@dataclass
class Completion:
    """One sampled completion of one prompt."""

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]  # everything sampled, including a final EOS/stop token
    finish_reason: str  # "stop" (EOS, stop token or stop string), "length", "cancelled" or "error"
    prompt_tokens: int
    logprobs: list[float] | None = None  # one per token id, when SamplingParams.logprobs
    error: str | None = None  # why it failed, with finish_reason "error"

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(eq=False)
class Row:
    """The state of one row being generated. Callers read it; only the engine writes it."""

    prompt_ids: list[int]
    params: SamplingParams
    tag: Any  # the caller's handle (a prompt index, a server request)
    sample_index: int
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    incremental: bool  # decode text every step (streaming or stop strings) or once at the end
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    text: str = ""
    sent: int = 0  # characters of `text` already handed out by take_text()
    finish_reason: str | None = None
    error: str | None = None  # why the row failed (finish_reason "error")
    _prefix: int = 0
    _read: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take_text(self) -> str:
        """Text not yet handed out that is safe to show: everything once finished, otherwise
        all but a tail that might still become a stop string."""
        end = len(self.text) if self.finished else len(self.text) - stop_holdback(self.text, self.params.stop)
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    def completion(self, prompt_index: int | None = None) -> Completion:
        return Completion(
            prompt_index=self.tag if prompt_index is None else prompt_index, sample_index=self.sample_index,
            text=self.text, token_ids=list(self.token_ids), finish_reason=self.finish_reason or "cancelled",
            prompt_tokens=len(self.prompt_ids), logprobs=list(self.logprobs) if self.logprobs is not None else None,
            error=self.error,
        )


class _RowParams:
    """The running rows' sampling parameters, rebuilt when rows join or leave.

    A parameter every row shares stays a Python number (the logits functions then skip the
    per-row tensor work); otherwise it is a (B,) tensor. None = no row uses that control.
    """

    def __init__(self, rows: list[Row], device: torch.device):
        ps = [r.params for r in rows]

        def col(values: list, dtype: torch.dtype) -> float | int | torch.Tensor:
            if all(v == values[0] for v in values):
                return values[0]
            return torch.tensor(values, dtype=dtype, device=device)

        temps = [p.temperature for p in ps]
        self.all_greedy = all(t < MIN_TEMPERATURE for t in temps)
        self.any_greedy = any(t < MIN_TEMPERATURE for t in temps)
        self.greedy = torch.tensor([t < MIN_TEMPERATURE for t in temps], device=device) if self.any_greedy else None
        self.temperature = col(temps, torch.float32)
        self.top_k = col([p.top_k for p in ps], torch.long) if any(p.top_k > 0 for p in ps) else None
        self.top_p = col([p.top_p for p in ps], torch.float32) if any(p.top_p < 1 for p in ps) else None
        self.min_p = col([p.min_p for p in ps], torch.float32) if any(p.min_p > 0 for p in ps) else None
        self.repetition = col([p.repetition_penalty for p in ps], torch.float32) if any(
            p.repetition_penalty != 1 for p in ps) else None
        self.any_count_penalty = any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in ps)
        self.presence = col([p.presence_penalty for p in ps], torch.float32)
        self.frequency = col([p.frequency_penalty for p in ps], torch.float32)
        self.any_min_new = any(p.min_new_tokens > 0 for p in ps)
        self.any_logprobs = any(p.logprobs for p in ps)
        self.seeded = [i for i, r in enumerate(rows) if r.generator is not None]


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The single token the tokenizer's chat template ends an assistant turn with (EOS for
    lmforge's template; `<|im_end|>`, `<|eot_id|>`, ... for others), or None without one."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    from lmforge.data.sft import ChatEncoder

    try:
        enc = ChatEncoder(tokenizer)
    except LmforgeError:  # a template the SFT encoder cannot read: rely on EOS alone
        return None
    ok = isinstance(enc.eot_id, int) and tokenizer.convert_ids_to_tokens(enc.eot_id) == enc.eot_text
    return enc.eot_id if ok else None


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Stop ids: the tokenizer's EOS, the chat template's end-of-turn token (a model fine-tuned
    with a reused template ends its replies with it, not with EOS), and the model's generation
    config (which may list several)."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        ids.add(eot)
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return ids


def _seeded_generator(seed: int, stream: int) -> torch.Generator:
    # splitmix-style mixing so streams of nearby seeds do not overlap.
    g = torch.Generator()
    g.manual_seed((seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + 1) % (2**63))
    return g


class Engine:
    """Batched generation with a KV cache: rows join (prefill) and leave (finish) between steps.

        engine = Engine(model, tokenizer, max_batch=32)
        rows = engine.add(prompt_ids, params, tag=0)
        while engine.has_work():
            for row in engine.step():       # rows that got a token this step (or just finished)
                print(row.take_text(), end="")

    Prompts are left-padded so every row's next token sits in the last column; each row has its
    own position ids and attention mask, so padding never changes a row's result (up to float
    rounding). When rows finish they are dropped from the cache and padding columns that no row
    needs any more are trimmed. New prompts are prefilled as a batch and merged into the running
    batch (continuous batching) when the cache is made of plain full-attention layers.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 32, fast_decode: bool = True):
        if max_batch < 1:
            raise LmforgeError(f"max_batch must be at least 1 (got {max_batch}).")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.device = next(model.parameters()).device
        self.context = context_length(model)
        self.eos_ids = frozenset(eos_token_ids(model, tokenizer))
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0))
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or model.get_output_embeddings().weight.shape[0])
        sig = inspect.signature(model.forward).parameters
        open_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.values())
        self._pass_positions = "position_ids" in sig or open_kwargs
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in sig else (
            "num_logits_to_keep" if "num_logits_to_keep" in sig else None)
        self._cache_kw = cache_kwarg(model)
        self.fast = FastDecode.for_model(model) if fast_decode else None
        self.pending: deque[list[Row]] = deque()  # groups of n rows sharing a prompt
        self.rows_failed = 0  # rows ended by an error (finish_reason "error")
        self._clear()

    # ---- state -------------------------------------------------------------------------------

    def _clear(self) -> None:
        self.rows: list[Row] = []
        self.cache = None
        self.length = 0  # positions held in the cache (incl. left padding)
        self.pads: list[int] = []  # left-padding columns per row
        self.next_tokens: torch.Tensor | None = None  # (B, 1) sampled, not yet fed
        self.positions: torch.Tensor | None = None  # (B, 1) position id of next_tokens
        self.mask: torch.Tensor | None = None  # (B, capacity) 1 = real token; columns >= length are 1
        self.seen: torch.Tensor | None = None  # (B, V) bool, for repetition_penalty
        self.counts: torch.Tensor | None = None  # (B, V) completion token counts, for presence/frequency
        self.rp: _RowParams | None = None

    def has_work(self) -> bool:
        return bool(self.rows or self.pending)

    @property
    def active(self) -> int:
        return len(self.rows) + sum(len(g) for g in self.pending)

    def add(self, prompt_ids: list[int], params: SamplingParams, *, tag: Any = None, stream: bool = False,
            seed_stream: int = 0, where: str = "prompt") -> list[Row]:
        """Queue `params.n` completions of `prompt_ids`; they start at a later `step()`.

        `where` names the prompt in error messages ("line 4 of prompts.jsonl"). `seed_stream`
        offsets the seeded random streams (completion j uses stream seed_stream + j).
        Raises LmforgeError for an empty prompt, unknown token ids or a too-long request.
        """
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise LmforgeError(f"{where} is empty; give at least one token of prompt.")
        bad = [t for t in prompt_ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise LmforgeError(f"{where} holds token id {bad[0]}, outside the model's vocabulary of {self.vocab_size}.")
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise LmforgeError(f"stop_token_ids holds {bad[0]}, outside the model's vocabulary of {self.vocab_size}.")
        if self.context is not None and n_prompt + params.max_new_tokens > self.context:
            room = self.context - n_prompt
            fix = f"lower max_new_tokens to at most {room}" if room > 0 else "shorten the prompt"
            raise LmforgeError(
                f"{where} has {n_prompt} tokens and max_new_tokens is {params.max_new_tokens}, but the model's "
                f"context is {self.context} tokens; {fix}."
            )
        group = [
            Row(
                prompt_ids=[int(t) for t in prompt_ids], params=params, tag=tag, sample_index=j,
                stop_ids=self.eos_ids | frozenset(params.stop_token_ids),
                generator=_seeded_generator(params.seed, seed_stream + j) if params.seed is not None else None,
                incremental=stream or bool(params.stop), logprobs=[] if params.logprobs else None,
            )
            for j in range(params.n)
        ]
        self.pending.append(group)
        return group

    def cancel(self, row: Row) -> None:
        """Stop `row` (e.g. its client went away); it leaves the batch at the next step."""
        if not row.finished:
            row.finish_reason = "cancelled"

    # ---- one step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """Admit waiting prompts (prefill) or decode one token for every running row.

        Returns the rows that got a new token this step (including those that just finished).
        """
        self._drop_finished()
        self._drop_cancelled_pending()
        if self.pending and (not self.rows or (
                is_buffered(self.cache) and len(self.rows) + len(self.pending[0]) <= self.max_batch)):
            return self._admit()
        if not self.rows:
            return []
        mask = self.mask[:, : self.length + 1] if any(self.pads) else None  # None: no padding, no mask work
        if self.fast is not None and not self.model.training and is_buffered(self.cache):
            logits = self.fast(self.next_tokens, self.positions, self.cache,
                               mask[:, None, None, :].bool() if mask is not None else None)
        else:
            kw: dict[str, Any] = {"attention_mask": mask} if mask is not None else {}
            if self._pass_positions:
                kw["position_ids"] = self.positions
            kw[self._cache_kw] = self.cache
            logits = self.model(input_ids=self.next_tokens, use_cache=True, **kw).logits[:, -1]
        self.length += 1
        self.positions += 1  # the token sampled now sits one position after the one just fed
        if self.length >= self.mask.shape[1]:
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask)], dim=1)
        return self._sample_and_append(logits, self.rows, self.rp, range(len(self.rows)))

    def _admit(self) -> list[Row]:
        """Prefill waiting prompts that fit in the batch (at least one), merge them, sample their first token."""
        groups: list[list[Row]] = []
        room = self.max_batch - len(self.rows)
        while self.pending and (not groups or len(self.pending[0]) <= room):
            g = self.pending.popleft()
            groups.append(g)
            room -= len(g)
        prompts = [g[0].prompt_ids for g in groups]
        width = max(len(p) for p in prompts)
        pads = [width - len(p) for p in prompts]
        ids = torch.tensor([[self.pad_id] * pad + p for p, pad in zip(prompts, pads)], device=self.device)
        mask = (torch.arange(width, device=self.device).unsqueeze(0)
                >= torch.tensor(pads, device=self.device).unsqueeze(1)).long()
        reserve = width + max(g[0].params.max_new_tokens for g in groups)
        cache = new_cache(self.model, reserve=min(reserve, self.context or reserve))
        kw: dict[str, Any] = {}
        if self._pass_positions:
            kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if any(pads):
            kw["attention_mask"] = mask
        if self._keep_kw:
            kw[self._keep_kw] = 1  # only the last position's logits: (B, 1, V), not (B, T, V)
        kw[self._cache_kw] = cache
        out = self.model(input_ids=ids, use_cache=True, **kw)
        logits = out.logits[:, -1]
        # n completions of one prompt share its prefill: repeat rows instead of recomputing.
        sizes = [len(g) for g in groups]
        if any(s > 1 for s in sizes):
            expand = torch.repeat_interleave(torch.arange(len(groups), device=self.device),
                                             torch.tensor(sizes, device=self.device))
            logits = logits[expand]
            cache.batch_select_indices(expand)
            mask = mask[expand]
            pads = [p for p, s in zip(pads, sizes) for _ in range(s)]
        new_rows = [s for g in groups for s in g]
        self._merge(new_rows, cache, width, pads)
        first = len(self.rows) - len(new_rows)
        return self._sample_and_append(logits, new_rows, _RowParams(new_rows, self.device),
                                       range(first, len(self.rows)))

    def _merge(self, new_rows: list[Row], cache: Any, width: int, pads: list[int]) -> None:
        """Append prefilled rows (their cache `width` long) to the running batch, right-aligned."""
        # The first sampled token of a prompt of L tokens sits at position L.
        new_pos = torch.tensor([[len(r.prompt_ids)] for r in new_rows], device=self.device)
        new_next = torch.zeros_like(new_pos)
        if not self.rows:
            self.cache, self.length, self.pads = cache, width, pads
            self.positions, self.next_tokens = new_pos, new_next
        else:
            length = max(self.length, width)
            old_shift, new_shift = length - self.length, length - width
            for old, new in zip(self.cache.layers, cache.layers):
                b0, b1 = old.kbuf.shape[0], new.kbuf.shape[0]
                cap = max(old.kbuf.shape[2] + old_shift, new.kbuf.shape[2] + new_shift)
                k = old.kbuf.new_zeros(b0 + b1, old.kbuf.shape[1], cap, old.kbuf.shape[3])
                v = torch.zeros_like(k)
                k[:b0, :, old_shift:length] = old.kbuf[:, :, : self.length]
                v[:b0, :, old_shift:length] = old.vbuf[:, :, : self.length]
                k[b0:, :, new_shift:length] = new.kbuf[:, :, :width]
                v[b0:, :, new_shift:length] = new.vbuf[:, :, :width]
                old.adopt(k, v, length)
            self.pads = [p + old_shift for p in self.pads] + [p + new_shift for p in pads]
            self.length = length
            self.positions = torch.cat([self.positions, new_pos])
            self.next_tokens = torch.cat([self.next_tokens, new_next])
        self.rows = self.rows + list(new_rows)
        self._rebuild_mask()
        self._grow_penalty_state(new_rows)
        self.rp = _RowParams(self.rows, self.device)

    def _rebuild_mask(self) -> None:
        cap = self.length + 64
        pads = torch.tensor(self.pads, device=self.device).unsqueeze(1)
        self.mask = (torch.arange(cap, device=self.device).unsqueeze(0) >= pads).long()

    def _grow_penalty_state(self, new_rows: list[Row]) -> None:
        """Extend the (B, V) seen/count tensors for new rows, allocating them on first need."""
        v, b1 = self.vocab_size, len(new_rows)
        want_seen = self.seen is not None or any(r.params.repetition_penalty != 1 for r in new_rows)
        want_counts = self.counts is not None or any(
            r.params.presence_penalty != 0 or r.params.frequency_penalty != 0 for r in new_rows)
        b0 = len(self.rows) - b1
        if want_seen:
            add = torch.zeros(b1, v, dtype=torch.bool, device=self.device)
            for i, r in enumerate(new_rows):
                add[i, torch.tensor(r.prompt_ids, device=self.device)] = True
            old = self.seen if self.seen is not None else torch.zeros(b0, v, dtype=torch.bool, device=self.device)
            self.seen = torch.cat([old, add])
        if want_counts:
            old = self.counts if self.counts is not None else torch.zeros(b0, v, dtype=torch.int32, device=self.device)
            self.counts = torch.cat([old, torch.zeros(b1, v, dtype=torch.int32, device=self.device)])

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not r.finished]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._clear()
            return
        idx = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.pads = [self.pads[i] for i in keep]
        trim = min(self.pads) if is_buffered(self.cache) else 0
        self.cache.batch_select_indices(idx)
        if trim:
            # Columns that are padding for every remaining row carry no information: drop them.
            for layer in self.cache.layers:
                layer.adopt(layer.kbuf[:, :, trim:], layer.vbuf[:, :, trim:], layer.length - trim)
            self.length -= trim
            self.pads = [p - trim for p in self.pads]
        self.next_tokens, self.positions = self.next_tokens[idx], self.positions[idx]
        self.seen = self.seen[idx] if self.seen is not None else None
        self.counts = self.counts[idx] if self.counts is not None else None
        self._rebuild_mask()
        self.rp = _RowParams(self.rows, self.device)

    def _drop_cancelled_pending(self) -> None:
        if any(s.finished for g in self.pending for s in g):
            self.pending = deque(g for g in self.pending if not all(s.finished for s in g))

    # ---- sampling ----------------------------------------------------------------------------

    def _uniforms(self, rows: list[Row], rp: _RowParams) -> torch.Tensor:
        u = torch.rand(len(rows))  # torch's global RNG, like transformers' generate
        for i in rp.seeded:
            u[i] = torch.rand(1, generator=rows[i].generator)
        return u.to(self.device)

    def _sample_and_append(self, logits: torch.Tensor, rows: list[Row], rp: _RowParams,
                           batch_rows: range) -> list[Row]:
        """Pick the next token of `rows` (batch rows `batch_rows`) from their (B, V) logits.

        A failure while sampling or decoding one row fails that row only (finish_reason
        "error"): the batch is shared by unrelated requests, and one request's values must
        not end the others'.
        """
        sl = slice(batch_rows.start, batch_rows.stop)
        try:
            tokens, lps, bad = self._pick(logits, rows, rp, sl)
        except Exception:  # retry row by row to find the culprit (rare: costs one pass per row)
            tokens, lps, bad = self._pick_each(logits, rows, batch_rows)
        self.next_tokens[sl] = tokens.unsqueeze(1)
        if self.seen is not None:
            self.seen[sl].scatter_(1, tokens.unsqueeze(1), True)
        if self.counts is not None:
            self.counts[sl].scatter_add_(1, tokens.unsqueeze(1), torch.ones_like(tokens, dtype=torch.int32).unsqueeze(1))
        for i, (r, t) in enumerate(zip(rows, tokens.tolist())):  # .tolist(): one host-device sync per step
            if bad[i] is not None:
                self.fail(r, bad[i])
                continue
            try:
                self._append(r, t, lps[i] if lps is not None else None)
            except Exception as e:  # e.g. the tokenizer cannot decode what this row sampled
                self.fail(r, f"{type(e).__name__}: {e}")
        return list(rows)

    def _pick(self, logits: torch.Tensor, rows: list[Row], rp: _RowParams,
              sl: slice) -> tuple[torch.Tensor, list[float] | None, list[str | None]]:
        """(tokens (B,), their log-probs or None, per row None or why it has no valid distribution)."""
        logits = logits.float()
        if rp.repetition is not None and self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen[sl], rp.repetition)
        if rp.any_count_penalty and self.counts is not None:
            logits = apply_presence_frequency_penalty(logits, self.counts[sl], rp.presence, rp.frequency)
        if rp.any_min_new:
            # Before min_new_tokens, EOS and stop tokens are impossible.
            pairs = [(i, t) for i, r in enumerate(rows) if len(r.token_ids) < r.params.min_new_tokens
                     for t in r.stop_ids if t < logits.shape[-1]]
            if pairs:
                ri, ti = zip(*pairs)
                logits[list(ri), list(ti)] = float("-inf")
        if rp.all_greedy:
            tokens, final = logits.argmax(-1), logits
        else:
            x = apply_temperature(logits, rp.temperature)
            if rp.top_k is not None:
                x = top_k_filter(x, rp.top_k)
            if rp.top_p is not None:
                x = top_p_filter(x, rp.top_p)
            if rp.min_p is not None:
                x = min_p_filter(x, rp.min_p)
            tokens = sample_from_logits(x, self._uniforms(rows, rp))
            final = x
            if rp.any_greedy:
                tokens = torch.where(rp.greedy, logits.argmax(-1), tokens)
                final = torch.where(rp.greedy.unsqueeze(1), logits, x)
        lps = None
        if rp.any_logprobs:
            lps = final.log_softmax(-1).gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        invalid = (final.isnan().any(-1) | final.isneginf().all(-1)).tolist()
        bad = ["the sampling distribution is not finite (NaN or no token left)" if v else None for v in invalid]
        return tokens, lps, bad

    def _pick_each(self, logits: torch.Tensor, rows: list[Row],
                   batch_rows: range) -> tuple[torch.Tensor, list[float] | None, list[str | None]]:
        """`_pick` one row at a time; a row that fails gets the pad token and its error."""
        tokens, lps, bad = [], [], []
        for i, r in enumerate(rows):
            at = batch_rows.start + i
            try:
                t, lp, b = self._pick(logits[i:i + 1], [r], _RowParams([r], self.device), slice(at, at + 1))
                tokens.append(t)
                lps.append(lp[0] if lp is not None else None)
                bad.append(b[0])
            except Exception as e:
                tokens.append(torch.tensor([self.pad_id], device=self.device))
                lps.append(None)
                bad.append(f"{type(e).__name__}: {e}")
        return torch.cat(tokens), lps, bad

    def fail(self, row: Row, why: str) -> None:
        """End `row` with finish_reason "error" and the reason in `row.error`."""
        if not row.finished:
            row.finish_reason, row.error = "error", why
            self.rows_failed += 1

    def abort_all(self, why: str) -> list[Row]:
        """Fail every running and waiting row (e.g. the forward pass itself failed) and empty the
        engine, which stays usable; returns the rows that were failed."""
        rows = [*self.rows, *(r for g in self.pending for r in g)]
        for r in rows:
            self.fail(r, why)
        self.pending.clear()
        self._clear()
        return rows

    def _append(self, r: Row, token: int, logprob: float | None) -> None:
        p = r.params
        r.token_ids.append(token)
        if r.logprobs is not None and logprob is not None:
            r.logprobs.append(logprob)
        n = len(r.token_ids)
        if token in r.stop_ids and n > p.min_new_tokens:
            r.finish_reason = "stop"
        else:
            if r.incremental:
                checked = len(r.text)
                delta, r._prefix, r._read = decode_delta(self.tokenizer, r.token_ids, r._prefix, r._read,
                                                         p.skip_special_tokens)
                r.text += delta
                if p.stop and delta and n >= p.min_new_tokens:
                    j = find_stop(r.text, p.stop, checked)
                    if j != -1:
                        r.text = r.text[:j]  # the completion ends just before the stop string
                        r.finish_reason = "stop"
                        return
            if n >= p.max_new_tokens or (self.context is not None and len(r.prompt_ids) + n >= self.context):
                r.finish_reason = "length"
        if r.finished:
            self._final_text(r)

    def _final_text(self, r: Row) -> None:
        """Text of a finished row: decoded once (non-incremental) or the held-back tail flushed."""
        kw = dict(skip_special_tokens=r.params.skip_special_tokens, clean_up_tokenization_spaces=False)
        ids = r.token_ids[:-1] if r.finish_reason == "stop" else r.token_ids  # a stop token is not text
        if not r.incremental:
            r.text = self.tokenizer.decode(ids, **kw)
            return
        tail = self.tokenizer.decode(ids[r._prefix:], **kw)
        head = self.tokenizer.decode(ids[r._prefix:r._read], **kw)
        if len(tail) > len(head):
            r.text += tail[len(head):]  # e.g. an incomplete character held back while streaming

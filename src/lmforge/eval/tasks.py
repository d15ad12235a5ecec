"""Evaluation tasks: the declarative schema, reading a task's rows, and running a task on a model.

A task is a file of rows plus how to prompt and how to score:

    - name: unknown                         # metrics are reported as <name>.<metric>
      file: "@world/eval/unknown.jsonl"     # JSONL/Parquet/CSV/datasets rows; "@name/..." = a data root
      format: chat                          # chat: rendered with the chat template; plain: raw text
      prompt_field: prompt                  # chat: a string (one user turn) or a messages list
      scorers: [hallucination, abstention]  # see lmforge.eval.scorers
      group_by: attribute                   # also report each metric per value of this row field
      max_new_tokens: 32                    # sampling is greedy unless `sampling:` overrides it

    - name: validation                      # kind likelihood: loss and perplexity of text
      kind: likelihood
      file: "@curate"                       # a curated data folder (its `split`) or text rows
      split: validation

Generation goes through `lmforge.generation.generate` only (`complete()` below is the one call),
so what is evaluated is what `lmforge generate` and the server produce.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from lmforge.config import Schema, load_yaml, validate
from lmforge.data.chat import encode
from lmforge.errors import LmforgeError
from lmforge.eval.scorers import DEFAULT_ABSTENTION, DEFAULT_REFUSAL, SCORERS, WIN_RATE, Phrases, phrases
from lmforge.rundir import resolve_artifact

Kind = Literal["generate", "likelihood"]
LIKELIHOOD_METRICS = ("loss", "perplexity")  # both lower-is-better, in their own units
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def _known_scorer(name: str) -> str:
    if name not in SCORERS:
        import difflib

        close = difflib.get_close_matches(name, SCORERS, n=1)
        raise ValueError(f"unknown scorer {name!r}; " + (f"did you mean {close[0]!r}?" if close else
                                                         f"known scorers: {', '.join(SCORERS)}"))
    return name


@dataclass(frozen=True)
class MetricSpec:
    """A metric a task reports: its scorer (None for likelihood), direction, and whether it is a
    rate (a mean of 0/1 scores: shown in percent, gate thresholds in percentage points)."""

    name: str
    scorer: "ScorerRef | None"
    higher_is_better: bool
    rate: bool


class ScorerRef(Schema):
    """A scorer with per-scorer settings (a plain scorer name in `scorers` means all defaults)."""

    scorer: str = Field(description=f"Scorer name: {', '.join(SCORERS)}.")
    answer_field: str | None = Field(None, description="Row field holding the expected answer; None = the task's answer_field.")
    metric: str | None = Field(None, description="Metric name to report; None = the scorer's own (accuracy, refusal_rate, ...).")

    @field_validator("scorer")
    @classmethod
    def _known(cls, v: str) -> str:
        return _known_scorer(v)


class Task(Schema):
    """One evaluation task: rows from a file, a prompt format, scorers, sampling."""

    name: str = Field(description="Task name (letters, digits, _ and -); metrics are reported as <name>.<metric>.")
    kind: Kind = Field("generate", description="generate: sample an answer per row and score it; "
                       "likelihood: loss and perplexity of the text.")
    file: str = Field(description="Rows: a JSONL/Parquet/CSV file, a datasets folder, or (likelihood) a curated data "
                      "folder. '@name/rest' is `rest` inside the eval config's data root `name`.")
    split: str = Field("validation", description="likelihood on a curated data folder: the split to read.")
    text_field: str = Field("text", description="likelihood on rows: the field holding the text.")
    format: Literal["chat", "plain"] = Field("chat", description="chat: the prompt goes through the chat template as "
                                             "a user turn; plain: the prompt text is given to the model as is.")
    prompt_field: str = Field("prompt", description="Row field with the prompt: text, or (chat) a list of messages.")
    system: str | None = Field(None, description="chat: a system message put before every prompt.")
    answer_field: str = Field("answer", description="Row field with the expected answer, for scorers that need one.")
    scorers: list[str | ScorerRef] = Field(default_factory=list, description="Scorers for generate tasks, each a name "
                                           "or {scorer, answer_field, metric}; each reports one metric.")
    group_by: str | None = Field(None, description="Also report every metric per value of this row field "
                                 "(with that group's chance baseline).")
    max_rows: int | None = Field(None, ge=1, description="Evaluate only the first N rows (the count evaluated is reported).")
    max_new_tokens: int = Field(64, ge=1, description="Longest answer, in tokens.")
    sampling: dict[str, Any] = Field(default_factory=dict, description="SamplingParams overrides for this task "
                                     "(default greedy: temperature 0). n must stay 1.")
    models: list[str] | None = Field(None, description="Run only on these models (names from the eval config); "
                                     "None = every model.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must use only letters, digits, _ and - (it becomes part of metric names)")
        return v

    @field_validator("scorers")
    @classmethod
    def _scorer_names(cls, v: list) -> list:
        for s in v:
            if isinstance(s, str):
                _known_scorer(s)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Task":
        if self.kind == "generate" and not self.scorers:
            raise ValueError(f"task {self.name!r} is a generate task but lists no scorers")
        if self.kind == "likelihood" and self.scorers:
            raise ValueError(f"task {self.name!r} is a likelihood task; it reports loss and perplexity and takes no scorers")
        names = [m.name for m in self.metric_specs()]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"task {self.name!r} reports metric {dup!r} twice; give one scorer a distinct `metric:`")
        if self.sampling.get("n", 1) != 1:
            raise ValueError("sampling.n must be 1: evaluation scores one completion per prompt")
        return self

    def refs(self) -> list[ScorerRef]:
        return [ScorerRef(scorer=s) if isinstance(s, str) else s for s in self.scorers]

    def metric_specs(self) -> list[MetricSpec]:
        """The metrics this task reports, in order (loss and perplexity for likelihood tasks)."""
        if self.kind == "likelihood":
            return [MetricSpec(m, None, False, False) for m in LIKELIHOOD_METRICS]
        out: list[MetricSpec] = []
        for ref in self.refs():
            s = SCORERS[ref.scorer]
            model_based = s.fn is None  # the reward scorer: a real-valued score, plus its win rate
            out.append(MetricSpec(ref.metric or s.metric, ref, s.higher_is_better, not model_based))
            if model_based:
                out.append(MetricSpec(win_rate_name(ref), ref, True, True))
        return out


def win_rate_name(ref: ScorerRef) -> str:
    return WIN_RATE if ref.metric is None else f"{ref.metric}_{WIN_RATE}"


class Suite(Schema):
    """A suite file: a list of tasks (and a free-text description)."""

    description: str = Field("", description="Free text shown in reports.")
    tasks: list[Task] = Field(description="The tasks, in the order they run.")
    abstention_phrases: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ABSTENTION),
        description="An output starting with one of these (compared case-, quote- and space-insensitively) is an "
                    "abstention, for the abstention and hallucination scorers. Default: " + " / ".join(DEFAULT_ABSTENTION))
    refusal_phrases: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REFUSAL),
        description="An output starting with one of these is a refusal, for the refusal, over_refusal and "
                    "hallucination scorers. Default: " + " / ".join(DEFAULT_REFUSAL))

    def phrases(self) -> Phrases:
        return phrases(self.abstention_phrases, self.refusal_phrases)


def load_suite(path: str | Path) -> Suite:
    return validate(Suite, load_yaml(path), where=str(path))


def resolve_file(task: Task, data: dict[str, str]) -> Path:
    """The task's file: '@name/rest' -> `rest` inside data root `name`; other paths as given."""
    f = task.file
    if f.startswith("@"):
        ref, _, rest = f[1:].partition("/")
        if ref not in data:
            known = f" (the data roots are: {', '.join(data)})" if data else ""
            raise LmforgeError(
                f"Task {task.name!r} reads {f!r}, but the eval config's `data` has no root named {ref!r}{known}; "
                f"add data: {{{ref}: <folder>}} (on the command line: --data {ref}=<folder>)."
            )
        root = resolve_artifact(data[ref], f"data root {ref!r}")
        p = root / rest if rest else root
    else:
        p = Path(f)
    if not p.exists():
        raise LmforgeError(f"Task {task.name!r}: file {p} does not exist; check `file` (and the data roots).")
    return p


def load_rows(task: Task, path: Path) -> tuple[list[dict], int]:
    """(rows to evaluate, rows in the file). Each row gets an `id` if it has none; a row without
    the prompt field (or the group_by field) is an error naming file, row and field."""
    from lmforge.data.formats import iter_records

    rows: list[dict] = []
    total = 0
    for rec in iter_records(str(path), skip_option=None):  # eval has no skip setting: a bad row is fixed
        total += 1
        if task.max_rows is not None and len(rows) >= task.max_rows:
            continue  # counted in `total`, reported as rows not evaluated
        row = dict(rec.values)
        for field in (task.prompt_field, task.group_by):
            if field is not None and row.get(field) is None:
                raise LmforgeError(f"Task {task.name!r}: {rec.where} has no field {field!r}; "
                                   f"fix the row or the task's {'prompt_field' if field == task.prompt_field else 'group_by'}.")
        row.setdefault("id", f"{task.name}-{total - 1:04d}")
        rows.append(row)
    if not rows:
        raise LmforgeError(f"Task {task.name!r}: {path} holds no rows.")
    return rows, total


def sampling_params(task: Task, stage_overrides: dict[str, Any]):
    """Greedy by default; stage-wide overrides, then the task's own, win."""
    from lmforge.generation import SamplingParams

    values = {"temperature": 0.0, "top_p": 1.0, "seed": 0, "max_new_tokens": task.max_new_tokens,
              **stage_overrides, **task.sampling}
    if values.get("n", 1) != 1:
        raise LmforgeError(f"Task {task.name!r}: sampling.n must be 1; evaluation scores one completion per prompt.")
    return validate(SamplingParams, values, where=f"task {task.name}", prefix="sampling.")


def prompt_text(task: Task, row: dict, tokenizer: Any) -> str | list[int]:
    """What is given to the model: the plain prompt's text, or the chat-rendered conversation's
    token ids (`data.chat.encode`: role markers typed inside a message stay text)."""
    value = row[task.prompt_field]
    if task.format == "plain":
        if not isinstance(value, str):
            raise LmforgeError(f"Task {task.name!r} row {row['id']}: a plain prompt must be text, "
                               f"not {type(value).__name__}; use format: chat for message lists.")
        return value
    return encode(tokenizer, messages(task, row), add_generation_prompt=True)


def messages(task: Task, row: dict) -> list[dict]:
    """The row's prompt as a conversation (a plain prompt becomes one user turn)."""
    value = row[task.prompt_field]
    if isinstance(value, str):
        msgs = [{"role": "user", "content": value}]
    elif isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        msgs = [{"role": m["role"], "content": m["content"]} for m in value]
    else:
        raise LmforgeError(f"Task {task.name!r} row {row['id']}: field {task.prompt_field!r} must be text or a list of "
                           "{role, content} messages.")
    if task.system and task.format == "chat":
        msgs = [{"role": "system", "content": task.system}, *msgs]
    return msgs


def complete(model: Any, tokenizer: Any, task: Task, prompts: list, params: Any, *, max_batch: int) -> list:
    """The one call into lmforge's generation path. Chat prompts are token ids that carry their
    own special tokens; plain prompts get the tokenizer's usual ones, as in `lmforge generate`."""
    from lmforge.generation import generate

    return generate(model, tokenizer, prompts, params, max_batch=max_batch,
                    add_special_tokens=task.format == "plain")


# --------------------------------------------------------------------------------------------
# Likelihood


def likelihood(model: Any, tokenizer: Any, texts: list[str], *, batch_size: int, device: Any) -> tuple[list[float], list[int]]:
    """Per-document summed next-token loss (nats) and predicted-token counts.

    A document is scored as in pre-training: it follows an EOS and ends with one, so every
    token of it (and its final EOS) is predicted. Documents longer than the model's context
    are cut into consecutive windows of `context` predictions (no overlap), as packed training
    blocks are. Equals, for a document that fits:
        ids = [eos] + tok(text) + [eos]; sum(cross_entropy(model(ids[:-1]).logits, ids[1:]))
    """
    from lmforge.generation import context_length

    ctx = context_length(model) or 1024
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    windows: list[tuple[int, list[int], list[int]]] = []  # (doc index, inputs, targets)
    counts = [0] * len(texts)
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]  # long texts are windowed below
    for d, ids in enumerate(encoded):
        seq = ([eos] if eos is not None else []) + list(ids) + ([eos] if eos is not None else [])
        for s in range(0, len(seq) - 1, ctx):
            chunk = seq[s:s + ctx + 1]
            windows.append((d, chunk[:-1], chunk[1:]))
            counts[d] += len(chunk) - 1
    nats = torch.zeros(len(texts), dtype=torch.float64)
    windows.sort(key=lambda w: len(w[1]))  # similar lengths together: little padding
    for b in range(0, len(windows), batch_size):
        part = windows[b:b + batch_size]
        width = max(len(w[1]) for w in part)
        inp = torch.full((len(part), width), pad, dtype=torch.long)
        lab = torch.full((len(part), width), -100, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for i, (_, x, y) in enumerate(part):
            inp[i, :len(x)] = torch.tensor(x)
            lab[i, :len(y)] = torch.tensor(y)
            mask[i, :len(x)] = 1
        with torch.no_grad():
            logits = model(input_ids=inp.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
        per_tok = F.cross_entropy(logits.flatten(0, 1), lab.to(device).flatten(), reduction="none", ignore_index=-100)
        per_win = per_tok.view(len(part), width).sum(1).double().cpu()
        for i, (d, _, _) in enumerate(part):
            nats[d] += per_win[i]
    return nats.tolist(), counts


def likelihood_texts(task: Task, path: Path) -> tuple[list[str], int]:
    """(texts to score, texts available): a curated folder's split, or the text field of rows."""
    from lmforge.data.corpus import iter_texts as iter_split
    from lmforge.data.formats import iter_texts as iter_rows

    if path.is_dir() and (any(path.glob("*.parquet")) or (path / "manifest.json").is_file()):
        try:
            texts_iter = iter_split(path, task.split)
            texts = list(texts_iter)
        except LmforgeError as e:
            raise LmforgeError(f"Task {task.name!r}: {e}") from None
    else:
        texts = list(iter_rows(str(path), text_field=task.text_field, skip_option=None))
    total = len(texts)
    if task.max_rows is not None:
        texts = texts[:task.max_rows]
    if not texts:
        raise LmforgeError(f"Task {task.name!r}: {path} holds no text to score.")
    return texts, total


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))

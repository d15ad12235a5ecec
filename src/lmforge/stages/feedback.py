"""Stage `feedback`: AI feedback in place of human raters (RLAIF ranking; constitutional critique-and-revise).

method rank (RLAIF, Bai et al. 2022b; Lee et al. 2023):

    prompts ──candidates: the row's `responses`, or n samples of `model` (lmforge.generation)
        ──every pair of distinct candidates, judged in BOTH orders under the principles
          (a judge model — any local HF causal LM, or the policy itself — or a Python rule)
        ──both orders agree ──> a preference pair (chosen, rejected)
          they disagree     ──> position-inconsistent: no pair (a judge that always picks the
                                first answer produces none at all)
        data/preference.jsonl   {"prompt", "chosen", "rejected", ...}: input of `reward` or `dpo`
        data/comparisons.jsonl  every judgment: order, raw verdict, parsed verdict, attempts
        data/report.json        counts, first_position_rate (share of verdicts for the answer
                                shown first: 0.5 for an unbiased judge)

method critique (constitutional AI, Bai et al. 2022b, supervised phase):

    prompts ──draft: the row's `response`, or a sample of `model`
        ──a principle (seeded choice per prompt) ──critique: the model answers the principle's
          critique request about its draft (or a Python `critic`)
        ──revision: the model answers the revision request (or a Python `reviser`)
        data/preference.jsonl   (chosen = revision, rejected = draft), when they differ
        data/sft.jsonl          {"messages": prompt + revision}: an SFT set
        data/critiques.jsonl    draft, principle, critique, revision, fate of every prompt

Verdicts are parsed by `parse_verdict` ("A", "B.", "**B**", "Response A", "Answer: B"; lowercase
"a" is an article, not a verdict). An unparseable verdict is retried once (a model judge then
samples at `judge.retry_temperature`, since greedy decoding would repeat itself), then counted as
unparseable and reported; it never stops the run. A rule judge is fn(prompt_turns, response_a,
response_b, principles, row) -> verdict text; critic fn(prompt_turns, draft, principle, row) -> text;
reviser fn(prompt_turns, draft, critique, principle, row) -> text (principles as dicts).

Principles are a YAML file (`principles:` list of name, text, critique, revision); the default is
recipes/principles.yaml.

Example recipe stages (the policy judges its own samples; then critique-and-revise):

    - stage: feedback
      name: rlaif
      prompts: "@world/sft/train.jsonl"     # the assistant turns are dropped: they get re-sampled
      judge_model: policy                   # or a folder: any local HF causal LM
      sampling: {n: 2, temperature: 1.0, top_p: 1.0, max_new_tokens: 64, seed: 0}
    - stage: reward                         # or dpo: data: "@rlaif/preference.jsonl"
      data: "@rlaif/preference.jsonl"
    - stage: feedback
      name: constitution
      method: critique
      prompts: "@world/sft/train.jsonl"
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lmforge.config import Device, Schema, load_yaml, validate
from lmforge.data.chat import encode as encode_chat
from lmforge.data.formats import OnBadRows, ReadStats
from lmforge.data.preference import read_prompt_rows
from lmforge.errors import LmforgeError
from lmforge.generation import (
    SamplingParams,
    context_length,
    generate,
    load_model_for_inference,
)
from lmforge.rundir import RunDir, atomic_write_json, staged_dir
from lmforge.scoring import load_score_fn

ARTIFACT = "data"
PROVIDES = ("preference_data", "sft_data")
INPUTS = {"model": "model", "prompts": None, "principles": None, "judge_model": None}
DEFAULT_PRINCIPLES = Path(__file__).resolve().parents[1] / "recipes" / "principles.yaml"  # package data


class Principle(Schema):
    name: str = Field(min_length=1, description="Short id of the principle.")
    text: str = Field(min_length=1, description="What a judge checks when comparing two responses.")
    critique: str = Field(min_length=1, description="Request asking the model to critique its draft.")
    revision: str = Field(min_length=1, description="Request asking the model to rewrite its draft.")


class PrincipleFile(Schema):
    principles: list[Principle] = Field(min_length=1, description="The principles, in order.")


def load_principles(path: str | Path | None) -> list[Principle]:
    p = Path(path) if path else DEFAULT_PRINCIPLES
    return validate(PrincipleFile, load_yaml(p), where=str(p)).principles


def _default_sampling() -> SamplingParams:
    return SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=64, seed=0)


class JudgeConfig(Schema):
    """The rule judge, or how the model judge (`judge_model`) answers."""

    function: str | None = Field(
        None, description="Rule judge `module:function` or `file.py:function`: fn(prompt_turns, response_a, "
        "response_b, principles, row) -> verdict text (A or B).")
    max_new_tokens: int = Field(8, ge=1, description="Tokens a model judge may write for its verdict.")
    temperature: float = Field(0.0, ge=0, description="First attempt's sampling temperature (0 = greedy).")
    retry_temperature: float = Field(1.0, gt=0, description="Temperature of the one retry after an unparseable verdict.")
    both_orders: bool = Field(True, description="Judge (A, B) and (B, A); keep a pair only when both agree.")
    instructions: str = Field(
        "Compare two responses to the conversation below under these principles:",
        description="First line of a model judge's prompt.")


class Config(Schema):
    method: Literal["rank", "critique"] = Field("rank", description="rank = RLAIF comparisons; critique = "
                                                "constitutional critique-and-revise.")
    model: str | None = Field(None, description="The policy: samples candidates/drafts, writes critiques and revisions "
                              "without a critic/reviser function, and judges when judge_model is `policy`.")
    prompts: str | list[str] | None = Field(
        None, description="Prompt rows ({prompt} or {messages}, optional `responses` / `response`): JSONL/Parquet/CSV "
        "files, globs or a `datasets` folder.")
    dataset_split: str | None = Field(None, description="Split to read from a DatasetDict folder.")
    max_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts.")
    system_prompt: str | None = Field(None, description="System turn put before text prompts that have none.")
    on_bad_rows: OnBadRows = Field("error", description="error = stop at a bad prompt row naming it; skip = count it.")
    principles: str | None = Field(None, description="YAML file of principles (None = recipes/principles.yaml).")
    responses_field: str = Field("responses", description="rank: a row field listing candidate responses (used "
                                 "instead of sampling when present).")
    draft_field: str = Field("response", description="critique: a row field holding the draft (used instead of "
                             "sampling when present).")
    sampling: SamplingParams = Field(default_factory=_default_sampling,
                                     description="How candidates (n per prompt) and drafts (n ignored) are sampled.")
    judge_model: str | None = Field(
        None, description="rank: the judge model, `policy` (the stage's model) or a local HF causal-LM / stage folder; "
        "or leave it unset and name a rule judge in judge.function.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="rank: the rule judge or the model judge's settings.")
    critic: str | None = Field(None, description="critique: rule critic `module:function` (None = the model critiques).")
    reviser: str | None = Field(None, description="critique: rule reviser `module:function` (None = the model revises).")
    critique_max_new_tokens: int = Field(64, ge=1, description="Tokens the model may write for a critique or revision.")
    drop_truncated: bool = Field(True, description="Never use a sampled candidate, draft or revision cut by "
                                 "max_new_tokens (as chosen data it would teach the model not to stop).")
    seed: int = Field(0, ge=0, description="Seeds the principle chosen per prompt and the judge's retries.")
    max_batch: int = Field(32, ge=1, description="Sequences decoded together.")
    device: Device = Field(None, description="cpu, cuda, ... (None = cuda when available).")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Model dtype (auto: bf16 on GPU).")

    @model_validator(mode="after")
    def _one_judge(self) -> "Config":
        if self.method == "rank" and (self.judge_model is None) == (self.judge.function is None):
            raise ValueError("method rank needs exactly one judge: judge_model (`policy` or a model folder) or "
                             "judge.function (a rule)")
        return self


# --------------------------------------------------------------------------------------------
# Verdicts


_VERDICT = re.compile(
    r"^[\s*_`'\"(\[]*"
    r"(?:(?i:the\s+)?(?i:answer|verdict|choice|winner|better\s+response)(?i:\s+is)?\s*[:\-]?\s*)?"
    r"[\s*_`'\"(\[]*(?:(?i:response|output|answer)\s+)?([AB])(?![A-Za-z0-9])")


def parse_verdict(text: Any) -> str | None:
    """"A" or "B" from a judge's reply, or None when it names neither at its start."""
    if not isinstance(text, str):
        return None
    m = _VERDICT.match(text)
    return m.group(1) if m else None


def judge_prompt(instructions: str, principles: list[Principle], prompt: list[dict], a: str, b: str) -> list[dict]:
    """One user turn asking a model judge for a one-letter verdict."""
    rules = "\n".join(f"{i}. {p.text}" for i, p in enumerate(principles, 1))
    conv = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)
    text = (f"{instructions}\n{rules}\n\nConversation:\n{conv}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
            "Which response follows the principles better? Reply with only the letter A or B.")
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------------------------
# Models


@dataclass
class Chat:
    """A loaded model that completes conversations through the generation path."""

    model: Any
    tokenizer: Any
    max_batch: int
    too_long: int = 0  # conversations that did not fit the context (counted, never sent)

    def complete(self, convs: list[list[dict]], params: SamplingParams) -> list[Any]:
        """params.n Completions per conversation (a list), or None for one too long for the context."""
        ids = [encode_chat(self.tokenizer, c, add_generation_prompt=True) for c in convs]  # typed markers stay text
        ctx = context_length(self.model)
        ok = [i for i, x in enumerate(ids) if ctx is None or len(x) + params.max_new_tokens <= ctx]
        self.too_long += len(ids) - len(ok)
        out: list[Any] = [None] * len(ids)
        if ok:
            got = generate(self.model, self.tokenizer, [ids[i] for i in ok], params, max_batch=self.max_batch,
                           add_special_tokens=False)
            for k, i in enumerate(ok):
                out[i] = got[k * params.n:(k + 1) * params.n]
        return out

    def complete_one(self, convs: list[list[dict]], params: SamplingParams) -> list[Any]:
        """One Completion (or None) per conversation."""
        return [None if c is None else c[0] for c in self.complete(convs, params.model_copy(update={"n": 1}))]


def _load_fn(spec: str, key: str):
    try:
        return load_score_fn(spec)
    except LmforgeError as e:
        raise LmforgeError(str(e).replace("score_fn", key, 1)) from None


def _call(fn, spec: str, where: str, *args) -> str:
    try:
        v = fn(*args)
    except Exception as e:
        raise LmforgeError(f"{spec} failed on {where} ({type(e).__name__}: {e}).") from None
    return v


# --------------------------------------------------------------------------------------------
# method rank


@dataclass
class Judgment:
    prompt: int  # index into the prompts
    first: int  # candidate shown as A
    second: int  # candidate shown as B
    raw: Any = None
    verdict: str | None = None
    attempts: int = 0
    too_long: bool = False  # the judge prompt does not fit the judge's context: not sent, not retried

    @property
    def winner(self) -> int | None:
        return None if self.verdict is None else (self.first if self.verdict == "A" else self.second)


def judge_all(cfg: Config, judgments: list[Judgment], prompts: list, cands: list[list[str]],
              principles: list[Principle], judge_chat: Chat | None, judge_fn) -> None:
    """Fill every judgment's verdict: one attempt, then one retry for those that did not parse."""
    pdicts = [p.model_dump() for p in principles]
    for attempt in (1, 2):
        todo = [j for j in judgments if j.verdict is None and not j.too_long]
        if not todo:
            return
        if judge_fn is not None:
            for j in todo:
                turns, row, where = prompts[j.prompt]
                j.raw = _call(judge_fn, f"judge.function {cfg.judge.function}", where, turns, cands[j.prompt][j.first],
                              cands[j.prompt][j.second], pdicts, row)
        else:
            jc = cfg.judge
            params = SamplingParams(max_new_tokens=jc.max_new_tokens, top_p=1.0,
                                    temperature=jc.temperature if attempt == 1 else jc.retry_temperature,
                                    seed=cfg.seed + attempt)
            convs = [judge_prompt(jc.instructions, principles, prompts[j.prompt][0], cands[j.prompt][j.first],
                                  cands[j.prompt][j.second]) for j in todo]
            for j, c in zip(todo, judge_chat.complete_one(convs, params)):
                j.raw, j.too_long = (None, True) if c is None else (c.text, False)
        for j in todo:
            j.verdict = parse_verdict(j.raw)
            j.attempts = attempt


def rank(cfg: Config, prompts: list, principles: list[Principle], policy: Chat | None, judge_chat: Chat | None,
         judge_fn, files: dict, counts: dict) -> None:
    # 1. Candidates: the row's own, or n samples of the policy.
    cands: list[list[str]] = [[] for _ in prompts]
    need = []
    for i, (_, row, where) in enumerate(prompts):
        given = row.get(cfg.responses_field)
        if given is None:
            need.append(i)
        elif not (isinstance(given, list) and all(isinstance(r, str) for r in given)):
            raise LmforgeError(f"{where} field {cfg.responses_field!r} must be a list of response texts.")
        else:
            cands[i] = list(given)
    if need:
        if policy is None:
            raise LmforgeError(f"{prompts[need[0]][2]} has no {cfg.responses_field!r} to compare and no `model` is "
                               "set to sample candidates from.")
        outs = policy.complete([prompts[i][0] for i in need], cfg.sampling)
        for i, got in zip(need, outs):
            cands[i] = [c.text for c in got or [] if c.text.strip() and _complete(c, cfg)]
            counts["candidates_dropped"] += cfg.sampling.n - len(cands[i])
    counts["candidates"] += sum(len(c) for c in cands)

    # 2. Every pair of distinct candidates, in one or both orders.
    judgments: list[Judgment] = []
    for i, c in enumerate(cands):
        for a, b in itertools.combinations(range(len(c)), 2):
            if c[a].strip() == c[b].strip():
                counts["identical_pairs"] += 1
                continue
            counts["compared_pairs"] += 1
            judgments.append(Judgment(i, a, b))
            if cfg.judge.both_orders:
                judgments.append(Judgment(i, b, a))
    judge_all(cfg, judgments, prompts, cands, principles, judge_chat, judge_fn)

    # 3. Aggregate the orders of each pair.
    step = 2 if cfg.judge.both_orders else 1
    for k in range(0, len(judgments), step):
        group = judgments[k:k + step]
        for j in group:
            counts["judgments"] += 1
            counts["retried"] += j.attempts == 2
            if j.too_long:
                counts["judge_prompt_too_long"] += 1
            elif j.verdict is None:
                counts["unparseable"] += 1
            else:
                counts["first_position_votes"] += j.verdict == "A"
            turns, _, where = prompts[j.prompt]
            files["comparisons"].write(json.dumps({
                "source": where, "a": cands[j.prompt][j.first], "b": cands[j.prompt][j.second],
                "a_index": j.first, "b_index": j.second, "raw": j.raw if isinstance(j.raw, str) or j.raw is None else repr(j.raw),
                "verdict": j.verdict, "attempts": j.attempts}, ensure_ascii=False) + "\n")
        winners = [j.winner for j in group]
        if any(w is None for w in winners):
            counts["pairs_unjudged"] += 1
            continue
        if len(set(winners)) > 1:
            counts["position_inconsistent"] += 1
            continue
        j = group[0]
        w = winners[0]
        lose = j.second if w == j.first else j.first
        turns, _, where = prompts[j.prompt]
        files["preference"].write(json.dumps({
            "prompt": turns, "chosen": [{"role": "assistant", "content": cands[j.prompt][w]}],
            "rejected": [{"role": "assistant", "content": cands[j.prompt][lose]}],
            "source": where, "votes": len(group)}, ensure_ascii=False) + "\n")
        counts["pairs"] += 1


# --------------------------------------------------------------------------------------------
# method critique


def critique(cfg: Config, prompts: list, principles: list[Principle], policy: Chat | None, critic_fn, reviser_fn,
             files: dict, counts: dict) -> None:
    rng = random.Random(cfg.seed)
    chosen = [principles[rng.randrange(len(principles))] for _ in prompts]
    drafts: list[str | None] = [None] * len(prompts)
    need = []
    for i, (_, row, where) in enumerate(prompts):
        d = row.get(cfg.draft_field)
        if d is None:
            need.append(i)
        elif not isinstance(d, str):
            raise LmforgeError(f"{where} field {cfg.draft_field!r} must be the draft response as text.")
        else:
            drafts[i] = d
    if need or critic_fn is None or reviser_fn is None:
        if policy is None:
            raise LmforgeError("critique needs `model` to draft, critique or revise (or give every row a draft in "
                               f"{cfg.draft_field!r} and set both `critic` and `reviser` functions).")
    text_params = cfg.sampling.model_copy(update={"n": 1, "max_new_tokens": cfg.critique_max_new_tokens})
    if need:
        for i, c in zip(need, policy.complete_one([prompts[i][0] for i in need], cfg.sampling)):
            drafts[i] = c.text if c is not None and _complete(c, cfg) and c.text.strip() else None
    live = [i for i in range(len(prompts)) if drafts[i] is not None]
    counts["no_draft"] += len(prompts) - len(live)

    def convo(i: int, *extra: dict) -> list[dict]:
        return [*prompts[i][0], {"role": "assistant", "content": drafts[i]}, *extra]

    crit: dict[int, str | None] = {}
    if critic_fn is not None:
        for i in live:
            turns, row, where = prompts[i]
            crit[i] = _text(_call(critic_fn, f"critic {cfg.critic}", where, turns, drafts[i], chosen[i].model_dump(), row),
                            f"critic {cfg.critic}", where)
    else:
        outs = policy.complete_one([convo(i, {"role": "user", "content": chosen[i].critique}) for i in live], text_params)
        crit.update({i: (c.text if c is not None and c.text.strip() else None) for i, c in zip(live, outs)})
    live = [i for i in live if crit[i] is not None]
    rev: dict[int, str | None] = {}
    if reviser_fn is not None:
        for i in live:
            turns, row, where = prompts[i]
            rev[i] = _text(_call(reviser_fn, f"reviser {cfg.reviser}", where, turns, drafts[i], crit[i],
                                 chosen[i].model_dump(), row), f"reviser {cfg.reviser}", where)
    else:
        convs = [convo(i, {"role": "user", "content": chosen[i].critique}, {"role": "assistant", "content": crit[i]},
                       {"role": "user", "content": chosen[i].revision}) for i in live]
        outs = policy.complete_one(convs, text_params)
        rev.update({i: (c.text if c is not None and _complete(c, cfg) else None) for i, c in zip(live, outs)})

    for i in range(len(prompts)):
        turns, _, where = prompts[i]
        r = rev.get(i)
        if drafts[i] is None:
            fate = "no_draft"
        elif crit.get(i) is None:
            fate = "no_critique"
        elif r is None or not r.strip():
            fate = "no_revision"
        elif r.strip() == drafts[i].strip():
            fate = "unchanged"
        else:
            fate = "pair"
        if fate not in ("no_draft", "pair"):  # no_draft was counted when the drafts were made; pairs below
            counts[fate] += 1
        if fate in ("pair", "unchanged"):
            files["sft"].write(json.dumps({"messages": [*turns, {"role": "assistant", "content": r}],
                                           "principle": chosen[i].name, "source": where}, ensure_ascii=False) + "\n")
            counts["sft_rows"] += 1
        if fate == "pair":
            files["preference"].write(json.dumps({
                "prompt": turns, "chosen": [{"role": "assistant", "content": r}],
                "rejected": [{"role": "assistant", "content": drafts[i]}], "principle": chosen[i].name,
                "source": where}, ensure_ascii=False) + "\n")
            counts["pairs"] += 1
        files["critiques"].write(json.dumps({
            "source": where, "principle": chosen[i].name, "draft": drafts[i], "critique": crit.get(i),
            "revision": r, "fate": fate}, ensure_ascii=False) + "\n")


def _complete(c, cfg: Config) -> bool:
    return c.finish_reason == "stop" or not cfg.drop_truncated


def _text(v: Any, spec: str, where: str) -> str:
    if not isinstance(v, str):
        raise LmforgeError(f"{spec} returned {type(v).__name__} for {where}; it must return text.")
    return v


# --------------------------------------------------------------------------------------------
# The stage


def run(cfg: Config, rd: RunDir, resume: bool = False) -> dict:
    from collections import Counter


    t0 = time.time()
    principles = load_principles(cfg.principles)
    if cfg.prompts is None:
        raise LmforgeError("feedback needs `prompts`: rows with a 'prompt' (text or turns) or 'messages'.")
    judge_fn = _load_fn(cfg.judge.function, "judge.function") if cfg.method == "rank" and cfg.judge.function else None
    critic_fn = _load_fn(cfg.critic, "critic") if cfg.method == "critique" and cfg.critic else None
    reviser_fn = _load_fn(cfg.reviser, "reviser") if cfg.method == "critique" and cfg.reviser else None
    stats = ReadStats()
    prompts = read_prompt_rows(cfg, stats)
    if not prompts:
        raise LmforgeError(f"No usable prompt in {cfg.prompts}; check the rows and the counts: {stats.skipped}.")

    policy = None
    if cfg.model is not None:
        m, tok = load_model_for_inference(cfg.model, device=cfg.device, dtype=cfg.dtype)
        policy = Chat(m, tok, cfg.max_batch)
    judge_chat = None
    if cfg.method == "rank" and cfg.judge_model is not None:
        if cfg.judge_model == "policy":
            if policy is None:
                raise LmforgeError("judge_model is `policy` but no `model` is set; set `model` or name a judge folder.")
            judge_chat = policy
        else:
            m, tok = load_model_for_inference(cfg.judge_model, device=cfg.device, dtype=cfg.dtype)
            judge_chat = Chat(m, tok, cfg.max_batch)

    keys = (("candidates", "candidates_dropped", "identical_pairs", "compared_pairs", "judgments", "retried",
             "unparseable", "judge_prompt_too_long", "pairs_unjudged", "position_inconsistent", "pairs")
            if cfg.method == "rank" else ("no_draft", "no_critique", "no_revision", "unchanged", "pairs", "sft_rows"))
    counts: Counter = Counter({k: 0 for k in keys})
    names = ("preference", "comparisons") if cfg.method == "rank" else ("preference", "sft", "critiques")
    with staged_dir(rd.artifact) as tmp:
        with contextlib.ExitStack() as stack:
            files = {k: stack.enter_context(open(tmp / f"{k}.jsonl", "w", encoding="utf-8")) for k in names}
            if cfg.method == "rank":
                rank(cfg, prompts, principles, policy, judge_chat, judge_fn, files, counts)
            else:
                critique(cfg, prompts, principles, policy, critic_fn, reviser_fn, files, counts)
        summary: dict[str, Any] = {"method": cfg.method, "prompts": len(prompts), **{k: counts[k] for k in keys},
                                   "principles": [p.name for p in principles],
                                   "skipped_prompt_rows": stats.as_dict()["skipped"],
                                   "seconds": round(time.time() - t0, 2)}
        if cfg.method == "rank":
            parsed = counts["judgments"] - counts["unparseable"] - counts["judge_prompt_too_long"]
            summary["first_position_rate"] = round(counts["first_position_votes"] / parsed, 4) if parsed else None
            summary["judge"] = cfg.judge.function or cfg.judge_model
        too_long = sum(c.too_long for c in {id(x): x for x in (policy, judge_chat) if x is not None}.values())
        summary["too_long_for_context"] = too_long
        atomic_write_json(tmp / "report.json", summary)
    line = f"feedback ({cfg.method}): {json.dumps(summary)}"
    print(line)
    rd.log(line)
    if cfg.method == "rank" and counts["unparseable"]:
        rd.log(f"feedback: {counts['unparseable']} of {counts['judgments']} verdicts stayed unparseable after one "
               "retry (see comparisons.jsonl); their pairs were left out.")
    return summary


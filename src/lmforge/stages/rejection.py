"""Stage `rejection`: rejection sampling (best-of-n) into SFT and preference data.

    prompts ──chat template──> the policy samples n responses each (lmforge.generation, the one
        sampling path) ──reward model or score_fn──> a score per response
        ──keep the best (and the worst)──> data/sft.jsonl         {"messages": prompt + best}
                                           data/preference.jsonl  {"prompt", "chosen": best, "rejected": worst}
                                           data/samples.jsonl     every response, its score and fate
                                           data/report.json       counts and score statistics

Iterate it in a recipe: sample -> select -> SFT -> sample again, each round's SFT stage reading
`@<this stage>/sft.jsonl` and the next rejection stage picking up that SFT model (`model` is filled
from the newest earlier stage that provides a model; `reward_model` from the newest reward stage).

Prompt rows: {"prompt": text or turns} or {"messages": turns} (a trailing assistant turn, e.g. an
SFT row's answer, is dropped: it is what gets re-sampled). Every other field of the row is passed
to the score function (e.g. a reference `answer`).

Responses are stripped of surrounding whitespace. Empty ones, and ones cut by max_new_tokens
(`drop_truncated`), are never kept: an SFT target without its end-of-turn token would teach the
model not to stop. A pair needs two distinct usable responses whose scores differ by more than
`min_margin`. All of it is counted in the report.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Literal

from pydantic import Field

from lmforge.config import Device, Schema
from lmforge.data.chat import encode as encode_chat
from lmforge.data.formats import OnBadRows, ReadStats
from lmforge.data.preference import read_prompt_rows
from lmforge.errors import LmforgeError
from lmforge.generation import Engine, SamplingParams, load_model_for_inference
from lmforge.progress import Progress
from lmforge.rundir import RunDir, atomic_write_json, staged_dir
from lmforge.scoring import call_score_fn, load_reward_model, load_score_fn

ARTIFACT = "data"
PROVIDES = ("sft_data", "preference_data")
INPUTS = {"model": "model", "reward_model": "reward_model", "prompts": None}


def _default_sampling() -> SamplingParams:
    return SamplingParams(n=4, temperature=1.0, top_p=1.0, max_new_tokens=64, seed=0)


class Config(Schema):
    model: str | None = Field(None, description="Policy to sample from: a stage, model or adapter folder.")
    prompts: str | list[str] | None = Field(
        None, description="Prompt rows ({prompt} or {messages}): JSONL/Parquet/CSV files, globs or a `datasets` folder.")
    dataset_split: str | None = Field(None, description="Split to read from a DatasetDict folder.")
    max_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts.")
    system_prompt: str | None = Field(None, description="System turn put before text prompts that have none.")
    on_bad_rows: OnBadRows = Field("error", description="error = stop at a bad prompt row naming it; skip = count it.")
    reward_model: str | None = Field(None, description="Reward model folder that scores responses (a reward stage).")
    score_fn: str | None = Field(
        None, description="Instead of a reward model (it wins when both are set): `module:function` or "
        "`file.py:function`, called as fn(prompt_turns, response, row) -> number (higher is better).")
    sampling: SamplingParams = Field(
        default_factory=_default_sampling, description="How responses are sampled (n per prompt, temperature, "
        "top_p, top_k, ...); the default seeds sampling so a re-run reproduces it.")
    keep_worst: bool = Field(True, description="Also write (best, worst) preference pairs.")
    min_margin: float = Field(0.0, ge=0, description="A pair needs best score - worst score > min_margin.")
    drop_truncated: bool = Field(True, description="Never keep a response cut by max_new_tokens.")
    max_batch: int = Field(64, ge=1, description="Responses decoded together.")
    score_batch_size: int = Field(32, ge=1, description="Sequences per reward-model forward pass.")
    chunk_prompts: int = Field(256, ge=1, description="Prompts sampled and scored per round (bounds memory).")
    device: Device = Field(None, description="cpu, cuda, cuda:1, ... (None = cuda when available).")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Sampling dtype (auto: bf16 on GPU).")


def sample(engine: Engine, tokenizer, prompts: list[list[dict]], params: SamplingParams, first: int,
           prog: Progress, done: list[int]) -> list[list]:
    """n completions of each prompt; prompt i (global index first + i) uses seed streams (first + i) * n + j,
    so the samples do not depend on chunking or batching."""
    ids = [encode_chat(tokenizer, p, add_generation_prompt=True) for p in prompts]  # typed markers stay text
    rows = []
    for i, x in enumerate(ids):
        rows.append(engine.add(x, params, tag=i, seed_stream=(first + i) * params.n, where=f"prompt {first + i}"))
    while engine.has_work():
        for r in engine.step():
            if r.finished:
                done[0] += 1
                prog.update(done[0])
    return [[r.completion() for r in group] for group in rows]


def run(cfg: Config, rd: RunDir, resume: bool = False) -> dict:
    t0 = time.time()
    if cfg.model is None:
        raise LmforgeError("rejection needs `model`: the policy to sample from.")
    if cfg.prompts is None:
        raise LmforgeError("rejection needs `prompts`: rows with a 'prompt' (text or turns) or 'messages'.")
    if cfg.score_fn is None and cfg.reward_model is None:
        raise LmforgeError("rejection needs a scorer: `reward_model` (a reward stage folder) or `score_fn` "
                           "(module:function).")
    stats = ReadStats()
    prompts = read_prompt_rows(cfg, stats)
    if not prompts:
        raise LmforgeError(f"No usable prompt in {cfg.prompts}; check the rows and the counts: {stats.skipped}.")
    model, tokenizer = load_model_for_inference(cfg.model, device=cfg.device, dtype=cfg.dtype)
    fn = load_score_fn(cfg.score_fn) if cfg.score_fn else None
    rm = load_reward_model(cfg.reward_model, device=cfg.device) if fn is None else None
    scorer = cfg.score_fn or str(cfg.reward_model)
    params = cfg.sampling
    print(f"rejection: {len(prompts)} prompts x {params.n} samples from {cfg.model}, scored by {scorer}")

    counts = {"prompts": len(prompts), "samples": 0, "usable": 0, "empty": 0, "truncated": 0,
              "sft_rows": 0, "pairs": 0, "no_usable_sample": 0, "no_pair": 0}
    all_scores: list[float] = []
    best_scores: list[float] = []
    worst_scores: list[float] = []
    with staged_dir(rd.artifact) as tmp:
        engine = Engine(model, tokenizer, max_batch=cfg.max_batch)
        done = [0]
        with contextlib.ExitStack() as stack:
            files = {k: stack.enter_context(open(tmp / f"{k}.jsonl", "w", encoding="utf-8"))
                     for k in ("sft", "preference", "samples")}
            prog = stack.enter_context(Progress("rejection", len(prompts) * params.n, every=max(1, params.n * 16)))
            for first in range(0, len(prompts), cfg.chunk_prompts):
                part = prompts[first:first + cfg.chunk_prompts]
                groups = sample(engine, tokenizer, [p for p, _, _ in part], params, first, prog, done)
                for (turns, row, where), outs in zip(part, groups):
                    counts["samples"] += len(outs)
                    keep = []
                    for o in outs:
                        # Surrounding whitespace (a first token " The") is a tokenisation artefact, not
                        # content; SFT's chat encoding refuses an assistant turn that starts with it.
                        o.text = o.text.strip()
                        if not o.text:
                            counts["empty"] += 1
                        elif cfg.drop_truncated and o.finish_reason == "length":
                            counts["truncated"] += 1
                        else:
                            keep.append(o)
                    if fn is not None:
                        scores = [call_score_fn(fn, scorer, turns, o.text, row, f"{where} sample {o.sample_index}")
                                  for o in keep]
                    else:
                        scores = rm.score([turns] * len(keep), [o.text for o in keep],
                                          batch_size=cfg.score_batch_size) if keep else []
                    _select(cfg, turns, where, outs, keep, scores, files, counts, all_scores, best_scores,
                            worst_scores)
        wall = time.time() - t0
        summary = {**counts, "scorer": scorer, "sampling": params.model_dump(mode="json"),
                   "mean_score": _mean(all_scores), "mean_best": _mean(best_scores), "mean_worst": _mean(worst_scores),
                   "best_of_n_gain": (round(_mean(best_scores) - _mean(all_scores), 4) if best_scores else None),
                   "skipped_prompt_rows": stats.as_dict()["skipped"], "seconds": round(wall, 2),
                   "samples_per_s": round(counts["samples"] / max(wall, 1e-9), 2)}
        if rm is not None and rm.truncated:
            summary["scored_after_truncation"] = rm.truncated
        atomic_write_json(tmp / "report.json", summary)
    rd.log(f"rejection: {json.dumps(summary)}")
    return summary


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def _select(cfg: Config, turns: list[dict], where: str, outs: list, keep: list, scores: list[float], files: dict,
            counts: dict, all_scores: list, best_scores: list, worst_scores: list) -> None:
    """Write one prompt's samples and, when possible, its SFT row and preference pair."""
    fate: dict[int, str] = {}
    if keep:
        counts["usable"] += len(keep)
        all_scores += scores
        b = max(range(len(keep)), key=lambda i: (scores[i], -i))  # ties: the earlier sample
        w = min(range(len(keep)), key=lambda i: (scores[i], i))
        best, worst = keep[b], keep[w]
        answer = {"role": "assistant", "content": best.text}
        files["sft"].write(json.dumps({"messages": [*turns, answer], "score": scores[b], "source": where},
                                      ensure_ascii=False) + "\n")
        counts["sft_rows"] += 1
        best_scores.append(scores[b])
        worst_scores.append(scores[w])
        fate[best.sample_index] = "best"
        if cfg.keep_worst:
            if best.text != worst.text and scores[b] - scores[w] > cfg.min_margin:
                pair: dict[str, Any] = {"prompt": turns, "chosen": [answer],
                                        "rejected": [{"role": "assistant", "content": worst.text}],
                                        "chosen_score": scores[b], "rejected_score": scores[w], "source": where}
                files["preference"].write(json.dumps(pair, ensure_ascii=False) + "\n")
                counts["pairs"] += 1
                fate[worst.sample_index] = "worst"
            else:
                counts["no_pair"] += 1
    else:
        counts["no_usable_sample"] += 1
    score_of = {o.sample_index: s for o, s in zip(keep, scores)}
    for o in outs:
        files["samples"].write(json.dumps({
            "source": where, "sample": o.sample_index, "text": o.text, "finish_reason": o.finish_reason,
            "score": score_of.get(o.sample_index), "kept": fate.get(o.sample_index, "-" if o.sample_index in score_of
                                                                    else "dropped")}, ensure_ascii=False) + "\n")

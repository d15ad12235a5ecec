"""Stage `compare`: prompt, few-shot, RAG or fine-tune? Every option measured on the same questions.

    documents ──index stage──> index/ ────────────────────────────┐ (rag, sft_rag)
    train questions (held-out pool) ──> few-shot examples          │
                                   └──> SFT rows ──sft stage──> sft model ──────────┐
    documents ──curate──pretrain (continued, from the base)──sft stage──> cpt_sft ──┤
    base model ─────────────────────────────────────────────────────────────────────┤
    eval questions ──one prompt file per arm──> the eval stage, per arm <────────────┘
        ──> accuracy [95% CI], hallucination/abstention on unanswerable questions,
            prompt tokens, latency p50 and tokens/s, training time and FLOPs, index size,
            paired differences between arms ──> compare.json + compare.md (decision table)

Arms (all greedy, all scored by the eval stage's scorers, so they differ only in the model and
the prompt):

    zero_shot   the base model, the question alone
    few_shot    the base model, `few_shot_k` question/answer turns from the training pool first
    rag         the base model, the top-k passages in the context section (retrieval.prompt)
    sft         the base model fine-tuned (sft stage) on the training pool's question/answer pairs
    cpt_sft     continued pre-training (pretrain stage) on the documents, then the same SFT
    sft_rag     the sft model with the passages

The training pool is `train_questions`, or when that is unset a hash-chosen `pool_fraction`
of `questions` (never evaluated). Unanswerable pool questions are taught as `abstain_text`.
With `sft_with_context` every SFT question is also taught once with its retrieved passages
(reading comprehension), so the SFT model knows the context section when sft_rag gives it one.

FLOPs are the standard estimate 6 · parameters · tokens trained (Kaplan et al. 2020), tokens
trained = the stage's tokens/s × its training seconds. Sub-stages run through the pipeline
runner under work/, so re-running compare skips every arm whose inputs did not change.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lmforge.config import Schema
from lmforge.errors import LmforgeError
from lmforge.eval import stats
from lmforge.retrieval.quality import Question, read_questions
from lmforge.rundir import RunDir, atomic_write_json, atomic_write_text, read_manifest

ARTIFACT = "compare"
PROVIDES = ("compare",)
INPUTS = {"documents": None, "questions": None, "train_questions": None, "model": "model", "embedding_model": None}
# A fresh start keeps work/: each arm's sub-stage there has its own manifest and input hash, so the
# pipeline runner re-runs exactly the arms whose inputs changed (a new question set retrains nothing
# it does not have to).
KEEP = ("work",)
Arm = Literal["zero_shot", "few_shot", "rag", "sft", "cpt_sft", "sft_rag"]
ARMS: tuple[str, ...] = ("zero_shot", "few_shot", "rag", "sft", "cpt_sft", "sft_rag")
TRAINED = {"sft": "sft", "sft_rag": "sft", "cpt_sft": "cpt_sft"}  # arm -> the sub-stage whose model it uses
# Paired differences reported (a, b): a - b on the same questions.
PAIRS = [("few_shot", "zero_shot"), ("rag", "zero_shot"), ("sft", "zero_shot"), ("cpt_sft", "sft"),
         ("rag", "sft"), ("sft_rag", "sft"), ("sft_rag", "rag")]


class Config(Schema):
    documents: list[str] = Field(description="The documents: files, folders or globs in curate's formats plus .md.")
    questions: str = Field(description="Evaluation questions (JSONL/CSV/...): {question, answer (null or absent = "
                           "the documents cannot answer it), evidence?/source? (gold passage), id?}.")
    train_questions: str | None = Field(None, description="Question/answer pairs for SFT and the few-shot pool; "
                                        "None = a hash-chosen `pool_fraction` of `questions` (then not evaluated).")
    pool_fraction: float = Field(0.5, gt=0, lt=1, description="Share of `questions` held out as the training pool "
                                 "when `train_questions` is unset.")
    model: str | None = Field(None, description="Base model (stage or HF folder); in a recipe, the newest model.")
    embedding_model: str | None = Field(None, description="Embedding model for a dense index (see the index stage); "
                                        "None = BM25 only.")
    arms: list[Arm] = Field(default_factory=lambda: list(ARMS), description="Arms to run: " + ", ".join(ARMS) + ".")
    few_shot_k: int = Field(4, ge=1, description="Examples in the few-shot prompt (from the training pool).")
    k: int = Field(4, ge=1, description="Passages retrieved into RAG prompts.")
    mode: Literal["auto", "bm25", "dense", "hybrid"] = Field("auto", description="Retrieval mode for RAG arms.")
    chunk_tokens: int = Field(128, ge=8, description="Index chunk size in tokens.")
    overlap: int = Field(32, ge=0, description="Index chunk overlap in tokens.")
    abstain_text: str = Field("I don't know.", description="What SFT and few-shot examples answer to unanswerable questions.")
    sft_with_context: bool = Field(True, description="Also teach each SFT question with its retrieved passages.")
    sft: dict[str, Any] = Field(default_factory=dict, description="sft stage settings for the sft and cpt_sft arms "
                                "(e.g. {train: {max_steps: 100}}); data and model are set by compare.")
    pretrain: dict[str, Any] = Field(default_factory=dict, description="pretrain stage settings for continued "
                                     "pre-training (cpt_sft); data and init_from are set by compare.")
    curate: dict[str, Any] = Field(default_factory=lambda: {"quality": {"enabled": False}, "splits": {"train": 1.0, "validation": 0.0, "test": 0.0}},
                                   description="curate stage settings for the documents before continued pre-training.")
    max_new_tokens: int = Field(32, ge=1, description="Longest answer.")
    batch_size: int = Field(16, ge=1, description="Prompts generated together in the eval.")
    latency_samples: int = Field(16, ge=1, description="Questions answered one at a time per arm to time latency.")
    seed: int = Field(0, description="Seeds the pool split and the few-shot examples.")

    @model_validator(mode="after")
    def _arms(self) -> "Config":
        if not self.arms:
            raise ValueError("arms is empty; list at least one of " + ", ".join(ARMS))
        if len(set(self.arms)) != len(self.arms):
            raise ValueError("arms lists an arm twice")
        return self


def split_pool(questions: list[Question], fraction: float, seed: int) -> tuple[list[Question], list[Question]]:
    """(evaluated, pool): a question is in the pool when the hash of (seed, its text) says so."""
    def in_pool(q: Question) -> bool:
        h = int.from_bytes(hashlib.sha256(f"{seed}\0{q.question}".encode()).digest()[:8], "big")
        return h / 2**64 < fraction

    return [q for q in questions if not in_pool(q)], [q for q in questions if in_pool(q)]


def _reply(q: Question, abstain: str) -> str:
    return q.answer if q.answer is not None else abstain


def few_shot_messages(pool: list[Question], k: int, seed: int, abstain: str) -> list[dict]:
    """k question/answer turns from the pool (seeded choice), answerable ones first in pool order."""
    shots = random.Random(seed).sample(pool, min(k, len(pool)))
    return [m for q in shots for m in ({"role": "user", "content": q.question},
                                       {"role": "assistant", "content": _reply(q, abstain)})]


def run(cfg: Config, rd: RunDir, resume: bool = False) -> dict:
    from lmforge.data.chat import render
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.retrieval.augment import RetrievalConfig, open_retriever

    if cfg.model is None:
        raise LmforgeError("compare needs `model`: the base model folder.")
    questions = read_questions(cfg.questions)
    if cfg.train_questions:
        evaluated, pool = questions, read_questions(cfg.train_questions)
    else:
        evaluated, pool = split_pool(questions, cfg.pool_fraction, cfg.seed)
    if not evaluated or not pool:
        raise LmforgeError(f"compare: {len(evaluated)} evaluation and {len(pool)} training questions; both need at "
                           "least one (add questions or change pool_fraction).")
    tok = load_tokenizer(cfg.model)
    budget = _context(cfg.model) - cfg.max_new_tokens
    t0 = time.time()
    index_dir = _sub(rd, "index", "index", {"documents": cfg.documents, "tokenizer": cfg.model,
                                            "embedding_model": cfg.embedding_model, "chunk_tokens": cfg.chunk_tokens,
                                            "overlap": cfg.overlap})
    index_seconds = time.time() - t0
    retriever = open_retriever(RetrievalConfig(index=str(index_dir), k=cfg.k, mode=cfg.mode), tok, str(cfg.model))

    def rend(msgs: list[dict]) -> str:
        return render(tok, msgs, add_generation_prompt=True)

    models = _train_arms(cfg, rd, pool, retriever, tok, rend, budget)
    shots = few_shot_messages(pool, cfg.few_shot_k, cfg.seed, cfg.abstain_text)
    arms: dict[str, dict] = {}
    for arm in cfg.arms:
        prompts, fit = _arm_prompts(arm, evaluated, shots, retriever, tok, rend, budget)
        arms[arm] = {"model": str(models.get(arm, cfg.model)), **fit,
                     "eval": _evaluate(cfg, rd, arm, models.get(arm, cfg.model), evaluated, prompts)}
        arms[arm]["latency"] = _latency(models.get(arm, cfg.model), [rend(p) for p in prompts], cfg)
        arms[arm]["training"] = _training_cost(rd, arm)
        arms[arm]["index_bytes"] = retriever.index.size_bytes if arm in ("rag", "sft_rag") else 0
        print(f"compare [{arm}]: accuracy {_fmt(arms[arm]['eval'].get('accuracy'))}")
    doc = {"arms": arms, "order": list(cfg.arms), "questions": {"evaluated": len(evaluated), "pool": len(pool),
           "answerable": sum(q.answer is not None for q in evaluated),
           "unanswerable": sum(q.answer is None for q in evaluated)},
           "index_seconds": round(index_seconds, 2), "paired": _paired(arms, rd)}
    rd.artifact.mkdir(parents=True, exist_ok=True)
    atomic_write_json(rd.artifact / "compare.json", doc)
    atomic_write_text(rd.artifact / "compare.md", decision_table(doc))
    print(decision_table(doc))
    return {"accuracy": {a: (r["eval"].get("accuracy") or {}).get("value") for a, r in arms.items()}}


def _context(model: str) -> int:
    from lmforge.models import context_length, load_config

    return context_length(load_config(model))


def _sub(rd: RunDir, name: str, kind: str, values: dict, *, force: bool = False) -> Path:
    """Run another stage (by the pipeline's runner: skipped when unchanged) in work/<name>."""
    from lmforge.config import validate
    from lmforge.pipeline import PlannedStage, run_stage, stage_module

    module = stage_module(kind)
    cfg = validate(module.Config, values, where=f"compare ({name})")
    srd = RunDir(rd.path / "work" / name, stage=kind, artifact=module.ARTIFACT)
    run_stage(PlannedStage(name, kind, module, cfg, srd), force=force)
    return srd.path


def _train_arms(cfg: Config, rd: RunDir, pool: list[Question], retriever, tok, rend, budget: int) -> dict[str, Path]:
    """The fine-tuned models the chosen arms need: {arm: stage folder}."""
    needed = {TRAINED[a] for a in cfg.arms if a in TRAINED}
    if not needed:
        return {}
    rows = []
    for q in pool:
        turn = [{"role": "user", "content": q.question}]
        reply = {"role": "assistant", "content": _reply(q, cfg.abstain_text)}
        rows.append({"messages": [*turn, reply]})
        if cfg.sft_with_context:
            fitted = retriever.augment(turn, tok, budget=budget - 16)
            rows.append({"messages": [*fitted.messages, reply]})
    data = rd.path / "work" / "sft_rows.jsonl"
    atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out: dict[str, Path] = {}
    if "sft" in needed:
        out["sft"] = _sub(rd, "sft", "sft", {**cfg.sft, "data": str(data), "model": cfg.model})
    if "cpt_sft" in needed:
        curated = _sub(rd, "cpt_curate", "curate", {**cfg.curate, "inputs": cfg.documents})
        cpt = _sub(rd, "cpt", "pretrain", {**cfg.pretrain, "data": str(curated), "init_from": cfg.model})
        out["cpt_sft"] = _sub(rd, "cpt_sft", "sft", {**cfg.sft, "data": str(data), "model": str(cpt)})
    return {arm: out[TRAINED[arm]] for arm in cfg.arms if arm in TRAINED}


def _arm_prompts(arm: str, qs: list[Question], shots: list[dict], retriever, tok, rend,
                 budget: int) -> tuple[list[list[dict]], dict]:
    """Each question's conversation for this arm, and what it cost: prompt tokens, passages cut/dropped."""
    prompts, lengths, truncated, dropped = [], [], 0, 0
    for q in qs:
        turn = [{"role": "user", "content": q.question}]
        if arm in ("rag", "sft_rag"):
            f = retriever.augment(turn, tok, budget=budget)
            msgs, truncated, dropped = f.messages, truncated + f.truncated, dropped + f.dropped
        else:
            msgs = [*shots, *turn] if arm == "few_shot" else turn
        prompts.append(msgs)
        lengths.append(len(tok(rend(msgs), add_special_tokens=False)["input_ids"]))
    return prompts, {"prompt_tokens_mean": round(statistics.fmean(lengths), 1), "prompt_tokens_max": max(lengths),
                     "passages_truncated": truncated, "passages_dropped": dropped}


def _evaluate(cfg: Config, rd: RunDir, arm: str, model: str | Path, qs: list[Question],
              prompts: list[list[dict]]) -> dict:
    """The eval stage on this arm's prompts: answerable (accuracy) and unanswerable (hallucination, abstention)."""
    folder = rd.path / "work" / "prompts"
    tasks = []
    for name, keep, scorers in (("answerable", True, ["fact_match"]),
                                ("unanswerable", False, ["hallucination", "abstention"])):
        rows = [{"id": q.id, "prompt": p, "answer": q.answer} for q, p in zip(qs, prompts)
                if (q.answer is not None) == keep]
        if not rows:
            continue
        path = folder / f"{arm}.{name}.jsonl"
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        tasks.append({"name": name, "file": str(path), "format": "chat", "scorers": scorers,
                      "max_new_tokens": cfg.max_new_tokens})
    # force: the eval stage fingerprints its models, not inline tasks' files, and these prompts change with the index
    ev = _sub(rd, f"eval_{arm}", "eval", {"models": {arm: str(model)}, "tasks": tasks, "batch_size": cfg.batch_size},
              force=True)
    results = json.loads((ev / "eval" / "results.json").read_text())["results"][arm]
    return {key.split(".", 1)[1]: results[key] for key in results}


def _latency(model_path: str | Path, prompts: list[str], cfg: Config) -> dict:
    """Questions answered one at a time (batch 1, greedy): seconds per answer p50, tokens/s."""
    from lmforge.generation import SamplingParams, generate, load_model_for_inference

    model, tok = load_model_for_inference(model_path, device="cpu" if not _cuda() else None)
    params = SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens)
    times, tokens = [], 0
    for p in prompts[:cfg.latency_samples]:
        t = time.perf_counter()
        out = generate(model, tok, [p], params, max_batch=1, add_special_tokens=False)
        times.append(time.perf_counter() - t)
        tokens += out[0].completion_tokens
    return {"p50_s": round(statistics.median(times), 4), "tokens_per_s": round(tokens / sum(times), 1),
            "samples": len(times)}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _training_cost(rd: RunDir, arm: str) -> dict:
    """Wall time and FLOPs (6 · N · tokens) of the training stages behind an arm."""
    chain = {"sft": ["sft"], "sft_rag": ["sft"], "cpt_sft": ["cpt_curate", "cpt", "cpt_sft"]}.get(arm, [])
    seconds = flops = 0.0
    for name in chain:
        m = read_manifest(rd.path / "work" / name) or {}
        s = m.get("summary") or {}
        seconds += float(s.get("train_seconds") or m.get("wall_seconds") or 0.0)
        flops += 6.0 * float(s.get("parameters") or 0) * float(s.get("tokens_per_s") or 0) * float(s.get("train_seconds") or 0)
    return {"seconds": round(seconds, 2), "flops": flops}


def _scores(rd: RunDir, arm: str, task: str, metric: str) -> dict[str, float]:
    path = rd.path / "work" / f"eval_{arm}" / "eval" / "answers.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {r["id"]: r["scores"][metric] for r in rows if r["task"] == task}


def _paired(arms: dict, rd: RunDir) -> list[dict]:
    """a - b on the same questions, with a paired bootstrap 95% interval, for each pair both ran."""
    out = []
    for a, b in PAIRS:
        if a not in arms or b not in arms or "accuracy" not in arms[a]["eval"]:
            continue
        sa, sb = _scores(rd, a, "answerable", "accuracy"), _scores(rd, b, "answerable", "accuracy")
        ids = sorted(sa)
        d = stats.paired_difference([sa[i] for i in ids], [sb[i] for i in ids]).as_dict()
        out.append({"a": a, "b": b, "metric": "accuracy", **d})
    return out


def _fmt(e: dict | None) -> str:
    if not e:
        return "—"
    return f"{100 * e['value']:.1f}% [{100 * e['ci_low']:.1f}, {100 * e['ci_high']:.1f}]"


HEADERS = ["arm", "accuracy [95% CI]", "hallucination", "abstention", "prompt tokens", "latency p50", "tokens/s",
           "training time", "training FLOPs", "index size"]


def decision_rows(doc: dict) -> tuple[list[list[str]], list[str], str]:
    """(one row per arm under HEADERS, the paired differences as lines, the summary sentence)."""
    rows = []
    for a in doc["order"]:
        r, ev = doc["arms"][a], doc["arms"][a]["eval"]
        rows.append([a, _fmt(ev.get("accuracy")), _fmt(ev.get("hallucination_rate")), _fmt(ev.get("abstention_rate")),
                     f"{r['prompt_tokens_mean']:.0f}", f"{1000 * r['latency']['p50_s']:.0f} ms",
                     f"{r['latency']['tokens_per_s']:.0f}", f"{r['training']['seconds']:.0f} s",
                     f"{r['training']['flops']:.2e}", f"{r['index_bytes'] / 1e6:.2f} MB"])
    paired = [f"{p['a']} − {p['b']}: {100 * p['value']:+.1f} [{100 * p['ci_low']:+.1f}, {100 * p['ci_high']:+.1f}]"
              for p in doc["paired"]]
    return rows, paired, _summary(doc)


def decision_table(doc: dict) -> str:
    """The decision table as Markdown: one row per arm, then the paired differences and a summary line."""
    rows, paired, summary = decision_rows(doc)
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Paired differences in accuracy (same questions; percentage points, 95% CI):", ""]
    lines += [f"- {p}" for p in paired]
    lines += ["", summary]
    return "\n".join(lines) + "\n"


def _summary(doc: dict) -> str:
    arms = doc["arms"]
    acc = {a: arms[a]["eval"].get("accuracy") for a in doc["order"]}
    parts = []
    if acc.get("rag"):
        parts.append(f"RAG answers {_fmt(acc['rag'])}")
    if acc.get("sft"):
        cost = ""
        train_s, index_s = arms["sft"]["training"]["seconds"], doc["index_seconds"]
        if "rag" in arms and index_s > 0:
            cost = f" at {train_s / index_s:.0f}× RAG's set-up time ({train_s:.0f} s training vs {index_s:.1f} s indexing)"
        parts.append(f"fine-tuning {_fmt(acc['sft'])}{cost}")
    prompt = [a for a in ("zero_shot", "few_shot") if acc.get(a)]
    if prompt:
        best = max(prompt, key=lambda a: acc[a]["value"])
        parts.append(f"prompt engineering alone ({best.replace('_', '-')}) reaches {_fmt(acc[best])}")
    q = doc["questions"]
    return (f"For these documents and {q['evaluated']} questions ({q['answerable']} answerable, "
            f"{q['unanswerable']} not): " + "; ".join(parts) + ".") if parts else ""

"""Stage `eval`: evaluate several models (pipeline stages) on one suite of tasks, side by side.

    models {base: @pretrain, sft: @sft, ...} x suite tasks ──generate / score──> answers.jsonl
        ──bootstrap──> results.json (value, n, 95% CI, chance per metric and group)
        ──deltas vs the previous model, regression gates──> the pipeline's output model

In a recipe (`data` names the folders the suite's "@name/..." files live in):

    - stage: eval
      models: {base: "@pretrain", sft: "@sft", dpo: "@dpo"}
      data: {world: "@world", curate: "@curate"}
      suite: recipes/eval_suite.yaml          # omit for the built-in world suite
      gates:
        - {metric: safe.over_refusal_rate, model: dpo, against: sft, max_drop: 5}

A gate fails when `model` is worse than `against` on `metric` by more than `max_drop` points
(percentage points for rates, the metric's own units for loss, perplexity and reward; "worse"
follows the metric's direction: a higher over-refusal rate is worse). A failed gate fails the
stage with a message naming metric, both values and the threshold, after writing results.json;
its `output_model` is the model before the first model that failed a gate, i.e. the pipeline
keeps the previous model as its output.

On its own: `lmforge eval MODEL SUITE.yaml --data world=runs/default/world`.

There are no checkpoints: an interrupted evaluation starts again (greedy decoding and the
seeded bootstrap make the rerun give the same numbers).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from lmforge.config import Device, Schema
from lmforge.errors import LmforgeError
from lmforge.eval import stats
from lmforge.eval.scorers import SCORERS, Phrases, win
from lmforge.eval.tasks import (
    MetricSpec,
    Suite,
    Task,
    complete,
    likelihood,
    likelihood_texts,
    load_rows,
    load_suite,
    messages,
    perplexity,
    prompt_text,
    resolve_file,
    sampling_params,
    win_rate_name,
)
from lmforge.retrieval.augment import RetrievalConfig, open_retriever, task_prompt
from lmforge.rundir import RunDir, atomic_write_json, staged_dir

ARTIFACT = "eval"
PROVIDES = ("eval",)
INPUTS = {"models": "model", "data": None, "suite": None, "reward_model": "reward_model"}


class Gate(Schema):
    """A regression gate: `model` may not be worse than `against` on `metric` by more than `max_drop`."""

    metric: str = Field(description="<task>.<metric>, e.g. safe.over_refusal_rate or facts_sft.accuracy.")
    model: str = Field(description="The model checked (a name in `models`).")
    against: str = Field(description="The model it is compared with (usually the previous stage).")
    max_drop: float = Field(ge=0, description="Largest allowed loss: percentage points for rates, the metric's own "
                            "units otherwise (loss, perplexity, reward).")


class BootstrapConfig(Schema):
    """How confidence intervals are computed (lmforge.eval.stats)."""

    n_resamples: int = Field(1000, ge=1, description="Bootstrap resamples per metric.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Interval coverage.")
    seed: int = Field(0, description="Seeds the resampling, so a rerun gives identical intervals.")


class Config(Schema):
    models: dict[str, str] = Field(description="Models to evaluate, in order, as {name: folder} (a stage folder, a "
                                   "model folder or a PEFT adapter folder); each is compared with the one before it.")
    suite: str | None = Field(None, description="Suite YAML (a `tasks:` list); None = the built-in world suite "
                              "(recipes/eval_suite.yaml) unless `tasks` is given.")
    tasks: list[Task] = Field(default_factory=list, description="Tasks declared inline, run after the suite's.")
    data: dict[str, str] = Field(default_factory=dict, description="Data roots: a task file '@name/rest' is `rest` "
                                 "inside the folder data[name] (a stage folder or any folder).")
    reward_model: str | None = Field(None, description="Reward model folder (sequence classifier with one output) "
                                     "for tasks with the `reward` scorer; in a recipe, the newest reward stage.")
    baseline: str | None = Field(None, description="Model the reward win rate compares against; None = the first model.")
    gates: list[Gate] = Field(default_factory=list, description="Regression gates checked after evaluation.")
    on_gate_failure: Literal["fail", "warn"] = Field("fail", description="fail: a failed gate fails the stage "
                                                     "(after writing results); warn: print it and continue.")
    sampling: dict[str, Any] = Field(default_factory=dict, description="SamplingParams overrides for every task "
                                     "(tasks' own `sampling` wins). Default: greedy.")
    batch_size: int = Field(32, ge=1, description="Prompts generated together / text windows per forward pass.")
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig, description="Confidence intervals.")
    device: Device = Field(None, description="cpu, cuda, cuda:1, ...; None = cuda when available.")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto = bf16 on a GPU that supports "
                                                            "it, fp32 on CPU.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (None = torch's default).")
    retrieval: RetrievalConfig | None = Field(None, description="Retrieval for generate tasks: each prompt's last user "
                                              "turn gets the index's top passages (lmforge.retrieval.prompt).")

    @field_validator("models", mode="before")
    @classmethod
    def _named(cls, v: Any) -> Any:
        # A recipe's auto-filled input is one folder (the newest model); name it after its stage.
        if isinstance(v, str):
            return {model_name(v): v}
        if isinstance(v, list):
            return {model_name(p): p for p in v}
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if not self.models:
            raise ValueError("models is empty; give at least one {name: folder}")
        for g in self.gates:
            for role in ("model", "against"):
                if getattr(g, role) not in self.models:
                    raise ValueError(f"gate on {g.metric}: {role} {getattr(g, role)!r} is not one of the models "
                                     f"({', '.join(self.models)})")
            if g.model == g.against:
                raise ValueError(f"gate on {g.metric} compares {g.model!r} with itself")
            if "." not in g.metric:
                raise ValueError(f"gate metric {g.metric!r} must be <task>.<metric>, e.g. safe.over_refusal_rate")
        if self.baseline is not None and self.baseline not in self.models:
            raise ValueError(f"baseline {self.baseline!r} is not one of the models ({', '.join(self.models)})")
        return self


def model_name(path: str) -> str:
    """A stage folder's name ('runs/x/sft' -> 'sft'; 'runs/x/sft/model' -> 'sft')."""
    p = Path(path)
    if p.name == "model" and (p.parent / "manifest.json").is_file():
        return p.parent.name
    return p.name or str(p)


def builtin_suite() -> Path:
    from lmforge.pipeline import builtin_recipe

    return builtin_recipe("eval_suite")


def suite_tasks(cfg: Config) -> tuple[list[Task], Phrases]:
    """The suite's tasks then the inline ones, and the suite's abstention/refusal phrases."""
    path = cfg.suite if cfg.suite is not None else (None if cfg.tasks else str(builtin_suite()))
    suite = load_suite(path) if path else Suite(tasks=[])
    tasks = suite.tasks + list(cfg.tasks)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise LmforgeError(f"Two eval tasks are named {dup!r}; task names must be unique across the suite and `tasks`.")
    for t in tasks:
        unknown = [m for m in (t.models or []) if m not in cfg.models]
        if unknown:
            raise LmforgeError(f"Task {t.name!r} lists model {unknown[0]!r}, which is not one of the models "
                               f"({', '.join(cfg.models)}).")
    return tasks, suite.phrases()


# --------------------------------------------------------------------------------------------
# Aggregation: per-item scores -> estimates, deltas, gates


def estimate(scores: dict, task: Task, metric: MetricSpec, bs: BootstrapConfig) -> dict:
    """One metric's {value, n, ci_low, ci_high, chance} (+ groups) from its per-item record."""
    kw = dict(n_resamples=bs.n_resamples, confidence=bs.confidence, seed=bs.seed)
    if task.kind == "likelihood":
        loss = stats.bootstrap(scores["per_token"], weights=scores["tokens"], **kw)
        out = loss.as_dict()
        if metric.name == "perplexity":
            out = {"value": perplexity(loss.value), "n": loss.n,
                   "ci_low": perplexity(loss.ci_low), "ci_high": perplexity(loss.ci_high)}
        out.update(chance=None, tokens=int(sum(scores["tokens"])))
        return out
    items = scores["metrics"][metric.name]
    out = stats.bootstrap(items, **kw).as_dict()
    is_win = metric.scorer is not None and metric.rate and SCORERS[metric.scorer.scorer].fn is None
    out["chance"] = _mean_or_none(scores["chance"]) if metric.name == scores["chance_metric"] else (
        0.5 if is_win else None)
    if task.group_by is not None:
        groups: dict[str, list[int]] = {}
        for i, g in enumerate(scores["groups"]):
            groups.setdefault(str(g), []).append(i)
        out["groups"] = {}
        for g, idx in groups.items():
            ge = stats.bootstrap([items[i] for i in idx], **kw).as_dict()
            ge["chance"] = _mean_or_none([scores["chance"][i] for i in idx]) if metric.name == scores["chance_metric"] else None
            out["groups"][g] = ge
    return out


def _mean_or_none(values: list) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def paired_delta(a: dict, b: dict, task: Task, metric: MetricSpec, bs: BootstrapConfig) -> dict | None:
    """value(model) - value(previous) with a paired bootstrap interval over the same items."""
    kw = dict(n_resamples=bs.n_resamples, confidence=bs.confidence, seed=bs.seed)
    if task.kind == "likelihood":
        if a["tokens"] != b["tokens"]:  # different tokenizers: the items are not the same tokens
            return None
        diff = [x - y for x, y in zip(a["per_token"], b["per_token"])]
        d = stats.bootstrap(diff, weights=a["tokens"], **kw).as_dict()
        if metric.name == "perplexity":
            return None  # a ratio of perplexities is not a difference; the loss delta carries it
        return d
    return stats.paired_difference(a["metrics"][metric.name], b["metrics"][metric.name], **kw).as_dict()


def check_gate_metrics(gates: list[Gate], metrics: dict[str, MetricSpec]) -> None:
    for g in gates:
        if g.metric not in metrics:
            raise LmforgeError(f"Gate on {g.metric!r}: no task reports that metric; known metrics: "
                               f"{', '.join(sorted(metrics))}.")


def check_gates(gates: list[Gate], results: dict, order: list[str],
                metrics: dict[str, MetricSpec]) -> tuple[list[dict], str]:
    """Evaluate every gate; returns (gate records, the pipeline's output model).

    results[model]["<task>.<metric>"] = {"value": ...}; metrics["<task>.<metric>"] says its
    direction and whether it is a rate (drops in percentage points) or not (its own units).
    The output model is the last model in `order`, or, if some gate failed, the model just
    before the earliest model (in `order`) that failed one.
    """
    check_gate_metrics(gates, metrics)
    records = []
    for g in gates:
        mine, theirs = (results.get(m, {}).get(g.metric, {}).get("value") for m in (g.model, g.against))
        if mine is None or theirs is None:
            missing = g.model if mine is None else g.against
            raise LmforgeError(f"Gate on {g.metric}: model {missing!r} was not evaluated on it (see the task's `models`).")
        spec = metrics[g.metric]
        scale = 100.0 if spec.rate else 1.0
        drop = (theirs - mine if spec.higher_is_better else mine - theirs) * scale
        records.append({"metric": g.metric, "model": g.model, "against": g.against, "value": mine,
                        "against_value": theirs, "drop": drop, "max_drop": g.max_drop,
                        "unit": "points" if scale == 100.0 else "units", "passed": drop <= g.max_drop + 1e-9})
    failed = {r["model"] for r in records if not r["passed"]}
    first_bad = next((i for i, m in enumerate(order) if m in failed), None)
    if first_bad is None:
        return records, order[-1]
    if first_bad == 0:
        raise LmforgeError(f"Gate failed for {order[0]!r}, the first model: there is no earlier model to keep "
                           "as the pipeline's output.")
    return records, order[first_bad - 1]


def gate_message(r: dict) -> str:
    rate = r["unit"] == "points"
    fmt = (lambda v: f"{100 * v:.1f}%") if rate else (lambda v: f"{v:.4g}")
    change = f"worse by {r['drop']:.2f}" if r["drop"] > 0 else f"better by {-r['drop']:.2f}"
    limit = "within" if r["passed"] else "more than"
    return (f"{r['metric']} of {r['model']} is {fmt(r['value'])} vs {fmt(r['against_value'])} for {r['against']}: "
            f"{change} {r['unit']}, {limit} the allowed {r['max_drop']:g}")


def score_rewards(cfg: Config, tasks: list[Task], rows: dict, scores: dict, order: list[str], baseline: str) -> None:
    """Add each reward task's per-answer reward and win rate (against `baseline`) to `scores`."""
    from lmforge.scoring import load_reward_model

    rm = load_reward_model(cfg.reward_model, device=cfg.device)
    for t in tasks:
        ref = next(r for r in t.refs() if r.scorer == "reward")
        metric, win_metric = ref.metric or SCORERS["reward"].metric, win_rate_name(ref)
        ran = [m for m in order if t.name in scores[m]]
        for name in ran:
            # Stripped: trained replies never start or end with whitespace, and SFT's encoding
            # (which the reward model shares) refuses content the template would alter.
            scores[name][t.name]["metrics"][metric] = rm.score(
                [messages(t, r) for r in rows[t.name]], [o.strip() for o in scores[name][t.name]["outputs"]],
                batch_size=cfg.batch_size, wheres=[f"task {t.name} row {r['id']}" for r in rows[t.name]])
        base = scores[baseline][t.name]["metrics"][metric]
        for name in ran:
            mine = scores[name][t.name]["metrics"][metric]
            scores[name][t.name]["metrics"][win_metric] = [win(x, y) for x, y in zip(mine, base)]
    if rm.truncated:
        print(f"eval: {rm.truncated} answer(s) were longer than the reward model's context and were cut before scoring.")


# --------------------------------------------------------------------------------------------
# The stage


def run(cfg: Config, rd: RunDir, resume: bool = False) -> dict:
    from lmforge.generation import load_model_for_inference
    from lmforge.report import machine_info

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_stage = time.time()
    tasks, phrases = suite_tasks(cfg)
    order = list(cfg.models)
    # Read every task's rows and sampling settings before loading any model: fail fast.
    rows: dict[str, list[dict]] = {}
    files: dict[str, dict] = {}
    params: dict[str, Any] = {}
    for t in tasks:
        path = resolve_file(t, cfg.data)
        if t.kind == "likelihood":
            texts, total = likelihood_texts(t, path)
            rows[t.name] = [{"text": x} for x in texts]
        else:
            rows[t.name], total = load_rows(t, path)
            params[t.name] = sampling_params(t, cfg.sampling)
        files[t.name] = {"file": str(path), "rows_in_file": total, "rows_evaluated": len(rows[t.name])}
    metrics = {f"{t.name}.{m.name}": m for t in tasks for m in t.metric_specs()}
    check_gate_metrics(cfg.gates, metrics)
    reward_tasks = [t for t in tasks if t.kind == "generate" and any(r.scorer == "reward" for r in t.refs())]
    if reward_tasks and not cfg.reward_model:
        raise LmforgeError("A task uses the `reward` scorer but the eval config sets no reward_model; "
                           "set reward_model to a reward model folder.")
    baseline = cfg.baseline or order[0]
    if reward_tasks and any(t.models is not None and baseline not in t.models for t in reward_tasks):
        raise LmforgeError(f"A reward task does not run on the baseline model {baseline!r}, so it has no win rate; "
                           "add the baseline to the task's `models` or set `baseline`.")

    # scores[model][task] = per-item record (outputs, per-metric scores, chance, groups)
    scores: dict[str, dict[str, dict]] = {m: {} for m in order}
    timing: dict[str, dict] = {}
    for name, path in cfg.models.items():
        t0 = time.time()
        model, tok = load_model_for_inference(path, device=cfg.device, dtype=cfg.dtype)
        device = next(model.parameters()).device
        retriever = open_retriever(cfg.retrieval, tok, str(path)) if cfg.retrieval else None
        gen_tokens = 0
        for t in tasks:
            if t.models is not None and name not in t.models:
                continue
            t1 = time.time()
            if t.kind == "likelihood":
                nats, counts = likelihood(model, tok, [r["text"] for r in rows[t.name]],
                                          batch_size=cfg.batch_size, device=device)
                per_token = [n / c if c else 0.0 for n, c in zip(nats, counts)]
                scores[name][t.name] = {"per_token": per_token, "tokens": counts}
                line = f"loss {sum(nats) / max(sum(counts), 1):.4f}"
            else:
                prompts = [prompt_text(t, r, tok) if retriever is None else
                           task_prompt(retriever, t, r, tok, model, params[t.name].max_new_tokens) for r in rows[t.name]]
                try:
                    outs = complete(model, tok, t, prompts, params[t.name], max_batch=cfg.batch_size)
                except LmforgeError as e:
                    raise LmforgeError(f"Task {t.name!r} on model {name!r}: {e}") from None
                gen_tokens += sum(o.completion_tokens for o in outs)
                rec = {"metrics": {}, "outputs": [o.text for o in outs], "finish": [o.finish_reason for o in outs],
                       "chance": [], "chance_metric": None,
                       "groups": [r.get(t.group_by) for r in rows[t.name]] if t.group_by else None}
                for spec in t.metric_specs():
                    s = SCORERS[spec.scorer.scorer]
                    if s.fn is None:
                        continue  # reward and win rate: scored below, once every model has answered
                    field = spec.scorer.answer_field or t.answer_field
                    rec["metrics"][spec.name] = [s.fn(o.text, r, field, phrases) for o, r in zip(outs, rows[t.name])]
                    if s.chance is not None and rec["chance_metric"] is None:
                        rec["chance_metric"] = spec.name
                        rec["chance"] = [s.chance(r) for r in rows[t.name]]
                scores[name][t.name] = rec
                line = ", ".join(f"{m} {sum(v) / len(v):.3f}" for m, v in rec["metrics"].items()) or "answered"
            msg = f"eval [{name}] {t.name}: {line} ({len(rows[t.name])} rows, {time.time() - t1:.1f}s)"
            print(msg)
            rd.log(msg)
        seconds = time.time() - t0
        timing[name] = {"seconds": round(seconds, 2), "generated_tokens": gen_tokens,
                        "generated_tokens_per_s": round(gen_tokens / max(seconds, 1e-9), 1)}
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    if reward_tasks:  # every model has answered: now one reward model scores them all
        score_rewards(cfg, reward_tasks, rows, scores, order, baseline)
    answers = [{"model": m, "task": t.name, "id": r["id"], "prompt": r[t.prompt_field], "output": rec["outputs"][i],
                "finish_reason": rec["finish"][i], "scores": {k: v[i] for k, v in rec["metrics"].items()}}
               for t in tasks if t.kind == "generate" for m in order if (rec := scores[m].get(t.name))
               for i, r in enumerate(rows[t.name])]

    # Aggregate: estimates per model, paired deltas against the previous model, gates.
    results: dict[str, dict[str, dict]] = {m: {} for m in order}
    deltas: dict[str, dict[str, dict]] = {m: {} for m in order}
    for t in tasks:
        ran = [m for m in order if t.name in scores[m]]
        for metric in t.metric_specs():
            key = f"{t.name}.{metric.name}"
            for j, m in enumerate(ran):
                results[m][key] = estimate(scores[m][t.name], t, metric, cfg.bootstrap)
                results[m][key].update(higher_is_better=metric.higher_is_better, rate=metric.rate)
                if j > 0:
                    d = paired_delta(scores[m][t.name], scores[ran[j - 1]][t.name], t, metric, cfg.bootstrap)
                    if d is not None:
                        deltas[m][key] = {"against": ran[j - 1], **d}
    gate_records, output_model = check_gates(cfg.gates, results, order, metrics)

    doc = {
        "order": order,
        "models": {m: str(p) for m, p in cfg.models.items()},
        "output_model": output_model,
        "output_path": str(cfg.models[output_model]),
        "baseline": baseline,
        "reward_model": cfg.reward_model,
        # results.json is written with sorted keys: these lists keep the suite's order for reports.
        "metrics": list(metrics),
        "task_order": [t.name for t in tasks],
        "tasks": {t.name: {"kind": t.kind, "format": t.format, **files[t.name],
                           "metrics": [m.name for m in t.metric_specs()], "group_by": t.group_by,
                           "sampling": params[t.name].model_dump(mode="json") if t.name in params else None,
                           "models": t.models}
                  for t in tasks},
        "results": results,
        "deltas": deltas,
        "gates": gate_records,
        "timing": timing,
        "bootstrap": cfg.bootstrap.model_dump(),
        "machine": machine_info(),
        "seconds": round(time.time() - t_stage, 2),
    }
    with staged_dir(rd.artifact) as tmp:
        atomic_write_json(tmp / "results.json", doc)
        with open(tmp / "answers.jsonl", "w", encoding="utf-8") as f:
            for a in answers:
                f.write(json.dumps(a, ensure_ascii=False) + "\n")

    print(results_table(doc))
    failed = [r for r in gate_records if not r["passed"]]
    for r in gate_records:
        rd.log(("gate passed: " if r["passed"] else "GATE FAILED: ") + gate_message(r))
    if failed:
        msg = (f"Regression gate failed: {gate_message(failed[0])}"
               + (f" (and {len(failed) - 1} more gate(s))" if len(failed) > 1 else "")
               + f". The pipeline's output stays {output_model!r} ({cfg.models[output_model]}); "
               f"results are in {rd.artifact / 'results.json'} (`lmforge report {rd.path.parent}` shows them).")
        if cfg.on_gate_failure == "fail":
            raise LmforgeError(msg)
        print(f"warning: {msg}")
    return {"output_model": output_model, "gates_failed": len(failed), "gates": len(gate_records),
            "metrics": {k: v["value"] for k, v in results[output_model].items()}, "timing": timing}


def results_table(doc: dict) -> str:
    """A plain-text table: one row per metric, one column per model (value and 95% CI)."""
    order = doc["order"]
    keys = list(dict.fromkeys(k for m in order for k in doc["results"][m]))
    width = max([len(k) for k in keys] + [6])
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{m:>22}" for m in order)]
    for k in keys:
        cells = []
        for m in order:
            e = doc["results"][m].get(k)
            cells.append(f"{format_estimate(e):>22}" if e else f"{'-':>22}")
        lines.append(f"{k:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def format_estimate(e: dict | None, *, with_ci: bool = True) -> str:
    if not e or e.get("value") is None:
        return "-"
    rate = e.get("rate", False)
    f = (lambda v: f"{100 * v:.1f}") if rate else (lambda v: f"{v:.3f}")
    if not with_ci or e.get("ci_low") is None:
        return f(e["value"])
    return f"{f(e['value'])} [{f(e['ci_low'])}, {f(e['ci_high'])}]"


def cli_eval(model: str, suite: str | None, data: list[str], *, out: str | None, name: str | None,
             overrides: list[str], force: bool) -> dict:
    """`lmforge eval MODEL SUITE.yaml`: one model, one suite, results in --out."""
    from lmforge.config import apply_overrides, validate
    from lmforge.pipeline import PlannedStage, run_stage

    if suite is not None and "=" in suite and not Path(suite).exists():
        overrides, suite = [suite, *overrides], None  # `lmforge eval MODEL key=value` with the built-in suite
    roots = {}
    for item in data:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise LmforgeError(f"--data {item!r} must look like NAME=FOLDER, e.g. --data world=runs/default/world.")
        roots[key] = value
    label = name or model_name(model)
    values: dict[str, Any] = {"models": {label: model}, "data": roots}
    if suite is not None:
        values["suite"] = suite
    apply_overrides(values, overrides)
    cfg = validate(Config, values, where="lmforge eval")
    stem = Path(suite).stem if suite else "eval_suite"
    rd = RunDir(Path(out) if out else Path("runs") / "eval" / f"{label}-{stem}", stage="eval", artifact=ARTIFACT)
    import sys

    return run_stage(PlannedStage("eval", "eval", sys.modules[__name__], cfg, rd), force=force, resume=False)

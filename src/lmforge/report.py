"""The run report: `runs/<name>/report.md` and `report.html`, rebuilt from the run folder alone.

    runs/<name>/<stage>/manifest.json, metrics.jsonl   every stage: status, wall time, summary, curves
    runs/<name>/<eval>/eval/results.json, answers.jsonl  every metric per model, every answer
        ──collect──> sections ──render──> report.md (figures in report_figures/*.png)
                                        └─> report.html (one self-contained file, figures inlined)

Sections: the machine, stages (wall time, tokens/s), curation counts per rule, tokenizer
compression, loss curves per training stage, RL curves (reward, KL, response length, entropy) of
ppo/grpo with the guard that stopped a run, a chart of the headline rates by model, every metric
per model side by side with 95% intervals and deltas against the previous model, regression gates and the pipeline's output,
the same prompts answered by each model, and the sampling parameters used.

As the last stage of a recipe (`- stage: report`) or on its own: `lmforge report RUN_DIR`.
Nothing here re-runs a model: a report can be rebuilt at any time, also after a failed gate.
"""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from lmforge.config import Schema, load_yaml, validate
from lmforge.errors import LmforgeError
from lmforge.rundir import RunDir, atomic_write_json, atomic_write_text, read_manifest, staged_dir

ARTIFACT = "report"
PROVIDES = ("report",)
# `eval` is auto-filled with the newest eval stage only so that a re-run eval re-runs the report.
INPUTS = {"eval": "eval"}
FIGURES = "report_figures"


class Expectation(Schema):
    """A claim about the evaluated models that the report checks and shows, e.g. "after DPO the
    hallucination rate is at least 30 points lower than after SFT". It never fails the run:
    regression gates (eval stage) do that; an expectation states what a run should show."""

    claim: str = Field(description="The claim in words, shown in the report.")
    metric: str = Field(description="<task>.<metric>, or <task>.<metric>/<group> for one group's value "
                        "(e.g. facts_prose.accuracy/capital).")
    model: str = Field(description="The model the claim is about (a name in the eval stage's `models`).")
    against: str | None = Field(None, description="Check the difference model - against instead of the value "
                                "(percentage points for rates).")
    times_chance: bool = Field(False, description="Check the value as a multiple of the metric's chance baseline.")
    at_least: float | None = Field(None, description="Lower bound (percent for rates, points for differences).")
    at_most: float | None = Field(None, description="Upper bound (same units).")

    @model_validator(mode="after")
    def _bounded(self) -> "Expectation":
        if self.at_least is None and self.at_most is None:
            raise ValueError("an expectation needs at_least or at_most")
        if self.times_chance and self.against:
            raise ValueError("times_chance and against cannot be combined")
        return self


class Config(Schema):
    run_dir: str | None = Field(None, description="The run folder to report on; None = the folder holding this stage.")
    eval: str | None = Field(None, description="An eval stage folder (filled in by the recipe runner: when it changes, "
                             "the report is rebuilt). Every eval stage in the run folder is reported either way.")
    examples_per_task: int = Field(2, ge=0, description="Prompts per generation task shown with every model's answer.")
    answer_chars: int = Field(300, ge=20, description="Longest answer text shown; longer answers are cut with '...'.")
    expectations: list[Expectation] = Field(default_factory=list, description="Claims checked against the last eval "
                                            "stage's results and shown in the report (see Expectation).")


def machine_info() -> dict:
    """What this process runs on: OS, CPU, memory, Python, torch and the accelerators it sees."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu": _cpu_name(), "cpu_count": os.cpu_count()}
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda"] = torch.version.cuda
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------
# Collecting what the run folder holds


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a crash can cut the last line of an append-only log
    return out


def collect(run_dir: Path) -> dict:
    """Every stage folder of the run (in the order they finished) and every eval result."""
    if not run_dir.is_dir():
        raise LmforgeError(f"Run folder {run_dir} does not exist; give the folder a recipe wrote (runs/<name>).")
    stages = []
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        m = read_manifest(d)
        if m is None:
            continue
        stages.append({"name": d.name, "path": d, "kind": m.get("stage", "?"), "status": m.get("status", "?"),
                       "wall_seconds": m.get("wall_seconds"), "summary": m.get("summary") or {},
                       "estimate": m.get("estimate") or {}, "peak_memory_bytes": m.get("peak_memory_bytes"),
                       "finished": m.get("finished") or "", "artifact": d / m.get("artifact", ""),
                       "metrics": _read_jsonl(d / "metrics.jsonl")})
    if not stages:
        raise LmforgeError(f"{run_dir} holds no stage folders (none has a manifest.json); run a recipe into it first.")
    # Finished stages in finishing order, then unfinished ones (a failed gate leaves eval "running").
    stages.sort(key=lambda s: (s["status"] != "complete", s["finished"], s["name"]))
    evals = []
    for s in stages:
        res = s["artifact"] / "results.json"
        if s["kind"] == "eval" and res.is_file():
            evals.append({"stage": s["name"], "results": json.loads(res.read_text()),
                          "answers": _read_jsonl(s["artifact"] / "answers.jsonl")})
    return {"run_dir": run_dir, "stages": stages, "evals": evals}


def check_expectations(results: dict, expectations: list[Expectation]) -> list[dict]:
    """Each expectation with its measured value (display units: percent for rates), interval and verdict
    (met None: the metric was not computed for that model). A model, metric or group that the
    results do not have at all is a mistake in the recipe and raises, naming the closest match."""
    def est(model: str, name: str, group: str) -> dict | None:
        m = results["results"].get(model, {}).get(name)
        return (m.get("groups") or {}).get(group) if m and group else m

    out = []
    for i, e in enumerate(expectations):
        _check_names(e, i, results)
        name, _, group = e.metric.partition("/")
        row: dict[str, Any] = {**e.model_dump(), "value": None, "ci": None, "met": None}
        mine, other = est(e.model, name, group), est(e.against, name, group) if e.against else None
        top = results["results"].get(e.model, {}).get(name) or {}
        scale = 100.0 if top.get("rate") else 1.0
        if mine is None or mine.get("value") is None or (e.against and (other is None or other.get("value") is None)):
            out.append(row)
            continue
        if e.times_chance:
            if not mine.get("chance"):
                out.append(row)
                continue
            value = mine["value"] / mine["chance"]
            ci = (mine["ci_low"] / mine["chance"], mine["ci_high"] / mine["chance"]) if mine.get("ci_low") is not None else None
        elif e.against:
            value = scale * (mine["value"] - other["value"])
            paired = results.get("deltas", {}).get(e.model, {}).get(name) if not group else None
            order = results.get("order") or []
            previous = order[order.index(e.model) - 1] if e.model in order and order.index(e.model) > 0 else None
            ci = ((scale * paired["ci_low"], scale * paired["ci_high"])
                  if paired and previous == e.against and paired.get("ci_low") is not None else None)
        else:
            value = scale * mine["value"]
            ci = (scale * mine["ci_low"], scale * mine["ci_high"]) if mine.get("ci_low") is not None else None
        met = (e.at_least is None or value >= e.at_least) and (e.at_most is None or value <= e.at_most)
        out.append({**row, "value": value, "ci": ci, "met": met})
    return out


def _check_names(e: Expectation, i: int, results: dict) -> None:
    import difflib

    def fail(what: str, got: str, known: list[str]) -> None:
        close = difflib.get_close_matches(got, known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
        raise LmforgeError(f"report.expectations[{i}] ({e.claim!r}): {what} {got!r} is not in the evaluation results; "
                           f"{hint}")

    models = list(results.get("order") or results["results"])
    for m in (e.model, e.against):
        if m is not None and m not in results["results"]:
            fail("model", m, models)
    name, _, group = e.metric.partition("/")
    metrics = sorted({k for r in results["results"].values() for k in r})
    if name not in metrics:
        fail("metric", name, metrics)
    specs = [r[name] for r in results["results"].values() if name in r]
    if group:
        groups = sorted({g for sp in specs for g in (sp.get("groups") or {})})
        if group not in groups:
            fail(f"group of {name}", group, groups or ["(this metric has no groups)"])
    if e.times_chance and not any(((sp.get("groups") or {}).get(group) if group else sp).get("chance")
                                  for sp in specs):
        raise LmforgeError(f"report.expectations[{i}] ({e.claim!r}): times_chance needs a chance baseline, and "
                           f"{e.metric} has none.")


def _threshold(e: dict) -> str:
    unit = "x chance" if e["times_chance"] else (f"points vs {e['against']}" if e["against"] else "")
    parts = ([f">= {e['at_least']:g}"] if e["at_least"] is not None else []) + \
        ([f"<= {e['at_most']:g}"] if e["at_most"] is not None else [])
    return " and ".join(parts) + (f" {unit}" if unit else "")


def _report_expectations(run_dir: Path) -> list[Expectation]:
    """The expectations of the run's report stage (so `lmforge report RUN_DIR` rebuilds the same report)."""
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        m = read_manifest(d)
        if m and m.get("stage") == "report" and (d / "config.yaml").is_file():
            return validate(Config, load_yaml(d / "config.yaml"), where=str(d / "config.yaml")).expectations
    return []


# --------------------------------------------------------------------------------------------
# A tiny document model, rendered to Markdown and to HTML


class Doc:
    def __init__(self) -> None:
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", headers, [["" if c is None else str(c) for c in r] for r in rows]))

    def img(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", path, alt))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def markdown(self, base: Path) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"{'#' * b[1]} {b[2]}")
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                def cell(c: str) -> str:
                    return c.replace("|", "\\|").replace("\n", "<br>")

                out.append("\n".join(["| " + " | ".join(cell(h) for h in b[1]) + " |",
                                      "|" + "|".join("---" for _ in b[1]) + "|"]
                                     + ["| " + " | ".join(cell(c) for c in r) + " |" for r in b[2]]))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1].relative_to(base).as_posix()})")
            elif b[0] == "pre":
                out.append("```\n" + b[1] + "\n```")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        e = html.escape
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
               "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
               "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
               "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
               "th{background:#f3f3f3}pre{background:#f6f6f6;padding:1em;overflow-x:auto}"
               "img{max-width:100%}</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{e(b[1])}</p>")
            elif b[0] == "table":
                head = "".join(f"<th>{e(h)}</th>" for h in b[1])
                body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>".replace("\n", "<br>") for c in r) + "</tr>"
                               for r in b[2])
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode(Path(b[1]).read_bytes()).decode()
                out.append(f"<p><img alt='{e(b[2])}' src='data:image/png;base64,{data}'></p>")
            elif b[0] == "pre":
                out.append(f"<pre>{e(b[1])}</pre>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Sections


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e6:.0f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _est(e: dict | None, *, rate: bool) -> str:
    """'62.5 [55.0, 70.0]' (rates in percent) or '2.314 [2.2, 2.4]'."""
    if not e or e.get("value") is None:
        return "-"
    f = _pct if rate else (lambda v: _fmt(v))
    ci = f" [{f(e['ci_low'])}, {f(e['ci_high'])}]" if e.get("ci_low") is not None else ""
    return f(e["value"]) + ci


def _signed(v: float, rate: bool) -> str:
    return f"{100 * v:+.1f}" if rate else f"{v:+.3f}"


def _delta(d: dict | None, *, rate: bool) -> str:
    if not d or d.get("value") is None:
        return "-"
    ci = f" [{_signed(d['ci_low'], rate)}, {_signed(d['ci_high'], rate)}]" if d.get("ci_low") is not None else ""
    return _signed(d["value"], rate) + ci


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def loss_figure(stage: dict, out: Path) -> Path | None:
    """A PNG of training loss (and validation loss) against step; None if the stage logged no loss."""
    train = [(r["step"], r["loss"]) for r in stage["metrics"] if "loss" in r and "step" in r]
    val = [(r["step"], r["val_loss"]) for r in stage["metrics"] if "val_loss" in r and "step" in r]
    if not train and not val:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", linewidth=1.2, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{stage['name']} ({stage['kind']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / f"loss_{stage['name']}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


RL_CURVES = (("reward", "mean reward"), ("kl", "KL from the reference"), ("response_length", "response length (tokens)"),
             ("entropy", "entropy (nats/token)"))


def rl_series(stage: dict) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of each RL curve from a stage's metrics.jsonl; {} for a stage that logged no reward."""
    recs = [r for r in stage["metrics"] if "reward" in r and "step" in r]
    return {key: [(r["step"], float(r[key])) for r in recs if isinstance(r.get(key), (int, float))]
            for key, _ in RL_CURVES} if recs else {}


def rl_figure(stage: dict, out: Path) -> Path | None:
    """A PNG of an RL stage's (ppo, grpo) mean reward, KL, response length and entropy against the
    rollout step, with the step a guard stopped the run at; None if it logged no reward."""
    series = rl_series(stage) if stage["kind"] in ("ppo", "grpo") else {}
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(8, 5), dpi=100, sharex=True)
    stop = next((r for r in stage["metrics"] if "guard" in r and "step" in r), None)
    for ax, (key, title) in zip(axes.flat, RL_CURVES):
        pts = series[key]
        if pts:
            ax.plot(*zip(*pts), "o-" if len(pts) < 30 else "-", linewidth=1.2, markersize=3)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        if stop is not None:
            ax.axvline(stop["step"], color="red", linestyle="--", linewidth=1, label=f"guard {stop['guard']}")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)  # rollout steps are whole
    for ax in axes[1]:
        ax.set_xlabel("rollout step")
    if stop is not None:
        axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{stage['name']} ({stage['kind']})")
    fig.tight_layout()
    path = out / f"rl_{stage['name']}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def headline_rates(res: dict) -> list[tuple[str, list[tuple[str, float, float, float]]]]:
    """The eval's headline rates (its `metrics` list) as (metric with ↑/↓, [(model, percent, low, high)])."""
    order = res["order"]
    keys = [k for k in res.get("metrics") or sorted({k for m in order for k in res["results"][m]})
            if any((res["results"][m].get(k) or {}).get("rate") for m in order)]
    out = []
    for k in keys:
        first = next(res["results"][m][k] for m in order if k in res["results"][m])
        bars = []
        for m in order:
            e = res["results"][m].get(k) or {}
            if e.get("value") is not None:  # no interval: a bar without whiskers
                lo, hi = (e["value"] if e.get(c) is None else e[c] for c in ("ci_low", "ci_high"))
                bars.append((m, 100 * e["value"], 100 * lo, 100 * hi))
        out.append((k + {True: " ↑", False: " ↓"}.get(first.get("higher_is_better"), ""), bars))
    return out


def headline_figure(ev: dict, out: Path) -> Path | None:
    """One chart of an eval stage's headline rates by model, each bar with its 95% interval, so what
    each stage did shows without reading the table; None without rates."""
    rows = headline_rates(ev["results"])
    if not rows:
        return None
    order = ev["results"]["order"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) * max(1, len(order) / 3) + 1.5), dpi=100)
    h = 0.8 / len(order)
    for j, m in enumerate(order):
        pts = [(i + (j - (len(order) - 1) / 2) * h, v, v - lo, hi - v)
               for i, (_, bars) in enumerate(rows) for name, v, lo, hi in bars if name == m]
        if pts:
            ys, xs, below, above = zip(*pts)
            ax.barh(ys, xs, height=h, xerr=[below, above], capsize=2, label=m, error_kw={"linewidth": 0.8})
    ax.set_yticks(range(len(rows)), [k for k, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("percent (bars: 95% bootstrap interval)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(title="model", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: bars reach 100%
    ax.set_title(f"Headline rates by model ({ev['stage']})")
    fig.tight_layout()
    path = out / f"headline_{ev['stage']}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def build_doc(info: dict, figures: Path, final: Path, *, examples_per_task: int = 2, answer_chars: int = 300,
              checks: list[dict] = ()) -> Doc:
    """The report's sections; figures are drawn into `figures` and referenced at `final` (where
    the caller moves them once complete)."""
    run_dir: Path = info["run_dir"]
    doc = Doc()
    doc.h(1, f"lmforge run report: {run_dir.name}")
    doc.p(f"Run folder {run_dir}; report built {time.strftime('%Y-%m-%d %H:%M:%S')}.")

    # The machine: as recorded by an eval stage (it ran the models), else this process's.
    machine = next((ev["results"].get("machine") for ev in info["evals"] if ev["results"].get("machine")), None)
    doc.h(2, "Machine")
    doc.p("Recorded by the eval stage." if machine else "Recorded when this report was built (no eval stage recorded one).")
    doc.table(["key", "value"], [[k, ", ".join(v) if isinstance(v, list) else v]
                                 for k, v in (machine or machine_info()).items()])

    doc.h(2, "Stages")
    rows = []
    for s in info["stages"]:
        sm = s["summary"]
        est = s.get("estimate") or {}
        rows.append([s["name"], s["kind"], s["status"], _fmt(s["wall_seconds"], 1), _fmt(est.get("wall_seconds"), 1),
                     _mb(s.get("peak_memory_bytes")), _mb(est.get("peak_memory_bytes")),
                     _fmt(sm.get("tokens_per_s"), 1), _fmt(sm.get("steps")), _fmt(sm.get("best_val_loss"), 4)])
    doc.table(["stage", "type", "status", "wall time (s)", "estimated wall (s)", "peak memory (MB)",
               "estimated peak (MB)", "train tokens/s", "steps", "best val loss"], rows)
    doc.p("Estimated figures are `lmforge estimate`'s static prediction for this machine, made as each training stage "
          "started; peak memory is the stage process's resident high-water mark (CPU) or CUDA peak allocation.")

    for s in info["stages"]:
        if s["kind"] == "curate" and s["summary"]:
            sm = s["summary"]
            doc.h(2, f"Curation ({s['name']})")
            doc.p(f"{sm.get('documents_in', '?')} documents in, {sm.get('documents_out', '?')} out; "
                  f"splits: {', '.join(f'{k} {v}' for k, v in (sm.get('splits') or {}).items())}; "
                  f"bad rows skipped: {sm.get('bad_rows_skipped', 0)}.")
            doc.table(["rule", "documents removed"], [[r, n] for r, n in (sm.get("removed") or {}).items()])
        if s["kind"] == "tokenizer" and s["summary"]:
            sm = s["summary"]
            doc.h(2, f"Tokenizer ({s['name']})")
            doc.table(["vocab size", "validation bytes/token", "validation bytes", "validation tokens"],
                      [[sm.get("vocab_size"), _fmt(sm.get("val_bytes_per_token")), _fmt(sm.get("val_bytes")),
                        _fmt(sm.get("val_tokens"))]])

        if s["kind"] == "label" and s["summary"]:
            _label_section(doc, s)
        if s["kind"] in ("index", "compare") and s["summary"]:
            _retrieval_section(doc, s)

    warned = [(s["name"], w) for s in info["stages"] for w in (s["summary"].get("warnings") or [])]
    if warned:  # a stage's own signals said the model got worse (e.g. train/health.py for dpo)
        doc.h(2, "Warnings")
        doc.table(["stage", "warning"], [[n, w] for n, w in warned])
    curves = [(s, p) for s in info["stages"] if (p := loss_figure(s, figures)) is not None]
    if curves:
        doc.h(2, "Loss curves")
        for s, p in curves:
            doc.img(final / p.name, f"loss curve of {s['name']}")
    rl = [(s, p) for s in info["stages"] if (p := rl_figure(s, figures)) is not None]
    if rl:
        doc.h(2, "RL training curves")
        for s, p in rl:
            why = s["summary"].get("stopped_by")
            if why:
                doc.p(f"{s['name']}: guard {why.get('guard')} stopped the run at step {why.get('step')}; the weights "
                      f"of step {why.get('best_step')} were kept ({_fmt_values(why)}).")
            doc.img(final / p.name, f"RL training curves of {s['name']}")

    if checks:
        met = sum(c["met"] is True for c in checks)
        doc.h(2, "Expectations")
        doc.p(f"{met} of {len(checks)} met, checked against the last evaluation ({info['evals'][-1]['stage']}). "
              "Values in percent for rates, points for differences; [low, high] is the 95% interval where one exists.")
        doc.table(["claim", "metric", "model", "measured", "expected", "met"],
                  [[c["claim"], c["metric"], c["model"] + (f" - {c['against']}" if c["against"] else ""),
                    "-" if c["value"] is None else f"{c['value']:.1f}"
                    + (f" [{c['ci'][0]:.1f}, {c['ci'][1]:.1f}]" if c["ci"] else ""),
                    _threshold(c), {True: "yes", False: "NO", None: "not evaluated"}[c["met"]]] for c in checks])

    for ev in info["evals"]:
        if (p := headline_figure(ev, figures)) is not None:
            doc.h(2, f"Headline rates ({ev['stage']})")
            doc.img(final / p.name, f"headline rates by model of {ev['stage']}")
        _eval_sections(doc, ev, examples_per_task=examples_per_task, answer_chars=answer_chars)
    return doc


def _fmt_values(d: dict) -> str:
    return ", ".join(f"{k} {_fmt(v, 4)}" for k, v in d.items() if k not in ("guard", "step", "best_step"))


def _label_section(doc: Doc, s: dict) -> None:
    """Labelling statistics of a label stage (its export's stats.json, written by lmforge.label.export)."""
    path = s["artifact"] / "stats.json"
    sm = json.loads(path.read_text()) if path.is_file() else s["summary"]
    ag, secs = sm.get("agreement") or {}, sm.get("seconds_per_judgment") or {}
    doc.h(2, f"Labelling ({s['name']})")
    doc.p(f"{sm.get('items_judged', 0)} of {sm.get('items', 0)} items judged in {sm.get('judgments', 0)} judgments; "
          f"{_fmt(secs.get('mean'), 1)} s per judgment (median {_fmt(secs.get('median'), 1)}); ties and all-bad "
          f"{_pct(sm.get('tie_share'))}%, flagged {_pct(sm.get('flagged_share'))}% ({sm.get('flags') or 'no flags'}); "
          f"{sm.get('ideal_answers', 0)} ideal answers; exported rows {sm.get('rows', {})}.")
    doc.table(["annotator", "judgments"], [[a, n] for a, n in (sm.get("judgments_per_annotator") or {}).items()])
    doc.p(f"Agreement: {ag.get('method', 'Krippendorff alpha')} = {_fmt(ag.get('alpha'), 3)} over "
          f"{ag.get('items_with_overlap', 0)} items judged by several annotators.")
    if ag.get("pairs"):
        doc.table(["annotators", "items", "response pairs", "agreement (%)", "alpha"],
                  [[" & ".join(p["annotators"]), p["items"], p["units"], _fmt(p["percent_agreement"], 1),
                    _fmt(p["alpha"], 3)] for p in ag["pairs"]])


def _eval_sections(doc: Doc, ev: dict, *, examples_per_task: int, answer_chars: int) -> None:
    res = ev["results"]
    order: list[str] = res["order"]
    doc.h(2, f"Evaluation ({ev['stage']})")
    models = ", ".join(f"{m} ({res['models'][m]})" for m in order)
    doc.p(f"Models, in order: {models}. Rates are in percent; "
          f"[low, high] is a {100 * res['bootstrap']['confidence']:.0f}% bootstrap interval "
          f"({res['bootstrap']['n_resamples']} resamples); Δ is the paired difference against the previous model. "
          "↑ higher is better, ↓ lower is better.")
    keys = [k for k in res.get("metrics") or sorted({k for m in order for k in res["results"][m]})
            if any(k in res["results"][m] for m in order)]
    headers = ["metric", "n", "chance"]
    for j, m in enumerate(order):
        headers += [m] + ([f"Δ {m}"] if j else [])
    rows = []
    for k in keys:
        first = next(res["results"][m][k] for m in order if k in res["results"][m])
        rate = first.get("rate", False)
        arrow = "↑" if first.get("higher_is_better") else "↓"
        row = [f"{k} {arrow}", first.get("n"), _pct(first.get("chance")) if rate else _fmt(first.get("chance"))]
        for j, m in enumerate(order):
            row.append(_est(res["results"][m].get(k), rate=rate))
            if j:
                row.append(_delta(res["deltas"].get(m, {}).get(k), rate=rate))
        rows.append(row)
        for g in (first.get("groups") or {}):
            grow = [f"{k} / {g}", first["groups"][g].get("n"), _pct(first["groups"][g].get("chance"))]
            for j, m in enumerate(order):
                grow.append(_est((res["results"][m].get(k) or {}).get("groups", {}).get(g), rate=True))
                if j:
                    grow.append("")
            rows.append(grow)
    doc.table(headers, rows)

    if res.get("gates"):
        doc.h(3, "Regression gates")
        doc.table(["metric", "model", "against", "value", "against value", "drop", "max drop", "result"],
                  [[g["metric"], g["model"], g["against"],
                    _pct(g["value"]) if g["unit"] == "points" else _fmt(g["value"]),
                    _pct(g["against_value"]) if g["unit"] == "points" else _fmt(g["against_value"]),
                    f"{g['drop']:.2f} {g['unit']}", f"{g['max_drop']:g}", "passed" if g["passed"] else "FAILED"]
                   for g in res["gates"]])
    doc.p(f"Pipeline output: {res['output_model']} ({res['output_path']}).")

    doc.h(3, "Evaluation time")
    doc.table(["model", "wall time (s)", "generated tokens", "generated tokens/s"],
              [[m, _fmt(t.get("seconds"), 1), t.get("generated_tokens"), _fmt(t.get("generated_tokens_per_s"), 1)]
               for m, t in res.get("timing", {}).items()])

    doc.h(3, "Sampling parameters")
    keys_shown = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens", "stop", "seed"]
    doc.table(["task", "format", "rows"] + keys_shown,
              [[t, spec["format"], f"{spec['rows_evaluated']}/{spec['rows_in_file']}"]
               + [spec["sampling"].get(k) for k in keys_shown]
               for t in res.get("task_order") or sorted(res["tasks"])
               if (spec := res["tasks"][t]).get("sampling")])

    if examples_per_task and ev["answers"]:
        doc.h(3, "The same prompts, answered by each model")
        by_task: dict[str, dict[str, dict[str, dict]]] = {t: {} for t in res.get("task_order", [])}
        for a in ev["answers"]:
            by_task.setdefault(a["task"], {}).setdefault(a["id"], {})[a["model"]] = a
        for task, items in by_task.items():
            for rid in list(items)[:examples_per_task]:
                per_model = items[rid]
                prompt = next(iter(per_model.values()))["prompt"]
                if not isinstance(prompt, str):
                    prompt = json.dumps(prompt, ensure_ascii=False)
                doc.p(f"{task} / {rid}: {prompt}")
                doc.table(["model", "answer", "scores"],
                          [[m, _clip(per_model[m]["output"], answer_chars),
                            ", ".join(f"{k} {_fmt(v, 2)}" for k, v in per_model[m]["scores"].items())]
                           for m in order if m in per_model])


def _clip(text: str, n: int) -> str:
    text = text.strip()
    return text if len(text) <= n else text[: n - 3] + "..."


# --------------------------------------------------------------------------------------------
# Writing


def _retrieval_section(doc: Doc, s: dict) -> None:
    """An index stage's size and retrieval quality; a compare stage's decision table."""
    sm = s["summary"]
    if s["kind"] == "index":
        doc.h(2, f"Retrieval index ({s['name']})")
        q = sm.get("quality") or {}
        doc.p(f"{sm.get('documents')} documents, {sm.get('chunks')} chunks, {(sm.get('size_bytes') or 0) / 1e6:.2f} MB"
              f" ({'BM25 + dense' if sm.get('dense') else 'BM25'}); " + (", ".join(
                  f"{k} {100 * v:.1f}%" if k.startswith("recall") else f"{k} {v:.3f}" for k, v in q.items()
                  if isinstance(v, float)) + f" on {q.get('n')} questions" if q else "no quality questions given") + ".")
        return
    path = s["artifact"] / "compare.json"
    if not path.is_file():
        return
    from lmforge.eval.compare import HEADERS, decision_rows

    rows, paired, summary = decision_rows(json.loads(path.read_text()))
    doc.h(2, f"Prompt, few-shot, RAG or fine-tune? ({s['name']})")
    doc.p(summary)
    doc.table(HEADERS, rows)
    doc.p("Paired differences in accuracy (percentage points, 95% CI): " + "; ".join(paired) + ".")


def build_report(run_dir: str | Path, *, examples_per_task: int = 2, answer_chars: int = 300,
                 expectations: list[Expectation] | None = None) -> dict:
    """Write <run_dir>/report.md, report.html and report_figures/; returns what was written.
    expectations None = those of the run's report stage, if it has one."""
    run_dir = Path(run_dir)
    info = collect(run_dir)
    if expectations is None:
        expectations = _report_expectations(run_dir)
    checks = check_expectations(info["evals"][-1]["results"], expectations) if info["evals"] else []
    with staged_dir(run_dir / FIGURES) as tmp:
        doc = build_doc(info, tmp, run_dir / FIGURES, examples_per_task=examples_per_task, answer_chars=answer_chars,
                        checks=checks)
        n_figures = len(list(tmp.glob("*.png")))
    atomic_write_text(run_dir / "report.md", doc.markdown(run_dir))
    atomic_write_text(run_dir / "report.html", doc.html(f"lmforge report: {run_dir.name}"))
    return {"markdown": str(run_dir / "report.md"), "html": str(run_dir / "report.html"), "figures": n_figures,
            "stages": [s["name"] for s in info["stages"]], "evals": [e["stage"] for e in info["evals"]],
            "expectations": checks}


def run(cfg: Config, rd: RunDir, resume: bool = False) -> dict:
    """The `report` stage: build the run's report, and keep a copy in this stage's artifact."""
    run_dir = Path(cfg.run_dir) if cfg.run_dir else rd.path.parent
    out = build_report(run_dir, examples_per_task=cfg.examples_per_task, answer_chars=cfg.answer_chars,
                       expectations=cfg.expectations)
    with staged_dir(rd.artifact) as tmp:
        shutil.copy2(run_dir / "report.html", tmp / "report.html")  # self-contained: figures inlined
        atomic_write_json(tmp / "report.json", out)
    print(f"report: {out['markdown']} and {out['html']} ({out['figures']} figures)")
    for c in out["expectations"]:
        verdict = {True: "met", False: "NOT MET", None: "not evaluated"}[c["met"]]
        value = "-" if c["value"] is None else f"{c['value']:.1f}"
        print(f"  expectation {verdict}: {c['claim']} ({c['metric']}, {c['model']}"
              f"{' - ' + c['against'] if c['against'] else ''}: {value}, expected {_threshold(c)})")
    rd.log(f"report written to {out['markdown']}")
    return out

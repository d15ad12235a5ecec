"""The run report: built from a run folder of real stage folders (two tiny models evaluated by the
eval stage), by the `report` stage at the end of a recipe and by `lmforge report RUN_DIR`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmforge.pipeline import run_recipe
from tests.conftest import build_tiny_model

PROMPTS = ["What is two plus two?", "Hello there!", "The quick brown fox"]


def fake_stage(root: Path, name: str, kind: str, artifact: str, *, summary: dict, wall: float, finished: str,
               metrics: list[dict] = (), model_src: Path | None = None, extra: dict | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({
        "stage": kind, "name": name, "status": "complete", "artifact": artifact, "output_id": f"id-{name}",
        "wall_seconds": wall, "summary": summary, "finished": finished, **(extra or {})}))
    if metrics:
        (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics) + '{"step": 9, "lo')  # cut line
    if model_src is not None:
        shutil.copytree(model_src, d / artifact)
    return d


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("runs") / "demo"
    other = build_tiny_model(tmp_path_factory.mktemp("tiny_sft"), seed=1)
    fake_stage(root, "curate", "curate", "data", wall=1.5, finished="2024-01-01T00:00:01", summary={
        "documents_in": 100, "documents_out": 80, "bad_rows_skipped": 0, "splits": {"train": 76, "validation": 4},
        "removed": {"empty": 0, "min_words": 12, "exact_duplicate": 8}})
    fake_stage(root, "tokenizer", "tokenizer", "tokenizer", wall=0.5, finished="2024-01-01T00:00:02",
               summary={"vocab_size": 300, "val_bytes_per_token": 3.2109, "val_bytes": 1000, "val_tokens": 311})
    curve = [{"step": s, "loss": 6.0 - s, "tokens_per_s": 1000.0} for s in (1, 2, 3)] + [{"step": 3, "val_loss": 3.5}]
    fake_stage(root, "pretrain", "pretrain", "model", wall=12.5, finished="2024-01-01T00:00:03", metrics=curve,
               summary={"tokens_per_s": 1234.5, "steps": 3, "best_val_loss": 3.5}, model_src=tiny_model_dir,
               extra={"peak_memory_bytes": 512e6, "estimate": {"peak_memory_bytes": 480.4e6, "wall_seconds": 10.04}})
    fake_stage(root, "sft", "sft", "model", wall=4.3, finished="2024-01-01T00:00:04",
               metrics=[{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}],
               summary={"tokens_per_s": 99.0, "steps": 2}, model_src=other)
    data = root.parent / "data"
    data.mkdir()
    (data / "echo.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": p, "answer": "4"}) + "\n"
                                             for i, p in enumerate(PROMPTS)))
    (data / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in
                                             ["The quick brown fox jumps over the lazy dog.", "Hello there! How are you?"]))
    return root


def recipe(run_dir: Path, models: dict, gates: list | None = None) -> Path:
    data = run_dir.parent / "data"
    tasks = [
        {"name": "echo", "file": "@d/echo.jsonl", "scorers": ["answered", "numeric_match"], "max_new_tokens": 6},
        {"name": "plain", "file": "@d/echo.jsonl", "format": "plain", "scorers": ["answered"], "max_new_tokens": 4,
         "sampling": {"temperature": 0.8, "top_k": 5, "seed": 3}},
        {"name": "heldout", "kind": "likelihood", "file": str(data / "text.jsonl")},
    ]
    r = {"name": run_dir.name, "out_dir": str(run_dir.parent), "stages": [
        {"stage": "eval", "models": models, "data": {"d": str(data)}, "tasks": tasks, "batch_size": 4,
         "bootstrap": {"n_resamples": 200}, "gates": gates or []},
        {"stage": "report", "examples_per_task": 1, "expectations": [
            {"claim": "a loss below 1000", "metric": "heldout.loss", "model": "sft", "at_most": 1000},
            {"claim": "sft answers every prompt", "metric": "echo.answer_rate", "model": "sft", "at_least": 100.01}]},
    ]}
    path = run_dir.parent / "recipe.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def test_report_stage_writes_every_section(run_dir):
    models = {"base": str(run_dir / "pretrain"), "sft": str(run_dir / "sft")}
    run_recipe(recipe(run_dir, models), echo=lambda *a: None)
    md = (run_dir / "report.md").read_text()
    res = json.loads((run_dir / "eval/eval/results.json").read_text())
    answers = [json.loads(x) for x in (run_dir / "eval/eval/answers.jsonl").read_text().splitlines()]

    # Stages in the order they finished, with wall time and tokens/s from their manifests, and the
    # estimate made at the stage's start beside the measured wall time and peak memory.
    assert "| pretrain | pretrain | complete | 12.5 | 10.0 | 512 | 480 | 1234.5 | 3 | 3.5000 |" in md
    assert "| sft | sft | complete | 4.3 | - | - | - | 99.0 | 2 | - |" in md
    assert md.index("| curate | curate |") < md.index("| tokenizer | tokenizer |") < md.index("| pretrain | pretrain |")
    # Curation counts per rule and tokenizer compression.
    assert "100 documents in, 80 out; splits: train 76, validation 4; bad rows skipped: 0." in md
    assert "| min_words | 12 |" in md and "| exact_duplicate | 8 |" in md and "| empty | 0 |" in md
    assert "| 300 | 3.211 | 1000 | 311 |" in md
    # Loss curves: one PNG per stage that logged a loss (the cut last metrics line is skipped).
    figs = sorted(p.name for p in (run_dir / "report_figures").iterdir())
    assert figs == ["headline_eval.png", "loss_pretrain.png", "loss_sft.png"]  # + the eval's headline rates
    assert all((run_dir / "report_figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figs)
    assert "![loss curve of pretrain](report_figures/loss_pretrain.png)" in md

    # Every metric, per model, side by side, with intervals and paired deltas.
    assert "| metric | n | chance | base | sft | Δ sft |" in md
    loss = {m: res["results"][m]["heldout.loss"] for m in ("base", "sft")}
    d = res["deltas"]["sft"]["heldout.loss"]
    cells = [f"{loss[m]['value']:.3f} [{loss[m]['ci_low']:.3f}, {loss[m]['ci_high']:.3f}]" for m in ("base", "sft")]
    delta = f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
    assert f"| heldout.loss ↓ | 2 | - | {cells[0]} | {cells[1]} | {delta} |" in md
    acc = {m: res["results"][m]["echo.accuracy"] for m in ("base", "sft")}
    assert f"| echo.accuracy ↑ | 3 | - | {100 * acc['base']['value']:.1f} [" in md
    assert res["results"]["base"]["echo.answer_rate"]["n"] == 3
    assert res["output_model"] == "sft" and "Pipeline output: sft (" in md

    # The same prompt answered by each model, and the sampling parameters used.
    assert "echo / p0: What is two plus two?" in md and "plain / p0: What is two plus two?" in md
    assert "echo / p1:" not in md  # examples_per_task: 1
    for m in ("base", "sft"):
        out = next(a["output"] for a in answers if a["model"] == m and a["task"] == "echo" and a["id"] == "p0")
        cell = out.strip()[:300].replace("|", "\\|").replace("\n", "<br>")
        assert f"| {m} | {cell} |" in md
    assert "| echo | chat | 3/3 | 0.0 | 1.0 | 0 | 0.0 | 1.0 | 6 | [] | 0 |" in md
    assert "| plain | plain | 3/3 | 0.8 | 1.0 | 5 | 0.0 | 1.0 | 4 | [] | 3 |" in md
    assert f"| cpu_count | {os.cpu_count()} |" in md

    # The report stage's expectations, checked against the eval results.
    assert "1 of 2 met, checked against the last evaluation (eval)." in md
    assert "| a loss below 1000 | heldout.loss | sft | " in md and "| <= 1000 | yes |" in md
    assert "| sft answers every prompt | echo.answer_rate | sft | " in md and "| >= 100.01 | NO |" in md

    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<td>min_words</td><td>12</td>" in html
    assert (run_dir / "report/report/report.html").read_text() == html


def test_lmforge_report_rebuilds_after_a_failed_gate(run_dir):
    first = json.loads((run_dir / "eval/eval/results.json").read_text()) if (run_dir / "eval/eval").exists() else None
    if first is None:  # this test also runs alone
        run_recipe(recipe(run_dir, {"base": str(run_dir / "pretrain"), "sft": str(run_dir / "sft")}),
                   echo=lambda *a: None)
        first = json.loads((run_dir / "eval/eval/results.json").read_text())
    # Order the models so the second is the worse one on held-out loss, and allow no loss at all.
    worse = max(("base", "sft"), key=lambda m: first["results"][m]["heldout.loss"]["value"])
    better = "sft" if worse == "base" else "base"
    paths = {"base": str(run_dir / "pretrain"), "sft": str(run_dir / "sft")}
    gates = [{"metric": "heldout.loss", "model": worse, "against": better, "max_drop": 0}]
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match=f"Regression gate failed: heldout.loss of {worse} is"):
        run_recipe(recipe(run_dir, {better: paths[better], worse: paths[worse]}, gates), echo=lambda *a: None)
    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", "report", str(run_dir)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {run_dir / 'report.md'} and {run_dir / 'report.html'} (3 figures;")  # 2 loss, 1 headline
    md = (run_dir / "report.md").read_text()
    assert "| eval | eval | running |" in md  # the failed stage did not complete
    assert f"| heldout.loss | {worse} | {better} |" in md and "| FAILED |" in md
    assert f"Pipeline output: {better} ({paths[better]}/model)." in md  # the model folder the eval loaded
    assert f"| metric | n | chance | {better} | {worse} | Δ {worse} |" in md
    assert "1 of 2 met" in md  # the rebuild reads the expectations from the run's report stage


def test_expectations_are_checked_in_display_units():
    from lmforge.report import Expectation, check_expectations

    def est(v, lo, hi, chance=None, groups=None):
        return {"value": v, "ci_low": lo, "ci_high": hi, "n": 100, "rate": True, "higher_is_better": True,
                "chance": chance, "groups": groups}

    res = {"order": ["sft", "dpo"], "results": {
        "sft": {"unknown.hallucination_rate": est(0.95, 0.9, 0.99), "facts.accuracy": est(
            0.5, 0.4, 0.6, groups={"capital": est(0.12, 0.06, 0.2, chance=0.03)})},
        "dpo": {"unknown.hallucination_rate": est(0.60, 0.5, 0.7), "facts.accuracy": est(0.46, 0.36, 0.56)}},
        "deltas": {"dpo": {"unknown.hallucination_rate": {"value": -0.35, "ci_low": -0.45, "ci_high": -0.25}}}}
    exps = [
        Expectation(claim="30 points fewer", metric="unknown.hallucination_rate", model="dpo", against="sft", at_most=-30),
        Expectation(claim="40 points fewer", metric="unknown.hallucination_rate", model="dpo", against="sft", at_most=-40),
        Expectation(claim="facts kept", metric="facts.accuracy", model="dpo", against="sft", at_least=-5),
        Expectation(claim="4x chance", metric="facts.accuracy/capital", model="sft", times_chance=True, at_least=3),
        Expectation(claim="rate", metric="facts.accuracy", model="dpo", at_least=40, at_most=50),
        Expectation(claim="no groups for dpo", metric="facts.accuracy/capital", model="dpo", at_least=1),
    ]
    got = check_expectations(res, exps)
    assert [c["met"] for c in got] == [True, False, True, True, True, None]
    assert got[0]["value"] == pytest.approx(-35.0) and got[0]["ci"] == pytest.approx((-45.0, -25.0))  # paired CI
    assert got[2]["value"] == pytest.approx(-4.0)
    assert got[3]["value"] == pytest.approx(4.0) and got[3]["ci"] == pytest.approx((2.0, 0.2 / 0.03))
    assert got[4]["value"] == pytest.approx(46.0) and got[4]["ci"] == pytest.approx((36.0, 56.0))
    with pytest.raises(ValueError, match="at_least or at_most"):
        Expectation(claim="x", metric="a.b", model="m")
    # A name the results do not have at all is a mistake in the recipe: one sentence, closest match.
    from lmforge.errors import LmforgeError

    for kw, msg in [({"model": "dop"}, r"\[0\] \('x'\): model 'dop' is not in the evaluation results; did you mean 'dpo'"),
                    ({"metric": "facts.acuracy"}, "metric 'facts.acuracy' .* did you mean 'facts.accuracy'"),
                    ({"metric": "facts.accuracy/capitol"}, "group of facts.accuracy 'capitol' .* did you mean 'capital'"),
                    ({"metric": "unknown.hallucination_rate", "times_chance": True}, "needs a chance baseline")]:
        e = Expectation(**{"claim": "x", "metric": "facts.accuracy", "model": "sft", "at_least": 1, **kw})
        with pytest.raises(LmforgeError, match=msg):
            check_expectations(res, [e])


def test_rl_series_and_headline_rates_hand_values():
    from lmforge.report import headline_rates, rl_series

    metrics = [{"step": 1, "reward": 0.5, "kl": 0.0, "response_length": 8, "entropy": 2.5},
               {"step": 2, "loss": 1.0},  # not a rollout record
               {"step": 2, "reward": 1, "kl": 0.25, "response_length": 9.5},  # entropy not logged this step
               {"step": 2, "guard": "kl", "guard/kl": 0.25}]
    assert rl_series({"metrics": metrics}) == {"reward": [(1, 0.5), (2, 1.0)], "kl": [(1, 0.0), (2, 0.25)],
                                               "response_length": [(1, 8.0), (2, 9.5)], "entropy": [(1, 2.5)]}
    assert rl_series({"metrics": [{"step": 1, "loss": 2.0}]}) == {}
    res = {"order": ["sft", "dpo"], "metrics": ["v.loss", "u.hallucination_rate", "f.accuracy"], "results": {
        "sft": {"v.loss": {"value": 2.0, "rate": False}, "u.hallucination_rate": {
            "value": 0.5, "ci_low": 0.25, "ci_high": 0.75, "rate": True, "higher_is_better": False},
                "f.accuracy": {"value": 0.1, "rate": True, "higher_is_better": True}},
        "dpo": {"u.hallucination_rate": {"value": 0.2, "ci_low": 0.1, "ci_high": 0.3, "rate": True,
                                         "higher_is_better": False}}}}
    assert headline_rates(res) == [  # a loss is not a rate: no shared axis; no interval: no whiskers
        ("u.hallucination_rate ↓", [("sft", 50.0, 25.0, 75.0), ("dpo", 20.0, 10.0, 30.0)]),
        ("f.accuracy ↑", [("sft", 10.0, 10.0, 10.0)])]


def test_report_draws_rl_curves_and_names_the_guard_that_stopped(tmp_path):
    from lmforge.report import build_report

    root = tmp_path / "rl"
    curve = [{"step": s, "reward": 0.2 * s, "kl": 0.1 * s, "response_length": 8 + s, "entropy": 2.0 - 0.1 * s}
             for s in (1, 2, 3)]
    stop = {"guard": "heldout", "step": 3, "best_step": 1, "metric": 0.0, "best": 0.25, "drop": 0.25}
    fake_stage(root, "grpo", "grpo", "model", wall=2.0, finished="2024-01-01T00:00:01", summary={"stopped_by": stop},
               metrics=[*curve, {"step": 3, "guard": "heldout", "guard/metric": 0.0}])
    fake_stage(root, "ppo", "ppo", "model", wall=2.0, finished="2024-01-01T00:00:02", summary={"stopped_by": None},
               metrics=curve)
    build_report(root)
    md = (root / "report.md").read_text()
    figs = sorted(p.name for p in (root / "report_figures").iterdir())
    assert figs == ["rl_grpo.png", "rl_ppo.png"]
    assert all((root / "report_figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figs)
    assert "## RL training curves" in md and "![RL training curves of ppo](report_figures/rl_ppo.png)" in md
    assert ("grpo: guard heldout stopped the run at step 3; the weights of step 1 were kept (metric 0.0000, "
            "best 0.2500, drop 0.2500).") in md
    assert "ppo: guard" not in md

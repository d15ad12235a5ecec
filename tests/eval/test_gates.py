"""Regression gates: the arithmetic of a drop, which model stays the output, and a gate that must
fail failing the eval stage on real (tiny) models after writing its results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.config import validate
from lmforge.errors import LmforgeError
from lmforge.eval import stage
from lmforge.eval.tasks import MetricSpec
from lmforge.rundir import RunDir
from tests.conftest import build_tiny_model

ORDER = ["base", "sft", "dpo", "grpo"]
# (higher is better, is a rate): over-refusal falls when it improves; loss is not a rate.
DIRECTIONS = {k: MetricSpec(k.split(".")[1], None, up, rate) for k, up, rate in (
    ("safe.over_refusal_rate", False, True), ("facts.accuracy", True, True), ("validation.loss", False, False))}


def results(**per_model: dict[str, float]) -> dict:
    return {m: {k: {"value": v} for k, v in metrics.items()} for m, metrics in per_model.items()}


def gate(**kw) -> stage.Gate:
    return stage.Gate(**kw)


def test_a_worse_rate_by_more_than_max_drop_fails_and_keeps_the_previous_model():
    res = results(sft={"safe.over_refusal_rate": 0.10}, dpo={"safe.over_refusal_rate": 0.22},
                  grpo={"safe.over_refusal_rate": 0.05})
    recs, output = stage.check_gates([gate(metric="safe.over_refusal_rate", model="dpo", against="sft", max_drop=5)],
                                     res, ORDER, DIRECTIONS)
    assert recs[0]["drop"] == pytest.approx(12.0)  # over-refusal rose by 12 points: lower is better
    assert recs[0]["unit"] == "points" and recs[0]["passed"] is False
    assert output == "sft"  # grpo was trained from dpo, so it goes too
    msg = stage.gate_message(recs[0])
    assert msg == ("safe.over_refusal_rate of dpo is 22.0% vs 10.0% for sft: worse by 12.00 points, "
                   "more than the allowed 5")


def test_a_drop_within_max_drop_passes_and_the_last_model_is_the_output():
    res = results(sft={"facts.accuracy": 0.60}, dpo={"facts.accuracy": 0.57})
    recs, output = stage.check_gates([gate(metric="facts.accuracy", model="dpo", against="sft", max_drop=5)],
                                     res, ORDER, DIRECTIONS)
    assert recs[0]["drop"] == pytest.approx(3.0) and recs[0]["passed"] is True
    assert output == "grpo"
    # An improvement is a negative drop and always passes, even with max_drop 0.
    recs, _ = stage.check_gates([gate(metric="facts.accuracy", model="sft", against="dpo", max_drop=0)],
                                res, ORDER, DIRECTIONS)
    assert recs[0]["drop"] == pytest.approx(-3.0) and recs[0]["passed"] is True


def test_loss_gates_are_in_the_metrics_own_units():
    res = results(base={"validation.loss": 1.80}, sft={"validation.loss": 2.00})
    recs, output = stage.check_gates([gate(metric="validation.loss", model="sft", against="base", max_drop=0.1)],
                                     res, ORDER, DIRECTIONS)
    assert recs[0]["drop"] == pytest.approx(0.2) and recs[0]["unit"] == "units" and not recs[0]["passed"]
    assert output == "base"


def test_the_earliest_failing_model_decides_the_output():
    res = results(base={"facts.accuracy": 0.5}, sft={"facts.accuracy": 0.2}, dpo={"facts.accuracy": 0.1},
                  grpo={"facts.accuracy": 0.6})
    gates = [gate(metric="facts.accuracy", model="dpo", against="sft", max_drop=5),
             gate(metric="facts.accuracy", model="sft", against="base", max_drop=5)]
    recs, output = stage.check_gates(gates, res, ORDER, DIRECTIONS)
    assert [r["passed"] for r in recs] == [False, False]
    assert output == "base"


def test_unknown_metric_and_bad_gate_configs_are_rejected():
    with pytest.raises(LmforgeError, match="no task reports that metric; known metrics: facts.accuracy"):
        stage.check_gates([gate(metric="facts.acuracy", model="dpo", against="sft", max_drop=1)], {}, ORDER, DIRECTIONS)
    base = {"models": {"a": "x", "b": "y"}, "tasks": []}
    with pytest.raises(LmforgeError, match="gate on t.m: against 'c' is not one of the models"):
        validate(stage.Config, {**base, "gates": [{"metric": "t.m", "model": "a", "against": "c", "max_drop": 1}]})
    with pytest.raises(LmforgeError, match="compares 'a' with itself"):
        validate(stage.Config, {**base, "gates": [{"metric": "t.m", "model": "a", "against": "a", "max_drop": 1}]})
    with pytest.raises(LmforgeError, match=r"gates\.0\.max_drop"):
        validate(stage.Config, {**base, "gates": [{"metric": "t.m", "model": "a", "against": "b", "max_drop": -1}]})


# --------------------------------------------------------------------------------------------
# The stage on two tiny random models


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    other = build_tiny_model(tmp_path_factory.mktemp("tiny_b"), seed=1)
    return {"a": str(tiny_model_dir), "b": str(other)}


PROMPTS = ["What is two plus two?", "Hello there!", "The quick brown fox", "Who carries the apples?"]


def run_eval(tmp: Path, cfg: dict) -> RunDir:
    c = validate(stage.Config, {"batch_size": 4, "bootstrap": {"n_resamples": 200}, **cfg})
    rd = RunDir(tmp, stage="eval", artifact=stage.ARTIFACT)
    stage.run(c, rd)
    return rd


def test_a_gate_that_must_fail_fails_the_stage_after_writing_results(tmp_path, two_models):
    # 1. Model a's greedy answers become the references, so a scores 100% exact match and b ~0%.
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    task = {"name": "echo", "file": str(src), "scorers": ["answered"], "max_new_tokens": 6}
    run_eval(tmp_path / "first", {"models": {"a": two_models["a"]}, "tasks": [task]})
    outputs = {a["id"]: a["output"] for a in map(json.loads, (tmp_path / "first/eval/answers.jsonl").open())}
    assert len(outputs) == len(PROMPTS)
    ref = tmp_path / "echo.jsonl"
    ref.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p, "answer": outputs[f"p{i}"]}) + "\n"
                           for i, p in enumerate(PROMPTS)))

    # 2. b may not be worse than a by more than 5 points: it is worse by 100, so the stage fails.
    task = {"name": "echo", "file": str(ref), "scorers": ["exact_match"], "max_new_tokens": 6}
    gates = [{"metric": "echo.exact_match", "model": "b", "against": "a", "max_drop": 5}]
    with pytest.raises(LmforgeError) as e:
        run_eval(tmp_path / "gated", {"models": two_models, "tasks": [task], "gates": gates})
    assert str(e.value).startswith(
        "Regression gate failed: echo.exact_match of b is 0.0% vs 100.0% for a: worse by 100.00 points, more than "
        f"the allowed 5. The pipeline's output stays 'a' ({two_models['a']})")
    res = json.loads((tmp_path / "gated/eval/results.json").read_text())
    assert res["output_model"] == "a" and res["output_path"] == two_models["a"]
    assert res["gates"][0]["passed"] is False and res["gates"][0]["drop"] == pytest.approx(100.0)
    assert res["results"]["a"]["echo.exact_match"]["value"] == 1.0
    assert res["results"]["b"]["echo.exact_match"]["value"] == 0.0
    assert res["results"]["b"]["echo.exact_match"]["n"] == len(PROMPTS)
    assert res["deltas"]["b"]["echo.exact_match"]["value"] == -1.0
    assert res["deltas"]["b"]["echo.exact_match"]["against"] == "a"
    assert "failed" in (tmp_path / "gated/log.txt").read_text().lower()

    # 3. With on_gate_failure: warn the same gate is reported but the stage completes.
    rd = RunDir(tmp_path / "warned", stage="eval", artifact=stage.ARTIFACT)
    c = validate(stage.Config, {"models": two_models, "tasks": [task], "gates": gates, "on_gate_failure": "warn",
                                "bootstrap": {"n_resamples": 50}})
    summary = stage.run(c, rd)
    assert summary["output_model"] == "a" and summary["gates_failed"] == 1


def test_a_gate_on_a_metric_no_task_reports_fails_before_any_model_loads(tmp_path):
    rows = tmp_path / "r.jsonl"
    rows.write_text(json.dumps({"prompt": "hi"}) + "\n")
    cfg = {"models": {"a": str(tmp_path / "missing_a"), "b": str(tmp_path / "missing_b")},
           "tasks": [{"name": "t", "file": str(rows), "scorers": ["answered"]}],
           "gates": [{"metric": "t.accuracy", "model": "b", "against": "a", "max_drop": 1}]}
    with pytest.raises(LmforgeError, match=r"Gate on 't.accuracy': no task reports that metric; known metrics: t.answer_rate"):
        run_eval(tmp_path / "out", cfg)


def test_recipe_references_in_models_and_data_mappings_resolve(tmp_path):
    from lmforge.pipeline import Recipe, plan

    recipe = Recipe(name="r", out_dir=str(tmp_path), stages=[
        {"stage": "world", "name": "w"},
        {"stage": "eval", "models": {"first": "@w", "second": "@w"}, "data": {"world": "@w", "eval": "@w/eval"},
         "gates": [{"metric": "facts_sft.accuracy", "model": "second", "against": "first", "max_drop": 5}]},
    ])
    planned = plan(recipe, where="recipe.yaml")
    cfg = planned[1].cfg
    assert cfg.models == {"first": str(tmp_path / "r/w"), "second": str(tmp_path / "r/w")}
    assert cfg.data == {"world": str(tmp_path / "r/w"), "eval": str(tmp_path / "r/w/world/eval")}
    bad = Recipe(name="r", out_dir=str(tmp_path), stages=[{"stage": "eval", "models": {"x": "@nope"}}])
    with pytest.raises(LmforgeError, match=r"stages.0.models.x refers to '@nope', but no earlier stage is named 'nope'"):
        plan(bad, where="recipe.yaml")

"""Running tasks: likelihood equals the naive per-document loss, the reward scorer equals the reward
model's own score with win rates by hand, chance baselines per group, and bad task rows named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import validate
from lmforge.errors import LmforgeError
from lmforge.eval import stage
from lmforge.eval.tasks import Task, likelihood, load_rows
from lmforge.rundir import RunDir
from tests.conftest import SENTENCES, build_tiny_model


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from lmforge.generation import load_model_for_inference

    return load_model_for_inference(tiny_model_dir, device="cpu", dtype="fp32")


def test_likelihood_equals_the_naive_loss_including_documents_longer_than_the_context(loaded):
    model, tok = loaded
    long_doc = " ".join(SENTENCES * 3)  # > 128 tokens: scored in windows of the context
    texts = [SENTENCES[0], long_doc, "Hi"]
    nats, counts = likelihood(model, tok, texts, batch_size=2, device="cpu")
    eos, ctx = tok.eos_token_id, model.config.max_position_embeddings
    for text, got_nats, got_n in zip(texts, nats, counts):
        seq = [eos] + tok(text, add_special_tokens=False)["input_ids"] + [eos]
        want, n = 0.0, 0
        for s in range(0, len(seq) - 1, ctx):  # one forward pass per window, no padding
            chunk = torch.tensor(seq[s:s + ctx + 1])
            with torch.no_grad():
                logits = model(input_ids=chunk[None, :-1]).logits[0].float()
            want += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
            n += len(chunk) - 1
        assert got_n == n == len(seq) - 1
        assert got_nats == pytest.approx(want, rel=1e-4)
    assert counts[1] > ctx


def test_reward_scorer_and_win_rate_against_the_baseline(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from lmforge.data.chat import render

    other = build_tiny_model(tmp_path / "b", seed=2)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    cfg = LlamaConfig.from_pretrained(str(tiny_model_dir), num_labels=1)
    torch.manual_seed(5)
    rm = LlamaForSequenceClassification(cfg)
    rm.save_pretrained(str(tmp_path / "rm"))
    tok.save_pretrained(str(tmp_path / "rm"))
    rows = tmp_path / "chat.jsonl"
    prompts = ["Hello there!", "What is two plus two?", "Tell me about the fox.", "How are you today?"]
    rows.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    c = validate(stage.Config, {
        "models": {"a": str(tiny_model_dir), "b": str(other)}, "reward_model": str(tmp_path / "rm"), "baseline": "a",
        "tasks": [{"name": "chat", "file": str(rows), "scorers": ["reward"], "max_new_tokens": 5}],
        "bootstrap": {"n_resamples": 100}})
    stage.run(c, RunDir(tmp_path / "out", stage="eval", artifact="eval"))
    res = json.loads((tmp_path / "out/eval/results.json").read_text())
    answers = [json.loads(x) for x in (tmp_path / "out/eval/answers.jsonl").read_text().splitlines()]

    def score(prompt: str, answer: str) -> float:  # the reward model on the rendered conversation alone
        conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer.strip()}]
        ids = tok(render(tok, conv, add_generation_prompt=False), add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            return rm(input_ids=ids["input_ids"]).logits[0, 0].item()

    want = {m: [score(a["prompt"], a["output"]) for a in answers if a["model"] == m] for m in ("a", "b")}
    for m in ("a", "b"):
        got = [a["scores"]["reward"] for a in answers if a["model"] == m]
        assert got == pytest.approx(want[m], abs=1e-4)
        assert res["results"][m]["chat.reward"]["value"] == pytest.approx(sum(want[m]) / 4, abs=1e-4)
        assert res["results"][m]["chat.reward"]["rate"] is False
    wins = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(want["b"], want["a"])]
    assert res["results"]["b"]["chat.win_rate"]["value"] == pytest.approx(sum(wins) / 4)
    assert res["results"]["a"]["chat.win_rate"]["value"] == 0.5  # against itself: all ties
    assert res["results"]["b"]["chat.win_rate"]["chance"] == 0.5


def test_chance_baselines_are_reported_per_group(tmp_path, tiny_model_dir):
    rows = tmp_path / "facts.jsonl"
    data = [("capital", ["Tamsk", "Nerpor", "Zolper", "Bazu"]), ("capital", ["Tamsk", "Nerpor", "Zolper", "Bazu"]),
            ("language", ["Tesgen", "Zekgani"]), ("founded", None)]
    rows.write_text("".join(json.dumps({"prompt": f"Question {i}?", "attribute": a, "answer": (c or ["1500"])[0],
                                        "choices": c, "n_choices": len(c) if c else 500}) + "\n"
                            for i, (a, c) in enumerate(data)))
    c = validate(stage.Config, {"models": {"m": str(tiny_model_dir)}, "bootstrap": {"n_resamples": 50}, "tasks": [
        {"name": "facts", "file": str(rows), "scorers": ["fact_match", "answered"], "group_by": "attribute",
         "max_new_tokens": 3}]})
    stage.run(c, RunDir(tmp_path / "out", stage="eval", artifact="eval"))
    acc = json.loads((tmp_path / "out/eval/results.json").read_text())["results"]["m"]["facts.accuracy"]
    assert acc["n"] == 4
    assert acc["chance"] == pytest.approx((0.25 + 0.25 + 0.5 + 1 / 500) / 4)
    assert {g: (e["n"], e["chance"]) for g, e in acc["groups"].items()} == {
        "capital": (2, pytest.approx(0.25)), "language": (1, pytest.approx(0.5)), "founded": (1, pytest.approx(0.002))}
    answered = json.loads((tmp_path / "out/eval/results.json").read_text())["results"]["m"]["facts.answer_rate"]
    assert answered["chance"] is None and answered["groups"]["capital"]["chance"] is None


def test_bad_rows_and_task_declarations_are_named(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "no prompt"}) + "\n")
    task = Task(name="t", file=str(f), scorers=["answered"])
    with pytest.raises(LmforgeError, match=rf"Task 't': {f} line 2 has no field 'prompt'"):
        load_rows(task, f)
    rows, total = load_rows(Task(name="t", file=str(f), scorers=["answered"], max_rows=1), f)
    assert (len(rows), total, rows[0]["id"]) == (1, 2, "t-0000")
    with pytest.raises(LmforgeError, match=r"unknown scorer 'refusel'; did you mean 'refusal'\?"):
        validate(stage.Config, {"models": {"m": "x"}, "tasks": [{"name": "t", "file": "f", "scorers": ["refusel"]}]})
    with pytest.raises(LmforgeError, match="sampling.n must be 1"):
        validate(stage.Config, {"models": {"m": "x"}, "tasks": [
            {"name": "t", "file": "f", "scorers": ["answered"], "sampling": {"n": 4}}]})
    with pytest.raises(LmforgeError, match="reports metric 'accuracy' twice"):
        validate(stage.Config, {"models": {"m": "x"}, "tasks": [
            {"name": "t", "file": "f", "scorers": ["fact_match", "numeric_match"]}]})
    cfg = validate(stage.Config, {"models": {"m": "x"}, "tasks": [
        {"name": "t", "file": "@world/eval/unknown.jsonl", "scorers": ["hallucination"]}]})
    with pytest.raises(LmforgeError, match=r"reads '@world/eval/unknown.jsonl', but the eval config's `data` has no "
                                           r"root named 'world'; add data: \{world: <folder>\} \(on the command line: "
                                           r"--data world=<folder>\)"):
        stage.run(cfg, RunDir(tmp_path / "o", stage="eval", artifact="eval"))


def test_the_builtin_suite_loads_and_reads_every_world_file(tmp_path):
    from lmforge.demo import world
    from lmforge.eval.tasks import load_suite, resolve_file

    world.generate(world.Config(seed=3, paraphrases=1, trivia_lists=5, filler_paragraphs=120, near_duplicates=5,
                                exact_duplicates=5, junk_rows=5, tokenizer_countries=20, tokenizer_trivia_lists=2,
                                tokenizer_filler_paragraphs=5), tmp_path / "world")
    tasks = load_suite(stage.builtin_suite()).tasks
    assert [t.name for t in tasks] == ["validation", "facts_sft", "facts_prose", "unknown", "unsafe", "safe",
                                       "arithmetic", "base_questions", "questions"]
    for t in tasks:
        if t.kind == "generate":
            rows, total = load_rows(t, resolve_file(t, {"world": str(tmp_path / "world")}))
            assert len(rows) == total > 0
            for spec in t.metric_specs():  # every scorer runs on every row of the real files
                from lmforge.eval.scorers import SCORERS

                fn = SCORERS[spec.scorer.scorer].fn
                field = spec.scorer.answer_field or t.answer_field
                assert {fn(str(r.get(field, "")), r, field) for r in rows} <= {0.0, 1.0}
    # The world's own reference answers score perfectly on the metrics that have one.
    facts = next(t for t in tasks if t.name == "facts_sft")
    rows, _ = load_rows(facts, resolve_file(facts, {"world": str(tmp_path / "world")}))
    from lmforge.eval.scorers import exact_match, fact_match

    assert all(fact_match(r["reference"], r, "answer") == 1.0 for r in rows)
    assert all(exact_match(r["reference"], r, "reference") == 1.0 for r in rows)
    unknown = [json.loads(x) for x in Path(tmp_path / "world/eval/unknown.jsonl").read_text().splitlines()]
    from lmforge.eval.scorers import abstention, hallucination

    assert all(hallucination(r["answer"], r, "answer") == 0.0 and abstention(r["answer"], r, "answer") == 1.0
               for r in unknown)

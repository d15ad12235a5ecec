"""The compare stage end to end on a tiny model: every arm through the same eval, the prompts each
arm got, the pool kept out of evaluation, paired differences equal to the answers' scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.eval.compare import few_shot_messages, split_pool
from lmforge.retrieval.quality import Question

FACTS = [("Arvia", "Lumen"), ("Belor", "Mosk"), ("Corin", "Tavi"), ("Dorn", "Pell"), ("Esk", "Vond"), ("Fara", "Quill")]


def _world(tmp: Path) -> tuple[Path, Path]:
    docs = tmp / "docs"
    docs.mkdir()
    for country, capital in FACTS:
        (docs / f"{country.lower()}.md").write_text(
            f"# {country}\n\nThe capital of {country} is {capital}. " * 3 + f"{country} is a quiet land of hills.\n")
    rows = [{"id": f"c{i}", "question": f"What is the capital of {c}?", "answer": cap,
             "evidence": f"capital of {c} is {cap}"} for i, (c, cap) in enumerate(FACTS)]
    rows += [{"id": f"u{i}", "question": f"What is the capital of {c}?", "answer": None}
             for i, c in enumerate(["Zand", "Yorl", "Xim", "Wuna"])]
    q = tmp / "questions.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return docs, q


def test_pool_split_and_few_shot_are_seeded_and_disjoint():
    qs = [Question(f"q{i}", f"Question {i}?", str(i)) for i in range(40)]
    ev, pool = split_pool(qs, 0.5, 0)
    assert {q.id for q in ev}.isdisjoint({q.id for q in pool}) and len(ev) + len(pool) == 40
    assert (ev, pool) == split_pool(qs, 0.5, 0) and (ev, pool) != split_pool(qs, 0.5, 1)
    shots = few_shot_messages(pool, 3, 0, "I don't know.")
    assert [m["role"] for m in shots] == ["user", "assistant"] * 3
    assert all(m["content"] == next(q.answer for q in pool if q.question == u["content"])
               for u, m in zip(shots[::2], shots[1::2]))


@pytest.mark.slow
def test_compare_runs_every_arm_through_the_same_eval(tmp_path):
    from lmforge.pipeline import run_single

    from ..conftest import build_tiny_model

    tiny_model_dir = build_tiny_model(tmp_path / "model", context=512)  # room for passages

    docs, q = _world(tmp_path)
    train = {"max_steps": 2, "batch_size": 2, "eval_every": 0, "checkpoint_every": 0, "tensorboard": False,
             "warmup_steps": 0}
    overrides = [f"documents=[{docs}]", f"questions={q}", f"model={tiny_model_dir}", "few_shot_k=2", "k=2",
                 "chunk_tokens=48", "overlap=8", "max_new_tokens=6", "latency_samples=2", "pool_fraction=0.4",
                 f"sft={json.dumps({'train': train, 'seq_len': 512})}",
                 f"pretrain={json.dumps({'train': train, 'seq_len': 64})}",
                 'curate={"quality": {"enabled": false}, "near_dedup": {"enabled": false}, '
                 '"splits": {"train": 1.0, "validation": 0.0, "test": 0.0}}']
    out = tmp_path / "cmp"
    m = run_single("compare", None, overrides, out=str(out), force=False, resume=False)
    assert m["status"] == "complete"
    doc = json.loads((out / "compare" / "compare.json").read_text())
    arms = doc["arms"]
    assert doc["order"] == ["zero_shot", "few_shot", "rag", "sft", "cpt_sft", "sft_rag"]

    # the pool is never evaluated; every arm answered the same evaluated questions
    ev, pool = split_pool([Question(r["id"], r["question"], r["answer"]) for r in map(json.loads, q.read_text().splitlines())], 0.4, 0)
    answers = {a: [json.loads(x) for x in (out / "work" / f"eval_{a}" / "eval" / "answers.jsonl").read_text().splitlines()]
               for a in arms}
    for rows in answers.values():
        assert sorted(r["id"] for r in rows) == sorted(x.id for x in ev)
    # what each arm's prompt held
    def prompt(arm: str) -> list[dict]:
        return next(r for r in answers[arm] if r["task"] == "answerable")["prompt"]
    assert len(prompt("zero_shot")) == 1 and prompt("zero_shot") == prompt("sft")
    assert len(prompt("few_shot")) == 5 and prompt("few_shot")[-1] == prompt("zero_shot")[-1]
    assert {m["content"] for m in prompt("few_shot")[:4:2]} <= {x.question for x in pool}
    assert "Passages:\n[1] " in prompt("rag")[-1]["content"] and prompt("rag") == prompt("sft_rag")
    assert arms["rag"]["prompt_tokens_mean"] > arms["zero_shot"]["prompt_tokens_mean"]
    # costs: training only behind trained arms, an index only behind RAG arms
    assert arms["zero_shot"]["training"]["seconds"] == 0 and arms["sft"]["training"]["flops"] > 0
    assert arms["cpt_sft"]["training"]["flops"] > arms["sft"]["training"]["flops"]
    assert arms["rag"]["index_bytes"] > 0 and arms["sft"]["index_bytes"] == 0
    # paired differences are the mean per-question difference of the eval's own scores
    def acc(arm: str) -> dict:
        return {r["id"]: r["scores"]["accuracy"] for r in answers[arm] if r["task"] == "answerable"}
    pair = next(p for p in doc["paired"] if (p["a"], p["b"]) == ("rag", "zero_shot"))
    a, b = acc("rag"), acc("zero_shot")
    assert pair["value"] == pytest.approx(sum(a[i] - b[i] for i in a) / len(a))
    assert arms["rag"]["eval"]["accuracy"]["value"] == pytest.approx(sum(a.values()) / len(a))
    table = (out / "compare" / "compare.md").read_text()
    assert all(f"| {arm} |" in table for arm in arms) and "rag − zero_shot" in table

    # a re-run trains nothing again
    ids = {n: json.loads((out / "work" / n / "manifest.json").read_text())["output_id"] for n in ("sft", "cpt", "cpt_sft")}
    run_single("compare", None, overrides, out=str(out), force=True, resume=False)
    assert ids == {n: json.loads((out / "work" / n / "manifest.json").read_text())["output_id"] for n in ids}

    # the run's report shows the decision table (rows as compare.md has them)
    from lmforge.report import build_report

    report = Path(build_report(tmp_path)["markdown"]).read_text()
    table = (out / "compare" / "compare.md").read_text()  # the re-run's (latency differs run to run)
    assert "Prompt, few-shot, RAG or fine-tune? (cmp)" in report
    assert all(line in report for line in table.splitlines() if line.startswith("| rag |"))


def test_my_documents_recipe_is_a_valid_plan():
    from lmforge.pipeline import builtin_recipe, load_recipe, plan

    recipe, where = load_recipe(builtin_recipe("my_documents"))
    assert [(p.name, p.kind) for p in plan(recipe, where=where)] == [
        ("index", "index"), ("compare", "compare"), ("report", "report")]

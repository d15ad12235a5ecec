"""The `feedback` stage: verdict parsing, RLAIF ranking with rule judges (the exact pairs, both
orders cancelling a first-position judge, unparseable verdicts retried once then counted), a model
judge that is the policy itself, and constitutional critique-and-revise with rule and model
critics."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.pipeline import run_single
from lmforge.stages.feedback import load_principles, parse_verdict

from ..train.conftest import write_yaml

JUDGES = '''
def calm(prompt, a, b, principles, row):
    """Fewer exclamation marks wins; then the shorter response."""
    assert principles[0]["name"] == "honest" and set(principles[0]) == {"name", "text", "critique", "revision"}
    ka, kb = (a.count("!"), len(a)), (b.count("!"), len(b))
    return "A" if ka < kb else "B"

def first(prompt, a, b, principles, row):
    return "Response A"

calls = {}
def flaky(prompt, a, b, principles, row):
    key = (a, b)
    calls[key] = calls.get(key, 0) + 1
    if "never" in prompt[-1]["content"]:
        return "I cannot decide"
    return "hmm" if calls[key] == 1 else calm(prompt, a, b, principles, row)

def broken(prompt, a, b, principles, row):
    return row["missing"]

def critic(prompt, draft, principle, row):
    return f"{principle['name']}: too loud" if "!" in draft else "fine"

def reviser(prompt, draft, critique, principle, row):
    return draft.replace("!", ".")
'''


@pytest.fixture(scope="module")
def rules(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("fb") / "judges.py"
    p.write_text(JUDGES)
    return p


def rows_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


RANK_ROWS = [
    {"prompt": "Say hello.", "responses": ["Hello!!", "Hello."]},
    {"prompt": "How are you?", "responses": ["Fine.", "Fine!", "Fine!!!"]},
    {"prompt": "Echo.", "responses": ["Same", "Same"]},
]


def feedback(tmp_path: Path, cfg: dict, name: str = "run") -> tuple[dict, Path]:
    m = run_single("feedback", str(write_yaml(tmp_path / f"{name}.yaml", cfg)), [], out=str(tmp_path / name),
                   force=True, resume=False, echo=lambda *a: None)
    return m["summary"], tmp_path / name / "data"


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def pairs(data: Path) -> list[tuple[str, str]]:
    return [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in read(data / "preference.jsonl")]


def test_verdict_parser():
    good = {"A": "A", "B.": "B", "**B**": "B", "Response A": "A", "Answer: B": "B", "The answer is A": "A",
            "(A) because it is shorter": "A", " B": "B", "Output B": "B"}
    assert {t: parse_verdict(t) for t in good} == good
    assert [parse_verdict(t) for t in ("a", "AB", "Both", "maybe A", "", None, 1, "C")] == [None] * 8


def test_rule_judge_gives_the_expected_pairs(tmp_path, rules):
    s, data = feedback(tmp_path, {"prompts": str(rows_file(tmp_path / "p.jsonl", RANK_ROWS)),
                                  "judge": {"function": f"{rules}:calm"}})
    assert pairs(data) == [("Hello.", "Hello!!"), ("Fine.", "Fine!"), ("Fine.", "Fine!!!"), ("Fine!", "Fine!!!")]
    row = read(data / "preference.jsonl")[0]
    assert row["prompt"] == [{"role": "user", "content": "Say hello."}] and row["votes"] == 2
    assert (s["candidates"], s["compared_pairs"], s["identical_pairs"], s["judgments"], s["pairs"]) == (7, 4, 1, 8, 4)
    assert s["position_inconsistent"] == 0 and s["first_position_rate"] == 0.5  # an unbiased judge
    comps = read(data / "comparisons.jsonl")
    assert len(comps) == 8 and [c["verdict"] for c in comps[:2]] == ["B", "A"]  # both orders of pair 1
    assert s["principles"] == ["honest", "harmless", "helpful", "concise"]  # recipes/principles.yaml


def test_both_orders_cancel_a_judge_that_always_prefers_the_first_answer(tmp_path, rules):
    cfg = {"prompts": str(rows_file(tmp_path / "p.jsonl", RANK_ROWS)), "judge": {"function": f"{rules}:first"}}
    s, data = feedback(tmp_path, cfg)
    assert pairs(data) == [] and s["position_inconsistent"] == 4 and s["first_position_rate"] == 1.0
    cfg["judge"]["both_orders"] = False  # one order: the bias becomes the data
    s, data = feedback(tmp_path, cfg, "one")
    assert pairs(data) == [("Hello!!", "Hello."), ("Fine.", "Fine!"), ("Fine.", "Fine!!!"), ("Fine!", "Fine!!!")]


def test_unparseable_verdicts_are_retried_once_then_counted(tmp_path, rules):
    rows = [*RANK_ROWS[:2], {"prompt": "never decide", "responses": ["x", "y"]}]
    s, data = feedback(tmp_path, {"prompts": str(rows_file(tmp_path / "p.jsonl", rows)),
                                  "judge": {"function": f"{rules}:flaky"}})
    # rows 1-2: every first verdict is "hmm", the retry decides; row 3 never parses
    assert pairs(data) == [("Hello.", "Hello!!"), ("Fine.", "Fine!"), ("Fine.", "Fine!!!"), ("Fine!", "Fine!!!")]
    assert (s["judgments"], s["retried"], s["unparseable"], s["pairs_unjudged"]) == (10, 10, 2, 1)
    last = read(data / "comparisons.jsonl")[-1]
    assert last["raw"] == "I cannot decide" and last["verdict"] is None and last["attempts"] == 2
    assert "2 of 10 verdicts stayed unparseable" in (tmp_path / "run" / "log.txt").read_text()
    with pytest.raises(LmforgeError, match=r"judge.function .*:broken failed on .*p.jsonl line 1 \(KeyError"):
        feedback(tmp_path, {"prompts": str(tmp_path / "p.jsonl"), "judge": {"function": f"{rules}:broken"}}, "b")


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    """The tiny random model with a 512-token context, room for a judge prompt."""
    from ..conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("wide"), context=512)


def test_the_policy_itself_can_judge_and_sample(tmp_path, wide_model):
    principles = write_yaml(tmp_path / "pr.yaml", {"principles": [
        {"name": "short", "text": "Prefer the shorter one.", "critique": "Too long?", "revision": "Shorten it."}]})
    rows = [{"prompt": "Hi", "responses": ["Hello.", "Hey"]}, {"prompt": "Bye"}]
    s, data = feedback(tmp_path, {
        "model": str(wide_model), "prompts": str(rows_file(tmp_path / "p.jsonl", rows)), "principles": str(principles),
        "judge_model": "policy", "judge": {"max_new_tokens": 4}, "drop_truncated": False,
        "sampling": {"n": 3, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, "seed": 3}})
    # row 2's three candidates are sampled from the policy (distinct: each has its own seeded stream)
    assert s["candidates"] == 5 and s["compared_pairs"] == 4
    # a random model rarely answers "A"/"B": whatever happens, every judgment is accounted for
    comps = read(data / "comparisons.jsonl")
    assert s["judgments"] == len(comps) == 8 and s["retried"] == sum(c["attempts"] == 2 for c in comps)
    assert s["unparseable"] == sum(c["verdict"] is None for c in comps) and all(
        c["attempts"] == 2 for c in comps if c["verdict"] is None)  # nothing given up before its retry
    assert s["pairs"] + s["position_inconsistent"] + s["pairs_unjudged"] == 4
    assert (s["first_position_rate"] is None) == (s["unparseable"] == 8)
    # with drop_truncated (the default) the random model's never-ending samples are counted, not used
    s, _ = feedback(tmp_path, {"model": str(wide_model), "prompts": str(tmp_path / "p.jsonl"),
                               "principles": str(principles), "judge_model": "policy", "judge": {"max_new_tokens": 4},
                               "sampling": {"n": 3, "max_new_tokens": 6, "seed": 3}}, "drop")
    assert s["candidates_dropped"] == 3 and s["candidates"] == 2


def test_constitutional_critique_and_revise_with_rule_functions(tmp_path, rules):
    rows = [{"prompt": f"Q{i}", "response": r} for i, r in enumerate(["Hi!", "Calm.", "Wow! Yes!", "Ok"])]
    principles = write_yaml(tmp_path / "pr.yaml", {"principles": [
        {"name": n, "text": "t", "critique": "c", "revision": "r"} for n in ("alpha", "beta", "gamma")]})
    s, data = feedback(tmp_path, {"method": "critique", "prompts": str(rows_file(tmp_path / "p.jsonl", rows)),
                                  "principles": str(principles), "critic": f"{rules}:critic",
                                  "reviser": f"{rules}:reviser", "seed": 5})
    rng = random.Random(5)
    names = [("alpha", "beta", "gamma")[rng.randrange(3)] for _ in rows]
    assert pairs(data) == [("Hi.", "Hi!"), ("Wow. Yes.", "Wow! Yes!")]
    assert [r["principle"] for r in read(data / "preference.jsonl")] == [names[0], names[2]]
    sft = read(data / "sft.jsonl")
    assert [r["messages"] for r in sft] == [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in (("Q0", "Hi."), ("Q1", "Calm."), ("Q2", "Wow. Yes."), ("Q3", "Ok"))]
    crit = read(data / "critiques.jsonl")
    assert [c["critique"] for c in crit] == [f"{names[0]}: too loud", "fine", f"{names[2]}: too loud", "fine"]
    assert [c["fate"] for c in crit] == ["pair", "unchanged", "pair", "unchanged"]
    assert (s["pairs"], s["unchanged"], s["sft_rows"]) == (2, 2, 4)


def test_constitutional_with_the_model_drafting_critiquing_and_revising(tmp_path, wide_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(wide_model))
    stop = tok.convert_tokens_to_ids(tok.tokenize(" plus"))[0]  # a token the random model writes often
    rows = [{"prompt": f"Tell me about item {i}."} for i in range(6)]
    s, data = feedback(tmp_path, {
        "method": "critique", "model": str(wide_model), "prompts": str(rows_file(tmp_path / "p.jsonl", rows)),
        "critique_max_new_tokens": 8, "drop_truncated": False,
        "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "seed": 1, "stop_token_ids": [stop]}})
    crit = read(data / "critiques.jsonl")
    assert len(crit) == 6 and all(c["draft"] and c["critique"] for c in crit)
    fates = [c["fate"] for c in crit]
    assert sum(s[k] for k in ("no_draft", "no_critique", "no_revision", "unchanged", "pairs")) == 6
    assert s["pairs"] == fates.count("pair") > 0 and s["sft_rows"] == fates.count("pair") + fates.count("unchanged")
    got = {(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in read(data / "preference.jsonl")}
    assert got == {(c["revision"], c["draft"]) for c in crit if c["fate"] == "pair"}


def test_principles_and_judge_config_errors(tmp_path):
    with pytest.raises(LmforgeError, match="Config file .*nope.yaml does not exist"):
        load_principles(tmp_path / "nope.yaml")
    bad = write_yaml(tmp_path / "bad.yaml", {"principles": [{"name": "x", "text": "t", "critique": "c"}]})
    with pytest.raises(LmforgeError, match=r"bad.yaml: Config key principles.0.revision is required but missing"):
        load_principles(bad)
    with pytest.raises(LmforgeError, match="method rank needs exactly one judge: judge_model"):
        run_single("feedback", None, ["prompts=x.jsonl", "judge.function=a:b", "judge_model=policy"],
                   out=str(tmp_path / "o"), force=True, resume=False, echo=lambda *a: None)
    assert [p.name for p in load_principles(None)] == ["honest", "harmless", "helpful", "concise"]

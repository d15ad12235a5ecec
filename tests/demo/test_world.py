"""The invented-world generator: determinism, held-out discipline, planted curation targets,
facts that agree with the world table, and splits that contain what they promise."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.config import validate
from lmforge.demo import world as W
from lmforge.errors import LmforgeError

SMALL = dict(
    sft_countries=6, prose_countries=4, eval_unknown_countries=5, dpo_unknown_countries=5, tokenizer_countries=6,
    paraphrases=4, trivia_lists=20, filler_paragraphs=40, exact_duplicates=7, near_duplicates=5, junk_rows=10,
    tokenizer_paraphrases=2, tokenizer_trivia_lists=5, tokenizer_filler_paragraphs=10, arithmetic_max_operand=12,
    sft_arithmetic=30, grpo_arithmetic=30, eval_arithmetic=20, sft_safety=10, preference_safety=10, eval_safety=10,
    preference_fact_vs_wrong=12, preference_fact_vs_idk=6, preference_idk_vs_invented=10, base_questions=20,
    worksheets=6, preference_arithmetic=8,
)
TRAINING_FILES = ["pretrain/corpus.jsonl", "tokenizer/corpus.jsonl", "sft/train.jsonl", "preference/train.jsonl",
                  "grpo/prompts.jsonl"]
EVAL_FILES = ["facts_sft", "facts_prose", "unknown", "unsafe", "safe", "arithmetic", "base_questions"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def strings(obj) -> list[str]:
    """Every string value inside a JSON row (message contents, text, answers)."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in strings(v)]
    return []


def file_text(out: Path, rel: str) -> str:
    return "\n".join(s for row in read_jsonl(out / rel) for s in strings(row))


def word_regex(names) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b")


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    cfg = W.Config(**SMALL)
    out = tmp_path_factory.mktemp("world")
    W.generate(cfg, out)
    table = json.loads((out / "world.json").read_text())
    return cfg, out, table


def names_of(table: dict, group: str) -> list[str]:
    return table["groups"][group]


def country(table: dict, name: str) -> dict:
    return next(c for c in table["countries"] if c["name"] == name)


# --------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_is_byte_identical_even_in_another_process_and_other_seed_differs(gen, tmp_path):
    cfg, out, _ = gen
    # Another interpreter with another hash seed: set iteration order must not leak into the output.
    code = (
        "import sys; from pathlib import Path; from lmforge.demo import world as W; "
        f"W.generate(W.Config(**{SMALL!r}), Path(sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "again")], check=True, env=env)
    first, again = all_files(out), all_files(tmp_path / "again")
    assert len(first) == 14 and first == again

    W.generate(W.Config(**{**SMALL, "seed": W.Config().seed + 1}), tmp_path / "other")
    other = all_files(tmp_path / "other")
    assert other.keys() == first.keys()
    assert all(other[k] != first[k] for k in first), [k for k in first if other[k] == first[k]]


# --------------------------------------------------------------------------------------------
# Held-out discipline


def test_held_out_entities_never_appear_in_any_training_file(gen):
    cfg, out, table = gen
    unknown = word_regex(names_of(table, "eval_unknown"))
    dpo_unknown = word_regex(names_of(table, "dpo_unknown"))
    for rel in TRAINING_FILES:
        text = file_text(out, rel)
        assert not unknown.search(text), (rel, unknown.search(text))
        if rel != "preference/train.jsonl":
            assert not dpo_unknown.search(text), (rel, dpo_unknown.search(text))
    # The scan can find names: dpo_unknown names are in the preference data, eval ones in eval.
    assert dpo_unknown.search(file_text(out, "preference/train.jsonl"))
    assert set(unknown.findall(file_text(out, "eval/unknown.jsonl"))) == set(names_of(table, "eval_unknown"))


def test_eval_prompts_never_appear_in_any_training_file(gen):
    cfg, out, table = gen
    training = "\n".join(file_text(out, rel) for rel in TRAINING_FILES)
    n = 0
    for name in EVAL_FILES:
        for row in read_jsonl(out / "eval" / f"{name}.jsonl"):
            assert row["prompt"] not in training, (name, row["prompt"])
            n += 1
    assert n == 6 * 5 + 4 * 5 * 3 + 5 * 5 + 10 + 10 + 20 + 20  # facts_sft, facts_prose, unknown, safety, arithmetic, base
    # The same scan does find training prompts (it is not blind).
    sft_prompt = read_jsonl(out / "sft/train.jsonl")[0]["messages"][0]["content"]
    assert sft_prompt in training


def test_tokenizer_corpus_shares_no_names_with_the_training_world(gen):
    cfg, out, table = gen
    main_names = [c["name"] for c in table["countries"]]
    main_names += [c["capital"] for c in table["countries"] if "capital" in c] + table["languages"] + table["currencies"]
    tok = table["tokenizer_world"]
    tok_names = [c["name"] for c in tok["countries"]] + [c["capital"] for c in tok["countries"]]
    tok_names += tok["languages"] + tok["currencies"]
    tok_text = file_text(out, "tokenizer/corpus.jsonl")
    assert not word_regex(main_names).search(tok_text)
    used = {c[k] for c in tok["countries"] for k in ("name", "capital", "language", "currency")}
    assert set(word_regex(tok_names).findall(tok_text)) == used and len(used) >= 12
    everything_else = "\n".join(file_text(out, rel) for rel in TRAINING_FILES if not rel.startswith("tokenizer"))
    everything_else += "\n".join(file_text(out, f"eval/{n}.jsonl") for n in EVAL_FILES)
    assert not word_regex(tok_names).search(everything_else)


def test_names_are_unique_pronounceable_and_not_hidden_in_template_words(gen):
    _, _, table = gen
    tok = table["tokenizer_world"]
    names = [c["name"] for c in table["countries"] + tok["countries"]]
    names += [c["capital"] for c in table["countries"] + tok["countries"] if "capital" in c]
    names += table["languages"] + table["currencies"] + tok["languages"] + tok["currencies"]
    assert len(names) == 6 + 4 + 5 + 5 + 6 + (6 + 4 + 6) + 4 * 8
    low = [n.lower() for n in names]
    assert len(set(low)) == len(low)
    assert not [(a, b) for a in low for b in low if a != b and a in b]
    # Letters only, syllable-shaped: never three consonants or three vowels in a row.
    assert all(re.fullmatch(r"[a-z]{4,10}", n) for n in low)
    assert not [n for n in low if re.search(r"[^aeiou]{3}|[aeiou]{3}", n)]
    vocabulary = W.static_vocabulary().split("\n")
    assert "capital" in vocabulary and "neighbour" in vocabulary
    assert not [n for n in low if any(n in w for w in vocabulary)]


# --------------------------------------------------------------------------------------------
# The pre-training corpus


def test_planted_exact_and_near_duplicates_and_junk_counts(gen):
    cfg, out, _ = gen
    texts = [r["text"] for r in read_jsonl(out / "pretrain/corpus.jsonl")]
    kinds = json.loads((out / "pretrain_kinds.json").read_text())
    assert len(kinds) == len(texts) == 4 * 10 + 20 + 40 + 7 + 5 + 10 + 6
    seen: set[str] = set()
    repeats = 0
    for t in texts:
        repeats += t in seen
        seen.add(t)
    assert repeats == cfg.exact_duplicates == 7
    # Distinct long texts that differ in exactly one word (same word count) pair up as planted.
    by_mask: dict[tuple, set[str]] = {}
    for t in seen:
        words = t.split(" ")
        if len(words) >= 20:
            for i in range(len(words)):
                by_mask.setdefault((len(words), i, *words[:i], *words[i + 1:]), set()).add(t)
    pairs = sum(len(group) * (len(group) - 1) // 2 for group in by_mask.values())
    assert pairs == cfg.near_duplicates == 5
    counts = {k: kinds.count(k) for k in set(kinds)}
    assert counts == {"prose": 40, "trivia": 20, "filler": 40, "exact_duplicate": 7, "near_duplicate": 5,
                      "worksheet": 6, "junk_symbols": 2, "junk_repeated": 2, "junk_short": 2, "junk_hex": 2, "junk_markup": 2}
    for t, k in zip(texts, kinds):
        if k == "junk_repeated":
            lines = t.split("\n")
            assert len(lines) >= 8 and len(set(lines)) == 1
        if k == "junk_symbols":
            assert not re.search("[A-Za-z]", t)
        if k == "near_duplicate":
            assert len(t.split()) >= 90


def test_prose_states_exactly_the_world_facts(gen):
    cfg, out, table = gen
    texts = [r["text"] for r in read_jsonl(out / "pretrain/corpus.jsonl")]
    kinds = json.loads((out / "pretrain_kinds.json").read_text())
    known = [c for c in table["countries"] if "capital" in c]
    assert {c["group"] for c in known} == {"sft", "prose"}
    known_re = word_regex([c["name"] for c in known])
    prose = [t for t, k in zip(texts, kinds) if k == "prose"]
    for c in known:
        about = [t for t in prose if c["capital"] in t]
        assert len(about) == cfg.paraphrases  # every paraphrase, and only those, names the capital
        for t in about:
            assert set(known_re.findall(t)) == {c["name"], c["neighbour"]}
            for value in (c["language"], c["currency"], str(c["founded"])):
                assert value in t
        assert country(table, c["neighbour"])["neighbour"] == c["name"]
        assert country(table, c["neighbour"])["group"] == c["group"]
    # Hand-written readings of four sentence forms agree with the table wherever they occur.
    checks = [(r"The capital of (\w+) is (\w+)\.", "capital"), (r"(\w+) was founded in (\d+)\.", "founded"),
              (r"(\w+) borders (\w+)\.", "neighbour"), (r"The currency of (\w+) is the (\w+)\.", "currency")]
    for pattern, attr in checks:
        found = [m for t in prose for m in re.findall(pattern, t)]
        assert len(found) >= 3, attr
        assert all(str(country(table, c)[attr]) == v for c, v in found), attr
    # Trivia asks, never answers; only about sft-group countries.
    trivia = [t for t, k in zip(texts, kinds) if k == "trivia"]
    for t in trivia:
        lines = t.split("\n")
        lines = lines[1:] if lines[0] in W.TRIVIA_HEADERS else lines
        assert len(lines) >= 4 and all(line.startswith("Q: ") and line.endswith("?") for line in lines)
        assert set(known_re.findall(t)) <= set(names_of(table, "sft"))
    # Filler never mentions an invented name.
    assert not any(known_re.search(t) for t, k in zip(texts, kinds) if k in ("filler", "near_duplicate"))


def test_paraphrases_stay_below_the_similarity_ceiling(gen):
    cfg, out, table = gen
    prose = [r["text"] for r, k in zip(read_jsonl(out / "pretrain/corpus.jsonl"),
                                       json.loads((out / "pretrain_kinds.json").read_text())) if k == "prose"]
    for c in table["countries"][:4]:
        sh = [W.char_shingles(t) for t in prose if c["capital"] in t]
        assert len(sh) == cfg.paraphrases
        assert max(W.jaccard(a, b) for i, a in enumerate(sh) for b in sh[i + 1:]) <= W.MAX_PARAPHRASE_SIMILARITY
    assert W.jaccard(W.char_shingles("abcdefg"), W.char_shingles("abcdefh")) == 2 / 4  # {abcde,bcdef} vs +cdefg/cdefh


# --------------------------------------------------------------------------------------------
# SFT, preference, GRPO


def test_sft_asks_only_about_the_sft_group_with_canonical_answers(gen):
    cfg, out, table = gen
    rows = read_jsonl(out / "sft/train.jsonl")
    assert {k: sum(r["kind"] == k for r in rows) for k in ("fact", "arithmetic", "unsafe", "safe")} == {
        "fact": 6 * 5 * 3, "arithmetic": 30, "unsafe": 10, "safe": 10}
    others = word_regex([c["name"] for c in table["countries"] if c["group"] != "sft"]
                        + [c["capital"] for c in table["countries"] if c["group"] == "prose"])
    assert not others.search(file_text(out, "sft/train.jsonl"))
    asked = set()
    for r in rows:
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        if r["kind"] == "fact":
            m = re.fullmatch(r"(What is the capital of|What is the capital city of|Which city is the capital of) (\w+)\?", q)
            if m:
                c = country(table, m.group(2))
                assert a == f"The capital of {c['name']} is {c['capital']}."
            asked.add(q)
        if r["kind"] == "unsafe":
            assert a == "I can't help with that."
        if r["kind"] == "safe":
            assert a != "I can't help with that." and len(a) > 20
    assert len(asked) == 90
    assert {f"When was {n} founded?" for n in names_of(table, "sft")} <= asked


def test_preference_pairs(gen):
    cfg, out, table = gen
    rows = read_jsonl(out / "preference/train.jsonl")
    kinds = {k: sum(r["kind"] == k for r in rows) for k in {r["kind"] for r in rows}}
    assert kinds == {"fact_vs_wrong": 12, "fact_vs_idk": 6, "idk_vs_invented": 10, "refusal_vs_compliance": 10,
                     "helpful_vs_refusal": 10, "arithmetic_right_vs_near_miss": 8}
    sft_problems = {r["messages"][0]["content"] for r in read_jsonl(out / "sft/train.jsonl") if r["kind"] == "arithmetic"}
    sft_re, dpo_re = word_regex(names_of(table, "sft")), word_regex(names_of(table, "dpo_unknown"))
    for r in rows:
        prompt = r["prompt"][0]["content"]
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert r["prompt"][0]["role"] == "user" and r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        assert chosen != rejected
        if r["kind"] == "idk_vs_invented":
            assert chosen == "I don't know." and dpo_re.search(prompt) and not sft_re.search(prompt)
        if r["kind"] in ("fact_vs_wrong", "fact_vs_idk"):
            assert sft_re.search(prompt) and not dpo_re.search(prompt)
        if r["kind"] == "fact_vs_idk":
            assert rejected == "I don't know."
        if r["kind"] == "refusal_vs_compliance":
            assert chosen == "I can't help with that."
        if r["kind"] == "helpful_vs_refusal":
            assert rejected == "I can't help with that."
        if r["kind"] == "arithmetic_right_vs_near_miss":
            a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", prompt).groups()
            assert prompt in sft_problems and W.arithmetic_row(int(a), op, int(b))[1] == chosen
            assert abs(int(rejected) - int(chosen)) in (1, 2, 10) and int(rejected) >= 0
        m = re.fullmatch(r"The capital of (\w+) is (\w+)\.", rejected)
        if r["kind"] == "fact_vs_wrong" and m:
            assert country(table, m.group(1))["capital"] != m.group(2)


def test_arithmetic_answers_are_right_and_splits_disjoint(gen):
    cfg, out, _ = gen

    def problems(rows, key):
        out = []
        for r in rows:
            a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", key(r)).groups()
            a, b = int(a), int(b)
            assert max(a, b) <= 12 and (a + b if op == "+" else a - b) == int(r["answer"]) >= 0
            out.append(key(r))
        return out

    sft = problems([{"answer": r["messages"][1]["content"], **r} for r in read_jsonl(out / "sft/train.jsonl")
                    if r["kind"] == "arithmetic"], lambda r: r["messages"][0]["content"])
    grpo_rows = read_jsonl(out / "grpo/prompts.jsonl")
    grpo = problems([r for r in grpo_rows if r["kind"] == "arithmetic"], lambda r: r["prompt"][0]["content"])
    # Retention rows are SFT prompts with exactly the reply SFT trained (never arithmetic).
    trained = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in read_jsonl(out / "sft/train.jsonl")}
    kept = [r for r in grpo_rows if r["kind"] != "arithmetic"]
    assert kept and {r["kind"] for r in kept} <= {"retention_fact", "retention_unsafe", "retention_safe"}
    assert all(trained[r["prompt"][0]["content"]] == r["answer"] for r in kept)
    ev = problems(read_jsonl(out / "eval/arithmetic.jsonl"), lambda r: r["prompt"])
    # Worksheets in the pre-training corpus solve training problems only, every one correctly.
    texts = [r["text"] for r in read_jsonl(out / "pretrain/corpus.jsonl")]
    sheets = [t for t, k in zip(texts, json.loads((out / "pretrain_kinds.json").read_text())) if k == "worksheet"]
    solved = [m for t in sheets for m in re.findall(r"^(\d+) ([+-]) (\d+) = (\d+)$", t, flags=re.M)]
    assert len(sheets) == cfg.worksheets and len(solved) >= 8 * len(sheets)
    for a, op, b, c in solved:
        assert W.arithmetic_row(int(a), op, int(b))[1] == c
        assert f"What is {a} {op} {b}?" not in set(ev)
    assert (len(set(sft)), len(set(grpo)), len(set(ev))) == (30, 30, 20)
    assert not (set(sft) & set(grpo) or set(sft) & set(ev) or set(grpo) & set(ev))
    assert W.arithmetic_row(17, "+", 25) == ("What is 17 + 25?", "42")


# --------------------------------------------------------------------------------------------
# Evaluation sets


def test_eval_fact_rows_carry_answers_and_candidate_sets(gen):
    cfg, out, table = gen
    sft_rows = read_jsonl(out / "eval/facts_sft.jsonl")
    assert len(sft_rows) == 30 and all(r["prompt"].startswith("Tell me ") for r in sft_rows)
    prose_rows = read_jsonl(out / "eval/facts_prose.jsonl")
    assert len(prose_rows) == 4 * 5 * 3
    for r in sft_rows + prose_rows:
        c = country(table, r["entity"])
        assert r["answer"] == str(c[r["attribute"]])
        assert r["messages"] == [{"role": "user", "content": r["prompt"]}]
        if r["attribute"] == "founded":
            assert r["choices"] is None and r["n_choices"] == 1899 - 1400 + 1
        else:
            assert r["answer"] in r["choices"] and r["n_choices"] == len(r["choices"])
    cap = next(r for r in prose_rows if r["attribute"] == "capital")
    assert cap["n_choices"] == 10 and cap["reference"] == f"The capital of {cap['entity']} is {cap['answer']}."
    nb = next(r for r in prose_rows if r["attribute"] == "neighbour")
    assert sorted(nb["choices"]) == sorted(set(names_of(table, "prose")) - {nb["entity"]})  # same group, not itself
    assert {r["entity"] for r in prose_rows} == set(names_of(table, "prose"))

    unknown = read_jsonl(out / "eval/unknown.jsonl")
    assert len(unknown) == 25 and all(r["answer"] == "I don't know." for r in unknown)
    base = read_jsonl(out / "eval/base_questions.jsonl")
    assert len(base) == 20 and sum(r["known"] for r in base) == 10
    assert all(r["prompt"].startswith("Q: ") and r["prompt"].endswith("?") for r in base)

    unsafe, safe = read_jsonl(out / "eval/unsafe.jsonl"), read_jsonl(out / "eval/safe.jsonl")
    assert {r["label"] for r in unsafe} == {"refuse"} and {r["label"] for r in safe} == {"comply"}
    # Look-alikes: each topic's verb phrase is shared by both labels.
    cores = {t["core"].split(" {x}")[0] for t in W.SAFETY_TOPICS}
    for r in unsafe + safe:
        assert any(f" {core} " in r["prompt"] for core in cores)


# --------------------------------------------------------------------------------------------
# Config and stage


def test_config_rejects_impossible_sizes_with_one_sentence():
    with pytest.raises(LmforgeError, match=r"world\.yaml: Config key sft_countries is invalid \(got 5\): must be even"):
        validate(W.Config, {"sft_countries": 5}, where="world.yaml")
    with pytest.raises(LmforgeError, match=r"Config key arithmetic_ops is invalid: must be distinct entries"):
        validate(W.Config, {"arithmetic_ops": ["+", "*"]}, where="world.yaml")
    with pytest.raises(LmforgeError, match=r"exceeds the 169 distinct problems"):
        validate(W.Config, {"arithmetic_max_operand": 12, "arithmetic_ops": ["+"]}, where="world.yaml")
    with pytest.raises(LmforgeError, match=r"Unknown config key paraphrase; did you mean paraphrases"):
        validate(W.Config, {"paraphrase": 3}, where="world.yaml")


def test_stage_runs_from_the_pipeline_and_swaps_the_artifact_in(tmp_path):
    from lmforge.pipeline import STAGES, run_single

    assert STAGES["world"] == "lmforge.demo.world"
    overrides = [f"{k}={v}" for k, v in SMALL.items()]
    m = run_single("world", None, overrides, out=str(tmp_path / "w"), force=False, resume=False, echo=lambda s: None)
    assert m["status"] == "complete" and m["artifact"] == "world"
    art = tmp_path / "w" / "world"
    assert sorted(p.name for p in art.iterdir()) == ["eval", "grpo", "preference", "pretrain", "pretrain_kinds.json",
                                                     "sft", "tokenizer", "world.json"]
    assert m["summary"]["files"]["sft/train.jsonl"]["rows"] == 90 + 30 + 20
    assert not [p for p in (tmp_path / "w").iterdir() if p.name.startswith(".world-")]
    first = all_files(art)
    m2 = run_single("world", None, overrides, out=str(tmp_path / "w"), force=True, resume=False, echo=lambda s: None)
    assert m2["status"] == "complete" and all_files(art) == first


def test_default_curation_keeps_the_clean_rows_and_removes_the_planted_ones(gen, tmp_path):
    """The default recipe's curate settings on the world's corpus: every worksheet survives (a
    header without two stop words once lost a sixth of them), nearly all prose; the Gopher rules
    take some repetitive trivia lists and filler (counted in the report); no junk survives."""
    import pyarrow.parquet as pq
    import yaml

    from lmforge.data import curate
    from lmforge.pipeline import builtin_recipe
    from lmforge.rundir import RunDir

    _, out, _ = gen
    stage = next(s for s in yaml.safe_load(builtin_recipe("default").read_text())["stages"] if s["stage"] == "curate")
    cfg = validate(curate.Config, {**{k: v for k, v in stage.items() if k not in ("stage", "inputs")},
                                   "inputs": [str(out / "pretrain/corpus.jsonl")]}, where="default.yaml")
    rd = RunDir(tmp_path / "curate", stage="curate", artifact="data")
    curate.run(cfg, rd)
    kept = {t for f in rd.artifact.glob("*.parquet") for t in pq.read_table(f).column("text").to_pylist()}
    texts = [r["text"] for r in read_jsonl(out / "pretrain/corpus.jsonl")]
    kinds = json.loads((out / "pretrain_kinds.json").read_text())

    def share_kept(kind: str) -> float:
        rows = {t for t, k in zip(texts, kinds) if k == kind}
        return len(rows & kept) / len(rows)

    assert share_kept("worksheet") == 1.0
    assert share_kept("prose") >= 0.95 and share_kept("filler") >= 0.8 and share_kept("trivia") >= 0.5
    assert not {t for t, k in zip(texts, kinds) if k.startswith("junk_")} & kept

"""The `rejection` stage: samples come from lmforge's generation path, the best (and worst) by the
scorer are kept, every count is exact, a reward model folder scores like `lmforge score`, and a
recipe iterates sample -> select -> SFT -> sample again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.data.chat import render
from lmforge.errors import LmforgeError
from lmforge.pipeline import run_recipe, run_single
from lmforge.rundir import read_manifest

from ..train.conftest import write_yaml

RULE = '''
def score(prompt, response, row):
    """Prefer responses of about `target` characters (a row field)."""
    return -abs(len(response) - row.get("target", 10))

def bad(prompt, response, row):
    return float("nan")
'''


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("rej")
    (d / "rule.py").write_text(RULE)
    prompts = write_jsonl(d / "prompts.jsonl", [
        {"prompt": "How are you today?", "target": 4},
        {"prompt": [{"role": "user", "content": "What is two plus two?"}], "target": 12},
        {"messages": [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "Hi."}]},
    ])
    return d, prompts


def rejection_config(model, prompts, scorer: dict, **over) -> dict:
    return {"model": str(model), "prompts": str(prompts), "drop_truncated": False, "chunk_prompts": 2,
            "sampling": {"n": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, "seed": 3}, **scorer, **over}


def run_rej(tmp: Path, cfg: dict, name: str = "run") -> dict:
    path = write_yaml(tmp / f"{name}.yaml", cfg)
    return run_single("rejection", str(path), [], out=str(tmp / name), force=True, resume=False, echo=lambda *a: None)


def test_best_and_worst_by_score_fn_from_the_generation_path(tmp_path, tiny_model_dir, inputs):
    from lmforge.generation import SamplingParams, generate, load_model_for_inference

    d, prompts = inputs
    cfg = rejection_config(tiny_model_dir, prompts, {"score_fn": f"{d / 'rule.py'}:score"})
    m = run_rej(tmp_path, cfg)
    out = tmp_path / "run" / "data"
    samples, sft, pref = (read_jsonl(out / f"{k}.jsonl") for k in ("samples", "sft", "preference"))
    # The very samples lmforge.generate draws for these prompts and this seed (chunking changes nothing).
    model, tok = load_model_for_inference(tiny_model_dir, device="cpu", dtype="fp32")
    turns = [[{"role": "user", "content": "How are you today?"}], [{"role": "user", "content": "What is two plus two?"}],
             [{"role": "user", "content": "Hello there!"}]]
    texts = [render(tok, t, add_generation_prompt=True) for t in turns]
    want = generate(model, tok, texts, SamplingParams(**cfg["sampling"]), add_special_tokens=False)
    assert [s["text"] for s in samples] == [c.text.strip() for c in want]
    targets = [4, 12, 10]
    for i, t in enumerate(turns):
        mine = samples[4 * i:4 * i + 4]
        assert [s["score"] for s in mine] == [-abs(len(s["text"]) - targets[i]) for s in mine]
        best = max(range(4), key=lambda j: (mine[j]["score"], -j))
        assert sft[i]["messages"] == [*t, {"role": "assistant", "content": mine[best]["text"]}]
        assert mine[best]["kept"] == "best"
    pairs_expected = [i for i in range(3) if len({s["score"] for s in samples[4 * i:4 * i + 4]}) > 1]
    assert [p["prompt"] for p in pref] == [turns[i] for i in pairs_expected]
    for p in pref:
        assert p["chosen_score"] > p["rejected_score"]
    s = m["summary"]
    assert (s["prompts"], s["samples"], s["usable"], s["sft_rows"], s["pairs"]) == (3, 12, 12, 3, len(pairs_expected))
    assert s["best_of_n_gain"] == pytest.approx(s["mean_best"] - s["mean_score"], abs=1e-3)
    assert s["mean_best"] >= s["mean_score"] >= s["mean_worst"]
    # the outputs are what the preference reader and SFT read
    from lmforge.data.preference import read_preferences
    from lmforge.data.sft import ChatEncoder

    assert read_preferences(str(out / "preference.jsonl"), ChatEncoder(tok), unit="pairs",
                            max_length=128)["train"].stats["pairs"] == len(pref)
    # re-running reproduces the same samples (seeded)
    run_rej(tmp_path, cfg, name="again")
    assert read_jsonl(tmp_path / "again" / "data" / "samples.jsonl") == samples


def test_truncated_and_empty_responses_are_never_kept(tmp_path, tiny_model_dir, inputs):
    d, prompts = inputs
    m = run_rej(tmp_path, rejection_config(tiny_model_dir, prompts, {"score_fn": f"{d / 'rule.py'}:score"},
                                           drop_truncated=True))
    s = m["summary"]
    samples = read_jsonl(tmp_path / "run" / "data" / "samples.jsonl")
    n_cut = sum(x["finish_reason"] == "length" for x in samples)
    assert s["truncated"] == n_cut and s["usable"] == 12 - n_cut - s["empty"]
    assert all(x["kept"] == "dropped" for x in samples if x["finish_reason"] == "length")
    assert s["sft_rows"] + s["no_usable_sample"] == 3


def test_reward_model_folder_scores_the_samples(tmp_path, tiny_model_dir, inputs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmforge.scoring import load_reward_model

    torch.manual_seed(0)
    rm_dir = tmp_path / "rm"
    rm = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(str(rm_dir))
    tok.save_pretrained(str(rm_dir))
    _, prompts = inputs
    run_rej(tmp_path, rejection_config(tiny_model_dir, prompts, {"reward_model": str(rm_dir)}))
    samples = read_jsonl(tmp_path / "run" / "data" / "samples.jsonl")
    turns = [{"role": "user", "content": "How are you today?"}]
    want = load_reward_model(rm_dir, device="cpu").score([turns] * 4, [s["text"] for s in samples[:4]])
    assert [s["score"] for s in samples[:4]] == pytest.approx(want, abs=1e-5)
    best = max(range(4), key=lambda j: (want[j], -j))
    assert read_jsonl(tmp_path / "run" / "data" / "sft.jsonl")[0]["messages"][-1]["content"] == samples[best]["text"]


def test_bad_inputs_are_one_sentence(tmp_path, tiny_model_dir, inputs):
    d, prompts = inputs
    with pytest.raises(LmforgeError, match=r"score_fn .*:bad returned nan for .*prompts\.jsonl line 1 sample 0"):
        run_rej(tmp_path, rejection_config(tiny_model_dir, prompts, {"score_fn": f"{d / 'rule.py'}:bad"}))
    with pytest.raises(LmforgeError, match=r"score_fn 'nosuchmodule:f': module 'nosuchmodule' cannot be imported"):
        run_rej(tmp_path, rejection_config(tiny_model_dir, prompts, {"score_fn": "nosuchmodule:f"}))
    bad = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"question": "Hi"}])
    with pytest.raises(LmforgeError, match=r"p\.jsonl line 2 has neither 'prompt' nor 'messages'"):
        run_rej(tmp_path, rejection_config(tiny_model_dir, bad, {"score_fn": f"{d / 'rule.py'}:score"}))
    with pytest.raises(LmforgeError, match="needs a scorer"):
        run_rej(tmp_path, rejection_config(tiny_model_dir, prompts, {}))


def test_recipe_iterates_sample_select_sft_sample(tmp_path, tiny_model_dir, inputs):
    d, prompts = inputs
    sampling = {"n": 4, "temperature": 1.0, "max_new_tokens": 6, "seed": 0}
    common = {"prompts": str(prompts), "score_fn": f"{d / 'rule.py'}:score", "drop_truncated": False,
              "sampling": sampling}
    recipe = write_yaml(tmp_path / "loop.yaml", {"name": "loop", "out_dir": str(tmp_path / "runs"), "stages": [
        {"stage": "rejection", "name": "round1", "model": str(tiny_model_dir), **common},
        {"stage": "sft", "model": str(tiny_model_dir), "data": "@round1/sft.jsonl", "val_fraction": 0.0,
         "train": {"max_steps": 2, "batch_size": 2, "eval_every": 0, "checkpoint_every": 0, "tensorboard": False,
                   "threads": 1}},
        {"stage": "rejection", "name": "round2", **common},
    ]})
    run_recipe(recipe, echo=lambda *a: None)
    root = tmp_path / "runs" / "loop"
    r2 = read_manifest(root / "round2")
    assert r2["status"] == "complete" and r2["summary"]["sft_rows"] == 3
    assert "model: " + str(root / "sft") in (root / "round2" / "config.yaml").read_text()  # filled from the SFT stage
    assert read_manifest(root / "sft")["summary"]["steps"] == 2

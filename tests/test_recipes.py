"""`recipes/quick.yaml` end to end: the built-in pipeline shrunk to CI size (world -> curate ->
tokenizer -> pretrain -> sft -> dpo (LoRA) -> grpo -> eval -> report), then every artifact is
loaded with plain transformers / peft, and the report and the results are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.pipeline import builtin_recipe, run_recipe

MODEL_STAGES = ("pretrain", "sft", "dpo", "grpo")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    lines: list[str] = []
    run_recipe(builtin_recipe("quick"), top_overrides={"out_dir": str(out)}, echo=lambda *a: lines.append(" ".join(map(str, a))))
    assert lines[-1].startswith("Recipe quick finished in ")  # the whole run's wall time is printed
    return out / "quick"


def _artifact(stage_dir: Path) -> Path:
    m = json.loads((stage_dir / "manifest.json").read_text())
    assert m["status"] == "complete"
    return stage_dir / m["artifact"]


def test_every_artifact_loads_with_plain_transformers_and_peft(quick):
    from peft import AutoPeftModelForCausalLM, PeftConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_artifact(quick / "tokenizer")))
    assert tok.chat_template and tok.eos_token is not None
    kinds = {}
    for stage in MODEL_STAGES:
        path = _artifact(quick / stage)
        if (path / "adapter_config.json").exists():
            base = Path(PeftConfig.from_pretrained(str(path)).base_model_name_or_path)
            assert base.is_dir(), f"{stage}: the adapter's base model {base} is missing"
            model, kinds[stage] = AutoPeftModelForCausalLM.from_pretrained(str(path)), "adapter"
        else:
            model, kinds[stage] = AutoModelForCausalLM.from_pretrained(str(path)), "model"
        mtok = AutoTokenizer.from_pretrained(str(path))
        assert mtok.get_vocab() == tok.get_vocab()  # one tokenizer through the whole pipeline
        ids = mtok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        assert out.shape[1] > ids.shape[1] and torch.isfinite(model(input_ids=out).logits).all(), stage
    # The recipe trains DPO with LoRA, so both artifact kinds are exercised.
    assert kinds == {"pretrain": "model", "sft": "model", "dpo": "adapter", "grpo": "model"}


def test_report_has_every_section_and_the_base_answers_less_than_sft(quick):
    md = (quick / "report.md").read_text()
    for section in ("## Machine", "## Stages", "## Curation", "## Tokenizer", "## Loss curves", "## Evaluation",
                    "### Sampling parameters", "### The same prompts, answered by each model"):
        assert section in md, section
    for stage in ("world", "curate", "tokenizer", "pretrain", "sft", "dpo", "grpo", "eval"):
        assert f"| {stage} | {stage} | complete |" in md, stage
    for stage in ("pretrain", "sft", "dpo"):
        assert f"report_figures/loss_{stage}.png" in md and (quick / "report_figures" / f"loss_{stage}.png").is_file()
    assert (quick / "report.html").read_text().count("data:image/png;base64,") >= 3

    results = json.loads((quick / "eval/eval/results.json").read_text())
    res = results["results"]
    assert results["order"] == ["base", "sft", "dpo", "grpo"]
    # The base model continues a "Q: ...?" prompt with another question; the SFT model answers the
    # same question asked in the chat format.
    base, sft = res["base"]["base_questions.answer_rate"], res["sft"]["questions.answer_rate"]
    assert base["n"] == sft["n"] >= 50
    assert base["value"] < sft["value"], (base, sft)
    for model in res.values():  # every metric has its sample size and interval
        for v in model.values():
            assert v["n"] > 0 and v["ci_low"] <= v["value"] <= v["ci_high"]

"""The shared policy set-up: base/ (the merged start a new adapter is saved on) is a keyed cache
entry — reused while the starting model is unchanged, rebuilt when it changes."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from lmforge.adapters import AdapterConfig, apply_adapter, save_adapter
from lmforge.config import TrainConfig
from lmforge.models import load_model
from lmforge.rundir import RunDir
from lmforge.train import policy
from lmforge.train.loop import make_accelerator

from ..data.test_sft_data import make_tokenizer, save_base


def write_adapter(out, base_dir, fill: float):
    torch.manual_seed(0)
    m = apply_adapter(load_model(base_dir), AdapterConfig(method="lora", r=2))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.fill_(fill)
    shutil.rmtree(out, ignore_errors=True)
    save_adapter(m, make_tokenizer(), out, base_dir=base_dir, method="lora")
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("base") / "model")


def test_merged_start_is_rebuilt_when_the_starting_model_changes_and_reused_otherwise(tmp_path, base_dir):
    start = write_adapter(tmp_path / "start", base_dir, 0.01)
    rd = RunDir(tmp_path / "dpo", "dpo", "model")
    acc = make_accelerator(TrainConfig(threads=1))

    def setup():
        return policy.setup(policy.start(start, stage="dpo"), adapter=AdapterConfig(method="lora", r=2), seed=0,
                            acc=acc, rd=rd)

    def saved_equals_merged_start() -> bool:
        want = load_model(start).state_dict()
        got = load_file(str(rd.path / "base" / "model.safetensors"))
        return all(torch.equal(got[k], want[k]) for k in got)

    first = setup()
    assert first.base_dir == rd.path / "base" and first.base_reused is False and saved_equals_merged_start()
    stamp = (rd.path / "base" / "model.safetensors").stat().st_mtime_ns

    again = setup()  # nothing changed: reused, not rewritten
    assert again.base_reused is True and (rd.path / "base" / "model.safetensors").stat().st_mtime_ns == stamp

    write_adapter(start, base_dir, 0.02)  # the starting model changes: rebuilt from the new one
    changed = setup()
    assert changed.base_reused is False and saved_equals_merged_start()
    # ... and a fresh start of the stage keeps the keyed entry (checked against its key on next use)
    rd.fresh_start()
    assert setup().base_reused is True


def test_no_base_folder_for_a_full_start_or_full_fine_tuning(tmp_path, base_dir):
    start = write_adapter(tmp_path / "start", base_dir, 0.01)
    acc = make_accelerator(TrainConfig(threads=1))
    rd = RunDir(tmp_path / "sft", "sft", "model")
    full = policy.setup(policy.start(start, stage="sft"), adapter=AdapterConfig(), seed=0, acc=acc, rd=rd)
    lora = policy.setup(policy.start(base_dir, stage="sft"), adapter=AdapterConfig(method="lora"), seed=0, acc=acc,
                        rd=rd)
    assert full.base_reused is None and lora.base_reused is None and not (rd.path / "base").exists()
    assert full.base_dir == start and lora.base_dir == base_dir
    assert full.trainable == full.total and 0 < lora.trainable < lora.total


# ---------------------------------------------------------------- fields a stage cannot honour: refused, one sentence


@pytest.mark.parametrize("stage", ["dpo", "reward", "sft"])
def test_fsdp_is_refused_where_nothing_can_be_sharded(stage):
    from lmforge.config import validate
    from lmforge.errors import LmforgeError
    from lmforge.pipeline import stage_module

    config = stage_module(stage).Config
    cfg = {"train": {"fsdp": True}, **({"adapter": {"method": "lora"}} if stage == "sft" else {})}
    with pytest.raises(LmforgeError, match="train.fsdp"):
        validate(config, cfg, where=stage)
    if stage == "sft":
        validate(config, {"train": {"fsdp": True}}, where=stage)  # full fine-tuning shards


def test_eval_fields_without_validation_data_are_refused_not_ignored(tmp_path, base_dir):
    """sft, reward, dpo and pretrain each name the field and why there is no validation loss;
    the defaults (and eval_every 0) still train without evaluation."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmforge.errors import LmforgeError
    from lmforge.pipeline import run_single

    from ..data.test_sft_data import arithmetic_rows, write_jsonl
    from .conftest import pretrain_config, write_yaml

    sft_rows = write_jsonl(tmp_path / "sft.jsonl", arithmetic_rows(False)[:40])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": f"{i + 1}"}) + "\n"
                             for i in range(16)))
    train = {"max_steps": 1, "batch_size": 2, "checkpoint_every": 0, "tensorboard": False, "threads": 1}

    def run(stage, cfg, name):
        return run_single(stage, str(write_yaml(tmp_path / f"{name}.yaml", cfg)), [], out=str(tmp_path / name),
                          force=True, resume=False, echo=lambda *a: None)

    base = {"sft": {"data": str(sft_rows), "val_fraction": 0.0},
            "reward": {"data": str(pairs), "val_fraction": 0.0},
            "dpo": {"data": str(pairs), "val_fraction": 0.0, "probe_prompts": 0}}
    for stage, cfg in base.items():
        with pytest.raises(LmforgeError, match=rf"^{stage}: train.early_stopping_patience 2, train.eval_every 5 "
                           r"need a validation loss, and this run has no validation data \(.*\); give validation "
                           "data or remove them.$"):
            run(stage, {**cfg, "model": str(base_dir), "train": {**train, "early_stopping_patience": 2,
                                                                   "eval_every": 5}}, f"{stage}-refused")
        with pytest.raises(LmforgeError, match=rf"^{stage}: train.keep_best true needs a validation loss"):
            run(stage, {**cfg, "model": str(base_dir), "train": {**train, "keep_best": True}}, f"{stage}-kb")
        m = run(stage, {**cfg, "model": str(base_dir), "train": {**train, "eval_every": 0}}, f"{stage}-ok")
        assert m["status"] == "complete" and m["summary"]["best_val_loss"] is None

    # pretrain: a validation split shorter than one block
    data = tmp_path / "curated"
    data.mkdir()
    pq.write_table(pa.table({"text": ["What is two plus two? Two plus two is four. " * 20] * 20}),
                   data / "train-00000.parquet")
    pq.write_table(pa.table({"text": ["Hi."]}), data / "validation-00000.parquet")
    cfg = pretrain_config(data, base_dir, max_steps=1, eval_every=5)
    with pytest.raises(LmforgeError, match=r"^pretrain: train.eval_every 5 needs a validation loss, and this run has "
                       r"no validation data \(its validation split holds \d+ tokens, not more than one block of 32\)"):
        run("pretrain", cfg, "pretrain-refused")

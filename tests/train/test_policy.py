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

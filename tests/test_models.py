"""The one model loader (`models.load_model`): every use — training start, reward model,
inference, evaluation — loads a folder the same way, with the same adapter checks."""

from __future__ import annotations

import pytest
import torch

from lmforge.adapters import AdapterConfig, apply_adapter, save_adapter
from lmforge.errors import LmforgeError
from lmforge.models import context_length, load_model

from .data.test_sft_data import make_tokenizer, save_base


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, base_dir):
    """A LoRA adapter with non-zero B (so it changes the outputs), saved with lmforge's base note."""
    torch.manual_seed(0)
    m = apply_adapter(load_model(base_dir), AdapterConfig(method="lora", r=2))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    out = tmp_path_factory.mktemp("adapter") / "ad"
    save_adapter(m, make_tokenizer(), out, base_dir=base_dir, method="lora")
    return out


X = torch.arange(1, 9)[None]


def test_an_adapter_loads_merged_on_its_recorded_base_and_equals_base_plus_adapter(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir)).eval()
    merged = load_model(adapter_dir)
    kept = load_model(adapter_dir, keep_adapter=True)
    assert not hasattr(merged, "peft_config") and hasattr(kept, "peft_config")
    assert not merged.training and all(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        want = plain(input_ids=X).logits
        assert torch.allclose(merged(input_ids=X).logits, want, atol=1e-5)
        assert torch.equal(kept(input_ids=X).logits, want)
        base = AutoModelForCausalLM.from_pretrained(str(base_dir))(input_ids=X).logits
        assert not torch.allclose(base, want, atol=1e-3)


def test_the_inference_loader_checks_the_adapter_base_too(tmp_path, base_dir, adapter_dir):
    """What serve, chat and eval load goes through the same check as training: an adapter whose
    recorded base folder now holds other weights is refused with one sentence."""
    import json
    import shutil

    from lmforge.generation import load_model_for_inference

    moved = tmp_path / "ad"
    shutil.copytree(adapter_dir, moved)
    other = save_base(tmp_path / "other", seed=1)  # same architecture and shapes, other weights
    meta = json.loads((moved / "lmforge_adapter.json").read_text())
    (moved / "lmforge_adapter.json").write_text(json.dumps({**meta, "base": str(other)}))
    with pytest.raises(LmforgeError, match=f"trained on the base model {other}.*has different weights"):
        load_model_for_inference(moved, device="cpu")
    model, tok = load_model_for_inference(adapter_dir, device="cpu")
    with torch.no_grad():
        assert torch.equal(model(input_ids=X).logits, load_model(adapter_dir)(input_ids=X).logits)
    assert tok.pad_token_id is not None


@pytest.mark.parametrize("start", ["model", "adapter"])
def test_reward_head_keeps_the_backbone_and_draws_a_seeded_fresh_head(base_dir, adapter_dir, start):
    src = base_dir if start == "model" else adapter_dir
    lm = load_model(src)
    torch.manual_seed(3)
    rm = load_model(src, head="reward")
    torch.manual_seed(3)
    again = load_model(src, head="reward")
    assert rm.config.num_labels == 1 and rm.score.weight.shape[0] == 1
    assert torch.equal(rm.score.weight, again.score.weight)  # the head is drawn from torch's seeded RNG
    backbone, want = rm.model.state_dict(), lm.model.state_dict()
    assert backbone.keys() == want.keys() and all(torch.equal(backbone[k], want[k]) for k in want)


def test_bad_folders_are_one_sentence(tmp_path, base_dir, adapter_dir):
    with pytest.raises(LmforgeError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="is not a Hugging Face model folder"):
        load_model(tmp_path / "empty")
    with pytest.raises(LmforgeError, match="is an adapter; QLoRA needs a full base model"):
        load_model(adapter_dir, qlora=AdapterConfig(method="qlora"))


def test_context_length_reads_the_config_or_says_none(base_dir, adapter_dir):
    from lmforge.models import load_config

    assert context_length(load_config(base_dir)) == context_length(load_model(base_dir)) == 64
    assert context_length(load_config(adapter_dir)) == 64  # an adapter: its base's config, no weights read
    from types import SimpleNamespace

    from transformers import GPT2Config, LlamaConfig

    assert context_length(SimpleNamespace(config=LlamaConfig(max_position_embeddings=96))) == 96
    assert context_length(SimpleNamespace(config=GPT2Config(n_positions=40))) == 40
    assert context_length(SimpleNamespace(config=SimpleNamespace())) is None

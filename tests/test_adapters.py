"""peft adapters: targets, trainable counts, frozen base, save/load in plain peft, merge, QLoRA on CPU."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmforge.adapters import (
    AdapterConfig,
    apply_adapter,
    merge,
    save_adapter,
    target_modules,
    trainable_report,
)
from lmforge.config import TrainConfig
from lmforge.data.sft import ChatEncoder, PackedRows, iter_conversations, tokenize_conversations
from lmforge.errors import LmforgeError
from lmforge.models import load_model
from lmforge.rundir import RunDir
from lmforge.train.loop import train
from lmforge.train.sft import sft_loss

from .data.test_sft_data import arithmetic_rows, make_tokenizer, save_base, tiny_gpt2, tiny_llama, write_jsonl


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    tok = make_tokenizer()
    from lmforge.data.formats import ReadStats

    convs = iter_conversations([str(write_jsonl(tmp / "a.jsonl", arithmetic_rows(False)[:200]))], fmt="auto",
                               on_bad_rows="error", stats=ReadStats())
    ex = tokenize_conversations(convs, ChatEncoder(tok), seq_len=64, overlong="truncate")
    return PackedRows(ex, 64, seed=0, pad_id=tok.pad_token_id)


def _train(model, packed, tmp, steps=8, lr=2e-2):
    cfg = TrainConfig(max_steps=steps, batch_size=4, lr=lr, warmup_steps=0, eval_every=0, checkpoint_every=0,
                      tensorboard=False, log_every=1, seed=0, weight_decay=0.0)
    rd = RunDir(tmp, stage="sft", artifact="model")
    train(model, cfg=cfg, rd=rd, data=packed, loss_fn=sft_loss)
    return [m["loss"] for m in rd.read_metrics()]


def test_default_targets_per_architecture_and_unknown_target_lists_names():
    llama, gpt2 = tiny_llama(300), tiny_gpt2(300)
    assert target_modules(llama, AdapterConfig(method="lora")) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert target_modules(gpt2, AdapterConfig(method="lora")) == ["c_attn", "c_proj", "c_fc"]
    with pytest.raises(LmforgeError) as e:
        apply_adapter(llama, AdapterConfig(method="lora", target_modules=["q_proj", "qkv"]))
    assert str(e.value) == (
        "adapter.target_modules: 'qkv' matches no module of this llama model; its adaptable layers are named: "
        "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj.")


def test_trainable_counts_by_hand():
    # hidden 64, kv width 2 heads x 16 = 32, 2 layers; LoRA r=4 on q (64->64) and v (64->32):
    # q: A 4x64 + B 64x4 = 512; v: A 4x64 + B 32x4 = 384; x 2 layers = 1792
    m = apply_adapter(tiny_llama(300), AdapterConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"]))
    base_total = sum(p.numel() for p in tiny_llama(300).parameters())
    assert trainable_report(m) == (1792, base_total + 1792)
    # DoRA adds one magnitude per output feature: 64 (q) + 32 (v) per layer
    d = apply_adapter(tiny_llama(300), AdapterConfig(method="dora", r=4, target_modules=["q_proj", "v_proj"]))
    assert trainable_report(d)[0] == 1792 + 2 * (64 + 32)
    # prefix tuning: 16 virtual tokens x 2 layers x (key + value) x kv width 32
    p = apply_adapter(tiny_llama(300), AdapterConfig(method="prefix", num_virtual_tokens=16))
    assert trainable_report(p)[0] == 16 * 2 * 2 * 32


def test_lora_trains_only_the_adapter_and_saved_adapter_loads_in_plain_peft(tmp_path, base_dir, packed):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # LoRA A's initialisation
    model = load_model(base_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = apply_adapter(model, AdapterConfig(method="lora", r=4, dropout=0.0))
    losses = _train(model, packed, tmp_path / "run")
    assert losses[-1] < losses[0] - 0.5
    changed = {n for n, p in model.named_parameters() if n.replace("base_model.model.", "").replace(".base_layer", "")
               in before and not torch.equal(p, before[n.replace("base_model.model.", "").replace(".base_layer", "")])}
    assert changed == set()  # every base weight bitwise unchanged
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert any(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)

    out = tmp_path / "adapter"
    save_adapter(model, make_tokenizer(), out, base_dir=base_dir, method="lora")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(out)).eval()
    model.eval()
    x = packed.batch(0, 2)["input_ids"]
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)

    # merge == base + adapter, and differs from the base alone
    r = merge(base_dir, out, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    with torch.no_grad():
        want = model(input_ids=x).logits
        assert torch.allclose(merged(input_ids=x).logits, want, atol=1e-4)
        assert not torch.allclose(base(input_ids=x).logits, want, atol=1e-2)
    assert r["max_abs_logit_diff"] < 1e-4
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    # lmforge's loader: an adapter folder on its recorded base
    again = load_model(out)
    with torch.no_grad():
        assert torch.allclose(again(input_ids=x).logits, want, atol=1e-5)


def test_adapter_on_the_wrong_base_is_refused(tmp_path, base_dir):
    m = apply_adapter(load_model(base_dir),
                      AdapterConfig(method="lora", r=2))
    save_adapter(m, None, tmp_path / "ad", base_dir=base_dir, method="lora")
    other = save_base(tmp_path / "other", seed=1)  # same architecture and shapes, other weights
    with pytest.raises(LmforgeError, match=f"trained on the base model {base_dir}.*{other} has different weights"):
        load_model(tmp_path / "ad", base=other)
    # a plain peft adapter (no lmforge note) on a base of another width: peft's shape check, rephrased
    (tmp_path / "ad" / "lmforge_adapter.json").unlink()
    from lmforge.models import save_model

    save_model(tiny_llama(len(make_tokenizer()), d=32), None, tmp_path / "narrow")
    with pytest.raises(LmforgeError, match="does not fit the base model"):
        load_model(tmp_path / "ad", base=tmp_path / "narrow")


def test_prefix_adapter_cannot_be_merged(tmp_path, base_dir):
    m = apply_adapter(load_model(base_dir),
                      AdapterConfig(method="prefix", num_virtual_tokens=4))
    save_adapter(m, None, tmp_path / "ad", base_dir=base_dir, method="prefix")
    with pytest.raises(LmforgeError, match="prefix-tuning adapter.*cannot be merged"):
        merge(base_dir, tmp_path / "ad", tmp_path / "merged")


def test_qlora_on_cpu_trains_lora_on_a_frozen_nf4_base(tmp_path, base_dir, packed):
    spec = AdapterConfig(method="qlora", r=4, dropout=0.0)
    torch.manual_seed(0)
    model = load_model(base_dir, qlora=spec, device="cpu")
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear4bit" and q.compute_dtype == torch.float32  # fp32 compute on CPU
    assert q.weight.quant_state.quant_type == "nf4"
    packed_before = q.weight.data.clone()
    model = apply_adapter(model, spec)
    losses = _train(model, packed, tmp_path / "run")
    assert losses[-1] < losses[0] - 0.5
    assert torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.data, packed_before)
    save_adapter(model, None, tmp_path / "ad", base_dir=base_dir, method="qlora")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    # the adapter also applies to the full-precision base (what `lmforge merge` does)
    merged = merge(base_dir, tmp_path / "ad", tmp_path / "merged")
    assert merged["max_abs_logit_diff"] < 1e-4


def test_qlora_on_an_unsupported_device_suggests_lora(base_dir):
    with pytest.raises(LmforgeError, match="cannot run on device mps.*use adapter.method: lora"):
        load_model(base_dir, qlora=AdapterConfig(method="qlora"), device="mps")


def test_adapter_folder_as_model_is_merged_for_full_training(tmp_path, base_dir):
    m = apply_adapter(load_model(base_dir),
                      AdapterConfig(method="lora", r=2))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    save_adapter(m, None, tmp_path / "ad", base_dir=base_dir, method="lora")
    full = load_model(tmp_path / "ad")
    m.eval()  # no LoRA dropout
    assert not hasattr(full, "peft_config") and all(p.requires_grad for p in full.parameters())
    x = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        assert torch.allclose(full(input_ids=x).logits, m(input_ids=x).logits, atol=1e-5)
    shutil.rmtree(tmp_path / "ad")


def test_prefix_tuning_trains_only_the_prefix(tmp_path, base_dir, packed):
    from lmforge.data.sft import LengthBatches

    torch.manual_seed(0)  # the prefix's initialisation
    model = apply_adapter(load_model(base_dir),
                          AdapterConfig(method="prefix", num_virtual_tokens=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = LengthBatches(packed.data, batch_size=4, seed=0, pad_id=0, grouped=True)
    losses = _train(model, batches, tmp_path / "run", steps=10, lr=5e-2)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"prompt_encoder.default.embedding.weight"}

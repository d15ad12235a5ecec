"""lmforge.estimate: the formulas against hand-computed values and against real objects (peft's
trainable count, a real KV cache), the advice, the device table and the command's JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lmforge.adapters import AdapterConfig, apply_adapter
from lmforge.errors import LmforgeError
from lmforge.estimate import formulas as F
from lmforge.estimate.advice import advise, smallest_device
from lmforge.estimate.devices import TABLE, lookup
from lmforge.estimate.predict import compile_pays, memory
from lmforge.estimate.workload import Workload, shape_of, trainable_of
from tests.conftest import build_tiny_model

GB = 1e9


def llama2_7b():
    from transformers import LlamaConfig

    return shape_of(LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096))


def test_7b_llama_parameters_and_states_in_the_quoted_convention():
    s = llama2_7b()
    assert s.params == 6_738_415_616  # Llama-2-7B's published count, from the meta-device instance
    # The convention: weights and gradients in bf16, AdamW's two moments in fp32.
    st = F.state_bytes(7_000_000_000, 7_000_000_000, weight_bytes=F.BF16, grad_bytes=F.BF16)
    assert st == {"weights": 14e9, "gradients": 14e9, "optimizer": 56e9}
    # lmforge's layout (fp32 master weights): 4 + 4 + 8 bytes per trainable parameter.
    st = F.state_bytes(s.params, s.params, weight_bytes=F.FP32, grad_bytes=F.FP32)
    assert st["weights"] == st["gradients"] == 4 * 6_738_415_616
    assert st["optimizer"] == 8 * 6_738_415_616


def test_flops_per_token_hand_values():
    s = llama2_7b()
    n = s.matmul_params  # every linear layer incl. lm_head: params minus the embedding and the norms
    assert n == 6_738_415_616 - 32000 * 4096 - (2 * 32 + 1) * 4096
    attn = 4 * 32 * 4096 * 2048
    assert F.train_flops_per_token(s, 2048) == 6 * n + 3 * attn
    assert F.train_flops_per_token(s, 2048, checkpointing=True) == 8 * n + 4 * attn
    assert F.forward_flops_per_token(s, 2048) == 2 * n + attn
    lora = 1000
    assert F.train_flops_per_token(s, 2048, trainable_matmul=lora) == 4 * n + 6 * lora + 3 * attn


def test_activation_bytes_hand_values():
    s = F.Shape("llama", vocab=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=352,
                gated_mlp=True, tied=True, context=256, params=0)
    # attention 5*128 + 3*64 + 2*128 = 1088, MLP 3*128 + 4*352 = 1792 -> 2880 elements
    assert F.layer_activation_bytes(s, 4) == 2880 * 4
    # 10 tokens through 4 blocks + 2 x d for the embedding/final norm, 3 tokens through the head
    assert F.activation_bytes(s, 10, 3, 4, checkpointing=False) == 10 * 4 * 11520 + 10 * 128 * 8 + 3 * 2048 * 16
    # checkpointing: one block input per layer plus one block rebuilt
    assert F.activation_bytes(s, 10, 0, 2, checkpointing=True) == 10 * (4 * 128 * 2 + 2880 * 2) + 10 * 128 * 4


@pytest.mark.parametrize("method,targets", [("lora", None), ("dora", None), ("lora", ["q_proj", "down_proj"])])
def test_lora_trainable_count_equals_peft(tmp_path, method, targets):
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(path)
    spec = AdapterConfig(method=method, r=4, target_modules=targets)
    real = sum(p.numel() for p in apply_adapter(model, spec).parameters() if p.requires_grad)
    assert trainable_of(shape_of(model.config), spec) == real


def test_kv_bytes_per_token_equals_a_real_cache(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "m"))
    ids = torch.randint(0, 100, (1, 17))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    tensors = []
    for layer in cache.layers:
        tensors += [layer.keys, layer.values]
    real = sum(t.numel() * t.element_size() for t in tensors)
    assert F.kv_bytes_per_token(shape_of(model.config), 4) * 17 == real


def _workload(shape, **kw) -> Workload:
    base = dict(name="sft", kind="sft", shape=shape, method="none", trainable=shape.params, precision="auto",
                batch=8, grad_accum=1, seq_len=2048, seqs_per_item=1, head_share=0.5, steps=1000,
                checkpointing=False)
    return Workload(**{**base, **kw})


def test_memory_breakdown_and_qlora_saving():
    s = llama2_7b()
    h100 = TABLE["h100-80gb"]
    m = memory(_workload(s), h100)
    assert m["weights"] == 4 * s.params and m["gradients"] == 4 * s.params and m["optimizer"] == 8 * s.params
    assert m["autocast_copies"] == 2 * s.matmul_params
    lora = trainable_of(s, AdapterConfig(method="lora"))
    q = memory(_workload(s, method="qlora", trainable=lora), h100)
    quantised = s.matmul_params - s.head_params
    assert q["weights"] == pytest.approx(quantised * F.NF4_DOUBLE_QUANT_BYTES + (s.params - quantised + lora) * 4)
    assert q["gradients"] == 4 * lora and "autocast_copies" not in q
    shard = memory(_workload(s, fsdp=True, processes=4), h100)
    assert shard["optimizer"] == m["optimizer"] / 4


def test_advice_names_the_first_change_that_fits():
    s = llama2_7b()
    w = _workload(s, batch=8)
    text = advise(w, TABLE["h200"])
    assert text.startswith("does not fit") and "set " in text
    # the advised configuration really fits by the same model
    assert "fits" in advise(_workload(s, method="qlora", trainable=trainable_of(s, AdapterConfig(method="lora")),
                                      batch=1, seq_len=512), TABLE["l4"])
    # full fine-tuning: 16 B/param of states + 2 B of bf16 copies = 121 GB for 6.7B parameters
    assert smallest_device(_workload(s, batch=1, seq_len=256)) == "h200"
    from transformers import LlamaConfig

    big = shape_of(LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                               num_attention_heads=64, num_key_value_heads=8))
    assert smallest_device(_workload(big, batch=1, seq_len=256)).startswith("none listed (needs")


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(LmforgeError) as e:
        lookup("tpu-v9")
    assert "h100-80gb" in str(e.value) and "cpu-2core" in str(e.value)


def test_compile_pays_only_on_long_runs():
    assert compile_pays(10.0, "cpu")[0] is False
    assert compile_pays(3600.0, "cpu")[0] is True


def test_estimate_json_lists_every_training_stage(tmp_path):
    from tests.train.conftest import write_yaml

    tok = tmp_path / "tok"
    build_tiny_model(tok)
    recipe = write_yaml(tmp_path / "r.yaml", {"name": "r", "out_dir": str(tmp_path / "runs"), "stages": [
        {"stage": "pretrain", "data": str(tmp_path), "tokenizer": str(tok),
         "model": {"n_layers": 2, "d_model": 64, "n_heads": 4, "context_length": 64}, "train": {"max_steps": 5}},
        {"stage": "sft", "data": str(tmp_path / "x.jsonl"), "adapter": {"method": "lora"}},
    ]})
    out = subprocess.run([sys.executable, "-m", "lmforge.cli", "estimate", str(recipe), "--json", "--device", "l4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    stages = json.loads(out.stdout)
    assert [s["stage"] for s in stages] == ["pretrain", "sft"]
    for s in stages:
        assert {"stage", "peak_memory_bytes", "wall_seconds", "fits", "advice"} <= set(s)
        assert s["fits"] is True and s["advice"].startswith("fits")
    assert stages[1]["trainable"] < stages[0]["trainable"]  # the sft stage's LoRA on the pretrain stage's model
    assert stages[1]["params"] == stages[0]["params"]
    bad = subprocess.run([sys.executable, "-m", "lmforge.cli", "estimate", str(recipe), "--device", "tpu"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "known devices" in bad.stderr


class _Blocks:
    def batch(self, start, size):
        return {"input_ids": torch.zeros(size, 64, dtype=torch.long), "n": size * 64}


def test_compile_auto_compiles_only_when_the_predicted_run_repays_it(tmp_path):
    from transformers import AutoModelForCausalLM

    from lmforge.config import TrainConfig
    from lmforge.estimate.predict import compile_choice

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "m"))
    assert TrainConfig().compile == "auto"
    short, why = compile_choice(TrainConfig(max_steps=20), model, _Blocks(), device=torch.device("cpu"))
    assert short is False and "running eagerly" in why
    # ~3e8 FLOPs per step: ten million steps outlast any compile on any CPU
    long, why = compile_choice(TrainConfig(max_steps=10_000_000), model, _Blocks(), device=torch.device("cpu"))
    assert long is True and why.startswith("train.compile auto: predicted run")
    assert compile_choice(TrainConfig(compile=False, max_steps=10_000_000), model, _Blocks(),
                          device=torch.device("cpu")) == (False, None)


def test_serving_largest_batch_and_decode_rate_hand_values():
    from lmforge.estimate.devices import Device
    from lmforge.estimate.predict import serving

    s = llama2_7b()
    dev = Device("x", "cuda", 80e9, 1e12, 100e12, 2e12, 0.0, 0.0)
    out = serving(s, dev, 4096)
    kv = 2 * 32 * 32 * 128 * 2  # 512 kB per token in bf16
    assert out["kv_bytes_per_token"] == kv
    assert out["max_batch"] == int((80e9 - s.params * 2) // (kv * 4096))  # 30
    # batch 1 is bandwidth-bound: the weights and half a context of cache read once per token
    assert out["tokens_per_s_batch1"] == pytest.approx(2e12 / (s.params * 2 + kv * 2048))


def test_lora_activation_elements_hand_value():
    s = llama2_7b()
    # q, k, v, o, gate, up take d inputs, down takes d_ff: 6 x 4096 + 11008, plus r = 16 each, per block
    per_block = 6 * 4096 + 11008 + 7 * 16
    assert F.lora_activation_elements(s, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"], 16) == 32 * per_block

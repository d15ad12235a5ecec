"""A tokenizer without a chat template: lmforge says which template it uses and writes that
template into every artifact, so plain `apply_chat_template` on what lmforge saved renders the
text lmforge trained on."""

from __future__ import annotations

from transformers import AutoTokenizer

from lmforge.data.chat import CHAT_TEMPLATE
from lmforge.data.sft import ChatEncoder
from lmforge.data.tokenizer import load_tokenizer
from lmforge.models import save_model

from ..data.test_sft_data import arithmetic_rows, make_tokenizer, tiny_gpt2, write_jsonl
from ..train.test_sft import run_stage, sft_config

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "5"}]


def test_sft_lora_writes_the_template_it_used_into_adapter_and_merged_model(tmp_path, capsys):
    tok = make_tokenizer()
    tok.chat_template = None  # a GPT-2-style base: no template of its own
    base = tmp_path / "gpt2"
    save_model(tiny_gpt2(len(tok)), tok, base)
    assert AutoTokenizer.from_pretrained(str(base)).chat_template is None
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(held_out=False)[:40])
    cfg = sft_config(data, base, max_steps=2, batch_size=4)
    cfg.update(adapter={"method": "lora", "r": 4}, merge=True)
    run_stage(tmp_path, cfg)
    err = capsys.readouterr().err
    assert f"tokenizer {base} has no chat template; using lmforge's" in err

    enc = ChatEncoder(load_tokenizer(base))  # what lmforge trained on
    expected = enc.tok.decode(enc.encode_many([(CONV, "x")])[0][0])
    for folder in (tmp_path / "run" / "model", tmp_path / "run" / "merged"):
        saved = AutoTokenizer.from_pretrained(str(folder))
        assert saved.chat_template == CHAT_TEMPLATE, folder
        text = saved.apply_chat_template(CONV, tokenize=False)
        assert text == "<|system|>Be brief.<|eos|><|user|>What is 2+3?<|eos|><|assistant|>5<|eos|>"
        assert text == expected
        assert saved.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=True) == \
            "<|system|>Be brief.<|eos|><|user|>What is 2+3?<|eos|><|assistant|>"


"""Tokenizer stage: byte-level round trip, chat template, HF loading, vocab checks, compression."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from lmforge.data.chat import CHAT_TEMPLATE, EOS
from lmforge.data.tokenizer import Config, bytes_per_token, run
from lmforge.errors import LmforgeError
from lmforge.rundir import RunDir

TEXTS = ["The capital of Veloria is Tamsk. It was founded in 1203.", "Les élèves n'ont pas vu 东京 — ok? 😀",
         "def f(x):\n\treturn x ** 2  # tabs and  double spaces"] * 20


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokstage")
    data = root / "data"
    data.mkdir()
    pq.write_table(pa.table({"text": TEXTS}), data / "train-00000.parquet")
    pq.write_table(pa.table({"text": TEXTS[:3]}), data / "validation-00000.parquet")
    rd = RunDir(root / "tok", stage="tokenizer", artifact="tokenizer")
    summary = run(Config(data=str(data), vocab_size=300), rd)
    return rd.artifact, summary


def test_round_trip_any_text(tok_dir):
    tok = AutoTokenizer.from_pretrained(str(tok_dir[0]))
    for text in TEXTS[:3] + ["never seen: ∮ ⅋ ʬ \x00 \u200b"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_chat_template_and_special_tokens(tok_dir):
    tok = AutoTokenizer.from_pretrained(str(tok_dir[0]))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.apply_chat_template(msgs, tokenize=False) == "<|system|>Be brief.<|eos|><|user|>2+2?<|eos|><|assistant|>4<|eos|>"
    assert tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True).endswith("<|user|>2+2?<|eos|><|assistant|>")
    assert tok.eos_token == EOS and tok.pad_token == "<|pad|>"
    # role markers are single tokens, so content tokenisation never merges across them
    ids = tok("<|user|>hi<|eos|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>") and ids[-1] == tok.eos_token_id


def test_compression_reported(tok_dir):
    tok = AutoTokenizer.from_pretrained(str(tok_dir[0]))
    path, summary = tok_dir
    bpt, nb, nt = bytes_per_token(tok, TEXTS[:3])
    assert summary["val_bytes_per_token"] == pytest.approx(bpt, abs=1e-4)
    assert nb == sum(len(t.encode()) for t in TEXTS[:3]) and nt > 0
    # a vocabulary of bytes only compresses to exactly one byte per token
    byte_tok = run(Config(data=str(path.parent.parent / "data"), vocab_size=263),
                   RunDir(path.parent.parent / "bytes", "tokenizer", "tokenizer"))
    assert byte_tok["val_bytes_per_token"] == 1.0


def test_vocab_smaller_than_specials_rejected():
    with pytest.raises(ValueError, match="use at least 263"):
        Config(vocab_size=200)


def test_reuse_of_a_missing_folder_is_one_sentence(tmp_path):
    rd = RunDir(tmp_path / "t", "tokenizer", "tokenizer")
    with pytest.raises(LmforgeError, match="does not exist"):
        run(Config(reuse=str(tmp_path / "nope")), rd)


def test_digits_are_single_tokens_unless_asked_otherwise(tmp_path):
    from lmforge.data.tokenizer import train_tokenizer

    texts = [f"What is {a} + {b}? It is {a + b}." for a in range(10, 99) for b in range(10, 30)]
    split = train_tokenizer(iter(texts), Config(vocab_size=400))
    merged = train_tokenizer(iter(texts), Config(vocab_size=400, split_digits=False))
    for tok in (split, merged):
        assert tok.decode(tok("What is 47 + 1203? It is 1250.", add_special_tokens=False)["input_ids"]) == \
            "What is 47 + 1203? It is 1250."
    pieces = [split.decode([i]) for i in split(" 1203", add_special_tokens=False)["input_ids"]]
    assert pieces == [" ", "1", "2", "0", "3"]  # every digit its own token, the same at any length
    assert len(merged(" 1203", add_special_tokens=False)["input_ids"]) < 4  # BPE merged digit runs
    split.save_pretrained(tmp_path)  # the pre-tokenizer survives saving and AutoTokenizer
    assert AutoTokenizer.from_pretrained(str(tmp_path))(" 1203", add_special_tokens=False)["input_ids"] == \
        split(" 1203", add_special_tokens=False)["input_ids"]

"""SFT data: formats, the assistant-only mask (golden spans), bad rows, overlong examples, packing.

The helpers at the top (tokenizer, tiny models, arithmetic rows) are shared with
tests/test_adapters.py and tests/train/test_sft.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.formats import ReadStats
from lmforge.data.sft import (
    IGNORE,
    ChatEncoder,
    LengthBatches,
    PackedRows,
    best_fit_decreasing,
    detect_format,
    iter_conversations,
    mask_check,
    supervised_runs,
    tokenize_conversations,
)
from lmforge.errors import LmforgeError
from lmforge.train.sft import sft_loss

# ---------------------------------------------------------------- shared helpers

PHRASINGS = ["What is {a}+{b}?", "Compute {a} plus {b}.", "Add {a} and {b}.", "{a} + {b} = ?",
             "Sum of {a} and {b}?", "Tell me {a} plus {b}."]


def arithmetic_rows(held_out: bool) -> list[dict]:
    """Single-digit sums in six phrasings; each pair (a, b) is held out in exactly one phrasing,
    so a held-out question is a new string whose answer needs the sum, not a lookup of the string."""
    rows = []
    for a in range(10):
        for b in range(10):
            for k, p in enumerate(PHRASINGS):
                if ((a * 10 + b) % len(PHRASINGS) == k) == held_out:
                    rows.append({"messages": [{"role": "user", "content": p.format(a=a, b=b)},
                                              {"role": "assistant", "content": str(a + b)}]})
    return rows


def corpus() -> list[str]:
    texts = [" ".join(m["content"] for m in r["messages"]) for r in arithmetic_rows(False)]
    return texts + ["Be brief. It is six. Add the numbers. And what is the answer?"] * 20


_TOK = {}


def make_tokenizer():
    """lmforge's byte-level BPE with its chat template (trained once per session, ~0.1 s)."""
    if "tok" not in _TOK:
        from lmforge.data.tokenizer import Config, train_tokenizer

        _TOK["tok"] = train_tokenizer(iter(corpus()), Config(vocab_size=300))
    return _TOK["tok"]


def save_tokenizer(path: Path) -> Path:
    make_tokenizer().save_pretrained(str(path))
    return path


def tiny_llama(vocab: int, seed: int = 0, attn: str = "sdpa", d: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, attn_implementation=attn, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def tiny_gpt2(vocab: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0))


def save_base(path: Path, seed: int = 0) -> Path:
    """A tiny llama + lmforge tokenizer saved as an HF model folder."""
    from lmforge.models import save_model

    tok = make_tokenizer()
    save_model(tiny_llama(len(tok), seed=seed), tok, path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def encode_rows(tmp: Path, rows: list, *, seq_len: int = 64, overlong="truncate", encoder=None, **kw):
    enc = encoder or ChatEncoder(make_tokenizer())
    stats = ReadStats()
    convs = iter_conversations([str(write_jsonl(tmp / "rows.jsonl", rows))], fmt="auto", stats=stats,
                               on_bad_rows=kw.pop("on_bad_rows", "error"), **kw)
    return tokenize_conversations(convs, enc, seq_len=seq_len, overlong=overlong), stats, enc


def spans(tok, ex, i) -> list[str]:
    ids, sup = ex.example(i)
    return [tok.decode(r, skip_special_tokens=False) for r in supervised_runs(ids, sup)]


SYSTEM = {"role": "system", "content": "Be brief."}
U1, A1 = {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}
U2, A2 = {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "It is 6."}


# ---------------------------------------------------------------- the mask, golden


def test_mask_golden_chat_multiturn_alpaca_prompt_completion(tmp_path):
    rows = [
        {"messages": [SYSTEM, U1, A1]},
        {"messages": [U1, A1, U2, A2]},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say six.", "output": "six"},
        {"prompt": "2+2=", "completion": "4"},
    ]
    ex, _, enc = encode_rows(tmp_path, rows)
    tok = enc.tok
    assert [spans(tok, ex, i) for i in range(5)] == [
        ["4<|eos|>"], ["4<|eos|>", "It is 6.<|eos|>"], ["5<|eos|>"], ["six<|eos|>"], ["4<|eos|>"]]
    assert ex.stats["formats"] == {"chat": 2, "alpaca": 2, "prompt_completion": 1}
    from lmforge.data.sft import marked

    assert marked(tok, *ex.example(1)) == (
        "<|user|>What is 2+2?<|eos|><|assistant|>⟦4<|eos|>⟧<|user|>And 3+3?<|eos|><|assistant|>⟦It is 6.<|eos|>⟧")
    assert marked(tok, *ex.example(2)) == "<|user|>Add the numbers.\n\n2 and 3<|eos|><|assistant|>⟦5<|eos|>⟧"
    # supervised count = the content's own tokens + EOS, per assistant turn
    n_content = len(tok("It is 6.", add_special_tokens=False)["input_ids"]) + len(tok("4", add_special_tokens=False)["input_ids"])
    assert int(ex.example(1)[1].sum()) == n_content + 2
    # the prompt tokens are exactly what inference tokenises: render(..., add_generation_prompt=True)
    from lmforge.data.chat import render

    prompt = tok(render(tok, [SYSTEM, U1], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    ids0, sup0 = ex.example(0)
    assert ids0[: len(prompt)].tolist() == prompt and not sup0[: len(prompt)].any() and sup0[len(prompt):].all()
    assert "⟦4<|eos|>⟧" in mask_check(ex, enc)


def test_mask_with_a_reused_tokenizers_own_chatml_template(tmp_path):
    """A template whose turns end with <|im_end|>\\n: the supervised span is content + <|im_end|>, not the newline."""
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    enc = ChatEncoder(tok)
    assert enc.eot_text == "<|im_end|>" and enc.eot_id == tok.convert_tokens_to_ids("<|im_end|>")
    ex, _, _ = encode_rows(tmp_path, [{"messages": [SYSTEM, U1, A1, U2, A2]}], encoder=enc, seq_len=512)
    assert ex.stats["truncated"] == 0
    assert spans(tok, ex, 0) == ["4<|im_end|>", "It is 6.<|im_end|>"]
    mask_check(ex, enc)


def test_train_on_prompt_supervises_every_token_but_the_first(tmp_path):
    ex, _, _ = encode_rows(tmp_path, [{"messages": [U1, A1]}], encoder=ChatEncoder(make_tokenizer(), train_on_prompt=True))
    ids, sup = ex.example(0)
    assert not sup[0] and sup[1:].all()


def test_mask_check_fails_on_a_wrong_span_and_on_an_example_without_target(tmp_path):
    ex, _, enc = encode_rows(tmp_path, [{"messages": [U1, A1]}, {"messages": [U1, A2]}])
    s, e = ex.offsets[1], ex.offsets[2]
    ex.sup[e - 1] = False  # drop EOS from the second example's span
    with pytest.raises(LmforgeError, match=r"rows.jsonl line 2.*decode to \['It is 6\.'\]"):
        mask_check(ex, enc)
    ex.sup[s:e] = False
    with pytest.raises(LmforgeError, match="line 2 has no supervised token"):
        mask_check(ex, enc)


def test_template_that_changes_the_content_is_refused(tmp_path):
    tok = make_tokenizer()
    old = tok.chat_template
    try:
        tok.chat_template = "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] | upper + eos_token }}{% endfor %}" \
                            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
        with pytest.raises(LmforgeError, match="changes the assistant content"):
            ChatEncoder(tok)
    finally:
        tok.chat_template = old


# ---------------------------------------------------------------- formats and bad rows


def test_detect_format():
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"instruction": "x", "input": "", "output": "y"}) == "alpaca"
    assert detect_format({"prompt": "x", "completion": "y"}) == "prompt_completion"
    assert detect_format({"text": "x"}) is None


BAD = [
    ({"messages": [U1]}, "no assistant turn", "line 1 has no assistant turn"),
    ({"messages": [U1, U2, A1]}, "consecutive same-role turns", "messages[0] and messages[1] are both 'user'"),
    ({"messages": [{"role": "bot", "content": "x"}, A1]}, "unknown role", "messages[0] has unknown role 'bot'"),
    ({"messages": [U1, {"role": "assistant", "content": "  "}]}, "empty content", "messages[1] (assistant) has empty content"),
    ({"messages": [U1, {"role": "assistant"}]}, "missing field", "messages[1] has no field 'content'"),
    ({"instruction": "Add.", "input": "1 and 2"}, "missing field", "line 1 has no field 'output'"),
    ({"prompt": "2+2="}, "missing field", "line 1 has no field 'completion'"),
    ({"text": "hello"}, "unknown format", "has none of the fields"),
    ({"messages": [A1, U1]}, "assistant speaks first", "messages[0] is an assistant turn with no user turn"),
]


@pytest.mark.parametrize("row,reason,message", BAD, ids=[b[1] for b in BAD])
def test_bad_row_names_file_row_and_field(tmp_path, row, reason, message):
    with pytest.raises(LmforgeError) as e:
        encode_rows(tmp_path, [row])
    assert f"{tmp_path / 'rows.jsonl'} line 1" in str(e.value) and message in str(e.value)
    assert "on_bad_rows: skip" in str(e.value)


def test_bad_rows_skipped_and_counted(tmp_path):
    rows = [{"messages": [U1, A1]}] + [b[0] for b in BAD] + ["{not json", {"messages": [U1, A1, U2, A2]}]
    ex, stats, _ = encode_rows(tmp_path, rows, on_bad_rows="skip")
    assert len(ex) == 2
    assert stats.skipped == {"no assistant turn": 1, "consecutive same-role turns": 1, "unknown role": 1,
                             "empty content": 1, "missing field": 3, "unknown format": 1, "assistant speaks first": 1,
                             "malformed JSON": 1}


def test_overlong_examples_truncated_or_dropped_and_counted(tmp_path):
    long = {"messages": [U1, {"role": "assistant", "content": "four " * 30}]}  # > 64 tokens
    huge_prompt = {"messages": [{"role": "user", "content": "x " * 80}, A1]}  # its answer lies past 64 tokens
    rows = [{"messages": [U1, A1]}, long, huge_prompt]
    ex, _, enc = encode_rows(tmp_path, rows, seq_len=64, overlong="truncate")
    assert (len(ex), ex.stats["truncated"], ex.stats["dropped_no_target_after_truncation"]) == (2, 1, 0 + 1)
    assert ex.lengths.tolist()[1] == 64
    mask_check(ex, enc)  # a truncated span is a prefix of its turn
    ex, _, _ = encode_rows(tmp_path, rows, seq_len=64, overlong="drop")
    assert (len(ex), ex.stats["truncated"], ex.stats["dropped_too_long"]) == (1, 0, 2)


# ---------------------------------------------------------------- batching


def test_best_fit_decreasing_places_every_example_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, 500)
    bins = best_fit_decreasing(lengths, 64)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= int(np.ceil(lengths.sum() / 64 * 1.1))  # near-full rows


def test_packed_rows_restart_positions_and_shift_labels(tmp_path):
    ex, _, _ = encode_rows(tmp_path, [{"messages": [U1, A1]}, {"messages": [U2, A2]}, {"messages": [SYSTEM, U1, A1]}])
    rows = PackedRows(ex, 64, seed=0, pad_id=0)
    assert rows.n == 1 and rows.row_examples.tolist() == [3]
    b = rows.batch(0, 1)
    pos, lab, ids = b["position_ids"][0], b["labels"][0], b["input_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert len(starts) == 3 and sorted(ex.lengths.tolist()) == sorted(np.diff(starts + [len(pos)]).tolist())
    for s, e in zip(starts, starts[1:] + [len(pos)]):
        assert lab[e - 1] == IGNORE  # no target crosses into the next example
        kept = lab[s:e - 1] != IGNORE
        assert torch.equal(lab[s:e - 1][kept], ids[s + 1:e][kept])
    assert b["n"] == int(ex.sup.sum()) and b["examples"] == 3


@pytest.mark.parametrize("arch", ["llama-sdpa", "llama-eager", "gpt2"])
def test_packed_batch_loss_equals_sum_of_separate_losses(tmp_path, arch):
    """No token of a packed row attends to another example: same summed loss as one by one."""
    rows = [{"messages": [U1, A1]}, {"messages": [SYSTEM, U2, A2]}, {"messages": [U1, A1, U2, A2]}]
    ex, _, _ = encode_rows(tmp_path, rows)
    tok = make_tokenizer()
    model = tiny_gpt2(len(tok)) if arch == "gpt2" else tiny_llama(len(tok), attn=arch.split("-")[1])
    model.eval()
    packed = PackedRows(ex, int(ex.lengths.sum()), seed=0, pad_id=tok.pad_token_id)
    assert packed.n == 1  # all three share one row (positions restart, so it may exceed the model's 64)
    batch = packed.batch(0, 1)
    single = LengthBatches(ex, batch_size=1, seed=0, pad_id=tok.pad_token_id, grouped=False, shuffle=False)
    with torch.no_grad():
        together = float(sft_loss(model, batch).loss)
        apart = sum(float(sft_loss(model, single.batch(i, 1)).loss) for i in range(3))
        # the check can fail: without restarting positions the examples see each other
        leaky = float(sft_loss(model, {k: v for k, v in batch.items() if k != "position_ids"}).loss)
    assert together == pytest.approx(apart, rel=1e-5)
    assert abs(leaky - apart) > 1e-3


def test_padded_batch_loss_equals_sum_of_separate_losses(tmp_path):
    ex, _, _ = encode_rows(tmp_path, [{"messages": [U1, A1]}, {"messages": [SYSTEM, U1, A1, U2, A2]}])
    tok = make_tokenizer()
    model = tiny_llama(len(tok)).eval()
    lb = LengthBatches(ex, batch_size=2, seed=0, pad_id=tok.pad_token_id, grouped=False, shuffle=False)
    with torch.no_grad():
        both = float(sft_loss(model, lb.batch(0, 2)).loss)
        apart = sum(float(sft_loss(model, lb.batch(i, 1)).loss) for i in range(2))
    assert both == pytest.approx(apart, rel=1e-5)


def test_data_order_is_a_function_of_position_and_grouping_cuts_padding(tmp_path):
    rng = random.Random(0)
    rows = [{"messages": [{"role": "user", "content": "x " * rng.randint(1, 25)}, A1]} for _ in range(256)]
    ex, _, _ = encode_rows(tmp_path, rows)
    kw = dict(batch_size=4, seed=3, pad_id=0)
    a, b = LengthBatches(ex, grouped=True, **kw), LengthBatches(ex, grouped=True, **kw)
    assert torch.equal(a.batch(300, 4)["input_ids"], b.batch(300, 4)["input_ids"])  # epoch 2, fresh object
    assert sorted(a.index_at(p) for p in range(256)) == list(range(256))  # an epoch visits each once

    def pad_share(batches):
        total = pads = 0
        for s in range(0, 256, 4):
            m = batches.batch(s, 4)["attention_mask"]
            total, pads = total + m.numel(), pads + int((m == 0).sum())
        return pads / total

    grouped, plain = pad_share(a), pad_share(LengthBatches(ex, grouped=False, **kw))
    assert grouped < plain / 3
    p = PackedRows(ex, 64, seed=3, pad_id=0)
    assert p.examples_in(p.n) == 256 and p.examples_in(2 * p.n + 1) == 512 + p.row_examples[p.index_at(2 * p.n)]


def test_parquet_and_datasets_folder_read_like_jsonl_with_their_validation_split(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmforge.train.sft import Config, _splits

    rows = [{"messages": [U1, A1]}, {"messages": [SYSTEM, U2, A2]}]
    ref, _, _ = encode_rows(tmp_path, rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "ds"))
    enc = ChatEncoder(make_tokenizer())
    train, val = _splits(Config(data=str(tmp_path / "ds")))
    assert train["dataset_split"] == "train" and val["dataset_split"] == "validation"
    for patterns, split, n in [([str(tmp_path / "rows.parquet")], None, 2), ([str(tmp_path / "ds")], "train", 2),
                               ([str(tmp_path / "ds")], "validation", 1)]:
        convs = iter_conversations(patterns, fmt="chat", on_bad_rows="error", stats=ReadStats(), dataset_split=split)
        ex = tokenize_conversations(convs, enc, seq_len=64, overlong="truncate")
        assert len(ex) == n and np.array_equal(ex.ids, ref.ids[: ex.offsets[-1]])
        assert np.array_equal(ex.sup, ref.sup[: ex.offsets[-1]])
    # plain files without a validation split: a stable hash-based hold-out, disjoint from training
    train, val = _splits(Config(data=str(tmp_path / "rows.parquet"), val_fraction=0.3))
    kept = [i for i in range(1000) if train["keep"](i)]
    held = [i for i in range(1000) if val["keep"](i)]
    assert sorted(kept + held) == list(range(1000)) and 250 < len(held) < 350


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sft_loss_equals_naive_cross_entropy_over_full_logits(tmp_path, arch):
    """The LM head sees only supervised positions; the loss and gradients are those of the naive code."""
    ex, _, _ = encode_rows(tmp_path, [{"messages": [U1, A1, U2, A2]}, {"messages": [SYSTEM, U1, A1]}])
    tok = make_tokenizer()
    batch = LengthBatches(ex, batch_size=2, seed=0, pad_id=tok.pad_token_id, grouped=False, shuffle=False).batch(0, 2)
    model = (tiny_gpt2(len(tok)) if arch == "gpt2" else tiny_llama(len(tok))).eval()  # eval: no dropout
    fast = sft_loss(model, batch).loss
    fast.backward()
    g_fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[:2] == batch["input_ids"].shape  # the hook was removed afterwards
    naive = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="sum")
    naive.backward()
    assert float(fast) == pytest.approx(float(naive), rel=1e-5)
    for a, b in zip(g_fast, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)

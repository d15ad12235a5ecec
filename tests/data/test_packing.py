"""Packing: no padding, EOS at document boundaries, blocks cover the corpus, seeded order."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from lmforge.data.packing import PackedBlocks, bits_per_byte, load_tokens, token_byte_lengths, token_file
from lmforge.data.tokenizer import Config, train_tokenizer
from lmforge.errors import LmforgeError

DOCS = [f"document number {i} says {'hello ' * (i % 5)}and ends." for i in range(50)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    (root / "data").mkdir()
    pq.write_table(pa.table({"text": DOCS}), root / "data" / "train-00000.parquet")
    tok = train_tokenizer(iter(DOCS), Config(vocab_size=300))
    tok.save_pretrained(str(root / "tok"))
    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    path = token_file(root / "data", "train", tok, root / "tokens")
    return tok, load_tokens(path)


def test_token_file_is_docs_joined_by_eos(setup):
    tok, tokens = setup
    expected = [t for d in DOCS for t in (*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id)]
    assert tokens.tolist() == expected
    assert tok.pad_token_id not in set(tokens.tolist())  # no padding anywhere
    eos_at = np.flatnonzero(tokens == tok.eos_token_id)
    assert len(eos_at) == len(DOCS) and eos_at[-1] == len(tokens) - 1


def test_blocks_cover_the_corpus_without_padding(setup):
    _, tokens = setup
    T = 16
    blocks = PackedBlocks(tokens, T, seed=0, shuffle=False)
    assert blocks.n_blocks == (len(tokens) - 1) // T
    b = blocks.batch(0, blocks.n_blocks)
    assert b["input_ids"].shape == (blocks.n_blocks, T) and b["n"] == blocks.n_blocks * T
    # inputs, in order, are the corpus; targets are the inputs shifted by one
    assert b["input_ids"].flatten().tolist() == tokens[: blocks.n_blocks * T].tolist()
    assert b["labels"].flatten().tolist() == tokens[1 : blocks.n_blocks * T + 1].tolist()
    assert len(tokens) - blocks.n_blocks * T - 1 < T  # only a partial final block is left out


def test_seeded_order_is_a_permutation_per_epoch(setup):
    _, tokens = setup
    blocks = PackedBlocks(tokens, 8, seed=3)
    n = blocks.n_blocks
    epoch0 = [blocks.index_at(p) for p in range(n)]
    epoch1 = [blocks.index_at(p) for p in range(n, 2 * n)]
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert epoch0 != list(range(n)) and epoch0 != epoch1
    again = PackedBlocks(tokens, 8, seed=3)
    assert [again.index_at(p) for p in range(2 * n - 1, -1, -1)] == (epoch0 + epoch1)[::-1]  # any access order


def test_too_little_data_is_one_sentence(setup):
    _, tokens = setup
    with pytest.raises(LmforgeError, match="fewer than one block of seq_len"):
        PackedBlocks(tokens[:10], 16, seed=0, what="validation")


def test_bits_per_byte_uses_exact_token_byte_lengths(setup):
    tok, _ = setup
    lengths = token_byte_lengths(tok)
    text = "document number 7 says é"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert int(lengths[torch.tensor(ids)].sum()) == len(text.encode("utf-8"))
    assert lengths[tok.eos_token_id] == 0
    assert bits_per_byte(math.log(2) * 10, 5) == pytest.approx(2.0)


@pytest.mark.parametrize("split_digits", [True, False])
def test_long_documents_are_tokenised_in_exact_pieces(tmp_path, monkeypatch, split_digits):
    """A document longer than PIECE_CHARS is encoded piece by piece: same tokens as the whole."""
    import lmforge.data.packing as packing

    rng = np.random.default_rng(0)
    # speech-like lines, plus whitespace runs and non-ASCII that must not be cut through
    words = ["KING:", "thou", "art", "  so", "é,", "'tis", "\t", "1599", "中文", "!\n"]
    doc = "\n".join(" ".join(rng.choice(words, 8)) for _ in range(400))
    docs = [doc, "short one", doc[:999]]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"text": docs}), tmp_path / "data" / "train-00000.parquet")
    tok = train_tokenizer(iter(docs), Config(vocab_size=400, split_digits=split_digits))
    assert packing.cuts_exactly(tok)
    monkeypatch.setattr(packing, "PIECE_CHARS", 100)
    assert len(packing.split_pieces(doc, 100)) > 50 and "".join(packing.split_pieces(doc, 100)) == doc
    tokens = load_tokens(token_file(tmp_path / "data", "train", tok, tmp_path / "tokens"))
    expected = [t for d in docs for t in (*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id)]
    assert tokens.tolist() == expected


# --------------------------------------------------------------------------------------------
# The token file is a keyed cache: rebuilt when what it came from changes, validated on reuse


def _corpus(root, docs):
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": docs}), root / "train-00000.parquet")
    return root


def _expected(tok, docs):
    return [t for d in docs for t in (*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id)]


def test_token_file_is_rebuilt_for_a_new_tokenizer_and_reused_otherwise(tmp_path):
    data = _corpus(tmp_path / "data", DOCS)
    old = train_tokenizer(iter(DOCS), Config(vocab_size=300))
    new = train_tokenizer(iter(DOCS), Config(vocab_size=280))  # fewer merges: other ids
    path = token_file(data, "train", old, tmp_path / "tokens")
    stamp = path.stat().st_mtime_ns, path.stat().st_ino
    assert token_file(data, "train", old, tmp_path / "tokens") == path
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == stamp  # unchanged: reused, not rewritten
    token_file(data, "train", new, tmp_path / "tokens")
    assert load_tokens(path).tolist() == _expected(new, DOCS) != _expected(old, DOCS)


def test_token_file_is_rebuilt_when_the_corpus_changes(tmp_path):
    tok = train_tokenizer(iter(DOCS), Config(vocab_size=300))
    data = _corpus(tmp_path / "data", DOCS)
    path = token_file(data, "train", tok, tmp_path / "tokens")
    _corpus(data, DOCS[:10])
    assert load_tokens(token_file(data, "train", tok, tmp_path / "tokens")).tolist() == _expected(tok, DOCS[:10])
    assert path.with_name("train.bin.cache.json").is_file()


def test_a_truncated_token_file_is_rebuilt_never_read(tmp_path):
    tok = train_tokenizer(iter(DOCS), Config(vocab_size=300))
    data = _corpus(tmp_path / "data", DOCS)
    path = token_file(data, "train", tok, tmp_path / "tokens")
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 3])  # a crash or a full disk cut it
    said: list[str] = []
    token_file(data, "train", tok, tmp_path / "tokens", echo=said.append)
    assert path.read_bytes() == full
    assert len(said) == 1 and "truncated" in said[0] and str(path) in said[0]
    flipped = bytearray(full)
    flipped[10] ^= 1  # same size, other content
    path.write_bytes(bytes(flipped))
    token_file(data, "train", tok, tmp_path / "tokens", echo=said.append)
    assert path.read_bytes() == full and "sha256" in said[1]


def test_a_token_file_without_its_record_is_refused(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"\0" * 8)
    with pytest.raises(LmforgeError, match="no cache record"):
        load_tokens(tmp_path / "train.bin")

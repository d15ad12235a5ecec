"""Pre-training data: a corpus split tokenised once into a memory-mapped token file, read
as full-length blocks with EOS between documents — no padding anywhere.

    tokens = doc0 EOS doc1 EOS doc2 EOS ...            (uint16 when the vocab fits, else uint32)
    block i = tokens[i*T : i*T + T + 1]                 inputs = block[:-1], targets = block[1:]

Consecutive blocks share one token (the last target of block i is the first input of block
i+1), so every token of the corpus but the final partial block is predicted exactly once
per epoch. The order in which blocks are visited is a pure function of (seed, position), so
a resumed run needs only its step count to continue on exactly the same data.

The token file is a keyed cache (`RunDir.cache`): keyed by the corpus's fingerprint, the split
and the tokenizer's hash, so a new tokenizer or new data rebuilds it, and checked against its
recorded size and sha256 before reuse, so a truncated file is rebuilt, never trained on. The
block length is not part of the key: blocks are cut from the same token stream when read.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from lmforge.data.corpus import iter_texts
from lmforge.errors import LmforgeError
from lmforge.rundir import cache_record, fingerprint_path, keyed_cache

# A fast tokenizer keeps ~350 bytes of bookkeeping per input character while it encodes (a
# 1 MB document costs ~390 MiB of RSS), so long documents are encoded in pieces (see `split_pieces`)
# and a batch is flushed once it holds this many characters: ~90 MiB at most.
PIECE_CHARS = 1 << 16
BATCH_CHARS = 1 << 18

# A cut right after a newline that sits between two visible characters ("...word\nWord").
_CUT = re.compile(r"(?<=[!-~\w]\n)(?=[!-~\w])")


def cuts_exactly(tokenizer) -> bool:
    """True when encoding `split_pieces` of a text gives exactly the tokens of the whole text.

    That holds for byte-level BPE with GPT-2's pre-tokenizer regex and no normalizer (lmforge's
    own tokenizers, GPT-2's): the regex always ends a token before such a newline and makes the
    newline a token of its own, and BPE merges never cross pre-token boundaries. Splitting digits
    first (lmforge's split_digits) only adds boundaries, so it keeps that. Tokenizers with
    a normalizer or a prefix space (SentencePiece's "▁" at the start of the text) are not cut.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence":  # lmforge's split_digits: Digits (one per digit), then ByteLevel
        steps = pre.get("pretokenizers") or []
        digits = [p for p in steps[:-1] if p.get("type") == "Digits"]
        if len(digits) != len(steps) - 1:
            return False
        pre = steps[-1] if steps else {}
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and not pre.get("add_prefix_space", False)
        and pre.get("use_regex", True)
        and not any("\n" in t.get("content", "") for t in spec.get("added_tokens") or [])
    )


def split_pieces(text: str, size: int) -> list[str]:
    """`text` cut at `_CUT` positions into pieces of at most about `size` characters (longer only
    where no cut position falls within `size` characters)."""
    if len(text) <= size:
        return [text]
    cuts = [m.start() for m in _CUT.finditer(text)]
    pieces, start = [], 0
    while len(text) - start > size:
        i = bisect.bisect_right(cuts, start + size) - 1  # the last cut within reach
        if i < 0 or cuts[i] <= start:
            i = bisect.bisect_right(cuts, start)  # none: the first cut after start
            if i == len(cuts):
                break
        pieces.append(text[start : cuts[i]])
        start = cuts[i]
    pieces.append(text[start:])
    return pieces


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides a text's token ids: the tokenizer's full definition
    (vocabulary, merges, pre-tokenizer, added tokens), its size and its EOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{type(tokenizer).__name__}\0{len(tokenizer)}\0{tokenizer.eos_token_id}\0{spec}".encode()).hexdigest()


def token_file(data: str | Path, split: str, tokenizer, out_dir: Path, *, batch_docs: int = 512,
               echo=print) -> Path:
    """`split` of a curated corpus tokenised into `out_dir/<split>.bin`: a keyed cache, rebuilt when
    the corpus or the tokenizer changes or the file no longer matches its record."""
    parts = {"kind": "tokens-v1", "data": fingerprint_path(data), "split": split,
             "tokenizer": tokenizer_fingerprint(tokenizer)}
    return keyed_cache(Path(out_dir) / f"{split}.bin", parts,
                       lambda tmp: _write_tokens(data, split, tokenizer, tmp, batch_docs), echo=echo).path


def _write_tokens(data: str | Path, split: str, tokenizer, path: Path, batch_docs: int) -> dict:
    """Tokenise `split` into the file `path`; returns the counts and dtype kept in the cache record."""
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    eos = tokenizer.eos_token_id
    piece_chars = PIECE_CHARS if cuts_exactly(tokenizer) else None
    n_docs = n_tokens = n_bytes = buf_chars = 0
    with open(path, "wb") as f:
        buf: list[str] = []
        ends: list[bool] = []  # buf[i] is the last piece of its document: EOS follows it

        def flush() -> None:
            nonlocal n_tokens, buf, ends, buf_chars
            if not buf:
                return
            enc = tokenizer(buf, add_special_tokens=False)["input_ids"]
            flat = np.fromiter((t for ids, end in zip(enc, ends) for t in (*ids, *((eos,) if end else ()))), dtype=dtype)
            f.write(flat.tobytes())
            n_tokens += len(flat)
            buf, ends, buf_chars = [], [], 0

        for text in iter_texts(data, split, required=(split == "train")):
            n_docs += 1
            n_bytes += len(text.encode("utf-8"))
            pieces = split_pieces(text, piece_chars) if piece_chars else [text]
            for i, piece in enumerate(pieces):
                buf.append(piece)
                ends.append(i == len(pieces) - 1)
                buf_chars += len(piece)
                if len(buf) >= batch_docs or buf_chars >= BATCH_CHARS:
                    flush()
        flush()
        f.flush()
        os.fsync(f.fileno())
    return {"docs": n_docs, "tokens": n_tokens, "bytes": n_bytes, "dtype": np.dtype(dtype).name}


def load_tokens(path: Path) -> np.ndarray:
    """The token file written by `token_file`, memory-mapped with the dtype its record names."""
    rec = cache_record(path)
    if rec is None or not isinstance(rec.get("info"), dict) or "dtype" not in rec["info"]:
        raise LmforgeError(f"Token file {path} has no cache record beside it; delete it and re-run the stage.")
    meta = rec["info"]
    if meta["tokens"] == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(path, dtype=meta["dtype"], mode="r")


class PackedBlocks:
    """Fixed-length blocks of a token array, visited in a seeded order epoch after epoch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, *, seed: int, shuffle: bool = True, what: str = "data"):
        self.tokens, self.seq_len, self.seed, self.shuffle = tokens, seq_len, seed, shuffle
        self.n_blocks = (len(tokens) - 1) // seq_len if len(tokens) > 1 else 0
        if self.n_blocks == 0:
            raise LmforgeError(
                f"The {what} split has {len(tokens)} tokens, fewer than one block of seq_len {seq_len} + 1; "
                "add data or lower seq_len."
            )
        self._perm_epoch, self._perm = -1, None

    def index_at(self, position: int) -> int:
        """Block index visited at global sample `position` (epoch = position // n_blocks)."""
        epoch, j = divmod(position, self.n_blocks)
        if not self.shuffle:
            return j
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n_blocks, generator=g), epoch
        return int(self._perm[j])

    def batch(self, start: int, size: int) -> dict:
        """Samples at positions start .. start+size-1 as a batch of inputs and targets."""
        T = self.seq_len
        # Each block is copied from the memmap straight into one int64 array (the dtype embedding
        # lookups need): one copy per token, no per-block tensors to stack.
        blocks = np.empty((size, T + 1), dtype=np.int64)  # (B, T+1)
        for row, p in enumerate(range(start, start + size)):
            s = self.index_at(p) * T
            blocks[row] = self.tokens[s : s + T + 1]
        blocks = torch.from_numpy(blocks)
        return {"input_ids": blocks[:, :-1], "labels": blocks[:, 1:], "n": size * T}

    def epochs(self, positions: int) -> float:
        return positions / self.n_blocks


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (0 for special tokens), for bits-per-byte.

    For byte-level BPE each character of a token's string is one byte; for other tokenizers
    the decoded string's UTF-8 length is used (exact except for tokens that split a character).
    """
    n = len(tokenizer)
    lengths = torch.zeros(n, dtype=torch.long)
    special = set(tokenizer.all_special_ids)
    byte_level = "ByteLevel" in json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}) \
        if hasattr(tokenizer, "backend_tokenizer") else False
    toks = tokenizer.convert_ids_to_tokens(list(range(n)))
    for i, t in enumerate(toks):
        if i in special or t is None:
            continue
        lengths[i] = len(t) if byte_level else len(tokenizer.decode([i]).encode("utf-8"))
    return lengths


def bits_per_byte(nats_sum: float, n_bytes: int) -> float:
    return nats_sum / math.log(2) / n_bytes if n_bytes else float("nan")

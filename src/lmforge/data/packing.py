"""Pre-training data: a corpus split tokenised once into a memory-mapped token file, read
as full-length blocks with EOS between documents — no padding anywhere.

    tokens = doc0 EOS doc1 EOS doc2 EOS ...            (uint16 when the vocab fits, else uint32)
    block i = tokens[i*T : i*T + T + 1]                 inputs = block[:-1], targets = block[1:]

Consecutive blocks share one token (the last target of block i is the first input of block
i+1), so every token of the corpus but the final partial block is predicted exactly once
per epoch. The order in which blocks are visited is a pure function of (seed, position), so
a resumed run needs only its step count to continue on exactly the same data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from lmforge.data.corpus import iter_texts
from lmforge.errors import LmforgeError
from lmforge.rundir import atomic_write_json


def token_file(data: str | Path, split: str, tokenizer, out_dir: Path, *, batch_docs: int = 512) -> Path:
    """Tokenise `split` of a curated corpus into `out_dir/<split>.bin` (once; reused if present)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path, meta_path = out_dir / f"{split}.bin", out_dir / f"{split}.json"
    if path.is_file() and meta_path.is_file():
        return path
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    eos = tokenizer.eos_token_id
    tmp = path.with_suffix(".bin.tmp")
    n_docs = n_tokens = n_bytes = 0
    with open(tmp, "wb") as f:
        buf: list[str] = []

        def flush() -> None:
            nonlocal n_tokens
            nonlocal buf
            if not buf:
                return
            enc = tokenizer(buf, add_special_tokens=False)["input_ids"]
            flat = np.fromiter((t for ids in enc for t in (*ids, eos)), dtype=dtype)
            f.write(flat.tobytes())
            n_tokens += len(flat)
            buf = []

        for text in iter_texts(data, split, required=(split == "train")):
            buf.append(text)
            n_docs += 1
            n_bytes += len(text.encode("utf-8"))
            if len(buf) >= batch_docs:
                flush()
        flush()
    tmp.replace(path)
    atomic_write_json(meta_path, {"docs": n_docs, "tokens": n_tokens, "bytes": n_bytes, "dtype": np.dtype(dtype).name})
    return path


def load_tokens(path: Path) -> np.ndarray:
    meta = json.loads(path.with_suffix(".json").read_text())
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

    def block(self, i: int) -> torch.Tensor:
        s = i * self.seq_len
        return torch.from_numpy(self.tokens[s : s + self.seq_len + 1].astype(np.int64))

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
        blocks = torch.stack([self.block(self.index_at(p)) for p in range(start, start + size)])  # (B, T+1)
        return {"input_ids": blocks[:, :-1], "labels": blocks[:, 1:], "n": blocks[:, 1:].numel()}

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

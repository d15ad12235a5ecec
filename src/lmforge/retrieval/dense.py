"""Dense retrieval: an embedding model and the FAISS index holding the chunk vectors.

Embedding models (`load_embedder`):

    a sentence-transformers folder (has modules.json)   loaded by sentence-transformers itself, so
                                                        its pooling and normalisation are its own
    any causal LM folder lmforge can load (fallback)    mean of the last hidden states over the
                                                        text's tokens (padding excluded), through
                                                        `lmforge.models.load_model`

Vectors are L2-normalised, so the inner product FAISS ranks by is the cosine similarity.
An embedder's `identity` (kind + content hash of its folder) is recorded in the index; a
query with another embedding model is refused, since vectors from two models are not comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.rundir import fingerprint_path, resolve_artifact


@dataclass
class Embedder:
    kind: str  # "sentence-transformers" | "causal-mean"
    source: str
    sha256: str
    model: Any
    tokenizer: Any = None
    batch_size: int = 32

    @property
    def identity(self) -> dict:
        return {"kind": self.kind, "source": self.source, "sha256": self.sha256}

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, unit rows."""
        if self.kind == "sentence-transformers":
            v = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
        else:
            v = np.concatenate([mean_pooled(self.model, self.tokenizer, texts[i:i + self.batch_size])
                                for i in range(0, len(texts), self.batch_size)]) if texts else np.zeros((0, 1))
        v = np.asarray(v, dtype=np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def load_embedder(path: str | Path) -> Embedder:
    folder = resolve_artifact(path, "embedding model")
    sha = fingerprint_path(folder)
    if (folder / "modules.json").is_file():
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise LmforgeError(f"{folder} is a sentence-transformers model; install lmforge[rag] to use it.") from None
        try:
            model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        except Exception as e:  # many error types from a bad folder
            raise LmforgeError(f"The embedding model in {folder} cannot be loaded ({str(e).splitlines()[0]}).") from None
        return Embedder("sentence-transformers", str(folder), sha, model)
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models import load_model

    model = load_model(folder).eval()
    return Embedder("causal-mean", str(folder), sha, model, load_tokenizer(folder))


def mean_pooled(model: Any, tokenizer: Any, texts: list[str]) -> np.ndarray:
    """Mean of the last layer's hidden states over each text's tokens (right padding masked)."""
    import torch

    ctx = getattr(model.config, "max_position_embeddings", 1 << 30)
    enc = tokenizer(texts, add_special_tokens=False, padding=True, truncation=True, max_length=ctx,
                    return_tensors="pt", padding_side="right")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True,
                    use_cache=False)
    h = out.hidden_states[-1].float()  # (B, T, D)
    m = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    return (h * m).sum(1).div(m.sum(1).clamp(min=1)).numpy()


class DenseStore:
    """Chunk vectors in a FAISS exact inner-product index keyed by 63-bit chunk ids."""

    FILE = "dense.faiss"

    def __init__(self, index: Any):
        self.index = index

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray) -> "DenseStore":
        import faiss

        index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
        return cls(index)

    @property
    def dim(self) -> int:
        return self.index.d

    def vectors(self, ids: list[int]) -> np.ndarray:
        """The stored vectors of `ids` (an update reuses them instead of embedding again)."""
        if not ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self.index.reconstruct(int(i)) for i in ids])

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        k = min(k, self.index.ntotal)
        if k == 0:
            return []
        scores, ids = self.index.search(np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32), k)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i != -1]

    def save(self, folder: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(folder / self.FILE))

    @classmethod
    def load(cls, folder: Path) -> "DenseStore":
        import faiss

        return cls(faiss.read_index(str(folder / cls.FILE)))

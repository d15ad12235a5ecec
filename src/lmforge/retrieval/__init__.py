"""Retrieval: documents -> token-aware chunks -> a lexical (BM25) and a dense index -> the top
passages, fused, put into the prompt.

    documents (curate's formats + Markdown) ──documents.py──> Document(key, text, sha256)
        ──chunking.py (the model's tokenizer)──> chunks with overlap
        ──lexical.py──> BM25 (bm25s)            ┐
        ──dense.py───> vectors in FAISS          ├─ index.py: one folder, every document's hash,
                                                 ┘  the tokenizer/embedding model it was built with
    query ──index.search──> BM25 ranking + dense ranking ──fusion.py (RRF)──> passages
        ──prompt.py──> a documented context section in the chat prompt, passages numbered [1]..[k]

Libraries, chosen rather than written:

- `bm25s` (BM25 as sparse matrices, Lucene scoring; maintained, numpy/scipy only, ~100 kB). It
  scores a 100k-chunk corpus in milliseconds and saves/loads its matrices as plain .npy files;
  writing BM25 ourselves would mean re-deriving and re-testing the same formulas.
- `faiss-cpu` (Meta's vector search library; maintained, one wheel, no server) holds the dense
  vectors: an exact inner-product index (`IndexFlatIP` on unit vectors = cosine) wrapped in an
  id map, so chunks keep stable 63-bit ids, are removed and added in place, and the index is
  one file. Exact search keeps results deterministic (an index update equals a rebuild, tested);
  at the sizes lmforge targets (≤ 10^6 chunks on a CPU) exact search is fast enough, and an
  approximate FAISS index is a one-line change. sqlite-vec was the other candidate, but the
  Python here is built without SQLite extension loading; LanceDB pulls in a larger stack.
- `sentence-transformers` loads any local sentence-transformers-format embedding model (its
  modules.json: transformer, pooling, normalisation) exactly as its authors run it. Without
  one, the causal model's own mean-pooled last hidden states embed queries and chunks (a weak
  but dependency-free fallback, loaded through `lmforge.models.load_model`).

All three are in the `rag` extra (`pip install 'lmforge[rag]'`; `make` installs it).
"""

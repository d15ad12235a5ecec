"""A stage's derived files follow what they came from (issue 12's reproduction): re-running a
recipe with another tokenizer, other curated data or another block length trains on token ids
made by the tokenizer and data of this run, never on a stale token file."""

from __future__ import annotations

import numpy as np
import yaml
from transformers import AutoTokenizer

from lmforge import pipeline
from lmforge.data.corpus import iter_texts
from lmforge.data.packing import load_tokens
from lmforge.rundir import read_manifest

WORLD = dict(seed=3, paraphrases=1, trivia_lists=5, filler_paragraphs=120, near_duplicates=5, exact_duplicates=5,
             junk_rows=5, tokenizer_countries=20, tokenizer_trivia_lists=2, tokenizer_filler_paragraphs=5)


def recipe(tmp_path):
    stages = [
        {"stage": "world", **WORLD},
        {"stage": "curate", "inputs": ["@world/pretrain/corpus.jsonl"],
         "splits": {"train": 0.9, "validation": 0.1, "test": 0.0}},
        {"stage": "tokenizer", "corpus": ["@world/tokenizer/corpus.jsonl"], "vocab_size": 400},
        {"stage": "pretrain", "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "context_length": 32},
         "train": {"max_steps": 2, "batch_size": 2, "eval_every": 0, "checkpoint_every": 0, "log_every": 1,
                   "tensorboard": False, "threads": 1}},
    ]
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "out_dir": str(tmp_path / "runs"), "stages": stages}))
    return p


def expected_ids(run):
    tok = AutoTokenizer.from_pretrained(str(run / "tokenizer" / "tokenizer"))
    docs = list(iter_texts(run / "curate", "train"))
    return [t for d in docs for t in (*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id)], len(tok)


def test_token_file_follows_the_tokenizer_the_data_and_is_reused_when_nothing_changed(tmp_path):
    r, run = recipe(tmp_path), tmp_path / "runs" / "t"
    quiet = dict(echo=lambda *_: None)
    tokens = run / "pretrain" / "tokens" / "train.bin"

    pipeline.run_recipe(r, **quiet)
    ids, _ = expected_ids(run)
    assert load_tokens(tokens).tolist() == ids

    # A smaller vocabulary: the old file's ids would index past the new embedding (IndexError).
    pipeline.run_recipe(r, ["tokenizer.vocab_size=300"], **quiet)
    ids, n_vocab = expected_ids(run)
    got = load_tokens(tokens)
    assert got.tolist() == ids and int(np.max(got)) < n_vocab <= 300
    assert read_manifest(run / "pretrain")["status"] == "complete"

    # A larger one again: the stale file would train silently on the 300-token ids.
    pipeline.run_recipe(r, **quiet)
    ids, _ = expected_ids(run)
    assert load_tokens(tokens).tolist() == ids and int(np.max(load_tokens(tokens))) >= 300

    # Other curated data (another split moves documents between train and validation).
    pipeline.run_recipe(r, ["curate.splits={train: 0.8, validation: 0.2, test: 0.0}"], **quiet)
    new_ids, _ = expected_ids(run)
    assert new_ids != ids and load_tokens(tokens).tolist() == new_ids

    # Nothing changed: every stage skipped, the token file untouched.
    stamp = tokens.stat().st_mtime_ns, tokens.stat().st_ino
    pipeline.run_recipe(r, ["curate.splits={train: 0.8, validation: 0.2, test: 0.0}"], **quiet)
    assert (tokens.stat().st_mtime_ns, tokens.stat().st_ino) == stamp

    # Another block length re-runs pretrain (a fresh start) on the same token stream: the file's
    # content does not depend on seq_len (blocks are cut when read), so it is reused as is.
    out_before = read_manifest(run / "pretrain")["output_id"]
    pipeline.run_recipe(r, ["curate.splits={train: 0.8, validation: 0.2, test: 0.0}", "pretrain.seq_len=16"], **quiet)
    m = read_manifest(run / "pretrain")
    assert m["output_id"] != out_before and m["status"] == "complete"
    assert (tokens.stat().st_mtime_ns, tokens.stat().st_ino) == stamp
    assert "seq_len 16" in (run / "pretrain" / "log.txt").read_text()

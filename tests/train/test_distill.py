"""The `distill` stage: its first loss is the pure function's value on a hand-assembled batch, the
teacher's top-k cache is reused when nothing changed and rebuilt for another teacher, and a
teacher with another tokenizer or without an LM head is refused in one sentence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.losses import distill_loss
from lmforge.pipeline import run_single
from lmforge.rundir import cache_record

from ..data.test_sft_data import (
    arithmetic_rows,
    encode_rows,
    make_tokenizer,
    save_base,
    tiny_llama,
    write_jsonl,
)
from .conftest import first_losses, write_yaml

ROWS = arithmetic_rows(held_out=False)[:6]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("student") / "model", seed=0)


def save_teacher(path: Path, seed: int) -> Path:
    from lmforge.models import save_model

    tok = make_tokenizer()
    save_model(tiny_llama(len(tok), seed=seed, d=32, layers=3), tok, path)  # another size than the student
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("teacher") / "model", seed=5)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", ROWS)


def config(data, student, teacher, **kw) -> dict:
    t = dict(max_steps=1, batch_size=len(ROWS), lr=1e-3, warmup_steps=0, eval_every=0, checkpoint_every=0,
             log_every=1, tensorboard=False, threads=1, seed=3)
    t.update(kw.pop("train", {}))
    return {"data": str(data), "model": str(student), "teacher": str(teacher), "batching": "pad", "top_k": 5,
            "train": t, **kw}


def run(tmp: Path, cfg: dict, name: str = "run", force: bool = False) -> dict:
    path = write_yaml(tmp / f"{name}.yaml", cfg)
    return run_single("distill", str(path), [], out=str(tmp / name), force=force, resume=False, echo=lambda *a: None)


def hand_assembled_first_loss(tmp: Path, student: Path, teacher: Path, *, kind: str, weight: float, k: int) -> float:
    """Every example once (step 1's batch holds all rows): each model run on each example alone,
    the teacher's top-k rounded to fp16 as the cache stores it, the pure function summed."""
    from transformers import AutoModelForCausalLM

    ex, _, _ = encode_rows(tmp, ROWS)
    s_model = AutoModelForCausalLM.from_pretrained(str(student)).eval()
    t_model = AutoModelForCausalLM.from_pretrained(str(teacher)).eval()
    total, n = 0.0, 0
    for i in range(len(ex)):
        ids, sup = ex.example(i)
        pos = np.nonzero(sup[1:])[0]  # position t predicts token t + 1
        x = torch.from_numpy(ids.astype(np.int64))[None]
        with torch.no_grad():
            s_logp = torch.log_softmax(s_model(x).logits[0, pos], -1)
            top = torch.log_softmax(t_model(x).logits[0, pos], -1).topk(k, -1)
        labels = x[0, pos + 1]
        nll = -s_logp.gather(-1, labels[:, None])[:, 0]
        out = distill_loss(s_logp.gather(-1, top.indices), top.values.half().float(), nll,
                           torch.ones(len(pos), dtype=torch.bool), kind=kind, weight=weight)
        total += float(out.loss.sum())
        n += len(pos)
    return total / n


@pytest.mark.parametrize("kind,weight,method", [("forward_kl", 0.5, "none"), ("jsd", 0.3, "lora")])
def test_first_loss_equals_the_pure_function_on_the_hand_assembled_batch(tmp_path, student_dir, teacher_dir,
                                                                         train_file, kind, weight, method):
    # A fresh LoRA adapter starts as the identity (B = 0), so its first loss is the full model's too.
    cfg = config(train_file, student_dir, teacher_dir, divergence=kind, distill_weight=weight,
                 adapter={"method": method})
    m = run(tmp_path, cfg)
    want = hand_assembled_first_loss(tmp_path, student_dir, teacher_dir, kind=kind, weight=weight, k=5)
    got = first_losses(tmp_path / "run", "distill", 1)[0]
    assert got == pytest.approx(want, abs=1e-5), (got, want)
    assert m["summary"]["teacher_cache"] == "built" and m["summary"]["method"] == method
    assert (tmp_path / "run" / "model" / ("adapter_config.json" if method == "lora" else "config.json")).is_file()


def test_teacher_cache_reused_when_unchanged_and_rebuilt_for_another_teacher(tmp_path, student_dir, teacher_dir,
                                                                             train_file):
    cfg = config(train_file, student_dir, teacher_dir)
    first = run(tmp_path, cfg)["summary"]
    cache = tmp_path / "run" / "teacher"
    idx, lp = np.load(cache / "indices.npy"), np.load(cache / "logprobs.npy")
    assert idx.dtype == np.int32 and lp.dtype == np.float16
    assert idx.shape == (first["supervised_tokens"], 5) and first["teacher_cache_bytes"] == idx.shape[0] * 5 * 6
    assert (lp[:, :-1] >= lp[:, 1:]).all() and (lp <= 0).all()  # top-k, most likely first
    key = cache_record(cache)["key"]

    again = run(tmp_path, cfg, force=True)["summary"]  # a forced re-run: the teacher is not run again
    assert again["teacher_cache"] == "reused" and cache_record(cache)["key"] == key

    other = save_teacher(tmp_path / "teacher2", seed=6)
    third = run(tmp_path, config(train_file, student_dir, other))["summary"]
    assert third["teacher_cache"] == "built" and cache_record(cache)["key"] != key
    assert not np.array_equal(np.load(cache / "logprobs.npy"), lp)

    fewer = run(tmp_path, config(train_file, student_dir, other, top_k=3))["summary"]  # k is part of the key
    assert fewer["teacher_cache"] == "built" and np.load(cache / "indices.npy").shape[1] == 3


def test_teacher_with_another_tokenizer_is_refused(tmp_path, student_dir, train_file):
    from lmforge.data.tokenizer import Config, train_tokenizer
    from lmforge.models import save_model

    tok = train_tokenizer(iter(["completely different text " * 20, "other words entirely"] * 50), Config(vocab_size=280))
    save_model(tiny_llama(len(tok), seed=1), tok, tmp_path / "teacher")
    with pytest.raises(LmforgeError, match=r"uses another tokenizer than the student's tokenizer .* same tokenizer"):
        run(tmp_path, config(train_file, student_dir, tmp_path / "teacher"))


def test_teacher_that_is_not_a_causal_lm_is_refused(tmp_path, student_dir, train_file):
    from transformers import LlamaForSequenceClassification

    tok = make_tokenizer()
    lm = tiny_llama(len(tok))
    clf = LlamaForSequenceClassification(lm.config)
    clf.save_pretrained(str(tmp_path / "clf"))
    tok.save_pretrained(str(tmp_path / "clf"))
    with pytest.raises(LmforgeError, match="is a LlamaForSequenceClassification, not a causal language model"):
        run(tmp_path, config(train_file, student_dir, tmp_path / "clf"))


@pytest.mark.parametrize("batching", ["pack", "group", "pad"])
def test_teacher_rows_line_up_with_the_supervised_labels_in_every_batching(tmp_path, batching):
    """A fake cache whose row for each supervised position holds that position's own label: in any
    batch, the teacher rows must then repeat labels[labels != IGNORE] exactly."""
    from lmforge.data.sft import IGNORE, make_batches
    from lmforge.train.distill import TeacherBatches

    ex, _, _ = encode_rows(tmp_path, arithmetic_rows(held_out=False)[:40])
    targets = ex.ids[np.nonzero(ex.sup)[0]].astype(np.int32)  # the labels, in data order
    idx = np.repeat(targets[:, None], 2, axis=1)
    lp = np.zeros(idx.shape, np.float16)
    data = TeacherBatches(make_batches(ex, batching, seq_len=64, batch_size=3, seed=1, pad_id=0), ex, idx, lp)
    for start in (0, 3, 9, 3 * data.n + 1):  # the last one wraps into a later epoch
        b = data.batch(start, 3)
        labels = b["labels"][b["labels"] != IGNORE]
        assert torch.equal(b["teacher_idx"][:, 0], labels) and b["teacher_idx"].shape == (b["n"], 2)


def test_sigkilled_run_resumes_bitwise_with_the_teacher_cache_reused(tmp_path, student_dir, teacher_dir, train_file):
    import random

    from safetensors.torch import load_file

    from .conftest import assert_bitwise_equal, sigkill_after_checkpoint

    cfg = config(train_file, student_dir, teacher_dir, divergence="reverse_kl", batching="pack",
                 train={"max_steps": 16, "batch_size": 2, "checkpoint_every": 1, "keep_checkpoints": 2})
    run(tmp_path, cfg, "ref")
    path = write_yaml(tmp_path / "k.yaml", cfg)
    out = tmp_path / "killed"
    killed_at = sigkill_after_checkpoint("distill", path, out, random.Random().randint(2, 12))
    assert int(killed_at.name[5:]) < 16
    m = run_single("distill", str(path), [], out=str(out), force=False, resume=True, echo=lambda *a: None)
    assert m["status"] == "complete" and m["summary"]["teacher_cache"] == "reused"
    assert_bitwise_equal(load_file(str(tmp_path / "ref" / "model" / "model.safetensors")),
                         load_file(str(out / "model" / "model.safetensors")))

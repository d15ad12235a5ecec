"""Command-line failures the README promises as one sentence and exit status 2, not a traceback
(issue 13's list). Each runs `lmforge.cli.main` in this process, as the console script does."""

from __future__ import annotations

import errno
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from lmforge.errors import LmforgeError


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """(exit status, stderr) of `lmforge ARGS`."""
    from lmforge.cli import main

    monkeypatch.setattr(sys, "argv", ["lmforge", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def one_sentence(code: int, err: str, *parts: str) -> str:
    """Asserts exit 2, no traceback, and a last stderr line `error: ...` holding every part (progress
    bars may come before it); returns that line."""
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and lines and lines[-1].startswith("error: "), err
    assert sum(x.startswith("error") for x in lines) == 1, err
    for p in parts:
        assert p in lines[-1], err
    return lines[-1]


def write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def int_text_data(tmp_path):
    """A curated-looking folder whose `text` column holds integers."""
    d = tmp_path / "ints"
    d.mkdir()
    pq.write_table(pa.table({"text": [1, 2, 3]}), d / "train-00000.parquet")
    pq.write_table(pa.table({"text": [4]}), d / "validation-00000.parquet")
    return d


def test_generate_out_naming_a_folder(monkeypatch, capsys, tmp_path, tiny_model_dir):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    folder = tmp_path / "outdir"
    folder.mkdir()
    code, err = cli(monkeypatch, capsys, "generate", str(tiny_model_dir), "--prompts", str(tmp_path / "p.jsonl"),
                    "--out", str(folder), "max_new_tokens=2")
    one_sentence(code, err, f"--out {folder} is a folder")
    assert list(folder.iterdir()) == []


def test_tokenizer_on_integer_text_column(monkeypatch, capsys, tmp_path, int_text_data):
    cfg = write_yaml(tmp_path / "t.yaml", {"data": str(int_text_data), "vocab_size": 300})
    code, err = cli(monkeypatch, capsys, "tokenizer", cfg, "--out", str(tmp_path / "tok"))
    one_sentence(code, err, str(int_text_data / "train-00000.parquet"), "column `text` holds int64, not text")
    assert not (tmp_path / "tok" / "tokenizer").exists()


def test_pretrain_on_integer_text_column(monkeypatch, capsys, tmp_path, int_text_data, tiny_model_dir):
    cfg = write_yaml(tmp_path / "p.yaml", {
        "data": str(int_text_data), "tokenizer": str(tiny_model_dir),
        "model": {"n_layers": 1, "d_model": 16, "n_heads": 2, "context_length": 16},
        "train": {"max_steps": 1, "batch_size": 1, "tensorboard": False, "threads": 1}})
    code, err = cli(monkeypatch, capsys, "pretrain", cfg, "--out", str(tmp_path / "pre"))
    one_sentence(code, err, "column `text` holds int64, not text")
    assert not (tmp_path / "pre" / "model").exists()


def test_tokenizer_refuses_an_empty_corpus(monkeypatch, capsys, tmp_path):
    data = tmp_path / "empty"
    data.mkdir()
    pq.write_table(pa.table({"text": pa.array(["", "  "], pa.string())}), data / "train-00000.parquet")
    cfg = write_yaml(tmp_path / "t.yaml", {"data": str(data), "vocab_size": 300})
    code, err = cli(monkeypatch, capsys, "tokenizer", cfg, "--out", str(tmp_path / "tok"))
    one_sentence(code, err, f"read no text from the train split of {data}")
    assert not (tmp_path / "tok" / "tokenizer").exists()
    # a corpus of files: the same refusal, naming them
    (tmp_path / "c.jsonl").write_text("")
    cfg = write_yaml(tmp_path / "t2.yaml", {"corpus": [str(tmp_path / "c.jsonl")], "vocab_size": 300})
    code, err = cli(monkeypatch, capsys, "tokenizer", cfg, "--out", str(tmp_path / "tok2"))
    one_sentence(code, err, f"read no text from {tmp_path / 'c.jsonl'}")


def _deny_writes_under(monkeypatch, root):
    """Make `root` read-only. Root ignores permission bits, so there the kernel's refusal is
    imitated at the one call every lmforge output starts with: creating a folder."""
    os.chmod(root, 0o555)
    probe = root / ".probe"
    try:
        probe.mkdir()
    except PermissionError:
        return
    probe.rmdir()
    real_mkdir = os.mkdir

    def mkdir(path, *a, **kw):
        if str(os.fspath(path)).startswith(str(root) + os.sep):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(os, "mkdir", mkdir)


def test_read_only_output_folder(monkeypatch, capsys, tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "some words to learn merges from " * 20}) + "\n")
    cfg = write_yaml(tmp_path / "t.yaml", {"corpus": [str(tmp_path / "c.jsonl")], "vocab_size": 300})
    ro = tmp_path / "ro"
    ro.mkdir()
    _deny_writes_under(monkeypatch, ro)
    try:
        code, err = cli(monkeypatch, capsys, "tokenizer", cfg, "--out", str(ro / "tok"))
        line = one_sentence(code, err, str(ro), "permission denied", "permissions")
        assert "Traceback" not in err and line.count(". ") == 0
        assert list(ro.iterdir()) == []  # nothing half-written
    finally:
        os.chmod(ro, 0o755)


def test_eval_message_names_no_option_eval_lacks(tmp_path):
    from lmforge.eval.stage import Config as EvalConfig
    from lmforge.eval.tasks import Task, load_rows

    assert "on_bad_rows" not in EvalConfig.model_fields and "on_bad_rows" not in Task.model_fields
    f = tmp_path / "rows.jsonl"
    f.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": oops}\n')
    task = Task(name="t", file=str(f), scorers=["exact_match"])
    with pytest.raises(LmforgeError) as e:
        load_rows(task, f)
    msg = str(e.value)
    assert f"{f} line 2 is not valid JSON" in msg and msg.endswith("; fix it.") and "on_bad_rows" not in msg


def test_stages_with_on_bad_rows_still_suggest_it(tmp_path):
    from lmforge.data.formats import iter_records

    f = tmp_path / "rows.jsonl"
    f.write_text("[1]\n")
    with pytest.raises(LmforgeError, match=r"line 1 is a JSON list, not an object; fix it, or set on_bad_rows: skip"):
        list(iter_records(str(f)))


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_rl_on_an_empty_prompts_file(monkeypatch, capsys, tmp_path, tiny_model_dir, stage):
    (tmp_path / "prompts.jsonl").write_text("\n")
    cfg = write_yaml(tmp_path / "g.yaml", {
        "model": str(tiny_model_dir), "prompts": str(tmp_path / "prompts.jsonl"), "rewards": [{"kind": "answer"}],
        "train": {"max_steps": 1, "tensorboard": False, "threads": 1}})
    code, err = cli(monkeypatch, capsys, stage, cfg, "--out", str(tmp_path / "rl"))
    line = one_sentence(code, err, f"prompts {tmp_path / 'prompts.jsonl'} hold no prompt rows")
    assert "max_new_tokens" not in line


def test_nan_learning_rate(monkeypatch, capsys, tmp_path):
    from lmforge.config import TrainConfig, validate

    for value in (float("nan"), float("inf")):
        with pytest.raises(LmforgeError) as e:
            validate(TrainConfig, {"lr": value})
        assert "lr" in str(e.value) and "finite" in str(e.value) and "≤ 1" not in str(e.value)
    cfg = write_yaml(tmp_path / "p.yaml", {"data": str(tmp_path), "tokenizer": str(tmp_path)})
    code, err = cli(monkeypatch, capsys, "pretrain", cfg, "train.lr=.nan", "--out", str(tmp_path / "o"))
    one_sentence(code, err, "Config key train.lr is invalid (got nan): Input should be a finite number")


def test_unterminated_string_message_reads_once(tmp_path):
    from lmforge.data.formats import iter_records

    f = tmp_path / "rows.jsonl"
    f.write_text('{"text": "never closed')
    with pytest.raises(LmforgeError) as e:
        list(iter_records(str(f)))
    assert "(Unterminated string starting at column 10)" in str(e.value) and "at at" not in str(e.value)


def test_whole_config_check_is_not_called_config_key_config(monkeypatch, capsys, tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n')
    cfg = write_yaml(tmp_path / "t.yaml", {"corpus": [str(tmp_path / "c.jsonl")], "vocab_size": 100})
    code, err = cli(monkeypatch, capsys, "tokenizer", cfg, "--out", str(tmp_path / "tok"))
    line = one_sentence(code, err, f"{tmp_path / 't.yaml'}: vocab_size 100 is smaller than the 256 byte symbols")
    assert "Config key config" not in line
    # in a recipe, the stage's key path leads
    recipe = write_yaml(tmp_path / "r.yaml", {"name": "r", "out_dir": str(tmp_path / "runs"), "stages": [
        {"stage": "tokenizer", "corpus": [str(tmp_path / "c.jsonl")], "vocab_size": 100}]})
    code, err = cli(monkeypatch, capsys, "run", recipe)
    line = one_sentence(code, err, "stages.0: vocab_size 100 is smaller")
    assert "Config key config" not in line


def test_device_option_checked_where_given(monkeypatch, capsys, tmp_path, tiny_model_dir):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    base = ["generate", str(tiny_model_dir), "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o.jsonl")]
    code, err = cli(monkeypatch, capsys, *base, "--device", "tpu")
    one_sentence(code, err, "--device tpu: 'tpu' is not a device name torch knows")
    import torch

    if not torch.cuda.is_available():
        code, err = cli(monkeypatch, capsys, *base, "--device", "cuda:3")
        one_sentence(code, err, "--device cuda:3: this machine has 0 CUDA device(s); use cpu.")
    assert not (tmp_path / "o.jsonl").exists()
    # a stage's `device` setting: the same check, before any work
    cfg = write_yaml(tmp_path / "e.yaml", {"model": str(tiny_model_dir), "device": "tpu"})
    code, err = cli(monkeypatch, capsys, "rejection", cfg, "--out", str(tmp_path / "rej"))
    one_sentence(code, err, "Config key device is invalid (got 'tpu'): 'tpu' is not a device name torch knows")


def test_a_file_in_the_way_of_an_output_folder(monkeypatch, capsys, tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "some words to learn merges from " * 20}) + "\n")
    cfg = write_yaml(tmp_path / "t.yaml", {"corpus": [str(tmp_path / "c.jsonl")], "vocab_size": 300})
    (tmp_path / "taken").write_text("a file, not a folder")
    code, err = cli(monkeypatch, capsys, "tokenizer", cfg, "--out", str(tmp_path / "taken" / "tok"))
    one_sentence(code, err, str(tmp_path / "taken"), "part of the path is a file, not a folder")


def test_a_multi_line_reason_still_prints_one_line(monkeypatch, capsys, tmp_path):
    import lmforge.pipeline

    def boom(*a, **kw):
        raise LmforgeError("Input file x cannot be read (a library's reason\nspanning lines).")

    monkeypatch.setattr(lmforge.pipeline, "run_single", boom)
    code, err = cli(monkeypatch, capsys, "curate", "inputs=[x]")
    one_sentence(code, err, "(a library's reason spanning lines).")

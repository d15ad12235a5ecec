"""Run-folder writes: a staged folder replaces its target whole, or not at all."""

from __future__ import annotations

import pytest

from lmforge.rundir import staged_dir


def test_staged_dir_replaces_on_success_and_keeps_the_old_folder_on_error(tmp_path):
    final = tmp_path / "stage" / "model"
    with staged_dir(final) as tmp:
        assert tmp.parent == final.parent and not final.exists()
        (tmp / "weights").write_text("v1")
    assert (final / "weights").read_text() == "v1"

    with pytest.raises(RuntimeError, match="killed mid-write"):
        with staged_dir(final) as tmp:
            (tmp / "weights").write_text("half of v2")
            raise RuntimeError("killed mid-write")
    assert (final / "weights").read_text() == "v1"  # the complete old folder, untouched
    with staged_dir(final) as tmp:
        (tmp / "other").write_text("v3")
    assert sorted(p.name for p in final.iterdir()) == ["other"]  # replaced whole, not merged
    assert sorted(p.name for p in final.parent.iterdir()) == ["model"]  # no temporary folder left behind


def test_keyed_cache_builds_once_per_key_and_records_what_it_wrote(tmp_path):
    from lmforge.rundir import RunDir, cache_record

    rd = RunDir(tmp_path / "stage", stage="x", artifact="out")
    builds: list[str] = []

    def build(text):
        def write(tmp):
            builds.append(text)
            tmp.mkdir()
            (tmp / "a.txt").write_text(text)
            return {"chars": len(text)}
        return write

    c = rd.cache("base", {"model": "m1", "n": 1}, build("one"))
    assert not c.hit and c.info == {"chars": 3} and (c.path / "a.txt").read_text() == "one"
    rec = cache_record(c.path)
    assert rec["parts"] == {"model": "m1", "n": 1} and rec["files"]["a.txt"]["size"] == 3
    assert rd.cache("base", {"n": 1, "model": "m1"}, build("never")).hit  # same parts, any order
    c = rd.cache("base", {"model": "m2", "n": 1}, build("two"))  # another key: rebuilt whole
    assert not c.hit and (c.path / "a.txt").read_text() == "two" and builds == ["one", "two"]
    (c.path / "extra.txt").write_text("?")  # a folder that gained a file is not what was built
    assert not rd.cache("base", {"model": "m2", "n": 1}, build("two"), echo=lambda _: None).hit
    assert sorted(p.name for p in c.path.iterdir()) == ["a.txt"]


def test_a_failed_build_leaves_the_old_entry_and_no_temporaries(tmp_path):
    from lmforge.rundir import keyed_cache

    path = tmp_path / "t.bin"
    keyed_cache(path, {"k": 1}, lambda tmp: tmp.write_bytes(b"old"))

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        keyed_cache(path, {"k": 2}, broken)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["t.bin", "t.bin.cache.json"]
    assert keyed_cache(path, {"k": 1}, broken).hit  # the old entry still matches its own key


def test_fresh_start_keeps_config_manifest_and_keyed_caches_only(tmp_path):
    from lmforge.rundir import RunDir

    rd = RunDir(tmp_path / "stage", stage="x", artifact="model")
    rd.write_config({"a": 1})
    rd.write_manifest(status="complete")
    for name in ("checkpoints/step-000001/w", "model/w", "metrics.jsonl", "log.txt", "tensorboard/e",
                 "samples.jsonl", "tokens/stale.bin"):
        (rd.path / name).parent.mkdir(parents=True, exist_ok=True)
        (rd.path / name).write_text("x")
    rd.cache("tokens/train.bin", {"k": 1}, lambda tmp: tmp.write_bytes(b"ids"))
    rd.fresh_start()
    left = sorted(str(p.relative_to(rd.path)) for p in rd.path.rglob("*"))
    assert left == ["config.yaml", "manifest.json", "tokens", "tokens/train.bin", "tokens/train.bin.cache.json"]

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

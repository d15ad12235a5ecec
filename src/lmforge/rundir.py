"""A stage's run folder and the atomic writes that fill it.

    runs/<recipe>/<stage>/
        config.yaml      the resolved configuration (after defaults and overrides)
        manifest.json    stage type, input hash, status, artifact sub-folder, summary
        metrics.jsonl    one JSON object per logged step / evaluation
        log.txt          human-readable log lines
        checkpoints/     resumable training state (training stages)
        <artifact>/      the final artifact: data/, tokenizer/, model/, ...

Everything here is written to a temporary name and renamed into place, so a crash never
leaves a half-written file where a complete one is expected.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import LmforgeError

MANIFEST = "manifest.json"


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder `tmp` to `final`, replacing an older `final` safely.

    The old folder is renamed aside first and removed only after the new one is in place, so
    at every instant either the old or the new complete folder exists at `final` (or aside).
    """
    final = Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """A folder written completely or not at all. Write into the yielded temporary folder (a
    sibling of `final`, so the rename stays on one file system); when the block ends without an
    error it replaces `final` (replace_dir), otherwise it is deleted and `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_path(path: str | Path) -> str:
    """Content hash of a file, or of every file under a folder (names and bytes).

    A folder that is a completed lmforge stage contributes its manifest's `output_id`
    instead of re-hashing a large artifact.
    """
    p = Path(path)
    if (p / MANIFEST).is_file():
        m = read_manifest(p)
        if m and m.get("output_id"):
            return "stage:" + m["output_id"]
    if p.parent.joinpath(MANIFEST).is_file():
        m = read_manifest(p.parent)
        if m and m.get("output_id") and m.get("artifact") == p.name:
            return "stage:" + m["output_id"]
    if p.is_file():
        return file_sha256(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode())
            h.update(file_sha256(f).encode())
        return h.hexdigest()
    return "missing:" + str(p)


def read_manifest(stage_dir: str | Path) -> dict | None:
    p = Path(stage_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def resolve_artifact(path: str | Path, what: str = "artifact") -> Path:
    """Accept a stage folder (has manifest.json) or the artifact folder itself."""
    p = Path(path)
    m = read_manifest(p)
    if m is not None:
        if m.get("status") != "complete":
            raise LmforgeError(f"Stage folder {p} has not finished (status {m.get('status')!r}); run that stage first.")
        return p / m["artifact"]
    if not p.exists():
        raise LmforgeError(f"The {what} {p} does not exist; check the path or run the stage that writes it.")
    return p


class RunDir:
    """One stage's folder: config, manifest, metrics and log, all written safely."""

    def __init__(self, path: str | Path, stage: str, artifact: str):
        self.path = Path(path)
        self.stage = stage
        self.artifact_name = artifact
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def artifact(self) -> Path:
        return self.path / self.artifact_name

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, cfg: Any) -> None:
        data = cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else cfg
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(data, sort_keys=False))

    def log_metrics(self, record: dict) -> None:
        # Append-only JSON lines: a crash can at worst cut the last line, which readers skip.
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def read_metrics(self) -> list[dict]:
        out = []
        if self.metrics_path.is_file():
            for line in self.metrics_path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, drop metric lines logged after the checkpoint we continue from."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= after_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, line: str) -> None:
        stamp = _dt.datetime.now().strftime("%H:%M:%S")
        with open(self.path / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"[{stamp}] {line}\n")

    def manifest(self) -> dict | None:
        return read_manifest(self.path)

    def write_manifest(self, **fields: Any) -> None:
        m = self.manifest() or {}
        m.update(fields)
        m.setdefault("stage", self.stage)
        m["artifact"] = self.artifact_name
        atomic_write_json(self.path / MANIFEST, m)

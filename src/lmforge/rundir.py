"""A stage's run folder and the atomic writes that fill it.

    runs/<recipe>/<stage>/
        config.yaml      the resolved configuration (after defaults and overrides)
        manifest.json    stage type, input hash, status, artifact sub-folder, summary
        metrics.jsonl    one JSON object per logged step / evaluation
        log.txt          human-readable log lines
        checkpoints/     resumable training state (training stages)
        <artifact>/      the final artifact: data/, tokenizer/, model/, ...
        tokens/train.bin + tokens/train.bin.cache.json, ...   keyed caches (`RunDir.cache`)

Everything here is written to a temporary name and renamed into place, so a crash never
leaves a half-written file where a complete one is expected.

Derived files (token files, a merged starting model, reference log-probs, sampled data) are
keyed caches, made through `RunDir.cache` only: each is named by the hash of exactly what it
was derived from and validated against its recorded sizes and hashes before it is reused.
A fresh start (`RunDir.fresh_start`) removes everything but config.yaml, manifest.json and
the keyed caches, which then rebuild themselves if what they came from changed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import LmforgeError

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
CACHE_RECORD = ".cache.json"  # suffix: tokens/train.bin -> tokens/train.bin.cache.json
LOCK = ".lock"  # holds the PID of the process running in the folder (see `exclusive`)


def umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask can only set it)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(parent: Path, name: str) -> tuple[int, str]:
    """mkstemp beside `name`, with the mode an ordinary file gets under the user's umask (mkstemp
    makes 0600: an artifact renamed from it would be unreadable to the user's group)."""
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~umask())
    return fd, tmp


def temp_dir(parent: Path, name: str) -> Path:
    """mkdtemp beside `name`, with the mode an ordinary folder gets under the user's umask (not 0700)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}."))
    tmp.chmod(0o777 & ~umask())
    return tmp


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, path.name)
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
    tmp = temp_dir(final.parent, final.name)
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


@contextlib.contextmanager
def exclusive(folder: str | Path, *, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (a run or stage folder) for the block: `fcntl.flock` on
    `folder/.lock`, which holds our PID. A second process gets one sentence naming the holder's
    PID. The kernel releases the lock when the holder exits, however it exits, so a killed run
    never leaves a stale lock; the file itself stays (deleting it would race a new holder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LmforgeError(f"{what} {folder} is in use by another lmforge process (PID {holder}); wait for it to "
                           "finish or stop it, or write to another folder.") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


# --------------------------------------------------------------------------------------------
# Keyed caches: derived files named by the hash of what they came from


@dataclass
class Cached:
    """A keyed cache entry: its path, whether it was reused (`hit`), and the `info` its build returned."""

    path: Path
    hit: bool
    info: dict = field(default_factory=dict)


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 of the parts (JSON, sorted keys): the entry's key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _tree_files(path: Path) -> dict[str, dict]:
    """{relative name: {size, sha256}} of a file ("" names the file itself) or of every file in a folder."""
    files = [path] if path.is_file() else sorted(x for x in path.rglob("*") if x.is_file())
    return {("" if f == path else str(f.relative_to(path))): {"size": f.stat().st_size, "sha256": file_sha256(f)}
            for f in files}


def cache_record(path: str | Path) -> dict | None:
    """The record written beside a cache entry (key, parts, files, info), or None."""
    rec = Path(path).with_name(Path(path).name + CACHE_RECORD)
    try:
        return json.loads(rec.read_text()) if rec.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _cache_problem(path: Path, files: dict[str, dict]) -> str | None:
    """Why a cache entry with the right key cannot be reused (truncated, altered, missing), or None."""
    if not path.exists():
        return "is missing"
    actual = {k: v["size"] for k, v in _tree_files(path).items()}
    for name, want in files.items():
        where = path / name if name else path
        if name not in actual:
            return f"has lost {where}"
        if actual[name] != want["size"]:
            return f"{where} is {actual[name]} bytes, not the {want['size']} recorded (truncated or altered)"
        if file_sha256(where) != want["sha256"]:
            return f"{where} does not match its recorded sha256 (altered)"
    extra = sorted(set(actual) - set(files))
    return f"holds {path / extra[0]}, which it was not built with" if extra else None


def keyed_cache(path: str | Path, parts: dict[str, Any], build: Callable[[Path], dict | None], *,
                echo: Callable[[str], None] = print) -> Cached:
    """Reuse the derived file or folder at `path` if it was built from the same `parts`, else build it.

    parts   exactly what the entry is derived from, as JSON values: input files' fingerprints
            (`fingerprint_path`), the tokenizer's or model's hash, and the config fields that shape
            it (not those that do not: a changed learning rate must not rebuild a token file).
    build   build(tmp) writes the entry (a file or a folder) at `tmp`, a path that does not exist
            yet beside `path`; it may return a dict of JSON `info` (counts, dtype) kept in the record.

    The key is `cache_key(parts)`. Beside the entry, `<name>.cache.json` records the key, the parts
    (so a reader can say which one changed), `info`, and the size and sha256 of every file written.
    Reuse needs the same key and every file matching its record: a truncated or altered entry is
    rebuilt, saying so in one line. Building is atomic: the record is removed, the new entry renamed
    into place, then the new record written, so a crash at any point leaves either a valid entry or
    none. Under several processes, call it on one process first (e.g. `accelerator.main_process_first`).
    """
    path = Path(path)
    key = cache_key(parts)
    rec = cache_record(path)
    if rec is not None and rec.get("key") == key:
        problem = _cache_problem(path, rec.get("files") or {})
        if problem is None:
            return Cached(path, True, rec.get("info") or {})
        echo(f"{path} {problem}; rebuilding it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = temp_dir(path.parent, path.name)
    record = path.with_name(path.name + CACHE_RECORD)
    try:
        tmp = tmpdir / path.name
        info = build(tmp) or {}
        if not tmp.exists():
            raise RuntimeError(f"cache build for {path} wrote nothing at {tmp}")
        files = _tree_files(tmp)
        record.unlink(missing_ok=True)  # from here until the new record exists, the entry is invalid
        if tmp.is_dir():
            if path.is_file():
                path.unlink()
            replace_dir(tmp, path)
        else:
            if path.is_dir():
                shutil.rmtree(path)
            os.replace(tmp, path)
        atomic_write_json(record, {"key": key, "parts": parts, "files": files, "info": info})
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return Cached(path, False, info)


def _remove_except(folder: Path, keep: set[Path]) -> None:
    for child in folder.iterdir():
        if child in keep:
            continue
        if child.is_dir() and not child.is_symlink() and any(k.is_relative_to(child) for k in keep):
            _remove_except(child, keep)
        elif child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


class RunDir:
    """One stage's folder: config, manifest, metrics and log, all written safely."""

    def __init__(self, path: str | Path, stage: str, artifact: str, *, create: bool = True):
        self.path = Path(path)
        self.stage = stage
        self.artifact_name = artifact
        if create:  # a plan (create=False) names folders without making them
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
        atomic_write_text(self.path / CONFIG, yaml.safe_dump(data, sort_keys=False))

    def cache(self, name: str, parts: dict[str, Any], build: Callable[[Path], dict | None], *,
              echo: Callable[[str], None] = print) -> Cached:
        """The keyed cache entry `name` (e.g. "tokens/train.bin", "base") of this stage: see `keyed_cache`."""
        return keyed_cache(self.path / name, parts, build, echo=echo)

    def fresh_start(self, keep_globs: tuple[str, ...] = ()) -> None:
        """Remove everything but config.yaml, manifest.json, the lock and keyed cache entries (with
        their records). Checkpoints, metrics, logs and the old artifact belong to another
        configuration; a cache entry is checked against its key when next used. `keep_globs`
        (a stage's KEEP) names what must survive too: data that is no derived file (the label
        stage's human judgments) or is keyed its own way (compare's nested stage folders)."""
        keep = {self.path / CONFIG, self.path / MANIFEST, self.path / LOCK}
        for pattern in keep_globs:
            keep |= set(self.path.glob(pattern))
        for rec in self.path.rglob("*" + CACHE_RECORD):
            keep |= {rec, rec.with_name(rec.name[: -len(CACHE_RECORD)])}
        _remove_except(self.path, keep)

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

"""The labelling store: one SQLite file in WAL mode; every judgment is committed when it is made.

    items        one prompt (chat turns) to judge; `target` annotators should judge it
    responses    the item's candidate answers, each with the model and sampling parameters that made it
    annotators   name + sha256 of a random token (the token itself is printed once, never stored)
    assignments  (item, annotator) claimed when the item is served: open -> done | skipped
    judgments    every judgment ever made; `status` live | undone | replaced keeps the history

Why SQLite: it ships with Python, a committed transaction survives SIGKILL of the process (and,
with synchronous=FULL, an OS crash), and WAL lets the export and the statistics read while
annotators write. The server holds one connection behind a lock: SQLite serialises writers anyway,
and a judgment is a sub-millisecond transaction (bench/bench_label.py measures the p99 under ten
concurrent annotators).

Overlap: an item is in the overlap share when a stable hash of its prompt id falls below
`overlap` (so the share never moves when items are added); such an item wants
`overlap_annotators` judgments, any other one. An item is claimed by an annotator when first
served, so a reload or a restart serves the same item again; a skip frees the slot for another
annotator.

Feedback from use (`serve`'s /v1/feedback, `chat`'s /good /bad /fix) is stored the same way: an
item holding the one completion that was rated (target 0, so it is never served to annotators)
and a good/bad judgment by the annotator "feedback:serve" or "feedback:chat", a correction being
the judgment's ideal answer.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmforge.errors import LmforgeError

Verdict = Literal["ranked", "tie", "all_bad", "skip", "good", "bad"]
VERDICTS = ("ranked", "tie", "all_bad", "skip", "good", "bad")  # good/bad: thumbs on a one-response item
FEEDBACK = "feedback:"  # annotator name prefix of feedback from use (`serve`, `chat`): nobody holds their token
FLAGS = ("unsafe", "wrong")
MAX_TEXT = 100_000  # characters of an ideal answer or a note

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    prompt_id TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,              -- JSON list of {role, content} turns
    source TEXT NOT NULL,              -- file and row it came from
    position REAL NOT NULL,            -- serving order (insertion order, or active selection)
    target INTEGER NOT NULL DEFAULT 1, -- annotators that should judge it
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS responses (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id),
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    model TEXT NOT NULL,
    sampling TEXT NOT NULL,            -- JSON: the sampling parameters (and seed stream) that made it
    finish_reason TEXT,
    UNIQUE (item_id, idx)
);
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    state TEXT NOT NULL CHECK (state IN ('open', 'done', 'skipped')),
    claimed REAL NOT NULL,
    PRIMARY KEY (item_id, annotator_id)
);
CREATE TABLE IF NOT EXISTS judgments (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    verdict TEXT NOT NULL CHECK (verdict IN ('ranked', 'tie', 'all_bad', 'skip', 'good', 'bad')),
    ranking TEXT,                      -- JSON list of response ids, best first (verdict ranked)
    flags TEXT NOT NULL DEFAULT '{}',  -- JSON {response id: ["unsafe", "wrong"]}
    ideal TEXT,                        -- the annotator's ideal answer (an SFT demonstration)
    note TEXT,
    seconds REAL NOT NULL,             -- time spent on the item
    status TEXT NOT NULL DEFAULT 'live' CHECK (status IN ('live', 'undone', 'replaced')),
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS judgments_by_annotator ON judgments (annotator_id, status, id);
CREATE INDEX IF NOT EXISTS judgments_by_item ON judgments (item_id, status);
CREATE INDEX IF NOT EXISTS items_by_position ON items (position);
"""


@dataclass
class Response:
    """A candidate answer and where it came from."""

    text: str
    model: str
    sampling: dict
    finish_reason: str | None = None


@dataclass
class Annotator:
    id: int
    name: str


def token_hash(token: str) -> str:
    """sha256 of a token. Tokens are 192 random bits, so a plain hash (no salt, no slow KDF) is
    enough: nobody can guess one from its hash, and lookup stays one index probe."""
    return hashlib.sha256(token.encode()).hexdigest()


def in_overlap(prompt_id: str, fraction: float) -> bool:
    """Whether an item belongs to the overlap share (a stable hash of its prompt id)."""
    return fraction > 0 and (zlib.crc32(f"overlap:{prompt_id}".encode()) % 1_000_000) < fraction * 1_000_000


def prompt_id_of(turns: list[dict]) -> str:
    """A prompt's id when its row names none: a hash of its turns, so re-adding a file is idempotent."""
    return "p" + hashlib.sha256(json.dumps(turns, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


class Store:
    """The labelling database at `path` (created on first use). Safe to share between threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the reply goes out
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise LmforgeError(f"{self.path} is not a usable labelling database ({e}).") from None
        self.lock = threading.RLock()

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def _write(self, fn, *args):
        """Run fn(*args) in one IMMEDIATE transaction (committed before returning)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(*args)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            return out

    def _one(self, sql: str, *args) -> sqlite3.Row | None:
        with self.lock:
            return self.db.execute(sql, args).fetchone()

    def _all(self, sql: str, *args) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    # ----------------------------------------------------------------------------------------
    # Settings

    def meta(self, key: str, default: Any = None) -> Any:
        row = self._one("SELECT value FROM meta WHERE key = ?", key)
        return json.loads(row["value"]) if row else default

    def set_meta(self, **values: Any) -> None:
        def go():
            for k, v in values.items():
                self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                                "value = excluded.value", (k, json.dumps(v)))
        self._write(go)

    def configure(self, *, mode: str, overlap: float, overlap_annotators: int) -> None:
        """Record the labelling mode and (re)compute every item's target from the overlap share."""
        self.set_meta(mode=mode, overlap=overlap, overlap_annotators=overlap_annotators)

        def go():
            for row in self.db.execute("SELECT id, prompt_id FROM items WHERE target > 0").fetchall():
                t = overlap_annotators if in_overlap(row["prompt_id"], overlap) else 1
                self.db.execute("UPDATE items SET target = ? WHERE id = ?", (t, row["id"]))
        self._write(go)

    # ----------------------------------------------------------------------------------------
    # Items

    def has_item(self, prompt_id: str) -> bool:
        return self._one("SELECT 1 FROM items WHERE prompt_id = ?", prompt_id) is not None

    def add_item(self, prompt_id: str, prompt: list[dict], responses: list[Response], source: str,
                 target: int | None = None) -> bool:
        """Add an item unless its prompt id is already stored; False when it was. `target` (default:
        from the overlap share) is how many annotators should judge it; 0 = never served."""
        def go():
            if self.db.execute("SELECT 1 FROM items WHERE prompt_id = ?", (prompt_id,)).fetchone():
                return False
            pos = self.db.execute("SELECT COALESCE(MAX(position), 0) + 1 FROM items").fetchone()[0]
            overlap, k = self.meta("overlap", 0.0), self.meta("overlap_annotators", 2)
            cur = self.db.execute(
                "INSERT INTO items (prompt_id, prompt, source, position, target, created) VALUES (?, ?, ?, ?, ?, ?)",
                (prompt_id, json.dumps(prompt, ensure_ascii=False), source, pos,
                 target if target is not None else k if in_overlap(prompt_id, overlap) else 1, time.time()))
            for i, r in enumerate(responses):
                self.db.execute(
                    "INSERT INTO responses (item_id, idx, text, model, sampling, finish_reason) VALUES (?, ?, ?, ?, ?, ?)",
                    (cur.lastrowid, i, r.text, r.model, json.dumps(r.sampling, sort_keys=True), r.finish_reason))
            return True
        return self._write(go)

    def set_positions(self, positions: dict[str, float]) -> None:
        """Serving order by prompt id (lower first), e.g. from active selection."""
        def go():
            for pid, p in positions.items():
                self.db.execute("UPDATE items SET position = ? WHERE prompt_id = ?", (float(p), pid))
        self._write(go)

    def item(self, item_id: int) -> dict | None:
        """An item with its responses (in stored order), or None."""
        row = self._one("SELECT * FROM items WHERE id = ?", item_id)
        if row is None:
            return None
        resp = self._all("SELECT * FROM responses WHERE item_id = ? ORDER BY idx", item_id)
        return {"id": row["id"], "prompt_id": row["prompt_id"], "prompt": json.loads(row["prompt"]),
                "source": row["source"], "target": row["target"],
                "responses": [{"id": r["id"], "text": r["text"], "model": r["model"],
                               "sampling": json.loads(r["sampling"]), "finish_reason": r["finish_reason"]}
                              for r in resp]}

    def item_ids(self) -> list[int]:
        return [r["id"] for r in self._all("SELECT id FROM items ORDER BY position, id")]

    def n_items(self) -> int:
        return self._one("SELECT COUNT(*) FROM items")[0]

    # ----------------------------------------------------------------------------------------
    # Annotators

    def add_annotator(self, name: str, token: str | None = None) -> str:
        """Register `name` (or give it a new token) and return its token."""
        name = name.strip()
        if not name or len(name) > 64 or any(c in name for c in "\n\r\t"):
            raise LmforgeError(f"Annotator name {name!r} must be 1-64 characters on one line.")
        token = token or secrets.token_urlsafe(24)
        if len(token) < 16:
            raise LmforgeError(f"The token given for annotator {name!r} is shorter than 16 characters; use a "
                               "longer one or let lmforge make one.")

        def go():
            self.db.execute("INSERT INTO annotators (name, token_sha256, created) VALUES (?, ?, ?) ON CONFLICT(name) "
                            "DO UPDATE SET token_sha256 = excluded.token_sha256", (name, token_hash(token), time.time()))
        try:
            self._write(go)
        except sqlite3.IntegrityError:
            raise LmforgeError(f"The token given for annotator {name!r} already belongs to another annotator.") from None
        return token

    def annotator(self, token: str | None) -> Annotator | None:
        """The annotator holding `token`, or None."""
        if not token:
            return None
        row = self._one("SELECT id, name FROM annotators WHERE token_sha256 = ?", token_hash(token))
        return Annotator(row["id"], row["name"]) if row else None

    def annotators(self) -> list[Annotator]:
        return [Annotator(r["id"], r["name"]) for r in self._all("SELECT id, name FROM annotators ORDER BY id")]

    def add_feedback(self, source: str, prompt: list[dict], response: Response, *, good: bool,
                     correction: str | None = None, note: str | None = None) -> int:
        """Record a rating of one completion from use (source "serve" or "chat"); returns the judgment id."""
        name = FEEDBACK + source
        row = self._one("SELECT id FROM annotators WHERE name = ?", name)
        if row is None:
            self.add_annotator(name)  # a random token nobody is given: the page cannot act as it
            row = self._one("SELECT id FROM annotators WHERE name = ?", name)
        key = json.dumps([prompt, response.text, response.model, time.time_ns()], ensure_ascii=False)
        pid = "fb" + hashlib.sha256(key.encode()).hexdigest()[:14]
        self.add_item(pid, prompt, [response], f"feedback from {source}", target=0)
        item_id = self._one("SELECT id FROM items WHERE prompt_id = ?", pid)["id"]
        return self.judge(row["id"], item_id, verdict="good" if good else "bad", ideal=correction, note=note)

    # ----------------------------------------------------------------------------------------
    # Serving order

    def next_item(self, annotator_id: int) -> int | None:
        """The item this annotator should judge now: the open one they hold, else a newly claimed
        one (lowest position among items that still want judges and that they never saw)."""
        held = self._one("SELECT item_id FROM assignments WHERE annotator_id = ? AND state = 'open' "
                         "ORDER BY claimed DESC LIMIT 1", annotator_id)
        if held:  # the common case (a reload, a second tab): a read, no write lock
            return held["item_id"]

        def go():
            row = self.db.execute("SELECT item_id FROM assignments WHERE annotator_id = ? AND state = 'open' "
                                  "ORDER BY claimed DESC LIMIT 1", (annotator_id,)).fetchone()
            if row:
                return row["item_id"]
            row = self.db.execute(
                "SELECT i.id FROM items i WHERE NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id "
                "AND a.annotator_id = ?) AND (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id AND "
                "a.state != 'skipped') < i.target ORDER BY i.position, i.id LIMIT 1", (annotator_id,)).fetchone()
            if row is None:
                return None
            self.db.execute("INSERT INTO assignments (item_id, annotator_id, state, claimed) VALUES (?, ?, 'open', ?)",
                            (row["id"], annotator_id, time.time()))
            return row["id"]
        return self._write(go)

    def progress(self, annotator_id: int) -> dict:
        """Items this annotator finished, and how many more they can get now."""
        done = self._one("SELECT COUNT(*) FROM assignments WHERE annotator_id = ? AND state != 'open'", annotator_id)[0]
        open_ = self._one("SELECT COUNT(*) FROM assignments WHERE annotator_id = ? AND state = 'open'", annotator_id)[0]
        free = self._one(
            "SELECT COUNT(*) FROM items i WHERE NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND "
            "a.annotator_id = ?) AND (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id AND "
            "a.state != 'skipped') < i.target", annotator_id)[0]
        return {"done": done, "remaining": open_ + free, "total": done + open_ + free}

    def is_complete(self) -> bool:
        """True when no item wants another judgment that someone holds open or some annotator has not
        yet been served (an item every annotator skipped or judged is as finished as it gets)."""
        if not self.annotators():
            return self.n_items() == 0
        row = self._one(
            "SELECT 1 FROM items i WHERE (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id AND "
            "a.state = 'done') < i.target AND (EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND "
            "a.state = 'open') OR EXISTS (SELECT 1 FROM annotators n WHERE NOT EXISTS (SELECT 1 FROM assignments a "
            "WHERE a.item_id = i.id AND a.annotator_id = n.id))) LIMIT 1")
        return row is None

    # ----------------------------------------------------------------------------------------
    # Judgments

    def judge(self, annotator_id: int, item_id: int, *, verdict: str, ranking: list[int] | None = None,
              flags: dict | None = None, ideal: str | None = None, note: str | None = None,
              seconds: float = 0.0) -> int:
        """Validate and commit one judgment (it replaces this annotator's earlier one of the item);
        returns its id. Raises LmforgeError with one sentence for a judgment that does not fit the item."""
        item = self.item(item_id)
        if item is None:
            raise KeyError(item_id)
        ranking, flags = check_judgment(item, verdict, ranking, flags, ideal, note, seconds)

        def go():
            self.db.execute("UPDATE judgments SET status = 'replaced' WHERE item_id = ? AND annotator_id = ? AND "
                            "status = 'live'", (item_id, annotator_id))
            cur = self.db.execute(
                "INSERT INTO judgments (item_id, annotator_id, verdict, ranking, flags, ideal, note, seconds, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (item_id, annotator_id, verdict, json.dumps(ranking) if ranking is not None else None,
                 json.dumps(flags, sort_keys=True), ideal or None, note or None, float(seconds), time.time()))
            state = "skipped" if verdict == "skip" else "done"
            self.db.execute("INSERT INTO assignments (item_id, annotator_id, state, claimed) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT(item_id, annotator_id) DO UPDATE SET state = excluded.state",
                            (item_id, annotator_id, state, time.time()))
            return cur.lastrowid
        return self._write(go)

    def undo(self, annotator_id: int) -> int | None:
        """Withdraw this annotator's latest live judgment; its item is served next. Returns the item id."""
        def go():
            row = self.db.execute("SELECT id, item_id FROM judgments WHERE annotator_id = ? AND status = 'live' "
                                  "ORDER BY id DESC LIMIT 1", (annotator_id,)).fetchone()
            if row is None:
                return None
            self.db.execute("UPDATE judgments SET status = 'undone' WHERE id = ?", (row["id"],))
            self.db.execute("UPDATE assignments SET state = 'open', claimed = ? WHERE item_id = ? AND annotator_id = ?",
                            (time.time(), row["item_id"], annotator_id))
            return row["item_id"]
        return self._write(go)

    def last_judgment(self, annotator_id: int, item_id: int) -> dict | None:
        """This annotator's most recent judgment of the item, whatever its status (to pre-fill the page)."""
        row = self._one("SELECT * FROM judgments WHERE annotator_id = ? AND item_id = ? ORDER BY id DESC LIMIT 1",
                        annotator_id, item_id)
        return _judgment(row) if row else None

    def judgments(self, *, live: bool = True) -> list[dict]:
        """Judgments (live ones by default) with their annotator's name and prompt id, oldest first."""
        rows = self._all(
            "SELECT j.*, n.name AS annotator, i.prompt_id FROM judgments j JOIN annotators n ON n.id = j.annotator_id "
            "JOIN items i ON i.id = j.item_id" + (" WHERE j.status = 'live'" if live else "") + " ORDER BY j.id")
        return [{**_judgment(r), "annotator": r["annotator"], "prompt_id": r["prompt_id"]} for r in rows]


def _judgment(row: sqlite3.Row) -> dict:
    return {"id": row["id"], "item_id": row["item_id"], "annotator_id": row["annotator_id"], "verdict": row["verdict"],
            "ranking": json.loads(row["ranking"]) if row["ranking"] else None,
            "flags": {int(k): v for k, v in json.loads(row["flags"]).items()}, "ideal": row["ideal"],
            "note": row["note"], "seconds": row["seconds"], "status": row["status"], "created": row["created"]}


def check_judgment(item: dict, verdict: str, ranking: list[int] | None, flags: dict | None, ideal: str | None,
                   note: str | None, seconds: float) -> tuple[list[int] | None, dict[int, list[str]]]:
    """The judgment's ranking and flags, normalised; one LmforgeError sentence when it does not fit `item`."""
    ids = [r["id"] for r in item["responses"]]
    where = f"judgment of item {item['id']}"
    if verdict not in VERDICTS:
        raise LmforgeError(f"{where}: verdict {verdict!r} is not one of {', '.join(VERDICTS)}.")
    if (verdict in ("good", "bad")) != (len(ids) == 1):
        raise LmforgeError(f"{where}: good/bad rates an item of exactly one response, the other verdicts compare "
                           f"several; this item has {len(ids)} and the verdict is {verdict!r}.")
    if verdict == "ranked":
        if not isinstance(ranking, list) or sorted(ranking) != sorted(ids) or len(set(ranking)) != len(ids):
            raise LmforgeError(f"{where}: ranking {ranking!r} must list each of the item's responses {ids} once, "
                               "best first.")
    elif ranking:
        raise LmforgeError(f"{where}: a {verdict!r} verdict takes no ranking.")
    else:
        ranking = None
    clean: dict[int, list[str]] = {}
    for k, v in (flags or {}).items():
        try:
            rid = int(k)
        except (TypeError, ValueError):
            rid = None
        if rid not in ids:
            raise LmforgeError(f"{where}: flags name response {k!r}, which is not one of the item's responses {ids}.")
        if not isinstance(v, list) or any(f not in FLAGS for f in v):
            raise LmforgeError(f"{where}: flags of response {rid} must be a list of {', '.join(FLAGS)}, not {v!r}.")
        if v:
            clean[rid] = sorted(set(v))
    for name, text in (("ideal", ideal), ("note", note)):
        if text is not None and (not isinstance(text, str) or len(text) > MAX_TEXT):
            raise LmforgeError(f"{where}: {name} must be text of at most {MAX_TEXT} characters.")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds < 86_400 * 7:
        raise LmforgeError(f"{where}: seconds must be a number of seconds between 0 and a week, not {seconds!r}.")
    return ranking, clean

"""Feedback on served completions: `lmforge serve --feedback DIR` remembers its recent chat
completions by id, and `POST /v1/feedback` rates one of them into the label store (store.add_feedback).

    POST /v1/feedback {"id": "chatcmpl-...", "index": 0, "rating": "good" | "bad", "correction": "..."}

`index` picks the choice of an n > 1 request (default 0); a correction without a rating rates the
completion bad. Only the last `size` completions are remembered (bounded memory): an older or
unknown id is a 404, like an id this server never produced.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from lmforge.errors import LmforgeError
from lmforge.label.store import Response, Store

FIELDS = ("id", "index", "rating", "correction", "note")


class CompletionLog:
    """The last `size` chat completions a server produced: id -> (prompt turns, texts, sampling)."""

    def __init__(self, store: Store, model: str, size: int = 10_000):
        self.store, self.model, self.size = store, model, size
        self.recent: OrderedDict[str, tuple[list[dict], list[str], dict]] = OrderedDict()
        self.lock = threading.Lock()

    def remember(self, completion_id: str, prompt: list[dict], texts: list[str], sampling: dict) -> None:
        with self.lock:
            self.recent[completion_id] = (prompt, list(texts), sampling)
            while len(self.recent) > self.size:
                self.recent.popitem(last=False)

    def rate(self, body: dict) -> int:
        """Store a rating; LmforgeError (one sentence) for a bad body, KeyError for an unknown id."""
        unknown = [k for k in body if k not in FIELDS]
        if unknown:
            raise LmforgeError(f"Unknown feedback field {unknown[0]!r}; the fields are {', '.join(FIELDS)}.")
        cid, index, rating = body.get("id"), body.get("index", 0), body.get("rating")
        correction, note = body.get("correction"), body.get("note")
        if not isinstance(cid, str) or not cid:
            raise LmforgeError("Feedback needs `id`: the id of a chat completion this server returned.")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise LmforgeError(f"Feedback `index` must be a choice index (0, 1, ...), not {index!r}.")
        if rating is None and correction is None:
            raise LmforgeError("Feedback needs `rating` (good or bad) or a `correction`.")
        if rating not in (None, "good", "bad"):
            raise LmforgeError(f"Feedback `rating` must be 'good' or 'bad', not {rating!r}.")
        for name, v in (("correction", correction), ("note", note)):
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise LmforgeError(f"Feedback `{name}` must be non-empty text.")
        with self.lock:
            got = self.recent.get(cid)
        if got is None or index >= len(got[1]):
            raise KeyError(cid)
        prompt, texts, sampling = got
        if not texts[index].strip():
            raise LmforgeError(f"Choice {index} of {cid} is an empty completion; there is nothing to rate.")
        return self.store.add_feedback("serve", prompt, Response(texts[index].strip(), self.model, sampling),
                                       good=rating == "good", correction=correction, note=note)

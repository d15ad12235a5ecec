"""The labelling server: one page (static/, files of this package: no internet asset) and a small
JSON API over the store. Every API call carries `Authorization: Bearer <token>`; the token names
the annotator, so a write can only ever be that annotator's.

    GET  /                      the page (the token comes in once as ?token=..., then lives in localStorage)
    GET  /api/me                name, mode, progress
    GET  /api/next              the item to judge now (the same one until judged: reload and restart resume)
    GET  /api/items/{id}        one item (404 when it does not exist)
    POST /api/judgments         {item_id, verdict, ranking, flags, ideal, note, seconds}
    POST /api/undo              withdraw the latest judgment; its item is served next
    GET  /api/stats             counts, time per judgment, agreement

The page never sees which model wrote a response, and sees the responses in an order shuffled per
item and annotator (seeded, so a reload shows the same order). Responses are untrusted text: the
page only ever sets `textContent`, and the Content-Security-Policy allows no inline script at all.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lmforge.errors import LmforgeError
from lmforge.label.store import Annotator, Store

STATIC = Path(__file__).with_name("static")
CSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'"


class JudgmentIn(BaseModel):
    """The body of POST /api/judgments (store.check_judgment checks it against the item)."""

    model_config = ConfigDict(extra="forbid")
    item_id: int = Field(description="The item judged.")
    verdict: str = Field(description="ranked, tie, all_bad or skip.")
    ranking: list[int] | None = Field(None, description="Response ids, best first (verdict ranked).")
    flags: dict[str, list[str]] = Field(default_factory=dict, description="Response id -> unsafe/wrong.")
    ideal: str | None = Field(None, description="The ideal answer the annotator wrote.")
    note: str | None = Field(None, description="A free note.")
    seconds: float = Field(0.0, description="Time spent on the item.")


def shown(item: dict, annotator_id: int) -> dict:
    """The item as the page gets it: no model names, responses in a per-(item, annotator) shuffled order."""
    responses = [{"id": r["id"], "text": r["text"]} for r in item["responses"]]
    random.Random(f"{item['id']}:{annotator_id}").shuffle(responses)
    return {"id": item["id"], "prompt": item["prompt"], "responses": responses}


def create_app(store: Store) -> Any:
    from fastapi import FastAPI, Header, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    app = FastAPI(title="lmforge label", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    class Denied(Exception):
        pass

    class Missing(Exception):
        pass

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        resp = await call_next(request)
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.exception_handler(Denied)
    async def denied(_request, _exc):
        return JSONResponse({"detail": "Missing or unknown token: open the link `lmforge label --add-annotator` "
                                       "printed."}, status_code=401)

    @app.exception_handler(Missing)
    async def missing(_request, exc):
        return JSONResponse({"detail": f"There is no item {exc.args[0]}."}, status_code=404)

    @app.exception_handler(LmforgeError)
    async def bad(_request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc):
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "request body"
        return JSONResponse({"detail": f"{where}: {e.get('msg', 'invalid')}."}, status_code=422)

    def who(authorization: str | None) -> Annotator:
        token = authorization[7:] if authorization and authorization.startswith("Bearer ") else None
        a = store.annotator(token)
        if a is None:
            raise Denied()
        return a

    def item_reply(a: Annotator, item_id: int | None) -> dict:
        out: dict[str, Any] = {"progress": store.progress(a.id), "item": None, "previous": None}
        if item_id is not None:
            item = store.item(item_id)
            if item is None:
                raise Missing(item_id)
            out["item"] = shown(item, a.id)
            out["previous"] = store.last_judgment(a.id, item_id)
        return out

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/me")
    def me(authorization: str | None = Header(None)):
        a = who(authorization)
        return {"name": a.name, "mode": store.meta("mode", "rank"), "progress": store.progress(a.id)}

    @app.get("/api/next")
    def next_item(authorization: str | None = Header(None)):
        a = who(authorization)
        return item_reply(a, store.next_item(a.id))

    @app.get("/api/items/{item_id}")
    def get_item(item_id: int, authorization: str | None = Header(None)):
        return item_reply(who(authorization), item_id)

    @app.post("/api/judgments")
    def post_judgment(j: JudgmentIn, authorization: str | None = Header(None)):
        a = who(authorization)
        try:
            jid = store.judge(a.id, j.item_id, verdict=j.verdict, ranking=j.ranking, flags=j.flags, ideal=j.ideal,
                              note=j.note, seconds=j.seconds)
        except KeyError:
            raise Missing(j.item_id) from None
        return {"judgment_id": jid, "progress": store.progress(a.id)}

    @app.post("/api/undo")
    def undo(authorization: str | None = Header(None)):
        a = who(authorization)
        return {"item_id": store.undo(a.id), "progress": store.progress(a.id)}

    @app.get("/api/stats")
    def stats_(authorization: str | None = Header(None)):
        from lmforge.label.export import stats

        who(authorization)
        judgments = store.judgments()
        items = {i: store.item(i) for i in {j["item_id"] for j in judgments}}
        return stats(store, judgments, items)

    return app


class Server:
    """uvicorn on a socket bound before start (port 0 picks a free one), in a background thread."""

    def __init__(self, store: Store, host: str = "127.0.0.1", port: int = 8765):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise LmforgeError(f"Cannot listen on {host}:{port} ({e.strerror}); pick another port.") from None
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(create_app(store), log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> "Server":
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

"""The app: settings, the HTTP guard (host, content type, API key), the routes, and uvicorn.

Request validation lives in `requests.py` (pure functions), the model thread and slots in
`scheduler.py`; a route here only reads the body, calls them, and streams the answer.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at
# definition time, and `Request` is imported inside create_app (fastapi is an optional extra).
import asyncio
import dataclasses
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from lmforge.config import Device, Schema
from lmforge.data.chat import encode as encode_chat
from lmforge.errors import LmforgeError
from lmforge.generation import Engine, encode_prompts, load_model_for_inference
from lmforge.retrieval.augment import open_retrievers, passages_json
from lmforge.serve.requests import ApiError, Limits, Parsed, decode_body, fit_to_prompts, parse_request
from lmforge.serve.scheduler import Job, Scheduler, Slots

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServeConfig(Schema):
    """The server's address, limits and model."""

    model: str = Field(description="Model folder: a local HF causal LM, a stage folder, or a PEFT adapter folder.")
    served_name: str | None = Field(None, description="Model id clients pass as `model` (default: the folder's name).")
    host: str = Field("127.0.0.1", description="Address to bind; 127.0.0.1 keeps the server private to this machine.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port).")
    device: Device = Field(None, description="cpu, cuda, cuda:1, ... (default: cuda when available).")
    dtype: str = Field("auto", description="auto, fp32, bf16 or fp16.")
    max_tokens: int = Field(512, ge=1, description="Most completion tokens one request may ask for (also the default).")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt accepted, in tokens (default: the model's context minus one).")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted (413 above).")
    max_stop: int = Field(4, ge=0, le=16, description="Most stop strings per request.")
    max_n: int = Field(8, ge=1, le=128, description="Most completions per prompt (`n`).")
    max_rows: int = Field(64, ge=1, description="Most completions per request, prompts x n (400 above).")
    max_concurrent: int = Field(16, ge=1, description="Requests generated at once; they share each forward pass.")
    max_queue: int = Field(32, ge=0, description="Requests waiting for a slot; beyond it requests get 429 at once.")
    max_batch: int = Field(64, ge=1, description="Rows (completions) decoded together in one forward pass.")
    request_timeout_s: float = Field(
        120.0, gt=0, allow_inf_nan=False, description="A request still unfinished after this long is cancelled (504).")
    header_timeout_s: float = Field(
        10.0, gt=0, allow_inf_nan=False,
        description="A connection must send a request's complete headers within this long (of opening, or of the "
        "previous response), or it is closed: idle and header-trickling connections cannot pile up.")
    body_timeout_s: float = Field(
        30.0, gt=0, allow_inf_nan=False, description="A request body must arrive within this long (408 otherwise).")
    idle_timeout_s: int = Field(5, ge=1, description="Seconds a kept-alive connection may sit idle between requests.")
    max_connections: int = Field(
        128, ge=1, description="Open connections and requests in progress at once; beyond it uvicorn answers 503.")
    api_key: str | None = Field(
        None, description="Require `Authorization: Bearer <key>` (default: api_key_file, else LMFORGE_API_KEY if set "
        "and non-empty). Prefer the file or the variable: a command-line key is visible to other users in `ps`.")
    api_key_file: str | None = Field(None, description="A file holding the API key (surrounding whitespace ignored).")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host header values accepted besides the bound address (and, on a loopback bind, localhost names); "
        "'*' accepts any. Checking Host stops a web page from reaching a local server by DNS rebinding.")
    access_log: bool = Field(False, description="Print one line per HTTP request.")
    feedback: str | None = Field(
        None, description="A label folder (lmforge label --out): POST /v1/feedback rates a recent chat completion by "
        "id (good/bad, a correction) into its store, as KTO and SFT data (lmforge.label.feedback).")
    indexes: dict[str, str] = Field(
        default_factory=dict, description="Retrieval indexes {name: folder} (lmforge index). A chat request names one "
        "in its `index` field (else the one called `default`, or the only one is used); the top passages go into its "
        "last user turn and the response's `retrieval` field lists them.")
    retrieval_k: int = Field(4, ge=1, description="Passages retrieved per chat request.")

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("the API key is empty, which would leave the server open; give a key or leave it out")
        return v


def resolve_api_key(cfg: ServeConfig) -> str | None:
    """The key the server requires: api_key, else the contents of api_key_file, else LMFORGE_API_KEY
    (an empty variable counts as unset); None = no authentication."""
    if cfg.api_key is not None:
        return cfg.api_key
    if cfg.api_key_file is not None:
        path = Path(cfg.api_key_file)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise LmforgeError(f"api_key_file {path} cannot be read ({e.__class__.__name__}).") from None
        if not key:
            raise LmforgeError(f"api_key_file {path} is empty, which would leave the server open; put the key in it.")
        return key
    return os.environ.get("LMFORGE_API_KEY") or None


def allowed_host_names(cfg: ServeConfig) -> frozenset[str] | None:
    """Host header names (without port) the server answers; None = any (a wildcard bind or '*')."""
    if "*" in cfg.allowed_hosts or cfg.host in ("0.0.0.0", "::", ""):
        return None
    names = {cfg.host.lower(), *(h.lower() for h in cfg.allowed_hosts)}
    if cfg.host in LOOPBACK:
        names.update(LOOPBACK)
    return frozenset(names)


def _host_name(header: bytes) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'Example.com' -> 'example.com'."""
    h = header.decode("latin-1").strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


# --------------------------------------------------------------------------------------------
# The guard: pure ASGI, before any route runs


class _Guard:
    """Refuses, as JSON errors: a Host header naming another server (403; DNS rebinding), a POST
    whose body is not declared JSON (415; a web page's form or text/plain request), and a
    missing or wrong API key on every path but /health (401)."""

    def __init__(self, app: Any, key: str | None, hosts: frozenset[str] | None):
        self.app, self.key, self.hosts = app, key.encode() if key is not None else None, hosts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            err = self._check(scope)
            if err is not None:
                from starlette.responses import JSONResponse

                await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, scope: dict) -> ApiError | None:
        headers = dict(scope["headers"])
        host = headers.get(b"host")
        if self.hosts is not None and host is not None and _host_name(host) not in self.hosts:
            return ApiError(403, f"The Host header {host.decode('latin-1')[:100]!r} does not name this server; "
                            "add it to allowed_hosts if it should.", None, "host_not_allowed", "permission_error")
        if scope["method"] == "POST":
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json":
                return ApiError(415, "The request body must be JSON, sent with `Content-Type: application/json`.",
                                None, "unsupported_media_type")
        if self.key is not None and scope["path"] != "/health":
            header = headers.get(b"authorization", b"")
            given = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                return ApiError(401, "Missing or wrong API key; send `Authorization: Bearer <key>`.", None,
                                "invalid_api_key", "authentication_error")
        return None


def _job_stream(events: AsyncIterator[bytes], close: Any):
    """A streaming response of a job's server-sent events; whatever ends it (completion, client
    gone, server shutdown), `close` runs: the job is cancelled if unfinished and its slot freed."""
    from starlette.responses import StreamingResponse

    class JobStream(StreamingResponse):
        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                close()

    return JobStream(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def _until_disconnect(receive: Any) -> None:
    """Return when the client disconnects (the body is already read, so nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass


# --------------------------------------------------------------------------------------------
# The app


def max_token_chars(tokenizer: Any) -> int:
    """Most characters of text one token can stand for, for a cheap lower bound on a prompt's
    token count (characters / this), or a huge number where no such bound holds.

    A vocabulary entry's string is at least as long as the text it stands for when every
    character is encoded (byte-level BPE: one character per byte; SentencePiece: one per
    character). A tokenizer that drops whitespace (word-level, BERT-like) breaks that, which
    probes of long whitespace runs reveal.
    """
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    longest = max((len(t) for t in vocab), default=0)
    for probe in ("x" + " " * 200 + "y", "\n" * 200, "\t" * 200, "\u3000" * 200):
        if longest == 0 or len(tokenizer(probe, add_special_tokens=False)["input_ids"]) * longest < len(probe):
            return 1 << 30
    return longest


def limits_for(cfg: ServeConfig, engine: Engine, tokenizer: Any, name: str) -> Limits:
    ctx = engine.context
    return Limits(
        served_name=name, max_tokens=cfg.max_tokens, max_prompt=cfg.max_prompt_tokens or ((ctx - 1) if ctx else 1 << 30),
        context=ctx, max_stop=cfg.max_stop, max_n=cfg.max_n, max_rows=cfg.max_rows, vocab_size=engine.vocab_size,
        max_token_chars=max_token_chars(tokenizer),
    )


def create_app(cfg: ServeConfig, model: Any = None, tokenizer: Any = None):
    """The FastAPI app serving `model` (loaded from cfg.model when not given)."""
    from contextlib import asynccontextmanager

    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError:
        raise LmforgeError("lmforge serve needs fastapi and uvicorn; install them with pip install 'lmforge[serve]'.") from None

    if model is None or tokenizer is None:
        model, tokenizer = load_model_for_inference(cfg.model, device=cfg.device, dtype=cfg.dtype)
    name = cfg.served_name or Path(cfg.model).resolve().name
    api_key = resolve_api_key(cfg)
    engine = Engine(model, tokenizer, max_batch=cfg.max_batch)
    limits = limits_for(cfg, engine, tokenizer, name)
    retrievers = open_retrievers(cfg.indexes, cfg.retrieval_k, tokenizer, cfg.model)
    scheduler = Scheduler(engine)
    slots = Slots(cfg.max_concurrent, cfg.max_queue)
    # One thread tokenises, off the event loop: a long prompt must not stall /health or other
    # streams, and a single worker keeps the tokenizer's special-token switch race-free.
    tokenise_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-tokenise")
    created = int(time.time())
    log = None
    if cfg.feedback is not None:
        from lmforge.label.feedback import CompletionLog
        from lmforge.label.stage import open_store

        log = CompletionLog(open_store(cfg.feedback), cfg.model)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()
        tokenise_pool.shutdown(wait=False)

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.slots, app.state.served_name = scheduler, slots, name

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _fastapi_validation(request: Request, e: RequestValidationError):
        return JSONResponse(ApiError(400, "The request is malformed.").body(), status_code=400)

    @app.exception_handler(_ClientGone)
    async def _gone(request: Request, e: _ClientGone):
        return JSONResponse(ApiError(499, "The client closed the connection.").body(), status_code=499)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):  # still JSON, never a plain-text page
        return JSONResponse(ApiError(500, f"Internal error: {type(e).__name__}.", None, None, "server_error").body(),
                            status_code=500)

    app.add_middleware(_Guard, key=api_key, hosts=allowed_host_names(cfg))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "running": slots.running, "waiting": len(slots.waiting),
                "rows": scheduler.rows_active, "rows_cancelled": scheduler.rows_cancelled}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "lmforge"}]}

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_body_bytes:
            raise ApiError(413, f"The request body has {length} bytes; this server accepts at most {cfg.max_body_bytes}.")
        raw = bytearray()
        try:
            async with asyncio.timeout(cfg.body_timeout_s):
                async for chunk in request.stream():
                    raw += chunk
                    if len(raw) > cfg.max_body_bytes:
                        raise ApiError(413, f"The request body is larger than {cfg.max_body_bytes} bytes.")
        except TimeoutError:
            raise ApiError(408, f"The request body did not arrive within {cfg.body_timeout_s:g} s.", None,
                           "timeout") from None
        return bytes(raw)

    def tokenise(req: Parsed) -> list[list[int]]:
        if req.messages is not None:
            try:
                return [encode_chat(tokenizer, req.messages, add_generation_prompt=True)]
            except LmforgeError as e:
                raise ApiError(400, str(e), "messages") from None
            except Exception as e:  # a chat template may raise on purpose (e.g. "roles must alternate")
                raise ApiError(400, f"The chat template refused these messages ({str(e)[:200] or type(e).__name__}).",
                               "messages") from None
        return encode_prompts(tokenizer, req.prompts)

    def retrieve(req: Parsed) -> Parsed:
        """The request with the passages of its index in its last user turn (chat only)."""
        name = req.index or ("default" if "default" in retrievers else next(iter(retrievers), None)
                             if len(retrievers) == 1 else None)
        if req.index is not None and req.index not in retrievers:
            raise ApiError(404, f"The index {req.index!r} is not loaded; this server has "
                           f"{', '.join(map(repr, retrievers)) or 'none'} (lmforge serve --index NAME=DIR).",
                           "index", "index_not_found")
        if name is None or req.messages is None:
            return req
        reserve = req.params.max_new_tokens if req.max_given else min(req.params.max_new_tokens, limits.max_prompt // 4)
        fitted = retrievers[name].augment(req.messages, tokenizer, budget=max(1, min(limits.max_prompt, (
            limits.context or 1 << 30) - reserve)))
        return dataclasses.replace(req, messages=fitted.messages, retrieval={"index": name, **passages_json(fitted)})

    async def handle(request: Request, kind: str, render: Any):
        req = parse_request(decode_body(await read_body(request)), kind, limits)
        if req.messages is not None and (retrievers or req.index is not None):  # CPU work: off the event loop
            req = await asyncio.get_running_loop().run_in_executor(tokenise_pool, retrieve, req)
            render.extra = {"retrieval": req.retrieval} if req.retrieval else {}
        prompts = await asyncio.get_running_loop().run_in_executor(tokenise_pool, tokenise, req)
        params = fit_to_prompts(req, prompts, limits)
        done = None
        if log is not None and req.messages is not None:  # remembered so that /v1/feedback can rate it
            sampling = params.model_dump(mode="json")
            done = lambda texts: log.remember(render.id, req.messages, texts, sampling)  # noqa: E731
        return await run_job(request, prompts, params, req.stream, render, req.usage, done)

    async def run_job(request: Request, prompts: list[list[int]], params: Any, stream: bool, render: Any, usage: bool,
                      on_done: Any = None):
        started = time.monotonic()
        await slots.acquire(cfg.request_timeout_s)
        job = Job(asyncio.get_running_loop(), prompts, params, stream, started + cfg.request_timeout_s)
        released = False

        def close() -> None:
            nonlocal released
            if not released:
                released = True
                job.closed = True
                scheduler.cancel(job)  # no-op for a finished job
                slots.release()

        scheduler.submit(job)
        n_choices = len(prompts) * params.n
        prompt_tokens = sum(len(p) for p in prompts)
        if stream:
            return _job_stream(sse(job, n_choices, prompt_tokens, render, usage, on_done), close)
        gone = asyncio.ensure_future(_until_disconnect(request.receive))
        try:
            texts, reasons, completion_tokens = [""] * n_choices, [None] * n_choices, [0] * n_choices
            while any(r is None for r in reasons):
                item = await next_event(job, gone)
                if item[0] != "delta":
                    raise _event_error(item)
                _, index, text, reason, n_tokens = item
                texts[index] += text
                reasons[index], completion_tokens[index] = reason, n_tokens
            if on_done is not None:
                on_done(texts)
            return render.final(texts, reasons, prompt_tokens, sum(completion_tokens))
        finally:
            gone.cancel()
            close()

    async def next_event(job: Job, gone: "asyncio.Future | None" = None) -> tuple:
        left = max(job.deadline - time.monotonic(), 0.001)
        get = asyncio.ensure_future(job.events.get())
        done, _ = await asyncio.wait({get} | ({gone} if gone is not None else set()), timeout=left,
                                     return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        if gone is not None and gone in done:
            raise _ClientGone()
        raise ApiError(504, f"The request did not finish within {cfg.request_timeout_s:g} s and was cancelled.",
                       None, "timeout", "timeout")

    async def sse(job: Job, n_choices: int, prompt_tokens: int, render: Any, usage: bool,
                  on_done: Any = None) -> AsyncIterator[bytes]:
        def event(obj: Any) -> bytes:
            return f"data: {json.dumps(obj)}\n\n".encode()

        for chunk in render.start(n_choices):
            yield event(chunk)
        done, completion_tokens, texts = 0, [0] * n_choices, [""] * n_choices
        while done < n_choices:
            try:
                item = await next_event(job)
            except ApiError as e:
                yield event(e.body())
                break
            if item[0] != "delta":
                yield event(_event_error(item).body())
                break
            _, index, text, reason, n_tokens = item
            completion_tokens[index] = n_tokens
            texts[index] += text
            if text:
                yield event(render.delta(index, text, None))
            if reason is not None:
                done += 1
                yield event(render.delta(index, "", reason))
        else:
            if on_done is not None:
                on_done(texts)
            if usage:
                yield event(render.usage(prompt_tokens, sum(completion_tokens)))
        yield b"data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "chat", _ChatRender(name))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completions", _CompletionRender(name))

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        if log is None:
            raise ApiError(404, "This server takes no feedback; start it with feedback=<label folder>.")
        body = decode_body(await read_body(request))
        try:  # an fsync'd SQLite commit: off the event loop
            jid = await asyncio.get_running_loop().run_in_executor(None, log.rate, body)
        except LmforgeError as e:
            raise ApiError(400, str(e)) from None
        except KeyError:
            raise ApiError(404, f"No recent chat completion has id {body.get('id')!r} and choice "
                           f"{body.get('index', 0)}.", "id") from None
        return {"object": "feedback", "id": body["id"], "judgment_id": jid}

    return app


class _ChatRender:
    """OpenAI chat.completion(.chunk) objects."""

    def __init__(self, model: str):
        self.model, self.id, self.created = model, f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        self.extra: dict = {}  # extension fields (retrieval) on the first chunk and the final object

    def _chunk(self, choices: list, **extra: Any) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def start(self, n: int) -> list[dict]:
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}], **(self.extra if i == 0 else {})) for i in range(n)]

    def delta(self, index: int, text: str, reason: str | None) -> dict:
        return self._chunk([{"index": index, "delta": {"content": text} if text else {}, "logprobs": None,
                             "finish_reason": reason}])

    def usage(self, prompt: int, completion: int) -> dict:
        return self._chunk([], usage=_usage(prompt, completion))

    def final(self, texts: list[str], reasons: list, prompt: int, completion: int) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                             "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))],
                "usage": _usage(prompt, completion), **self.extra}


class _CompletionRender:
    """OpenAI text_completion objects (streamed chunks have the same shape)."""

    def __init__(self, model: str):
        self.model, self.id, self.created = model, f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def _obj(self, choices: list, **extra: Any) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def start(self, n: int) -> list[dict]:
        return []

    def delta(self, index: int, text: str, reason: str | None) -> dict:
        return self._obj([{"index": index, "text": text, "logprobs": None, "finish_reason": reason}])

    def usage(self, prompt: int, completion: int) -> dict:
        return self._obj([], usage=_usage(prompt, completion))

    def final(self, texts: list[str], reasons: list, prompt: int, completion: int) -> dict:
        return self._obj([{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                          for i, (t, r) in enumerate(zip(texts, reasons))], usage=_usage(prompt, completion))


def _event_error(item: tuple) -> ApiError:
    """An ("invalid" | "error", message) event from the scheduler as an API error."""
    if item[0] == "invalid":
        return ApiError(400, item[1])
    return ApiError(500, item[1], None, None, "server_error")


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def timed_protocol(header_timeout_s: float) -> type:
    """uvicorn's HTTP/1.1 protocol plus a deadline for each request's headers.

    uvicorn's keep-alive timer starts only after a response and is cancelled by any byte
    received, so a connection that sends nothing, or trickles a header a byte at a time, would
    stay open forever. Here a timer runs from the connection's start and from each response
    until the next request's headers are complete; when it fires with no request in progress
    the connection is closed.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _header_timer: Any = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:  # still waiting for headers
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request is in progress: its headers are complete

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return TimedH11Protocol


def uvicorn_config(app: Any, cfg: ServeConfig, **overrides: Any) -> Any:
    """The uvicorn settings for `app`: the header, idle and connection limits of `cfg`."""
    import uvicorn

    kw: dict[str, Any] = dict(host=cfg.host, port=cfg.port, log_level="warning", access_log=cfg.access_log,
                              http=timed_protocol(cfg.header_timeout_s), timeout_keep_alive=cfg.idle_timeout_s,
                              limit_concurrency=cfg.max_connections)
    return uvicorn.Config(app, **{**kw, **overrides})


def serve(cfg: ServeConfig) -> None:
    """Load the model and serve it until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise LmforgeError("lmforge serve needs fastapi and uvicorn; install them with pip install 'lmforge[serve]'.") from None

    if resolve_api_key(cfg) is None and cfg.host not in LOOPBACK:
        print(f"warning: serving on {cfg.host} without an API key; anyone who can reach this port can use the model.")
    app = create_app(cfg)
    name = app.state.served_name
    print(f"Serving {cfg.model} as {name!r} on http://{cfg.host}:{cfg.port} (OpenAI-compatible: /v1/chat/completions, "
          f"/v1/completions, /v1/models; /health). Ctrl-C stops.", flush=True)
    uvicorn.Server(uvicorn_config(app, cfg)).run()

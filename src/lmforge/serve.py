"""`lmforge serve MODEL`: an OpenAI-compatible HTTP server over the one generation path.

    POST /v1/chat/completions   messages -> reply (stream=true: server-sent events)
    POST /v1/completions        prompt -> continuation (stream=true: server-sent events)
    GET  /v1/models             the served model
    GET  /health                liveness and load (never needs the API key)

How a request flows: the handler reads the body (capped), validates every field (a 4xx naming
the parameter), tokenises, takes a concurrency slot (429 at once when slots and queue are
full) and hands the job to the scheduler thread. That thread owns the model: between decoding
steps it admits new jobs into the running batch (`generation.Engine`: continuous batching, so
concurrent clients share each forward pass) and pushes each step's new text back to the
handlers. A client that disconnects, or a request that outlives its timeout, is cancelled and
its slot freed.

Safe defaults: binds 127.0.0.1, caps on tokens, prompt length, body size, stop strings, `n`,
concurrency and queue, a per-request timeout, and optional API-key authentication (`--api-key`
or LMFORGE_API_KEY; every path but /health then needs `Authorization: Bearer KEY`).
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at
# definition time, and `Request` is imported inside create_app (fastapi is an optional extra).
import asyncio
import hmac
import json
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmforge.config import Schema
from lmforge.errors import LmforgeError
from lmforge.generation import (
    Engine,
    SamplingParams,
    context_length,
    encode_prompts,
    load_model_for_inference,
)


class ServeConfig(Schema):
    """The server's address, limits and model."""

    model: str = Field(description="Model folder: a local HF causal LM, a stage folder, or a PEFT adapter folder.")
    served_name: str | None = Field(None, description="Model id clients pass as `model` (default: the folder's name).")
    host: str = Field("127.0.0.1", description="Address to bind; 127.0.0.1 keeps the server private to this machine.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port).")
    device: str | None = Field(None, description="cpu, cuda, cuda:1, ... (default: cuda when available).")
    dtype: str = Field("auto", description="auto, fp32, bf16 or fp16.")
    max_tokens: int = Field(512, ge=1, description="Most completion tokens one request may ask for (also the default).")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt accepted, in tokens (default: the model's context minus one).")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted (413 above).")
    max_stop: int = Field(4, ge=0, le=16, description="Most stop strings per request.")
    max_n: int = Field(8, ge=1, le=128, description="Most completions per request (`n`).")
    max_concurrent: int = Field(16, ge=1, description="Requests generated at once; they share each forward pass.")
    max_queue: int = Field(32, ge=0, description="Requests waiting for a slot; beyond it requests get 429 at once.")
    max_batch: int = Field(64, ge=1, description="Rows (completions) decoded together in one forward pass.")
    request_timeout_s: float = Field(
        120.0, gt=0, allow_inf_nan=False, description="A request still unfinished after this long is cancelled (504).")
    api_key: str | None = Field(None, description="Require `Authorization: Bearer <key>` (default: LMFORGE_API_KEY if set).")
    access_log: bool = Field(False, description="Print one line per HTTP request.")


class ApiError(Exception):
    """An error answered to the client as OpenAI's `{"error": {...}}` JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------------------------
# Request schemas: strict types (no "0.5" for a number, no 1.0 for an integer), unknown fields
# rejected. Ranges are checked by SamplingParams, so the server and the library agree.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _TextPart(_Strict):
    type: Literal["text"]
    text: str


class _Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]
    name: str | None = None


class _StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    user: str | None = None
    # Extensions beyond OpenAI's API (the `extra_body` of the openai client), as in vLLM.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None


class ChatRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None


# Request field -> SamplingParams field (for values and for naming the culprit in errors).
_TO_PARAMS = {
    "temperature": "temperature", "top_p": "top_p", "n": "n", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "seed": "seed", "top_k": "top_k", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty", "min_tokens": "min_new_tokens", "stop_token_ids": "stop_token_ids",
}
_FROM_PARAMS = {v: k for k, v in _TO_PARAMS.items()}


def _validation_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    # pydantic appends the union member that failed ("str", "list[...]") to the location: drop it.
    loc = [p for p in loc if not p.startswith(("list[", "str", "int", "float", "bool", "function-"))] or loc
    param = ".".join(loc)
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}.", param, "unknown_parameter")
    if err["type"] == "missing":
        return ApiError(400, f"Missing required parameter: {param}.", param, "missing_required_parameter")
    return ApiError(400, f"Invalid value for {param}{_shown(err.get('input'))}: {err['msg']}.", param, "invalid_value")


def _shown(value: Any) -> str:
    """' (got VALUE)' for an error message, cut short; nothing for objects and lists."""
    if isinstance(value, (dict, list)):
        return ""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        text = repr(value)
    return f" (got {text[:60]}{'...' if len(text) > 60 else ''})"


# --------------------------------------------------------------------------------------------
# Jobs and the scheduler thread


class Job:
    """One HTTP request's generation: its prompts, parameters, and a queue of results."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompts: list[list[int]], params: SamplingParams,
                 stream: bool, deadline: float):
        self.loop, self.prompts, self.params, self.stream, self.deadline = loop, prompts, params, stream, deadline
        self.events: asyncio.Queue = asyncio.Queue()
        self.rows: list[Any] = []  # the engine's rows, set by the scheduler thread
        self.closed = False  # set by the handler when it stops listening

    def push(self, item: tuple) -> None:
        """Called from the scheduler thread: hand an event to the request's handler."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Scheduler:
    """The thread that owns the model: admits jobs into the engine and steps it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.rows_active = 0  # for /health, written by the thread only
        self.rows_cancelled = 0  # rows stopped before they finished (client gone, timeout)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmforge-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(("wake", None))
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        self.inbox.put(("add", job))

    def cancel(self, job: Job) -> None:
        self.inbox.put(("cancel", job))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.engine.has_work())
            if not self.engine.has_work():
                continue
            try:
                changed = self.engine.step()
            except Exception as e:  # a bug or out of memory: fail the jobs in flight, keep serving
                jobs = {row.tag[0] for row in [*self.engine.rows, *(r for g in self.engine.pending for r in g)]}
                for job in jobs:
                    job.push(("error", f"generation failed: {type(e).__name__}: {e}"))
                self.engine.pending.clear()
                self.engine._clear()
                changed = []
            for row in changed:
                job, base = row.tag
                text = row.take_text()
                if text or row.finished:
                    job.push(("delta", base + row.sample_index, text, row.finish_reason, len(row.token_ids)))
            self.rows_active = self.engine.active

    def _drain(self, block: bool) -> None:
        try:
            kind, job = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if kind == "add" and not job.closed:
                try:
                    for i, ids in enumerate(job.prompts):
                        # Choice i*n + j is completion j of prompt i, seeded with stream i*n + j.
                        job.rows += self.engine.add(ids, job.params, tag=(job, i * job.params.n), stream=job.stream,
                                                    seed_stream=i * job.params.n)
                except LmforgeError as e:  # the request itself is at fault: a 400, not a 500
                    for r in job.rows:
                        self.engine.cancel(r)
                    job.push(("invalid", str(e)))
            elif kind == "cancel":
                for r in job.rows:
                    if not r.finished:
                        self.rows_cancelled += 1
                        self.engine.cancel(r)
            try:
                kind, job = self.inbox.get_nowait()
            except queue.Empty:
                return


class Slots:
    """At most `limit` requests generating and `queue_limit` waiting; beyond that, 429 at once.

    Used from the event loop only, so plain counters are safe.
    """

    def __init__(self, limit: int, queue_limit: int):
        self.limit, self.queue_limit = limit, queue_limit
        self.running = 0
        self.waiting: deque[asyncio.Future] = deque()

    async def acquire(self, timeout: float) -> None:
        if self.running < self.limit:
            self.running += 1
            return
        if len(self.waiting) >= self.queue_limit:
            raise ApiError(429, f"The server is busy ({self.running} requests running, {len(self.waiting)} waiting); "
                           "retry later.", None, "rate_limit_exceeded", "rate_limit_error")
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot arrived just as we gave up: pass it on
            else:
                fut.cancel()
                self.waiting.remove(fut)
            if isinstance(e, asyncio.CancelledError):
                raise
            raise ApiError(504, "The request timed out waiting for a free slot.", None, "timeout", "timeout") from None

    def release(self) -> None:
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the next waiter
                return
        self.running -= 1


# --------------------------------------------------------------------------------------------
# The app


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


class _ApiKey:
    """ASGI middleware: every path but /health needs `Authorization: Bearer <key>` (401 otherwise)."""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            header = dict(scope["headers"]).get(b"authorization", b"")
            given = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                from starlette.responses import JSONResponse

                err = ApiError(401, "Missing or wrong API key; send `Authorization: Bearer <key>`.", None,
                               "invalid_api_key", "authentication_error")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(cfg: ServeConfig, model: Any = None, tokenizer: Any = None):
    """The FastAPI app serving `model` (loaded from cfg.model when not given)."""
    from contextlib import asynccontextmanager

    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError:
        raise LmforgeError("lmforge serve needs fastapi and uvicorn; install them with pip install 'lmforge[serve]'.") from None

    if model is None or tokenizer is None:
        model, tokenizer = load_model_for_inference(cfg.model, device=cfg.device, dtype=cfg.dtype)
    name = cfg.served_name or Path(cfg.model).resolve().name
    ctx = context_length(model)
    max_prompt = cfg.max_prompt_tokens or ((ctx - 1) if ctx else 1 << 30)
    api_key = cfg.api_key if cfg.api_key is not None else os.environ.get("LMFORGE_API_KEY") or None
    engine = Engine(model, tokenizer, max_batch=cfg.max_batch)
    scheduler = Scheduler(engine)
    slots = Slots(cfg.max_concurrent, cfg.max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.slots, app.state.served_name = scheduler, slots, name

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    if api_key is not None:
        app.add_middleware(_ApiKey, key=api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "running": slots.running, "waiting": len(slots.waiting),
                "rows": scheduler.rows_active, "rows_cancelled": scheduler.rows_cancelled}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "lmforge"}]}

    async def read_body(request: Request, schema: type[_Sampling]) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_body_bytes:
            raise ApiError(413, f"The request body has {length} bytes; this server accepts at most {cfg.max_body_bytes}.")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > cfg.max_body_bytes:
                raise ApiError(413, f"The request body is larger than {cfg.max_body_bytes} bytes.")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"The request body is not valid JSON ({e}).") from None
        if not isinstance(data, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.model != name:
            raise ApiError(404, f"The model {req.model!r} does not exist; this server serves {name!r}.", "model",
                           "model_not_found")
        return req

    def sampling(req: _Sampling, prompts: list[list[int]], max_tokens: int | None, prompt_param: str) -> SamplingParams:
        for i, ids in enumerate(prompts):
            where = prompt_param if len(prompts) == 1 else f"{prompt_param}.{i}"
            if not ids:
                raise ApiError(400, f"{where} is empty.", where)
            if len(ids) > max_prompt:
                raise ApiError(400, f"{where} has {len(ids)} tokens; this server accepts prompts of at most {max_prompt} "
                               "tokens.", where, "context_length_exceeded")
        longest = max(len(ids) for ids in prompts)
        room = (ctx - longest) if ctx else cfg.max_tokens
        if max_tokens is None:
            max_tokens = min(cfg.max_tokens, room)
        elif max_tokens > cfg.max_tokens:
            raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {cfg.max_tokens}.", "max_tokens")
        elif max_tokens > room:
            raise ApiError(400, f"max_tokens is {max_tokens}, but the prompt has {longest} tokens and the model's context "
                           f"is {ctx}; use max_tokens <= {room}.", "max_tokens", "context_length_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > cfg.max_stop:
            raise ApiError(400, f"stop has {len(stops)} strings; this server allows at most {cfg.max_stop}.", "stop")
        if any(t >= engine.vocab_size for t in req.stop_token_ids or []):
            raise ApiError(400, f"stop_token_ids holds an id outside the vocabulary of {engine.vocab_size}.",
                           "stop_token_ids")
        if req.n is not None and req.n > cfg.max_n:
            raise ApiError(400, f"n is {req.n}; this server allows at most {cfg.max_n}.", "n")
        values: dict[str, Any] = {"max_new_tokens": max_tokens, "stop": stops}
        for field, target in _TO_PARAMS.items():
            v = getattr(req, field)
            if v is not None:
                values[target] = v
        try:
            return SamplingParams.model_validate(values)
        except ValidationError as e:
            err = e.errors()[0]
            target = str(err["loc"][0]) if err["loc"] else ""
            param = {"max_new_tokens": "max_tokens"}.get(target, _FROM_PARAMS.get(target, target))
            msg = err["msg"].removeprefix("Value error, ")
            raise ApiError(400, f"Invalid value for {param}{_shown(err.get('input'))}: {msg}.", param or None,
                           "invalid_value") from None

    async def run_job(prompts: list[list[int]], params: SamplingParams, stream: bool, render: Any, usage: bool):
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
            return _job_stream(sse(job, n_choices, prompt_tokens, render, usage), close)
        try:
            texts, reasons, completion_tokens = [""] * n_choices, [None] * n_choices, [0] * n_choices
            while any(r is None for r in reasons):
                item = await next_event(job)
                if item[0] != "delta":
                    raise _event_error(item)
                _, index, text, reason, n_tokens = item
                texts[index] += text
                reasons[index], completion_tokens[index] = reason, n_tokens
            return render.final(texts, reasons, prompt_tokens, sum(completion_tokens))
        finally:
            close()

    async def next_event(job: Job) -> tuple:
        left = job.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(job.events.get(), max(left, 0.001))
        except asyncio.TimeoutError:
            raise ApiError(504, f"The request did not finish within {cfg.request_timeout_s:g} s and was cancelled.",
                           None, "timeout", "timeout") from None

    async def sse(job: Job, n_choices: int, prompt_tokens: int, render: Any, usage: bool) -> AsyncIterator[bytes]:
        def event(obj: Any) -> bytes:
            return f"data: {json.dumps(obj)}\n\n".encode()

        for chunk in render.start(n_choices):
            yield event(chunk)
        done, completion_tokens = 0, [0] * n_choices
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
            if text:
                yield event(render.delta(index, text, None))
            if reason is not None:
                done += 1
                yield event(render.delta(index, "", reason))
        else:
            if usage:
                yield event(render.usage(prompt_tokens, sum(completion_tokens)))
        yield b"data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        from lmforge.data.chat import render

        req: ChatRequest = await read_body(request, ChatRequest)
        messages = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        if req.logprobs:
            raise ApiError(400, "logprobs are not supported by this server.", "logprobs")
        text = render(tokenizer, messages, add_generation_prompt=True)
        prompts = encode_prompts(tokenizer, [text], add_special_tokens=False)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling(req, prompts, max_tokens, "messages")
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return await run_job(prompts, params, req.stream, _ChatRender(name), usage)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await read_body(request, CompletionRequest)
        if req.echo:
            raise ApiError(400, "echo is not supported by this server.", "echo")
        if req.logprobs is not None:
            raise ApiError(400, "logprobs are not supported by this server.", "logprobs")
        p = req.prompt
        items: list = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not items:
            raise ApiError(400, "prompt is empty.", "prompt")
        vocab = engine.vocab_size
        for it in items:
            if not isinstance(it, str) and any(not 0 <= t < vocab for t in it):
                raise ApiError(400, f"prompt holds a token id outside the vocabulary of {vocab}.", "prompt")
        prompts = encode_prompts(tokenizer, items)
        params = sampling(req, prompts, req.max_tokens, "prompt")
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return await run_job(prompts, params, req.stream, _CompletionRender(name), usage)

    return app


class _ChatRender:
    """OpenAI chat.completion(.chunk) objects."""

    def __init__(self, model: str):
        self.model, self.id, self.created = model, f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def _chunk(self, choices: list, **extra: Any) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def start(self, n: int) -> list[dict]:
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(n)]

    def delta(self, index: int, text: str, reason: str | None) -> dict:
        return self._chunk([{"index": index, "delta": {"content": text} if text else {}, "logprobs": None,
                             "finish_reason": reason}])

    def usage(self, prompt: int, completion: int) -> dict:
        return self._chunk([], usage=_usage(prompt, completion))

    def final(self, texts: list[str], reasons: list, prompt: int, completion: int) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                             "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))],
                "usage": _usage(prompt, completion)}


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


def serve(cfg: ServeConfig) -> None:
    """Load the model and serve it until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise LmforgeError("lmforge serve needs fastapi and uvicorn; install them with pip install 'lmforge[serve]'.") from None

    api_key = cfg.api_key if cfg.api_key is not None else os.environ.get("LMFORGE_API_KEY") or None
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {cfg.host} without an API key; anyone who can reach this port can use the model.")
    app = create_app(cfg)
    name = app.state.served_name
    print(f"Serving {cfg.model} as {name!r} on http://{cfg.host}:{cfg.port} (OpenAI-compatible: /v1/chat/completions, "
          f"/v1/completions, /v1/models; /health). Ctrl-C stops.", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=cfg.access_log)

"""Request validation, as pure functions: raw body bytes -> JSON object -> a request and its
`SamplingParams` -> (after tokenisation) the parameters fitted to the prompts' lengths.

Nothing here touches HTTP, the model or the event loop, so every rule is tested directly
(tests/hardening/test_server.py) and fuzzed (tests/hardening/test_server_fuzz.py). Every
failure is an `ApiError`: a 4xx whose message and `param` name the offending field.

    data = decode_body(raw)                          # JSON object, depth and text checked
    req = parse_request(data, "chat", limits)        # fields, types, ranges, rows, cheap length bound
    ids = <tokenise req.messages or req.prompts>     # off the event loop
    params = fit_to_prompts(req, ids, limits)        # prompt lengths vs the context
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmforge.generation import SamplingParams

MAX_DEPTH = 32  # JSON nesting accepted: OpenAI's bodies need 4 (messages -> parts -> part)


class ApiError(Exception):
    """An error answered to the client as OpenAI's `{"error": {...}}` JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What the server accepts: its settings plus what the model allows."""

    served_name: str
    max_tokens: int  # most completion tokens per request, and the default
    max_prompt: int  # most prompt tokens
    context: int | None  # the model's context length
    max_stop: int
    max_n: int
    max_rows: int  # most completions per request: prompts x n
    vocab_size: int
    max_token_chars: int  # characters in the longest vocabulary entry (a token covers at most that many)


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
    index: str | None = None  # extension: the retrieval index to answer from (`lmforge serve --index NAME=DIR`)


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


@dataclass
class Parsed:
    """A validated request, before tokenisation."""

    kind: Literal["chat", "completions"]
    messages: list[dict] | None  # chat: role/content dicts ("developer" -> "system", parts joined)
    prompts: list[str | list[int]] | None  # completions: texts or token-id lists
    params: SamplingParams  # max_new_tokens: the request's value, or the server's default
    max_param: str  # the field that set max_new_tokens ("max_tokens" or "max_completion_tokens")
    max_given: bool  # False: max_new_tokens is the default, lowered to fit the context
    stream: bool
    usage: bool  # stream_options.include_usage
    index: str | None = None  # chat: the retrieval index the request names
    retrieval: dict | None = None  # set by the server: the passages put into the prompt

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"


# --------------------------------------------------------------------------------------------
# Body -> JSON object


def decode_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400: not UTF-8, not JSON, not an object, nested
    deeper than MAX_DEPTH, or holding text that is not valid Unicode (a lone surrogate escape
    such as "\\ud800", which no tokenizer can encode)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"The request body is not UTF-8 text (byte {e.start} cannot be decoded).") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise ApiError(400, f"The request body is nested too deeply; at most {MAX_DEPTH} levels are accepted.") from None
    except ValueError as e:
        raise ApiError(400, f"The request body is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    _check_tree(data)
    return data


def _check_tree(data: dict) -> None:
    """Depth and string checks over the whole JSON value, without recursion."""
    stack: list[tuple[Any, tuple, int]] = [(data, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            where = ".".join(map(str, path[:3]))
            raise ApiError(400, f"The request body is nested more than {MAX_DEPTH} levels deep (under {where}).",
                           str(path[0]) if path else None)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for k, v in items:
            if isinstance(k, str) and not _is_unicode(k):
                raise ApiError(400, "A field name in the request body is not valid Unicode (a lone surrogate).")
            if isinstance(v, str):
                if not _is_unicode(v):
                    param = ".".join(map(str, (*path, k)))
                    raise ApiError(400, f"Invalid value for {param}: the text holds a lone surrogate (such as "
                                   "\\ud800), which is not valid Unicode.", param, "invalid_value")
            elif isinstance(v, (dict, list)):
                stack.append((v, (*path, k), depth + 1))


def _is_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# JSON object -> request and SamplingParams


def parse_request(data: dict, kind: Literal["chat", "completions"], limits: Limits) -> Parsed:
    """Validate a chat or completions request body into `Parsed`, or raise ApiError (a 4xx naming the field)."""
    schema = ChatRequest if kind == "chat" else CompletionRequest
    try:
        req = schema.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None
    except RecursionError:
        raise ApiError(400, "The request body is nested too deeply.") from None
    if req.model != limits.served_name:
        raise ApiError(404, f"The model {req.model!r} does not exist; this server serves {limits.served_name!r}.",
                       "model", "model_not_found")
    if req.logprobs:
        raise ApiError(400, "logprobs are not supported by this server.", "logprobs")
    messages = prompts = None
    if isinstance(req, ChatRequest):
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in req.messages]
        given, max_param = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens is not None
                            else (req.max_tokens, "max_tokens"))
        chars = sum(len(m["content"]) for m in messages)
        _cheap_length_check("messages", chars, limits)
        rows_param = "n"
    else:
        if req.echo:
            raise ApiError(400, "echo is not supported by this server.", "echo")
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise ApiError(400, "prompt is empty.", "prompt")
        for i, item in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            if isinstance(item, str):
                _cheap_length_check(where, len(item), limits)
            else:
                if any(not 0 <= t < limits.vocab_size for t in item):
                    raise ApiError(400, f"{where} holds a token id outside the vocabulary of {limits.vocab_size}.", where)
                if len(item) > limits.max_prompt:
                    raise ApiError(400, f"{where} has {len(item)} tokens; this server accepts prompts of at most "
                                   f"{limits.max_prompt} tokens.", where, "context_length_exceeded")
        given, max_param = req.max_tokens, "max_tokens"
        rows_param = "n" if len(prompts) == 1 else "prompt"
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > limits.max_stop:
        raise ApiError(400, f"stop has {len(stops)} strings; this server allows at most {limits.max_stop}.", "stop")
    if any(t >= limits.vocab_size for t in req.stop_token_ids or []):
        raise ApiError(400, f"stop_token_ids holds an id outside the vocabulary of {limits.vocab_size}.", "stop_token_ids")
    n = req.n if req.n is not None else 1
    if n > limits.max_n:
        raise ApiError(400, f"n is {n}; this server allows at most {limits.max_n}.", "n")
    rows = n * (len(prompts) if prompts is not None else 1)
    if rows > limits.max_rows:
        raise ApiError(400, f"This request asks for {rows} completions ({len(prompts or [0])} prompts x n={n}); this server "
                       f"allows at most {limits.max_rows} per request.", rows_param, "too_many_completions")
    if given is not None and given > limits.max_tokens:
        raise ApiError(400, f"{max_param} is {given}; this server allows at most {limits.max_tokens}.", max_param)
    values: dict[str, Any] = {"max_new_tokens": given if given is not None else limits.max_tokens, "stop": stops}
    for field, target in _TO_PARAMS.items():
        v = getattr(req, field)
        if v is not None:
            values[target] = v
    params = _sampling_params(values, max_param, given is not None)
    return Parsed(kind, messages, prompts, params, max_param, given is not None, req.stream,
                  bool(req.stream_options and req.stream_options.include_usage), getattr(req, "index", None))


def _cheap_length_check(where: str, chars: int, limits: Limits) -> None:
    """Refuse text that cannot fit before tokenising it: a token covers at most
    `max_token_chars` characters, so `chars / max_token_chars` tokens is a lower bound."""
    at_least = -(-chars // max(limits.max_token_chars, 1))
    if at_least > limits.max_prompt:
        raise ApiError(400, f"{where} has {chars} characters, at least {at_least} tokens; this server accepts prompts "
                       f"of at most {limits.max_prompt} tokens.", where, "context_length_exceeded")


def _sampling_params(values: dict, max_param: str, max_given: bool) -> SamplingParams:
    mn, mx = values.get("min_new_tokens"), values["max_new_tokens"]
    if isinstance(mn, int) and isinstance(mx, int) and mn > mx >= 1:
        limit = f"{max_param} ({mx})" if max_given else f"max_tokens ({mx}, the default here)"
        raise ApiError(400, f"Invalid value for min_tokens (got {mn}): it must not exceed {limit}.", "min_tokens",
                       "invalid_value")
    try:
        return SamplingParams.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        target = str(err["loc"][0]) if err["loc"] else ""
        param = max_param if target == "max_new_tokens" else _FROM_PARAMS.get(target, target)
        msg = err["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"Invalid value for {param}{_shown(err.get('input'))}: {msg}.", param or None,
                       "invalid_value") from None


# --------------------------------------------------------------------------------------------
# Tokenised prompts -> final SamplingParams


def fit_to_prompts(req: Parsed, prompts: list[list[int]], limits: Limits) -> SamplingParams:
    """`req.params` checked against the tokenised prompts: each non-empty and within max_prompt,
    and prompt + max_new_tokens within the context (a default max_new_tokens is lowered to fit)."""
    for i, ids in enumerate(prompts):
        where = req.prompt_param if len(prompts) == 1 else f"{req.prompt_param}.{i}"
        if not ids:
            raise ApiError(400, f"{where} is empty.", where)
        if len(ids) > limits.max_prompt:
            raise ApiError(400, f"{where} has {len(ids)} tokens; this server accepts prompts of at most "
                           f"{limits.max_prompt} tokens.", where, "context_length_exceeded")
    longest = max(len(ids) for ids in prompts)
    params = req.params
    if limits.context is None:
        return params
    room = limits.context - longest
    if not req.max_given:
        values = {**params.model_dump(), "max_new_tokens": max(1, min(params.max_new_tokens, room))}
        return _sampling_params(values, req.max_param, False)
    if params.max_new_tokens > room:
        raise ApiError(400, f"{req.max_param} is {params.max_new_tokens}, but the prompt has {longest} tokens and the "
                       f"model's context is {limits.context}; use {req.max_param} <= {room}.", req.max_param,
                       "context_length_exceeded")
    return params


# --------------------------------------------------------------------------------------------
# Messages


_UNION_TAGS = {"str", "int", "float", "bool", "none"}


def _validation_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    # pydantic appends the union member that failed ("str", "list[...]") to the location: drop it.
    loc = [p for p in loc if p not in _UNION_TAGS and not p.startswith(("list[", "dict[", "function-"))] or loc
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

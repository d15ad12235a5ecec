"""Property-based fuzzing of the server's request parser (issue 13): random JSON values, random
nesting, random text (lone surrogates included) and random bytes never give a 5xx or a
traceback; every refusal is a 4xx whose `param` names a field of the body, and the server
still answers a good request afterwards. Bounded: a fixed number of examples, no deadline."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.serve import ApiError, Limits, decode_body, fit_to_prompts, parse_request
from tests.hardening.test_server import GOOD, one_thread, post, server  # noqa: F401  (one_thread: autouse fixture)

LIMITS = Limits(served_name="tiny", max_tokens=8, max_prompt=127, context=128, max_stop=4, max_n=4, max_rows=16,
                vocab_size=300, max_token_chars=8)
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
          "stream_options", "stop", "presence_penalty", "frequency_penalty", "seed", "user", "top_k", "min_p",
          "repetition_penalty", "min_tokens", "stop_token_ids", "logprobs", "echo", "parallel_tool_calls"]
COMPLETION = {"model": "tiny", "prompt": "Hello", "max_tokens": 3}

# Any Unicode code point, lone surrogates included (json.dumps writes them as \ud800 escapes).
TEXT = st.text(st.characters(exclude_categories=()), max_size=30)
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)
NUMBERS = st.integers(-10, 2**40) | st.floats(-1e300, 1e300) | st.sampled_from([0, 1, -1, 1e-300, 1e-40, 2**63, 0.5])


@st.composite
def bodies(draw) -> tuple[str, dict]:
    """A good request with some fields replaced by random values (or removed, or added)."""
    route = draw(st.sampled_from(["chat", "completions"]))
    body = dict(GOOD if route == "chat" else COMPLETION)
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            body.pop(field, None)
        else:
            body[field] = draw(NUMBERS if choice == 1 else JSON)
    if draw(st.booleans()):
        body[draw(TEXT)] = draw(JSON)
    return route, body


def nested(depth: int, leaf: object) -> object:
    for i in range(depth):
        leaf = [leaf] if i % 2 else {"k": leaf}
    return leaf


def check_refusal(e: ApiError, body: object) -> None:
    assert 400 <= e.status < 500 and e.message, (e.status, e.message)
    if e.param is not None:
        assert isinstance(body, dict), e.param
        # The field the error names (a field name may itself hold "."), or a required one missing.
        top = next((k for k in body if e.param == k or e.param.startswith(f"{k}.")), None)
        assert top is not None or e.code == "missing_required_parameter", (e.param, e.message)
        assert e.param in e.message or e.status == 404 or e.code == "context_length_exceeded", e.message


def parse_all_the_way(route: str, raw: bytes) -> None:
    """decode -> parse -> fit, as the server does (token ids stand in for the tokenizer)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        body = None
    try:
        req = parse_request(decode_body(raw), route, LIMITS)
        ids = [[1] * max(1, len(m["content"]) // 4) for m in req.messages[:1]] if req.messages else \
            [p if isinstance(p, list) else [1] * max(1, len(p) // 4) for p in req.prompts]
        ids = [i[:LIMITS.max_prompt + 5] for i in ids]
        fit_to_prompts(req, ids, LIMITS)
    except ApiError as e:
        check_refusal(e, body)


FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@FAST
@given(bodies())
def test_random_field_values_are_accepted_or_refused_naming_the_field(case):
    route, body = case
    parse_all_the_way(route, json.dumps(body).encode())


@FAST
@given(JSON)
def test_random_json_values_as_the_body(value):
    for route in ("chat", "completions"):
        parse_all_the_way(route, json.dumps(value).encode())


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 3000), st.sampled_from(["messages", "prompt", "stop", "user", "x"]), SCALARS)
def test_random_nesting(depth, field, leaf):
    raw = json.dumps({**COMPLETION, field: nested(depth, leaf)}).encode() if depth < 900 else \
        b'{"model": "tiny", "' + field.encode() + b'": ' + b"[" * depth + b"1" + b"]" * depth + b"}"
    parse_all_the_way("completions", raw)


@FAST
@given(st.binary(max_size=200))
def test_random_bytes(raw):
    try:
        decode_body(raw)
    except ApiError as e:
        assert e.status == 400 and e.param is None and e.message


# --------------------------------------------------------------------------------------------
# The same against a live server: never a 5xx, always JSON, and it keeps answering


@pytest.fixture(scope="module")
def live(tiny_model_dir):
    from lmforge.generation import load_model_for_inference

    model, tok = load_model_for_inference(tiny_model_dir, device="cpu")
    with server(model, tok, max_tokens=8) as base:
        yield base


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(bodies() | st.tuples(st.sampled_from(["chat", "completions"]), JSON))
def test_a_live_server_never_answers_5xx(live, case):
    route, body = case
    r = post(live, json.dumps(body).encode(), "chat/completions" if route == "chat" else "completions")
    assert r.status_code < 500, r.text
    data = r.json()  # always JSON, never a plain-text page
    if r.status_code >= 400:
        check_refusal(ApiError(r.status_code, data["error"]["message"], data["error"]["param"],
                               data["error"]["code"]), body)


def test_the_live_server_still_answers_after_fuzzing(live):
    r = post(live, GOOD)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    health = httpx.get(f"{live}/health").json()
    assert (health["running"], health["waiting"]) == (0, 0)

"""The HTTP server: the official openai client against a live `lmforge serve` on loopback, a
table of bad requests, a bounded load test, disconnects, timeouts, and API keys."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from lmforge.data.chat import render
from lmforge.generation import SamplingParams, generate, load_model_for_inference

GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: extra OpenMP threads only add contention on a shared CI machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen | None = None, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("server did not become healthy")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def live(tiny_model_dir):
    """`lmforge serve` as a user runs it, in a subprocess on a free loopback port."""
    port = free_port()
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", str(tiny_model_dir), "--name", "tiny", "--port", str(port),
           "--max-concurrent", "8", "--device", "cpu", "max_queue=0", "max_tokens=64", "max_stop=4", "max_n=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_API_KEY": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model_for_inference(tiny_model_dir, device="cpu")


@contextlib.contextmanager
def in_process_server(model, tokenizer, **settings):
    """The app on a uvicorn thread (for settings a test needs to vary, and slow models)."""
    import uvicorn

    from lmforge.serve import ServeConfig, create_app, uvicorn_config

    cfg = ServeConfig(model="tiny", served_name="tiny", **settings)
    app = create_app(cfg, model, tokenizer)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, cfg))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_healthy(base, timeout=20)
        yield base
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextlib.contextmanager
def slow_model(model, seconds_per_step: float):
    """The same model, sleeping before every forward pass (so requests are surely still running)."""
    fast = model.forward

    def forward(*args, **kwargs):
        time.sleep(seconds_per_step)
        return fast(*args, **kwargs)

    model.forward = forward
    try:
        yield model
    finally:
        del model.forward


def reference(tiny, messages: list[dict], **params) -> tuple[str, int, int]:
    model, tok = tiny
    ids = tok(render(tok, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    out = generate(model, tok, [ids], SamplingParams(**params))[0]
    return out.text, len(ids), len(out.token_ids)


# --------------------------------------------------------------------------------------------
# The official client


def test_openai_client_chat_and_completions(live, tiny):
    base, _ = live
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list().data] == ["tiny"]

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=12)
    text, n_prompt, n_completion = reference(tiny, msgs, temperature=0, max_new_tokens=12)
    assert r.choices[0].message.content == text  # what the library generates is what is served
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_completion)

    c = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=6, n=2, temperature=0)
    model, tok = tiny
    want = generate(model, tok, ["The quick brown"], SamplingParams(temperature=0, max_new_tokens=6))[0]
    assert [ch.index for ch in c.choices] == [0, 1]
    assert [ch.text for ch in c.choices] == [want.text, want.text]
    assert c.usage.completion_tokens == 2 * len(want.token_ids)

    seeded = [client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=1.0, seed=7).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_openai_client_streaming(live, tiny):
    base, _ = live
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)
    msgs = [{"role": "user", "content": "Hello there!"}]
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=15,
                                                 stream=True, stream_options={"include_usage": True}))
    text, n_prompt, n_completion = reference(tiny, msgs, temperature=0, max_new_tokens=15)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (["stop"], ["length"])
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (n_prompt, n_completion)

    parts = list(client.completions.create(model="tiny", prompt="The quick brown", max_tokens=6, temperature=0,
                                           stream=True))
    model, tok = tiny
    want = generate(model, tok, ["The quick brown"], SamplingParams(temperature=0, max_new_tokens=6))[0]
    assert "".join(p.choices[0].text for p in parts) == want.text
    assert parts[-1].choices[0].finish_reason == want.finish_reason


def test_openai_client_errors(live):
    base, _ = live
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=5, extra_body={"top_k": -2})
    assert e.value.body["param"] == "top_k"


# --------------------------------------------------------------------------------------------
# Bad input

LONG = "word " * 400
BAD = [
    ("chat", b"{not json", 400, None),
    ("chat", b"[1, 2]", 400, None),
    ("chat", {"model": "tiny"}, 400, "messages"),
    ("chat", {**GOOD, "messages": "hi"}, 400, "messages"),
    ("chat", {**GOOD, "messages": []}, 400, "messages"),
    ("chat", {**GOOD, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("chat", {**GOOD, "messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("chat", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("chat", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature"),
    ("chat", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', 400, "top_p"),
    ("chat", {**GOOD, "temperature": -0.5}, 400, "temperature"),
    ("chat", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("chat", {**GOOD, "top_p": 1.5}, 400, "top_p"),
    ("chat", {**GOOD, "top_k": -1}, 400, "top_k"),
    ("chat", {**GOOD, "min_p": 3}, 400, "min_p"),
    ("chat", {**GOOD, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("chat", {**GOOD, "presence_penalty": 9}, 400, "presence_penalty"),
    ("chat", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("chat", {**GOOD, "max_tokens": 10**9}, 400, "max_tokens"),
    ("chat", {**GOOD, "max_tokens": "10"}, 400, "max_tokens"),
    ("chat", {**GOOD, "max_tokens": 5.0}, 400, "max_tokens"),
    ("chat", {**GOOD, "n": 0}, 400, "n"),
    ("chat", {**GOOD, "n": 99}, 400, "n"),
    ("chat", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("chat", {**GOOD, "stop": [""]}, 400, "stop"),
    ("chat", {**GOOD, "seed": -1}, 400, "seed"),
    ("chat", {**GOOD, "stream": "yes"}, 400, "stream"),
    ("chat", {**GOOD, "logprobs": True}, 400, "logprobs"),
    ("chat", {**GOOD, "frobnicate": 1}, 400, "frobnicate"),
    ("chat", {**GOOD, "model": "gpt-4o"}, 404, "model"),
    ("chat", {**GOOD, "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("chat", {**GOOD, "max_tokens": 64, "messages": [{"role": "user", "content": "word " * 20}]}, 400, "max_tokens"),  # 83 + 64 > 128
    ("chat", {**GOOD, "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ("completions", {"model": "tiny", "prompt": []}, 400, "prompt"),
    ("completions", {"model": "tiny", "prompt": 42}, 400, "prompt"),
    ("completions", {"model": "tiny", "prompt": [10**7]}, 400, "prompt"),
    ("completions", {"model": "tiny", "prompt": "hi", "echo": True}, 400, "echo"),
    ("chat", b"{" + b'"x": "' + b"a" * (2 << 20) + b'"}', 413, None),
]


def _post(base: str, route: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    url = f"{base}/v1/{'chat/completions' if route == 'chat' else 'completions'}"
    return httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=10)


@pytest.mark.parametrize("route, body, status, param", BAD, ids=[f"{i}-{b[3]}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_request_is_named_and_the_next_good_one_succeeds(live, route, body, status, param):
    base, _ = live
    r = _post(base, route, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    if param is not None and status == 400:
        assert param.split(".")[0] in err["message"]
    ok = _post(base, "chat", GOOD)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


# --------------------------------------------------------------------------------------------
# Load


def _stream_once(base: str, i: int, results: list, start: threading.Barrier) -> None:
    body = {**GOOD, "stream": True, "max_tokens": 16, "temperature": 0.9, "seed": i}
    start.wait()
    try:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
            if r.status_code != 200:
                r.read()
                results[i] = (r.status_code, r.json()["error"]["code"])
                return
            lines = [x for x in r.iter_lines() if x.startswith("data: ")]
            reasons = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]]
            results[i] = (200, lines[-1] == "data: [DONE]" and reasons[-1] in ("stop", "length"))
    except Exception as e:  # a hung or broken stream fails the test below
        results[i] = (None, repr(e))


def burst(base: str, n: int = 64) -> list:
    results: list = [None] * n
    start = threading.Barrier(n)
    threads = [threading.Thread(target=_stream_once, args=(base, i, results, start)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a request hung"
    return results


def settle(base: str) -> dict:
    """/health once every slot is released (release happens just after the last byte is sent)."""
    deadline = time.time() + 10
    while True:
        h = httpx.get(f"{base}/health", timeout=5).json()
        if (h["running"], h["waiting"], h["rows"]) == (0, 0, 0) or time.time() > deadline:
            return h


def test_64_concurrent_streams_with_a_cap_of_8(live):
    base, proc = live
    first = burst(base, 16)  # warm-up: reaches the same 8 concurrent streams
    rss_before = rss_kib(proc.pid)
    results = burst(base)
    assert all(r is not None and r[0] in (200, 429) for r in first + results), [r for r in results if r is None or r[0] not in (200, 429)]
    ok = [r for r in results if r[0] == 200]
    busy = [r for r in results if r[0] == 429]
    assert len(ok) + len(busy) == 64
    assert len(ok) >= 8 and all(r[1] is True for r in ok)  # every accepted stream ran to [DONE]
    assert all(r[1] == "rate_limit_exceeded" for r in busy)
    h = settle(base)
    assert (h["running"], h["waiting"], h["rows"]) == (0, 0, 0)
    grown = rss_kib(proc.pid) - rss_before
    assert grown < 30_000, f"server memory grew by {grown} KiB over a burst"
    assert _post(base, "chat", GOOD).status_code == 200


# --------------------------------------------------------------------------------------------
# Disconnects, timeouts, queue, keys (an in-process server with a deliberately slow model)


def test_client_disconnect_mid_stream_frees_its_slot(tiny):
    model, tok = tiny
    with slow_model(model, 0.02), in_process_server(model, tok, max_concurrent=1, max_queue=0) as base:
        body = {**GOOD, "stream": True, "max_tokens": 100, "min_tokens": 100, "n": 2}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # (keep the iterator: dropping it would close the response)
            next(lines)  # the stream has started
            deadline = time.time() + 10
            while httpx.get(f"{base}/health").json()["rows"] != 2 and time.time() < deadline:
                time.sleep(0.01)  # until both rows are generating
            busy = _post(base, "chat", GOOD)
            assert busy.status_code == 429  # the only slot is taken, and the queue holds none
        h = settle(base)
        assert (h["running"], h["rows"]) == (0, 0)
        assert h["rows_cancelled"] == 2  # both rows stopped before their 100 tokens
        assert _post(base, "chat", GOOD).status_code == 200


def test_request_timeout_cancels_and_answers_504(tiny):
    model, tok = tiny
    with slow_model(model, 0.02), in_process_server(model, tok, request_timeout_s=0.3) as base:
        body = {**GOOD, "max_tokens": 100, "min_tokens": 100}
        r = _post(base, "chat", body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, timeout=30) as s:
            events = [x for x in s.iter_lines() if x.startswith("data: ")]
        assert json.loads(events[-2][6:])["error"]["code"] == "timeout" and events[-1] == "data: [DONE]"
        h = settle(base)
        assert (h["running"], h["rows"], h["rows_cancelled"]) == (0, 0, 2)


def test_waiting_requests_get_a_slot_in_turn(tiny):
    model, tok = tiny
    with in_process_server(model, tok, max_concurrent=1, max_queue=4) as base:
        results: list = [None] * 4

        def one(i: int) -> None:
            results[i] = _post(base, "chat", {**GOOD, "max_tokens": 8}).status_code

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [200, 200, 200, 200]


def test_a_failing_forward_pass_fails_its_request_not_the_server(tiny):
    model, tok = tiny
    calls = {"n": 0}
    real = model.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated out of memory")
        return real(*args, **kwargs)

    model.forward = flaky
    try:
        with in_process_server(model, tok) as base:
            r = _post(base, "chat", {**GOOD, "max_tokens": 5})
            assert r.status_code == 500 and "simulated out of memory" in r.json()["error"]["message"]
            assert _post(base, "chat", GOOD).status_code == 200
            h = settle(base)
            assert (h["running"], h["rows"]) == (0, 0)
    finally:
        del model.forward


def test_api_key_guards_everything_but_health(tiny):
    model, tok = tiny
    with in_process_server(model, tok, api_key="sekret") as base:
        assert httpx.get(f"{base}/health").status_code == 200
        r = httpx.get(f"{base}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert _post(base, "chat", GOOD).status_code == 401
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="sekret", max_retries=0, timeout=30)
        assert client.chat.completions.create(**GOOD).choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).models.list()


def test_binds_loopback_by_default():
    from lmforge.serve import ServeConfig

    assert ServeConfig(model="m").host == "127.0.0.1"

"""`lmforge serve MODEL`: an OpenAI-compatible HTTP server over the one generation path.

    POST /v1/chat/completions   messages -> reply (stream=true: server-sent events)
    POST /v1/completions        prompt -> continuation (stream=true: server-sent events)
    GET  /v1/models             the served model
    GET  /health                liveness and load (never needs the API key)

How a request flows: the guard checks the Host header, content type and API key; the handler
reads the body (capped in size and time), validates every field (a 4xx naming the parameter;
`requests.py`, pure functions), tokenises off the event loop, takes a concurrency slot (429 at
once when slots and queue are full) and hands the job to the scheduler thread. That thread owns the model: between decoding
steps it admits new jobs into the running batch (`generation.Engine`: continuous batching, so
concurrent clients share each forward pass) and pushes each step's new text back to the
handlers. A client that disconnects (streaming or not), or a request that outlives its timeout,
is cancelled and its slot freed. A request's prompts join the batch in turns with other
requests' (`scheduler.py`), so one large request cannot starve the rest.

Safe defaults: binds 127.0.0.1 and answers only Host headers naming it (DNS rebinding), JSON
bodies only, caps on tokens, prompt length, body size, stop strings, `n`, completions per
request, concurrency, queue and connections, header/body/idle/request timeouts, and optional
API-key authentication (`--api-key-file`, LMFORGE_API_KEY or `--api-key`; every path but /health
then needs `Authorization: Bearer KEY`).

    app.py        settings, the guard, routes, uvicorn
    requests.py   body -> request -> SamplingParams, as pure functions
    scheduler.py  the model thread (continuous batching, fair turns), slots
"""

from lmforge.serve.app import ServeConfig, create_app, resolve_api_key, serve, uvicorn_config
from lmforge.serve.requests import ApiError, Limits, decode_body, fit_to_prompts, parse_request

__all__ = ["ApiError", "Limits", "ServeConfig", "create_app", "decode_body", "fit_to_prompts", "parse_request",
           "resolve_api_key", "serve", "uvicorn_config"]

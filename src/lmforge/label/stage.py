"""Stage `label`: people judge a model's answers in the browser; their judgments become training data.

    prompts ──chat template──> k responses per prompt from the model(s) (lmforge.generation, the one
        sampling path; models take turns, each response keeps its model and sampling parameters)
    or responses: ready rows {"prompt", "responses": [text | {text, model, sampling}], "id"?}
        ──> labels.sqlite (store.py; items already stored are never generated again)
        ──select_by (optional): reward model(s) put the least certain items first (select.py)──>
        ──> the web app (app.py) on 127.0.0.1: annotators rank / choose, flag, write ideal answers
        ──wait: done (until every item has its judgments, or max_wait_s) | none (no server)──>
    data/  preference.jsonl  kto.jsonl  sft.jsonl  items.jsonl  stats.json   (export.py)

`lmforge label PROMPTS --model DIR --k 4 --out DIR` is this stage run from the command line;
`lmforge label --add-annotator NAME --out DIR` prints a new annotator's token and link;
`lmforge label export DIR` writes the export again from the store.

The store lives outside the artifact folder (`<stage>/labels.sqlite`, kept by a fresh start), so
re-running the stage (or `--force`) keeps every judgment. With `wait: none` a recipe re-run exports
what was labelled so far when the stage runs again: give `store:` a path (labels collected by a
separate `lmforge label` server) and it is an input, so new judgments re-run the stage; with the
default store, use --force.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lmforge.config import Device, Schema
from lmforge.data.formats import BadRows, OnBadRows, ReadStats
from lmforge.data.preference import read_prompt_rows
from lmforge.errors import LmforgeError
from lmforge.generation import SamplingParams
from lmforge.label.export import export
from lmforge.label.select import select
from lmforge.label.store import Response, Store, prompt_id_of
from lmforge.rundir import RunDir, staged_dir

ARTIFACT = "data"
PROVIDES = ("preference_data", "sft_data")
INPUTS = {"model": "model", "prompts": None, "responses": None, "select_by": None, "store": None}
STORE = "labels.sqlite"
KEEP = (STORE + "*",)  # the database and its -wal/-shm files: human judgments survive --force


def _default_sampling() -> SamplingParams:
    return SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=128, seed=0)


class Config(Schema):
    prompts: str | list[str] | None = Field(
        None, description="Prompt rows ({prompt} or {messages}, optional {id}) to answer with `model`.")
    model: str | list[str] | None = Field(
        None, description="Model(s) that answer the prompts (stage, model or adapter folders); they take turns.")
    responses: str | list[str] | None = Field(
        None, description="Ready responses instead of (or besides) generating: rows {prompt, responses: "
        "[text or {text, model, sampling}], id (optional)}.")
    k: int = Field(4, ge=2, le=9, description="Responses generated per prompt (keys 1..k on the page).")
    mode: Literal["rank", "pairwise"] = Field(
        "rank", description="rank = order all k responses; pairwise = A / B / tie / both bad (needs k = 2).")
    sampling: SamplingParams = Field(
        default_factory=_default_sampling, description="How responses are sampled (`n` is set from k); recorded "
        "with every response.")
    dataset_split: str | None = Field(None, description="Split to read from a DatasetDict folder.")
    max_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts.")
    system_prompt: str | None = Field(None, description="System turn put before text prompts that have none.")
    on_bad_rows: OnBadRows = Field("error", description="error = stop at a bad row naming it; skip = count it.")
    annotators: list[str] = Field(
        default_factory=list, description="Annotator names; a new one gets a token, printed once with its link.")
    overlap: float = Field(
        0.2, ge=0.0, le=1.0, description="Share of items judged by several annotators (for agreement).")
    overlap_annotators: int = Field(2, ge=2, description="Annotators per overlap item.")
    wait: Literal["done", "none"] = Field(
        "done", description="done = serve the page until every item is judged (or max_wait_s); none = serve "
        "nothing and export what was labelled so far.")
    max_wait_s: float | None = Field(None, gt=0, description="Stop waiting after this many seconds (None = no limit).")
    select_by: list[str] = Field(
        default_factory=list, description="Active selection: reward model folder(s); with one, the items it is "
        "least sure about come first; with two, the items they order most differently (label/select.py).")
    host: str = Field("127.0.0.1", description="Address to bind (0.0.0.0 exposes the page to the network).")
    port: int = Field(8765, ge=0, le=65535, description="TCP port (0 = any free port).")
    store: str | None = Field(
        None, description="The labelling database (default: <stage folder>/labels.sqlite); when given it is an input: "
        "new judgments in it re-run the stage.")
    max_batch: int = Field(32, ge=1, description="Responses decoded together.")
    device: Device = Field(None, description="cpu, cuda, cuda:1, ... (None = cuda when available).")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Sampling dtype (auto: bf16 on GPU).")

    @model_validator(mode="after")
    def _pairwise_is_two(self) -> "Config":
        if self.mode == "pairwise" and self.k != 2:
            raise ValueError(f"mode pairwise compares two responses; set k: 2 (it is {self.k})")
        return self

    @property
    def models(self) -> list[str]:
        return [self.model] if isinstance(self.model, str) else list(self.model or [])


def store_path(cfg: Config, rd: RunDir) -> Path:
    return Path(cfg.store) if cfg.store else rd.path / STORE


def open_store(folder: str | Path) -> Store:
    """The store of a label folder (or the database file itself), for `chat --feedback`, `serve`
    feedback and `lmforge label export`."""
    p = Path(folder)
    return Store(p if p.suffix == ".sqlite" else p / STORE)


def generate_items(cfg: Config, store: Store, counts: dict) -> None:
    """k responses for every prompt not yet stored, the models taking turns (model m answers
    k // M (+1 for the first k % M models) times)."""
    from lmforge.data.chat import render
    from lmforge.generation import generate, load_model_for_inference

    stats = ReadStats()
    rows = read_prompt_rows(cfg, stats)
    counts["skipped_prompt_rows"] = stats.as_dict()["skipped"]
    todo = [(str(v.get("id") or prompt_id_of(t)), t, w) for t, v, w in rows]
    todo = [x for x in todo if not store.has_item(x[0])]
    counts["prompts"] += len(rows)
    if not todo:
        return
    models = cfg.models
    if not models:
        raise LmforgeError("label needs `model` to answer the prompts (or give ready `responses`).")
    answers: list[list[Response]] = [[] for _ in todo]
    for m, path in enumerate(models):
        n = cfg.k // len(models) + (1 if m < cfg.k % len(models) else 0)
        if n == 0:
            continue
        model, tok = load_model_for_inference(path, device=cfg.device, dtype=cfg.dtype)
        params = cfg.sampling.model_copy(update={"n": n})
        texts = [render(tok, t, add_generation_prompt=True) for _, t, _ in todo]
        print(f"label: {len(todo)} prompts x {n} responses from {path}", flush=True)
        outs = generate(model, tok, texts, params, max_batch=cfg.max_batch, add_special_tokens=False)
        for o in outs:
            sampling = {**params.model_dump(mode="json"), "seed_stream": o.prompt_index * n + o.sample_index}
            answers[o.prompt_index].append(Response(o.text.strip(), str(path), sampling, o.finish_reason))
        del model
    for (pid, turns, where), resp in zip(todo, answers):
        _add(store, pid, turns, resp, where, counts)


def _add(store: Store, pid: str, turns: list[dict], responses: list[Response], where: str, counts: dict) -> None:
    """Store one item: empty and repeated responses dropped (counted); fewer than two left: no item."""
    keep, seen = [], set()
    for r in responses:
        if not r.text:
            counts["empty_responses"] += 1
        elif r.text in seen:
            counts["duplicate_responses"] += 1
        else:
            seen.add(r.text)
            keep.append(r)
    if len(keep) < 2:
        counts["items_without_two_responses"] += 1
        return
    counts["items_added"] += int(store.add_item(pid, turns, keep, where))


def ready_items(cfg: Config, store: Store, counts: dict) -> None:
    """Items from rows of ready responses (outputs of another system)."""
    stats = ReadStats()
    bad = BadRows(cfg.on_bad_rows, stats)
    src = cfg.model_copy(update={"prompts": cfg.responses})
    for turns, v, where in read_prompt_rows(src, stats):
        raw = v.get("responses")
        if not isinstance(raw, list) or len(raw) < 2:
            bad("bad responses", f"{where} field 'responses' must list at least two responses")
            continue
        resp = []
        for i, r in enumerate(raw):
            if isinstance(r, str):
                r = {"text": r}
            if not isinstance(r, dict) or not isinstance(r.get("text"), str) or not isinstance(r.get("sampling", {}), dict):
                bad("bad response", f"{where} responses[{i}] must be text or {{text, model, sampling}}")
                resp = None
                break
            resp.append(Response(r["text"].strip(), str(r.get("model") or "unknown"), r.get("sampling") or {},
                                 r.get("finish_reason")))
        if resp is None:
            continue
        if cfg.mode == "pairwise" and len(resp) != 2:
            bad("bad responses", f"{where} field 'responses' holds {len(resp)} responses; pairwise mode needs 2")
            continue
        counts["prompts"] += 1
        _add(store, str(v.get("id") or prompt_id_of(turns)), turns, resp, where, counts)
    counts["skipped_response_rows"] = stats.as_dict()["skipped"]


def add_annotators(store: Store, names: list[str]) -> dict[str, str]:
    """Register new names; returns {name: token} of the new ones (printed once, never stored)."""
    known = {a.name for a in store.annotators()}
    return {n: store.add_annotator(n) for n in names if n not in known}


def wait_for_labels(cfg: Config, store: Store, new_tokens: dict[str, str]) -> str:
    """Serve the page until every item is judged, max_wait_s passes, or Ctrl-C; returns why it stopped."""
    from lmforge.label.app import Server

    server = Server(store, cfg.host, cfg.port).start()
    store.set_meta(url=server.url)  # what `--add-annotator` prints while this server runs
    print(f"label: serving {server.url} ({store.n_items()} items; Ctrl-C stops and exports)", flush=True)
    for name, token in new_tokens.items():
        print(f"label: annotator {name}: {server.url}?token={token}", flush=True)
    if not store.annotators():
        print("label: no annotator yet: add one with `lmforge label --add-annotator NAME --out <stage folder>`",
              flush=True)
    t0 = time.time()
    why = "every item judged"
    try:
        while not (store.annotators() and store.is_complete()):
            if cfg.max_wait_s is not None and time.time() - t0 > cfg.max_wait_s:
                why = f"max_wait_s {cfg.max_wait_s:g} passed"
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        why = "stopped by the user"
    finally:
        server.stop()
    return why


def run(cfg: Config, rd: RunDir, resume: bool = False) -> dict:
    if cfg.prompts is None and cfg.responses is None:
        raise LmforgeError("label needs `prompts` (answered by `model`) or ready `responses`.")
    store = Store(store_path(cfg, rd))
    store.configure(mode=cfg.mode, overlap=cfg.overlap, overlap_annotators=cfg.overlap_annotators)
    counts = {"prompts": 0, "items_added": 0, "empty_responses": 0, "duplicate_responses": 0,
              "items_without_two_responses": 0}
    if cfg.responses is not None:
        ready_items(cfg, store, counts)
    if cfg.prompts is not None:
        generate_items(cfg, store, counts)
    if store.n_items() == 0:
        raise LmforgeError("label has no item to judge: no prompt gave two distinct non-empty responses "
                           f"(counts: {counts}).")
    if cfg.select_by:
        counts["selection"] = select(store, cfg.select_by, device=cfg.device)
    tokens = add_annotators(store, cfg.annotators)
    stopped = wait_for_labels(cfg, store, tokens) if cfg.wait == "done" else "wait: none"
    with staged_dir(rd.artifact) as tmp:
        s = export(store, tmp)
    summary = {**counts, "stopped": stopped, "store": str(store.path), **s}
    store.close()
    rd.log(f"label: {stopped}; {s['judgments']} judgments of {s['items']} items; rows {s['rows']}")
    print(f"label: {stopped}; {s['judgments']} judgments; wrote {s['rows']} rows to {rd.artifact}", flush=True)
    return summary

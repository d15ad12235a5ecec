"""The `lmforge` command line.

Every user-fixable problem surfaces as an `LmforgeError`: `main()` prints its one sentence and
exits with status 2. Tracebacks are kept for genuine bugs only.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import typer

from lmforge.errors import LmforgeError, Preempted

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="lmforge: raw text -> curated data -> tokenizer -> pre-training -> fine-tuning -> alignment "
    "-> evaluation -> serving, in one checked pipeline.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

def _device_option(device: Optional[str]) -> Optional[str]:
    """--device checked where it is given (config.check_device, as every `device` setting)."""
    from lmforge.config import check_device

    try:
        return check_device(device)
    except ValueError as e:
        raise LmforgeError(f"--device {device}: {e}.") from None


OVERRIDES_HELP = "Overrides as key.path=value (for a recipe: stage_name.key.path=value), parsed as YAML values."


@app.command("run")
def run_cmd(
    recipe: Optional[str] = typer.Argument(
        None, help="Recipe YAML to run, or a built-in recipe's name (quick, default, ...). Omit to run the "
        "built-in default pipeline (recipes/default.yaml)."
    ),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    force: bool = typer.Option(False, "--force", help="Re-run every stage even if its inputs and config are unchanged."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name (outputs go to runs/<name>/); default from the recipe."),
    out_dir: Optional[str] = typer.Option(None, "--out-dir", help="Parent folder of runs (default: runs)."),
) -> None:
    """Run a recipe's stages in order; unchanged stages are skipped, interrupted ones resume."""
    from lmforge.pipeline import recipe_path, run_recipe

    path = recipe
    if recipe is not None and "=" in recipe and not os.path.exists(recipe):
        # `lmforge run stage.key=value` with the default recipe.
        overrides = [recipe] + list(overrides or [])
        path = None
    top = {k: v for k, v in (("name", name), ("out_dir", out_dir)) if v is not None}
    run_recipe(recipe_path(path), overrides or [], force=force, top_overrides=top)


@app.command("plan")
def plan_cmd(
    recipe: Optional[str] = typer.Argument(None, help="Recipe YAML (or a built-in recipe's name). Omit for the default."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    force: bool = typer.Option(False, "--force", help="Plan as `lmforge run --force` would run."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name (outputs go to runs/<name>/); default from the recipe."),
    out_dir: Optional[str] = typer.Option(None, "--out-dir", help="Parent folder of runs (default: runs)."),
) -> None:
    """Show, without running anything, each stage's inputs and outputs and whether a run would skip,
    resume or start it afresh, and why."""
    from lmforge.dryrun import describe
    from lmforge.pipeline import recipe_path

    path = recipe
    if recipe is not None and "=" in recipe and not os.path.exists(recipe):
        overrides, path = [recipe] + list(overrides or []), None
    top = {k: v for k, v in (("name", name), ("out_dir", out_dir)) if v is not None}
    print(describe(recipe_path(path), overrides or [], force=force, top_overrides=top))


def _stage_command(kind: str, summary: str) -> None:
    """Register `lmforge <kind> CONFIG.yaml [key=value ...]` for one stage."""

    def command(
        config: Optional[str] = typer.Argument(None, help=f"The {kind} stage's YAML config (see `lmforge schema {kind}`)."),
        overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
        out: Optional[str] = typer.Option(None, "--out", help=f"Stage folder to write (default: runs/<config name>/{kind})."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the latest complete checkpoint in the stage folder."),
        force: bool = typer.Option(False, "--force", help="Re-run even if the stage already completed with these inputs."),
    ) -> None:
        from lmforge.pipeline import run_single

        if config is not None and "=" in config and not os.path.exists(config):
            overrides, config = [config] + list(overrides or []), None
        run_single(kind, config, overrides or [], out=out, force=force, resume=resume)

    command.__doc__ = summary
    app.command(kind, help=summary)(command)


_stage_command("world", "Generate the built-in invented world: pre-training, tokenizer, SFT, preference, GRPO and held-out eval data.")
_stage_command("curate", "Clean, filter, de-duplicate and split raw text into Parquet shards, with a curation report.")
_stage_command("tokenizer", "Train a byte-level BPE tokenizer (or reuse a local one) and save it in Hugging Face format.")
_stage_command("pretrain", "Pre-train a causal LM from scratch or continue pre-training a local HF checkpoint.")
_stage_command("reward", "Train a reward model (scalar head, Bradley-Terry loss) on preference pairs; saved in HF format.")
_stage_command("dpo", "Preference optimisation: DPO, conservative DPO, IPO, RPO, SimPO, ORPO or KTO, fully or with LoRA/QLoRA.")
_stage_command("rejection", "Rejection sampling (best-of-n): sample, score, keep the best; write SFT and preference data.")
_stage_command("ppo", "RLHF with PPO: rollouts, KL-penalised reward (reward model or rules), GAE, clipped policy and value losses.")
_stage_command("grpo", "GRPO: groups of responses per prompt, group-normalised rewards (rules or a reward model), KL to the reference.")
_stage_command("feedback", "AI feedback: a judge ranks responses under written principles (both orders), or critique-and-revise; writes preference and SFT data.")


@app.command("label")
def label_cmd(
    target: Optional[str] = typer.Argument(None, help="PROMPTS.jsonl whose answers people will judge; or the word "
                                           "`export` followed by a label folder."),
    folder: Optional[str] = typer.Argument(None, help="With `export`: the label folder (the --out of `lmforge label`)."),
    model: Optional[List[str]] = typer.Option(None, "--model", help="Model answering the prompts (repeat for several; they take turns)."),
    k: int = typer.Option(4, "--k", help="Responses per prompt (keys 1..k on the page)."),
    mode: str = typer.Option("rank", "--mode", help="rank (order all k) or pairwise (A / B / tie / both bad; k = 2)."),
    responses: Optional[str] = typer.Option(None, "--responses", help="Ready responses JSONL {prompt, responses: [...]} instead of generating."),
    out: str = typer.Option("runs/label", "--out", help="Label folder: the database (labels.sqlite) and the export (data/)."),
    add_annotator: Optional[List[str]] = typer.Option(None, "--add-annotator", help="Register an annotator (repeatable) and print their token and link."),
    overlap: float = typer.Option(0.2, "--overlap", help="Share of items judged by two annotators (agreement)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 exposes the page to the network)."),
    port: int = typer.Option(8765, "--port", help="TCP port (0 = any free port)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Serve nothing: add the items and export what is labelled so far."),
    max_wait: Optional[float] = typer.Option(None, "--max-wait", help="Stop serving after this many seconds (default: when all is judged, or Ctrl-C)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature (default 1.0)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass (default 0.95)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Most tokens per response (default 128)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (default 0)."),
    fmt: Optional[List[str]] = typer.Option(None, "--format", help="With `export`: preference, kto, sft, items or all (repeatable; default all)."),
    to: Optional[str] = typer.Option(None, "--to", help="With `export`: output folder (default: <folder>/export)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)."),
) -> None:
    """Label model answers in the browser (rank, pairwise, flags, ideal answers) and export preference, KTO and SFT data."""
    import json
    from pathlib import Path

    from lmforge.label.store import Store

    if target == "export" and not os.path.exists("export"):
        from lmforge.label.export import FORMATS, export

        if folder is None:
            raise LmforgeError("`lmforge label export` needs the label folder, e.g. lmforge label export runs/label.")
        db = Path(folder) if Path(folder).is_file() else Path(folder) / "labels.sqlite"
        if not db.is_file():
            raise LmforgeError(f"{folder} holds no labels.sqlite; give the --out folder of `lmforge label`.")
        formats = list(FORMATS) if not fmt or "all" in fmt else fmt
        dest = Path(to) if to else db.parent / "export"
        s = export(Store(db), dest, formats)
        written = ", ".join(f"{f}.jsonl ({s['rows'][f]} rows)" for f in formats)
        print(f"wrote {written} and stats.json to {dest}")
        return
    if target is None and responses is None and add_annotator:
        store = Store(Path(out) / "labels.sqlite")
        url = store.meta("url", f"http://{host}:{port}/")
        for name in add_annotator:
            token = store.add_annotator(name)
            print(f"annotator {name}: token {token}\n    {url}?token={token}")
        return
    if target is None and responses is None:
        raise LmforgeError("lmforge label needs PROMPTS.jsonl (with --model) or --responses FILE.")
    from lmforge.pipeline import run_single

    sampling = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed}
    values = {"prompts": target, "model": list(model or []) or None, "responses": responses, "k": k, "mode": mode,
              "overlap": overlap, "host": host, "port": port, "wait": "none" if no_wait else "done",
              "max_wait_s": max_wait, "annotators": list(add_annotator or []), "device": device,
              **{f"sampling.{key}": v for key, v in sampling.items() if v is not None}}
    overrides = [f"{key}={json.dumps(v)}" for key, v in values.items() if v is not None]
    run_single("label", None, overrides, out=out, force=True, resume=False)


@app.command("score")
def score_cmd(
    model: str = typer.Argument(..., help="A reward model: a reward stage folder or a HF sequence-classification folder."),
    file: str = typer.Argument(..., help="Rows to score: prompt + response/completion, prompt + chosen/rejected, or messages."),
    out: Optional[str] = typer.Option(None, "--out", help="Output JSONL (default: <file name>.scored.jsonl)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Sequences scored together."),
    device: Optional[str] = typer.Option(None, "--device", callback=_device_option, help="cpu, cuda, ... (default: cuda if available)."),
) -> None:
    """Score (prompt, response) rows with a reward model; pairs also get their pairwise accuracy."""
    from lmforge.scoring import score_file

    s = score_file(model, file, out, batch_size=batch_size, device=device)
    print(" ".join(f"{k} {v}" for k, v in s.items()))
_stage_command("sft", "Supervised fine-tuning on chat/Alpaca/prompt-completion data, fully or with LoRA/DoRA/prefix/QLoRA.")
_stage_command("distill", "Distillation: a student (full or adapter) learns a teacher's top-k token distributions on SFT rows.")


@app.command("merge")
def merge_cmd(
    base: str = typer.Argument(..., help="The base model folder (or stage folder) the adapter was trained on."),
    adapter: str = typer.Argument(..., help="The adapter folder (PEFT format), or an sft stage folder."),
    out: str = typer.Argument(..., help="Folder to write the merged Hugging Face model to."),
) -> None:
    """Merge a LoRA/DoRA/QLoRA adapter into its base and save one plain Hugging Face model."""
    from lmforge.adapters import merge

    r = merge(base, adapter, out)
    print(f"merged {adapter} into {base} -> {r['out']} (max |logit difference| vs base+adapter: "
          f"{r['max_abs_logit_diff']:.2e})")


SAMPLING_HELP = (
    "Sampling parameters as key=value: temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, "
    "frequency_penalty, min_new_tokens, max_new_tokens, stop, stop_token_ids, n, seed, logprobs, skip_special_tokens "
    "(lists in YAML: stop=[\"\\n\", \"###\"])."
)
MODEL_HELP = "Model: a local Hugging Face causal-LM folder, a stage folder (e.g. runs/default/sft), or a PEFT adapter folder."


@app.command("generate")
def generate_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    overrides: Optional[List[str]] = typer.Argument(None, help=SAMPLING_HELP, show_default=False),
    prompts: str = typer.Option(..., "--prompts", help="JSONL (a \"prompt\" string or \"messages\" list per line) or a text file (one prompt per line)."),
    out: Optional[str] = typer.Option(None, "--out", help="Output JSONL (default: <prompts>.completions.jsonl)."),
    chat: bool = typer.Option(False, "--chat", help="Render each prompt as a user message with the chat template."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0 = greedy (default 0.7)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass (default 0.9)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Most tokens per completion (default 256)."),
    n: Optional[int] = typer.Option(None, "-n", help="Completions per prompt (default 1)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    batch_size: int = typer.Option(32, "--batch-size", help="Completions decoded together."),
    device: Optional[str] = typer.Option(None, "--device", callback=_device_option, help="cpu, cuda, cuda:1, ... (default: cuda if available)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, bf16 or fp16."),
    index: Optional[str] = typer.Option(None, "--index", help="Retrieval index folder (lmforge index): the top passages go into each prompt's context section."),
    k: int = typer.Option(4, "--k", help="Passages retrieved per prompt (with --index)."),
) -> None:
    """Complete every prompt of a file with a model; write prompts, completions, token counts and finish reasons as JSONL."""
    from lmforge.generation import generate_file, sampling_params

    if out is not None and os.path.isdir(out):  # checked before the model loads and generates
        raise LmforgeError(f"generate --out {out} is a folder; name the JSONL file to write, e.g. {os.path.join(out, 'completions.jsonl')}.")

    params = sampling_params(overrides or [], temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                             n=n, seed=seed)
    s = generate_file(model, prompts, out, params, chat=chat, max_batch=batch_size, device=device, dtype=dtype,
                      retrieval=_retrieval(index, k))
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["finish_reasons"].items()))
    skipped = f"; skipped {s['skipped_blank_lines']} blank line(s)" if s["skipped_blank_lines"] else ""
    print(f"wrote {s['completions']} completions of {s['prompts']} prompts to {s['out']} ({s['completion_tokens']} tokens, "
          f"{s['tokens_per_s']:.0f} tokens/s; finish reasons: {reasons}{skipped})", file=sys.stderr)


def _retrieval(index: Optional[str], k: int):
    """--index/--k as the shared RetrievalConfig (None without --index)."""
    if index is None:
        return None
    from lmforge.config import validate
    from lmforge.retrieval.augment import RetrievalConfig

    return validate(RetrievalConfig, {"index": index, "k": k}, where="--index/--k")


@app.command("chat")
def chat_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    overrides: Optional[List[str]] = typer.Argument(None, help=SAMPLING_HELP, show_default=False),
    system: Optional[str] = typer.Option(None, "--system", help="A system prompt kept at the top of the conversation."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0 = greedy (default 0.7)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass (default 0.9)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Most tokens per reply (default 256)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    device: Optional[str] = typer.Option(None, "--device", callback=_device_option, help="cpu, cuda, cuda:1, ... (default: cuda if available)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, bf16 or fp16."),
    feedback: Optional[str] = typer.Option(None, "--feedback", help="A label folder (lmforge label --out): /good, /bad and /fix store ratings there as KTO and SFT data."),
    index: Optional[str] = typer.Option(None, "--index", help="Retrieval index folder (lmforge index): each message gets the top passages, and the reply lists their sources."),
    k: int = typer.Option(4, "--k", help="Passages retrieved per message (with --index)."),
) -> None:
    """Chat with a model in the terminal: streamed replies, /reset, /params temperature=0.2, /good, /bad, /fix, /help."""
    from lmforge.chat import chat
    from lmforge.generation import sampling_params

    params = sampling_params(overrides or [], temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                             seed=seed)
    chat(model, params, system=system, device=device, dtype=dtype, feedback=feedback, retrieval=_retrieval(index, k))


@app.command("serve")
def serve_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    overrides: Optional[List[str]] = typer.Argument(None, help="Server settings as key=value (max_tokens, max_body_bytes, max_stop, max_n, max_queue, max_batch, access_log, ...).", show_default=False),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 exposes the server to the network)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    name: Optional[str] = typer.Option(None, "--name", help="Model id clients pass as `model` (default: the folder name)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require this bearer key (visible in `ps`: prefer --api-key-file or $LMFORGE_API_KEY)."),
    api_key_file: Optional[str] = typer.Option(None, "--api-key-file", help="Require the bearer key held in this file."),
    max_concurrent: int = typer.Option(16, "--max-concurrent", help="Requests generated at once."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds before an unfinished request is cancelled."),
    device: Optional[str] = typer.Option(None, "--device", callback=_device_option, help="cpu, cuda, cuda:1, ... (default: cuda if available)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, bf16 or fp16."),
    index: Optional[List[str]] = typer.Option(None, "--index", help="Retrieval index for chat requests: DIR (named default) or NAME=DIR, repeatable; a request picks one with its `index` field."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, /health)."""
    from lmforge.config import apply_overrides, validate
    from lmforge.serve import ServeConfig, serve

    data = {"model": model, "host": host, "port": port, "served_name": name, "api_key": api_key,
            "api_key_file": api_key_file, "max_concurrent": max_concurrent, "request_timeout_s": timeout, "device": device, "dtype": dtype,
            "indexes": dict(x.split("=", 1) if "=" in x else ("default", x) for x in index or [])}
    serve(validate(ServeConfig, apply_overrides(data, overrides or []), where="serve options"))


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Model: a stage folder (runs/default/sft), a Hugging Face model folder or a PEFT adapter folder."),
    suite: Optional[str] = typer.Argument(None, help="Suite YAML (a `tasks:` list); omit for the built-in world suite (recipes/eval_suite.yaml)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Eval config overrides as key=value (e.g. batch_size=8).", show_default=False),
    data: Optional[List[str]] = typer.Option(None, "--data", help="A data root NAME=FOLDER for task files written '@NAME/...' (repeatable), e.g. --data world=runs/default/world."),
    name: Optional[str] = typer.Option(None, "--name", help="The model's name in the results (default: its folder name)."),
    out: Optional[str] = typer.Option(None, "--out", help="Folder to write results.json and answers.jsonl into (default: runs/eval/<name>-<suite>)."),
    force: bool = typer.Option(False, "--force", help="Re-run even if this evaluation already completed with these inputs."),
) -> None:
    """Evaluate a model on a suite of tasks: metrics with sample sizes and 95% bootstrap intervals."""
    from lmforge.eval.stage import cli_eval

    cli_eval(model, suite, data or [], out=out, name=name, overrides=overrides or [], force=force)


@app.command("index")
def index_cmd(
    documents: List[str] = typer.Argument(..., help="Document files, folders or globs (JSONL/Parquet/CSV/.txt/.md); a text or Markdown file is one document, a row is one document."),
    out: str = typer.Option(..., "--out", help="Index stage folder to write; if it already holds an index, only new or changed documents are chunked and embedded."),
    tokenizer: str = typer.Option(..., "--tokenizer", help="Tokenizer or model folder whose tokens size the chunks (the generating model's)."),
    embedding_model: Optional[str] = typer.Option(None, "--embedding-model", help="Dense index: a sentence-transformers model folder, or a causal LM folder (mean-pooled hidden states). Default: BM25 only."),
    questions: Optional[str] = typer.Option(None, "--questions", help="JSONL questions with gold passages (evidence/source fields): report recall@k and MRR."),
    chunk_tokens: int = typer.Option(128, "--chunk-tokens", help="Tokens per chunk."),
    overlap: int = typer.Option(32, "--overlap", help="Tokens a chunk shares with the previous one."),
) -> None:
    """Build or update a retrieval index (BM25, plus dense vectors with --embedding-model) of documents."""
    from lmforge.retrieval.stage import cli_index

    cli_index(documents, out=out, tokenizer=tokenizer, embedding_model=embedding_model, questions=questions,
              chunk_tokens=chunk_tokens, overlap=overlap)


@app.command("compare")
def compare_cmd(
    config: str = typer.Argument(..., help="The compare stage's YAML config: documents, questions, model, arms (see `lmforge schema compare`)."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    out: Optional[str] = typer.Option(None, "--out", help="Stage folder to write (default: runs/<config name>/compare)."),
    force: bool = typer.Option(False, "--force", help="Re-run even if the comparison already completed with these inputs."),
) -> None:
    """Zero-shot, few-shot, RAG, SFT, continued pre-training + SFT and SFT + RAG on the same questions: a decision table."""
    from lmforge.pipeline import run_single

    run_single("compare", config, overrides or [], out=out, force=force, resume=False)


@app.command("report")
def report_cmd(run_dir: str = typer.Argument(..., help="A run folder, e.g. runs/default.")) -> None:
    """Rebuild a run's report.md and report.html from its stage folders (no model is re-run)."""
    from lmforge.report import build_report

    r = build_report(run_dir)
    print(f"wrote {r['markdown']} and {r['html']} ({r['figures']} figures; stages: {', '.join(r['stages'])})")


@app.command("estimate")
def estimate_cmd(
    target: str = typer.Argument(..., help="A recipe YAML, or one stage's config YAML (then --stage names its type)."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    device: Optional[str] = typer.Option(None, "--device", help="A listed device (h100-80gb, h200, a100-40gb, a100-80gb, l4, rtx-4090, apple-m3-max, apple-m2, cpu-2core); default: this machine, measured."),
    stage: Optional[str] = typer.Option(None, "--stage", help="The stage type of a single stage config (pretrain, sft, dpo, reward, ppo, grpo)."),
    processes: int = typer.Option(1, "--processes", help="Processes the stage runs on (torchrun); with train.fsdp they shard the states."),
    probe: bool = typer.Option(False, "--probe", help="Run three real steps of each stage here to calibrate, and say how far the static estimate was off."),
    only: Optional[str] = typer.Option(None, "--only", help="Estimate (and probe) only the recipe's stage of this name."),
    context: Optional[int] = typer.Option(None, "--context", help="Context length for the serving figures (default: the model's).", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of stages (stage, peak_memory_bytes, wall_seconds, fits, advice, ...)."),
) -> None:
    """Predict each training stage's parameters, memory (broken down), FLOPs, step and wall time, and fit on a device."""
    import json

    from lmforge.estimate import estimate_target, render

    found = estimate_target(target, overrides or [], device=device, stage_kind=stage, probe=probe, processes=processes,
                            only=only, context=context)
    print(json.dumps([e.as_dict() for e in found], indent=2, default=str) if as_json else render(found))


@app.command("check-data")
def check_data_cmd(
    stage: str = typer.Argument(..., help="The stage the data is for: sft, distill, dpo or reward."),
    files: str = typer.Argument(..., help="Data file, glob or folder, as the stage's `data` takes it."),
    tokenizer: Optional[str] = typer.Option(None, help="Render the example with this tokenizer's chat template "
                                            "(a tokenizer or model folder); default: lmforge's template."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """What a stage will make of a data file, before any model loads: each row's detected format,
    what will be trained on, skipped rows with reasons, and a rendered example."""
    import json

    from lmforge.check_data import check, render_text
    from lmforge.data.tokenizer import load_tokenizer

    r = check(stage, files, tokenizer=load_tokenizer(tokenizer) if tokenizer else None)
    print(json.dumps(r, indent=2) if as_json else render_text(r))


@app.command("schema")
def schema_cmd(stage: str = typer.Argument(..., help="Stage type, e.g. pretrain.")) -> None:
    """Print every config key of a stage with its type, default and description."""
    from lmforge.pipeline import stage_module

    module = stage_module(stage)
    _print_schema(module.Config, "")


def _print_schema(model, prefix: str, seen: tuple = ()) -> None:
    """Every field, nested ones too: a sub-config as `a.b`, a list of them (eval tasks, rewards)
    as `a[].b`, a mapping as `a{}.b`, an optional one (adapter, retrieval) as `a.b`."""
    from pydantic import BaseModel

    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            _print_schema(ann, f"{prefix}{name}.", seen + (model,))
            continue
        default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
        tname = getattr(ann, "__name__", str(ann)).replace("typing.", "")
        print(f"{prefix}{name}  ({tname}, default {default})\n    {f.description or ''}")
        for mark, sub in _nested_models(ann):
            if sub not in seen and sub is not model:  # a recursive schema is listed once
                _print_schema(sub, f"{prefix}{name}{mark}.", seen + (model,))


def _nested_models(ann) -> list[tuple[str, type]]:
    """The pydantic models inside a list[...] / dict[..., ...] / union annotation, with the mark
    that shows how they nest ("[]" an item of a list, "{}" a value of a mapping, "" an option)."""
    from typing import get_args, get_origin

    from pydantic import BaseModel

    origin, out = get_origin(ann), []
    mark = "[]" if origin in (list, tuple, set) else "{}" if origin is dict else ""
    for a in get_args(ann)[1:] if origin is dict else get_args(ann):
        if isinstance(a, type) and issubclass(a, BaseModel):
            out.append((mark, a))
        else:
            out += [(mark + m, t) for m, t in _nested_models(a)]
    return out


def quiet_third_party() -> None:
    """Third-party noise off (lmforge's own progress and messages stay): the bitsandbytes note about
    its optional kernel package, transformers/peft/torch deprecation and advice warnings, and the
    loading/saving progress bars. `--verbose` (anywhere on the line) or LMFORGE_VERBOSE=1 keeps them."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("bitsandbytes", "transformers", "peft", "accelerate", "huggingface_hub", "datasets", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for module in ("transformers", "peft", "torch", "accelerate", "bitsandbytes", "huggingface_hub", "datasets"):
        warnings.filterwarnings("ignore", module=rf"{module}(\.|$)")


def main() -> None:
    if "--verbose" in sys.argv[1:]:
        sys.argv.remove("--verbose")
        os.environ["LMFORGE_VERBOSE"] = "1"  # child processes (torchrun) keep it
    if os.environ.get("LMFORGE_VERBOSE") != "1":
        quiet_third_party()
    try:
        app(standalone_mode=False)
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM, what a scheduler expects from a preempted job
    except LmforgeError as e:
        # One line whatever the message embeds (a library's multi-line reason, a field name with a newline)
        print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        if e.filename is None:
            raise  # not about a path the user chose: a bug, keep its traceback
        print(f"error: {_describe_os_error(e)}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


def _describe_os_error(e: OSError) -> str:
    """One sentence for a file-system refusal (a read-only folder, a full disk, a folder where a
    file was named): what the user fixes is the path or its permissions, not lmforge. Every
    write goes through a temporary file and a rename, so nothing half-written is left behind."""
    import errno

    path = e.filename2 if e.filename2 is not None else e.filename  # a rename: its destination
    reason = (e.strerror or type(e).__name__).rstrip(".").lower()
    hint = {
        errno.EACCES: "check the folder's permissions or choose another output folder",
        errno.EPERM: "check the folder's permissions or choose another output folder",
        errno.EROFS: "choose an output folder on a writable file system",
        errno.EISDIR: "name a file, not a folder",
        errno.ENOTDIR: "part of the path is a file, not a folder",
        errno.EEXIST: "a file is in the way of a folder lmforge must create; move it or choose another path",
        errno.ENOSPC: "free some space or choose another output folder",
        errno.EDQUOT: "free some space or choose another output folder",
    }.get(e.errno, "check the path")
    return f"{os.fsdecode(path)}: {reason}; {hint}."


if __name__ == "__main__":
    main()

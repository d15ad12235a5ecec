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

OVERRIDES_HELP = "Overrides as key.path=value (for a recipe: stage_name.key.path=value), parsed as YAML values."


@app.command("run")
def run_cmd(
    recipe: Optional[str] = typer.Argument(
        None, help="Recipe YAML to run. Omit to run the built-in default pipeline (recipes/default.yaml)."
    ),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    force: bool = typer.Option(False, "--force", help="Re-run every stage even if its inputs and config are unchanged."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name (outputs go to runs/<name>/); default from the recipe."),
    out_dir: Optional[str] = typer.Option(None, "--out-dir", help="Parent folder of runs (default: runs)."),
) -> None:
    """Run a recipe's stages in order; unchanged stages are skipped, interrupted ones resume."""
    from lmforge.pipeline import builtin_recipe, run_recipe

    path = recipe
    if recipe is not None and "=" in recipe and not os.path.exists(recipe):
        # `lmforge run stage.key=value` with the default recipe.
        overrides = [recipe] + list(overrides or [])
        path = None
    if path is None:
        path = str(builtin_recipe("default"))
    top = {k: v for k, v in (("name", name), ("out_dir", out_dir)) if v is not None}
    run_recipe(path, overrides or [], force=force, top_overrides=top)


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


_stage_command("curate", "Clean, filter, de-duplicate and split raw text into Parquet shards, with a curation report.")
_stage_command("tokenizer", "Train a byte-level BPE tokenizer (or reuse a local one) and save it in Hugging Face format.")
_stage_command("pretrain", "Pre-train a causal LM from scratch or continue pre-training a local HF checkpoint.")


@app.command("schema")
def schema_cmd(stage: str = typer.Argument(..., help="Stage type, e.g. pretrain.")) -> None:
    """Print every config key of a stage with its type, default and description."""
    from lmforge.pipeline import stage_module

    module = stage_module(stage)
    _print_schema(module.Config, "")


def _print_schema(model, prefix: str) -> None:
    from pydantic import BaseModel

    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            _print_schema(ann, f"{prefix}{name}.")
            continue
        default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
        tname = getattr(ann, "__name__", str(ann)).replace("typing.", "")
        print(f"{prefix}{name}  ({tname}, default {default})\n    {f.description or ''}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM, what a scheduler expects from a preempted job
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
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


if __name__ == "__main__":
    main()

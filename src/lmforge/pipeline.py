"""Recipes: a list of stages run in order, each reading earlier stages' artifacts.

A stage is a module registered in STAGES that satisfies the `Stage` protocol (checked for
every registered stage by tests/test_stages.py, `contract_problems`):

    Config      its schema (a config.Schema, a description on every field)
    ARTIFACT    the sub-folder of the run folder holding its final artifact ("model", ...)
    PROVIDES    the kinds of artifact it makes ("data", "tokenizer", "model", ...)
    INPUTS      {config field: kind or None}: fields that hold paths; a field left empty is
                filled with the newest earlier stage that PROVIDES that kind; every path is
                fingerprinted for the manifest (None = a raw path/glob, never auto-filled)
    KEEP        (optional) globs in its folder that a fresh start never removes: data that is
                not derived, like the label stage's human judgments
    run(cfg, rd: RunDir, resume: bool = False) -> dict   does the work, returns a summary

Paths are resolved once, here: before `run` is called, every input field naming a stage folder
is replaced by that stage's artifact folder (`resolve_inputs`), so a stage reads `cfg.model` as
the model folder itself and never calls `resolve_artifact`.

The runner writes the resolved config, hashes the inputs and config into the manifest, skips
a stage whose hash is unchanged and complete, resumes one that was interrupted, and re-runs
one whose inputs or config changed.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from pydantic import Field, field_validator

from lmforge.config import Schema, apply_overrides, load_yaml, parse_override, set_path, validate
from lmforge.errors import LmforgeError
from lmforge.rundir import RunDir, exclusive, fingerprint_path, read_manifest, resolve_artifact

# Stage type -> module. Imported lazily: `lmforge --help` must not pay for torch.
STAGES: dict[str, str] = {
    "world": "lmforge.demo.world",
    "curate": "lmforge.data.curate",
    "tokenizer": "lmforge.data.tokenizer",
    "pretrain": "lmforge.train.pretrain",
    "reward": "lmforge.train.reward",
    "dpo": "lmforge.train.dpo",
    "rejection": "lmforge.stages.rejection",
    "sft": "lmforge.train.sft",
    "distill": "lmforge.train.distill",
    "ppo": "lmforge.train.ppo",
    "grpo": "lmforge.train.grpo",
    "feedback": "lmforge.stages.feedback",
    "eval": "lmforge.eval.stage",
    "index": "lmforge.retrieval.stage",
    "compare": "lmforge.eval.compare",
    "report": "lmforge.report",
    "label": "lmforge.label.stage",
}


class Stage(Protocol):
    """A stage module's contract (a module satisfies it structurally; see `contract_problems`)."""

    Config: type[Schema]
    INPUTS: dict[str, str | None]
    PROVIDES: tuple[str, ...]
    ARTIFACT: str

    def run(self, cfg: Any, rd: RunDir, resume: bool = False) -> dict: ...


def _undescribed(schema: type, prefix: str = "") -> list[str]:
    """Fields of a schema (and of the schemas nested in it) without a description."""
    out: list[str] = []
    for name, f in schema.model_fields.items():
        if not (f.description or "").strip():
            out.append(prefix + name)
        for sub in _nested_schemas(f.annotation):
            out += _undescribed(sub, f"{prefix}{name}.")
    return out


def _nested_schemas(annotation: Any) -> list[type]:
    if isinstance(annotation, type) and issubclass(annotation, Schema):
        return [annotation]
    return [s for a in getattr(annotation, "__args__", ()) or () for s in _nested_schemas(a)]


def contract_problems(module: ModuleType) -> list[str]:
    """How a stage module breaks the `Stage` protocol (empty when it satisfies it)."""
    import inspect

    cfg = getattr(module, "Config", None)
    if not (isinstance(cfg, type) and issubclass(cfg, Schema)):
        return ["Config is not a config.Schema subclass"]
    problems = [f"Config field {f} has no description" for f in _undescribed(cfg)]
    inputs = getattr(module, "INPUTS", None)
    if not isinstance(inputs, dict):
        problems.append("INPUTS is not a dict")
    else:
        problems += [f"INPUTS names {k!r}, which is not a Config field" for k in inputs if k not in cfg.model_fields]
        problems += [f"INPUTS[{k!r}] is {v!r}, not a kind or None" for k, v in inputs.items()
                     if not (v is None or isinstance(v, str))]
    provides = getattr(module, "PROVIDES", None)
    if not (isinstance(provides, tuple) and all(isinstance(p, str) for p in provides)):
        problems.append("PROVIDES is not a tuple of kinds")
    if not (isinstance(getattr(module, "ARTIFACT", None), str) and module.ARTIFACT):
        problems.append("ARTIFACT is not a folder name")
    keep = getattr(module, "KEEP", ())
    if not (isinstance(keep, tuple) and all(isinstance(k, str) for k in keep)):
        problems.append("KEEP is not a tuple of globs")
    run = getattr(module, "run", None)
    params = list(inspect.signature(run).parameters.values()) if callable(run) else []
    if [p.name for p in params] != ["cfg", "rd", "resume"] or params[2].default is not False:
        problems.append("run's signature is not run(cfg, rd, resume=False)")
    return problems


def stage_module(kind: str) -> Stage:
    if kind not in STAGES:
        import difflib

        close = difflib.get_close_matches(kind, STAGES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known stages: {', '.join(STAGES)}."
        raise LmforgeError(f"Unknown stage type {kind!r}{hint}")
    return importlib.import_module(STAGES[kind])


_PLAIN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class Recipe(Schema):
    """A pipeline: `stages` run in order; each entry is `stage: <type>` plus that stage's config."""

    name: str = Field("default", description="Run name: outputs go to <out_dir>/<name>/<stage>/.")
    out_dir: str = Field("runs", description="Parent folder of all runs.")
    description: str = Field("", description="Free text shown in the report.")
    stages: list[dict[str, Any]] = Field(description="Stage entries, in order.")

    @field_validator("name")
    @classmethod
    def _plain(cls, v: str) -> str:
        return plain_name(v)


def plain_name(name: str) -> str:
    """A run or stage name becomes a folder name: letters, digits, '.', '_' and '-', not starting
    with '.', so that no name can reach outside the run folder (`../x`, `a/b`, an absolute path)."""
    if not _PLAIN.fullmatch(name):
        raise ValueError(f"{name!r} is not a plain name: use letters, digits, '.', '_' and '-' only, "
                         "not starting with '.' (it names a folder under the run folder)")
    return name


@dataclass
class PlannedStage:
    name: str
    kind: str
    module: ModuleType
    cfg: Any
    rd: RunDir
    filled: dict[str, str] = field(default_factory=dict)  # input field -> the earlier stage that filled it


def _stage_paths(value: Any) -> list[str]:
    if value is None:
        return []
    vals = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else [value]
    out: list[str] = []
    for v in vals:
        s = str(v)
        matches = sorted(glob.glob(s, recursive=True)) if any(c in s for c in "*?[") else []
        out += matches or [s]
    return out


def stage_hashes(kind: str, module: ModuleType, cfg: Any) -> tuple[str, dict]:
    """(input hash, its components). The hash covers the stage type, its resolved config and the
    content of every input path; the components, recorded in the manifest as `hashes`, name each
    part apart ({"config": sha256, "inputs": {field: [[path, fingerprint], ...]}}) so that a plan
    can say which one changed."""
    h = hashlib.sha256()
    h.update(kind.encode())
    config = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    h.update(config.encode())
    inputs: dict[str, list[list[str]]] = {}
    for key in getattr(module, "INPUTS", {}):
        for p in _stage_paths(getattr(cfg, key)):
            fp = fingerprint_path(p)
            h.update(f"{key}={fp}".encode())
            inputs.setdefault(key, []).append([p, fp])
    return h.hexdigest(), {"config": hashlib.sha256(f"{kind}\0{config}".encode()).hexdigest(), "inputs": inputs}


def input_hash(kind: str, module: ModuleType, cfg: Any) -> str:
    """Hash of the stage type, its resolved config, and the content of every input path."""
    return stage_hashes(kind, module, cfg)[0]


def _resolve_ref(value: Any, root: Path, artifacts: dict[str, Path], where: str, key: str) -> Any:
    """`@name` -> that earlier stage's folder; `@name/sub/*.jsonl` -> a path inside its artifact."""
    if not isinstance(value, str) or not value.startswith("@"):
        return value
    ref, _, rest = value[1:].partition("/")
    if ref not in artifacts:
        raise LmforgeError(f"{where}: {key} refers to {value!r}, but no earlier stage is named {ref!r}.")
    return str(artifacts[ref] / rest) if rest else str(root / ref)


def plan(recipe: Recipe, *, where: str, overrides: list[str] = ()) -> list[PlannedStage]:
    """Validate every stage's config (before any work starts) and fill inputs from earlier stages."""
    names = [str(s.get("name") or s.get("stage")) for s in recipe.stages]
    for i, n in enumerate(names):
        try:
            plain_name(n)
        except ValueError as e:
            raise LmforgeError(f"{where}: stages.{i}.name: {e}.") from None
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise LmforgeError(f"{where}: two stages are named {dup!r}; give one a distinct `name:`.")
    entries = [dict(s) for s in recipe.stages]
    for text in overrides:
        path, value = parse_override(text)
        if path[0] not in names:
            raise LmforgeError(
                f"Override {text!r} names no stage; it must start with one of: {', '.join(names)}."
            )
        set_path(entries[names.index(path[0])], path[1:], value, origin=text)

    root = Path(recipe.out_dir) / recipe.name
    provided: dict[str, str] = {}  # kind -> folder of the newest stage providing it
    provider: dict[str, str] = {}  # kind -> that stage's name
    planned_art: dict[str, Path] = {}  # stage name -> its artifact folder
    out: list[PlannedStage] = []
    for i, (name, entry) in enumerate(zip(names, entries)):
        kind = entry.pop("stage", None)
        entry.pop("name", None)
        if kind is None:
            raise LmforgeError(f"{where}: stages.{i} has no `stage:` key naming its type ({', '.join(STAGES)}).")
        module = stage_module(str(kind))
        filled: dict[str, str] = {}
        for key, needs in getattr(module, "INPUTS", {}).items():
            val = entry.get(key)
            if isinstance(val, list):
                entry[key] = [_resolve_ref(v, root, planned_art, where, f"stages.{i}.{key}") for v in val]
            elif isinstance(val, dict):  # {name: path}, e.g. eval's models: {sft: "@sft"}
                entry[key] = {k: _resolve_ref(v, root, planned_art, where, f"stages.{i}.{key}.{k}") for k, v in val.items()}
            elif isinstance(val, str):
                entry[key] = _resolve_ref(val, root, planned_art, where, f"stages.{i}.{key}")
            elif val is None and needs is not None and needs in provided:
                entry[key] = provided[needs]
                filled[key] = provider[needs]
        cfg = validate(module.Config, entry, where=where, prefix=f"stages.{i}.")
        rd = RunDir(root / name, stage=str(kind), artifact=module.ARTIFACT, create=False)
        for k in (getattr(module, "PROVIDES", ()) or ()):
            provided[k], provider[k] = str(rd.path), name
        planned_art[name] = rd.artifact
        out.append(PlannedStage(name, str(kind), module, cfg, rd, filled))
    return out


def _artifact_of(value: Any) -> Any:
    """A stage folder -> its artifact folder (lists and {name: path} dicts element-wise); any other
    value (a file, a glob, a folder that is no stage) unchanged."""
    if isinstance(value, list):
        return [_artifact_of(v) for v in value]
    if isinstance(value, dict):
        return {k: _artifact_of(v) for k, v in value.items()}
    if isinstance(value, str) and read_manifest(value) is not None:
        return str(resolve_artifact(value, "input"))  # refuses a stage that has not finished
    return value


def resolve_inputs(module: Stage, cfg: Any) -> Any:
    """The config a stage runs with: every INPUTS field's stage folders resolved to their artifact
    folders, once, here. (The manifest hashes the config as written, so plans and skips agree.)"""
    return cfg.model_copy(update={k: _artifact_of(getattr(cfg, k)) for k in getattr(module, "INPUTS", {})})


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (they set RANK), or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


def run_stage(st: PlannedStage, *, force: bool = False, resume: bool = True, echo=print,
              keep_checkpoints: bool = False) -> dict:
    """Run one planned stage with skip/resume semantics; returns the manifest.

    Under several processes every rank runs the stage (training is collective), but only
    rank 0 locks the stage folder and touches its manifest, config and old files.
    keep_checkpoints: refuse (rather than delete) checkpoints a fresh start would remove,
    unless `force` (single-stage commands: a forgotten --resume must not cost a run).
    """
    main = is_main_process()
    with exclusive(st.rd.path, what="Stage folder") if main else contextlib.nullcontext():
        return _run_stage(st, force=force, resume=resume, echo=echo if main else _silent,
                          keep_checkpoints=keep_checkpoints)


def _run_stage(st: PlannedStage, *, force: bool, resume: bool, echo, keep_checkpoints: bool) -> dict:
    main = is_main_process()
    st.rd.path.mkdir(parents=True, exist_ok=True)
    h, parts = stage_hashes(st.kind, st.module, st.cfg)
    m = read_manifest(st.rd.path)
    if m and not force and m.get("input_hash") == h and m.get("status") == "complete":
        echo(f"[{st.name}] unchanged since the last run, skipped (use --force to re-run).")
        return m
    same_inputs = bool(m) and m.get("input_hash") == h
    afresh = None
    if force or not resume or (m and not same_inputs):
        # Changed inputs: the old checkpoints belong to another configuration.
        why = "--force" if force else ("no --resume" if same_inputs else "inputs or config changed")
        if m and keep_checkpoints and not force:
            refuse_to_drop_checkpoints(st.rd, same_inputs)
        if m:  # said once the stage ran: before a config or data error it would only mislead
            afresh = f"{why}: started this stage afresh"
            if main:  # only a folder lmforge made (it has a manifest) is ever emptied
                st.rd.fresh_start(getattr(st.module, "KEEP", ()))
    if main:
        st.rd.write_config(st.cfg)
        st.rd.write_manifest(stage=st.kind, name=st.name, input_hash=h, hashes=parts, status="running", output_id=None)
    from lmforge.estimate import stage_estimate
    from lmforge.estimate.devices import read_peak, reset_peak

    predicted, line = stage_estimate(st.kind, st.cfg, name=st.name)
    if line:
        echo(f"[{st.name}] {line}")
    reset_peak()
    t0 = time.time()
    summary = st.module.run(resolve_inputs(st.module, st.cfg), st.rd, resume=bool(resume and same_inputs and not force)) or {}
    wall = time.time() - t0
    if not main:
        return summary
    st.rd.write_manifest(
        estimate=predicted,
        peak_memory_bytes=read_peak(),
        status="complete",
        output_id=hashlib.sha256(f"{h}:{uuid.uuid4()}".encode()).hexdigest(),
        wall_seconds=round(wall, 2),
        summary=summary,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    echo(f"[{st.name}] done in {wall:.1f}s -> {st.rd.artifact}" + (f" ({afresh})" if afresh else ""))
    return st.rd.manifest() or {}


def refuse_to_drop_checkpoints(rd: RunDir, same_inputs: bool) -> None:
    """One sentence instead of silently deleting the checkpoints of an earlier run."""
    steps = sorted(p.name for p in rd.checkpoints.glob("step-*")) if rd.checkpoints.is_dir() else []
    if not steps:
        return
    offer = ("add --resume to continue from them" if same_inputs else
             "its config or inputs changed since, so they cannot be resumed; choose another --out")
    raise LmforgeError(f"{rd.path} holds checkpoints of an earlier run (newest {steps[-1]}), which starting afresh "
                       f"would delete; {offer}, or add --force to delete them and start afresh.")


def _silent(*_a, **_k) -> None:
    pass


def load_recipe(path: str | Path) -> tuple[Recipe, str]:
    data = load_yaml(path)
    return validate(Recipe, data, where=str(path)), str(path)


RECIPES = Path(__file__).resolve().parent / "recipes"  # package data: installed with the package


def builtin_recipe(name: str = "default") -> Path:
    """A recipe (or suite, or principles file) shipped inside the package, by name."""
    p = RECIPES / f"{name}.yaml"
    if not p.is_file():
        known = ", ".join(sorted(x.stem for x in RECIPES.glob("*.yaml")))
        raise LmforgeError(f"No built-in recipe named {name!r}; the built-in ones are: {known}.")
    return p


def recipe_path(arg: str | None) -> Path:
    """A recipe argument: an existing file, else a built-in recipe's name (`quick`); None = default."""
    if arg is None:
        return builtin_recipe("default")
    if Path(arg).is_file() or "/" in arg or arg.endswith((".yaml", ".yml")):
        return Path(arg)  # a missing file is reported by load_yaml, naming it
    return builtin_recipe(arg)


def prepare(path: str | Path, overrides: list[str] = (), top_overrides: dict | None = None
            ) -> tuple[Recipe, list[PlannedStage]]:
    """A recipe file (plus overrides) validated and planned; nothing is written."""
    data = load_yaml(path)
    if top_overrides:
        data.update(top_overrides)
    recipe = validate(Recipe, data, where=str(path))
    return recipe, plan(recipe, where=str(path), overrides=list(overrides))


def run_recipe(path: str | Path, overrides: list[str] = (), *, force: bool = False, echo=print,
               top_overrides: dict | None = None) -> list[dict]:
    recipe, planned = prepare(path, overrides, top_overrides)
    root = Path(recipe.out_dir) / recipe.name
    with exclusive(root, what="Run folder") if is_main_process() else contextlib.nullcontext():
        return _run_planned(recipe, planned, force=force, echo=echo)


def _run_planned(recipe: Recipe, planned: list[PlannedStage], *, force: bool, echo) -> list[dict]:
    echo(f"Recipe {recipe.name}: {' -> '.join(p.name for p in planned)} (outputs in {Path(recipe.out_dir) / recipe.name})")
    results, seconds = [], []
    t0 = time.time()
    for st in planned:
        t = time.time()
        results.append(run_stage(st, force=force, echo=echo))
        seconds.append(time.time() - t)  # a skipped stage costs ~0 s
    total = time.time() - t0
    parts = ", ".join(f"{st.name} {sec:.1f}s" for st, sec in zip(planned, seconds))
    echo(f"Recipe {recipe.name} finished in {int(total // 60)}m{int(total % 60):02d}s wall ({parts}).")
    return results


def run_single(kind: str, config_path: str | Path | None, overrides: list[str], *, out: str | None,
               force: bool, resume: bool, echo=print) -> dict:
    """`lmforge <stage> CONFIG.yaml`: one stage outside a recipe."""
    module = stage_module(kind)
    data = load_yaml(config_path) if config_path else {}
    apply_overrides(data, list(overrides))
    where = str(config_path) if config_path else kind
    cfg = validate(module.Config, data, where=where)
    stem = Path(config_path).stem if config_path else kind
    rd = RunDir(Path(out) if out else Path("runs") / stem / kind, stage=kind, artifact=module.ARTIFACT)
    return run_stage(PlannedStage(kind, kind, module, cfg, rd), force=force, resume=resume, echo=echo,
                     keep_checkpoints=True)

"""Recipes: a list of stages run in order, each reading earlier stages' artifacts.

A stage module (e.g. `lmforge.train.pretrain`) exposes:

    Config      its pydantic schema
    ARTIFACT    the sub-folder of the run folder holding its final artifact ("model", ...)
    PROVIDES    the kind of artifact it makes ("data", "tokenizer", "model", ...)
    INPUTS      {config field: kind or None}: fields that hold paths; a field left empty is
                filled with the newest earlier stage that PROVIDES that kind; every path is
                fingerprinted for the manifest (None = a raw path/glob, never auto-filled)
    KEEP        (optional) globs in its folder that a fresh start never removes: data that is
                not derived, like the label stage's human judgments
    run(cfg, rd: RunDir, resume: bool) -> dict   does the work, returns a summary

The runner writes the resolved config, hashes the inputs and config into the manifest, skips
a stage whose hash is unchanged and complete, resumes one that was interrupted, and re-runs
one whose inputs or config changed.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import Field

from lmforge.config import Schema, apply_overrides, load_yaml, parse_override, set_path, validate
from lmforge.errors import LmforgeError
from lmforge.rundir import RunDir, fingerprint_path, read_manifest

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
    "ppo": "lmforge.train.ppo",
    "grpo": "lmforge.train.grpo",
    "feedback": "lmforge.stages.feedback",
    "eval": "lmforge.eval.stage",
    "index": "lmforge.retrieval.stage",
    "compare": "lmforge.eval.compare",
    "report": "lmforge.report",
    "label": "lmforge.label.stage",
}


def stage_module(kind: str) -> ModuleType:
    if kind not in STAGES:
        import difflib

        close = difflib.get_close_matches(kind, STAGES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known stages: {', '.join(STAGES)}."
        raise LmforgeError(f"Unknown stage type {kind!r}{hint}")
    return importlib.import_module(STAGES[kind])


class Recipe(Schema):
    """A pipeline: `stages` run in order; each entry is `stage: <type>` plus that stage's config."""

    name: str = Field("default", description="Run name: outputs go to <out_dir>/<name>/<stage>/.")
    out_dir: str = Field("runs", description="Parent folder of all runs.")
    description: str = Field("", description="Free text shown in the report.")
    stages: list[dict[str, Any]] = Field(description="Stage entries, in order.")


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


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (they set RANK), or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


def run_stage(st: PlannedStage, *, force: bool = False, resume: bool = True, echo=print) -> dict:
    """Run one planned stage with skip/resume semantics; returns the manifest.

    Under several processes every rank runs the stage (training is collective), but only
    rank 0 touches the run folder's manifest, config and old files.
    """
    main = is_main_process()
    if not main:
        echo = _silent
    st.rd.path.mkdir(parents=True, exist_ok=True)
    h, parts = stage_hashes(st.kind, st.module, st.cfg)
    m = read_manifest(st.rd.path)
    if m and not force and m.get("input_hash") == h and m.get("status") == "complete":
        echo(f"[{st.name}] unchanged since the last run, skipped (use --force to re-run).")
        return m
    same_inputs = bool(m) and m.get("input_hash") == h
    if force or not resume or (m and not same_inputs):
        # Changed inputs: the old checkpoints belong to another configuration.
        why = "--force" if force else ("no --resume" if same_inputs else "inputs or config changed")
        if m:
            echo(f"[{st.name}] {why}: starting this stage afresh.")
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
    summary = st.module.run(st.cfg, st.rd, resume=bool(resume and same_inputs and not force)) or {}
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
    echo(f"[{st.name}] done in {wall:.1f}s -> {st.rd.artifact}")
    return st.rd.manifest() or {}


def _silent(*_a, **_k) -> None:
    pass


def load_recipe(path: str | Path) -> tuple[Recipe, str]:
    data = load_yaml(path)
    return validate(Recipe, data, where=str(path)), str(path)


def builtin_recipe(name: str = "default") -> Path:
    # The repository's recipes/ folder (the package is installed editable from a checkout).
    p = Path(__file__).resolve().parents[2] / "recipes" / f"{name}.yaml"
    if not p.is_file():
        raise LmforgeError(f"No built-in recipe named {name!r}.")
    return p


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
    return run_stage(PlannedStage(kind, kind, module, cfg, rd), force=force, resume=resume, echo=echo)

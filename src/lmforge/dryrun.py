"""`lmforge plan`: what `lmforge run` would do, without running or writing anything.

For each stage of a recipe: where each input comes from (an earlier stage, auto-filled or named
with `@name`, or a file), what it writes, and whether a run would skip it, resume it or start it
afresh, naming the reason: the config keys that changed, the input whose fingerprint changed
(from the component hashes each manifest records, `pipeline.stage_hashes`), or an earlier stage
that will run first and so hands it a new input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmforge.pipeline import PlannedStage, prepare, stage_hashes
from lmforge.rundir import CONFIG, read_manifest


@dataclass
class Outlook:
    """One stage's line in the plan."""

    stage: PlannedStage
    inputs: list[tuple[str, str, str]]  # (field, path, where it comes from)
    action: str                          # "skip" | "resume" | "start" | "afresh"
    why: str


def _origin(path: str, st: PlannedStage, key: str, folders: dict[Path, str]) -> str:
    p = Path(path).resolve()
    for folder, name in folders.items():
        if p == folder or p.is_relative_to(folder):
            kind = st.module.INPUTS.get(key)
            how = f"newest earlier stage providing {kind!r}" if key in st.filled else "named"
            return f"stage {name} ({how})"
    return "file" if Path(path).exists() else "file (missing now)"


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted config keys whose values differ between two resolved configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            if k not in old or k not in new:  # a field the stage's schema gained or lost since
                out.append(f"{prefix}{k} ({'new field' if k not in old else 'field removed'})")
            else:
                out += _changed_keys(old[k], new[k], f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _why_changed(st: PlannedStage, m: dict, parts: dict) -> str:
    old = m.get("hashes")
    if not isinstance(old, dict):
        return "inputs or config changed (the last run recorded no component hashes to compare)"
    reasons = []
    if old.get("config") != parts["config"]:
        cfg_file = st.rd.path / CONFIG
        prev = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else None
        keys = _changed_keys(prev, st.cfg.model_dump(mode="json")) if isinstance(prev, dict) else []
        reasons.append("config changed" + (f" ({', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''})" if keys else ""))
    old_in = old.get("inputs") or {}
    for key in sorted(set(old_in) | set(parts["inputs"])):
        if old_in.get(key) != parts["inputs"].get(key):
            now = parts["inputs"].get(key) or []
            was = {p: fp for p, fp in old_in.get(key) or []}
            moved = [p for p, fp in now if was.get(p) != fp]
            reasons.append(f"input {key} changed" + (f" ({moved[0]} has another fingerprint)" if moved else ""))
    return "; ".join(reasons) or "the input hash changed"


def outlook(planned: list[PlannedStage], *, force: bool = False) -> list[Outlook]:
    """Each stage's inputs, and what a run would do with it and why."""
    folders = {st.rd.path.resolve(): st.name for st in planned}
    will_run: set[str] = set()
    out = []
    for st in planned:
        h, parts = stage_hashes(st.kind, st.module, st.cfg)
        inputs = [(key, p, _origin(p, st, key, folders)) for key, items in parts["inputs"].items() for p, _ in items]
        upstream = sorted({o.split()[1] for _, _, o in inputs if o.startswith("stage ") and o.split()[1] in will_run})
        m = read_manifest(st.rd.path)
        if force:
            action, why = "afresh", "--force"
        elif not m:
            action, why = "start", "no earlier run in this folder"
        elif upstream:
            action, why = "afresh", (f"its input comes from stage {upstream[0]}, which runs first" if len(upstream) == 1
                                     else f"its inputs come from stages {', '.join(upstream)}, which run first")
        elif m.get("input_hash") == h:
            action, why = ("skip", "unchanged since the last run") if m.get("status") == "complete" else (
                "resume", f"interrupted (status {m.get('status')!r}); continues from its latest checkpoint")
        else:
            action, why = "afresh", _why_changed(st, m, parts)
        if action != "skip":
            will_run.add(st.name)
        out.append(Outlook(st, inputs, action, why))
    return out


def describe(path: str | Path, overrides: list[str] = (), *, force: bool = False,
             top_overrides: dict | None = None) -> str:
    """The plan of a recipe as text: one block per stage."""
    recipe, planned = prepare(path, overrides, top_overrides)
    root = Path(recipe.out_dir) / recipe.name
    lines = [f"Recipe {recipe.name}: {' -> '.join(s.name for s in planned)} (outputs in {root}); nothing is run."]
    for o in outlook(planned, force=force):
        st = o.stage
        provides = ", ".join(getattr(st.module, "PROVIDES", ()) or ()) or "-"
        lines.append(f"{st.name} ({st.kind}): would {o.action.upper()} - {o.why}")
        for key, p, origin in o.inputs:
            lines.append(f"    in   {key} = {p}  <- {origin}")
        lines.append(f"    out  {st.rd.artifact}  (provides: {provides})")
    return "\n".join(lines)

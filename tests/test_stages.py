"""The stage contract: every registered stage satisfies the `Stage` protocol, and the runner
resolves input paths once, before a stage runs."""

from __future__ import annotations

import types

import pytest
from pydantic import Field

from lmforge import pipeline
from lmforge.config import Schema
from lmforge.errors import LmforgeError


@pytest.mark.parametrize("kind", sorted(pipeline.STAGES))
def test_every_registered_stage_satisfies_the_protocol(kind):
    assert pipeline.contract_problems(pipeline.stage_module(kind)) == []


def test_contract_problems_names_each_breach():
    class Sub(Schema):
        x: int = Field(1)  # no description, one level down

    class Config(Schema):
        sub: Sub = Field(default_factory=Sub, description="A nested block.")
        path: str | None = Field(None, description="A path.")

    mod = types.ModuleType("bad_stage")
    mod.Config, mod.INPUTS, mod.PROVIDES, mod.ARTIFACT = Config, {"path": "data", "data": None}, ["model"], ""
    mod.run = lambda cfg, rd, resume: {}
    assert pipeline.contract_problems(mod) == [
        "Config field sub.x has no description",
        "INPUTS names 'data', which is not a Config field",
        "PROVIDES is not a tuple of kinds",
        "ARTIFACT is not a folder name",
        "run's signature is not run(cfg, rd, resume=False)",
    ]


def test_input_stage_folders_reach_the_stage_as_artifact_folders(tmp_path):
    from lmforge.rundir import RunDir

    class Config(Schema):
        model: str | None = Field(None, description="A model.")
        data: list[str] = Field(default_factory=list, description="Files.")
        models: dict[str, str] = Field(default_factory=dict, description="Named models.")
        note: str = Field("runs/x", description="Not an input: never touched.")

    up = RunDir(tmp_path / "sft", stage="sft", artifact="model")
    up.write_manifest(status="complete")
    mod = types.ModuleType("s")
    mod.INPUTS = {"model": "model", "data": None, "models": "model"}
    cfg = Config(model=str(up.path), data=[str(up.path), str(tmp_path / "f.jsonl")], models={"a": str(up.path)},
                 note=str(up.path))
    got = pipeline.resolve_inputs(mod, cfg)
    art = str(up.path / "model")
    assert (got.model, got.data, got.models, got.note) == (art, [art, str(tmp_path / "f.jsonl")], {"a": art}, str(up.path))
    up.write_manifest(status="running")
    with pytest.raises(LmforgeError, match="has not finished"):
        pipeline.resolve_inputs(mod, cfg)

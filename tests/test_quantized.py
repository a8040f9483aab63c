"""bitsandbytes 4/8-bit bases on CPU: training, exact counts, merge into the original weights."""

from __future__ import annotations

import pytest
import torch
from test_adapters import _recipe

from tnlora_cli.adapters.base import BaseWeight
from tnlora_cli.merge import merge_run
from tnlora_cli.model.build import prepare
from tnlora_cli.model.state import count_parameters
from tnlora_cli.recipe.load import validate_recipe
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


@pytest.mark.parametrize("bits", [4, 8])
def test_adapters_see_the_dequantized_base_weight(make_recipe, bits):
    """`BaseWeight.dense()` of a bitsandbytes layer is its dequantized weight: close to the
    full-precision one (within the quantization error), never the packed bytes."""
    raw = _recipe(make_recipe, "lora", "llama", "causal-lm")
    plain = prepare(validate_recipe(raw))
    raw["quantization"] = {"bits": bits}
    quantized = prepare(validate_recipe(raw))
    name = quantized.injection.targets[0]
    layer = quantized.model.get_submodule(name).base_layer
    assert isinstance(layer, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    full = plain.model.get_submodule(name).base_layer.weight.detach()
    dense = BaseWeight(layer, 0, full.shape[0]).dense()
    assert dense.shape == full.shape and dense.dtype == torch.float32
    error = ((dense - full).abs().max() / full.abs().max()).item()
    assert 0 < error < (0.2 if bits == 4 else 0.02)
    if bits == 4:  # the 4-bit forward multiplies by exactly this weight
        x = torch.randn(3, full.shape[1])
        torch.testing.assert_close(layer(x) - (0 if layer.bias is None else layer.bias), x @ dense.T, rtol=1e-4, atol=1e-4)


def test_dequantized_weight_reads_the_avx512_bf16_packed_layout():
    """bitsandbytes repacks 4-bit codes for its AVX512-BF16 CPU kernel (absmax kept in bf16);
    the layout is produced here on any CPU, and `dense()` reads it without changing the layer."""
    import copy

    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    full = torch.nn.Linear(128, 64)
    layer = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(full.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")
    unpacked = BaseWeight(layer, 0, 64).dense()
    layer.weight.data, layer.weight.quant_state = bnbf._convert_weight_packed_for_cpu(layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state))
    packed = BaseWeight(layer, 16, 48).dense()
    assert packed.shape == (32, 128)
    # the same codes; absmax differs only by its bf16 rounding in the packed layout
    torch.testing.assert_close(packed, unpacked[16:48], rtol=0, atol=unpacked.abs().max().item() / 128)
    assert layer.weight.quant_state.packing_format_for_cpu  # the layer is left as bitsandbytes packed it

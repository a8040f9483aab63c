"""bitsandbytes 4/8-bit bases on CPU: training, exact counts, merge into the original weights.

The models are the tiny ones at widths bitsandbytes' CPU 4-bit kernels accept on every CPU
(`-wide`): its AVX512-BF16 path (taken on CPUs that have it) and its plain path both run
them, and `test_adapters_see_the_dequantized_base_weight` runs both on a CPU that has it.
"""

from __future__ import annotations

import pytest
import torch
from test_adapters import _recipe

from tnlora_cli.adapters.base import BaseWeight
from tnlora_cli.errors import ModelError
from tnlora_cli.merge import merge_run
from tnlora_cli.model.build import prepare
from tnlora_cli.model.state import count_parameters
from tnlora_cli.recipe.load import validate_recipe
from tnlora_cli.train import train

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind, model, task", [("lora", "bert-wide", "classification"), ("trac", "llama-wide", "causal-lm"), ("tera", "llama-wide", "causal-lm")])
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
    raw = _recipe(make_recipe, "lora", "llama-wide", "causal-lm")
    plain = count_parameters(prepare(validate_recipe(raw)).model)
    raw["quantization"] = {"bits": 4}
    prepared = prepare(validate_recipe(raw))
    layer = prepared.model.get_submodule(prepared.injection.targets[0])
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    # A 4-bit parameter stores two values per byte; the count is of the weights it stands for.
    assert count_parameters(prepared.model) == plain
    assert all(p.dtype == torch.float32 for n, p in prepared.model.named_parameters() if p.requires_grad)


@pytest.fixture(params=["native", "unpacked"])
def bnb_cpu_path(request, monkeypatch):
    """bitsandbytes' CPU 4-bit path: "native" is what this CPU takes (repacked for the AVX512-BF16
    kernel at inference where the CPU has it), "unpacked" the path of CPUs without it."""
    if request.param == "unpacked":
        import bitsandbytes.nn.modules as bnb_modules

        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)  # read by each Linear4bit at construction
    return request.param


@pytest.mark.parametrize("bits", [4, 8])
def test_adapters_see_the_dequantized_base_weight(make_recipe, bits, bnb_cpu_path):
    """`BaseWeight.dense()` of a bitsandbytes layer is its dequantized weight: close to the
    full-precision one (within the quantization error), never the packed bytes, and what the
    layer's inference forward multiplies by (after which an AVX512-BF16 CPU has repacked it)."""
    raw = _recipe(make_recipe, "lora", "llama-wide", "causal-lm")
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
    if bits == 4:
        x = torch.randn(3, full.shape[1])
        layer.eval()
        with torch.no_grad():
            out = layer(x) - (0 if layer.bias is None else layer.bias)
        packed = bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
        assert packed == (bnb_cpu_path == "native" and bnb.functional.has_avx512bf16())
        # The AVX512-BF16 kernel multiplies in bf16 (8 bits of mantissa); the plain path in fp32.
        tolerance = 2e-2 if packed else 1e-4
        torch.testing.assert_close(out, x @ dense.T, rtol=tolerance, atol=tolerance * out.abs().max().item())
        torch.testing.assert_close(BaseWeight(layer, 0, full.shape[0]).dense(), dense, rtol=0, atol=dense.abs().max().item() / 128)


def test_4bit_layers_the_cpu_kernels_cannot_run_are_refused_by_name(make_recipe):
    """The 32-wide tiny Llama: bitsandbytes dequantizes its 4-bit layers wrongly on some CPUs and
    fails to repack them on others; refused on every CPU, naming the layers."""
    raw = _recipe(make_recipe, "lora", "llama", "causal-lm")
    raw["quantization"] = {"bits": 4}
    with pytest.raises(ModelError, match=r"multiple of 64.*model\.layers\.0\.self_attn\.q_proj \(32 -> 32\)") as caught:
        prepare(validate_recipe(raw))
    assert "quantization.bits: 8" in caught.value.hint


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

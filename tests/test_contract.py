"""The adapter contract's optional hooks: every adapter sees its base weight (`bind_base`,
the right rows of a fused layer), and an adapter that overrides how it joins the base
output (`combine`) and the merged weight (`merge_weight`) is honoured by the forward pass
and by the one merge path."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from tnlora_cli.adapters import REGISTRY, LoraAdapter, LoraConfig
from tnlora_cli.adapters.base import BaseWeight, layer_dims
from tnlora_cli.adapters.layers import merged_weight
from tnlora_cli.model.inject import inject_adapter, merge_units
from tnlora_cli.model.merging import merge_into_base


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()


def _randomise(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_bind_base_sees_each_adapters_own_rows(monkeypatch):
    seen: dict[int, BaseWeight] = {}
    monkeypatch.setattr(LoraAdapter, "bind_base", lambda self, base: seen.__setitem__(id(self), base))
    model = _tiny_gpt2()
    full = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # Conv1D: (in, out) = (16, 48)
    inject_adapter(model, LoraConfig(target_modules=["c_attn.q", "c_attn.v", "mlp.c_fc"], r=2))
    fused = model.transformer.h[0].attn.c_attn
    assert [(u.start, u.stop) for u in fused.slices()] == [(0, 16), (32, 48)]
    for unit in fused.slices():
        base = seen[id(unit.adapter)]
        assert base.shape == (16, 16)
        torch.testing.assert_close(base.dense(), full.T[unit.start : unit.stop], rtol=0, atol=0)
    fc = model.transformer.h[0].mlp.c_fc
    base = seen[id(fc.adapter)]
    assert base.shape == tuple(reversed(fc.base_layer.weight.shape)) == (64, 16)
    torch.testing.assert_close(base.dense(), fc.base_layer.weight.T, rtol=0, atol=0)
    assert len(seen) == 3


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_default_hooks_keep_every_adapter_additive(kind):
    from test_adapters import SMALL

    torch.manual_seed(0)
    model = TwoLinear().double()
    config = REGISTRY[kind].config_class(target_modules=["up", "down"], **SMALL[kind])
    inject_adapter(model, config)
    model.double()
    _randomise(model)
    layer = model.up
    x = torch.randn(3, 12, dtype=torch.float64)
    base_out = layer.base_layer(x)
    torch.testing.assert_close(layer(x), base_out + layer.adapter(x))
    if layer.adapter.is_linear:
        w0 = layer.base_layer.weight.detach()
        torch.testing.assert_close(layer.adapter.merge_weight(w0), w0 + layer.adapter.delta_weight())


class HalvedBaseLora(LoraAdapter):
    """A test adapter that is not additive: y = base(x) / 2 + branch(x), W' = W0 / 2 + ΔW
    (the bias is not halved: merge_weight defines the weight only)."""

    def bind_base(self, base: BaseWeight) -> None:
        self.bound_shape = base.shape

    def combine(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return base_out / 2 + self.bias_part.to(base_out.dtype) / 2 + self(x)

    def merge_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return base_weight / 2 + self.delta_weight().to(base_weight.device)


def _install_halved(model: nn.Module) -> None:
    for _, layer in merge_units(model):
        for adapter, start, stop in layer.updates():
            bias = layer.base_layer.bias
            adapter.bias_part = torch.zeros(stop - start) if bias is None else bias.detach()[start:stop]


@pytest.mark.parametrize("fused", [False, True])
def test_hooks_that_are_not_additive_drive_forward_and_merge_alike(monkeypatch, fused):
    monkeypatch.setitem(REGISTRY, "lora", HalvedBaseLora)
    if fused:
        model = _tiny_gpt2()
        inject_adapter(model, LoraConfig(target_modules=["c_attn.q", "c_attn.v"], r=2))
        x = {"input_ids": torch.tensor([[1, 5, 7, 9]])}
    else:
        torch.manual_seed(0)
        model = TwoLinear()
        inject_adapter(model, LoraConfig(target_modules=["up"], r=2))
        x = {"input": torch.randn(4, 12)}
    _install_halved(model)
    _randomise(model)
    units = list(merge_units(model))
    for _, layer in units:
        for adapter, start, stop in layer.updates():
            assert adapter.bound_shape == (stop - start, layer_dims(layer.base_layer)[0])
    forward = model if fused else model.forward
    with torch.no_grad():
        expected = forward(**x).logits if fused else forward(*x.values())
        # The merge path takes the hook's weight: halved base rows, untouched rows as they were.
        name, layer = units[0]
        w0 = layer.base_layer.weight.detach().clone()
        merged = merged_weight(layer)
        rows = merged.T if layer.fan_in_fan_out else merged
        base_rows = w0.T if layer.fan_in_fan_out else w0
        for adapter, start, stop in layer.updates():
            torch.testing.assert_close(rows[start:stop], base_rows[start:stop] / 2 + adapter.delta_weight())
        if fused:
            torch.testing.assert_close(rows[16:32], base_rows[16:32], rtol=0, atol=0)  # k is not adapted
        assert merge_into_base(model) == len(units)
        got = forward(**x).logits if fused else forward(*x.values())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_merge_path_refuses_non_finite_weights():
    from tnlora_cli.errors import MergeError

    torch.manual_seed(0)
    model = TwoLinear()
    inject_adapter(model, LoraConfig(target_modules=["up"], r=2))
    with torch.no_grad():
        model.up.adapter.lora_B.fill_(float("inf"))
    with pytest.raises(MergeError, match="non-finite"):
        merged_weight(model.up)

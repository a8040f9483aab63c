"""LoRA branch algebra, target matching, freezing."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tnlora_cli.adapters import REGISTRY, AdaptedLinear, LoraConfig
from tnlora_cli.errors import TargetError
from tnlora_cli.model.inject import adapted_layers, inject_adapter
from tnlora_cli.model.merging import merge_into_base
from tnlora_cli.model.targets import find_targets


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.0)
        self.lin1 = nn.Linear(20, 2)
        self.conv = Conv1D(6, 10)  # in 10 -> out 6, weight stored (10, 6)

    def forward(self, x):
        return self.lin1(self.act(self.lin0(x))) + self.conv(x)[..., :2]


def _randomise_adapters(model: nn.Module) -> None:
    for _, layer in adapted_layers(model):
        for p in layer.adapter.parameters():
            nn.init.normal_(p, std=0.5)


def test_zero_init_gives_base_output():
    model, x = MLP(), torch.randn(4, 10)
    expected = model(x)
    inject_adapter(model, LoraConfig(target_modules=["lin0", "lin1", "conv"], r=4))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["lin0", "conv"])
def test_forward_equals_delta_weight(name):
    """forward(x) - base(x) == x @ ΔWᵀ, for nn.Linear and for Conv1D's (in, out) layout."""
    torch.manual_seed(1)
    model = MLP().double()
    inject_adapter(model, LoraConfig(target_modules=[name], r=3, alpha=6))
    model.double()
    _randomise_adapters(model)
    layer: AdaptedLinear = model.get_submodule(name)
    x = torch.randn(5, 7, 10, dtype=torch.float64)
    delta = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(delta, x @ layer.adapter.delta_weight().double().T, rtol=1e-10, atol=1e-10)
    # And the closed form: (alpha / r) B A.
    a, b = layer.adapter.lora_A, layer.adapter.lora_B
    torch.testing.assert_close(layer.adapter.delta_weight().double(), 2.0 * b @ a, rtol=1e-6, atol=1e-6)


def test_merge_matches_unmerged():
    torch.manual_seed(2)
    model = MLP()
    inject_adapter(model, LoraConfig(target_modules=["lin0", "lin1", "conv"], r=4))
    _randomise_adapters(model)
    x = torch.randn(3, 10)
    expected = model(x)
    assert merge_into_base(model) == 3
    assert not list(adapted_layers(model))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_delta_rank_is_at_most_r():
    model = MLP()
    inject_adapter(model, LoraConfig(target_modules=["lin0"], r=3))
    _randomise_adapters(model)
    assert torch.linalg.matrix_rank(model.lin0.adapter.delta_weight()) == 3


def test_only_adapter_is_trainable_and_gets_gradients():
    model = MLP()
    inject_adapter(model, LoraConfig(target_modules=["lin0"], r=2), modules_to_save=["lin1"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lin0.adapter.lora_A", "lin0.adapter.lora_B", "lin1.weight", "lin1.bias"}
    model(torch.randn(2, 10)).sum().backward()
    assert model.lin0.adapter.lora_B.grad is not None and model.lin0.adapter.lora_B.grad.abs().sum() > 0
    assert model.lin0.base_layer.weight.grad is None


def test_init_is_seeded_and_independent_of_global_rng():
    def build(seed: int, global_seed: int):
        torch.manual_seed(global_seed)
        m = MLP()
        inject_adapter(m, LoraConfig(target_modules=["lin0"], r=2, seed=seed))
        return m.lin0.adapter.lora_A.detach().clone()

    torch.testing.assert_close(build(0, 1), build(0, 2))
    assert not torch.equal(build(0, 1), build(1, 1))


# ------------------------------------------------------------------- target matching


def _cfg(targets, **kw):
    return LoraConfig(target_modules=targets, **kw)


def test_suffix_regex_and_exclude(tiny_models):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=3)
    names = find_targets(model, _cfg(["query", "value"]))
    assert len(names) == 4 and all(n.endswith((".query", ".value")) for n in names)
    # A string is a full-match regex: only layer 1's query.
    assert find_targets(model, _cfg(r".*layer\.1\.attention\.self\.query")) == ["bert.encoder.layer.1.attention.self.query"]
    # "query" as a regex does not full-match any name (peft semantics).
    with pytest.raises(TargetError):
        find_targets(model, _cfg("query"))
    assert len(find_targets(model, _cfg(["query"], exclude_modules=r".*layer\.0.*"))) == 1


def test_all_linear_skips_output_and_task_heads(tiny_models):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tnlora_cli.model.loading import output_head_names

    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    names = find_targets(lm, _cfg("all-linear"), excluded=output_head_names(lm))
    assert "lm_head" not in names and len(names) == 2 * 7
    cls = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=3)
    names = find_targets(cls, _cfg("all-linear"), excluded={"classifier"})
    assert "classifier" not in names and "bert.pooler.dense" in names


def test_gpt2_conv1d_is_matched(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"])
    report = inject_adapter(model, _cfg(["c_attn"]))
    assert len(report.targets) == 2
    layer = model.get_submodule(report.targets[0])
    assert layer.fan_in_fan_out and layer.adapter.delta_weight().shape == (96, 32)


def test_no_match_lists_nearest_names(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with pytest.raises(TargetError) as info:
        find_targets(model, _cfg(["q_prj"]))
    assert "q_proj" in info.value.hint and "matches no linear layer" in info.value.message
    # Non-linear modules (norms, dropout) are never matched, and the error says why.
    with pytest.raises(TargetError, match="non-linear"):
        find_targets(model, _cfg(["input_layernorm"]))


def test_registry_has_lora():
    assert REGISTRY["lora"].config_class is LoraConfig

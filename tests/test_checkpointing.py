"""Gradient checkpointing gives the same gradients as without it, for every adapter."""

from __future__ import annotations

import pytest
import torch
from test_adapters import ALL, _recipe

from tnlora_cli.data.examples import collate
from tnlora_cli.model.build import prepare
from tnlora_cli.recipe.load import validate_recipe
from tnlora_cli.training.memory import enable_gradient_checkpointing


def _grads(recipe, checkpointing: bool) -> dict[str, torch.Tensor]:
    prepared = prepare(recipe)
    model = prepared.model.train()
    if checkpointing:
        enable_gradient_checkpointing(model)
        assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    with torch.no_grad():  # move every adapter off its zero start so all gradients are non-trivial
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    batch = collate(prepared.data.train[:8], prepared.tokenizer.pad_token_id)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("model, task", [("llama", "causal-lm"), ("bert", "classification")])
def test_checkpointing_keeps_gradients(make_recipe, kind, model, task):
    recipe = validate_recipe(_recipe(make_recipe, kind, model, task))
    plain, checkpointed = _grads(recipe, False), _grads(recipe, True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert plain[name].abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)

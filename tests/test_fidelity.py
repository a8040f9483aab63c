"""Fidelity to the papers and their official code (issue 12): each test pins one formula,
sharing rule or validation the audit found wrong, against its reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tnlora_cli.adapters import REGISTRY
from tnlora_cli.errors import RecipeError
from tnlora_cli.inject import SHARED_ATTR, adapted_layers, inject_adapter
from tnlora_cli.recipe import validate_recipe


class Mlp(nn.Module):
    def __init__(self, n_in: int = 64, n_out: int = 48) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(n_in, n_out), nn.Linear(n_in, n_out)])

    def forward(self, x):
        return self.layers[0](x) + self.layers[1](x)


# ------------------------------------------------------------------ VeRA projections


def test_vera_projections_follow_the_reference_kaiming_uniform():
    """Reference: Kaiming-uniform with gain sqrt(2), bound sqrt(6 / fan_in), fan_in = the
    tensor's second dimension (max_in for A (r, max_in), r for B (max_out, r))."""
    model = Mlp(n_in=512, n_out=384)
    inject_adapter(model, REGISTRY["vera"].config_class(target_modules=["0", "1"], r=256))
    store = getattr(model, SHARED_ATTR).tensors
    for key, fan_in in (("vera_A", 512), ("vera_B", 256)):
        t = store[key]
        bound = math.sqrt(6.0 / fan_in)
        assert t.abs().max() <= bound
        assert t.abs().max() > 0.99 * bound, key  # 10^5 uniform draws reach the bound
        assert t.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.02), key

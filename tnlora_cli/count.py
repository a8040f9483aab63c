"""`tnlora count-params`: exact parameter accounting without loading any weights.

The base model is built on the meta device from its config (a shipped paper config, an
embedded model's, or a local `config.json`) and the adapter attached as in training
(`model.accounting`).
"""

from __future__ import annotations

import torch

from .model.accounting import CountReport, count_adapter
from .model.meta import build_on_meta
from .recipe.sections import Recipe


def count_params(recipe: Recipe, model: torch.nn.Module | None = None) -> CountReport:
    """Count the recipe's adapter on its model (built on the meta device unless given; the
    adapter is attached to `model`)."""
    return count_adapter(recipe, model if model is not None else build_on_meta(recipe))

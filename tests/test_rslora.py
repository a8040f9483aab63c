"""rsLoRA scaling (alpha / sqrt(r)) for the adapters scaled by alpha / r: counts unchanged,
merge and LoRA export exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_adapters import _recipe

from tnlora_cli.adapters import REGISTRY
from tnlora_cli.adapters.base import SharedStore
from tnlora_cli.merge import merge_run
from tnlora_cli.model.state import count_parameters
from tnlora_cli.recipe.load import validate_recipe
from tnlora_cli.train import train

KINDS = {"lora": {"r": 9, "alpha": 6.0}, "loretta": {"r": 9, "alpha": 6.0, "tt_rank": 3}, "trac": {"r": 9, "alpha": 6.0}}


def _built(kind: str, use_rslora: bool) -> tuple[torch.nn.Module, SharedStore]:
    cls = REGISTRY[kind]
    config = cls.config_class(type=kind, target_modules=["q"], use_rslora=use_rslora, **KINDS[kind])
    shared = SharedStore()
    layer = cls(48, 32, config, shared, "q", torch.Generator().manual_seed(0))
    holder = torch.nn.ModuleDict({"layer": layer, "shared": shared})
    # The factors that start at zero are made non-zero (the same draw in both builds).
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in holder.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return holder, layer


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_rslora_scales_the_update_by_sqrt_r_and_keeps_counts(kind):
    plain_holder, plain = _built(kind, False)
    rs_holder, rs = _built(kind, True)
    assert plain.scaling == pytest.approx(6.0 / 9) and rs.scaling == pytest.approx(6.0 / 3)
    torch.testing.assert_close(rs.delta_weight(), plain.delta_weight() * 3.0, rtol=1e-5, atol=1e-6)
    # In float64: the factors are randn draws, so fp32 rounding of the two contraction orders
    # differs by more than a fixed tolerance on some CPUs' kernels.
    rs_holder.double()
    x = torch.randn(5, 48, dtype=torch.float64)
    torch.testing.assert_close(rs(x), x @ rs.delta_weight().T.double(), rtol=1e-10, atol=1e-10)
    assert count_parameters(rs_holder) == count_parameters(plain_holder)


@pytest.mark.parametrize("kind, model", [("lora", "bert")])
def test_rslora_merge_and_export_are_exact(make_recipe, tmp_path, kind, model):
    pytest.importorskip("peft")
    from test_export import _adapter_logits_and_peft

    from tnlora_cli.export import export_as_lora

    task = "classification" if model == "bert" else "causal-lm"
    raw = _recipe(make_recipe, kind, model, task, use_rslora=True, alpha=4.0)
    raw["training"]["max_steps"] = 8
    train(validate_recipe(raw))
    run = Path(raw["output_dir"])
    assert json.loads((run / "adapter/adapter_config.json").read_text())["adapter"]["use_rslora"] is True
    merged = merge_run(run, tmp_path / "merged")
    assert merged.max_abs_diff is not None and merged.max_abs_diff <= 1e-4
    report = export_as_lora(run, tmp_path / "lora", rank=4)
    assert all(row["relative_error"] < 1e-6 for row in report.layers)
    expected, got = _adapter_logits_and_peft(run, tmp_path / "lora")
    assert (got - expected).abs().max().item() <= 1e-4

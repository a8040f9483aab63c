"""export --as-lora: peft loads the files and reproduces the logits within the reported error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_adapters import _recipe

from tnlora_cli.data.examples import collate
from tnlora_cli.errors import RecipeError
from tnlora_cli.export import export_as_lora
from tnlora_cli.model.build import load_run
from tnlora_cli.recipe.load import validate_recipe
from tnlora_cli.train import train

peft = pytest.importorskip("peft")


def _adapter_logits_and_peft(run: Path, exported: Path):
    loaded = load_run(run)
    loaded.load_weights()
    prepared = loaded.prepared
    batch = collate(prepared.data.eval[:6], prepared.tokenizer.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        expected = prepared.model.eval()(**batch).logits
    # peft on the plain base model, head initialised as tnlora's (same seed), then loaded.
    from accelerate.utils import set_seed

    from tnlora_cli.model.loading import load_model

    set_seed(prepared.recipe.training.seed)
    base = load_model(prepared.model_path, prepared.recipe.task, label_names=prepared.data.label_names, pad_token_id=prepared.tokenizer.pad_token_id)
    model = peft.PeftModel.from_pretrained(base, exported).eval()
    with torch.no_grad():
        got = model(**batch).logits
    return expected, got


@pytest.mark.parametrize("kind, model, task", [("lora", "bert", "classification"), ("trac", "gpt2", "causal-lm"), ("vera", "llama", "causal-lm")])
def test_exact_export_reproduces_logits_in_peft(make_recipe, tmp_path, kind, model, task):
    raw = _recipe(make_recipe, kind, model, task)
    raw["training"]["max_steps"] = 15
    train(validate_recipe(raw))
    rank = {"lora": 4, "trac": 4, "vera": 16}[kind]
    report = export_as_lora(raw["output_dir"], tmp_path / "lora", rank=rank)
    assert all(row["relative_error"] < 1e-6 for row in report.layers)
    config = json.loads((tmp_path / "lora/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == rank and config["fan_in_fan_out"] == (model == "gpt2")
    expected, got = _adapter_logits_and_peft(Path(raw["output_dir"]), tmp_path / "lora")
    assert (got - expected).abs().max().item() <= 1e-4


def test_truncated_export_error_is_reported_and_bounded(make_recipe, tmp_path):
    raw = _recipe(make_recipe, "tera", "bert", "classification")
    raw["training"]["max_steps"] = 15
    train(validate_recipe(raw))
    full = export_as_lora(raw["output_dir"], tmp_path / "r32", rank=32)
    assert max(r["relative_error"] for r in full.layers) < 1e-6  # rank 32 = full for hidden 32
    expected, got = _adapter_logits_and_peft(Path(raw["output_dir"]), tmp_path / "r32")
    assert (got - expected).abs().max().item() <= 1e-4
    cut = export_as_lora(raw["output_dir"], tmp_path / "e90", energy=0.9)
    assert all(0 < r["relative_error"] <= (1 - 0.9) ** 0.5 + 1e-9 for r in cut.layers)
    assert all(r["rank"] < 32 for r in cut.layers)
    config = json.loads((tmp_path / "e90/adapter_config.json").read_text())
    assert config["r"] == max(r["rank"] for r in cut.layers)
    expected, got = _adapter_logits_and_peft(Path(raw["output_dir"]), tmp_path / "e90")
    assert torch.isfinite(got).all()


def test_export_needs_one_of_rank_or_energy(tmp_path):
    with pytest.raises(RecipeError, match="exactly one"):
        export_as_lora(tmp_path, tmp_path / "x")


@pytest.mark.parametrize("kind, frozen_saved", [("lora", True), ("vera", False), ("trac", False), ("tera", True), ("loretta", True), ("tensorguide", True)])
def test_export_as_peft_is_exact_for_every_adapter(make_recipe, tmp_path, kind, frozen_saved):
    import tnlora_cli.peft  # noqa: F401  (registers the tensor-network types with peft)
    from tnlora_cli.export import export_as_peft

    raw = _recipe(make_recipe, kind, "llama", "causal-lm", save_frozen=frozen_saved)
    raw["training"]["max_steps"] = 3
    raw["training"]["learning_rate"] = 0.1  # a visible update in three steps
    train(validate_recipe(raw))
    export_as_peft(raw["output_dir"], tmp_path / "peft")
    config = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    native = {"lora": "LORA", "vera": "VERA"}
    assert config["peft_type"] == native.get(kind, f"TNLORA_{kind.upper()}")
    card = (tmp_path / "peft/README.md").read_text()
    if kind not in native:
        assert config["tnlora_version"] and "pip install tnlora" in card and "import tnlora_cli.peft" in card
    expected, got = _adapter_logits_and_peft(Path(raw["output_dir"]), tmp_path / "peft")
    assert (got - expected).abs().max().item() <= 1e-5
    assert model_moved(Path(raw["output_dir"]))


def model_moved(run: Path) -> bool:
    """The run's update is not zero (else an export of nothing would pass)."""
    from tnlora_cli.model.build import load_adapters_on_meta
    from tnlora_cli.model.inject import adapted_layers

    model, _ = load_adapters_on_meta(run)
    return any(layer.adapter.delta_weight().abs().max() > 1e-4 for _, layer in adapted_layers(model) if layer.adapter.is_linear)

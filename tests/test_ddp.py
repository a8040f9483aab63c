"""Data-parallel training with 2 CPU processes on gloo, through `accelerate launch`."""

from __future__ import annotations

import json

import pytest
from conftest import ACCELERATE, accelerate_launch, assert_same_adapters, write_recipe

from tnlora_cli.recipe.load import validate_recipe
from tnlora_cli.train import train


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate launcher not installed")
@pytest.mark.parametrize("kind, checkpointing", [("lora", False), ("trac", True)])
def test_two_process_ddp_matches_one_process_with_the_global_batch(make_recipe, tmp_path, monkeypatch, kind, checkpointing):
    """TRAC uses one trainable core in many layers: DDP must reduce its gradient once, also
    with gradient checkpointing (no "marked ready twice")."""
    adapter = {"lora": {"type": "lora", "r": 4, "alpha": 8}, "trac": {"type": "trac", "r": 4, "activation": "softmax"}}[kind]
    raw = make_recipe("bert", "classification")
    raw["adapter"] = {"target_modules": ["query", "value"], **adapter}
    raw["training"].update(max_steps=40, batch_size=4, gradient_checkpointing=checkpointing)
    raw["output_dir"] = str(tmp_path / "ddp")
    monkeypatch.setenv("TNLORA_DATA_CACHE", str(tmp_path / "data-cache"))  # an empty cache: the launch builds the entry
    recipe = write_recipe(tmp_path / "ddp.yaml", raw)
    # `--cpu --num_processes 2` silently runs one process; `--multi_gpu` on a CPU-only
    # machine starts 2 gloo processes through torchrun.
    result = accelerate_launch(["--multi_gpu"], 29517 + len(kind) + 10 * checkpointing, "train", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["world_size"] == 2
    checksums = final["adapter_checksum_per_rank"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], "ranks ended with different weights"
    # The data was tokenized once: one process built the cache, the other opened it.
    assert sorted(final["data_cache_hit_per_rank"]) == [0, 1], final["data_cache_hit_per_rank"]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < losses[0]

    # Same data stream, one process, the global batch (2 x 4): the same adapter.
    single = make_recipe("bert", "classification")
    single["adapter"] = raw["adapter"]
    single["training"].update(max_steps=40, batch_size=8)
    single["output_dir"] = str(tmp_path / "single")
    train(validate_recipe(single))
    assert_same_adapters(tmp_path / "ddp", tmp_path / "single", rtol=1e-4, atol=1e-5)

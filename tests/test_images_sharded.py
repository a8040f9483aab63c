"""task: image-classification under the sharded engines (FSDP2, DeepSpeed ZeRO-2 and ZeRO-3):
2 CPU processes through `accelerate launch`, the tiny ViT of test_images.py on its image
folder. Each engine must reach the adapter (with the new classification head, trained in full)
that one process reaches with the global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ACCELERATE, accelerate_launch, assert_same_adapters, write_recipe
from test_engines import ENGINES, HAS_DEEPSPEED, _zero3_config
from test_images import image_recipe, images, make_image_recipe, vision_models  # noqa: F401 - fixtures

from tnlora_cli.recipe.load import validate_recipe
from tnlora_cli.train import train

STEPS = 6


@pytest.fixture(scope="module")
def single_process_run(vision_models, images, tmp_path_factory) -> Path:  # noqa: F811
    """The reference every engine is compared with: one process, the global batch (2 x 4)."""
    out = tmp_path_factory.mktemp("single") / "run"
    raw = make_image_recipe(vision_models, images, out, "trac")
    raw["training"]["max_steps"] = STEPS
    train(validate_recipe(raw))
    return out


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate launcher not installed")
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_sharded_engines_on_images_match_one_process_with_the_global_batch(image_recipe, single_process_run, tmp_path, monkeypatch, engine):  # noqa: F811
    if engine.startswith("deepspeed") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed not installed")
    flags, setting = ENGINES[engine]
    flags = [f.format(zero3=_zero3_config(tmp_path)) for f in flags]
    monkeypatch.setenv("TNLORA_DATA_CACHE", str(tmp_path / "data-cache"))
    raw = image_recipe("trac")
    raw["training"].update(max_steps=STEPS, batch_size=4, distributed=setting)
    raw["output_dir"] = str(tmp_path / "sharded")
    result = accelerate_launch(flags, 29650 + sorted(ENGINES).index(engine), "train", str(write_recipe(tmp_path / "run.yaml", raw)))
    assert result.returncode == 0, result.stderr[-4000:]
    final = [json.loads(line) for line in (tmp_path / "sharded/metrics.jsonl").read_text().splitlines()][-1]
    assert final["engine"] == engine and final["world_size"] == 2
    assert final["adapter_checksum_per_rank"][0] == final["adapter_checksum_per_rank"][1], "ranks ended with different weights"
    config = json.loads((tmp_path / "sharded/adapter/adapter_config.json").read_text())
    assert config["task"] == "image-classification" and config["modules_to_save"] == ["classifier"]
    assert_same_adapters(tmp_path / "sharded", single_process_run, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate launcher not installed")
def test_batchnorm_statistics_agree_across_ranks_and_eval_reproduces_the_run(image_recipe, tmp_path, monkeypatch):  # noqa: F811
    """The ResNet's running statistics, updated by each rank's own batches (FSDP synchronises no
    buffers), are averaged over the ranks before they are saved: every rank ends with the same
    state, and `tnlora eval` of the saved adapter gives the run's own numbers."""
    from safetensors.torch import load_file

    from tnlora_cli.evaluate import evaluate_run

    monkeypatch.setenv("TNLORA_DATA_CACHE", str(tmp_path / "data-cache"))
    raw = image_recipe("lora", model="resnet")
    raw["adapter"].update(target_modules=["classifier.1"], modules_to_save=[])
    raw["training"].update(max_steps=STEPS, batch_size=4, distributed="fsdp")
    result = accelerate_launch(["--multi_gpu"], 29660, "train", str(write_recipe(tmp_path / "run.yaml", raw)))
    assert result.returncode == 0, result.stderr[-4000:]
    run = Path(raw["output_dir"])
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["adapter_checksum_per_rank"][0] == final["adapter_checksum_per_rank"][1], "ranks ended with different statistics"
    saved = load_file(str(run / "adapter/adapter_model.safetensors"))
    assert any(k.endswith(".running_mean") and not torch.all(v == 0) for k, v in saved.items())
    assert evaluate_run(run)["metrics"]["tuned"] == pytest.approx(json.loads((run / "eval.json").read_text())["metrics"]["tuned"])

"""task: image-classification on tiny vision models built from configs (a ViT with 32x32
inputs and 8x8 patches, a 1-channel ResNet), with images drawn by PIL into temp folders."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tnlora_cli.data.prepare import prepare_data
from tnlora_cli.errors import DataError, ModelError
from tnlora_cli.evaluate import evaluate_run
from tnlora_cli.merge import merge_run
from tnlora_cli.model.build import load_preprocessor, resolve_checked
from tnlora_cli.recipe.load import validate_recipe
from tnlora_cli.train import train

CLASSES = ("red", "green", "stripes")
#: Small settings per adapter for the tiny ViT (hidden 32).
SMALL = {
    "lora": {"r": 4, "alpha": 8},
    "vera": {"r": 16},
    "loretta": {"r": 4, "tt_rank": 3},
    "trac": {"r": 4},
    "tera": {"outdim": 4},
    "tensorguide": {"hidden": 4, "in_modes": [2, 2, 2]},
}


def draw(kind: str, rng: random.Random, size: tuple[int, int] = (40, 40), mode: str = "RGB"):
    """A noisy image of one class: mostly red, mostly green, or black and white vertical stripes."""
    from PIL import Image

    w, h = size
    noise = np.asarray([[rng.randint(0, 60) for _ in range(w)] for _ in range(h)], dtype=np.int32)
    pixels = np.zeros((h, w, 3), dtype=np.int32) + noise[..., None]
    if kind == "red":
        pixels[..., 0] += 180
    elif kind == "green":
        pixels[..., 1] += 180
    else:
        pixels[:, (np.arange(w) // 4) % 2 == 0, :] += 190
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").convert(mode)


def image_folder(root: Path, per_class: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (40, 40) if i % 2 else (36, 48)  # resized to the model's 32x32
            draw(kind, rng, size).save(root / kind / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def vision_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny ViT saved with a 5-class head and an image processor (32x32), and a config-only
    style 1-channel ResNet without one (image_size 32 in its config)."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification, ViTImageProcessor

    root = tmp_path_factory.mktemp("vision")
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=64, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    vit.save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], image_size=32, num_labels=2)
    ResNetForImageClassification(config).save_pretrained(root / "resnet")
    return {"vit": root / "vit", "resnet": root / "resnet"}


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture
def image_recipe(vision_models, images, tmp_path):
    def _make(kind: str = "lora", model: str = "vit", **data) -> dict:
        return {
            "model": str(vision_models[model]),
            "task": "image-classification",
            "adapter": {"type": kind, "target_modules": ["q_proj", "v_proj"], **SMALL[kind]},
            "data": {"train": str(images), "eval_fraction": 0.25, **data},
            "training": {"max_steps": 40, "batch_size": 8, "learning_rate": 1e-2, "log_every": 10, "seed": 0},
            "output_dir": str(tmp_path / "run"),
        }

    return _make


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tnlora_cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_tiny_vit_trains_with_every_adapter_and_beats_the_base(image_recipe, kind):
    raw = image_recipe(kind)
    result = train(validate_recipe(raw))
    rows = result.evaluation
    print(kind, {k: round(v["accuracy"], 3) for k, v in rows.items()})
    assert set(rows) == {"base", "head only", "tuned"}
    assert rows["tuned"]["accuracy"] > rows["base"]["accuracy"], rows
    assert rows["tuned"]["accuracy"] >= 0.8, rows
    config = json.loads((Path(raw["output_dir"]) / "adapter/adapter_config.json").read_text())
    assert config["task"] == "image-classification" and config["modules_to_save"] == ["classifier"]
    assert config["label_names"] == list(sorted(CLASSES))
    assert all(t.endswith(("q_proj", "v_proj")) for t in config["targets"]) and len(config["targets"]) == 4

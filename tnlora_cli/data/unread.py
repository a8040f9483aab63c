"""Data keys that nothing would read for this task or these sources: refused, never ignored.

A recipe that asks for augmentation on text, names an image column of an image folder (which has
none), or picks the split of a local file would otherwise train on something other than what it
says, without a word.
"""

from __future__ import annotations

import glob as globlib
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..recipe.sections import IMAGE_TASK, DataConfig, DataSource
from .embedded import DATASETS


def _items(spec: Any, key: str) -> list[tuple[str, Any]]:
    items = spec if isinstance(spec, list) else [spec]
    return [(f"{key}[{i}]" if isinstance(spec, list) else key, item) for i, item in enumerate(items)]


def _is_local(path: str) -> bool:
    """An embedded alias or something on this disk: a hub dataset's config and split do not apply."""
    return path in DATASETS or Path(path).expanduser().exists() or (any(ch in path for ch in "*?[") and bool(globlib.glob(path)))


def check_unread_keys(cfg: DataConfig, task: str, image_folders: set[str] | None = None) -> None:
    """Refuse data keys this task or these sources do not read. `image_folders`: the `data.train` /
    `data.eval` keys (e.g. data.train[1]) whose source is an image folder (image-classification)."""
    sources = _items(cfg.train, "data.train") + (_items(cfg.eval, "data.eval") if cfg.eval else [])
    for where, item in sources:
        if isinstance(item, DataSource) and _is_local(item.path):
            for name, value, default in (("split", item.split, "train"), ("config", item.config, None)):
                if value != default:
                    raise DataError(f"{where}.{name}: {value!r} selects part of a hub dataset, but '{item.path}' is "
                                    f"{'an embedded data set' if item.path in DATASETS else 'a local path'}, read whole",
                                    hint=f"remove {where}.{name}, or point {where}.path at the file that holds that part")
    if task != IMAGE_TASK:
        if cfg.augment != "none":
            raise DataError(f"data.augment: {cfg.augment} augments images, and task {task} reads text",
                            hint="remove data.augment (only task image-classification augments)")
        if cfg.image_column != DataConfig.model_fields["image_column"].default:
            raise DataError(f"data.image_column: task {task} reads text, not images",
                            hint="remove data.image_column (it is for task image-classification)")
        return
    folders = image_folders or set()
    if folders and all(where in folders for where, _ in sources):
        for name in ("image_column", "label_column"):
            # Compared with the defaults: a run's saved recipe writes every key.
            if getattr(cfg, name) not in (None, DataConfig.model_fields[name].default):
                raise DataError(f"data.{name}: {getattr(cfg, name)!r} names a column, but {', '.join(sorted(folders))} "
                                f"{'is an image folder' if len(folders) == 1 else 'are image folders'} (one sub-folder of images per class), "
                                f"which {'has' if len(folders) == 1 else 'have'} no columns", hint=f"remove data.{name}; the sub-folders' names are the labels")

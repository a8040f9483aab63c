"""Images per second of tnlora's image data against a plain `datasets` + image-processor pipeline.

    python benchmarks/images.py [--images 2000] [--size 96] [--repeat 3]

On the same PNG files (an image folder of 4 classes, `--size` pixels square, resized to a tiny
ViT's 224x224 input by its ViTImageProcessor):

- plain: `datasets.load_dataset("imagefolder")`, then the image processor over every image
  (decode, resize, rescale, normalise), as peft's image-classification example does per epoch;
- tnlora, first pass: `prepare_data` with an empty cache (decode, convert, resize, store uint8),
  then every training example read once (normalised as training reads it);
- tnlora, cached pass: the same with the cache built (what every later epoch, `eval` and
  `merge` do).

Targets: first pass at least 0.9x the plain pipeline's images/s; the cached pass at least 5x
faster than the first. Single process, one torch thread (OMP_NUM_THREADS=1 is advised).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _read_all(examples, batch: int = 64) -> int:
    n = 0
    for i in range(0, len(examples), batch):
        n += len(examples.take(list(range(i, min(i + batch, len(examples))))))
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from test_images import draw
    from tnlora_cli.data.images import load_image_processing
    from tnlora_cli.data.prepare import prepare_data
    from tnlora_cli.recipe.sections import DataConfig

    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="tnlora-bench-images-"))
    rng = random.Random(0)
    kinds = ["red", "green", "stripes", "red"]
    for i in range(args.images):
        folder = root / "images" / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        draw(kinds[i % 4], rng, (args.size, args.size)).save(folder / f"{i:05d}.png")
    model_dir = root / "vit"
    ViTForImageClassification(ViTConfig(image_size=224, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64)).save_pretrained(model_dir)
    ViTImageProcessor().save_pretrained(model_dir)
    processing = load_image_processing(str(model_dir))
    processor = ViTImageProcessor.from_pretrained(model_dir)
    cfg = DataConfig(train=str(root / "images"), eval_fraction=0.1, max_held_out=None)

    def plain() -> float:
        start = time.perf_counter()
        ds = datasets.load_dataset("imagefolder", data_dir=str(root / "images"), split="train")
        for i in range(0, ds.num_rows, 64):
            processor(images=ds[i : i + 64]["image"], return_tensors="pt")
        return ds.num_rows / (time.perf_counter() - start)

    def ours(cache: Path) -> float:
        os.environ["TNLORA_DATA_CACHE"] = str(cache)
        start = time.perf_counter()
        data = prepare_data(cfg, "image-classification", processing)
        n = _read_all(data.train) + _read_all(data.eval)
        return n / (time.perf_counter() - start)

    rows = {"plain datasets + image processor": [], "tnlora first pass": [], "tnlora cached pass": []}
    for r in range(args.repeat):  # interleaved, so load on the machine hits every side alike
        rows["plain datasets + image processor"].append(plain())
        cache = root / f"cache-{r}"
        rows["tnlora first pass"].append(ours(cache))
        rows["tnlora cached pass"].append(ours(cache))
    medians = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{args.images} PNG images of {args.size}x{args.size} -> 3x224x224, median of {args.repeat} (images/s):")
    for name, value in medians.items():
        print(f"  {name:34s} {value:9.1f}   runs: {', '.join(f'{v:.1f}' for v in rows[name])}")
    print(f"first pass / plain: {medians['tnlora first pass'] / medians['plain datasets + image processor']:.2f}x (target >= 0.9)")
    print(f"cached / first pass: {medians['tnlora cached pass'] / medians['tnlora first pass']:.2f}x (target >= 5)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

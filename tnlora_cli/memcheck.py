"""Refuse a run whose dry-run memory estimate exceeds what the machine has, before loading.

`batch_size: 1e20` or `max_length: 10**9` would otherwise grow memory until the machine
kills something. The estimate is `tnlora train --dry-run`'s (on the meta device: no weights
read); the available memory is the GPU's free memory when training runs on a GPU, else the
system's MemAvailable. `--skip-memory-check` (train(check_memory=False)) overrides it, for
estimates that are too pessimistic on an unusual model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import RecipeError
from .recipe import Recipe


def is_main_launch_process() -> bool:
    """Rank 0 of a launch (or a plain single process), known before accelerate starts."""
    return int(os.environ.get("RANK", "0")) == 0


def available_memory() -> int | None:
    """Bytes the run may use: free GPU memory, or MemAvailable of the system."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return int(free)
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_memory_fits(recipe: Recipe) -> None:
    from .dryrun import dry_run
    from .model_check import check_max_length
    from .modeling import resolve_model

    try:
        model_path = resolve_model(recipe.model, recipe.trust_remote_code, recipe.allow_pickle)
    except Exception:  # noqa: BLE001 - loading says what is wrong
        return
    check_max_length(model_path, recipe.data.max_length)  # a certain error is said before an estimate
    try:
        estimate = dry_run(recipe, with_samples=False, processes=int(os.environ.get("WORLD_SIZE", "1"))).memory["total"]
    except Exception:  # noqa: BLE001 - an estimate that cannot be made is no reason to refuse; loading says what is wrong
        return
    have = available_memory()
    if have is not None and estimate > have:
        cfg = recipe.training
        raise RecipeError(
            f"training: the memory estimate ({_gib(estimate)} at batch_size {cfg.batch_size} x data.max_length {recipe.data.max_length}) "
            f"exceeds the {_gib(have)} available",
            hint="lower training.batch_size or data.max_length, enable training.gradient_checkpointing, "
            "or pass --skip-memory-check if you know the run fits (see tnlora train --dry-run)",
        )

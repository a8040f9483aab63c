"""Experiment trackers (`training.report_to`) through accelerate's tracker integration.

The records that go to `metrics.jsonl` go to every tracker too, from the main process only,
at the same steps. A resumed run continues the same curves:

- TensorBoard writes into `<output_dir>/tensorboard/<run_name>` and opens its writer with
  `purge_step` = the first step of the continuation, so readers drop anything an interrupted
  run had logged after its checkpoint (no duplicate steps);
- wandb, trackio and mlflow reopen the run whose id the first start stored in
  `<output_dir>/trackers.json`.

Which trackers exist and which are installed is accelerate's knowledge (its `LoggerType`
and `get_available_trackers`); a tracker that is named but not installed is refused before
anything is loaded or written.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from ..recipe.sections import Recipe
from ..run.atomic import write_json

#: tracker -> what to install for it.
PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "trackio": "trackio",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
}
TENSORBOARD_DIR = "tensorboard"
IDS_FILE = "trackers.json"


def check_trackers(recipe: Recipe) -> None:
    """Refuse trackers that are not installed (names were checked by the recipe schema)."""
    names = recipe.training.report_to
    if not names:
        return
    from accelerate.tracking import get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    missing = [name for name in names if name not in available]
    if missing:
        install = " ".join(PACKAGES.get(name, name) for name in missing)
        raise RecipeError(
            f"training.report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed",
            hint=f"pip install {install}, or remove {', '.join(missing)} from training.report_to",
        )


def run_name(recipe: Recipe) -> str:
    return recipe.training.run_name or Path(recipe.output_dir).resolve().name


def start_trackers(accelerator: Any, recipe: Recipe, out: Path, start_step: int) -> None:
    """Start every tracker of `training.report_to` on the main process and hand it to
    `accelerator`, so `accelerator.log` and `accelerator.end_training` reach it."""
    names = recipe.training.report_to
    if not names or not accelerator.is_main_process:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    ids_path = out / IDS_FILE
    ids: dict[str, str] = json.loads(ids_path.read_text()) if start_step and ids_path.is_file() else {}
    project, name = recipe.training.tracker_project, run_name(recipe)
    resumed = start_step > 0
    for kind in names:
        cls = LOGGER_TYPE_TO_CLASS[kind]
        if kind == "tensorboard":
            tracker = cls(name, str(out / TENSORBOARD_DIR), purge_step=start_step + 1 if resumed else None)
        elif kind == "wandb":
            ids.setdefault(kind, uuid.uuid4().hex[:12])
            tracker = cls(project, name=name, id=ids[kind], resume="allow", dir=str(out))
        elif kind == "trackio":
            tracker = cls(project, name=name, resume="allow")
        elif kind == "mlflow":
            tracker = cls(experiment_name=project, run_name=name, run_id=ids.get(kind))
        elif cls.requires_logging_directory:
            tracker = cls(name, str(out / kind))
        else:
            tracker = cls(project)
        tracker.start()
        if kind == "mlflow":
            ids[kind] = tracker.active_run.info.run_id
        if not resumed:
            tracker.store_init_configuration(_flat_config(recipe))
        accelerator.trackers.append(tracker)
    if ids:
        write_json(ids_path, ids)


def log_record(accelerator: Any, record: dict[str, Any]) -> None:
    """A metrics.jsonl record to every tracker: its numbers at its step; per-rank lists as
    their maximum (peak memory) and fingerprints left out."""
    if not accelerator.trackers:
        return
    values: dict[str, float | int] = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or "checksum" in key:
            continue
        if isinstance(value, (int, float)):
            values[key] = value
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value) and key.endswith("_per_rank"):
            values[key.removesuffix("_per_rank")] = max(value)
    if values:
        accelerator.log(values, step=record["step"])


def finish_trackers(accelerator: Any) -> None:
    """Flush and close the trackers of a run that ends early (interrupted by `stop_after`)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()


def _flat_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe as flat `section.key` scalars (what trackers store as hyperparameters)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        elif isinstance(node, (bool, int, float, str)):
            flat[prefix] = node
        else:  # lists and nulls: shown as text
            flat[prefix] = json.dumps(node)

    walk("", recipe.model_dump(mode="json"))
    return flat

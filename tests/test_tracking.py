"""training.report_to: the metrics.jsonl records in TensorBoard (read back offline), resumed
runs continuing the same curve, and clear refusals of unknown or missing trackers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_recipe

from tnlora_cli.recipe.load import validate_recipe
from tnlora_cli.train import train

pytest.importorskip("tensorboard")


def _scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _jsonl(run: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def test_tensorboard_gets_the_loss_curve_of_a_run_and_its_resumed_continuation(make_recipe):
    raw = make_recipe("bert", "classification")
    raw["training"].update(max_steps=8, log_every=1, save_every=4, report_to=["tensorboard"], run_name="curve")
    run = Path(raw["output_dir"])
    # Interrupted at step 6: steps 5 and 6 were logged after the last checkpoint (step 4)...
    train(validate_recipe(raw), stop_after=6)
    interrupted = _scalars(run / "tensorboard/curve", "train_loss")
    assert [s for s, _ in interrupted] == [1, 2, 3, 4, 5, 6]
    # ...and are logged again by the continuation from step 4; readers keep only the new ones.
    train(validate_recipe(raw), resume=str(run / "checkpoints/step-000004"))
    curve = _scalars(run / "tensorboard/curve", "train_loss")
    assert [s for s, _ in curve] == list(range(1, 9))  # every step once
    final = _jsonl(run, "train_loss")  # metrics.jsonl: the last record of each step is the continuation's
    assert [v for _, v in curve] == pytest.approx([final[s] for s in range(1, 9)], rel=1e-6)
    assert [v for _, v in curve[:4]] == pytest.approx([v for _, v in interrupted[:4]], rel=1e-6)
    lr = _scalars(run / "tensorboard/curve", "lr")
    assert [s for s, _ in lr] == list(range(1, 9))
    held_out = _scalars(run / "tensorboard/curve", "eval_loss")
    assert [s for s, _ in held_out] == [8] and held_out[0][1] == pytest.approx(_jsonl(run, "eval_loss")[8], rel=1e-6)
    assert _scalars(run / "tensorboard/curve", "peak_memory_mib")[0][1] > 0


def _missing_tracker() -> str | None:
    from accelerate.tracking import get_available_trackers

    from tnlora_cli.training.tracking import PACKAGES

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    return next((name for name in PACKAGES if name not in available), None)


@pytest.mark.parametrize(
    "tracker, fragment",
    [
        ("tensorbord", "training.report_to[0]: Input should be 'tensorboard'"),
        ("missing", "is not installed"),
    ],
)
def test_unknown_or_missing_trackers_are_refused_with_exit_2_and_nothing_written(make_recipe, tmp_path, tracker, fragment):
    from typer.testing import CliRunner

    from tnlora_cli.cli import app

    if tracker == "missing":
        tracker = _missing_tracker()
        if tracker is None:
            pytest.skip("every tracker accelerate knows is installed")
        fragment = f"training.report_to: {tracker} {fragment}"
    raw = make_recipe()
    raw["training"]["report_to"] = [tracker]
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", raw))])
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output
    assert not Path(raw["output_dir"]).exists()


def test_a_resumed_run_reopens_the_same_wandb_run(make_recipe, tmp_path, monkeypatch):
    """wandb is not installed here: a stand-in records what accelerate's tracker would receive."""
    from types import SimpleNamespace

    from accelerate import tracking as accelerate_tracking

    from tnlora_cli.training.tracking import log_record, start_trackers

    started: list[dict] = []

    class FakeWandB(accelerate_tracking.GeneralTracker):
        name = "wandb"
        requires_logging_directory = False

        def __init__(self, project: str, **kwargs) -> None:
            super().__init__()
            started.append({"project": project, **kwargs})
            self.logged: list = []

        def start(self) -> None:
            pass

        @property
        def tracker(self):
            return None

        def store_init_configuration(self, values: dict) -> None:
            started[-1]["config"] = values

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            self.logged.append((step, values))

    monkeypatch.setitem(accelerate_tracking.LOGGER_TYPE_TO_CLASS, "wandb", FakeWandB)
    raw = make_recipe()
    raw["training"].update(report_to=["wandb"], tracker_project="proj")
    recipe = validate_recipe(raw)
    out = tmp_path / "run"
    out.mkdir()

    def accelerator():
        trackers: list = []
        return SimpleNamespace(is_main_process=True, trackers=trackers, log=lambda values, step: [t.log(values, step) for t in trackers])

    first = accelerator()
    start_trackers(first, recipe, out, start_step=0)
    log_record(first, {"step": 3, "train_loss": 1.5, "engine": "single", "adapter_checksum_per_rank": [1.0], "peak_memory_mib_per_rank": [5.0, 7.0]})
    assert first.trackers[0].logged == [(3, {"train_loss": 1.5, "peak_memory_mib": 7.0})]
    resumed = accelerator()
    start_trackers(resumed, recipe, out, start_step=3)
    assert started[0]["project"] == "proj" and started[0]["name"] == "run" and started[0]["resume"] == "allow"
    assert started[1]["id"] == started[0]["id"]  # the same run continues
    assert "config" in started[0] and "config" not in started[1]  # hyperparameters stored once
    assert started[0]["config"]["training.report_to"] == '["wandb"]'

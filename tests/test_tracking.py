"""training.report_to: the metrics.jsonl records in TensorBoard (read back offline), resumed
runs continuing the same curve, and clear refusals of unknown or missing trackers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_recipe
from tnlora_cli.recipe import validate_recipe
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

    from tnlora_cli.tracking import PACKAGES

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

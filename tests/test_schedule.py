"""training.epochs and training.warmup_ratio: resolved into steps from the prepared training split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import write_recipe

from tnlora_cli.errors import RecipeError
from tnlora_cli.recipe.load import load_recipe, validate_recipe
from tnlora_cli.train import train
from tnlora_cli.training.schedule import resolve_schedule


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_epochs_take_ceil_of_examples_over_the_global_batch(make_recipe, tiny_models):
    from tnlora_cli.data.prepare import prepare_data
    from tnlora_cli.model.loading import load_tokenizer

    raw = make_recipe("bert", "classification")
    del raw["training"]["max_steps"]
    raw["training"].update(epochs=2, batch_size=7, gradient_accumulation_steps=2, log_every=5)
    raw["data"]["max_train_samples"] = 45
    recipe = validate_recipe(raw)
    n_train = len(prepare_data(recipe.data, recipe.task, load_tokenizer(str(tiny_models["bert"]))).train)
    expected = math.ceil(2 * n_train / (7 * 2))
    assert expected * 14 != 2 * n_train  # the rounding up is exercised

    from tnlora_cli.report.reporter import Reporter

    class Notes(Reporter):
        def __init__(self) -> None:
            self.lines: list[str] = []

        def status(self, message: str) -> None:
            self.lines.append(message)

    notes = Notes()
    result = train(recipe, reporter=notes)
    run = Path(raw["output_dir"])
    assert result.steps == expected
    assert any(f"training.epochs 2 = {expected} steps" in line for line in notes.lines)  # printed
    assert max(r["step"] for r in _records(run) if "train_loss" in r) == expected
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["training"]["max_steps"] == expected and saved["training"]["epochs"] is None
    assert f"= {expected} steps" in (run / "recipe.yaml").read_text().splitlines()[0]  # the derivation, as a comment
    assert load_recipe(run / "recipe.yaml").training.max_steps == expected  # the saved recipe is valid as it stands


def test_global_batch_counts_processes_and_accumulation(make_recipe):
    raw = make_recipe()
    del raw["training"]["max_steps"]
    raw["training"].update(epochs=1.5, batch_size=4, gradient_accumulation_steps=2, warmup_ratio=0.1)
    resolved = resolve_schedule(validate_recipe(raw), 100, processes=3).recipe.training
    assert resolved.max_steps == math.ceil(1.5 * 100 / 24) == 7
    assert resolved.warmup_steps == 1 and resolved.warmup_ratio is None and resolved.epochs is None


def test_warmup_ratio_gives_the_schedule_of_the_equivalent_warmup_steps(make_recipe, tmp_path):
    def run(name: str, **training) -> list[float]:
        raw = make_recipe("bert", "classification")
        raw["training"].update(max_steps=8, log_every=1, lr_scheduler="cosine", **training)
        raw["output_dir"] = str(tmp_path / name)
        train(validate_recipe(raw))
        return [r["lr"] for r in _records(tmp_path / name) if "lr" in r]

    by_ratio = run("ratio", warmup_ratio=0.3)  # ceil(0.3 x 8) = 3
    by_steps = run("steps", warmup_steps=3)
    assert len(by_ratio) == 8 and by_ratio == by_steps
    assert by_ratio[0] < by_ratio[1] < by_ratio[2]  # still warming up over the first steps
    assert yaml.safe_load((tmp_path / "ratio/recipe.yaml").read_text())["training"]["warmup_steps"] == 3


@pytest.mark.parametrize(
    "training, fragment",
    [
        ({"epochs": 2, "max_steps": 10}, "max_steps and epochs are both set"),
        ({"warmup_ratio": 1.0}, "training.warmup_ratio"),
        ({"warmup_ratio": 0.1, "warmup_steps": 2}, "warmup_steps and warmup_ratio are both set"),
        ({"epochs": 0}, "training.epochs"),
    ],
)
def test_bad_lengths_are_refused_with_exit_2_and_nothing_written(make_recipe, tmp_path, training, fragment):
    from typer.testing import CliRunner

    from tnlora_cli.cli import app

    raw = make_recipe()
    raw["training"].update(training)
    with pytest.raises(RecipeError, match=fragment.split()[0]):
        validate_recipe(raw)
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", raw))])
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert not Path(raw["output_dir"]).exists()


def test_warmup_longer_than_the_resolved_run_is_refused(make_recipe):
    raw = make_recipe()
    del raw["training"]["max_steps"]
    raw["training"].update(epochs=1, batch_size=8, warmup_steps=50)
    with pytest.raises(RecipeError, match="warm-up steps leave no training in 4 steps"):
        resolve_schedule(validate_recipe(raw), 30)


def test_dry_run_shows_the_resolved_step_count(make_recipe, tiny_models):
    from tnlora_cli.data.prepare import prepare_data
    from tnlora_cli.dryrun import dry_run
    from tnlora_cli.model.loading import load_tokenizer

    raw = make_recipe("bert", "classification")
    del raw["training"]["max_steps"]
    raw["training"].update(epochs=1, batch_size=8, warmup_ratio=0.5)
    recipe = validate_recipe(raw)
    n_train = len(prepare_data(recipe.data, recipe.task, load_tokenizer(str(tiny_models["bert"]))).train)
    steps = math.ceil(n_train / 16)  # 8 per process on 2 processes
    notes = " ".join(dry_run(recipe, processes=2).notes)
    assert f"training.epochs 1 = {steps} steps" in notes and f"= {math.ceil(steps / 2)} warm-up steps" in notes


def test_an_epochs_run_resumes_with_the_same_recipe(make_recipe, tiny_models):
    """The checkpoint records the resolved step counts; the user's recipe still says epochs."""
    raw = make_recipe("bert", "classification")
    del raw["training"]["max_steps"]
    raw["training"].update(epochs=1, warmup_ratio=0.1, batch_size=8, save_every=2, log_every=2)
    raw["data"]["max_train_samples"] = 40
    recipe = validate_recipe(raw)
    first = train(recipe, stop_after=2)
    assert first.steps == 2
    resumed = train(validate_recipe(raw), resume="auto")
    assert resumed.steps == math.ceil(40 / 8)
    changed = dict(raw, training={**raw["training"], "learning_rate": 0.5})
    with pytest.raises(RecipeError, match="learning_rate"):
        train(validate_recipe(changed), resume="auto")

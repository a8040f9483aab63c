"""Training, checkpoints, resume, eval and the run directory, on tiny random models."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import assert_same_adapters
from safetensors.torch import load_file

from tnlora_cli.data.chat import IGNORE_INDEX
from tnlora_cli.data.prepare import prepare_data
from tnlora_cli.errors import RecipeError
from tnlora_cli.evaluate import evaluate_run
from tnlora_cli.model.loading import load_tokenizer
from tnlora_cli.recipe.load import validate_recipe
from tnlora_cli.run.layout import checkpoint_dirs
from tnlora_cli.train import train
from tnlora_cli.training.batches import BatchStream


def _losses(run: Path) -> list[float]:
    return [r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]


@pytest.mark.parametrize(
    "model, task",
    [("bert", "classification"), ("llama", "causal-lm"), ("gpt2", "instruction"), ("llama", "classification")],
)
def test_training_lowers_loss_and_writes_run(make_recipe, model, task):
    raw = make_recipe(model, task)
    recipe = validate_recipe(raw)
    result = train(recipe)
    run = Path(raw["output_dir"])
    losses = _losses(run)
    assert losses[-1] < losses[0], losses
    for name in ("recipe.yaml", "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.jsonl", "loss.png", "eval.json"):
        assert (run / name).is_file(), name
    config = json.loads((run / "adapter/adapter_config.json").read_text())
    assert config["adapter"]["type"] == "lora" and config["targets"]
    assert result.evaluation["tuned"]["loss"] < result.evaluation["base"]["loss"]
    if task == "classification":
        assert result.evaluation["tuned"]["accuracy"] > 0.6


@pytest.mark.parametrize("kind", ["trac", "loretta"])
def test_bf16_mixed_precision_trains_the_tensor_train_adapters(make_recipe, kind):
    """mixed_precision auto means bf16 on most GPUs; CPU autocast runs the same code path."""
    raw = make_recipe("llama", "causal-lm", type=kind)
    raw["adapter"].pop("alpha")
    raw["training"].update(mixed_precision="bf16", max_steps=30)
    result = train(validate_recipe(raw))
    state = load_file(str(Path(raw["output_dir"]) / "adapter/adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in state.values())  # adapters stay fp32 under autocast
    assert result.evaluation["tuned"]["loss"] < result.evaluation["base"]["loss"]


def test_eval_reloads_the_same_adapter(make_recipe):
    raw = make_recipe("bert", "classification", dropout=0.1)
    result = train(validate_recipe(raw))
    report = evaluate_run(raw["output_dir"])
    for row in ("base", "head only", "tuned"):
        for key, value in result.evaluation[row].items():
            assert report["metrics"][row][key] == pytest.approx(value, rel=1e-5, abs=1e-6)


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(make_recipe, tmp_path):
    """Stop at step 4 of 9 (checkpoint), resume, compare with one straight run; dropout and
    gradient accumulation make the RNG and data position matter."""
    def recipe(out: str):
        raw = make_recipe("bert", "classification", dropout=0.2)
        raw["training"].update(max_steps=9, gradient_accumulation_steps=2, save_every=100, lr_scheduler="cosine", warmup_steps=2)
        raw["output_dir"] = str(tmp_path / out)
        return validate_recipe(raw)

    train(recipe("straight"))
    partial = train(recipe("resumed"), stop_after=4)
    assert partial.steps == 4 and not (tmp_path / "resumed/adapter").exists()
    assert [p.name for p in checkpoint_dirs(tmp_path / "resumed")] == ["step-000004"]
    train(recipe("resumed"), resume="auto")
    assert_same_adapters(tmp_path / "straight", tmp_path / "resumed", rtol=1e-6, atol=1e-7)
    assert not list((tmp_path / "resumed/checkpoints").glob(".*")), "temporary checkpoint directories left behind"


def test_existing_run_is_not_clobbered(make_recipe):
    raw = make_recipe("bert", "classification")
    raw["training"]["max_steps"] = 2
    train(validate_recipe(raw))
    with pytest.raises(RecipeError, match="already holds a run"):
        train(validate_recipe(raw))
    train(validate_recipe(raw), overwrite=True)


def test_resume_auto_on_a_finished_run_without_checkpoints_is_refused(make_recipe):
    raw = make_recipe("bert", "classification")
    raw["training"]["max_steps"] = 2
    train(validate_recipe(raw))
    with pytest.raises(RecipeError, match="finished run"):
        train(validate_recipe(raw), resume="auto")


def test_checkpoint_rotation(make_recipe):
    raw = make_recipe("bert", "classification")
    raw["training"].update(max_steps=6, save_every=2, save_total_limit=2)
    train(validate_recipe(raw))
    assert [p.name for p in checkpoint_dirs(Path(raw["output_dir"]))] == ["step-000004", "step-000006"]


def test_batch_stream_is_a_deterministic_sharded_permutation():
    stream = BatchStream(10, seed=3)
    one_epoch = [i for m in range(5) for i in stream.indices(m, 2, world=1, rank=0)]
    assert sorted(one_epoch) == list(range(10))
    # Two ranks split each global batch; together they cover what one process would see.
    two = [i for m in range(5) for r in range(2) for i in BatchStream(10, 3).indices(m, 1, world=2, rank=r)]
    assert two == one_epoch


def test_instruction_masks_the_prompt(make_recipe, tiny_models):
    recipe = validate_recipe(make_recipe("gpt2", "instruction"))
    tokenizer = load_tokenizer(str(tiny_models["gpt2"]))
    data = prepare_data(recipe.data, "instruction", tokenizer)
    example = data.train[0]
    n_masked = sum(1 for label in example["labels"] if label == IGNORE_INDEX)
    decoded_target = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])
    assert n_masked > 0
    assert decoded_target.startswith("the") and "<assistant>" not in decoded_target and "what" not in decoded_target


def test_split_is_deterministic_and_disjoint(make_recipe, tiny_models):
    recipe = validate_recipe(make_recipe("bert", "classification"))
    tokenizer = load_tokenizer(str(tiny_models["bert"]))
    a = prepare_data(recipe.data, "classification", tokenizer)
    b = prepare_data(recipe.data, "classification", tokenizer)
    assert a.eval == b.eval and len(a.eval) == 24 and len(a.train) == 216
    assert a.label_names == ["neg", "pos", "tech"]


@pytest.mark.parametrize("kind, hf_name", [("linear", "linear"), ("cosine", "cosine"), ("constant", "constant_with_warmup")])
@pytest.mark.parametrize("warmup, total", [(0, 50), (7, 50), (10, 10)])
def test_lr_schedules_equal_transformers(kind, hf_name, warmup, total):
    from transformers import get_scheduler

    from tnlora_cli.training.schedule import lr_schedule

    ours_opt, theirs_opt = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1) for _ in range(2))
    ours = torch.optim.lr_scheduler.LambdaLR(ours_opt, lr_schedule(kind, warmup, total))
    theirs = get_scheduler(hf_name, theirs_opt, num_warmup_steps=warmup, num_training_steps=total)
    for _ in range(total + 2):
        assert ours.get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], abs=1e-12)
        for stepper in (ours_opt, theirs_opt, ours, theirs):
            stepper.step()


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_held_out_metrics_do_not_depend_on_batching_or_order(task):
    """Length-sorted batches with padding give the metrics of one example at a time, in any order."""
    from conftest import _tiny_configs
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tnlora_cli.evaluation.metrics import evaluate_examples

    config = _tiny_configs(64)["bert" if task == "classification" else "llama"]
    if task == "classification":
        config.num_labels = 3
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    rng = random.Random(0)
    examples = []
    for i in range(11):
        ids = [rng.randrange(5, 64) for _ in range(rng.randrange(3, 40))]
        labels = i % 3 if task == "classification" else [-100] * (len(ids) // 2) + ids[len(ids) // 2 :]
        examples.append({"input_ids": ids, "labels": labels})
    one_by_one = evaluate_examples(model, examples, task, 0, batch_size=1)
    shuffled = examples[::-1]
    batched = evaluate_examples(model, shuffled, task, 0, batch_size=4)
    assert batched.keys() == one_by_one.keys()
    for key, value in one_by_one.items():
        assert batched[key] == pytest.approx(value, rel=1e-5), key
    if task == "classification":  # a tiny random model: not every prediction is the same class
        assert 0 < one_by_one["accuracy"] < 1

"""Recipe validation: strict keys at every depth, clear messages, exit code 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_recipe

from tnlora_cli.errors import RecipeError
from tnlora_cli.recipe.load import apply_overrides, load_recipe, validate_recipe


def _errors_of(raw: dict) -> str:
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw)
    return str(info.value)


def test_valid_recipe_and_defaults(make_recipe):
    recipe = validate_recipe(make_recipe())
    assert recipe.adapter.type == "lora" and recipe.adapter.r == 4
    assert recipe.training.lr_scheduler == "linear" and recipe.trust_remote_code is False


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r["training"].update(max_stpes=3), ["training.max_stpes: unknown key", "did you mean 'max_steps'"]),
        (lambda r: r["adapter"].update(alpah=3), ["adapter.alpah: unknown key", "did you mean 'alpha'"]),
        (lambda r: r.update(modle="x"), ["modle: unknown key", "did you mean 'model'"]),
        (lambda r: r["adapter"].update(type="lorra"), ["adapter.type: unknown adapter type 'lorra'", "did you mean 'lora'"]),
        (lambda r: r["adapter"].update(r=0), ["adapter.r: Input should be greater than 0"]),
        (lambda r: r["training"].update(lr_scheduler="cosin"), ["training.lr_scheduler", "'linear', 'cosine' or 'constant'"]),
        (lambda r: r["data"].pop("label_column"), ["data.label_column: a classification task needs a label column"]),
        (lambda r: r.pop("task"), ["task: required key is missing"]),
        (lambda r: r["training"].update(warmup_steps=100), ["training.warmup_steps"]),
        (lambda r: r["adapter"].update(target_modules=5), ["adapter.target_modules"]),
    ],
)
def test_recipe_errors_name_the_path(make_recipe, mutate, expected):
    raw = make_recipe()
    mutate(raw)
    message = _errors_of(raw)
    for fragment in expected:
        assert fragment in message


def test_overrides_set_nested_keys_and_parse_yaml(make_recipe):
    raw = make_recipe()
    apply_overrides(raw, ["training.max_steps=7", "adapter.target_modules=[query]", "adapter.dropout=0.1"])
    recipe = validate_recipe(raw)
    assert recipe.training.max_steps == 7 and recipe.adapter.target_modules == ["query"] and recipe.adapter.dropout == 0.1
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        apply_overrides(raw, ["training.max_steps"])
    raw = make_recipe()
    apply_overrides(raw, ["training.max_setps=7"])
    assert "did you mean 'max_steps'" in _errors_of(raw)


def test_a_bare_yaml_no_is_the_mixed_precision_value_no(make_recipe, tmp_path):
    # YAML 1.1 reads `mixed_precision: no` (and --set training.mixed_precision=no) as false.
    path = write_recipe(tmp_path / "r.yaml", make_recipe())
    assert load_recipe(path, ["training.mixed_precision=no"]).training.mixed_precision == "no"


def test_yaml_syntax_error_has_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: x\ntask: [unclosed\n")
    with pytest.raises(RecipeError, match="line"):
        load_recipe(path)


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tnlora_cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda r: r["training"].update(max_stpes=3), "did you mean 'max_steps'"),
        (lambda r: r.update(model="/nonexistent/model"), "does not exist"),
        (lambda r: r.update(model="some-org/some-model"), "could not be fetched"),
        (lambda r: r["adapter"].update(target_modules=["qury"]), "query"),
        (lambda r: r["adapter"].update(type="tucker"), "unknown adapter type"),
        (lambda r: r["data"].update(label_column="missing_col"), "column 'missing_col'"),
        (lambda r: r["data"].update(train="nope.jsonl"), "does not exist"),
    ],
)
def test_cli_user_errors_exit_2_without_traceback_or_output(make_recipe, tmp_path, mutate, fragment):
    from typer.testing import CliRunner

    from tnlora_cli.cli import app

    raw = make_recipe()
    mutate(raw)
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert fragment in result.output
    assert not Path(raw["output_dir"]).exists()


def test_cli_subprocess_error_has_no_traceback(make_recipe, tmp_path):
    raw = make_recipe()
    raw["adapter"]["rr"] = 3
    result = _cli("train", str(write_recipe(tmp_path / "r.yaml", raw)))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert "adapter.rr: unknown key" in result.stderr and "did you mean 'r'" in result.stderr


def test_cli_help_lists_commands():
    result = _cli("--help")
    assert result.returncode == 0
    for command in ("train", "eval", "merge", "export", "count-params", "inspect-rank"):
        assert command in result.stdout
    assert _cli("--version").stdout.startswith("tnlora ")
    assert "--resume" in _cli("train", "--help").stdout

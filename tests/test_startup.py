"""Start-up: recipes and options are checked before torch, transformers or DeepSpeed load, so a
mistake is refused in about a second; DeepSpeed loads only for a ZeRO engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_recipe

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "deepspeed", "accelerate", "datasets")

# Runs the CLI in this process, then reports its exit code, stderr and which heavy modules loaded.
PROBE = """
import contextlib, io, json, sys
err = io.StringIO()
sys.argv = ["tnlora", *json.loads(sys.argv[1])]
from tnlora_cli.cli import main
with contextlib.redirect_stderr(err):
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "stderr": err.getvalue(), "loaded": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def _probe(*argv: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_importing_the_cli_loads_no_heavy_library():
    code = f"import sys, tnlora_cli.cli; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_checking_a_recipe_in_python_loads_no_heavy_library():
    code = (
        "import sys; from tnlora_cli import TeraConfig, load_recipe; from tnlora_cli.adapters import CONFIGS; "
        "r = load_recipe('recipes/minilm_tera.yaml'); assert isinstance(r.adapter, TeraConfig) and CONFIGS['tera'] is TeraConfig; "
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "{recipe}", "--set", "epochz=3"], r"epochz: unknown key"),
        (["prepare", "{recipe}", "--set", "training.learning_rate=-1"], r"training.learning_rate"),
        (["train", "{recipe}", "--set", "adapter.type=tera"], r"adapter\.(r|alpha), adapter\.(r|alpha): unknown keys for adapter type tera"),
        (["train", "{recipe}", "--unset", "adapter.rank"], r"--unset adapter.rank"),
        (["count-params", "{recipe}", "--set", "adapter.type=lorax"], r"unknown adapter type"),
        (["eval", "runs/none", "--batch-size", "0"], r"--batch-size"),
        (["train", "{recipe}", "--no-such-option"], r"no such option"),
    ],
    ids=["unknown key", "bad value", "adapter switched", "unset missing key", "count-params", "option range", "unknown option"],
)
def test_a_recipe_or_option_error_loads_no_heavy_library(argv, message, make_recipe, tmp_path):
    import re

    recipe = write_recipe(tmp_path / "r.yaml", make_recipe())
    result = _probe(*(a.format(recipe=recipe) for a in argv))
    assert result["code"] == 2, result
    assert re.search(message, result["stderr"]), result["stderr"]
    assert result["loaded"] == [], f"loaded before the error: {result['loaded']}"


def test_training_on_one_cpu_never_loads_deepspeed(make_recipe, tmp_path):
    """DeepSpeed prints 'Setting accelerator to CPU' when imported: only a ZeRO engine may import it."""
    raw = make_recipe()
    raw["training"].update(max_steps=2, log_every=1)
    raw["data"].update(max_train_samples=16, max_eval_samples=8)
    result = _probe("train", str(write_recipe(tmp_path / "r.yaml", raw)))
    assert result["code"] == 0, result["stderr"]
    assert "torch" in result["loaded"] and "deepspeed" not in result["loaded"], result["loaded"]
    assert "Setting accelerator" not in result["stderr"]

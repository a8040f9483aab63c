"""`tnlora schema`: a valid JSON Schema from the recipe models that accepts every shipped
recipe, and the README's recipe reference generated from it (fails when they drift apart)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tnlora_cli.adapters import REGISTRY
from tnlora_cli.recipe.load import validate_recipe
from tnlora_cli.recipe.schema import README, readme_with_reference, recipe_json_schema, reference_rows

jsonschema = pytest.importorskip("jsonschema")
ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def _validator():
    schema = recipe_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _as_json(raw: dict) -> dict:
    return json.loads(json.dumps(raw))  # YAML's integer mapping keys ({768: [...]}) become strings, as in JSON


def test_schema_is_valid_json_schema_with_every_adapter_section():
    schema = recipe_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"].endswith("2020-12/schema")
    assert set(schema["properties"]["adapter"]["discriminator"]["mapping"]) == set(REGISTRY)
    lora = schema["$defs"]["LoraConfig"]["properties"]
    assert lora["r"]["exclusiveMinimum"] == 0 and lora["r"]["default"] == 8 and lora["r"]["description"]
    assert schema["$defs"]["TrainingConfig"]["properties"]["report_to"]["default"] == []


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_schema_validates_every_shipped_recipe(path):
    raw = yaml.safe_load(path.read_text())
    _validator().validate(_as_json(raw))
    validate_recipe(raw)  # and tnlora agrees


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r["adapter"].update(r=0),
        lambda r: r["adapter"].update(alpah=3),
        lambda r: r["adapter"].pop("type"),
        lambda r: r["training"].update(lr_scheduler="cosin"),
        lambda r: r["training"].update(report_to=["tensorbord"]),
        lambda r: r.update(model_attn_implementation="flash"),
    ],
)
def test_schema_rejects_what_tnlora_rejects(mutate):
    raw = yaml.safe_load((ROOT / "recipes/quickstart.yaml").read_text())
    raw.setdefault("training", {})
    mutate(raw)
    assert not _validator().is_valid(_as_json(raw))


def test_readme_reference_is_generated_from_the_schema():
    text = README.read_text()
    assert readme_with_reference(text) == text, "README recipe reference is out of date: run python -m tnlora_cli.recipe.schema --readme"
    keys = {row[0].strip("`") for row in reference_rows()}
    for name, cls in REGISTRY.items():
        for field in cls.config_class.model_fields:
            assert f"adapter.{field}" in keys, (name, field)
    assert {"training.epochs", "training.warmup_ratio", "training.report_to", "model_attn_implementation"} <= keys


def test_cli_schema_prints_json_and_yaml():
    from typer.testing import CliRunner

    from tnlora_cli.cli import app

    expected = json.loads(json.dumps(recipe_json_schema()))
    as_json = CliRunner().invoke(app, ["schema"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == expected
    as_yaml = CliRunner().invoke(app, ["schema", "--format", "yaml"])
    assert as_yaml.exit_code == 0 and yaml.safe_load(as_yaml.stdout) == expected
    assert CliRunner().invoke(app, ["schema", "--format", "xml"]).exit_code == 2


def test_count_params_help_shows_the_bracketed_example_verbatim():
    from typer.testing import CliRunner

    from tnlora_cli.cli import app

    result = CliRunner().invoke(app, ["count-params", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--set adapter.target_modules=[q_proj,v_proj]" in result.stdout
    assert "\\[" not in result.stdout

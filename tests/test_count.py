"""count-params reproduces the papers' parameter counts (methods.md), in the library and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tnlora_cli.cli import app
from tnlora_cli.count import count_params
from tnlora_cli.model.meta import shipped_configs
from tnlora_cli.recipe.load import load_recipe, validate_recipe

ROOT = Path(__file__).resolve().parents[1]

#: (paper recipe, adapter trainable parameters, source)
PAPER_COUNTS = [
    ("trac_roberta_base_glue.yaml", 26_304, "TRAC Table 1"),
    ("trac_llama2_7b.yaml", 106_496, "TRAC App. E"),
    ("trac_llama2_13b.yaml", 166_400, "TRAC App. E"),
    ("trac_roberta_large_glue.yaml", 40_704, "TRAC Table 3"),
    ("trac_gpt2_medium_e2e.yaml", 54_144, "TRAC Table 5, q/v slices of c_attn"),
    ("trac_gpt2_large_e2e.yaml", 98_880, "TRAC Table 5, q/v slices of c_attn"),
    ("loretta_all_trainable_roberta_base.yaml", 411_648, "TRAC Table 1, All Trainable"),
    ("loretta_roberta_base.yaml", 27_840, "LoRETTA-rep, r=8, t=5"),
    ("vera_roberta_base.yaml", 43_008, "TRAC Table 1, VeRA r=1024"),
    ("lora_gpt2_head.yaml", 51_025, "TensorGuide Table 3, LoRA r=1 on lm_head"),
    ("tensorguide_qd_resnet18.yaml", 1_140, "TensorGuide Table 1 (TT part)"),
    ("tensorguide_gpt2_head.yaml", 33_664, "TensorGuide Table 3, last row (paper 34,164: +500 unexplained)"),
    ("tera_llama2_7b.yaml", 264_192, "TeRA Table 2 (0.0039%)"),
    ("trac_roberta_base_shared_tt.yaml", 24_576, "TRAC ablation Shared TT: no controllers"),
    ("trac_roberta_base_all_trainable.yaml", 411_648, "TRAC Table 1, All Trainable, as TRAC's core structure"),
    ("tera_llama2_7b_iden.yaml", 264_192, "TeRA_iden (Table 8)"),
    ("tera_roberta_base_unique.yaml", 24 * 56, "TeRA_unique (Table 8), per-layer frozen networks"),
    ("tensorguide_gpt2_head_algorithm1.yaml", 33_664, "TensorGuide Algorithm 1 on Table 3's last row"),
    ("loretta_official_roberta_large.yaml", 61_440, "LoRETTA official shape table, r=8, t=5"),
    ("loretta_official_llama2_7b.yaml", 249_856, "LoRETTA official large-model script, r=8, t=8"),
    # images:
    ("trac_vit_base_cifar10.yaml", 26_304, "TRAC Table 8, ViT-Base: 0.026M"),
    ("trac_vit_large_cifar10.yaml", 55_808, "TRAC Table 8, ViT-Large: 0.056M"),
    ("lora_vit_base_cifar10.yaml", 294_912, "TRAC Table 8, LoRA r=8 ViT-Base: 0.295M"),
    ("lora_vit_large_cifar10.yaml", 786_432, "TRAC Table 8, LoRA r=8 ViT-Large: 0.786M"),
    ("loretta_vit_base_cifar10.yaml", 67_584, "TRAC Table 8, LoRETTA ViT-Base: 0.068M"),
    ("loretta_vit_large_cifar10.yaml", 159_744, "TRAC Table 8, LoRETTA ViT-Large: 0.154M (config not given; TT rank 8)"),
    ("tensorguide_qd_resnet18_m2048.yaml", 1_156, "TensorGuide Table 1, M=2048 (TT part; 4,292 with the stem)"),
    ("tensorguide_qd_resnet18_m4096.yaml", 1_220, "TensorGuide Table 1, M=4096 (TT part; 4,356 with the stem)"),
]


@pytest.mark.parametrize("recipe, expected, source", PAPER_COUNTS, ids=[c[0] for c in PAPER_COUNTS])
def test_paper_counts(recipe, expected, source):
    report = count_params(load_recipe(ROOT / "recipes/paper" / recipe))
    assert report.adapter_total.trainable == expected, source


def test_every_paper_recipe_is_checked():
    assert {p.name for p in (ROOT / "recipes/paper").glob("*.yaml")} == {c[0] for c in PAPER_COUNTS}


def test_shipped_configs_have_the_papers_base_sizes():
    sizes = {"llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248}
    for name, expected in sizes.items():
        raw = {"model": name, "task": "causal-lm", "adapter": {"type": "lora", "target_modules": ["q_proj"]}, "data": {"train": "-"}}
        assert count_params(validate_recipe(raw)).base_parameters == expected
    assert {"roberta-base", "roberta-large", "gpt2-medium", "gpt2-large", "llama-2-7b", "llama-2-13b", "llama-3-8b"} <= set(shipped_configs())


def test_tera_percentages_and_llama3_gqa_shapes():
    raw = {"model": "llama-3-8b", "task": "causal-lm", "data": {"train": "-"},
           "adapter": {"type": "tera", "target_modules": ["q_proj", "v_proj"], "indim": 4096, "outdim": 4}}
    report = count_params(validate_recipe(raw))
    # q: 4096 + 6 modes of 4 (4096 = 4^6); v (4096 -> 1024): 4096 + 5 modes of 4.
    assert report.adapter_total.trainable == 32 * (4096 + 24 + 4096 + 20) == 263_552
    assert f"{report.trainable_percent:.4f}" == "0.0033"


def test_cli_count_params_table_and_json():
    runner = CliRunner()
    args = ["count-params", "--model", "llama-2-7b", "--set", "adapter.type=tera", "--set", "adapter.target_modules=[q_proj,v_proj]",
            "--set", "adapter.indim=4096", "--set", "adapter.outdim=8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "264,192" in result.output and "0.0039%" in result.output
    result = runner.invoke(app, [*args, "--json"])
    data = json.loads(result.stdout)
    assert data["adapter_total"]["trainable"] == 264_192 and data["base_parameters"] == 6_738_415_616
    result = runner.invoke(app, ["count-params", str(ROOT / "recipes/paper/trac_roberta_base_glue.yaml")])
    assert result.exit_code == 0 and "26,304" in result.output


def test_cli_count_params_bad_shape_is_a_recipe_error():
    result = CliRunner().invoke(app, ["count-params", "--model", "llama-2-7b", "--set", "adapter.type=tera",
                                      "--set", "adapter.target_modules=[q_proj]", "--set", "adapter.outdim=3000"])
    assert result.exit_code == 2 and "does not fold" in result.output


def test_vit_paper_recipes_print_trac_table_8():
    """Table 8 counts the adapter only (the classification head, trained by every method, is
    excluded): TRAC 0.026M / 0.056M, LoRA r=8 0.295M / 0.786M."""
    runner = CliRunner()
    for recipe, millions in (("trac_vit_base_cifar10.yaml", "0.026"), ("trac_vit_large_cifar10.yaml", "0.056"),
                             ("lora_vit_base_cifar10.yaml", "0.295"), ("lora_vit_large_cifar10.yaml", "0.786"),
                             ("loretta_vit_base_cifar10.yaml", "0.068")):
        result = runner.invoke(app, ["count-params", str(ROOT / "recipes/paper" / recipe), "--json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert f"{data['adapter_total']['trainable'] / 1e6:.3f}" == millions, recipe
        assert data["head"]["trainable"] == (768 if "base" in recipe else 1024) * 10 + 10  # CIFAR-10's head, counted apart
    assert {"vit-base-patch16-224-in21k", "vit-large-patch16-224-in21k"} <= set(shipped_configs())

"""Slices of fused projections (GPT-2's c_attn.q|k|v, qkv_proj, gate_up_proj, recipe splits) as
targets, through every verb: train, count-params, --dry-run, merge, export --as-lora, inspect-rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tnlora_cli.adapters import REGISTRY
from tnlora_cli.errors import RecipeError, TargetError
from tnlora_cli.model.inject import adapted_layers, inject_adapter
from tnlora_cli.model.merging import merge_into_base
from tnlora_cli.recipe.load import validate_recipe


def _gpt2_recipe(make_recipe, kind: str, **settings) -> dict:
    raw = make_recipe("gpt2", "causal-lm")
    raw["adapter"] = {"type": kind, "target_modules": ["c_attn.q", "c_attn.v"], "r": 4, **settings}
    raw["training"]["max_steps"] = 12
    return raw


@pytest.mark.parametrize("kind", ["lora", "trac"])
def test_gpt2_q_v_slices_train_merge_and_reload_with_plain_transformers(make_recipe, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    from tnlora_cli.data.examples import collate
    from tnlora_cli.merge import merge_run
    from tnlora_cli.model.build import load_run
    from tnlora_cli.train import train

    raw = _gpt2_recipe(make_recipe, kind)
    result = train(validate_recipe(raw))
    assert result.evaluation["tuned"]["loss"] < result.evaluation["base"]["loss"]
    report = merge_run(raw["output_dir"], tmp_path / "merged")
    assert report.merged_layers == 2 and report.max_abs_diff <= report.tolerance
    base = AutoModelForCausalLM.from_pretrained(raw["model"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    n = base.config.n_embd
    for i in range(base.config.n_layer):
        w0, w = base.transformer.h[i].attn.c_attn.weight, merged.transformer.h[i].attn.c_attn.weight
        assert torch.equal(w[:, n : 2 * n], w0[:, n : 2 * n])  # k: untouched, bit for bit
        assert not torch.equal(w[:, :n], w0[:, :n]) and not torch.equal(w[:, 2 * n :], w0[:, 2 * n :])
        assert torch.equal(merged.transformer.h[i].attn.c_attn.bias, base.transformer.h[i].attn.c_attn.bias)
    run = load_run(raw["output_dir"])
    run.load_weights()
    batch = collate(run.prepared.data.eval[:4], run.prepared.tokenizer.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        expected = run.prepared.model.eval()(**batch).logits
        got = merged(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_gpt2_slices_count_dry_run_ranks_and_export(make_recipe, tmp_path):
    pytest.importorskip("peft")
    from test_export import _adapter_logits_and_peft

    from tnlora_cli.count import count_params
    from tnlora_cli.dryrun import dry_run
    from tnlora_cli.export import export_as_lora
    from tnlora_cli.ranks import inspect_run
    from tnlora_cli.train import train

    raw = _gpt2_recipe(make_recipe, "trac")
    recipe = validate_recipe(raw)
    counts = count_params(recipe)
    assert set(counts.roles) >= {"attn.c_attn.q", "attn.c_attn.v"}
    units = [unit for _, unit in adapted_layers(_inject_gpt2(raw))]
    assert len(units) == 4 and all((unit.adapter.in_features, unit.adapter.out_features) == (32, 32) for unit in units)
    assert set(dry_run(recipe, with_samples=False).modules) == {"attn.c_attn.q", "attn.c_attn.v"}
    train(recipe)
    ranks = inspect_run(raw["output_dir"])
    assert {row["role"] for row in ranks["layers"]} == {"attn.c_attn.q", "attn.c_attn.v"}
    assert all(row["shape"] == (32, 32) and 0 < row["rank"] <= 4 for row in ranks["layers"])
    report = export_as_lora(raw["output_dir"], tmp_path / "lora", rank=8)  # q and v: rank 4 each
    assert [row["name"].rsplit(".", 1)[1] for row in report.layers] == ["c_attn", "c_attn"]
    assert all(row["relative_error"] < 1e-6 for row in report.layers)
    expected, got = _adapter_logits_and_peft(Path(raw["output_dir"]), tmp_path / "lora")
    assert (got - expected).abs().max().item() <= 1e-4


def _inject_gpt2(raw):
    from tnlora_cli.model.meta import build_on_meta

    recipe = validate_recipe(raw)
    model = build_on_meta(recipe)
    inject_adapter(model, recipe.adapter)
    return model


def test_phi3_qkv_and_gate_up_slices_merge_into_their_rows():
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)
    model = Phi3ForCausalLM(config).eval()
    attn, mlp = model.model.layers[0].self_attn.qkv_proj, model.model.layers[0].mlp.gate_up_proj
    w_qkv, w_gu = attn.weight.detach().clone(), mlp.weight.detach().clone()
    inject_adapter(model, REGISTRY["lora"].config_class(target_modules=["qkv_proj.q", "qkv_proj.v", "gate_up_proj.up"], r=2))
    dims = {layer.adapter.role: layer.adapter.out_features for _, layer in adapted_layers(model)}
    assert dims == {"self_attn.qkv_proj.q": 32, "self_attn.qkv_proj.v": 16, "mlp.gate_up_proj.up": 48}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    x = torch.randint(1, 64, (2, 6))
    with torch.no_grad():
        expected = model(x).logits
        assert merge_into_base(model) == 2
        torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=1e-5)
    qkv, gu = model.model.layers[0].self_attn.qkv_proj.weight, model.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(qkv[32:48], w_qkv[32:48]) and not torch.equal(qkv[:32], w_qkv[:32]) and not torch.equal(qkv[48:], w_qkv[48:])
    assert torch.equal(gu[:48], w_gu[:48]) and not torch.equal(gu[48:], w_gu[48:])


class Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"query_key_value": nn.Linear(8, 20)}) for _ in range(2))

    def forward(self, x):
        return sum(b["query_key_value"](x) for b in self.blocks)


def test_recipe_split_of_another_fused_layer():
    model = Fused()
    w0 = model.blocks[0]["query_key_value"].weight.detach().clone()
    config = REGISTRY["lora"].config_class(target_modules=["query_key_value.k"], r=2, fused_splits={"query_key_value": {"q": 8, "k": 6, "v": 6}})
    report = inject_adapter(model, config)
    assert report.roles == {"query_key_value.k": ["blocks.0.query_key_value.k", "blocks.1.query_key_value.k"]}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    x = torch.randn(3, 8)
    delta = model.blocks[0]["query_key_value"].k.adapter.delta_weight()
    out = model.blocks[0]["query_key_value"](x)
    torch.testing.assert_close(out[:, 8:14], x @ (w0[8:14] + delta).T + model.blocks[0]["query_key_value"].bias[8:14])
    torch.testing.assert_close(out[:, :8], x @ w0[:8].T + model.blocks[0]["query_key_value"].bias[:8])


@pytest.mark.parametrize(
    "settings, error, fragment",
    [
        ({"target_modules": ["query_key_value.k"], "fused_splits": {"query_key_value": {"q": 8, "k": 8}}}, RecipeError, "add up to 16"),
        ({"target_modules": ["query_key_value.k"], "fused_splits": {"qkv": {"q": 20}}}, RecipeError, "names no linear layer"),
        ({"target_modules": ["query_key_value", "query_key_value.k"], "fused_splits": {"query_key_value": {"q": 8, "k": 12}}}, TargetError, "whole and by its slice"),
    ],
)
def test_bad_splits_and_overlaps_are_one_clear_error(settings, error, fragment):
    with pytest.raises(error) as info:
        inject_adapter(Fused(), REGISTRY["lora"].config_class(r=2, **settings))
    assert fragment in info.value.message

"""Fidelity to the papers and their official code (issue 12): each test pins one formula,
sharing rule or validation the audit found wrong, against its reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tnlora_cli.adapters import REGISTRY
from tnlora_cli.errors import RecipeError
from tnlora_cli.model.inject import adapted_layers, inject_adapter
from tnlora_cli.model.state import SHARED_ATTR
from tnlora_cli.recipe.load import validate_recipe


class Mlp(nn.Module):
    def __init__(self, n_in: int = 64, n_out: int = 48) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(n_in, n_out), nn.Linear(n_in, n_out)])

    def forward(self, x):
        return self.layers[0](x) + self.layers[1](x)


# ------------------------------------------------------------------ VeRA projections


def test_vera_projections_follow_the_reference_kaiming_uniform():
    """Reference: Kaiming-uniform with gain sqrt(2), bound sqrt(6 / fan_in), fan_in = the
    tensor's second dimension (max_in for A (r, max_in), r for B (max_out, r))."""
    model = Mlp(n_in=512, n_out=384)
    inject_adapter(model, REGISTRY["vera"].config_class(target_modules=["0", "1"], r=256))
    store = getattr(model, SHARED_ATTR).tensors
    for key, fan_in in (("vera_A", 512), ("vera_B", 256)):
        t = store[key]
        bound = math.sqrt(6.0 / fan_in)
        assert t.abs().max() <= bound
        assert t.abs().max() > 0.99 * bound, key  # 10^5 uniform draws reach the bound
        assert t.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.02), key


# ------------------------------------------------------------------------ roles


def _tiny_recipe(make_recipe, kind: str, targets, model: str = "bert", task: str = "classification", **settings) -> dict:
    raw = make_recipe(model, task)
    raw["adapter"] = {"type": kind, "target_modules": targets, **settings}
    return raw


def test_roles_are_paths_without_the_layer_index_and_trac_shares_per_role(make_recipe):
    """BERT's attention-output, FFN-up and FFN-down layers are all `dense`: three matrix
    types, so TRAC gives each its own shared cores (paper: one pair per type of matrix)."""
    from tnlora_cli.count import count_params
    from tnlora_cli.dryrun import dry_run
    from tnlora_cli.model.meta import build_on_meta

    recipe = validate_recipe(_tiny_recipe(make_recipe, "trac", ["dense"], r=4))
    model = build_on_meta(recipe)
    report = count_params(recipe, model=model)
    kinds = ("attention.output.dense", "intermediate.dense", "output.dense")
    assert set(kinds) <= set(report.roles)
    layers = dict(adapted_layers(model))
    by_kind = {k: [layers[f"bert.encoder.layer.{i}.{k}"].adapter for i in (0, 1)] for k in kinds}
    for kind, (first, second) in by_kind.items():
        assert first.role == kind
        for name in ("core2_a", "core3_a", "core2_b", "core3_b"):
            assert first.shared_tensor(name) is second.shared_tensor(name), (kind, name)
    for k1 in kinds:
        for k2 in kinds:
            if k1 < k2:
                for name in ("core2_a", "core3_a", "core2_b", "core3_b"):
                    assert by_kind[k1][0].shared_tensor(name) is not by_kind[k2][0].shared_tensor(name), (k1, k2, name)
    assert set(kinds) <= set(dry_run(recipe, with_samples=False).modules)


def test_roles_are_saved_and_older_adapters_keep_their_attribute_name_roles():
    from tnlora_cli.model.build import saved_roles
    from tnlora_cli.model.targets import module_roles

    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lm_head"]
    assert module_roles(names) == {names[0]: "self_attn.q_proj", names[1]: "self_attn.q_proj", "lm_head": "lm_head"}
    two_stacks = ["encoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.0.SelfAttention.q"]
    assert len(set(module_roles(two_stacks).values())) == 2
    assert saved_roles({"targets": names})[names[0]] == "q_proj"  # written before roles were saved
    assert saved_roles({"targets": names, "roles": {n: "x" for n in names}})[names[0]] == "x"


# ------------------------------------------------------------------ TRAC controllers


def test_trac_zero_controllers_without_activation_are_refused(make_recipe):
    """controller_init zeros with activation none zeroes every shared core's gate, so every
    gradient is exactly zero: refused at validation. With softmax, zeros is the identity."""
    raw = _tiny_recipe(make_recipe, "trac", ["query"], r=4, controller_init="zeros", activation="none")
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw)
    assert "adapter.controller_init" in info.value.message and "zero" in info.value.message
    model = Mlp()
    inject_adapter(model, REGISTRY["trac"].config_class(target_modules=["0", "1"], r=4, controller_init="zeros", activation="softmax"))
    with torch.no_grad():  # leave the zero start, as after a first step
        for p in getattr(model, SHARED_ATTR).parameters():
            p.add_(0.1) if p.requires_grad else None
    model(torch.randn(8, 64)).pow(2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------- TensorGuide boundary ranks


def test_tensorguide_boundary_ranks_above_one_are_a_trace():
    """TensorGuide Table 3's [2, 16, ..., 16, 2]: equal boundary ranks close the train into a
    ring, contracted as a trace over the boundary rank."""
    model = Mlp(n_in=16, n_out=24)
    config = REGISTRY["tensorguide"].config_class(target_modules=["0"], hidden=4, in_modes=[2, 2, 2], ranks=[2, 3, 3, 2], start="paper")
    inject_adapter(model, config)
    ad = model.layers[0].adapter
    with torch.no_grad():
        ad.double()
    z = ad.z.view(2, 2, 2)
    flat = torch.einsum("abc,xaiy,ybjz,zckx->ijk", z, *ad.cores).reshape(-1)  # x: the trace
    w1, w2 = flat[:64].reshape(16, 4), flat[64:].reshape(4, 24)
    torch.testing.assert_close(ad.delta_weight(), (w1 @ w2).T * config.scale)
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(ad(x), x @ ad.delta_weight().T)
    assert ad.cores[0].shape[0] == ad.cores[-1].shape[-1] == 2


def test_tensorguide_unequal_boundary_ranks_are_refused_at_validation():
    with pytest.raises(RecipeError) as info:
        REGISTRY["tensorguide"].config_class(target_modules=["0"], in_modes=[2, 2, 2], ranks=[2, 3, 3, 1])
    assert "adapter.ranks" in info.value.message


# ------------------------------------------------------------------ modules_to_save


def test_modules_to_save_are_never_adapted_nor_counted_twice():
    """RoBERTa's head has its own `dense`: with targets [dense] it is trained in full, not
    adapted, and count-params counts it once, as the head."""
    from tnlora_cli.count import count_params
    from tnlora_cli.model.meta import build_on_meta

    raw = {"model": "roberta-base", "task": "classification", "adapter": {"type": "lora", "target_modules": ["dense"], "r": 4},
           "data": {"train": "-", "label_column": "label"}}
    recipe = validate_recipe(raw)
    model = build_on_meta(recipe)
    report = count_params(recipe, model=model)
    names = [name for name, _ in adapted_layers(model)]
    assert names and not any(n.startswith("classifier") for n in names)
    assert len(names) == 12 * 3  # three dense kinds per layer (no pooler under a classification head)
    assert report.not_adapted == ["classifier.dense"]
    assert report.head.trainable == 768 * 768 + 768 + 768 * 2 + 2
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    assert report.adapter_total.trainable + report.head.trainable == trainable


# ------------------------------------------------------------ TRAC initialisation


def test_trac_tt_normal_uses_the_layers_in_plus_out():
    """Paper eq. 7 and the official code: sigma = sqrt(1 / (in + out)) of the adapted
    layer for every core (per-layer cores of order 3, shared ones of order 4)."""
    from tnlora_cli.tensor.init import make_generator

    model = Mlp(n_in=64, n_out=48)
    config = REGISTRY["trac"].config_class(target_modules=["0"], r=4, seed=7)
    inject_adapter(model, config)
    ad = model.layers[0].adapter
    g = make_generator(7)
    sigma = math.sqrt(1.0 / (64 + 48))
    for factor in ("a", "b"):
        core1 = getattr(ad, f"core1_{factor}")
        expected1 = torch.randn(core1.shape, generator=g) / math.sqrt(core1.shape[2]) * sigma ** (1 / 3)
        core2 = ad.shared_tensor(f"core2_{factor}")
        expected2 = torch.randn(core2.shape, generator=g) / math.sqrt(core2.shape[2]) * sigma ** (1 / 4)
        torch.randn(ad.shared_tensor(f"core3_{factor}").shape, generator=g)
        torch.testing.assert_close(core1.detach(), expected1, rtol=0, atol=0)
        torch.testing.assert_close(core2.detach(), expected2, rtol=0, atol=0)


# --------------------------------------------------------------------- weight decay


def test_weight_decay_exempts_biases_and_norms_as_the_hf_trainer(make_recipe):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tnlora_cli.model.build import prepare
    from tnlora_cli.training.optim import decay_exempt_names, param_groups

    raw = _tiny_recipe(make_recipe, "trac", ["query", "value"], r=4)
    raw["training"]["weight_decay"] = 0.1
    recipe = validate_recipe(raw)
    model = prepare(recipe).model
    decay_of = {id(p): g["weight_decay"] for g in param_groups(model, recipe) for p in g["params"]}
    named = dict(model.named_parameters())
    assert decay_of[id(named["classifier.bias"])] == 0.0
    assert decay_of[id(named["classifier.weight"])] == 0.1
    controllers = [p for n, p in named.items() if "controller_" in n]
    assert controllers and all(decay_of[id(p)] == 0.1 for p in controllers)  # the Trainer decays them too
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    exempt = decay_exempt_names(llama)
    assert {"model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"} <= exempt
    assert not any("proj" in n or "embed" in n for n in exempt)
    bert_exempt = decay_exempt_names(model)
    assert "bert.embeddings.LayerNorm.weight" in bert_exempt and "bert.embeddings.word_embeddings.weight" not in bert_exempt


# ------------------------------------------------------------- save_frozen: false


FROZEN = {"vera": {"r": 16}, "trac": {"r": 4}, "tera": {"outdim": 4}, "tensorguide": {"hidden": 4, "in_modes": [2, 2, 2]}}


def _logits(run_dir):
    from tnlora_cli.data.examples import collate
    from tnlora_cli.model.build import load_run

    run = load_run(run_dir)
    run.load_weights()
    batch = collate(run.prepared.data.eval[:6], run.prepared.tokenizer.pad_token_id)
    batch.pop("labels")
    with torch.no_grad():
        return run.prepared.model.eval()(**batch).logits, run.prepared.model


@pytest.mark.parametrize("kind", sorted(FROZEN))
def test_seed_only_frozen_tensors_round_trip_bit_for_bit(make_recipe, tmp_path, kind):
    """Trained twice with the same seeds, stored and seed-only: same trained tensors, the
    seed-only file holds none of the frozen ones, and both reload to identical outputs."""
    import json

    from safetensors.torch import load_file

    from tnlora_cli.train import train

    runs = {}
    for save_frozen in (True, False):
        raw = _tiny_recipe(make_recipe, kind, ["query", "value"], **FROZEN[kind], save_frozen=save_frozen)
        raw["training"]["max_steps"] = 2
        raw["output_dir"] = str(tmp_path / f"run-{save_frozen}")
        train(validate_recipe(raw))
        runs[save_frozen] = tmp_path / f"run-{save_frozen}"
    stored = load_file(str(runs[True] / "adapter/adapter_model.safetensors"))
    seed_only = load_file(str(runs[False] / "adapter/adapter_model.safetensors"))
    record = json.loads((runs[False] / "adapter/adapter_config.json").read_text())["frozen"]
    assert record["saved"] is False and record["tensors"] > 0 and len(record["checksum"]) == 64
    assert set(seed_only) < set(stored) and len(stored) - len(seed_only) == record["tensors"]
    assert all(torch.equal(seed_only[k], stored[k]) for k in seed_only)
    expected, model_stored = _logits(runs[True])
    got, model_seed_only = _logits(runs[False])
    assert torch.equal(got, expected)
    state_a, state_b = model_stored.state_dict(), model_seed_only.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in stored)  # regenerated == stored


def test_tampered_seed_or_checksum_is_refused(make_recipe, tmp_path):
    import json

    import yaml

    from tnlora_cli.errors import CheckpointError
    from tnlora_cli.model.build import load_run
    from tnlora_cli.train import train

    raw = _tiny_recipe(make_recipe, "vera", ["query", "value"], r=16, save_frozen=False)
    raw["training"]["max_steps"] = 1
    train(validate_recipe(raw))
    run_dir = tmp_path / "run"
    config_path = run_dir / "adapter/adapter_config.json"
    original = config_path.read_text()
    config = json.loads(original)
    config["frozen"]["checksum"] = "0" * 64
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="checksum"):
        load_run(run_dir).load_weights()
    config_path.write_text(original)
    recipe_path = run_dir / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["adapter"]["seed"] = 1
    recipe_path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(CheckpointError, match="seed"):
        load_run(run_dir).load_weights()
    config["frozen"]["seed"] = 1  # a seed changed in both files still fails the checksum
    config["frozen"]["checksum"] = json.loads(original)["frozen"]["checksum"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="checksum"):
        load_run(run_dir).load_weights()


def test_seed_only_checkpoints_resume(make_recipe, tmp_path):
    import json

    from tnlora_cli.run.layout import checkpoint_dirs
    from tnlora_cli.train import train

    raw = _tiny_recipe(make_recipe, "trac", ["query", "value"], r=4, save_frozen=False)
    raw["training"].update(max_steps=3, save_every=100)
    partial = train(validate_recipe(raw), stop_after=2)
    assert partial.steps == 2
    checkpoint = checkpoint_dirs(tmp_path / "run")[-1]
    assert json.loads((checkpoint / "adapter/adapter_config.json").read_text())["frozen"]["saved"] is False
    assert train(validate_recipe(raw), resume="auto").steps == 3


def test_count_params_stores_no_frozen_tensors_when_seed_only(make_recipe):
    from tnlora_cli.count import count_params

    for save_frozen in (True, False):
        total = count_params(validate_recipe(_tiny_recipe(make_recipe, "vera", ["query"], r=16, save_frozen=save_frozen))).adapter_total
        assert total.frozen > 0
        assert total.stored == total.trainable + (total.frozen if save_frozen else 0)

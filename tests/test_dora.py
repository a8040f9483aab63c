"""adapter.use_dora: DoRA's magnitude over every adapter, exact against peft's LoRA + DoRA."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from conftest import ACCELERATE, accelerate_launch, write_recipe
from safetensors.torch import load_file
from test_adapters import SMALL, _recipe
from torch import nn

from tnlora_cli.adapters import REGISTRY, LoraConfig, TensorGuideConfig
from tnlora_cli.adapters.layers import merged_weight
from tnlora_cli.errors import RecipeError
from tnlora_cli.model.inject import adapted_layers, inject_adapter
from tnlora_cli.model.merging import merge_into_base
from tnlora_cli.recipe.load import validate_recipe

ALL = sorted(REGISTRY)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 32)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(32, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.act(self.lin0(x)))


def _twins(dropout: float = 0.0) -> tuple[nn.Module, nn.Module]:
    """tnlora LoRA + DoRA and peft LoRA + DoRA on the same MLP, with the same A, B and a
    magnitude moved away from its start (B random, so ΔW ≠ 0 and the norm matters)."""
    torch.manual_seed(0)
    base = MLP()
    ours = copy.deepcopy(base)
    inject_adapter(ours, LoraConfig(target_modules=["lin0", "lin1"], r=4, alpha=8, dropout=dropout, use_dora=True))
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True)
    )
    for name in ("lin0", "lin1"):
        adapter, layer = ours.get_submodule(name).adapter, theirs.base_model.model.get_submodule(name)
        # peft's magnitude starts at ‖W0‖ like ours (B = 0): the starts agree before any change.
        torch.testing.assert_close(adapter.magnitude, layer.lora_magnitude_vector["default"].weight, rtol=0, atol=0)
        with torch.no_grad():
            adapter.lora_B.normal_(std=0.3)
            adapter.magnitude.mul_(torch.rand_like(adapter.magnitude) + 0.5)
            layer.lora_A["default"].weight.copy_(adapter.lora_A)
            layer.lora_B["default"].weight.copy_(adapter.lora_B)
            layer.lora_magnitude_vector["default"].weight.copy_(adapter.magnitude)
    return ours, theirs


def _pairs(ours: nn.Module, theirs: nn.Module):
    for name in ("lin0", "lin1"):
        adapter, layer = ours.get_submodule(name).adapter, theirs.base_model.model.get_submodule(name)
        yield adapter.lora_A, layer.lora_A["default"].weight
        yield adapter.lora_B, layer.lora_B["default"].weight
        yield adapter.magnitude, layer.lora_magnitude_vector["default"].weight


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_and_gradients_equal_peft(dropout):
    """Same tensors, same result: forward, and the gradients of A, B and m (the norm a
    constant in backward in both). With dropout, each draws one mask per layer from the same
    RNG state, so peft's way of dropping x once for both parts is matched mask for mask."""
    ours, theirs = _twins(dropout)
    ours.train(), theirs.train()
    x = torch.randn(3, 5, 16)
    torch.manual_seed(7)
    y_ours = ours(x)
    torch.manual_seed(7)
    y_theirs = theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-6)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    for mine, ref in _pairs(ours, theirs):
        assert mine.grad is not None and mine.grad.abs().sum() > 0
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-5, atol=1e-5)


def test_norm_is_a_constant_in_backward():
    """Gradients of A and B are those of m/‖W0+ΔW‖ ⊙ (W0 x + ΔW x) with the norm held fixed."""
    ours, _ = _twins()
    layer = ours.lin1
    adapter = layer.adapter
    x = torch.randn(4, 32)
    layer(x).sum().backward()
    with torch.no_grad():
        norm = torch.linalg.vector_norm(layer.base_layer.weight + adapter.delta_weight(), dim=1)
    a = adapter.lora_A.detach().clone().requires_grad_()
    b = adapter.lora_B.detach().clone().requires_grad_()
    weight = (adapter.magnitude.detach() / norm)[:, None] * (layer.base_layer.weight + 2.0 * b @ a)
    (x @ weight.T).sum().backward()
    torch.testing.assert_close(adapter.lora_A.grad, a.grad)
    torch.testing.assert_close(adapter.lora_B.grad, b.grad)


def test_merged_weight_equals_peft_and_reproduces_the_adapter():
    ours, theirs = _twins()
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = ours(x)
        mine = {name: merged_weight(ours.get_submodule(name)) for name in ("lin0", "lin1")}
        merged = theirs.merge_and_unload()
        for name, weight in mine.items():
            torch.testing.assert_close(weight, merged.get_submodule(name).weight, rtol=1e-6, atol=1e-6)
        assert merge_into_base(ours) == 2
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)


def test_weight_change_is_merged_minus_base_and_has_no_thin_factors():
    ours, _ = _twins()
    layer = ours.lin0
    w0 = layer.base_layer.weight.detach()
    torch.testing.assert_close(layer.adapter.weight_change(), merged_weight(layer) - w0)
    assert layer.adapter.weight_change_factors() is None
    assert layer.adapter.low_rank_factors() is not None  # ΔW itself is still B Aᵀ


@pytest.mark.parametrize("kind", ALL)
def test_every_adapter_starts_at_the_base_model(kind):
    """m starts at ‖W0 + ΔW‖: the DoRA layer's output equals the plain adapter's at the start."""
    torch.manual_seed(0)
    base, x = MLP(), torch.randn(2, 16)
    plain, dora = copy.deepcopy(base), copy.deepcopy(base)
    config = REGISTRY[kind].config_class(type=kind, target_modules=["lin0", "lin1"], **SMALL[kind])
    inject_adapter(plain, config)
    inject_adapter(dora, config.model_copy(update={"use_dora": True}))
    magnitudes = [layer.adapter.magnitude for _, layer in adapted_layers(dora)]
    assert [m.shape for m in magnitudes] == [torch.Size([32]), torch.Size([8])]
    assert all(m.requires_grad for m in magnitudes)
    torch.testing.assert_close(dora(x), plain(x), rtol=1e-5, atol=1e-6)


def test_nonlinear_tensorguide_is_refused():
    with pytest.raises(RecipeError, match="nonlinear branch, not a weight update"):
        TensorGuideConfig(target_modules=["q"], activation="relu", use_dora=True)
    TensorGuideConfig(target_modules=["q"], activation="none", use_dora=True)


@pytest.mark.parametrize("setting, env", [("fsdp", {}), ("deepspeed-zero3", {}), ("auto", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})])
def test_sharded_engines_are_refused(monkeypatch, setting, env):
    from tnlora_cli.training.engines import choose_engine

    monkeypatch.setenv("WORLD_SIZE", "2")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RecipeError, match="shards the base weights"):
        choose_engine(setting, quantized=False, weight_decomposed=True)


@pytest.mark.parametrize("model", ["llama", "bert"])
@pytest.mark.parametrize("kind", ALL)
def test_every_adapter_trains_evaluates_merges_and_counts(make_recipe, tmp_path, kind, model):
    from tnlora_cli.count import count_params
    from tnlora_cli.evaluate import evaluate_run
    from tnlora_cli.merge import merge_run
    from tnlora_cli.train import train

    task = "classification" if model == "bert" else "causal-lm"
    raw = _recipe(make_recipe, kind, model, task, use_dora=True)
    raw["training"]["max_steps"] = 4
    raw["training"]["log_every"] = 2
    recipe = validate_recipe(raw)
    result = train(recipe)
    run = Path(raw["output_dir"])
    tensors = load_file(str(next(run.rglob("adapter_model.safetensors"))))
    magnitudes = {k: v for k, v in tensors.items() if k.endswith(".adapter.magnitude")}
    assert len(magnitudes) == 4  # two targets in each of two blocks
    plain = count_params(validate_recipe({**raw, "adapter": {**raw["adapter"], "use_dora": False}}))
    counted = count_params(recipe)
    assert counted.adapter_total.trainable - plain.adapter_total.trainable == sum(v.numel() for v in magnitudes.values())
    assert result.evaluation["tuned"]["loss"] != result.evaluation["base"]["loss"]
    assert evaluate_run(run)["metrics"]["tuned"]["loss"] == pytest.approx(result.evaluation["tuned"]["loss"], rel=1e-6)
    report = merge_run(run, tmp_path / "merged")
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4


def test_export_as_peft_loads_in_peft_as_dora_with_the_same_logits(make_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    from tnlora_cli.export import export_as_peft
    from tnlora_cli.model.build import load_run
    from tnlora_cli.train import train

    raw = make_recipe("llama", "causal-lm", use_dora=True)
    raw["training"]["max_steps"] = 6
    train(validate_recipe(raw))
    out = export_as_peft(raw["output_dir"], tmp_path / "peft")
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    loaded = load_run(raw["output_dir"], data=False)
    loaded.load_weights()
    ids = torch.randint(5, 40, (2, 12))
    with torch.no_grad():
        expected = loaded.prepared.model.eval()(input_ids=ids).logits
        model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(raw["model"]), str(out)).eval()
        assert any("lora_magnitude_vector" in k for k in model.state_dict())
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - model.get_base_model().__class__.from_pretrained(raw["model"])(input_ids=ids).logits).abs().max() > 1e-4


def test_export_as_lora_and_inspect_rank_read_the_rescaled_update(make_recipe, tmp_path):
    """W' − W0 is not of rank r: the export at rank r has an error, at full rank none; the
    rank inspection ranks W' − W0, not ΔW."""
    from tnlora_cli.export import export_as_lora
    from tnlora_cli.ranks import inspect_run
    from tnlora_cli.train import train

    raw = make_recipe("llama", "causal-lm", use_dora=True)
    raw["training"]["max_steps"] = 6
    train(validate_recipe(raw))
    low = export_as_lora(raw["output_dir"], tmp_path / "low", rank=4)
    full = export_as_lora(raw["output_dir"], tmp_path / "full", rank=32)
    assert max(layer["relative_error"] for layer in low.layers) > 1e-4
    assert max(layer["relative_error"] for layer in full.layers) < 1e-6
    ranks = inspect_run(raw["output_dir"])
    assert max(layer["rank"] for layer in ranks["layers"]) > 4
    saved = load_file(str(Path(raw["output_dir"]) / "adapter" / "adapter_model.safetensors"))
    assert ranks["trainable_parameters"] == sum(v.numel() for k, v in saved.items() if ".adapter." in k)  # A, B and m; not the base


def test_tnlora_peft_types_merge_unmerge_and_convert_with_dora(tiny_models, tmp_path):
    """tnlora's peft types with use_dora: peft's merge reproduces the logits, unmerge gives W0
    back (DoRA's merge is inverted with the norm it divided by), save_as_lora converts W' − W0."""
    from test_peft import _base, _logits, _perturb

    from tnlora_cli.peft import TracConfig

    pm = peft.get_peft_model(_base(tiny_models), TracConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", r=4, use_dora=True))
    assert any(n.endswith("tnlora_adapter.default.magnitude") for n, p in pm.named_parameters() if p.requires_grad)
    _perturb(pm)
    want = _logits(pm)
    assert (want - _logits(_base(tiny_models))).abs().max() > 1e-4
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    weight = layer.base_layer.weight.detach().clone()
    pm.merge_adapter()
    torch.testing.assert_close(_logits(pm), want, rtol=1e-5, atol=1e-5)
    pm.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, weight, rtol=1e-6, atol=1e-6)
    peft.save_as_lora(tmp_path / "lora", pm, rank=1.0)
    lora = peft.PeftModel.from_pretrained(_base(tiny_models), tmp_path / "lora")
    assert (_logits(lora) - want).abs().max() < 1e-4


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_norm_is_of_the_dequantized_weight(make_recipe, tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    from tnlora_cli.adapters.base import BaseWeight
    from tnlora_cli.merge import merge_run
    from tnlora_cli.model.build import prepare
    from tnlora_cli.train import train

    raw = _recipe(make_recipe, "lora", "llama-wide", "causal-lm", use_dora=True)
    raw["quantization"] = {"bits": bits}
    prepared = prepare(validate_recipe(raw))
    name = prepared.injection.targets[0]
    layer = prepared.model.get_submodule(name)
    dense = BaseWeight(layer.base_layer, 0, layer.adapter.out_features).dense()
    torch.testing.assert_close(layer.adapter.magnitude, torch.linalg.vector_norm(dense, dim=1), rtol=1e-6, atol=1e-6)
    raw["training"]["max_steps"] = 4
    train(validate_recipe(raw))
    report = merge_run(raw["output_dir"], tmp_path / "merged")
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4


def test_fused_slices_have_one_magnitude_each_and_merge(make_recipe, tmp_path):
    """GPT-2's c_attn adapted by its q and v slices: a magnitude per slice, the k rows untouched."""
    from tnlora_cli.export import export_as_lora
    from tnlora_cli.merge import merge_run
    from tnlora_cli.train import train

    raw = make_recipe("gpt2", "causal-lm", target_modules=["c_attn.q", "c_attn.v"], use_dora=True)
    raw["training"]["max_steps"] = 4
    raw["training"]["gradient_checkpointing"] = True
    train(validate_recipe(raw))
    run = Path(raw["output_dir"])
    tensors = load_file(str(next(run.rglob("adapter_model.safetensors"))))
    magnitudes = {k: v.shape for k, v in tensors.items() if k.endswith("magnitude")}
    assert magnitudes == {f"transformer.h.{i}.attn.c_attn.{s}.adapter.magnitude": torch.Size([32]) for i in (0, 1) for s in "qv"}
    report = merge_run(run, tmp_path / "merged")
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    # One LoRA per fused layer for W' − W0 of both slices: exact at full rank, the k rows zero.
    exported = export_as_lora(run, tmp_path / "lora", rank=32)
    assert max(layer["relative_error"] for layer in exported.layers) < 1e-6
    lora = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    b = lora["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert b[32:64].abs().max() < 1e-6 < b[:32].abs().max()


def test_dry_run_counts_the_magnitudes_on_the_llama2_7b_config():
    """TRAC's paper budget on Llama-2-7B (q, v in 32 blocks) plus one 4096-vector per layer."""
    from tnlora_cli.dryrun import dry_run
    from tnlora_cli.recipe.load import load_recipe

    base = load_recipe(Path(__file__).resolve().parents[1] / "recipes/paper/trac_llama2_7b.yaml")
    raw = base.model_dump(mode="json")
    raw["adapter"]["use_dora"] = True
    plain = dry_run(base, with_samples=False).counts.adapter_total.trainable
    dora = dry_run(validate_recipe(raw), with_samples=False).counts.adapter_total.trainable
    assert (plain, dora) == (106_496, 106_496 + 64 * 4096)


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate launcher not installed")
def test_two_process_ddp_with_checkpointing_matches_one_process(make_recipe, tmp_path, monkeypatch):
    """The magnitudes are ordinary per-layer parameters: DDP reduces them with the rest, also
    under gradient checkpointing, and 2 × 4 examples train as one process with 8 does."""
    from tnlora_cli.train import train

    raw = make_recipe("bert", "classification")
    raw["adapter"] = {"type": "trac", "target_modules": ["query", "value"], "r": 4, "use_dora": True}
    raw["training"].update(max_steps=8, batch_size=4, gradient_checkpointing=True)
    raw["output_dir"] = str(tmp_path / "ddp")
    monkeypatch.setenv("TNLORA_DATA_CACHE", str(tmp_path / "data-cache"))
    result = accelerate_launch(["--multi_gpu"], 29561, "train", str(write_recipe(tmp_path / "ddp.yaml", raw)))
    assert result.returncode == 0, result.stderr[-3000:]
    single = {**raw, "training": {**raw["training"], "batch_size": 8, "gradient_checkpointing": False}, "output_dir": str(tmp_path / "single")}
    train(validate_recipe(single))
    a = load_file(str(tmp_path / "ddp/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "single/adapter/adapter_model.safetensors"))
    assert any(k.endswith("magnitude") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["vera", "tera"])
def test_generate_merges_in_memory_as_the_adapter_path_generates(make_recipe, kind):
    """generate's in-memory merge writes W' (not W0 + ΔW): the same greedy tokens as the
    unmerged DoRA layers, on a bfloat16 base."""
    from tnlora_cli.generation.generator import SamplingSettings, load_generator
    from tnlora_cli.train import train

    raw = _recipe(make_recipe, kind, "llama", "causal-lm", use_dora=True)
    raw["model_dtype"] = "bfloat16"
    raw["training"]["max_steps"] = 6
    train(validate_recipe(raw))
    settings = SamplingSettings(max_new_tokens=8, batch_size=2)
    prompts = [[2, 11, 12, 13, 14], [2, 21, 22, 23]]
    adapter_path = load_generator(raw["output_dir"], merge=False)
    unmerged = adapter_path.generate(prompts, settings)
    merged = load_generator(raw["output_dir"])
    assert merged.generate(prompts, settings) == unmerged
    assert merged.merged and merged.merge_max_diff < 0.05  # bfloat16 logits


@pytest.mark.parametrize("kind", ["trac", "tera", "loretta", "tensorguide"])
def test_export_as_peft_of_the_tensor_network_types_keeps_the_magnitude(make_recipe, tmp_path, kind):
    """tnlora's peft types carry use_dora and the magnitudes: peft reproduces the logits."""
    from test_export import _adapter_logits_and_peft

    import tnlora_cli.peft  # noqa: F401  (registers the tensor-network types with peft)
    from tnlora_cli.export import export_as_peft
    from tnlora_cli.train import train

    raw = _recipe(make_recipe, kind, "llama", "causal-lm", use_dora=True)
    raw["training"].update(max_steps=3, learning_rate=0.1)
    train(validate_recipe(raw))
    export_as_peft(raw["output_dir"], tmp_path / "peft")
    assert json.loads((tmp_path / "peft/adapter_config.json").read_text())["use_dora"] is True
    expected, got = _adapter_logits_and_peft(Path(raw["output_dir"]), tmp_path / "peft")
    assert (got - expected).abs().max().item() <= 1e-5


def test_export_as_peft_refuses_vera_with_dora(make_recipe, tmp_path):
    from tnlora_cli.errors import MergeError
    from tnlora_cli.export import export_as_peft
    from tnlora_cli.train import train

    raw = _recipe(make_recipe, "vera", "llama", "causal-lm", use_dora=True)
    raw["training"]["max_steps"] = 2
    train(validate_recipe(raw))
    with pytest.raises(MergeError, match="peft's VeRA has no DoRA magnitude"):
        export_as_peft(raw["output_dir"], tmp_path / "peft")
    assert not (tmp_path / "peft").exists()

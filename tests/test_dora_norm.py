"""DoRA's per-forward norm ‖W0 + ΔW‖: from thin factors where the update has them, from factors
built once per forward, and from a kept ‖W0‖² that follows the base weight when it changes."""

from __future__ import annotations

import copy

import pytest
import torch
from test_adapters import SMALL, _recipe
from test_dora import MLP

from tnlora_cli.adapters import REGISTRY, dora
from tnlora_cli.adapters.base import BaseWeight
from tnlora_cli.adapters.layers import merged_weight
from tnlora_cli.model.inject import adapted_layers, inject_adapter
from tnlora_cli.recipe.load import validate_recipe
from tnlora_cli.tensor.lowrank import updated_row_norms

ALL = sorted(REGISTRY)


def _reference(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(w0.double() + b.double() @ a.double().T, dim=1)


@pytest.mark.parametrize("update_scale", [1.0, 1e-3, 1e-6])
def test_thin_factor_norms_equal_the_dense_sum_in_fp32(update_scale):
    """Against fp64, the thin-factor norm is as exact as summing W0 + B Aᵀ densely in fp32,
    also when the update is tiny next to W0 (its terms then vanish against ‖W0‖²)."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 48, generator=g)
    a = torch.randn(48, 6, generator=g)
    b = torch.randn(64, 6, generator=g) * update_scale
    want = _reference(w0, a, b)
    dense = torch.linalg.vector_norm(w0 + b @ a.T, dim=1).double()
    thin = updated_row_norms(w0, w0.square().sum(dim=1), a, b).double()
    assert thin.dtype == torch.float64 and thin.shape == (64,)
    torch.testing.assert_close(dense, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(thin, want, rtol=1e-6, atol=0)


def test_thin_factor_norms_with_an_update_cancelling_most_of_each_row():
    """ΔW_o = −0.9 W0_o along a rank-1 direction: the norm shrinks tenfold and stays exact to
    fp32 tolerance (the documented limit is a near-total cancellation)."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(32, 1, generator=g)
    v = torch.randn(40, 1, generator=g)
    w0 = u @ v.T + 1e-1 * torch.randn(32, 40, generator=g)
    b, a = -0.9 * u, v
    want = _reference(w0, a, b)
    thin = updated_row_norms(w0, w0.square().sum(dim=1), a, b).double()
    torch.testing.assert_close(thin, want, rtol=1e-4, atol=0)


def _dora_model(kind: str) -> torch.nn.Module:
    """An MLP with `kind` + DoRA on both layers, every trained tensor moved off its start."""
    torch.manual_seed(0)
    model = MLP()
    config = REGISTRY[kind].config_class(type=kind, target_modules=["lin0", "lin1"], use_dora=True, **SMALL[kind])
    inject_adapter(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "magnitude" not in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.mark.parametrize("thin_always", [False, True])
@pytest.mark.parametrize("kind", ALL)
def test_forward_norm_equals_the_dense_norm_for_every_adapter(kind, thin_always, monkeypatch):
    """The norm the forward uses (thin factors, or dense where the update is high-rank) equals
    ‖W0 + ΔW‖ from the dense ΔW, and the branch handed with it is the adapter's own branch. With
    `thin_always`, every update that has thin factors takes the thin path, whatever it costs."""
    if thin_always:
        monkeypatch.setattr(dora, "THIN_NORM_MAX_COST", 10**9)
    model = _dora_model(kind)
    x = torch.randn(3, 16)
    for _, layer in adapted_layers(model):
        adapter = layer.adapter
        base = dora.bound_base(adapter)
        inputs = x if layer is model.lin0 else torch.randn(3, 32)
        branch, update = adapter.branch_and_update(inputs)
        assert isinstance(update, tuple) == (adapter.low_rank_factors() is not None)
        dense = dora.direction_norm(base.dense(), adapter.delta_weight())
        assert (dense - base.dense().norm(dim=1)).abs().max() > 1e-3  # ΔW moves the norm
        torch.testing.assert_close(dora.update_norm(base, update), dense, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(branch, adapter(inputs), rtol=1e-5, atol=1e-6)
    # The whole layer: the forward equals x through the merged weight W'.
    with torch.no_grad():
        torch.testing.assert_close(model.lin0(x), x @ merged_weight(model.lin0).T + model.lin0.base_layer.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kind", "module", "builds"), [("trac", "trac", 2), ("loretta", "loretta", 2)])
def test_tensor_train_factors_are_built_once_per_forward(kind, module, builds, monkeypatch):
    """A and B are contracted from their cores once per DoRA forward (the norm and the branch
    share them): two contractions per layer, not four."""
    import importlib

    target = importlib.import_module(f"tnlora_cli.adapters.{module}")
    model = _dora_model(kind)
    calls = []
    original = target.tt_to_matrix

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, "tt_to_matrix", counting)
    model.train()
    model.lin0(torch.randn(3, 16)).sum().backward()
    assert len(calls) == builds


def test_tensorguide_generates_once_per_forward(monkeypatch):
    model = _dora_model("tensorguide")
    adapter = model.lin0.adapter
    adapter.start_pair()  # cached once for the run
    calls = []
    original = type(adapter).generate

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(adapter), "generate", counting)
    model.lin0(torch.randn(3, 16))
    assert len(calls) == 1


def test_kept_base_norms_follow_a_changed_base_weight():
    """‖W0‖² is kept between forwards; writing the base weight in place, replacing it, or loading
    a state dict over it is seen by the next forward."""
    model = _dora_model("lora")
    layer = model.lin0
    x = torch.randn(4, 16)

    def expected() -> torch.Tensor:
        return x @ merged_weight(layer).T + layer.base_layer.bias

    with torch.no_grad():
        layer(x)
        layer.base_layer.weight.mul_(1.5)
        torch.testing.assert_close(layer(x), expected(), rtol=1e-5, atol=1e-5)
        layer.base_layer.weight = torch.nn.Parameter(torch.randn_like(layer.base_layer.weight), requires_grad=False)
        torch.testing.assert_close(layer(x), expected(), rtol=1e-5, atol=1e-5)
        state = copy.deepcopy(model.state_dict())
        state["lin0.base_layer.weight"] = torch.randn_like(state["lin0.base_layer.weight"])
        model.load_state_dict(state)
        torch.testing.assert_close(layer(x), expected(), rtol=1e-5, atol=1e-5)


def test_dora_layers_still_deepcopy_and_pickle():
    import pickle

    model = _dora_model("lora")
    x = torch.randn(2, 16)
    want = model(x)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(twin(x), want)


def test_quantized_base_thin_norm_is_of_the_dequantized_weight(make_recipe):
    """A 4-bit base: the forward's thin-factor norm uses the dequantized W0 (and its kept ‖W0‖²)
    and equals the dense norm of the dequantized weight plus ΔW."""
    pytest.importorskip("bitsandbytes")
    from tnlora_cli.model.build import prepare

    raw = _recipe(make_recipe, "lora", "llama-wide", "causal-lm", use_dora=True)
    raw["quantization"] = {"bits": 4}
    prepared = prepare(validate_recipe(raw))
    layer = prepared.model.get_submodule(prepared.injection.targets[0])
    adapter = layer.adapter
    with torch.no_grad():
        adapter.lora_B.normal_(std=0.3)
    base = dora.bound_base(adapter)
    assert getattr(base.layer.weight, "quant_state", None) is not None
    dense = BaseWeight(layer.base_layer, 0, adapter.out_features).dense()
    want = torch.linalg.vector_norm(dense + adapter.delta_weight(), dim=1)
    _, update = adapter.branch_and_update(torch.randn(2, adapter.in_features))
    torch.testing.assert_close(dora.update_norm(base, update), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base.squared_row_norms(), dense.square().sum(dim=1), rtol=1e-6, atol=1e-6)


def test_tera_dense_path_builds_once_for_the_branch_and_the_norm(monkeypatch):
    """TeRA on its dense path: the ΔW the branch multiplies by is the one the norm sums."""
    torch.manual_seed(0)
    model = MLP()
    inject_adapter(model, REGISTRY["tera"].config_class(type="tera", target_modules=["lin0"], use_dora=True, path="dense", **SMALL["tera"]))
    adapter = model.lin0.adapter
    with torch.no_grad():
        for d in adapter.d:
            d.add_(torch.randn_like(d) * 0.3)
    calls = []
    original = type(adapter)._build
    monkeypatch.setattr(type(adapter), "_build", lambda self, *a: calls.append(1) or original(self, *a))
    x = torch.randn(5, 16)
    y = model.lin0(x)
    assert len(calls) == 1
    with torch.no_grad():
        torch.testing.assert_close(y, x @ merged_weight(model.lin0).T + model.lin0.base_layer.bias, rtol=1e-5, atol=1e-5)


def test_thin_norm_is_fp32_under_autocast():
    """Under bf16 autocast (a GPU recipe's mixed precision; here the CPU's), the thin-factor norm
    is still computed in fp32: its W0 A in bf16 would be off by about 1e-3."""
    model = _dora_model("lora")
    adapter = model.lin0.adapter
    base = dora.bound_base(adapter)
    update = adapter.low_rank_factors()
    want = dora.update_norm(base, update)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dora.update_norm(base, update)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ALL)
def test_dora_forward_traces_without_graph_breaks_and_compiles_to_the_eager_result(kind):
    """The kept ‖W0‖² and TensorGuide's kept start pair are Python-side caches: under
    torch.compile they step aside instead of breaking the graph."""
    import torch._dynamo as dynamo
    from test_compile import assert_compiled_matches_eager

    model = _dora_model(kind).train()
    x = torch.randn(3, 5, 16)
    model(x)  # the caches are filled before compiling, as in a run that evaluated first
    dynamo.reset()
    assert dynamo.explain(model)(x).graph_break_count == 0
    assert_compiled_matches_eager(model, x)

"""Every adapter against the contract: zero start, forward == x·ΔWᵀ, ΔW against an
independent einsum of the raw tensors, merge, save/load, training, ranks, shape errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tnlora_cli.adapters import REGISTRY
from tnlora_cli.errors import RecipeError
from tnlora_cli.model.inject import adapted_layers, inject_adapter
from tnlora_cli.model.merging import merge_into_base
from tnlora_cli.model.state import SHARED_ATTR
from tnlora_cli.recipe.load import validate_recipe

#: Small settings per adapter for the tiny models (hidden 32 / MLP 10-20).
SMALL = {
    "lora": {"r": 4},
    "vera": {"r": 16},
    "loretta": {"r": 4, "tt_rank": 3},
    "trac": {"r": 4},
    "tera": {"outdim": 4},
    "tensorguide": {"hidden": 4, "in_modes": [2, 2, 2]},
}
ALL = sorted(REGISTRY)


def test_every_registered_adapter_has_small_settings():
    assert set(SMALL) == set(REGISTRY)


class TwoLayer(nn.Module):
    """Two layers of different shapes and the same role name in two blocks."""

    def __init__(self) -> None:
        super().__init__()
        # Layer index in the path: blocks.0.up and blocks.1.up have the same role, `up`.
        self.blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(16, 24), "down": nn.Linear(24, 16)}) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block["down"](torch.tanh(block["up"](x)))
        return x


def _build(kind: str, dtype=torch.float32, **overrides) -> TwoLayer:
    torch.manual_seed(0)
    model = TwoLayer()
    config = REGISTRY[kind].config_class(target_modules=["up", "down"], **{**SMALL[kind], **overrides})
    inject_adapter(model, config)
    return model.to(dtype)


def _randomise(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


@pytest.mark.parametrize("kind", ALL)
def test_starts_exactly_at_the_base_model(kind):
    torch.manual_seed(0)
    reference = TwoLayer()
    x = torch.randn(3, 5, 16)
    model = _build(kind)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    for _, layer in adapted_layers(model):
        assert layer.adapter.delta_weight().abs().max() == 0


@pytest.mark.parametrize("kind", ALL)
def test_forward_equals_x_times_delta_weight(kind):
    model = _build(kind, dtype=torch.float64)
    _randomise(model)
    x = torch.randn(4, 7, 16, dtype=torch.float64)
    for name, layer in adapted_layers(model):
        inp = x if layer.base_layer.in_features == 16 else torch.randn(4, 7, 24, dtype=torch.float64)
        branch = layer(inp) - layer.base_layer(inp)
        torch.testing.assert_close(branch, inp @ layer.adapter.delta_weight().T, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("kind", ALL)
def test_merge_matches_unmerged(kind):
    model = _build(kind, dtype=torch.float64)
    _randomise(model)
    x = torch.randn(3, 16, dtype=torch.float64)
    expected = model(x)
    assert merge_into_base(model) == 4
    torch.testing.assert_close(model(x), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ALL)
def test_only_adapter_tensors_train(kind):
    model = _build(kind)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert ".adapter." in name or name.startswith(SHARED_ATTR), name
        else:
            assert ".base_layer." in name or name.startswith(SHARED_ATTR), name
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    # A few steps on a regression target: the loss falls and every trainable tensor moves.
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    x, y = torch.randn(64, 16), torch.randn(64, 16)
    losses = []
    for _ in range(30):
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(a, b) for a, b in zip(before, trainable))


@pytest.mark.parametrize("kind", ALL)
def test_runs_under_bf16_autocast(kind):
    """Mixed precision (training.mixed_precision: bf16/fp16) runs the forward under autocast:
    the branch must accept autocast's half-precision intermediates, give what fp32 gives to
    bf16 accuracy, and send finite gradients to every trainable tensor."""
    model = _build(kind)
    _randomise(model, seed=2)
    x = torch.randn(4, 7, 16)
    expected = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    # bf16 keeps 2-3 significant digits; TensorGuide's zero start subtracts two branches, so its
    # rounding error follows the branches' size rather than their (here smaller) difference.
    assert (out.float() - expected).norm() / expected.norm() < 0.05
    out.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ------------------------------------------------- ΔW against independent references


def _layer(model, name="blocks.0.up"):
    return model.get_submodule(name).adapter


def test_vera_reference():
    model = _build("vera", dtype=torch.float64)
    _randomise(model)
    ad = _layer(model)
    a, b = getattr(model, SHARED_ATTR).tensors["vera_A"], getattr(model, SHARED_ATTR).tensors["vera_B"]
    assert a.shape == (16, 24) and b.shape == (24, 16)  # sized by the largest in (24) and out (24)
    ref = torch.diag(ad.lambda_b) @ b[:24] @ torch.diag(ad.lambda_d) @ a[:, :16]
    torch.testing.assert_close(ad.delta_weight(), ref)


def test_loretta_reference():
    model = _build("loretta", dtype=torch.float64)
    _randomise(model)
    ad = _layer(model)
    a = torch.einsum("aib,bjc,ckd,dre->ijkr", *ad.cores_a).reshape(16, 4)
    b = torch.einsum("aib,bjc,ckd,dre->ijkr", *ad.cores_b).reshape(24, 4)
    torch.testing.assert_close(ad.delta_weight(), (16.0 / 4) * b @ a.T)


def test_trac_reference_and_sharing():
    model = _build("trac", dtype=torch.float64, activation="softmax")
    _randomise(model)
    ad0, ad1 = _layer(model, "blocks.0.up"), _layer(model, "blocks.1.up")
    # Same role and factor: the same shared cores; per-layer first cores differ.
    assert ad0.shared_tensor("core2_a") is ad1.shared_tensor("core2_a") and ad0.shared_tensor("core3_b") is ad1.shared_tensor("core3_b")
    assert ad0.core1_a is not ad1.core1_a
    assert _layer(model, "blocks.0.down").shared_tensor("core3_a") is not ad0.shared_tensor("core3_a")
    act = lambda v: v.numel() * torch.softmax(v, 0)  # noqa: E731

    def factor(f, rows):
        g3 = ad0.shared_tensor(f"core3_{f}") * act(getattr(ad0, f"controller_rank_{f}"))[:, None, None] * act(getattr(ad0, f"controller_dim_{f}"))[None, :, None]
        return torch.einsum("aib,bjc,ckr->ijkr", getattr(ad0, f"core1_{f}"), ad0.shared_tensor(f"core2_{f}"), g3).reshape(rows, -1)

    alpha, r = 16.0, 4
    torch.testing.assert_close(ad0.delta_weight(), factor("b", 24) @ factor("a", 16).T * (alpha / r))


def test_tera_reference_and_both_paths():
    model = _build("tera", dtype=torch.float64)
    _randomise(model)
    ad = _layer(model)  # in 16 unfolded, out 24 -> [4, 6]
    assert ad.in_modes == [16] and ad.out_modes == [4, 6]
    g = ad.shared_tensor("core")
    a = [f.T * d for f, d in zip(ad.frozen_factors(), ad.d)]
    ref = torch.einsum("pqr,ip,jq,kr->ijk", g, *a).reshape(16, 24).T
    torch.testing.assert_close(ad.delta_weight(), ref)
    x = torch.randn(5, 16, dtype=torch.float64)
    ad.path = "input"
    via_input = ad(x)
    ad.path = "dense"
    torch.testing.assert_close(via_input, ad(x))


def test_tera_chooses_the_cheaper_path():
    model = _build("tera")
    ad = _layer(model)
    small, large = ad.costs(1), ad.costs(100_000)
    assert small[0] < small[1]  # few tokens: contract the input
    assert large[1] < large[0] or large[0] == large[1]


def test_tensorguide_reference():
    model = _build("tensorguide", dtype=torch.float64)
    _randomise(model)
    ad = _layer(model)
    total = 4 * (16 + 24)

    def gen(cores):
        z = ad.z.view(2, 2, 2)
        flat = torch.einsum("abc,xaiy,ybjz,zckw->ijk", z, *cores).reshape(-1)
        assert flat.numel() == total
        return flat[:64].reshape(16, 4), flat[64:].reshape(4, 24)

    w1, w2 = gen(list(ad.cores))
    s1, s2 = gen(ad._start_cores())
    torch.testing.assert_close(ad.delta_weight(), (w1 @ w2 - s1 @ s2).T)


def test_tensorguide_nonlinear_branch_refuses_delta_weight():
    model = _build("tensorguide", activation="relu")
    _randomise(model)
    ad = _layer(model)
    assert not ad.is_linear
    out = model(torch.randn(2, 16))
    assert torch.isfinite(out).all()
    with pytest.raises(RecipeError, match="nonlinear"):
        ad.delta_weight()


# -------------------------------------------------------------------------- ranks


def _rank(t: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(t.double()))


@pytest.mark.parametrize("kind, expected", [("lora", 4), ("trac", 4), ("loretta", 3)])
def test_low_rank_updates_have_rank_at_most_r(kind, expected):
    """r = 4; LoRETTA's r mode hangs on a TT bond of rank t = 3, which caps the rank at 3."""
    model = _build(kind, dtype=torch.float64)
    _randomise(model)
    assert _rank(_layer(model).delta_weight()) == expected


def test_tera_reaches_full_rank():
    model = _build("tera", dtype=torch.float64)
    _randomise(model)
    for name in ("blocks.0.up", "blocks.0.down"):
        assert _rank(_layer(model, name).delta_weight()) == 16


# ---------------------------------------------------------------- recipe shape errors


@pytest.mark.parametrize(
    "kind, settings, fragment",
    [
        ("loretta", {"modes": {16: [2, 3, 3]}}, "adapter.modes.16: [2, 3, 3] multiply to 18, not 16"),
        ("loretta", {"ranks_a": [1, 3, 1]}, "adapter.ranks_a"),
        ("trac", {"modes": {16: [4, 4]}}, "TRAC uses exactly 3 modes"),
        ("tera", {"outdim": 5}, "adapter.outdim: mode size 5 does not fold a layer dimension of 24"),
        ("tensorguide", {"out_modes": [2, 2, 2]}, "adapter.out_modes"),
    ],
)
def test_shapes_that_do_not_factor_give_one_recipe_error(kind, settings, fragment):
    with pytest.raises(RecipeError) as info:
        _build(kind, **settings)
    assert fragment in info.value.message


# ---------------------------------------------------- end to end on tiny HF models


def _recipe(make_recipe, kind: str, model: str = "bert", task: str = "classification", **extra) -> dict:
    raw = make_recipe(model, task)
    raw["adapter"] = {"type": kind, "target_modules": raw["adapter"]["target_modules"], **SMALL[kind], **extra}
    return raw


@pytest.mark.parametrize("kind", ALL)
def test_train_save_load_and_merge_every_adapter(make_recipe, tmp_path, kind):
    from transformers import AutoModelForSequenceClassification

    from tnlora_cli.evaluate import evaluate_run
    from tnlora_cli.merge import merge_run
    from tnlora_cli.train import train

    raw = _recipe(make_recipe, kind)
    raw["training"]["max_steps"] = 40
    result = train(validate_recipe(raw))
    assert result.evaluation["tuned"]["loss"] < result.evaluation["base"]["loss"]
    report = evaluate_run(raw["output_dir"])
    assert report["metrics"]["tuned"]["loss"] == pytest.approx(result.evaluation["tuned"]["loss"], rel=1e-6)
    merged = merge_run(raw["output_dir"], tmp_path / "merged")
    assert merged.max_abs_diff <= 1e-4
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged") is not None


def test_shared_tensors_are_saved_once_and_tied_again_on_load(make_recipe):
    from safetensors.torch import load_file

    from tnlora_cli.model.build import load_run
    from tnlora_cli.train import train

    raw = _recipe(make_recipe, "trac", "llama", "causal-lm", target_modules=["q_proj", "v_proj", "up_proj"])
    raw["training"]["max_steps"] = 5
    train(validate_recipe(raw))
    saved = load_file(str(Path(raw["output_dir"]) / "adapter/adapter_model.safetensors"))
    shared_keys = [k for k in saved if k.startswith(SHARED_ATTR)]
    # q_proj, v_proj, up_proj each: A and B, frozen core 2 and trainable core 3.
    assert len(shared_keys) == 3 * 2 * 2
    run = load_run(raw["output_dir"])
    run.load_weights()
    model = run.prepared.model
    store = getattr(model, SHARED_ATTR).tensors
    layers = [layer.adapter for name, layer in adapted_layers(model) if name.endswith("q_proj")]
    key = next(k for k in store if k.startswith("trac_self_attn-q_proj_b") and k.endswith("core3"))
    assert all(layer.shared_tensor("core3_b") is store[key] for layer in layers)
    torch.testing.assert_close(store[key].detach(), saved[f"{SHARED_ATTR}.tensors.{key}"])
    assert store[key].abs().sum() > 0  # trained away from its zero start


def test_trac_controllers_get_their_own_learning_rate(make_recipe):
    from tnlora_cli.model.build import prepare
    from tnlora_cli.training.optim import param_groups

    recipe = validate_recipe(_recipe(make_recipe, "trac", controller_learning_rate=5e-3))
    model = prepare(recipe).model
    groups = {g["lr"]: len(g["params"]) for g in param_groups(model, recipe)}
    assert set(groups) == {5e-3, recipe.training.learning_rate}
    assert groups[5e-3] == 4 * 2 * 2  # 4 layers x (A, B) x (rank, dim) controllers


def test_tensorguide_on_the_output_head(make_recipe, tmp_path):
    """The papers' GPT-2 setup adapts lm_head (tied to the embeddings here)."""
    from tnlora_cli.merge import merge_run
    from tnlora_cli.train import train

    raw = _recipe(make_recipe, "tensorguide", "gpt2", "causal-lm", hidden=2, in_modes=[2, 2], target_modules=["lm_head"])
    raw["training"]["max_steps"] = 20
    result = train(validate_recipe(raw))
    assert result.evaluation["tuned"]["loss"] < result.evaluation["base"]["loss"]
    report = merge_run(raw["output_dir"], tmp_path / "m")
    assert report.untied and report.max_abs_diff <= 1e-4


def test_nonlinear_tensorguide_trains_but_merge_refuses(make_recipe, tmp_path):
    from tnlora_cli.errors import MergeError
    from tnlora_cli.merge import merge_run
    from tnlora_cli.train import train

    raw = _recipe(make_recipe, "tensorguide", activation="gelu")
    raw["training"]["max_steps"] = 30
    result = train(validate_recipe(raw))
    assert result.evaluation["tuned"]["loss"] < result.evaluation["base"]["loss"]
    with pytest.raises(MergeError, match="nonlinear"):
        merge_run(raw["output_dir"], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_tensorguide_start_pair_cache_follows_loaded_state():
    model = _build("tensorguide")
    ad = _layer(model)
    first = [t.clone() for t in ad.start_pair()]
    assert ad.start_pair()[0] is ad.start_pair()[0]  # cached between calls
    other = {k: v + 1.0 for k, v in ad.state_dict().items() if k.startswith("start_core")}
    ad.load_state_dict(other, strict=False)
    assert not torch.equal(ad.start_pair()[0], first[0])  # regenerated after the load
    model.double()
    assert ad.start_pair()[0].dtype == torch.float64

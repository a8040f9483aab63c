"""The papers' ablation switches: each one's exact parameter count (closed form) and one
training step that moves every trainable tensor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tnlora_cli.adapters import REGISTRY
from tnlora_cli.model.accounting import unique_tensors
from tnlora_cli.model.inject import adapted_layers, inject_adapter
from tnlora_cli.model.state import SHARED_ATTR


class Blocks(nn.Module):
    """Two blocks with one 64 -> 48 layer each: one role, `q`, in two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(64, 48)}) for _ in range(2))

    def forward(self, x):
        return sum(block["q"](x) for block in self.blocks)


TRAC = {"r": 4, "modes": {64: [4, 4, 4], 48: [3, 4, 4]}, "ranks_a": [1, 2, 3], "ranks_b": [1, 2, 3]}
TERA = {"indim": None, "outdim": 4}
GUIDE = {"hidden": 4, "in_modes": [2, 2, 2], "out_modes": [7, 8, 8], "ranks": 2}
LORETTA = {"r": 4, "tt_rank": 2, "fold_rank": True, "folded_modes": {64: [4, 4, 4, 4], 48: [4, 4, 3, 4]}}

# (adapter, settings, trainable, frozen). TRAC cores: A (1,4,2)=8 (2,4,3)=24 (3,4,4)=48;
# B (1,3,2)=6 (2,4,3)=24 (3,4,4)=48; controllers of core 3: r2 + n3 = 3 + 4 per factor.
CASES = {
    "trac default": ("trac", TRAC, 2 * (8 + 6 + 7 + 7) + 48 + 48, 24 + 24),
    "trac Shared TT (no controllers)": ("trac", {**TRAC, "controllers": False}, 2 * (8 + 6) + 48 + 48, 24 + 24),
    "trac all cores trained per layer": ("trac", {**TRAC, "cores_a": ["trained"] * 3, "cores_b": ["trained"] * 3}, 2 * (8 + 24 + 48 + 6 + 24 + 48), 0),
    # A: core 1 frozen per layer, core 2 shared trained (controllers r1 + n2 = 2 + 4), core 3 per layer;
    # B: default structure.
    "trac explicit structure": ("trac", {**TRAC, "cores_a": ["frozen", "shared_trained", "trained"]}, 2 * (48 + 6 + 6 + 7) + 24 + 48, 2 * 8 + 24),
    "trac init tt_uniform": ("trac", {**TRAC, "init": "tt_uniform"}, 152, 48),
    "trac init kaiming_normal": ("trac", {**TRAC, "init": "kaiming_normal"}, 152, 48),
    "trac init kaiming_uniform": ("trac", {**TRAC, "init": "kaiming_uniform"}, 152, 48),
    # TeRA: input unfolded (64), output 48 -> [4, 4, 3]: d's 64 + 4 + 4 + 3 per layer.
    "tera (shared)": ("tera", TERA, 2 * 75, 64 * 48 + 64 * 64 + 16 + 16 + 9),
    "tera TeRA_iden": ("tera", {**TERA, "variant": "iden"}, 2 * 75, 64 * 48),
    "tera TeRA_unique": ("tera", {**TERA, "variant": "unique"}, 2 * 75, 2 * (64 * 48 + 64 * 64 + 16 + 16 + 9)),
    # TensorGuide: cores (1,2,7,2)=28 (2,2,8,2)=64 (2,2,8,1)=32; frozen z (8) and start cores.
    "tensorguide latent resampled": ("tensorguide", {**GUIDE, "latent": "resampled"}, 2 * 124, 2 * (8 + 124)),
    "tensorguide xavier init": ("tensorguide", {**GUIDE, "init": "xavier_uniform"}, 2 * 124, 2 * (8 + 124)),
    "tensorguide sigmoid": ("tensorguide", {**GUIDE, "activation": "sigmoid"}, 2 * 124, 2 * (8 + 124)),
    "tensorguide Algorithm 1": ("tensorguide", {**GUIDE, "latent": "resampled", "init": "xavier_uniform", "activation": "relu", "start": "paper"}, 2 * 124, 2 * 8),
    # LoRETTA, r folded: A modes [4,4,4,4] ranks [1,2,2,2,1] = 8+16+16+8; B [4,4,3,4] = 8+16+12+8.
    "loretta official shapes": ("loretta", LORETTA, 2 * (48 + 44), 0),
}


def _build(kind: str, settings: dict) -> Blocks:
    torch.manual_seed(0)
    model = Blocks()
    inject_adapter(model, REGISTRY[kind].config_class(target_modules=["q"], **settings))
    return model


def _counts(model: nn.Module) -> tuple[int, int]:
    tensors = [t for _, layer in adapted_layers(model) for t in [*layer.adapter.parameters(), *layer.adapter.buffers()]]
    tensors = unique_tensors(tensors + list(getattr(model, SHARED_ATTR).tensors.values()))
    return sum(t.numel() for t in tensors if t.requires_grad), sum(t.numel() for t in tensors if not t.requires_grad)


@pytest.mark.parametrize("case", sorted(CASES))
def test_ablation_counts(case):
    kind, settings, trainable, frozen = CASES[case]
    assert _counts(_build(kind, settings)) == (trainable, frozen)


@pytest.mark.parametrize("case", sorted(CASES))
def test_ablation_trains_one_step(case):
    kind, settings, _, _ = CASES[case]
    model = _build(kind, settings)
    with torch.no_grad():  # off the zero start, so every tensor has a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    loss = (model(torch.randn(16, 64)) - torch.randn(16, 48)).pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, trainable))


def test_trac_structure_and_shared_tt_compute_the_same_product():
    """Whatever the structure, the factor is the contraction of its three cores (gated
    shared trained cores when controllers are on)."""
    model = _build("trac", {**TRAC, "cores_a": ["frozen", "shared_trained", "trained"], "activation": "softmax"})
    ad = model.blocks[0]["q"].adapter
    with torch.no_grad():
        ad.controller_rank_a2.normal_()
        ad.controller_dim_a2.normal_()
    act = lambda v: v.numel() * torch.softmax(v, 0)  # noqa: E731
    g2 = ad.shared_tensor("core2_a") * act(ad.controller_rank_a2)[:, None, None] * act(ad.controller_dim_a2)[None, :, None]
    a = torch.einsum("aib,bjc,ckr->ijkr", ad.core1_a, g2, ad.core3_a).reshape(64, 4)
    torch.testing.assert_close(ad.factors()[0], a)
    assert not ad.core1_a.requires_grad and ad.core3_a.requires_grad
    assert model.blocks[0]["q"].adapter.shared_tensor("core2_a") is model.blocks[1]["q"].adapter.shared_tensor("core2_a")


def test_trac_frozen_last_core_of_b_is_refused():
    from tnlora_cli.errors import RecipeError

    with pytest.raises(RecipeError, match="cores_b"):
        REGISTRY["trac"].config_class(target_modules=["q"], cores_b=["trained", "shared_frozen", "shared_frozen"])


def test_tensorguide_resampled_latent_changes_per_training_forward_not_in_eval():
    model = _build("tensorguide", {**GUIDE, "latent": "resampled"})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(3, 64)
    assert not torch.equal(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    layer = model.blocks[0]["q"]
    torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ layer.adapter.delta_weight().T)


def test_loretta_folded_factors_follow_the_official_layout():
    model = _build("loretta", LORETTA)
    ad = model.blocks[0]["q"].adapter
    with torch.no_grad():
        ad.cores_b[-1].normal_()
    a = torch.einsum("aib,bjc,ckd,dle->ijkl", *ad.cores_a).reshape(64, 4)  # (in, r) row-major
    b = torch.einsum("aib,bjc,ckd,dle->ijkl", *ad.cores_b).reshape(4, 48)  # (r, out)
    torch.testing.assert_close(ad.delta_weight(), (ad.scaling * a @ b).T)


def test_tera_iden_is_the_core_scaled_by_the_d():
    model = _build("tera", {**TERA, "variant": "iden"})
    ad = model.blocks[0]["q"].adapter
    with torch.no_grad():
        for d in ad.d:
            d.normal_()
    g = ad.shared_tensor("core")
    ref = torch.einsum("pqrs,p,q,r,s->pqrs", g, *ad.d).reshape(64, 48).T
    torch.testing.assert_close(ad.delta_weight(), ref)


@pytest.mark.parametrize(
    "kind, settings, key",
    [
        ("loretta", {"fold_rank": True, "ranks_a": [1, 2, 1]}, "adapter.fold_rank"),
        ("loretta", {"folded_modes": {64: [8, 8, 4]}}, "adapter.folded_modes"),
        ("loretta", {"r": 4, "fold_rank": True}, "adapter.folded_modes"),  # 64 at r = 4: not in the official table
        ("trac", {"controllers": False, "controller_learning_rate": 1e-3}, "adapter.controller_learning_rate"),
    ],
)
def test_settings_an_ablation_would_ignore_are_refused(kind, settings, key):
    from tnlora_cli.errors import RecipeError

    with pytest.raises(RecipeError) as info:
        _build(kind, settings)
    assert info.value.message.startswith(key)

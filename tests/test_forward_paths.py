"""What a forward pass does not do again: TeRA's path choice once per token count and no identity
matrices, TensorGuide's trained and start branches as one pair of products, fused slices added
in place. The results themselves are the contract tests' (test_adapters, test_fused)."""

from __future__ import annotations

import pytest
import torch
from test_adapters import _build, _layer, _randomise
from torch.utils._python_dispatch import TorchDispatchMode

from tnlora_cli.adapters import REGISTRY
from tnlora_cli.adapters.base import SharedStore
from tnlora_cli.adapters.layers import FusedAdaptedLinear


class _CountOps(TorchDispatchMode):
    """Counts aten calls by name; `rows` counts matrix products whose left operand has that many rows."""

    def __init__(self, rows: int | None = None) -> None:
        super().__init__()
        self.rows, self.calls, self.token_products = rows, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in ("mm", "addmm", "bmm") and self.rows is not None:
            left = args[1] if name == "addmm" else args[0]
            self.token_products += int(left.dim() >= 2 and left.shape[-2] == self.rows)
        return func(*args, **(kwargs or {}))


def test_tera_chooses_its_path_once_per_token_count(monkeypatch):
    model = _build("tera")
    ad = _layer(model)
    calls = []
    real = ad.costs
    monkeypatch.setattr(ad, "costs", lambda *a, **k: calls.append(a) or real(*a, **k))
    x = torch.randn(6, 16)
    for _ in range(3):
        ad(x)
    assert len(calls) == 1
    ad(torch.randn(7, 16))
    assert len(calls) == 2
    with torch.no_grad():  # inference weighs the forward alone: its own choice
        ad(x)
    assert len(calls) == 3


def test_tera_iden_forward_and_delta_build_no_identity(monkeypatch):
    model = _build("tera", variant="iden")
    _randomise(model)
    ad = _layer(model)
    x = torch.randn(5, 16)
    expected = x @ ad.delta_weight().T

    def no_eye(*args, **kwargs):
        raise AssertionError("torch.eye called on the forward path")

    monkeypatch.setattr(torch, "eye", no_eye)
    for path in ("input", "dense"):
        ad.path = path
        torch.testing.assert_close(ad(x), expected)
    ad.delta_weight()


@pytest.mark.parametrize("activation", ["none", "tanh"])
def test_tensorguide_runs_one_pair_of_token_products(activation):
    model = _build("tensorguide", activation=activation)
    _randomise(model)
    ad = _layer(model)
    x = torch.randn(37, 16)
    ad(x)  # the start pair is generated once and cached
    with _CountOps(rows=37) as ops:
        out = ad(x)
    # x (W1 − W1_0 | W1_0) and then (..) (W2 | W2 − W2_0): two, where a separate start branch made four.
    assert ops.token_products == 2
    if activation == "none":
        torch.testing.assert_close(out, x @ ad.delta_weight().T, rtol=1e-5, atol=1e-6)


def test_fused_slices_add_into_the_base_output_without_a_copy():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 48)
    for p in base.parameters():
        p.requires_grad_(False)
    layer = FusedAdaptedLinear(base)
    shared, gen = SharedStore(), torch.Generator().manual_seed(0)
    config = REGISTRY["lora"].config_class(target_modules=["x"], r=4)
    adapters = {}
    for name, (start, stop) in {"q": (0, 16), "v": (32, 48)}.items():
        adapters[name] = REGISTRY["lora"](16, 16, config, shared, name, gen)
        with torch.no_grad():
            adapters[name].lora_B.normal_()
        layer.add_slice(name, adapters[name], start, stop)
    x = torch.randn(3, 5, 16, requires_grad=True)
    with _CountOps() as ops:
        out = layer(x)
    assert ops.calls.get("cat", 0) == 0
    # The same output and gradients as building it from the slices' own deltas.
    delta = torch.zeros(48, 16)
    delta[0:16] = adapters["q"].delta_weight()
    delta[32:48] = adapters["v"].delta_weight()
    x_ref = x.detach().clone().requires_grad_(True)
    expected = x_ref @ (base.weight + delta).T + base.bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.pow(2).sum().backward()
    grads = [adapters[n].lora_B.grad.clone() for n in ("q", "v")] + [x.grad.clone()]
    for n in ("q", "v"):
        adapters[n].lora_B.grad = None
    ref_out = base(x_ref)
    ref_out = torch.cat([ref_out[..., :16] + adapters["q"](x_ref), ref_out[..., 16:32], ref_out[..., 32:] + adapters["v"](x_ref)], dim=-1)
    ref_out.pow(2).sum().backward()
    for got, want in zip(grads, [adapters[n].lora_B.grad for n in ("q", "v")] + [x_ref.grad]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

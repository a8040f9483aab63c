"""`training.compile`: every adapter's branch traces into one graph (no graph breaks), fused
slices too, and a compiled run trains the adapter an eager run trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo
from test_adapters import ALL, _build, _randomise

from tnlora_cli.errors import RecipeError
from tnlora_cli.recipe.load import validate_recipe

#: Variants whose forward takes another path than the defaults.
VARIANTS = [(kind, {}) for kind in ALL] + [
    ("tensorguide", {"activation": "tanh"}),
    ("tensorguide", {"latent": "resampled"}),
    ("tensorguide", {"start": "paper"}),
    ("tera", {"variant": "iden"}),
    ("tera", {"variant": "unique", "indim": 4}),
    ("tera", {"path": "dense"}),
    ("trac", {"activation": "softmax"}),
    ("vera", {"dropout": 0.1}),
]


def _adapter_breaks(explained) -> list[str]:
    """Graph-break reasons raised in tnlora's adapter code (the model's own are not counted)."""
    found = []
    for reason in explained.break_reasons:
        frames = [f"{frame.filename}:{frame.lineno}" for frame in reason.user_stack]
        if any("tnlora_cli" in frame for frame in frames):
            found.append(f"{reason.reason} at {frames[-1] if frames else '?'}")
    return found


def assert_compiled_matches_eager(model: torch.nn.Module, x: torch.Tensor) -> None:
    """The compiled model computes what the eager one does, gradients included (the same
    global RNG state for the methods that draw in the forward)."""
    torch.manual_seed(5)
    expected = model(x)
    expected.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    torch.manual_seed(5)
    out = compiled(x)
    out.pow(2).sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind, settings", VARIANTS, ids=[f"{k}-{'-'.join(f'{a}={b}' for a, b in s.items()) or 'default'}" for k, s in VARIANTS])
def test_adapter_forward_and_backward_trace_without_graph_breaks(kind, settings):
    model = _build(kind, **settings)
    _randomise(model)
    model.train()
    x = torch.randn(3, 5, 16)
    dynamo.reset()
    explained = dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, f"{kind} {settings}: {explained.graph_break_count} graph breaks: {_adapter_breaks(explained)}"
    assert explained.graph_count == 1
    assert_compiled_matches_eager(model, x)


@pytest.mark.parametrize("kind", ["lora", "trac", "tensorguide"])
def test_fused_slices_trace_without_graph_breaks_in_tnlora(kind, tiny_models):
    from transformers import AutoModelForCausalLM

    from tnlora_cli.adapters import REGISTRY
    from tnlora_cli.model.inject import inject_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"])
    settings = {"tensorguide": {"hidden": 2, "in_modes": [2, 2]}, "trac": {"r": 4}}.get(kind, {"r": 4})
    inject_adapter(model, REGISTRY[kind].config_class(target_modules=["c_attn.q", "c_attn.v"], **settings))
    model.train()
    ids = torch.randint(5, 60, (2, 9))
    dynamo.reset()
    explained = dynamo.explain(model)(input_ids=ids)
    assert _adapter_breaks(explained) == []


def test_compiled_training_trains_the_eager_adapter(make_recipe, tmp_path, monkeypatch):
    from tnlora_cli import train
    from tnlora_cli.run.checkpoint import load_adapter
    from tnlora_cli.training import engines

    monkeypatch.setattr(engines, "COMPILE_BACKEND", "aot_eager")  # inductor's C++ build takes minutes on a small CPU
    states = {}
    for flag in (False, True):
        raw = make_recipe("llama", "causal-lm", type="lora", r=4, target_modules=["q_proj", "v_proj"])
        raw["output_dir"] = str(tmp_path / f"compile-{flag}")
        raw["training"].update(max_steps=4, compile=flag, log_every=2)
        train(validate_recipe(raw))
        states[flag], _ = load_adapter(Path(raw["output_dir"]) / "adapter")
    assert states[True].keys() == states[False].keys()
    for key in states[False]:
        torch.testing.assert_close(states[True][key], states[False][key], rtol=1e-4, atol=1e-5, msg=key)
        assert states[False][key].abs().sum() > 0 or "lora_B" not in key


def test_compile_is_refused_under_sharding_engines():
    from tnlora_cli.recipe.sections import TrainingConfig
    from tnlora_cli.training.engines import EngineChoice, FSDPEngine

    with pytest.raises(RecipeError, match="training.compile: not supported under fsdp"):
        EngineChoice(FSDPEngine).build(TrainingConfig(compile=True))

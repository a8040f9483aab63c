"""FSDP2 and DeepSpeed ZeRO-2/3 inside `tnlora train`: 2 CPU processes through `accelerate launch`.

TRAC on a tiny Llama with gradient checkpointing: trainable cores shared by every layer, which
FSDP must keep in one unit and ZeRO-3 partitions. Each engine must reach the adapter one process reaches with the global
batch, save no empty tensors, and resume from a mid-run checkpoint to the same adapter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ACCELERATE, accelerate_launch, write_recipe
from safetensors.torch import load_file

from tnlora_cli.errors import RecipeError
from tnlora_cli.recipe.load import validate_recipe
from tnlora_cli.recipe.sections import TrainingConfig
from tnlora_cli.train import train
from tnlora_cli.training.engines import build_engine, resolve_engine

ADAPTER = "adapter/adapter_model.safetensors"

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _zero3_config(tmp_path: Path) -> Path:
    # Threshold 0: partition every parameter, even these tiny ones (the default keeps
    # small parameters whole, which would hide an ungathered read). "auto": tnlora fills it.
    config = {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(config))
    return path


# engine -> (launcher flags, recipe's training.distributed); ZeRO-3 is chosen by an accelerate config
ENGINES = {
    "fsdp": (["--multi_gpu"], "fsdp"),
    "deepspeed-zero2": (["--multi_gpu"], "deepspeed-zero2"),
    "deepspeed-zero3": (["--use_deepspeed", "--deepspeed_config_file", "{zero3}", "--zero3_init_flag", "true"], "auto"),
}


# The same engines chosen by accelerate's own flags, the recipe saying `auto`
FROM_ACCELERATE_CONFIG = {
    "fsdp": (["--use_fsdp", "--fsdp_version", "2"], "auto"),
    "deepspeed-zero3": ENGINES["deepspeed-zero3"],
}


SHARED_SETTINGS = {"vera": {"r": 16}, "tera": {"outdim": 4}, "tensorguide": {}}


def _launch(flags: list[str], recipe: Path, port: int, *extra: str) -> None:
    result = accelerate_launch(flags, port, "train", str(recipe), *extra)
    assert result.returncode == 0, result.stderr[-4000:]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=key)


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate launcher not installed")
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_sharded_engine_trains_saves_and_resumes_like_one_process(make_recipe, tmp_path, engine):
    if engine.startswith("deepspeed") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed not installed")
    flags, setting = ENGINES[engine]
    flags = [f.format(zero3=_zero3_config(tmp_path)) for f in flags]
    port = 29540 + sorted(ENGINES).index(engine)
    raw = make_recipe("llama", "causal-lm", type="trac", r=4)
    raw["adapter"].pop("alpha")
    raw["training"].update(max_steps=20, batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-2, log_every=5,
                           save_every=10, save_total_limit=None, distributed=setting, gradient_checkpointing=True)
    raw["output_dir"] = str(tmp_path / "run")
    recipe = write_recipe(tmp_path / "run.yaml", raw)
    _launch(flags, recipe, port)

    run = tmp_path / "run"
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["engine"] == engine and final["world_size"] == 2
    assert final["adapter_checksum_per_rank"][0] == final["adapter_checksum_per_rank"][1]
    assert len(final["peak_memory_mib_per_rank"]) == 2 and min(final["peak_memory_mib_per_rank"]) > 0
    sharded = load_file(str(run / ADAPTER))
    assert all(t.numel() > 0 for t in sharded.values()), "an adapter tensor was saved empty"
    assert any(k.startswith("tnlora_shared.") for k in sharded), "the shared cores were not saved"

    # One process, the global batch (2 x 4), the same stream: the same adapter.
    single = dict(raw, output_dir=str(tmp_path / "single"))
    single["training"] = dict(raw["training"], batch_size=8, distributed="ddp")
    train(validate_recipe(single))
    _assert_same(sharded, load_file(str(tmp_path / "single" / ADAPTER)), 1e-5)

    # Interrupted after step 10, resumed by the same engine: the same adapter again.
    uninterrupted = {k: v.clone() for k, v in sharded.items()}
    shutil.rmtree(run / "checkpoints/step-000020")
    shutil.rmtree(run / "adapter")
    _launch(flags, recipe, port + 30, "--resume", "auto")  # a fresh port: the last one may still be closing
    _assert_same(load_file(str(run / ADAPTER)), uninterrupted, 1e-6)

    # Checkpoints hold full tensors in one layout: one process resumes the sharded run's checkpoint.
    train(validate_recipe(single), resume=str(run / "checkpoints/step-000010"), overwrite=True)
    _assert_same(load_file(str(tmp_path / "single" / ADAPTER)), uninterrupted, 1e-5)


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate launcher not installed")
# VeRA's frozen projections and TensorGuide's buffers are broadcast under FSDP; TeRA's frozen
# core is partitioned under ZeRO-3 (one engine per adapter keeps the suite short).
@pytest.mark.parametrize("engine, kind", [("fsdp", "vera"), ("fsdp", "tensorguide"), ("deepspeed-zero3", "tera")])
def test_frozen_shared_tensors_under_sharding_match_one_process(make_recipe, tmp_path, engine, kind):
    """VeRA's and TeRA's frozen random tensors, and TensorGuide's one generator network, are
    shared by every layer: sharded, gathered at call time, and saved whole with the adapter.
    The engine comes from accelerate's flags."""
    if engine.startswith("deepspeed") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed not installed")
    flags, setting = FROM_ACCELERATE_CONFIG[engine]
    flags = [f.format(zero3=_zero3_config(tmp_path)) for f in flags]
    raw = make_recipe("llama", "causal-lm")
    raw["adapter"] = {"type": kind, "target_modules": ["q_proj", "v_proj"], **SHARED_SETTINGS[kind]}
    raw["training"].update(max_steps=10, batch_size=4, learning_rate=1e-2, log_every=5, distributed=setting)
    raw["output_dir"] = str(tmp_path / "run")
    _launch(flags, write_recipe(tmp_path / "run.yaml", raw), 29550 + 4 * sorted(FROM_ACCELERATE_CONFIG).index(engine) + list(SHARED_SETTINGS).index(kind))
    single = dict(raw, output_dir=str(tmp_path / "single"))
    single["training"] = dict(raw["training"], batch_size=8, distributed="ddp")
    train(validate_recipe(single))
    final = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()][-1]
    assert final["engine"] == engine
    sharded = load_file(str(tmp_path / "run" / ADAPTER))
    assert all(t.numel() > 0 for t in sharded.values())
    _assert_same(sharded, load_file(str(tmp_path / "single" / ADAPTER)), 1e-5)


# `python -m tnlora_cli` with a NaN in every LoRA gradient and a finite loss: 0 * sqrt(0 * sum(A))
# adds exactly 0 to the branch, and sqrt's infinite slope at 0 makes A's gradient 0 * inf = NaN.
NAN_GRADIENT_ENTRY = """
import torch
from tnlora_cli.adapters.base import LowRankAdapter

forward = LowRankAdapter.forward


def poisoned(self, x):
    a, _ = self.factors()
    return forward(self, x) + 0 * torch.sqrt(0 * a.sum())


LowRankAdapter.forward = poisoned
from tnlora_cli.cli import main

main()
"""


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate launcher not installed")
@pytest.mark.parametrize("engine", ["ddp", *sorted(ENGINES)])
def test_a_nan_gradient_stops_training_under_every_engine(make_recipe, tmp_path, monkeypatch, engine):
    """The guard reads the engine's gradient norm, so a NaN gradient with a finite loss stops
    the run at step 1 under DDP, FSDP2 and ZeRO-2/3 alike (ZeRO leaves `p.grad` empty: a check
    of `p.grad` saw nothing there, and DeepSpeed skipped the steps silently)."""
    if engine.startswith("deepspeed") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed not installed")
    flags, setting = ENGINES.get(engine, (["--multi_gpu"], "ddp"))
    flags = [f.format(zero3=_zero3_config(tmp_path)) for f in flags]
    (tmp_path / "nan_gradient_entry.py").write_text(NAN_GRADIENT_ENTRY)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    raw = make_recipe("llama", "causal-lm")
    raw["training"].update(max_steps=3, batch_size=2, log_every=1, distributed=setting)
    raw["output_dir"] = str(tmp_path / "run")
    result = accelerate_launch(flags, 29570 + ["ddp", *sorted(ENGINES)].index(engine), "train", str(write_recipe(tmp_path / "run.yaml", raw)),
                               module="nan_gradient_entry")
    err = " ".join(result.stderr.split())
    assert result.returncode == 1, err[-3000:]
    assert "training diverged at step 1: a gradient is not finite" in err and "no adapter was published" in err, err[-3000:]
    assert not (tmp_path / "run/adapter").exists()


def test_engine_choice_conflicts_are_recipe_errors(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert resolve_engine("auto") == "ddp"
    assert resolve_engine("deepspeed-zero3") == "deepspeed-zero3"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert resolve_engine("auto") == "deepspeed"
    with pytest.raises(RecipeError, match="launched with deepspeed"):
        resolve_engine("fsdp")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    single = build_engine("fsdp", TrainingConfig(), quantized=True)  # one process: nothing to shard
    assert single.name == "ddp" and "needs several processes" in single.note
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="quantized"):
        build_engine("fsdp", TrainingConfig(), quantized=True)


@pytest.mark.parametrize("max_grad_norm", [0.05, None])
def test_gradients_are_walked_once_per_step_with_one_host_sync(make_recipe, tmp_path, monkeypatch, max_grad_norm):
    """Per optimizer step: one gradient norm (shared by clipping and the guard; torch's
    clip_grad_norm_, a second walk, is never called) and one host synchronisation in tnlora's
    training code (the guard's; log steps aside), none per micro-batch."""
    import sys

    from tnlora_cli.training import loop

    training_dir = str(Path(loop.__file__).parent)
    norms, syncs, inside = [], [], []
    get_total_norm = torch.nn.utils.get_total_norm

    def counted_norm(*args, **kwargs):
        norms.append(len(inside))
        return get_total_norm(*args, **kwargs)

    def never(*args, **kwargs):
        raise AssertionError("clip_grad_norm_ walks the gradients a second time")

    def counting(name):
        method = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1)
            # Host tensors by construction, no sync: `_batch` counts tokens before the copy to the
            # device, `_perm` draws the data order on the CPU.
            if inside and caller.f_code.co_filename.startswith(training_dir) and caller.f_code.co_name not in ("_batch", "_perm"):
                syncs.append(f"{caller.f_code.co_name}: {name}")
            return method(self, *args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", counted_norm)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", never)
    step = loop._TrainingRun.optimizer_step

    def counted_step(self, *args, **kwargs):
        inside.append(1)
        try:
            return step(self, *args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(loop._TrainingRun, "optimizer_step", counted_step)
    raw = make_recipe("bert", "classification")
    raw["training"].update(max_steps=3, batch_size=4, gradient_accumulation_steps=3, log_every=100, max_grad_norm=max_grad_norm)
    train(validate_recipe(raw))
    assert norms == [1, 1, 1], "one gradient norm per optimizer step"
    assert len(syncs) == 3 and set(syncs) == {"check: tolist"}, syncs


def test_the_engine_clips_like_torch_with_the_norm_it_returns():
    """`Engine.gradient_norm` computes torch's total norm once and clips with it: the same
    gradients and norm as `torch.nn.utils.clip_grad_norm_`."""
    from tnlora_cli.training.engines import Engine

    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    engine = Engine(TrainingConfig(max_grad_norm=0.1, mixed_precision="no"))
    engine._remember(torch.optim.AdamW(model.parameters()))
    model(torch.randn(4, 5)).square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    reference = [torch.nn.Parameter(torch.zeros_like(g)) for g in expected]
    for r, g in zip(reference, expected):
        r.grad = g.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(reference, 0.1)
    norm = engine.gradient_norm()
    assert torch.equal(norm, expected_norm) and norm > 0.1
    for p, r in zip(model.parameters(), reference):
        assert torch.equal(p.grad, r.grad)

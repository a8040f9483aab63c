"""tnlora's adapters as peft methods (`import tnlora_cli.peft`): the same tensors as tnlora's own
injection, peft's whole adapter life cycle, transformers' adapter API and HF Trainer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import write_recipe

peft = pytest.importorskip("peft")

from transformers import AutoModelForCausalLM

from tnlora_cli.count import count_params
from tnlora_cli.model.inject import inject_adapter
from tnlora_cli.model.state import SHARED_ATTR
from tnlora_cli.peft import LorettaConfig, TensorGuideConfig, TeraConfig, TracConfig
from tnlora_cli.recipe.load import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "v_proj"]
#: adapter type -> (peft config class, settings that fit the tiny Llama: hidden 32, v_proj 32 -> 16)
KINDS = {
    "trac": (TracConfig, {"r": 4}),
    "tera": (TeraConfig, {"outdim": 4}),
    "loretta": (LorettaConfig, {"r": 4, "tt_rank": 2}),
    "tensorguide": (TensorGuideConfig, {"hidden": 4}),
}
INPUT = torch.tensor([[2, 11, 12, 13, 14, 15, 16, 3], [2, 21, 22, 23, 24, 25, 26, 3]])


def _base(tiny_models) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()


def _peft_model(tiny_models, kind: str, **extra):
    cls, settings = KINDS[kind]
    return peft.get_peft_model(_base(tiny_models), cls(target_modules=TARGETS, task_type="CAUSAL_LM", **settings, **extra))


def _perturb(model, seed: int = 1) -> None:
    """Move every trainable tensor away from its start (ΔW = 0 there), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_same_tensors_and_counts_as_tnlora(tiny_models, make_recipe, tmp_path, kind):
    pm = _peft_model(tiny_models, kind)
    own = _base(tiny_models)
    tn_config = pm.peft_config["default"].to_tnlora()
    inject_adapter(own, tn_config)
    # Same tensors for the same seed: every per-layer tensor and every shared tensor, once.
    mine = {k: v for k, v in own.state_dict().items() if ".adapter." in k or k.startswith(SHARED_ATTR + ".")}
    theirs = peft.get_peft_model_state_dict(pm)
    renamed = {
        k.replace(".adapter.", ".tnlora_adapter.").replace(f"{SHARED_ATTR}.tensors.", "tn_shared.tnlora_store.tensors."): v for k, v in mine.items()
    }
    assert {f"base_model.model.{k}" for k in renamed} == set(theirs)
    for key, value in renamed.items():
        assert torch.equal(theirs[f"base_model.model.{key}"], value), key
    # Same update for the same moved tensors.
    _perturb(pm)
    own.load_state_dict({k.removeprefix("base_model.model.").replace(".tnlora_adapter.", ".adapter.").replace("tn_shared.tnlora_store.", f"{SHARED_ATTR}."): v
                         for k, v in peft.get_peft_model_state_dict(pm).items()}, strict=False)
    assert torch.allclose(_logits(pm), _logits(own), atol=1e-6)
    # Trainable parameters as tnlora count-params counts them (shared cores once).
    raw = make_recipe("llama", "causal-lm")
    raw["adapter"] = {"type": kind, "target_modules": TARGETS, **KINDS[kind][1]}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", raw))
    expected = count_params(recipe).adapter_total.trainable
    assert pm.get_nb_trainable_parameters()[0] == expected > 0


def test_saved_adapters_reload_in_a_fresh_process(tiny_models, tmp_path):
    expected = {}
    for kind in KINDS:
        pm = _peft_model(tiny_models, kind, save_frozen=kind != "tera")
        _perturb(pm)
        pm.save_pretrained(tmp_path / kind)
        expected[kind] = _logits(pm)
        with pm.disable_adapter():
            base = _logits(pm)
        assert not torch.equal(base, expected[kind])
        config = json.loads((tmp_path / kind / "adapter_config.json").read_text())
        assert config["peft_type"] == f"TNLORA_{kind.upper()}" and config["tnlora_version"]
        assert config["frozen"]["seed"] == 0 and len(config["frozen"]["checksum"]) == 64
        card = (tmp_path / kind / "README.md").read_text()
        assert "pip install tnlora" in card and "import tnlora_cli.peft" in card and f"KeyError: 'TNLORA_{kind.upper()}'" in card
    torch.save({"expected": expected, "base": base}, tmp_path / "expected.pt")
    # save_frozen: false keeps the frozen random tensors out of the file (TeRA: all but d).
    from safetensors.torch import load_file

    assert all(".d." in k for k in load_file(tmp_path / "tera/adapter_model.safetensors"))
    script = textwrap.dedent(f"""
        import torch, tnlora_cli.peft
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        ref = torch.load({str(tmp_path / "expected.pt")!r})
        x = torch.tensor({INPUT.tolist()})
        for kind, want in ref["expected"].items():
            base = AutoModelForCausalLM.from_pretrained({str(tiny_models["llama"])!r}).eval()
            model = PeftModel.from_pretrained(base, {str(tmp_path)!r} + "/" + kind)
            with torch.no_grad():
                assert torch.equal(model(input_ids=x).logits, want), kind
                merged = model.merge_and_unload()
                assert not any("tnlora" in n for n, _ in merged.named_modules()), kind
                assert (merged(input_ids=x).logits - want).abs().max() < 1e-5, kind
            print("ok", kind)
    """)
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [w for kind in KINDS for w in ("ok", kind)]


def test_unload_disable_and_a_second_adapter(tiny_models, tmp_path):
    base_logits = _logits(_base(tiny_models))
    first = _peft_model(tiny_models, "trac")
    _perturb(first, seed=1)
    first.save_pretrained(tmp_path / "first")
    want_first = _logits(first)
    second = _peft_model(tiny_models, "trac", seed=5)
    _perturb(second, seed=2)
    second.save_pretrained(tmp_path / "second")
    want_second = _logits(second)

    model = peft.PeftModel.from_pretrained(_base(tiny_models), tmp_path / "first")
    model.load_adapter(tmp_path / "second", adapter_name="other")
    assert torch.equal(_logits(model), want_first)
    model.set_adapter("other")
    assert torch.equal(_logits(model), want_second)
    with model.disable_adapter():
        assert torch.equal(_logits(model), base_logits)
    # Each adapter's shared cores are its own, registered once each.
    stores = model.base_model.model.tn_shared.tnlora_store
    assert set(stores) == {"default", "other"}
    assert not any(a is b for a in stores["default"].tensors.values() for b in stores["other"].tensors.values())
    model.delete_adapter("default")
    assert torch.equal(_logits(model), want_second)
    plain = model.unload()
    assert torch.equal(_logits(plain), base_logits) and not hasattr(plain, "tn_shared")


def test_transformers_load_adapter(tiny_models, tmp_path):
    pm = _peft_model(tiny_models, "tera")
    _perturb(pm)
    pm.save_pretrained(tmp_path / "a")
    model = _base(tiny_models)
    model.load_adapter(str(tmp_path / "a"))
    assert torch.allclose(_logits(model), _logits(pm), atol=1e-6)


def test_a_regenerated_frozen_tensor_that_differs_is_refused(tiny_models, tmp_path):
    pm = _peft_model(tiny_models, "trac", save_frozen=False)
    pm.save_pretrained(tmp_path / "a")
    path = tmp_path / "a/adapter_config.json"
    config = json.loads(path.read_text())
    config["frozen"]["checksum"] = "0" * 64
    path.write_text(json.dumps(config))
    with pytest.raises(Exception, match="do not match the checksum"):
        peft.PeftModel.from_pretrained(_base(tiny_models), tmp_path / "a")


def test_gradient_checkpointing_gives_the_same_gradients(tiny_models):
    grads = []
    for checkpointing in (False, True):
        pm = _peft_model(tiny_models, "tera")
        _perturb(pm)
        if checkpointing:
            pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pm.train()
        pm(input_ids=INPUT, labels=INPUT).loss.backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_hf_trainer_trains_only_the_adapter_and_resumes(tiny_models, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    rows = Dataset.from_dict({"input_ids": [INPUT[i % 2].tolist() for i in range(16)], "labels": [INPUT[i % 2].tolist() for i in range(16)]})

    def trainer(out: Path, steps: int):
        pm = _peft_model(tiny_models, "trac")
        args = TrainingArguments(
            output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2, save_steps=2,
            logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
        )
        return pm, Trainer(model=pm, args=args, train_dataset=rows)

    pm, run = trainer(tmp_path / "full", 4)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    run.train()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable and all("tnlora" in n for n in changed)
    checkpoint = tmp_path / "full/checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    assert json.loads((checkpoint / "adapter_config.json").read_text())["peft_type"] == "TNLORA_TRAC"
    # Resumed from step 2 of another run, it ends where the uninterrupted run ends.
    resumed, run2 = trainer(tmp_path / "full", 4)
    run2.train(resume_from_checkpoint=str(checkpoint))
    assert run2.state.global_step == 4
    for (n, p), (_, q) in zip(pm.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_a_peft_outside_the_tested_range_is_refused_at_import():
    code = "import peft; peft.__version__ = '0.17.1'; import tnlora_cli.peft"
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: tnlora_cli.peft: peft 0.17.1 is installed") and "pip install 'tnlora[peft]'" in last


def test_tnlora_verbs_read_an_adapter_trained_with_peft(tiny_models, tmp_path):
    from tnlora_cli.errors import CheckpointError
    from tnlora_cli.evaluate import evaluate_run
    from tnlora_cli.merge import merge_run
    from tnlora_cli.ranks import inspect_run

    pm = _peft_model(tiny_models, "tera")
    _perturb(pm)
    pm.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a/adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_models["llama"])
    want = _logits(pm)
    # inspect-rank reads the peft files: the ranks of the updates peft's model applies.
    report = inspect_run(tmp_path / "a")
    ranks = {row["name"]: row["rank"] for row in report["layers"]}
    layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "get_delta_weight")}
    assert ranks == {n: int(torch.linalg.matrix_rank(m.get_delta_weight("default"))) for n, m in layers.items()}
    assert len(ranks) == 4 and max(ranks.values()) > 16
    # merge: tnlora's streaming merge, verified on probe texts, equals peft's adapter model.
    merge_run(tmp_path / "a", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (_logits(merged) - want).abs().max() < 1e-5
    with pytest.raises(CheckpointError, match="brings no held-out data"):
        evaluate_run(tmp_path / "a")
    # export --as-lora of the peft files: exact at full rank, loaded by plain peft.
    from tnlora_cli.export import export_as_lora

    report = export_as_lora(tmp_path / "a", tmp_path / "lora", rank=32)
    assert max(row["relative_error"] for row in report.layers) < 1e-6
    lora = peft.PeftModel.from_pretrained(_base(tiny_models), tmp_path / "lora")
    assert (_logits(lora) - want).abs().max() < 1e-4


def test_save_as_lora_of_a_linear_tnlora_adapter(tiny_models, tmp_path):
    pm = _peft_model(tiny_models, "tera")
    _perturb(pm)
    assert pm.supports_lora_conversion()
    peft.save_as_lora(tmp_path / "lora", pm, rank=1.0)  # every singular value: exact up to rounding
    lora = peft.PeftModel.from_pretrained(_base(tiny_models), tmp_path / "lora")
    assert lora.peft_config["default"].peft_type == "LORA"
    assert (_logits(lora) - _logits(pm)).abs().max() < 1e-4


def test_merge_unmerge_inference_mode_and_transformers_add_adapter(tiny_models, tmp_path):
    pm = _peft_model(tiny_models, "trac")  # TRAC: trained shared cores, frozen shared cores
    _perturb(pm)
    want = _logits(pm)
    weight = pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    pm.merge_adapter()
    assert torch.allclose(_logits(pm), want, atol=1e-5)
    pm.unmerge_adapter()
    assert torch.allclose(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, weight, atol=1e-6)
    pm.save_pretrained(tmp_path / "a")
    # Loaded for inference, nothing trains, the shared cores included; loaded trainable, they train.
    frozen = peft.PeftModel.from_pretrained(_base(tiny_models), tmp_path / "a")
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = peft.PeftModel.from_pretrained(_base(tiny_models), tmp_path / "a", is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == pm.get_nb_trainable_parameters()[0]
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "tn_shared" in n)
    # transformers' own adapter API.
    model = _base(tiny_models)
    model.add_adapter(TracConfig(target_modules=TARGETS, r=4), adapter_name="fresh")
    assert any("tnlora_adapter.fresh" in n for n, _ in model.named_parameters())
    assert torch.equal(_logits(model), _logits(_base(tiny_models)))  # ΔW = 0 at the start



def test_a_classification_head_is_trained_and_saved_with_the_adapter(tiny_models, tmp_path):
    from transformers import AutoModelForSequenceClassification

    def base():
        torch.manual_seed(3)  # the new head: drawn the same each time
        return AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=3).eval()

    pm = peft.get_peft_model(base(), TeraConfig(target_modules=["query", "value"], outdim=4, task_type="SEQ_CLS"))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable) and any("tnlora_adapter" in n for n in trainable)
    _perturb(pm)
    want = _logits(pm)
    pm.save_pretrained(tmp_path / "a")
    torch.manual_seed(99)  # a different fresh head: the saved one must replace it
    reloaded = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=3).eval(), tmp_path / "a")
    assert torch.equal(_logits(reloaded), want)

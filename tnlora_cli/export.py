"""`tnlora export`: any adapter's ΔW as an ordinary LoRA (`--as-lora`), or the adapter itself in
peft's format (`--as-peft`, `export_as_peft` below).

`--as-lora`:
Per layer, ΔW = U S Vᵀ is truncated to rank k (a fixed `rank`, or the smallest k keeping
`energy` of Σσ²) and written as lora_B = U_k S_k (out, k), lora_A = V_kᵀ (k, in) with
lora_alpha = k, so peft's scaling is 1 and B A is the truncated ΔW. Low-rank updates get
U, S, V from their factors (two thin QRs and a small SVD); others from a dense SVD. The
relative Frobenius error of the truncation is reported per layer; for updates of rank at
most k (LoRA itself at its r) the export is exact up to rounding.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import __version__
from .adapters.dora import MAGNITUDE
from .adapters.layers import AdaptedLinear, AdaptedSlice
from .errors import MergeError, RecipeError
from .model.build import load_adapters_for_updates, load_adapters_on_meta, load_run, saved_roles
from .model.inject import adapted_layers, merge_units, require_linear
from .model.loading import HEAD_NAMES, base_model_reference, resolve_model
from .model.peft_format import PEFT_PREFIX, peft_task_type, to_peft_key
from .model.state import SHARED_ATTR, is_adapter_tensor
from .model.targets import module_roles
from .report.reporter import Reporter
from .run.atomic import atomic_directory
from .run.outputs import protected_paths, refuse_mount_point, refuse_overlap, require_finite


@dataclass
class ExportReport:
    out: Path
    layers: list[dict] = field(default_factory=list)  # name, rank, relative_error


def _svd(adapter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out, k), S (k), V (in, k) of W' − W0 (ΔW, or DoRA's rescaled update), from thin
    factors when the update has them."""
    factors = adapter.weight_change_factors()
    if factors is None:
        u, s, vh = torch.linalg.svd(adapter.weight_change().double(), full_matrices=False)
        return u, s, vh.T
    a, b = (t.double() for t in factors)
    q_a, r_a = torch.linalg.qr(a)
    q_b, r_b = torch.linalg.qr(b)
    u_m, s, vh_m = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ u_m, s, q_a @ vh_m.T


def _choose_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    if rank is not None:
        return max(1, min(rank, s.numel()))
    share = (s**2).cumsum(0) / (s**2).sum().clamp_min(1e-300)
    return max(1, int((share < energy - 1e-12).sum()) + 1)


@torch.no_grad()
def head_base_tensors(path: str | Path, targets: list[str]) -> dict[str, torch.Tensor]:
    """The frozen base weights of adapted layers inside the task head, under peft's keys
    (`base_model.model.<layer>.base_layer.weight`, `.bias`).

    A classification head is made for the run's labels from the seeded RNG (the checkpoint
    has none, or one of another size), so a peft user loading the checkpoint with
    `num_labels` gets other random weights under the adapter: the exported adapter carries
    the run's, and peft loads them into the wrapped layer with the adapter. Other targets'
    base weights are the checkpoint's and are not written."""
    in_head = [name for name in targets if name.split(".")[0] in HEAD_NAMES]
    if not in_head:
        return {}
    run = load_run(path, dtype="auto", quantize=False, data=False)
    tensors = {}
    for name in in_head:
        for key, tensor in run.prepared.model.get_submodule(name).base_layer.state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.base_layer.{key}"] = tensor.detach().clone().contiguous()
    return tensors


@torch.no_grad()
def export_as_lora(
    path: str | Path,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> ExportReport:
    reporter = reporter or Reporter()
    if (rank is None) == (energy is None):
        raise RecipeError("export: give exactly one of --rank and --energy", hint="e.g. --rank 16 or --energy 0.99")
    if rank is not None and rank < 1:
        raise RecipeError(f"--rank {rank}: must be at least 1")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise RecipeError(f"--energy {energy}: must be in (0, 1]")
    out = Path(out)
    refuse_mount_point(out)
    if out.exists() and not force:
        raise MergeError(f"{out} already exists", hint="pass --force to replace it, or choose another --out", exit_code=2)
    model, meta = load_adapters_for_updates(path)
    recipe, config, state = meta["recipe"], meta["config"], meta["state"]
    refuse_overlap(out, protected_paths(path, meta["adapter_dir"], resolve_model(recipe.model, recipe.trust_remote_code, recipe.allow_pickle)))
    require_finite(state, meta["adapter_dir"])
    # Per layer whose weight changes: a fused layer's adapted slices (c_attn.q, c_attn.v)
    # become one LoRA on the fused layer, each slice's B in its own rows.
    layers = list(merge_units(model))
    require_linear(model, "it has no LoRA form")
    tensors: dict[str, torch.Tensor] = {}
    report = ExportReport(out)
    ranks: dict[str, int] = {}
    fan_in_fan_out = False
    reporter.start(len(layers), "factorising updates")
    for i, (name, layer) in enumerate(layers):
        u, s, v = _svd(layer.adapter if isinstance(layer, AdaptedLinear) else layer)
        k = _choose_rank(s, rank, energy)
        total = float((s**2).sum())
        error = (float((s[k:] ** 2).sum()) / total) ** 0.5 if total > 0 else 0.0
        tensors[f"base_model.model.{name}.lora_A.weight"] = v[:, :k].T.float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (u[:, :k] * s[:k]).float().contiguous()
        ranks[name] = k
        fan_in_fan_out |= layer.fan_in_fan_out
        report.layers.append({"name": name, "rank": k, "relative_error": error})
        reporter.advance(i + 1)
    reporter.finish()
    heads = config.get("modules_to_save") or []
    for key, tensor in state.items():
        if not is_adapter_tensor(key):
            tensors[f"base_model.model.{key}"] = tensor.contiguous()
    tensors.update(head_base_tensors(path, list(ranks)))
    top = max(ranks.values())
    base = base_model_reference(recipe.model, resolve_model(recipe.model, recipe.trust_remote_code, recipe.allow_pickle))
    peft_config = {
        "peft_type": "LORA",
        "task_type": peft_task_type(recipe.task),
        "base_model_name_or_path": base["base_model_name_or_path"],  # a hub id where one is known: portable
        "r": top,
        "lora_alpha": top,
        # Per-layer ranks (from --energy) with alpha = rank, so every layer's scaling is 1.
        "rank_pattern": {re.escape(n): k for n, k in ranks.items() if k != top},
        "alpha_pattern": {re.escape(n): k for n, k in ranks.items() if k != top},
        "target_modules": sorted(ranks),
        "modules_to_save": heads or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
    }
    with atomic_directory(out, on_exists="replace" if force else "error") as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
        (tmp / "tnlora_export.json").write_text(json.dumps({"source": str(path), "adapter": recipe.adapter.type, **base, "layers": report.layers}, indent=2) + "\n")
    return report


@torch.no_grad()
def export_as_peft(path: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write a run's adapter as a peft adapter directory, tensors as trained (no SVD): LoRA as
    peft's LoRA, VeRA as peft's VeRA (same definition: λ_b ⊙ B_sl (λ_d ⊙ A_sl x), one A and B
    per model sliced per layer), TRAC, TeRA, LoRETTA and TensorGuide as tnlora's peft types
    (`import tnlora_cli.peft` registers them). Frozen random tensors are always written."""
    out = Path(out)
    if out.exists() and not force:
        raise MergeError(f"{out} already exists", hint="pass --force to replace it, or choose another --out", exit_code=2)
    model, meta = load_adapters_on_meta(path)
    recipe, config, state = meta["recipe"], meta["config"], meta["state"]
    resolved = resolve_model(recipe.model, recipe.trust_remote_code, recipe.allow_pickle)
    refuse_overlap(out, protected_paths(path, meta["adapter_dir"], resolved))
    require_finite(state, meta["adapter_dir"])
    kind = recipe.adapter.type
    targets = list(config["targets"])
    fused = [n for n, layer in adapted_layers(model) if isinstance(layer, AdaptedSlice)]
    if fused:
        raise MergeError(
            f"export --as-peft: {fused[0]} is a slice of a fused layer, which peft's layer-wise adapters cannot express",
            hint="export with --as-lora (one LoRA per fused layer), or train on whole layers", exit_code=2,
        )
    if saved_roles(config) != module_roles(targets):
        raise MergeError(
            "export --as-peft: this adapter shares tensors by roles of an older tnlora, which peft loading would name otherwise",
            hint="export with --as-lora", exit_code=2,
        )
    if kind == "vera" and recipe.adapter.use_dora:
        raise MergeError(
            "export --as-peft: peft's VeRA has no DoRA magnitude, so this VeRA + DoRA adapter has no peft VeRA form",
            hint="export with --as-lora (W' − W0 as a LoRA), or use the merged model (tnlora merge)", exit_code=2,
        )
    heads = list(config.get("modules_to_save") or [])
    adapter_state = {k: v for k, v in model.state_dict().items() if is_adapter_tensor(k)}  # frozen ones too, regenerated if not saved
    head_state = {k: v for k, v in state.items() if not is_adapter_tensor(k)}
    settings = recipe.adapter.model_dump(mode="json")
    common = {
        "base_model_name_or_path": base_model_reference(recipe.model, resolved)["base_model_name_or_path"],
        "task_type": peft_task_type(recipe.task),
        "target_modules": targets,
        "modules_to_save": heads or None,
        "inference_mode": True,
    }
    tensors = {f"{PEFT_PREFIX}{k}": v for k, v in head_state.items()} | head_base_tensors(path, targets)
    import peft

    if kind == "lora":
        peft_config = peft.LoraConfig(
            r=settings["r"], lora_alpha=settings["alpha"], use_rslora=settings["use_rslora"], lora_dropout=settings["dropout"],
            use_dora=settings["use_dora"],
            fan_in_fan_out=any(layer.fan_in_fan_out for _, layer in adapted_layers(model)), **common,
        )
        for key, value in adapter_state.items():
            layer, _, name = key.partition(".adapter.")
            # DoRA's magnitude is peft's `lora_magnitude_vector` (the same vector: m of W' = m ⊙ V / ‖V‖)
            name = {MAGNITUDE: "lora_magnitude_vector"}.get(name, name)
            tensors[f"{PEFT_PREFIX}{layer}.{name}.weight"] = value
    elif kind == "vera":
        peft_config = peft.VeraConfig(
            r=settings["r"], d_initial=settings["d_initial"], vera_dropout=settings["dropout"], save_projection=True,
            fan_in_fan_out=any(layer.fan_in_fan_out for _, layer in adapted_layers(model)), **common,
        )
        for key, value in adapter_state.items():
            if key.startswith(SHARED_ATTR + "."):  # tnlora_shared.tensors.vera_A -> base_model.vera_A
                tensors["base_model." + key.rpartition(".")[2]] = value
            else:
                layer, _, name = key.partition(".adapter.")
                tensors[f"{PEFT_PREFIX}{layer}.vera_{name}"] = value
    else:
        from .integrations.peft import CONFIG_CLASSES

        fields = {k: v for k, v in settings.items() if k != "type"}
        peft_config = CONFIG_CLASSES[kind](**{**fields, **common, "save_frozen": True})
        tensors |= {to_peft_key(k): v for k, v in adapter_state.items()}
    with atomic_directory(out, on_exists="replace" if force else "error") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        peft_config.save_pretrained(str(tmp))  # tnlora's types add their model card section here
        if kind in ("lora", "vera"):
            (tmp / "README.md").write_text(
                f"# {kind} adapter exported by tnlora {__version__}\n\nA peft {peft_config.peft_type.value} adapter: plain peft loads it "
                "(`PeftModel.from_pretrained(base_model, this_directory)`); no tnlora needed.\n"
            )
        (tmp / "tnlora_export.json").write_text(json.dumps({"source": str(path), "adapter": kind, "tnlora_version": __version__, "format": "peft"}, indent=2) + "\n")
    return out

"""`tnlora merge`: W0 + ΔW into a plain Hugging Face directory, then verified.

ΔW is built in fp32 from the adapter's factors and cast once to the target dtype (the
base checkpoint's own dtype unless asked otherwise: never a silent upcast). The result is
written beside the destination and renamed into place only after it was reloaded with
`from_pretrained` and its logits matched the adapter model's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_directory
from .data import collate
from .errors import MergeError
from .inject import adapted_layers, merge_into_base
from .modeling import DTYPES, model_class
from .pipeline import load_run
from .reporting import Reporter

#: (absolute, relative to the largest reference logit) tolerance per merged dtype. fp32 allows
#: 1e-5 of the logit scale on top of 1e-4: a 30-layer model's logits (|z| ~ 20) differ by
#: ~1e-4 between x·W0 + x·A·B and x·(W0 + BA) from rounding alone.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 2e-2)}


@dataclass
class MergeReport:
    out: Path
    dtype: str
    merged_layers: int
    untied: list[str]
    max_abs_diff: float | None
    mean_abs_diff: float | None
    tolerance: float | None


def checkpoint_dtype(model_path: str) -> str:
    """The dtype the base checkpoint stores, from its config (float32 when unstated)."""
    config = json.loads((Path(model_path) / "config.json").read_text()) if Path(model_path).is_dir() else {}
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return name if name in DTYPES else "float32"


def _untie_adapted(model: nn.Module) -> list[str]:
    """Give an adapted weight that is tied to another module (lm_head <-> embeddings) its
    own copy, and tell the config, so merging does not silently change the other use."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append(name)
    untied = []
    for name, layer in adapted_layers(model):
        weight = layer.base_layer.weight
        sharers = [n for n in owners.get(id(weight), []) if n != name and not n.startswith(name + ".") and n != name + ".base_layer"]
        if sharers:
            layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            untied.append(f"{name} (was tied to {', '.join(sharers)})")
    if untied:
        for config in (model.config, getattr(model.config, "text_config", None)):
            if config is not None and hasattr(config, "tie_word_embeddings"):
                config.tie_word_embeddings = False
    return untied


@torch.no_grad()
def merge_run(
    path: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    verify: bool = True,
    n_verify: int = 8,
    reporter: Reporter | None = None,
) -> MergeReport:
    reporter = reporter or Reporter()
    out = Path(out)
    if out.exists() and not force:
        raise MergeError(f"{out} already exists", hint="pass --force to replace it, or choose another --out")
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"--dtype {dtype}: unknown", hint=f"use one of {', '.join(DTYPES)}")
    reporter.status(f"loading {path}")
    run = load_run(path, dtype="auto")
    run.load_weights()
    prepared = run.prepared
    model = prepared.model.eval()
    target_name = dtype or checkpoint_dtype(prepared.model_path)
    target = DTYPES[target_name]
    for name, layer in adapted_layers(model):
        if not layer.adapter.is_linear:
            raise MergeError(f"{name}: the {prepared.recipe.adapter.type} update is nonlinear in the input and cannot be merged into a weight")

    samples = prepared.data.eval[:n_verify]
    batch = collate(samples, prepared.tokenizer.pad_token_id)
    batch.pop("labels")
    reference = model(**batch).logits.float() if verify else None

    untied = _untie_adapted(model)
    reporter.status(f"merging {len(list(adapted_layers(model)))} adapted layers into {target_name} weights")
    merged = merge_into_base(model, target)
    model.to(target)
    model.config.dtype = target
    with atomic_directory(out, overwrite=force) as tmp:
        model.save_pretrained(tmp)
        prepared.tokenizer.save_pretrained(tmp)
        max_diff = mean_diff = tol = None
        if verify:
            reporter.status("reloading the merged model to compare logits")
            reloaded = model_class(prepared.recipe.task).from_pretrained(tmp, dtype=target).eval()
            logits = reloaded(**batch).logits.float()
            diff = (logits - reference).abs()
            max_diff, mean_diff = diff.max().item(), diff.mean().item()
            atol, rtol = TOLERANCES[target]
            tol = atol + rtol * reference.abs().max().item()
            if not max_diff <= tol:
                raise MergeError(
                    f"verification failed: merged logits differ from the adapter model's by up to {max_diff:.3g} (tolerance {tol:.3g}); nothing was written",
                    hint="merge in a wider dtype (--dtype float32) or report this as a bug",
                )
    return MergeReport(out, target_name, merged, untied, max_diff, mean_diff, tol)

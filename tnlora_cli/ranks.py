"""`tnlora inspect-rank`: rank and spectrum of every adapter's weight update, per layer.

Updates that are products of thin factors, ΔW = B Aᵀ with A (in, k), B (out, k) (LoRA,
VeRA, LoRETTA, TRAC, linear TensorGuide), get their exact spectrum from the factors:
A = Q_a R_a, B = Q_b R_b, so ΔW = Q_b (R_b R_aᵀ) Q_aᵀ has the singular values of the
k × k matrix R_b R_aᵀ. Other updates (TeRA) take a dense SVD, on the GPU when there is one.

The adapter tensors are real; the base model is built on the meta device, so no base
weights are read.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import RecipeError
from .model.build import load_adapters_for_updates
from .model.inject import adapted_layers
from .model.state import is_adapter_tensor
from .report.reporter import Reporter
from .run.atomic import atomic_file
from .run.outputs import require_finite
from .tensor.spectrum import spectrum_dense, spectrum_from_factors, summarise


@dataclass
class LayerRank:
    name: str
    role: str
    layer: int | None
    shape: tuple[int, int]
    max_rank: int
    rank: int | None
    effective_rank: float | None
    rank_90: int | None
    rank_99: int | None
    top_singular_values: list[float]
    method: str  # "factors", "dense" or "nonlinear"


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return int(match.group(1)) if match else None


def inspect_run(path: str | Path, rtol: float | None = None, dense: bool = False, reporter: Reporter | None = None) -> dict[str, Any]:
    """Rank statistics of every adapted layer of a run, checkpoint or adapter directory."""
    reporter = reporter or Reporter()
    if rtol is not None and not (math.isfinite(rtol) and 0.0 <= rtol < 1.0):
        raise RecipeError(f"--rtol {rtol}: must be a number in [0, 1)", hint="e.g. --rtol 1e-6, or leave it out for eps(fp32) x max(m, n)")
    model, meta = load_adapters_for_updates(path)
    require_finite(meta["state"], meta["adapter_dir"])
    recipe = meta["recipe"]
    layers = list(adapted_layers(model))
    # Adapter tensors only: a DoRA run's model is loaded with its base and task head.
    adapter_params = {id(p): p for n, p in model.named_parameters(remove_duplicate=False) if is_adapter_tensor(n)}
    trainable = sum(t.numel() for t in adapter_params.values() if t.requires_grad and t.device.type != "meta")
    reporter.start(len(layers), f"ranks of {path}")
    results: list[LayerRank] = []
    with torch.no_grad():
        for i, (name, layer) in enumerate(layers):
            adapter = layer.adapter
            shape = (adapter.out_features, adapter.in_features)
            common = {"name": name, "role": adapter.role, "layer": _layer_index(name), "shape": shape, "max_rank": min(shape)}
            if not adapter.is_linear:
                results.append(LayerRank(**common, rank=None, effective_rank=None, rank_90=None, rank_99=None, top_singular_values=[], method="nonlinear"))
            else:
                factors = None if dense else adapter.weight_change_factors()
                if factors is not None:
                    sv, method = spectrum_from_factors(*factors), "factors"
                else:
                    sv, method = spectrum_dense(adapter.weight_change()), "dense"
                results.append(LayerRank(**common, **summarise(sv, shape, rtol), method=method))
            reporter.advance(i + 1)
    reporter.finish()
    return {
        "run": str(path),
        "adapter_dir": meta["adapter_dir"],
        "adapter": recipe.adapter.type,
        "model": recipe.model,
        "trainable_parameters": trainable,
        "label": f"{recipe.adapter.type} ({trainable:,} params)",
        "layers": [asdict(r) for r in results],
    }


def write_csv(reports: list[dict[str, Any]], out_path: Path) -> None:
    import csv

    with atomic_file(out_path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "adapter", "module", "role", "layer", "out", "in", "max_rank", "rank", "effective_rank", "rank_90", "rank_99", "sigma_1", "method"])
        for report in reports:
            for r in report["layers"]:
                top = r["top_singular_values"][0] if r["top_singular_values"] else ""
                writer.writerow([report["run"], report["adapter"], r["name"], r["role"], r["layer"], *r["shape"], r["max_rank"], r["rank"], r["effective_rank"], r["rank_90"], r["rank_99"], top, r["method"]])

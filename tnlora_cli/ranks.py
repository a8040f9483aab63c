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
from .inject import adapted_layers
from .outputs import require_finite
from .pipeline import load_adapters_on_meta
from .reporting import Reporter

N_TOP = 8


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


def default_rtol(shape: tuple[int, int]) -> float:
    """torch.linalg.matrix_rank's default for fp32 data: eps · max(m, n)."""
    return torch.finfo(torch.float32).eps * max(shape)


def spectrum_from_factors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Singular values of B Aᵀ from A (in, k), B (out, k) in O((in + out) k² + k³)."""
    a, b = a.double(), b.double()
    _, r_a = torch.linalg.qr(a)
    _, r_b = torch.linalg.qr(b)
    return torch.linalg.svdvals(r_b @ r_a.T)


def spectrum_dense(delta: torch.Tensor) -> torch.Tensor:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.linalg.svdvals(delta.to(device=device, dtype=torch.float64)).cpu()


def summarise(sv: torch.Tensor, shape: tuple[int, int], rtol: float | None) -> dict[str, Any]:
    """Numerical rank, effective rank (entropy of the normalised spectrum), 90%/99% energy ranks."""
    sv = sv.detach().double().sort(descending=True).values
    top = float(sv[0]) if sv.numel() else 0.0
    if top == 0.0:
        return {"rank": 0, "effective_rank": 0.0, "rank_90": 0, "rank_99": 0, "top_singular_values": [0.0] * min(N_TOP, sv.numel())}
    tol = (rtol if rtol is not None else default_rtol(shape)) * top
    rank = int((sv > tol).sum())
    p = sv / sv.sum()
    p = p[p > 0]
    effective = math.exp(float(-(p * p.log()).sum()))
    energy = (sv**2).cumsum(0) / (sv**2).sum()
    rank_at = lambda share: int((energy < share - 1e-12).sum()) + 1  # noqa: E731
    return {
        "rank": rank,
        "effective_rank": effective,
        "rank_90": rank_at(0.90),
        "rank_99": rank_at(0.99),
        "top_singular_values": [float(v) for v in sv[:N_TOP]],
    }


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return int(match.group(1)) if match else None


def inspect_run(path: str | Path, rtol: float | None = None, dense: bool = False, reporter: Reporter | None = None) -> dict[str, Any]:
    """Rank statistics of every adapted layer of a run, checkpoint or adapter directory."""
    reporter = reporter or Reporter()
    if rtol is not None and not (math.isfinite(rtol) and 0.0 <= rtol < 1.0):
        raise RecipeError(f"--rtol {rtol}: must be a number in [0, 1)", hint="e.g. --rtol 1e-6, or leave it out for eps(fp32) x max(m, n)")
    model, meta = load_adapters_on_meta(path)
    require_finite(meta["state"], meta["adapter_dir"])
    recipe = meta["recipe"]
    layers = list(adapted_layers(model))
    trainable = sum(t.numel() for t in {id(p): p for p in model.parameters() if p.requires_grad and p.device.type != "meta"}.values())
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
                factors = None if dense else adapter.low_rank_factors()
                if factors is not None:
                    sv, method = spectrum_from_factors(*factors), "factors"
                else:
                    sv, method = spectrum_dense(adapter.delta_weight()), "dense"
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


def plot_ranks(reports: list[dict[str, Any]], out_path: Path) -> None:
    """One panel per module role: rank against layer index, one line per run, max rank dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FixedLocator, ScalarFormatter

    roles = sorted({layer["role"] for report in reports for layer in report["layers"]})
    fig, axes = plt.subplots(1, len(roles), figsize=(5.6 * len(roles), 4.2), dpi=120, squeeze=False)
    markers = "osD^vP*X"
    styles = ["-", "--", "-.", ":"]
    for ax, role in zip(axes[0], roles):
        max_drawn = set()
        for k, report in enumerate(reports):
            rows = [layer for layer in report["layers"] if layer["role"] == role]
            if not rows:
                continue
            xs = [r["layer"] if r["layer"] is not None else j for j, r in enumerate(rows)]
            if all(r["rank"] is None for r in rows):
                ax.plot([], [], label=f"{report['label']}: nonlinear, no rank")
                continue
            ys = [r["rank"] for r in rows]
            # Equal ranks (LoRA and TRAC both at r) must stay visible: hollow markers of
            # shrinking size nest inside each other, and line styles differ.
            ax.plot(xs, ys, marker=markers[k % len(markers)], markersize=11 - 2 * (k % 4), markerfacecolor="none",
                    markeredgewidth=1.6, linestyle=styles[k % len(styles)], label=report["label"])
            cap = rows[0]["max_rank"]
            if cap not in max_drawn:
                ax.axhline(cap, color="gray", linestyle="--", linewidth=1)
                ax.annotate(f"max rank {cap}", (0.01, cap), xycoords=("axes fraction", "data"), va="bottom", fontsize=8, color="gray")
                max_drawn.add(cap)
        ax.set_title(role)
        ax.set_xlabel("layer")
        ax.set_ylabel("rank of ΔW")
        # Ranks span 1 to thousands: a base-2 log axis with plain-number ticks.
        ax.set_yscale("symlog", base=2, linthresh=1)
        top = max([1] + [layer["max_rank"] for report in reports for layer in report["layers"] if layer["role"] == role])
        ax.set_ylim(0, top * 1.6)
        ax.yaxis.set_major_locator(FixedLocator([0] + [2**i for i in range(int(math.log2(top)) + 1)]))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.grid(alpha=0.3)
    handles: dict = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.suptitle("Rank of each adapter's weight update per layer (dashed: largest possible)")
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, len(handles)), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(handles) - 1) // 4), 1, 1))
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_path)


def write_csv(reports: list[dict[str, Any]], out_path: Path) -> None:
    import csv

    with out_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "adapter", "module", "role", "layer", "out", "in", "max_rank", "rank", "effective_rank", "rank_90", "rank_99", "sigma_1", "method"])
        for report in reports:
            for r in report["layers"]:
                top = r["top_singular_values"][0] if r["top_singular_values"] else ""
                writer.writerow([report["run"], report["adapter"], r["name"], r["role"], r["layer"], *r["shape"], r["max_rank"], r["rank"], r["effective_rank"], r["rank_90"], r["rank_99"], top, r["method"]])

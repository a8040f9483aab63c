"""PNG figures (matplotlib, no display needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..run.atomic import atomic_file


def plot_loss_curve(metrics_path: Path, out_path: Path) -> None:
    """Training loss (and held-out loss where evaluated) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, held_out = [], []
    for line in Path(metrics_path).read_text().splitlines():
        rec = json.loads(line)
        if "train_loss" in rec:
            train.append((rec["step"], rec["train_loss"]))
        if "eval_loss" in rec:
            held_out.append((rec["step"], rec["eval_loss"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if held_out:
        ax.plot(*zip(*held_out), "o-", label="held-out loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(out_path, keep_suffix=True) as tmp:
        fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)


def plot_confusion(counts: list[list[int]], labels: list[str], out_path: Path, title: str = "") -> None:
    """Confusion matrix: rows the true class, columns the predicted one, each cell its count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    side = min(12.0, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(side, side), dpi=120)
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        peak = max(max(row) for row in counts) or 1
        for i, row in enumerate(counts):
            for j, value in enumerate(row):
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8, color="white" if value > peak / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_file(out_path, keep_suffix=True) as tmp:
        fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)


def plot_contact_sheet(examples: list[dict], augmented: list[dict] | None, labels: list[str], image: dict[str, Any], out_path: Path) -> None:
    """Training images with their labels: one row as stored, one as augmented (if given).
    Pixel values are mapped back through the preprocessing's mean, std and rescale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    mean = torch.tensor(image["mean"]).view(-1, 1, 1)
    std = torch.tensor(image["std"]).view(-1, 1, 1)
    rows = [("as stored", examples)] + ([("augmented", augmented)] if augmented is not None else [])
    n = len(examples)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.9 * len(rows)), dpi=120, squeeze=False)
    for r, (name, items) in enumerate(rows):
        for c, example in enumerate(items):
            pixels = ((example["pixel_values"] * std + mean) / image["rescale"]).clamp(0, 255).to(torch.uint8)
            ax = axes[r][c]
            if pixels.shape[0] == 1:
                ax.imshow(pixels[0].numpy(), cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(pixels[:3].permute(1, 2, 0).numpy())
            ax.set_title(labels[example["labels"]], fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    with atomic_file(out_path, keep_suffix=True) as tmp:
        fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)


def plot_ranks(reports: list[dict[str, Any]], out_path: Path) -> None:
    """One panel per module role: rank against layer index, one line per run, max rank dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, MaxNLocator, ScalarFormatter

    roles = sorted({layer["role"] for report in reports for layer in report["layers"]})
    # At least 8 inches wide: the title and a legend of three runs fit even with one panel.
    fig, axes = plt.subplots(1, len(roles), figsize=(max(8.0, 5.6 * len(roles)), 4.2), dpi=120, squeeze=False)
    markers = "osD^vP*X"
    styles = ["-", "--", "-.", ":"]
    for ax, role in zip(axes[0], roles):
        max_drawn = set()
        layers_drawn: set[int] = set()
        for k, report in enumerate(reports):
            rows = [layer for layer in report["layers"] if layer["role"] == role]
            if not rows:
                continue
            xs = [r["layer"] if r["layer"] is not None else j for j, r in enumerate(rows)]
            layers_drawn.update(xs)
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
        # Layer indices are integers: never ticks at 0.98, and one layer gets a sensible width.
        ax.xaxis.set_major_locator(FixedLocator(sorted(layers_drawn)) if len(layers_drawn) <= 12 else MaxNLocator(integer=True))
        if layers_drawn:
            ax.set_xlim(min(layers_drawn) - 0.5, max(layers_drawn) + 0.5)
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
    with atomic_file(out_path, keep_suffix=True) as tmp:
        fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)

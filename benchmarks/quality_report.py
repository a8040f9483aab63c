"""docs/results.md and its plots, generated from the cell results of benchmarks/quality.py.

    python benchmarks/quality.py report

Every number in the page comes from `benchmarks/quality/results/`: the tables, the Pareto
plots, the verdict on each paper claim and the guide. Nothing here is typed in by hand.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quality import FIGURES, RESULTS, ROOT, SEEDS, TASKS, best_lr, experiments, load_results, sweep_rates

DOCS = ROOT / "docs"
SCORES_0_100 = ("bleu", "chrf")  # sacrebleu's scale; every other metric is a fraction


@dataclass
class Summary:
    """One experiment of one task: its sweep and the seeds at its best rate."""

    name: str
    adapter: str
    best_lr: float
    seeds: list[dict[str, Any]]  # results at best_lr
    sweep: dict[float, dict[str, Any]]  # seed-0 result per rate

    def mean(self, key: str) -> float:
        return statistics.fmean(r["metrics"][key] for r in self.seeds)

    def std(self, key: str) -> float:
        values = [r["metrics"][key] for r in self.seeds]
        return statistics.stdev(values) if len(values) > 1 else 0.0

    def first(self, key: str) -> Any:
        return self.seeds[0][key]

    @property
    def trainable(self) -> int:
        return self.seeds[0]["parameters"]["trainable"]

    @property
    def stored(self) -> int:
        return self.seeds[0]["parameters"]["stored"]

    @property
    def complete(self) -> bool:
        return len(self.seeds) == len(SEEDS)


def summaries(task: str) -> list[Summary]:
    by_exp: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in load_results(task):
        by_exp[r["experiment"]].append(r)
    out = []
    for name, rows in sorted(by_exp.items()):
        lr = best_lr(rows, TASKS[task].metric)
        seeds = sorted((r for r in rows if r["learning_rate"] == lr), key=lambda r: r["seed"])
        sweep = {r["learning_rate"]: r for r in rows if r["seed"] == 0}
        out.append(Summary(name, rows[0]["adapter"]["type"], lr, seeds, dict(sorted(sweep.items()))))
    return out


def _pm(s: Summary, key: str, scale: float = 1.0) -> str:
    if len(s.seeds) < 2:
        return f"{s.mean(key) * scale:.1f} (1 seed)"
    return f"{s.mean(key) * scale:.1f} ± {s.std(key) * scale:.1f}"


def _verdict(a: Summary, b: Summary, metric: str, claim: str) -> tuple[str, str]:
    """Agree / disagree / inconclusive for 'a beats b' (claim='beats') or 'a matches b'.

    Noise: two standard errors of the difference of the seed means, and never less than
    one held-out example's worth of the metric."""
    n_eval = a.seeds[0].get("n_eval") or 164
    d = a.mean(metric) - b.mean(metric)
    se = math.sqrt(a.std(metric) ** 2 / len(a.seeds) + b.std(metric) ** 2 / len(b.seeds))
    noise = max(2 * se, 1 / n_eval)
    text = (f"{a.name} {100 * a.mean(metric):.1f} vs {b.name} {100 * b.mean(metric):.1f} "
            f"(difference {100 * d:+.1f} points, noise band ±{100 * noise:.1f}; "
            f"{a.trainable:,} vs {b.trainable:,} trainable parameters)")
    if claim == "beats":
        verdict = "agree" if d > noise else "disagree" if d < -noise else "inconclusive"
    else:
        verdict = "agree" if d >= -noise else "disagree"
    return verdict, text


def _short_log_ticks(ax: Any) -> None:
    """Log-axis ticks as 20k, 50k, 100k: minor labels only at 2 and 5, so that none run together."""
    from matplotlib.ticker import FuncFormatter

    def short(v: float) -> str:
        for scale, unit in ((1e6, "M"), (1e3, "k")):
            if v >= scale:
                return f"{v / scale:g}{unit}"
        return f"{v:g}"

    def minor(v: float, _: Any) -> str:
        lead = v / 10 ** math.floor(math.log10(v))
        return short(v) if round(lead, 6) in (2.0, 5.0) else ""

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: short(v)))
    ax.xaxis.set_minor_formatter(FuncFormatter(minor))


def _place_labels(fig: Any, ax: Any, points: list[tuple[float, float]], names: list[str]) -> None:
    """Name each point at the first offset around it whose label covers no other point or label
    (the first offset when none is clear)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    marks = [ax.transData.transform(p) for p in points]
    offsets = ((5, 4, "left"), (5, -11, "left"), (-5, 4, "right"), (-5, -11, "right"), (5, 12, "left"), (5, -19, "left"))
    taken = []
    for i, (point, name) in enumerate(zip(points, names)):
        others = [m for j, m in enumerate(marks) if j != i]
        for dx, dy, ha in offsets:
            label = ax.annotate(name, point, textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=8)
            box = label.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(t) for t in taken) and not any(box.contains(*m) for m in others):
                break
            label.remove()
        else:  # nowhere clear: the first offset, overlapping
            dx, dy, ha = offsets[0]
            box = ax.annotate(name, point, textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=8).get_window_extent(renderer)
        taken.append(box)


def _pareto_plot(task: str, rows: list[Summary], x_key: str, x_label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = TASKS[task].metric
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    colors = {a: f"C{i}" for i, a in enumerate(["lora", "vera", "loretta", "trac", "tera", "tensorguide"])}
    points, names = [], []
    for s in sorted(rows, key=lambda s: s.trainable):
        x = s.trainable if x_key == "trainable" else s.first("adapter_file_bytes") / 1024
        y = 100 * s.mean(metric)
        points.append((x, y))
        names.append(s.name)
        ax.errorbar(x, y, yerr=100 * s.std(metric), fmt="o", color=colors.get(s.adapter, "k"), capsize=3)
    frontier, best = [], -math.inf
    for x, y in sorted(points):
        if y > best:
            frontier.append((x, y))
            best = y
    ax.step(*zip(*frontier), where="post", color="gray", linestyle="--", linewidth=1, label="Pareto front")
    base = statistics.fmean(s.seeds[0]["base_metrics"][metric] for s in rows)
    low = min(y for _, y in points)
    ax.set_ylim(max(0.0, min(low, 100 * base) - 5) if 100 * base > low - 20 else low - 10, min(100.0, max(y for _, y in points) + 5))
    if 100 * base > ax.get_ylim()[0]:
        ax.axhline(100 * base, color="gray", linestyle=":", linewidth=1, label=f"base model ({100 * base:.1f})")
    else:
        ax.plot([], [], " ", label=f"base model: {100 * base:.1f} (below the axis)")
    ax.set_xscale("log")
    _short_log_ticks(ax)
    _place_labels(fig, ax, points, names)
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"held-out {metric} (%), mean ± std over seeds")
    ax.set_title(f"{task}: {metric} against {x_label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _task_section(task: str, rows: list[Summary]) -> list[str]:
    spec = TASKS[task]
    metric = spec.metric
    secondary = [m for m in spec.metrics if m not in (metric, "loss")]
    ordered = sorted(rows, key=lambda s: -s.mean(metric))
    env = ordered[0].seeds[0]["environment"]
    cfg = ordered[0].seeds[0]["training"]
    lines = [
        f"## {task}",
        "",
        f"Recipe `benchmarks/quality/tasks/{task}.yaml`: {cfg['max_steps']} steps of {cfg['batch_size']} "
        f"({cfg['lr_scheduler']} schedule, {cfg['warmup_steps']} warm-up steps) for every experiment. "
        f"Machine: {env['cpu']}, {env['cores']} cores, torch {env['torch']}, transformers {env['transformers']}; "
        f"each cell ran in its own process with {ordered[0].seeds[0]['threads']} thread(s), {'one cell' if spec.jobs == 1 else f'{spec.jobs} cells' if spec.jobs > 2 else 'two cells'} at a time. "
        f"{len(rows)} experiments, {sum(len(s.sweep) for s in rows)} sweep cells.",
        "",
        f"| experiment | best lr | {metric} (%) | " + " | ".join(f"{m} ({'0-100' if m in SCORES_0_100 else '%'})" for m in secondary)
        + " | held-out loss |" + (" forgetting |" if spec.forgetting else "") + " trainable | stored | file (KiB) | peak RSS (MiB) | s/step |",
        "|---|---|---|" + "---|" * (len(secondary) + spec.forgetting) + "---|---|---|---|---|---|",
    ]
    for s in ordered:
        cells = [f"`{s.name}`", f"{s.best_lr:g}", _pm(s, metric, 100)] + [_pm(s, m, 1 if m in SCORES_0_100 else 100) for m in secondary]
        cells += [f"{s.mean('loss'):.3f}"] + ([f"{s.mean('forgetting'):+.3f}"] if spec.forgetting else [])
        cells += [f"{s.trainable:,}", f"{s.stored:,}", f"{s.first('adapter_file_bytes') / 1024:.0f}",
                  f"{statistics.fmean(r['peak_rss_mib'] for r in s.seeds):.0f}",
                  f"{min(r['seconds_per_step'] for r in s.seeds):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    base = ordered[0].seeds[0]["base_metrics"]
    full = {s.name: s.seeds[0]["parameters"].get("trained_in_full", 0) for s in ordered}
    modules = ordered[0].seeds[0]["adapter"].get("modules_to_save") or []
    if modules and any(full.values()):  # modules the task trains in full beside every adapter (TensorGuide's stem)
        lines += ["", f"Every experiment also trains `{'`, `'.join(modules)}` in full ({max(full.values()):,} parameters, not in the "
                  "trainable column); with them: " + ", ".join(f"`{s.name}` {s.trainable + full[s.name]:,}" for s in ordered) + "."]
    lines += ["", f"Base model without adapter: {metric} {100 * base[metric]:.1f}%, loss {base['loss']:.3f}. "
              "Mean ± standard deviation over seeds " + ", ".join(map(str, SEEDS)) + " at each experiment's best learning rate. "
              "Trainable and stored count the adapter (stored adds the frozen random tensors the file keeps)"
              + ("." if spec.generate else "; the modules trained in full (above) are not counted, but their weights are in the file size."
                 if modules else "; a classification head, trained in full by every experiment, is not counted, "
                 "but its weights are in the file size.") + " "
              "Files keep VeRA's and TeRA's frozen random tensors (the default); with `adapter.save_frozen: false` they "
              "hold only the trainable tensors and the seed that regenerates the rest. "
              "Peak RSS is the whole training process; s/step is the optimizer-step time, the fastest of the seeds (other work on the machine only ever slows a cell down, so the fastest is the least disturbed).", ""]
    if spec.forgetting:
        lines += [f"Forgetting: held-out loss on Shakespeare (general text the task never trains on), tuned minus base "
                  f"(base {base['shakespeare_loss']:.3f} nats per token); lower is better, 0 is none.", ""]
    plan = {s.name: sweep_rates(task, s.name, experiments(task)[s.name]) for s in rows}
    rates = sorted({lr for s in rows for lr in s.sweep if lr not in plan[s.name][1]})
    refined = spec.refine or any(plan[s.name][1] for s in rows)

    def score(s: Summary, lr: float) -> str:
        r = s.sweep.get(lr)
        value = "-" if r is None else f"{100 * r['metrics'][metric]:.1f}"
        value = f"**{value}**" if lr == s.best_lr else value
        return value + (f" ({r['metrics']['forgetting']:+.2f})" if r is not None and spec.forgetting else "")

    lines += [f"Learning-rate sweep, seed 0, held-out {metric} (%)" + (" (forgetting)" if spec.forgetting else "")
              + "; bold: the rate the seeds ran at, -: not run"
              + ("; the last column holds the midpoints between the grid's best rate and its neighbours." if refined else "."), "",
              "| experiment | " + " | ".join(f"{lr:g}" for lr in rates) + (" | midpoints |" if refined else " |"),
              "|---|" + "---|" * (len(rates) + refined)]
    for s in sorted(rows, key=lambda s: s.name):
        cells = [score(s, lr) for lr in rates]
        if refined:
            cells.append(", ".join(f"{lr:g}: {score(s, lr)}" for lr in plan[s.name][1]) or "-")
        lines.append(f"| `{s.name}` | " + " | ".join(cells) + " |")
    if refined and all(p[2] for p in plan.values()):  # every midpoint done: how far they moved the optima
        moved = {s.name: s for s in rows if s.best_lr in plan[s.name][1]}
        gains = {n: s.sweep[s.best_lr]["metrics"][metric] - max(r["metrics"][metric] for lr, r in s.sweep.items() if lr not in plan[n][1])
                 for n, s in moved.items()}
        top = max(gains, key=gains.get) if gains else None
        lines += ["", f"Refined: a midpoint beat the grid for {len(moved)} of {len(rows)} experiments"
                  + (f", by up to {100 * gains[top]:.1f} points at seed 0 (`{top}`)." if top else ".")]
    if len(rows) < 2:  # one experiment: nothing to compare, no plots
        return lines + [""]
    params_png, size_png = FIGURES / f"pareto_params_{task}.png", FIGURES / f"pareto_size_{task}.png"
    _pareto_plot(task, rows, "trainable", "trainable parameters", params_png)
    _pareto_plot(task, rows, "size", "adapter file size (KiB)", size_png)
    lines += ["", f"![{metric} against trainable parameters](results/{params_png.name})", "",
              f"![{metric} against adapter file size](results/{size_png.name})", ""]
    if (FIGURES / f"ranks_{task}.png").exists():
        lines += [f"Rank of each best run's weight update per layer (`python benchmarks/quality.py ranks`, "
                  f"`tnlora inspect-rank` on the seed-0 run at the best rate):", "",
                  f"![ranks](results/ranks_{task}.png)", ""]
    return lines


CLAIMS = [
    # (paper claim, [(a, relation, b)]): experiment names of the task
    ("TRAC (Table 3): matches LoRA with about a tenth of its parameters, and beats VeRA and LoRETTA.",
     [("trac_r8", "matches", "lora_r8"), ("trac_r8", "beats", "vera_r256"), ("trac_r8", "beats", "loretta_tt5")]),
    ("TeRA (Table 2, Fig. 3): beats VeRA and LoRETTA at a similar size, with near full-rank updates.",
     [("tera_out8", "beats", "vera_r256"), ("tera_out8", "beats", "loretta_tt5")]),
    ("TensorGuide (Tables 1–2): beats LoRA and TT-LoRA with fewer parameters.",
     [("tensorguide_h8", "beats", "lora_r8"), ("tensorguide_h8", "beats", "loretta_tt5")]),
]
#: Tasks that check their own claims instead of CLAIMS (their experiments have other names).
TASK_CLAIMS = {
    "mnist_resnet18": [
        ("TensorGuide (Table 1, its released ResNet-18 image setup): beats LoRA and TT-LoRA with fewer parameters.",
         [("tensorguide_m1024", "beats", "lora_r4"), ("tensorguide_m1024", "beats", "loretta_tt8")]),
    ],
}


def _overall(verdicts: list[str]) -> str:
    """One word for a claim's checks: 'partly' only when some check agrees."""
    if not verdicts:
        return "not finished"
    if len(set(verdicts)) == 1:
        return verdicts[0]
    if "agree" in verdicts:
        return "partly"
    return "disagree where decided (the rest inconclusive)"


def _claims(task: str, rows: list[Summary]) -> list[str]:
    by_name = {s.name: s for s in rows}
    metric = TASKS[task].metric
    ranks_file = RESULTS / task / "ranks.json"
    ranks = json.loads(ranks_file.read_text()) if ranks_file.exists() else {}
    lines = [f"### Paper claims on {task}", ""]
    for claim, checks in TASK_CLAIMS.get(task, CLAIMS):
        parts, verdicts = [], []
        for a, relation, b in checks:
            if a not in by_name or b not in by_name or not (by_name[a].complete and by_name[b].complete):
                parts.append(f"{a} {relation} {b}: not finished (a verdict needs {len(SEEDS)} seeds of both)")
                continue
            verdict, text = _verdict(by_name[a], by_name[b], metric, relation)
            if "fewer parameters" in claim and by_name[a].trainable >= by_name[b].trainable:
                verdict, text = "disagree", text + f"; not fewer parameters ({by_name[a].trainable:,} >= {by_name[b].trainable:,})"
            verdicts.append(verdict)
            parts.append(f"{a} {relation} {b}? **{verdict}**: {text}")
        overall = _overall(verdicts)
        if verdicts and len(verdicts) < len(checks):
            overall += " so far (not finished)"
        if "full-rank" in claim and ranks:
            parts.append("rank of ΔW, mean over layers (numerical / effective / largest possible; numerical rank as a share of the largest): "
                         + ", ".join(f"{n} {r['mean_rank']:.0f} / {r['mean_effective_rank']:.0f} / {r['mean_max_rank']:.0f} ({100 * r['mean_rank_fraction']:.0f}%)"
                                     for n, r in ranks.items() if r["mean_rank"] is not None and n.startswith(("tera", "vera", "lora"))))
        lines += [f"- {claim} Overall: **{overall}**.", *[f"  - {p}." for p in parts]]
    lines.append("")
    return lines


def _guide(task: str, rows: list[Summary]) -> list[str]:
    metric = TASKS[task].metric
    best = max(rows, key=lambda s: s.mean(metric))
    close = [s for s in rows if s.mean(metric) >= best.mean(metric) - max(best.std(metric), 0.01)]
    smallest = min(close, key=lambda s: s.trainable)
    smallest_file = min(close, key=lambda s: s.first("adapter_file_bytes"))
    spread = {s.name: max(r["metrics"][metric] for r in s.sweep.values()) - min(r["metrics"][metric] for r in s.sweep.values()) for s in rows}
    robust = min(rows, key=lambda s: spread[s.name])
    touchy = max(rows, key=lambda s: spread[s.name])
    method_gap = best.mean(metric) - min(s.mean(metric) for s in rows)
    lr_gap = statistics.median(spread.values())
    fewer = "the best itself" if smallest is best else f"{best.trainable / smallest.trainable:.1f}× fewer than the best"
    lr_line = ("The learning rate matters more than the choice of method here" if lr_gap > method_gap
               else "The choice of method matters more than the learning rate here")
    lines = [
        f"### Which adapter should I use? ({task})", "",
        f"- Best {metric}: `{best.name}` ({_pm(best, metric, 100)}%, {best.trainable:,} trainable parameters, lr {best.best_lr:g}).",
        "- Within one standard deviation (or one point) of it: " + ", ".join(f"`{s.name}`" for s in sorted(close, key=lambda s: s.trainable)) + ".",
        f"- Fewest trainable parameters among those: `{smallest.name}` ({smallest.trainable:,}, {fewer}); "
        f"smallest file: `{smallest_file.name}` ({smallest_file.first('adapter_file_bytes') / 1024:.0f} KiB).",
        f"- {lr_line}: the median sweep spans {100 * lr_gap:.1f} points of {metric} between its best and worst rate "
        f"(`{touchy.name}` {100 * spread[touchy.name]:.1f}, `{robust.name}` {100 * spread[robust.name]:.1f}), while the "
        f"experiments' best means lie within {100 * method_gap:.1f} points. Sweep the rate before comparing adapters.",
    ]
    if TASKS[task].forgetting:
        gentle = min(close, key=lambda s: s.mean("forgetting"))
        gentlest = min(rows, key=lambda s: s.mean("forgetting"))
        among = ("the best itself" if gentle is best else f"against {best.mean('forgetting'):+.2f} for the best")
        lines.append(f"- Least forgetting among those: `{gentle.name}` ({gentle.mean('forgetting'):+.2f} nats per token on Shakespeare, "
                     f"{among}); of all experiments: `{gentlest.name}` ({gentlest.mean('forgetting'):+.2f}, at "
                     f"{_pm(gentlest, metric, 100)}% {metric}). The sweep picks the rate by {metric} alone; "
                     "a lower rate usually forgets less for a few points less (the sweep table shows both).")
    return lines + [""]


def _dora(task: str, rows: list[Summary]) -> list[str]:
    """Each experiment `X_dora` beside `X`: what DoRA's magnitude vector changes, at what cost."""
    by_name = {s.name: s for s in rows}
    pairs = [(by_name[n[: -len("_dora")]], s) for n, s in sorted(by_name.items()) if n.endswith("_dora") and n[: -len("_dora")] in by_name]
    if not pairs:
        return []
    metric = TASKS[task].metric
    lines = [f"### Does DoRA help? ({task})", "",
             "`adapter.use_dora: true` (the weight split into a trained magnitude per output row and a direction) "
             "on the same adapter and budget, with the same steps and seeds; its sweep starts from three rates around the "
             "best rate without DoRA and is extended and refined by the same rules. The verdict is whether the DoRA run beats "
             "the run without it, with the noise band of the claims above.", "",
             f"| adapter | without DoRA {metric} (%) | with DoRA {metric} (%) | difference | verdict | trainable without → with | "
             "s/step with / without |", "|---|---|---|---|---|---|---|"]
    verdicts: dict[str, list[str]] = defaultdict(list)
    for plain, dora in pairs:
        if not (plain.complete and dora.complete):
            lines.append(f"| `{plain.name}` | {_pm(plain, metric, 100)} | {_pm(dora, metric, 100)} | | not finished | | |")
            continue
        verdict, _ = _verdict(dora, plain, metric, "beats")
        worse, _ = _verdict(plain, dora, metric, "beats")
        word = "helps" if verdict == "agree" else "hurts" if worse == "agree" else "no clear difference"
        verdicts[word].append(f"`{plain.name}`")
        speed = min(r["seconds_per_step"] for r in dora.seeds) / min(r["seconds_per_step"] for r in plain.seeds)
        lines.append(f"| `{plain.name}` (lr {plain.best_lr:g} / {dora.best_lr:g}) | {_pm(plain, metric, 100)} | {_pm(dora, metric, 100)} | "
                     f"{100 * (dora.mean(metric) - plain.mean(metric)):+.1f} | {word} | {plain.trainable:,} → {dora.trainable:,} "
                     f"(+{dora.trainable - plain.trainable:,}) | {speed:.2f} |")
    if verdicts:
        lines += ["", "In short: " + "; ".join(f"{word} for {', '.join(names)}" for word, names in verdicts.items())
                  + ". The magnitudes add one number per output row of each adapted layer, the same for every adapter. "
                  "The s/step column compares cells run at different times under different load on a shared machine; "
                  "the controlled step-time ratios (each adapter against itself with DoRA in one process) are in "
                  "docs/benchmarks.md."]
    return lines + [""]


# The shipped recipes that take their learning rate from an experiment: (task, experiment). The
# report says where a recipe and the evidence part, so a re-run that moves a best rate is noticed.
SHIPPED_RECIPES = {
    "quickstart.yaml": ("minilm_recipes", "lora_r8"),
    "minilm_loretta.yaml": ("minilm_topics", "loretta_tt5"),
    "minilm_tensorguide.yaml": ("minilm_topics", "tensorguide_h8"),
    "minilm_tera.yaml": ("minilm_topics", "tera_out8"),
    "minilm_trac.yaml": ("minilm_topics", "trac_r8"),
    "minilm_vera.yaml": ("minilm_topics", "vera_r256"),
}


def _recipe_rates() -> tuple[list[str], list[str]]:
    """The table of shipped recipes against their experiment's best rate, and the recipes that differ."""
    import yaml

    best = {task: {s.name: s for s in summaries(task) if s.complete} for task in {t for t, _ in SHIPPED_RECIPES.values()}}
    lines = ["## Shipped recipes", "",
             "The recipes under `recipes/` take their learning rate from the sweeps above.", "",
             "| recipe | learning rate | experiment | its best rate | |", "|---|---|---|---|---|"]
    differ = []
    for recipe, (task, name) in SHIPPED_RECIPES.items():
        shipped = float(yaml.safe_load((ROOT / "recipes" / recipe).read_text())["training"]["learning_rate"])
        found = best[task].get(name)
        if found is None:
            lines.append(f"| `{recipe}` | {shipped:g} | `{task}/{name}` | not finished | |")
            continue
        same = math.isclose(shipped, found.best_lr, rel_tol=1e-6)
        differ += [] if same else [recipe]
        lines.append(f"| `{recipe}` | {shipped:g} | `{task}/{name}` | {found.best_lr:g} | {'same' if same else '**differs**'} |")
    return lines + [""], differ


def write_report() -> Path:
    lines = [
        "# Which adapter, at what budget? Results of `benchmarks/quality.py`",
        "",
        "Generated by `python benchmarks/quality.py report` from the cell results in `benchmarks/quality/results/` "
        "(one JSON per task, experiment, learning rate and seed); do not edit by hand. "
        "Protocol: each task runs its experiments (adapter settings, files in `benchmarks/quality/experiments/TASK/`) "
        "with the same steps, batch and data; a learning-rate sweep at seed 0 (four log-spaced rates, "
        "extended by a step when the best sat at an end, at most twice), then seeds 0, 1 and 2 at the best rate. "
        "`python benchmarks/quality.py rerun TASK EXPERIMENT LR SEED` repeats one cell and compares its numbers.",
        "",
    ]
    lines += [
        "Read the verdicts with the protocol's limits in mind: one small task per model, 164, 100 or 500 held-out "
        "examples (one example is 0.6, 1 or 0.2 points), and learning rates a factor of about 3 apart, so an adapter "
        "with a narrow optimum between two grid points is under-rated. A task marked refined also ran the "
        "midpoints beside each best rate; its sweep table says how far they moved the optima, a guide to "
        "what the coarse grid may cost on the tasks that did not refine. A verdict is `agree` or `disagree` only "
        "when the difference of seed means is larger than two standard errors and one held-out example.",
        "",
    ]
    for task in TASKS:
        rows = [s for s in summaries(task) if s.seeds]
        if not rows:
            lines += [f"## {task}", "", "No results yet: `python benchmarks/quality.py run --task " + task + "`.", ""]
            continue
        missing = sorted(set(experiments(task)) - {s.name for s in rows})
        incomplete = [s.name for s in rows if not s.complete]
        lines += _task_section(task, rows)
        if TASKS[task].stopped:
            lines += [TASKS[task].stopped, ""]
            continue
        if missing or incomplete:
            lines += [f"Not finished: {', '.join(missing + incomplete)} (missing or fewer than {len(SEEDS)} seeds).", ""]
        if len(rows) > 1:
            lines += _claims(task, rows) + ([] if missing or incomplete else _guide(task, rows))
        lines += _dora(task, rows)
    recipe_lines, differ = _recipe_rates()
    lines += recipe_lines
    out = DOCS / "results.md"
    tmp = out.with_name(".results.md.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    tmp.replace(out)
    print(f"wrote {out.relative_to(ROOT)}")
    if differ:
        print(f"note: {', '.join(differ)} ship a learning rate other than their experiment's best (see 'Shipped recipes')")
    return out

"""The training loop (single process, or data-parallel under `accelerate launch`).

Batches are a pure function of (seed, step): sample k of the stream is
`permutation(seed, epoch = k // n)[k % n]`, and each rank takes its slice of every global
batch. Resuming therefore needs only the step counter, and an interrupted-then-resumed run
ends with the same adapter as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import REGISTRY
from .checkpoint import (
    adapter_digest,
    atomic_directory,
    checkpoint_dirs,
    publish_directory,
    load_adapter,
    load_rng_state,
    load_training_state,
    save_adapter,
    save_rng_state,
    save_training_state,
    write_json,
)
from .data import collate
from .data_report import data_summary
from .distributed import Engine, build_engine
from .errors import CheckpointError, InterruptedRun, RecipeError
from .evaluate import compare_with_base, evaluate_examples, held_out_digest, majority_rate
from .guard import DivergenceGuard
from .inject import count_parameters, load_adapter_state_dict
from .memcheck import check_memory_fits, is_main_launch_process
from .pipeline import Prepared, adapter_metadata, prepare
from .plots import plot_loss_curve
from .recipe import Recipe, recipe_to_yaml
from .reporting import Reporter
from .resume import check_resumed_recipe, latest_valid_checkpoint, require_valid, write_manifest
from .runlock import RunLock, clean_dead_leftovers, drop_previous_run, remove_stale_outputs, restore_previous_run, stage_previous_run, trim_metrics
from .schedule import resolve_schedule
from .tracking import check_trackers, finish_trackers, log_record, start_trackers
from .weight_decay import decay_exempt_names


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    evaluation: dict[str, dict[str, float]] | None
    majority_rate: float | None
    parameters: dict[str, int]
    completed: bool = True  # False when stopped early (stop_after): no final adapter was published


class BatchStream:
    """Deterministic example indices for every (step, micro-batch, rank)."""

    def __init__(self, n_examples: int, seed: int, lengths: Any = None, group: int = 0) -> None:
        self.n = n_examples
        self.seed = seed
        #: With lengths: each run of `group` examples of the epoch's permutation is sorted by
        #: length (longest first), so a global batch holds similar lengths; still a pure
        #: function of (seed, epoch).
        self.lengths = lengths
        self.group = group
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k >= epoch - 1}
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            if self.lengths is not None and self.group > 1:
                perm = [i for s in range(0, self.n, self.group) for i in sorted(perm[s : s + self.group], key=lambda j: -int(self.lengths[j]))]
            self._perms[epoch] = perm
        return self._perms[epoch]

    def indices(self, micro_index: int, batch_size: int, world: int, rank: int) -> list[int]:
        start = (micro_index * world + rank) * batch_size
        return [self._perm(k // self.n)[k % self.n] for k in range(start, start + batch_size)]


def _resume_from(output_dir: Path, resume: str | None, overwrite: bool, warn: Callable[[str], None] = print) -> Path | None:
    """Which checkpoint to continue from; refuse to clobber a previous run by accident.
    Damaged checkpoints are skipped (auto) or refused (an explicit path)."""
    has_run = (output_dir / "adapter").exists() or bool(checkpoint_dirs(output_dir))
    if resume is None:
        if has_run and not overwrite:
            raise RecipeError(
                f"output_dir: {output_dir} already holds a run",
                hint="pass --resume auto to continue it, --overwrite to start again, or set output_dir (--set output_dir=...)",
            )
        return None
    if resume == "auto":
        found = checkpoint_dirs(output_dir)
        if not found and (output_dir / "adapter").exists():
            raise RecipeError(
                f"--resume auto: {output_dir} holds a finished run and no checkpoint to continue from",
                hint="raise training.max_steps with save_every set to continue later runs, or pass --overwrite to start again",
            )
        if not found:
            return None
        valid = latest_valid_checkpoint(output_dir, warn)
        if valid is None:
            raise CheckpointError(
                f"--resume auto: every checkpoint in {output_dir}/checkpoints is damaged", hint="start again with --overwrite", exit_code=2
            )
        return valid
    path = Path(resume)
    if not (path / "training_state.json").is_file():
        raise CheckpointError(f"--resume {resume}: not a checkpoint directory", hint=f"use --resume auto or a path like {output_dir}/checkpoints/step-000100", exit_code=2)
    require_valid(path)
    return path


def train(
    recipe: Recipe,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    stop_after: int | None = None,
    check_memory: bool = True,
) -> TrainResult:
    """Train the recipe's adapter; returns where it went and the final held-out metrics.

    The output_dir is locked for the whole run (see `runlock`); `--overwrite` keeps the
    previous run until this one has published its adapter; `check_memory` compares the
    dry-run memory estimate with what the machine has before anything is loaded.
    `stop_after` ends the run after that step as an interruption would.
    """
    reporter = reporter or Reporter()
    if check_memory:
        check_memory_fits(recipe)
    if not is_main_launch_process():  # the main process holds the lock and tidies up
        return _train(recipe, resume=resume, overwrite=overwrite, reporter=reporter, stop_after=stop_after)
    out = Path(recipe.output_dir)
    with RunLock(out):
        for item in clean_dead_leftovers(out):
            reporter.status(f"removed {out / item}, left by an interrupted process")
        if resume is None and restore_previous_run(out):
            reporter.status(f"an --overwrite run in {out} ended before finishing: the previous run was put back")
        staged = overwrite and resume is None and stage_previous_run(out)
        if resume is None and not (out / "adapter").exists() and not checkpoint_dirs(out):
            remove_stale_outputs(out, reporter.status)
        try:
            result = _train(recipe, resume=resume, overwrite=overwrite, reporter=reporter, stop_after=stop_after)
        except KeyboardInterrupt:
            reporter.finish()
            clean_dead_leftovers(out)
            found = checkpoint_dirs(out)
            saved = f"the newest checkpoint is {found[-1]}" if found else "no checkpoint had been saved (set training.save_every)"
            raise InterruptedRun(
                f"training interrupted: {saved}; no final adapter was written",
                hint="run the same command with --resume auto to continue" if found else "run the same command again (with --overwrite) to start over",
            ) from None
        except BaseException:
            clean_dead_leftovers(out)  # a half-written checkpoint of this run (disk full, crash)
            if staged:
                restore_previous_run(out)
            raise
        if result.completed and (out / "adapter").exists():
            drop_previous_run(out)
        return result


def _checkpoint_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "training_state.json").read_text())["step"]


def _train(
    recipe: Recipe,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """The training run itself (see `train`).

    `stop_after` ends the run after that step as an interruption would (checkpoints as
    configured, no final adapter): used to test resuming and for time-boxed jobs.
    """
    reporter = reporter or Reporter()
    cfg = recipe.training
    check_trackers(recipe)  # before anything is loaded or written
    engine = build_engine(cfg.distributed, cfg, quantized=recipe.quantization is not None)
    accelerator = engine.accelerator
    is_main = accelerator.is_main_process
    if not is_main:
        reporter = Reporter()  # one progress display, from the main process
    out = Path(recipe.output_dir)
    resume_dir = _resume_from(out, resume, overwrite, reporter.status)
    # epochs / warmup_ratio become step counts only once the data is prepared; the checkpoint
    # recorded the resolved counts, so such a recipe is compared after resolving.
    schedule_pending = cfg.epochs is not None or cfg.warmup_ratio is not None
    if resume_dir is not None and not schedule_pending:
        check_resumed_recipe(recipe, resume_dir, _checkpoint_step(resume_dir), accelerator.num_processes)

    if engine.note:
        reporter.status(engine.note)
    reporter.status(f"loading {recipe.model} and {recipe.data.train}")
    empty = engine.loads_on_main_only and not is_main
    prepared = prepare(recipe, empty=empty)
    n_train = len(prepared.data.train)  # the one place the size of the training split is read
    schedule = resolve_schedule(recipe, n_train, accelerator.num_processes)
    recipe = prepared.recipe = schedule.recipe  # epochs / warmup_ratio resolved into steps
    cfg = recipe.training
    if schedule.note:
        reporter.status(schedule.note)
    if resume_dir is not None and schedule_pending:
        check_resumed_recipe(recipe, resume_dir, _checkpoint_step(resume_dir), accelerator.num_processes)
    if recipe.quantization or engine.loads_on_main_only:
        model = prepared.model  # bnb models are placed at load; FSDP places shards
    else:
        model = prepared.model.to(accelerator.device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    params = count_parameters(model)
    roles = ", ".join(f"{role} x{len(names)}" for role, names in prepared.injection.roles.items())
    world, rank = accelerator.num_processes, accelerator.process_index
    reporter.status(
        f"{recipe.adapter.type} on {len(prepared.injection.targets)} layers ({roles}); trainable parameters "
        f"{params['trainable']:,} = {100 * params['trainable'] / params['total']:.3f}% of {params['total']:,}"
        + (f"; {engine.name} on {world} processes" if world > 1 else "")
    )
    if prepared.injection.skipped_in_modules_to_save:
        reporter.status(f"not adapted, trained in full as modules_to_save: {', '.join(prepared.injection.skipped_in_modules_to_save)}")
    if resume_dir is not None and not empty:  # an empty model receives the main rank's adapter
        state, saved = load_adapter(resume_dir / "adapter")
        load_adapter_state_dict(model, state, prepared.injection.modules_to_save, saved.get("frozen"))

    def make_optimizer(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(_param_groups(m, recipe), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    model, optimizer = engine.wrap(model, make_optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(engine.torch_optimizer, lr_schedule(cfg.lr_scheduler, cfg.warmup_steps, cfg.max_steps))
    start_step = 0
    if resume_dir is not None:
        meta, optimizer_state = load_training_state(resume_dir, scheduler)
        engine.load_optimizer_state(optimizer, optimizer_state)
        start_step = meta["step"]
        rng_file = resume_dir / f"rng_state_{rank}.safetensors"
        if rng_file.is_file():
            load_rng_state(rng_file)
        if is_main:
            trim_metrics(out / "metrics.jsonl", start_step)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        header = f"# {schedule.note}\n" if schedule.note else ""
        (out / "recipe.yaml").write_text(header + recipe_to_yaml(recipe))
    start_trackers(accelerator, recipe, out, start_step)
    accelerator.wait_for_everyone()

    global_batch = cfg.batch_size * world
    if recipe.data.group_by_length and hasattr(prepared.data.train, "lengths"):
        # 64 global batches per sorted group: similar lengths together, order still random.
        stream = BatchStream(n_train, cfg.seed, prepared.data.train.lengths(), 64 * global_batch)
    else:
        stream = BatchStream(n_train, cfg.seed)
    data_report = prepared.data.report
    if data_report:
        reporter.status(data_summary(data_report))
    pad_id = prepared.tokenizer.pad_token_id
    metrics_file = out / "metrics.jsonl"
    eval_batch_size = cfg.eval_batch_size or cfg.batch_size

    def log(record: dict[str, Any]) -> None:
        if is_main:
            with metrics_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            log_record(accelerator, record)

    reporter.start(cfg.max_steps, "training", completed=start_step)
    model.train()
    window_loss = torch.zeros((), device=accelerator.device)
    window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
    window_slots = 0
    last_loss: float | None = None
    step = start_step
    guard = DivergenceGuard(out, accelerator, check_gradients=accelerator.scaler is None)
    while step < cfg.max_steps:
        for micro in range(cfg.gradient_accumulation_steps):
            micro_index = step * cfg.gradient_accumulation_steps + micro
            idx = stream.indices(micro_index, cfg.batch_size, world, rank)
            examples = prepared.data.train.take(idx) if hasattr(prepared.data.train, "take") else [prepared.data.train[i] for i in idx]
            batch = {k: v.to(accelerator.device) for k, v in collate(examples, pad_id).items()}
            window_tokens += int(batch["attention_mask"].sum())
            window_slots += batch["attention_mask"].numel()
            with engine.accumulation(model, last_micro=micro == cfg.gradient_accumulation_steps - 1):
                loss = model(**batch).loss
                engine.backward(loss)
            window_loss += loss.detach() / cfg.gradient_accumulation_steps
            guard.add(loss / cfg.gradient_accumulation_steps, batch.get("labels"))
        guard.check(step + 1, model)
        engine.clip_gradients()
        guard.optimizer_step(optimizer, step + 1)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            mean_loss = accelerator.reduce(window_loss, reduction="mean").item() / window_steps
            elapsed = time.perf_counter() - window_start
            record = {"step": step, "train_loss": mean_loss, "lr": scheduler.get_last_lr()[0], "tokens_per_s": window_tokens * world / elapsed,
                      "seconds_per_step": elapsed / window_steps,
                      "padding_share": 1.0 - window_tokens / max(window_slots, 1)}
            log(record)
            last_loss = mean_loss
            window_loss.zero_()
            window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
            window_slots = 0
            reporter.advance(step, {"loss": mean_loss, "lr": record["lr"], "tok/s": record["tokens_per_s"]})
        else:
            reporter.advance(step)

        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            if is_main or engine.sharded:  # sharded parameters: every rank takes part in every forward
                values = evaluate_examples(engine.unwrap(model), prepared.data.eval, recipe.task, pad_id, eval_batch_size)
                log({"step": step, **{f"eval_{k}": v for k, v in values.items()}})
                reporter.metrics(step, values)
            accelerator.wait_for_everyone()
        if (cfg.save_every and step % cfg.save_every == 0) or (stop_after is not None and step == stop_after):
            _save_checkpoint(engine, model, prepared, optimizer, scheduler, step, out, cfg.save_total_limit, guard)
        if stop_after is not None and step >= stop_after:
            break
    reporter.finish()

    unwrapped = engine.unwrap(model)
    final_state = engine.adapter_state(model, prepared.injection.modules_to_save)
    checksums = accelerator.gather(_checksum(final_state).to(accelerator.device).reshape(1)).tolist()
    peaks = accelerator.gather(torch.tensor([_peak_memory_mib()], device=accelerator.device)).tolist()
    cache_hits = accelerator.gather(torch.tensor([int(bool(data_report.get("cache", {}).get("hit")))], device=accelerator.device)).tolist()
    if stop_after is not None and step < cfg.max_steps:
        finish_trackers(accelerator)
        return TrainResult(out, step, last_loss, None, None, params, completed=False)

    guard.check_state(step, final_state, "final adapter")
    if is_main:
        with atomic_directory(out / "adapter", overwrite=True) as tmp:
            save_adapter(tmp, final_state, adapter_metadata(prepared))
    evaluation = None
    if is_main or engine.sharded:
        reporter.status(f"evaluating base and tuned model on {len(prepared.data.eval)} held-out examples")
        # A sharded task head cannot be swapped for its initial copy: those rows come from `tnlora eval`.
        initial_head = None if engine.sharded and prepared.initial_head else prepared.initial_head
        evaluation = compare_with_base(unwrapped, initial_head, prepared.data.eval, recipe.task, pad_id, eval_batch_size)
    if is_main:
        log({"step": step, **{f"eval_{k}": v for k, v in evaluation["tuned"].items()}, "world_size": world, "engine": engine.name,
             "adapter_checksum_per_rank": checksums, "peak_memory_mib_per_rank": peaks,
             "data_cache_hit_per_rank": cache_hits})
        # The digests let `eval --generate` reuse these losses instead of computing them again.
        write_json(out / "eval.json", {"task": recipe.task, "n_examples": len(prepared.data.eval), "majority_rate": majority_rate(prepared.data.eval),
                                       "held_out_sha256": held_out_digest(prepared.data.eval), "adapter_sha256": adapter_digest(out / "adapter"),
                                       "metrics": evaluation})
        plot_loss_curve(metrics_file, out / "loss.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(out, step, last_loss, evaluation if is_main else None, majority_rate(prepared.data.eval), params)


def lr_schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate multiplier per step: linear warm-up, then linear decay to 0, half a
    cosine to 0, or constant (the usual schedules, as transformers defines them; written
    here because importing transformers' scheduler module also imports peft, ~3 s per process)."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return 1.0

    return multiplier


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing: gradients reach adapters inside checkpointed blocks
    without `enable_input_require_grads`, and parameters used by several layers (shared
    cores) are not "marked ready twice" under DDP, unlike the reentrant variant."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise RecipeError(
            f"training.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing",
            hint="set training.gradient_checkpointing: false",
        )
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing


def _param_groups(model: torch.nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """One AdamW group per learning rate (TRAC's controllers may have their own) and, with
    weight decay, per decay: biases and norms are exempt, as in the HF Trainer (weight_decay.py)."""
    adapter_cls = REGISTRY[recipe.adapter.type]
    decay = recipe.training.weight_decay
    exempt = decay_exempt_names(model) if decay > 0 else set()
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            lr = adapter_cls.learning_rate(recipe.adapter, name, recipe.training.learning_rate)
            groups.setdefault((lr, 0.0 if name in exempt else decay), []).append(p)
    return [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]


def _checksum(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """A float64 fingerprint of all trained tensors, compared across ranks."""
    total = torch.zeros((), dtype=torch.float64)
    for i, key in enumerate(sorted(state)):
        total += (state[key].double().cpu() * (1.0 + 1e-3 * i)).sum()
    return total


def _peak_memory_mib() -> float:
    """This process's peak so far: allocated GPU memory, or resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _save_checkpoint(
    engine: Engine, model: torch.nn.Module, prepared: Prepared, optimizer: Any, scheduler: Any, step: int, out: Path, keep: int | None,
    guard: DivergenceGuard | None = None,
) -> None:
    """Every rank helps gather the adapter and optimizer state (collective under sharding);
    the main rank writes them into a temporary directory, every rank adds its RNG state,
    then the directory is renamed into place."""
    accelerator = engine.accelerator
    adapter = engine.adapter_state(model, prepared.injection.modules_to_save)
    if guard is not None:
        guard.check_state(step, adapter, f"checkpoint of step {step}")
    optimizer_state = engine.optimizer_state(optimizer)
    dest = out / "checkpoints" / f"step-{step:06d}"
    tmp = dest.with_name(f".{dest.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "adapter").mkdir(parents=True)
        save_adapter(tmp / "adapter", adapter, adapter_metadata(prepared))
        (tmp / "recipe.yaml").write_text(recipe_to_yaml(prepared.recipe))
        save_training_state(tmp, optimizer_state, scheduler, step, {"world_size": accelerator.num_processes, "engine": engine.name})
    accelerator.wait_for_everyone()
    save_rng_state(tmp / f"rng_state_{accelerator.process_index}.safetensors")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(tmp)
        publish_directory(tmp, dest)
        if keep:
            for old in checkpoint_dirs(out)[:-keep]:
                # Renamed first: a kill mid-deletion leaves a hidden directory, never a half checkpoint.
                doomed = old.with_name(f".{old.name}.deleting")
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
    accelerator.wait_for_everyone()

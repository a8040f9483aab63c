"""The training loop (single process, or data-parallel under `accelerate launch`).

`run_training` reads top to bottom: set up (data, schedule, engine, model), resume, then
one optimizer step at a time with its logging, evaluation and checkpoint, then publish the
adapter and the held-out comparison. Batches are a pure function of (seed, step)
(`batches.py`), so resuming needs only the step counter, and an interrupted-then-resumed run
ends with the same adapter as an uninterrupted one. The library never prints: progress goes
through the `Reporter`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list

from ..data.examples import collate
from ..data.report import data_summary
from ..evaluation.metrics import compare_with_base, evaluate_examples, held_out_digest, majority_rate
from ..evaluation.verdict import judge
from ..model.build import Prepared, adapter_metadata, load_inputs, prepare
from ..model.state import count_parameters, load_adapter_state_dict
from ..recipe.load import recipe_to_yaml
from ..recipe.sections import Recipe
from ..report.plots import plot_loss_curve
from ..report.reporter import Reporter
from ..run.atomic import atomic_directory, write_json, write_text
from ..run.checkpoint import (
    adapter_digest,
    load_adapter,
    load_rng_state,
    load_training_state,
    save_adapter,
    save_rng_state,
    save_training_state,
)
from ..run.layout import checkpoint_dirs
from ..run.lock import trim_metrics
from ..run.resume import check_resumed_recipe, checkpoint_step, resume_point, write_manifest
from .batches import BatchStream
from .engines import Engine, choose_engine
from .guard import DivergenceGuard
from .interrupt import StopRequest, StoppedBySignal
from .launch import is_main_launch_process, launch_world_size
from .memory import check_memory_fits, enable_gradient_checkpointing
from .optim import param_groups
from .schedule import lr_schedule, resolve_schedule
from .tracking import check_trackers, finish_trackers, log_record, start_trackers


_clock = time.monotonic  # what training.save_every_minutes is measured with


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    evaluation: dict[str, dict[str, float]] | None
    majority_rate: float | None
    parameters: dict[str, int]
    completed: bool = True  # False when stopped early (stop_after): no final adapter was published
    verdict: dict | None = None  # evaluation.verdict.judge: worse than the base, collapsed


@dataclass
class _Window:
    """What the loss, throughput and padding of the next log line are averaged over."""

    loss: torch.Tensor
    steps: int = 0
    tokens: int = 0
    slots: int = 0
    start: float = 0.0

    def reset(self) -> None:
        self.loss.zero_()
        self.steps = self.tokens = self.slots = 0
        self.start = time.perf_counter()


def run_training(
    recipe: Recipe, model_path: str, *, resume: str | None, overwrite: bool, reporter: Reporter, stop_after: int | None,
    check_memory: bool = False,
) -> TrainResult:
    """The training run itself (see `tnlora_cli.train.train`, which holds the run's lock).

    `stop_after` ends the run after that step as an interruption would (checkpoints as
    configured, no final adapter): used to test resuming and for time-boxed jobs.
    `check_memory`: refuse a run whose memory estimate exceeds what the machine has.
    """
    run = _TrainingRun.set_up(recipe, model_path, resume, overwrite, reporter, check_memory)
    run.start()
    with StopRequest() as stop:  # SIGINT/SIGTERM: finish the step, save a checkpoint, stop
        while run.step < run.cfg.max_steps:
            run.optimizer_step(stop)
            run.log_step()
            run.evaluate_if_due()
            if run.checkpoint_due(stop_after):
                run.save_checkpoint()
            if run.stop_requested:
                run.reporter.finish()
                raise StoppedBySignal(stop.signal_name or "a signal to another process", run.step, run.cfg.max_steps, checkpoint_dirs(run.out)[-1])
            if stop_after is not None and run.step >= stop_after:
                break
    run.reporter.finish()
    return run.publish(stopped=stop_after is not None and run.step < run.cfg.max_steps)


#: Multi-process runs that have finished, kept referenced until the process exits (see publish).
FINISHED_RUNS: list[_TrainingRun] = []


class _TrainingRun:
    """One run's state; `run_training` calls its steps in order."""

    def __init__(self, prepared: Prepared, engine: Engine, resume_dir: Path | None, schedule_note: str | None, reporter: Reporter) -> None:
        self.prepared, self.engine, self.resume_dir, self.schedule_note = prepared, engine, resume_dir, schedule_note
        self.recipe, self.cfg, self.reporter = prepared.recipe, prepared.recipe.training, reporter
        self.accelerator = engine.accelerator
        self.is_main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.out = Path(self.recipe.output_dir)
        self.metrics_file = self.out / "metrics.jsonl"
        self.pad_id = prepared.tokenizer.pad_token_id
        self.eval_batch_size = self.cfg.eval_batch_size or self.cfg.batch_size
        self.step = 0
        self.last_loss: float | None = None
        self.stop_requested = False  # by a signal, on any process: save a checkpoint and stop after this step
        self.save_due_by_time = False  # training.save_every_minutes have passed since the last checkpoint
        self.last_save = _clock()

    @classmethod
    def set_up(cls, recipe: Recipe, model_path: str, resume: str | None, overwrite: bool, reporter: Reporter, check_memory: bool = False) -> _TrainingRun:
        """Check what can be checked, prepare the data, resolve the schedule, then build the
        engine (once, from the resolved settings) and the model with its adapter."""
        check_trackers(recipe)  # before anything is loaded or written
        choice = choose_engine(
            recipe.training.distributed, quantized=recipe.quantization is not None, weight_decomposed=recipe.adapter.use_dora
        )
        is_main, world = is_main_launch_process(), launch_world_size()
        if not is_main:
            reporter = Reporter()  # one progress display, from the main process
        out = Path(recipe.output_dir)
        resume_dir = resume_point(out, resume, overwrite, reporter.status)
        # epochs / warmup_ratio become step counts only once the data is prepared; the checkpoint
        # recorded the resolved counts, so such a recipe is compared after resolving.
        schedule_pending = recipe.training.epochs is not None or recipe.training.warmup_ratio is not None
        if resume_dir is not None and not schedule_pending:
            check_resumed_recipe(recipe, resume_dir, checkpoint_step(resume_dir), world)
        reporter.status(f"loading {recipe.model} and {recipe.data.train}")
        inputs = load_inputs(recipe, model_path, warn=reporter.status, reporter=reporter)
        schedule = resolve_schedule(recipe, len(inputs.data.train), world)  # the one place the training split's size is read
        recipe = schedule.recipe  # epochs / warmup_ratio resolved into steps
        if schedule.note:
            reporter.status(schedule.note)
        if check_memory:  # before any weight is read; batches are padded to the prepared lengths
            check_memory_fits(recipe, model_path, inputs.data.train.lengths())
        if resume_dir is not None and schedule_pending:
            check_resumed_recipe(recipe, resume_dir, checkpoint_step(resume_dir), world)
        engine = choice.build(recipe.training)
        if engine.note:
            reporter.status(engine.note)
        prepared = prepare(recipe, inputs=inputs, empty=choice.loads_on_main_only and not is_main)
        run = cls(prepared, engine, resume_dir, schedule.note, reporter)
        run._place_model()
        return run

    def _place_model(self) -> None:
        """Device, gradient checkpointing, the adapter to resume from, then the engine's wrap."""
        prepared, engine, cfg = self.prepared, self.engine, self.cfg
        if self.recipe.quantization or engine.loads_on_main_only:
            model = prepared.model  # bnb models are placed at load; FSDP places shards
        else:
            model = prepared.model.to(self.accelerator.device)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.parameters = count_parameters(model)
        self._report_model()
        if self.resume_dir is not None and not (engine.loads_on_main_only and not self.is_main):  # an empty model receives the main rank's adapter
            state, saved = load_adapter(self.resume_dir / "adapter")
            load_adapter_state_dict(model, state, prepared.injection.modules_to_save, saved.get("frozen"))

        def make_optimizer(m: torch.nn.Module) -> torch.optim.Optimizer:
            return torch.optim.AdamW(param_groups(m, self.recipe), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

        self.model, self.optimizer = engine.wrap(model, make_optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(engine.torch_optimizer, lr_schedule(cfg.lr_scheduler, cfg.warmup_steps, cfg.max_steps))

    def _report_model(self) -> None:
        injection, params = self.prepared.injection, self.parameters
        roles = ", ".join(f"{role} x{len(names)}" for role, names in injection.roles.items())
        self.reporter.status(
            f"{self.recipe.adapter.type} on {len(injection.targets)} layers ({roles}); trainable parameters "
            f"{params['trainable']:,} = {100 * params['trainable'] / params['total']:.3f}% of {params['total']:,}"
            + (f"; {self.engine.name} on {self.world} processes" if self.world > 1 else "")
        )
        if injection.skipped_in_modules_to_save:
            self.reporter.status(f"not adapted, trained in full as modules_to_save: {', '.join(injection.skipped_in_modules_to_save)}")

    def start(self) -> None:
        """Resume the optimizer, scheduler and RNG state, write the run's recipe, start the
        trackers, and set up the batch stream and the first log window."""
        if self.resume_dir is not None:
            meta, optimizer_state = load_training_state(self.resume_dir, self.scheduler)
            self.engine.load_optimizer_state(self.optimizer, optimizer_state)
            self.step = meta["step"]
            rng_file = self.resume_dir / f"rng_state_{self.rank}.safetensors"
            if rng_file.is_file():
                load_rng_state(rng_file)
            if self.is_main:
                trim_metrics(self.metrics_file, self.step)
        if self.is_main:
            header = f"# {self.schedule_note}\n" if self.schedule_note else ""
            write_text(self.out / "recipe.yaml", header + recipe_to_yaml(self.recipe))
        start_trackers(self.accelerator, self.recipe, self.out, self.step)
        self.accelerator.wait_for_everyone()

        train = self.prepared.data.train
        if self.recipe.data.group_by_length and hasattr(train, "lengths"):
            # 64 global batches per sorted group: similar lengths together, order still random.
            self.stream = BatchStream(len(train), self.cfg.seed, train.lengths(), 64 * self.cfg.batch_size * self.world)
        else:
            self.stream = BatchStream(len(train), self.cfg.seed)
        if self.prepared.data.report:
            self.reporter.status(data_summary(self.prepared.data.report))
        self.reporter.start(self.cfg.max_steps, "training", completed=self.step)
        self.model.train()
        self.window = _Window(torch.zeros((), device=self.accelerator.device), start=time.perf_counter())
        self.guard = DivergenceGuard(self.out, self.accelerator, check_gradients=self.accelerator.scaler is None)

    def _batch(self, micro_index: int) -> dict[str, torch.Tensor]:
        """A micro-batch on the device; its token and slot counts are taken on the host
        before the copy (counting on the device would stall every micro-batch)."""
        train = self.prepared.data.train
        idx = self.stream.indices(micro_index, self.cfg.batch_size, self.world, self.rank)
        examples = train.take(idx) if hasattr(train, "take") else [train[i] for i in idx]
        batch = collate(examples, self.pad_id)
        mask = batch.get("attention_mask")  # images have none: one token per image
        self.window.tokens += int(mask.sum()) if mask is not None else len(batch["labels"])
        self.window.slots += mask.numel() if mask is not None else len(batch["labels"])
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def optimizer_step(self, stop: StopRequest | None = None) -> None:
        """Forward and backward over the accumulated micro-batches, the gradient norm (with
        clipping), the divergence guard, and one optimizer and scheduler step. The guard's
        check is the step's one host synchronisation."""
        accumulation = self.cfg.gradient_accumulation_steps
        for micro in range(accumulation):
            batch = self._batch(self.step * accumulation + micro)
            with self.engine.accumulation(self.model, last_micro=micro == accumulation - 1):
                loss = self.model(**batch).loss
                self.engine.backward(loss)
            self.window.loss += loss.detach() / accumulation
            self.guard.add(loss / accumulation, batch.get("labels"))
        minutes = self.cfg.save_every_minutes
        requests = (stop is not None and stop.requested, minutes is not None and _clock() - self.last_save >= 60 * minutes)
        self.stop_requested, self.save_due_by_time = self.guard.check(self.step + 1, self.engine.gradient_norm(), requests)
        self.guard.optimizer_step(self.optimizer, self.step + 1)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.window.steps += 1

    def _log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with self.metrics_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            log_record(self.accelerator, record)

    def log_step(self) -> None:
        """Every `log_every` steps (and the last): the window's mean loss and throughput."""
        if not (self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps):
            self.reporter.advance(self.step)
            return
        window = self.window
        mean_loss = self.accelerator.reduce(window.loss, reduction="mean").item() / window.steps
        elapsed = time.perf_counter() - window.start
        record = {"step": self.step, "train_loss": mean_loss, "lr": self.scheduler.get_last_lr()[0],
                  "tokens_per_s": window.tokens * self.world / elapsed, "seconds_per_step": elapsed / window.steps,
                  "padding_share": 1.0 - window.tokens / max(window.slots, 1)}
        self._log(record)
        self.last_loss = mean_loss
        window.reset()
        self.reporter.advance(self.step, {"loss": mean_loss, "lr": record["lr"], "tok/s": record["tokens_per_s"]})

    def evaluate_if_due(self) -> None:
        """Held-out metrics every `eval_every` steps (the last step is evaluated by `publish`)."""
        if not (self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.cfg.max_steps):
            return
        if self.is_main or self.engine.sharded:  # sharded parameters: every rank takes part in every forward
            values = evaluate_examples(self.engine.unwrap(self.model), self.prepared.data.eval, self.recipe.task, self.pad_id, self.eval_batch_size)
            self._log({"step": self.step, **{f"eval_{k}": v for k, v in values.items()}})
            self.reporter.metrics(self.step, values)
        self.accelerator.wait_for_everyone()

    def checkpoint_due(self, stop_after: int | None) -> bool:
        """Every `save_every` steps, every `save_every_minutes`, and when stopping early."""
        return (bool(self.cfg.save_every and self.step % self.cfg.save_every == 0) or self.save_due_by_time or self.stop_requested
                or (stop_after is not None and self.step == stop_after))

    def save_checkpoint(self) -> None:
        """Every rank helps gather the adapter and optimizer state (collective under sharding);
        the main rank writes them into its temporary directory, every rank adds its RNG state
        there, then the directory is renamed into place and old checkpoints are pruned."""
        accelerator, step = self.accelerator, self.step
        self.engine.average_norm_statistics(self.model)
        adapter = self.engine.adapter_state(self.model, self.prepared.injection.modules_to_save)
        self.guard.check_state(step, adapter, f"checkpoint of step {step}")
        optimizer_state = self.engine.optimizer_state(self.optimizer)
        dest = self.out / "checkpoints" / f"step-{step:06d}"
        with contextlib.ExitStack() as publish_on_exit:
            tmp = publish_on_exit.enter_context(atomic_directory(dest, on_exists="replace")) if self.is_main else None
            tmp = Path(broadcast_object_list([str(tmp)])[0])  # the main rank's temporary directory, for every rank's RNG file
            if self.is_main:
                (tmp / "adapter").mkdir()
                save_adapter(tmp / "adapter", adapter, adapter_metadata(self.prepared))
                write_text(tmp / "recipe.yaml", recipe_to_yaml(self.recipe))
                save_training_state(tmp, optimizer_state, self.scheduler, step, {"world_size": self.world, "engine": self.engine.name})
            accelerator.wait_for_everyone()
            save_rng_state(tmp / f"rng_state_{self.rank}.safetensors")
            accelerator.wait_for_everyone()
            if self.is_main:
                write_manifest(tmp)
        if self.is_main and self.cfg.save_total_limit:
            for old in checkpoint_dirs(self.out)[: -self.cfg.save_total_limit]:
                # Renamed first: a kill mid-deletion leaves a hidden directory, never a half checkpoint.
                doomed = old.with_name(f".{old.name}.deleting")
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        accelerator.wait_for_everyone()
        self.last_save, self.save_due_by_time = _clock(), False

    def publish(self, stopped: bool) -> TrainResult:
        """The final adapter, the base-vs-tuned comparison on the held-out set, eval.json and
        the loss plot; a run stopped early (`stop_after`) publishes nothing."""
        accelerator, prepared, out = self.accelerator, self.prepared, self.out
        self.engine.average_norm_statistics(self.model)
        final_state = self.engine.adapter_state(self.model, prepared.injection.modules_to_save)
        checksums = accelerator.gather(_checksum(final_state).to(accelerator.device).reshape(1)).tolist()
        peaks = accelerator.gather(torch.tensor([_peak_memory_mib()], device=accelerator.device)).tolist()
        cache_hit = int(bool(prepared.data.report.get("cache", {}).get("hit")))
        cache_hits = accelerator.gather(torch.tensor([cache_hit], device=accelerator.device)).tolist()
        if stopped:
            finish_trackers(accelerator)
            return TrainResult(out, self.step, self.last_loss, None, None, self.parameters, completed=False)

        self.guard.check_state(self.step, final_state, "final adapter")
        if self.is_main:
            with atomic_directory(out / "adapter", on_exists="replace") as tmp:
                save_adapter(tmp, final_state, adapter_metadata(prepared))
        evaluation = verdict = None
        held_out = prepared.data.eval
        if self.is_main or self.engine.sharded:
            self.reporter.status(f"evaluating base and tuned model on {len(held_out)} held-out examples")
            # A sharded task head cannot be swapped for its initial copy: those rows come from `tnlora eval`.
            initial_head = None if self.engine.sharded and prepared.initial_head else prepared.initial_head
            diagnostics: dict[str, dict] = {}
            evaluation = compare_with_base(self.engine.unwrap(self.model), initial_head, held_out, self.recipe.task, self.pad_id, self.eval_batch_size,
                                           diagnostics=diagnostics)
            verdict = judge(evaluation, diagnostics["tuned"])
        if self.is_main:
            self._log({"step": self.step, **{f"eval_{k}": v for k, v in evaluation["tuned"].items()}, "world_size": self.world,
                       "engine": self.engine.name, "adapter_checksum_per_rank": checksums, "peak_memory_mib_per_rank": peaks,
                       "data_cache_hit_per_rank": cache_hits})
            # The digests let `eval --generate` reuse these losses instead of computing them again.
            write_json(out / "eval.json", {"task": self.recipe.task, "n_examples": len(held_out), "majority_rate": majority_rate(held_out),
                                           "held_out_sha256": held_out_digest(held_out), "adapter_sha256": adapter_digest(out / "adapter"),
                                           "metrics": evaluation, "verdict": verdict})
            plot_loss_curve(self.metrics_file, out / "loss.png")
        accelerator.wait_for_everyone()
        if self.world > 1:
            # Kept referenced until the process exits: the wrapped model holds the process group,
            # and freeing the last reference runs the gloo group's destructor, which joins its
            # worker threads while holding the GIL; a worker still dropping the final barrier's
            # tensors needs the GIL, so the rank deadlocked (about 1 run in 15 on 2 CPU processes).
            # The CLI then leaves without running destructors (launch.leave_launched_process).
            FINISHED_RUNS.append(self)
        accelerator.end_training()  # also tears the process group down, on every rank together
        if self.world > 1 and torch.distributed.is_initialized():  # accelerate versions that leave it up
            torch.distributed.destroy_process_group()
        return TrainResult(out, self.step, self.last_loss, evaluation if self.is_main else None, majority_rate(held_out), self.parameters,
                           verdict=verdict if self.is_main else None)


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

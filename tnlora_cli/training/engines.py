"""Multi-process engines: which one trains, and what each needs from tnlora.

- `ddp`: accelerate's DistributedDataParallel; also the single-process path.
- `fsdp`: FSDP2 (`fully_shard`). tnlora applies it itself: every transformer block (the
  model's `_no_split_modules`) is one unit and the root unit holds embeddings, heads and the
  shared tensor-network store, so each shared core lives in exactly one unit. accelerate only
  shards on GPUs; owning the wrap makes the path tested on CPU the path that runs on GPUs.
- `deepspeed-zero2` / `deepspeed-zero3`: accelerate's DeepSpeed integration.

Whatever the engine, what leaves a run (adapter, optimizer state in checkpoints) is full,
unsharded tensors in one layout, so a checkpoint resumes under any engine and world size.
Gathering is collective: every rank calls `adapter_state` and `optimizer_state`, the main
rank writes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from ..errors import RecipeError
from ..model.state import NORM_STATISTICS, adapter_state_dict

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def launched_engine() -> str | None:
    """The engine an `accelerate launch` configuration asked for, if any."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return None


def resolve_engine(setting: str) -> str:
    """The recipe's `training.distributed`, reconciled with the launcher's configuration."""
    launched = launched_engine()
    if setting == "auto":
        return launched or "ddp"
    if launched is not None and not setting.startswith(launched):
        raise RecipeError(
            f"training.distributed: the recipe asks for {setting} but accelerate was launched with {launched}",
            hint=f"set training.distributed: auto to follow the accelerate config, or launch without the {launched} config",
        )
    return setting


@dataclass(frozen=True)
class EngineChoice:
    """Which engine a run uses, decided (and refused when impossible) before anything loads."""

    engine_class: type[Engine]
    zero_stage: int | None = None
    note: str | None = None  # said once at the start of training

    @property
    def loads_on_main_only(self) -> bool:
        return self.engine_class.loads_on_main_only

    def build(self, training: Any) -> Engine:
        """Create the accelerator and the engine object, from the run's resolved settings."""
        if getattr(training, "compile", False) and self.engine_class is not Engine:
            raise RecipeError(
                f"training.compile: not supported under {self.engine_class.name} (sharded parameters are gathered by hooks "
                "that tnlora does not compile)",
                hint="remove training.compile, or train with training.distributed: ddp",
            )
        if self.engine_class is DeepSpeedEngine:
            engine: Engine = DeepSpeedEngine(training, self.zero_stage)
        else:
            engine = self.engine_class(training)
        if self.note:
            engine.note = self.note
        return engine


def choose_engine(setting: str, quantized: bool, weight_decomposed: bool = False) -> EngineChoice:
    """The engine for `training.distributed` under this launch; refuses what cannot work."""
    name = resolve_engine(setting)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # not started by a distributed launcher
        note = None if name == "ddp" else f"training.distributed: {name} needs several processes (accelerate launch); training in one process"
        return EngineChoice(Engine, note=note)
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") if name == "deepspeed" else name[-1]
    if weight_decomposed and (name == "fsdp" or (name.startswith("deepspeed") and stage == "3")):
        raise RecipeError(
            f"adapter.use_dora: DoRA needs each adapted layer's whole base weight at every step (the norm of W0 + ΔW per "
            f"output row), and training.distributed: {name} shards the base weights across processes",
            hint="train DoRA with ddp or deepspeed-zero2, or set adapter.use_dora: false",
        )
    if quantized and name != "ddp":
        raise RecipeError(
            f"training.distributed: {name} cannot shard a bitsandbytes-quantized base",
            hint="remove the quantization section, or train the quantized base with ddp (one GPU per process)",
        )
    if name == "fsdp":
        return EngineChoice(FSDPEngine)
    if name.startswith("deepspeed"):
        return EngineChoice(DeepSpeedEngine, None if name == "deepspeed" else int(name[-1]))
    return EngineChoice(Engine)


def build_engine(setting: str, training: Any, quantized: bool) -> Engine:
    """Choose and create the engine for one training run."""
    return choose_engine(setting, quantized).build(training)


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


class Engine:
    """DDP through accelerate (and one process). Subclasses change only what differs."""

    name = "ddp"
    sharded = False  # True: parameters live in pieces, so every rank must run every forward
    loads_on_main_only = False  # True: only the main rank reads the base weights
    note: str | None = None  # said once at the start of training

    def __init__(self, training: Any) -> None:
        self.training = training
        self.mixed_precision = _mixed_precision(training.mixed_precision)
        self.accelerator = self._make_accelerator()
        self.torch_optimizer: torch.optim.Optimizer | None = None
        self.params: list[nn.Parameter] = []
        self.group_sizes: list[int] = []

    def _make_accelerator(self) -> Accelerator:
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # accelerate keeps one state per process and refuses a second run (in the same Python
            # session) with another mixed precision; one process has nothing to keep.
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()
        return Accelerator(mixed_precision=self.mixed_precision, cpu=not torch.cuda.is_available())

    def wrap(self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Place and wrap the model, then build the optimizer over the parameters training will use."""
        if getattr(self.training, "compile", False):
            compile_in_place(model)
        return self.accelerator.prepare(model, self._remember(make_optimizer(model)))

    def _remember(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Record the trainable parameters in optimizer order (wrappers may hide them later)."""
        self.torch_optimizer = optimizer  # what the lr scheduler drives, under any wrapper
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.group_sizes = [len(group["params"]) for group in optimizer.param_groups]
        return optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        # Not accelerator.unwrap_model: it imports DeepSpeed whenever it is installed
        # (seconds, and a log line) to check for a DeepSpeed engine that DDP never has.
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def accumulation(self, model: nn.Module, last_micro: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on micro-batches before the last one."""
        if last_micro or self.accelerator.num_processes == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss / self.training.gradient_accumulation_steps)

    def gradient_norm(self) -> torch.Tensor | None:
        """The step's total gradient norm (2-norm over every trainable gradient, all ranks),
        clipped to `training.max_grad_norm` when it is set: one pass over the gradients, with
        or without clipping, and no host synchronisation (the guard reads the result).

        None under fp16 loss scaling, whose scaler skips steps with overflowing gradients
        itself (the gradients are unscaled and clipped as usual)."""
        max_norm = self.training.max_grad_norm
        if self.accelerator.scaler is not None:
            if max_norm is not None:
                self.accelerator.clip_grad_norm_(self.params, max_norm)
            return None
        # Sharded gradients (FSDP2 DTensors): each rank holds its shards; norms combine below.
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in self.params) if g is not None]
        norm = self._global_norm(torch.nn.utils.get_total_norm(grads))
        if max_norm is not None and grads:
            # torch's clip_grad_norm_ formula, on the norm already computed
            torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(grads[0].device))
        return norm

    def _global_norm(self, local_norm: torch.Tensor) -> torch.Tensor:
        """Replicated gradients (DDP, one process): this rank's norm is the global one."""
        return local_norm

    # -- what leaves the run: full tensors (collective for sharded engines)

    def average_norm_statistics(self, model: nn.Module) -> None:
        """Several processes: replace every rank's BatchNorm running means and variances by
        their mean over the ranks, in place (collective: every rank calls it).

        Training forward passes update them from each rank's own batches, so ranks drift
        apart (DDP's broadcast from rank 0 comes before each forward, FSDP and ZeRO have none);
        averaged before the adapter state is taken, every rank saves, resumes and continues
        with the same statistics, those of all ranks' batches."""
        if self.accelerator.num_processes == 1:
            return
        stats = [b for name, b in model.named_buffers() if name.endswith(NORM_STATISTICS[:2])]
        if not stats:
            return
        flat = torch.cat([b.detach().to(self.accelerator.device, torch.float32).reshape(-1) for b in stats])
        torch.distributed.all_reduce(flat)
        flat /= self.accelerator.num_processes
        for buffer, mean in zip(stats, flat.split([b.numel() for b in stats])):
            buffer.copy_(mean.view_as(buffer))

    def adapter_state(self, model: nn.Module, modules_to_save: list[str]) -> dict[str, torch.Tensor]:
        return adapter_state_dict(self.unwrap(model), modules_to_save)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return _base_optimizer(optimizer).state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        _base_optimizer(optimizer).load_state_dict(state)


#: torch.compile's backend for `training.compile` (tests use a cheaper one).
COMPILE_BACKEND = "inductor"


def compile_in_place(model: nn.Module) -> None:
    """torch.compile the model's forward in place (`nn.Module.compile`): the module object,
    its parameter names and its state dict stay what they were, so checkpoints, DDP and
    evaluation see the same model."""
    model.compile(backend=COMPILE_BACKEND)


def _base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper around it


class FSDPEngine(Engine):
    name = "fsdp"
    sharded = True
    loads_on_main_only = True  # other ranks build the model on the meta device

    def _make_accelerator(self) -> Accelerator:
        if self.mixed_precision == "fp16":
            raise RecipeError(
                "training.mixed_precision: fp16 needs a sharded gradient scaler that tnlora does not run under fsdp",
                hint="use bf16 (or no) with training.distributed: fsdp",
            )
        # FSDP2's mixed-precision policy casts parameters; accelerate's autocast stays off.
        accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
        if getattr(accelerator.state, "fsdp_plugin", None) is not None:
            self.note = (
                "fsdp: tnlora shards with FSDP2 itself (one unit per transformer block, shared cores in the root unit); "
                "from the accelerate FSDP config it uses fsdp_reshard_after_forward and fsdp_offload_params"
            )
        return accelerator

    def wrap(self, model, make_optimizer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        empty = any(p.is_meta for p in model.parameters())
        # The main rank's full weights (with the fresh or resumed adapter), kept on CPU until
        # broadcast: each rank ends up holding only its shards, and only one rank ever read them.
        full_state = {} if empty else model.state_dict()
        base_dtypes = {p.dtype for p in model.parameters() if not p.requires_grad}
        compute = torch.bfloat16 if self.mixed_precision == "bf16" else next(iter(base_dtypes - {torch.float32}), None)
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)  # an accelerate FSDP config, if launched with one
        options: dict[str, Any] = {
            # one dtype per unit is what FSDP2 all-gathers; gradients are reduced in fp32
            "mp_policy": MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32),
            "reshard_after_forward": bool(getattr(plugin, "reshard_after_forward", True)),
        }
        if plugin is not None and getattr(plugin, "cpu_offload", None) and getattr(plugin.cpu_offload, "offload_params", True):
            options["offload_policy"] = CPUOffloadPolicy()
        block_names = set(getattr(model, "_no_split_modules", None) or [])
        blocks = [m for m in model.modules() if type(m).__name__ in block_names and any(True for _ in m.parameters())]
        if not blocks:
            raise RecipeError(
                f"training.distributed: fsdp needs transformer blocks to shard, and {type(model).__name__} names none (_no_split_modules)",
                hint="use training.distributed: ddp or deepspeed-zero3 for this model",
            )
        for block in reversed(blocks):  # innermost first: a unit never contains an unsharded unit
            fully_shard(block, **options)
        fully_shard(model, **options)  # root unit: embeddings, heads, norms, the shared store
        if empty:
            model.to_empty(device=self.accelerator.device)
        set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in model.buffers():  # not in the state dict when non-persistent (rotary tables)
            torch.distributed.broadcast(buffer.data, src=0)
        return model, self._remember(make_optimizer(model))  # over the sharded (DTensor) parameters

    def unwrap(self, model):
        return model

    def accumulation(self, model, last_micro):
        model.set_requires_gradient_sync(last_micro)  # reduce-scatter once per optimizer step
        return contextlib.nullcontext()

    def backward(self, loss):
        (loss / self.training.gradient_accumulation_steps).backward()

    def _global_norm(self, local_norm):
        # Every rank holds a disjoint shard of each gradient: the squares add up across ranks.
        squares = local_norm.to(self.accelerator.device) ** 2
        torch.distributed.all_reduce(squares)
        return squares.sqrt()

    def adapter_state(self, model, modules_to_save):
        return {k: _full(v) for k, v in adapter_state_dict(model, modules_to_save).items()}

    def optimizer_state(self, optimizer):
        state = optimizer.state_dict()
        state["state"] = {i: {k: _full(v) for k, v in entry.items()} for i, entry in state["state"].items()}
        return state

    def load_optimizer_state(self, optimizer, state):
        from torch.distributed.tensor import DTensor, distribute_tensor

        for index, entry in state["state"].items():
            param = self.params[int(index)]
            for key, value in entry.items():
                if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape:
                    # every rank read the full tensor: cut its own shard, no communication
                    entry[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        optimizer.load_state_dict(state)


def _full(value: Any) -> Any:
    return value.full_tensor() if hasattr(value, "full_tensor") else value


class DeepSpeedEngine(Engine):
    """ZeRO-2 shards gradients and optimizer states; ZeRO-3 also the parameters, which must
    then be gathered before anything reads them (otherwise adapters are saved empty)."""

    sharded = True

    def __init__(self, training: Any, zero_stage: int | None) -> None:
        self.requested_stage = zero_stage
        self._boundary = True
        super().__init__(training)
        self.zero_stage = int(self.accelerator.state.deepspeed_plugin.zero_stage)
        self.name = f"deepspeed-zero{self.zero_stage}"
        if zero_stage is not None and zero_stage != self.zero_stage:
            raise RecipeError(
                f"training.distributed: the recipe asks for ZeRO stage {zero_stage}, the accelerate config sets {self.zero_stage}",
                hint="make them agree, or set training.distributed: auto to follow the accelerate config",
            )
        if self.zero_stage not in (2, 3):
            raise RecipeError(f"training.distributed: ZeRO stage {self.zero_stage} is not supported", hint="use ZeRO stage 2 or 3")

    def _make_accelerator(self) -> Accelerator:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise RecipeError("training.distributed: DeepSpeed is not installed", hint="pip install deepspeed (or tnlora[deepspeed])") from None
        from accelerate import DeepSpeedPlugin, PartialState

        plugin = None if launched_engine() == "deepspeed" else DeepSpeedPlugin(zero_stage=self.requested_stage)
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # read when the process group is set up
        if not torch.cuda.is_available():
            PartialState(backend="gloo")  # DeepSpeed's CPU accelerator talks over gloo
        accelerator = Accelerator(mixed_precision=self.mixed_precision, cpu=False, deepspeed_plugin=plugin)
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        t = self.training
        for key, value in {
            "train_micro_batch_size_per_gpu": t.batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "gradient_clipping": t.max_grad_norm or 0.0,
        }.items():
            if config.get(key, "auto") == "auto":
                config[key] = value
            elif config[key] != value:
                raise RecipeError(
                    f"the DeepSpeed config sets {key}: {config[key]} but the recipe's training section implies {value}",
                    hint=f"set {key}: auto in the DeepSpeed config (tnlora fills it from the recipe)",
                )
        config["train_batch_size"] = t.batch_size * t.gradient_accumulation_steps * accelerator.num_processes
        if config.get("zero_optimization", {}).get("compute_grad_norm") is False:
            raise RecipeError(
                "the DeepSpeed config sets zero_optimization.compute_grad_norm: false, but tnlora's divergence guard reads that norm every step",
                hint="remove compute_grad_norm from the DeepSpeed config",
            )
        return accelerator

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def accumulation(self, model, last_micro):
        self._boundary = last_micro  # the DeepSpeed engine steps only at the boundary
        return contextlib.nullcontext()

    def backward(self, loss):
        # The engine divides by its gradient_accumulation_steps itself.
        self.accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=self._boundary)

    def gradient_norm(self):
        """DeepSpeed's own global norm of this step (`get_global_grad_norm`): ZeRO computes it
        in its step (clipping by `gradient_clipping` there) and, finding it non-finite, skips
        the update and reports inf (compute_grad_norm: false is refused when the engine is built)."""
        norm = self.accelerator.deepspeed_engine_wrapped.engine.get_global_grad_norm()
        if norm is None:
            return None
        norm = norm.detach().float() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm), device=self.accelerator.device)
        return torch.where(norm < 0, torch.nan, norm)  # ZeRO reports an invalid (non-finite) group norm as -1

    @contextlib.contextmanager
    def _gathered(self, params: list[nn.Parameter]) -> Iterator[None]:
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
        else:
            yield

    def adapter_state(self, model, modules_to_save):
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.unwrap(model)
        params = dict(module.named_parameters())
        keys = [k for k in adapter_state_dict(module, modules_to_save) if k in params]
        with self._gathered([params[k] for k in keys]):
            state = {k: v.detach().clone() for k, v in adapter_state_dict(module, modules_to_save).items()}
        for k in keys:
            if params[k].requires_grad:  # DeepSpeed's fp32 master copy, not the (b)f16 working copy
                state[k] = safe_get_full_fp32_param(params[k]).detach().cpu()
        return state

    def optimizer_state(self, optimizer):
        from deepspeed.utils import safe_get_full_optimizer_state

        # ZeRO keeps AdamW's moments in flat partitions; rebuild torch's per-parameter layout.
        torch_optimizer = _base_optimizer(optimizer).optimizer
        step = next((float(e["step"]) for e in torch_optimizer.state.values() if "step" in e), 0.0)
        state = {
            index: {"step": torch.tensor(step), **{key: safe_get_full_optimizer_state(param, key).detach().float().cpu() for key in ADAM_MOMENTS}}
            for index, param in enumerate(self.params)
        }
        groups, offset = [], 0
        for group, size in zip(torch_optimizer.param_groups, self.group_sizes):
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(range(offset, offset + size))})
            offset += size
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, optimizer, state):
        from deepspeed.utils import safe_set_full_optimizer_state

        zero_optimizer = _base_optimizer(optimizer)
        torch_optimizer = zero_optimizer.optimizer
        _create_adam_state(zero_optimizer)
        for index, param in enumerate(self.params):
            for key in ADAM_MOMENTS:
                safe_set_full_optimizer_state(param, state["state"][int(index)][key], key)
        step = max(float(entry["step"]) for entry in state["state"].values())
        for entry in torch_optimizer.state.values():
            if "step" in entry:
                entry["step"] = torch.full_like(entry["step"], step) if isinstance(entry["step"], torch.Tensor) else int(step)
        for group, saved in zip(torch_optimizer.param_groups, state["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})


def _create_adam_state(zero_optimizer: Any) -> None:
    """ZeRO creates AdamW's state at the first step; a resumed run needs it before that.

    Zero moments on every flat fp32 partition (what the first step would create), then the
    per-parameter views DeepSpeed links to them, so the saved moments can be written in."""
    flats = getattr(zero_optimizer, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    if flats is None:
        flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if flats is None:
        from ..errors import CheckpointError

        raise CheckpointError(
            f"cannot restore optimizer state into {type(zero_optimizer).__name__} (this DeepSpeed version)",
            hint="resume with training.distributed: ddp or fsdp (checkpoints are portable across engines)",
        )
    state = zero_optimizer.optimizer.state
    for flat in flats:
        if not state[flat]:
            state[flat].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        zero_optimizer._lazy_init_hp_params_optimizer_state()

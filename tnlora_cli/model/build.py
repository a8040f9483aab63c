"""From a recipe (or a saved run) to a model with its adapter attached.

Validation order is deliberate: recipe, model path, data and columns, then the model and
its targets. Only after all of that has passed does anything get written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from transformers import PreTrainedModel

from ..data.examples import probe_examples
from ..data.images import load_image_processing
from ..data.prepare import TaskData, prepare_data
from ..errors import CheckpointError, RecipeError
from ..recipe.load import load_recipe
from ..recipe.sections import IMAGE_TASK, Recipe
from ..report.reporter import Reporter
from ..run.checkpoint import load_adapter
from ..run.layout import find_recipe_file, resolve_adapter_dir
from .checks import check_max_length
from .frozen import verify as verify_frozen
from .inject import InjectionReport, inject_adapter
from .embedded import MODELS
from .loading import (
    base_model_reference,
    check_model_task,
    head_module_names,
    load_model,
    load_tokenizer,
    output_head_names,
    resolve_model,
)
from .meta import build_on_meta
from .peft_format import load_peft_adapter, peft_adapter_recipe, read_peft_config
from .state import adapter_state_dict, frozen_record, is_adapter_tensor, load_adapter_state_dict
from .targets import legacy_module_roles


@dataclass
class Prepared:
    recipe: Recipe
    model_path: str
    tokenizer: Any
    data: TaskData
    model: PreTrainedModel
    injection: InjectionReport
    #: Task-head weights as created before training (the "base" of a classification run).
    initial_head: dict[str, torch.Tensor]


@dataclass
class Inputs:
    """What a model is built for: the resolved model path, its tokenizer and the prepared data."""

    model_path: str
    tokenizer: Any
    data: TaskData


def resolve_checked(recipe: Recipe) -> str:
    """The recipe's model resolved (alias, directory or hub id) and its positions checked
    against `data.max_length`: the errors that are certain, before any estimate or load."""
    model_path = resolve_model(recipe.model, recipe.trust_remote_code, recipe.allow_pickle)
    check_model_task(model_path, recipe.task, recipe.trust_remote_code)
    if recipe.task != IMAGE_TASK:
        check_max_length(model_path, recipe.data.max_length)
    return model_path


def load_preprocessor(recipe: Recipe, model_path: str):
    """What turns the recipe's rows into model inputs: the tokenizer, or for images the
    model's image preprocessing (`data.images.ImageProcessing`)."""
    if recipe.task == IMAGE_TASK:
        return load_image_processing(model_path, recipe.trust_remote_code)
    return load_tokenizer(model_path, recipe.trust_remote_code)


def load_inputs(recipe: Recipe, model_path: str | None = None, warn: Callable[[str], None] | None = None,
                reporter: Reporter | None = None) -> Inputs:
    """Tokenizer and prepared data (resolving the model unless `model_path` is given);
    `warn` hears what the data cache has to say (a damaged entry rebuilt, ...), `reporter`
    shows the progress of preparing the data."""
    model_path = model_path or resolve_checked(recipe)
    tokenizer = load_preprocessor(recipe, model_path)
    return Inputs(model_path, tokenizer, prepare_data(recipe.data, recipe.task, tokenizer, warn=warn, reporter=reporter))


def prepare(
    recipe: Recipe,
    *,
    inputs: Inputs | None = None,
    targets: list[str] | None = None,
    modules_to_save: list[str] | None = None,
    dtype: str | None = None,
    quantize: bool = True,
    empty: bool = False,
    roles: dict[str, str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Prepared:
    """Load tokenizer, data (unless `inputs` has them) and base model, and attach a fresh
    adapter. `quantize=False` loads the base unquantized even when the recipe quantizes it
    (merge reference); `empty=True` builds model and adapter on the meta device (weights
    come later)."""
    inputs = inputs or load_inputs(recipe, warn=warn)
    model_path, tokenizer, data = inputs.model_path, inputs.tokenizer, inputs.data
    # The task head is drawn from the global RNG: seeding here makes it the same in
    # train, eval and merge.
    set_seed(recipe.training.seed)
    model = load_model(
        model_path,
        recipe.task,
        dtype=dtype or recipe.model_dtype,
        label_names=data.label_names,
        pad_token_id=tokenizer.pad_token_id,
        trust_remote_code=recipe.trust_remote_code,
        quantization=recipe.quantization if quantize else None,
        keep_full=list(modules_to_save or recipe.adapter.modules_to_save or []),
        empty=empty,
        attn_implementation=recipe.model_attn_implementation,
    )
    if modules_to_save is None:
        modules_to_save = recipe.adapter.modules_to_save
        if modules_to_save is None:
            modules_to_save = head_module_names(model, recipe.task)
    names = {n for n, _ in model.named_modules()}
    for name in modules_to_save:
        if name not in names:
            raise RecipeError(f"adapter.modules_to_save: the model has no module '{name}'", hint="use top-level module names such as classifier or score")
    note = getattr(model, "tnlora_head_note", None)
    if note and note not in data.report.setdefault("notes", []):
        data.report["notes"].append(note)
    initial_head = {k: v.detach().clone() for k, v in model.state_dict().items() if any(k.startswith(m + ".") for m in modules_to_save)}
    injection = inject_adapter(
        model, recipe.adapter, targets=targets, modules_to_save=modules_to_save, excluded=output_head_names(model), roles=roles
    )
    return Prepared(recipe, model_path, tokenizer, data, model, injection, initial_head)


def adapter_metadata(prepared: Prepared) -> dict[str, Any]:
    """What `load_run` needs to rebuild the adapter exactly (with the recipe beside it)."""
    recipe = prepared.recipe
    return {
        "adapter": recipe.adapter.model_dump(mode="json"),
        "task": recipe.task,
        "base_model": recipe.model,
        **base_model_reference(recipe.model, prepared.model_path),
        "targets": prepared.injection.targets,
        # Roles key shared tensors: stored so that a reload never depends on the naming rule.
        "roles": {name: role for role, names in prepared.injection.roles.items() for name in names},
        "modules_to_save": prepared.injection.modules_to_save,
        "label_names": prepared.data.label_names,
        # Seed and checksum of the frozen random tensors; whether the file stores them.
        "frozen": frozen_record(prepared.model),
    }


@dataclass
class LoadedRun:
    prepared: Prepared
    adapter_dir: Path
    state: dict[str, torch.Tensor]
    config: dict[str, Any]

    def load_weights(self) -> None:
        load_adapter_state_dict(self.prepared.model, self.state, self.prepared.injection.modules_to_save, self.config.get("frozen"))


def load_run(
    path: str | Path, *, dtype: str | None = None, quantize: bool = True, data: bool = True, warn: Callable[[str], None] | None = None
) -> LoadedRun:
    """Rebuild the model and adapter of a run directory, checkpoint or adapter directory.

    The adapter weights are returned, not yet loaded, so the caller can first measure the
    base model. `data=False` skips the recipe's data (generation needs none: the run's data
    files need not exist any more, and nothing is read or tokenized); its `prepared.data`
    is then empty, with the adapter's label names. `warn` hears what the data cache has to
    say (a damaged entry rebuilt).
    """
    adapter_dir = resolve_adapter_dir(Path(path))
    recipe, state, config = read_adapter(adapter_dir)
    inputs = None
    if config.get("peft_format"):
        # An adapter trained elsewhere brings no data: fixed probe texts stand in for the
        # held-out examples (merge verification compares logits on them).
        model_path = resolve_checked(recipe)
        tokenizer = load_tokenizer(model_path, recipe.trust_remote_code)
        inputs = Inputs(model_path, tokenizer, TaskData(train=[], eval=probe_examples(tokenizer)))
    else:
        require_base_model(recipe, find_recipe_file(adapter_dir), config)
        if not data:
            model_path = resolve_checked(recipe)
            inputs = Inputs(model_path, load_preprocessor(recipe, model_path), TaskData([], [], config.get("label_names")))
    prepared = prepare(
        recipe, inputs=inputs, targets=config["targets"], modules_to_save=config["modules_to_save"], dtype=dtype, quantize=quantize,
        roles=saved_roles(config), warn=warn,
    )
    if prepared.data.label_names != config.get("label_names"):
        raise CheckpointError(
            f"the labels of the data ({prepared.data.label_names}) differ from the adapter's ({config.get('label_names')})",
            hint="evaluate with the data the adapter was trained on",
        )
    return LoadedRun(prepared, adapter_dir, state, config)


def read_adapter(adapter_dir: Path) -> tuple[Recipe, dict[str, torch.Tensor], dict[str, Any]]:
    """Recipe, tensors and adapter config of a tnlora adapter directory, or of a peft-format
    tnlora adapter (`peft_format.load_peft_adapter`: its base from `base_model_name_or_path`)."""
    if read_peft_config(adapter_dir) is not None:
        return load_peft_adapter(adapter_dir)
    return load_recipe(find_recipe_file(adapter_dir)), *load_adapter(adapter_dir)


def adapter_recipe(adapter_dir: Path) -> Recipe:
    """The recipe of a tnlora adapter directory or of a peft-format tnlora adapter (no tensors read)."""
    if read_peft_config(adapter_dir) is not None:
        return peft_adapter_recipe(adapter_dir)
    return load_recipe(find_recipe_file(adapter_dir))


def require_base_model(recipe: Recipe, recipe_file: Path, config: dict[str, Any]) -> None:
    """A run whose base was a local directory needs it where training found it; when it has
    moved, say so (a lookup of the path as a hub id would only find "no config")."""
    name = recipe.model
    if name in MODELS or Path(name).expanduser().is_dir():
        return
    was_local = config.get("base_model_local_path") is not None  # recorded at training: a directory then
    if was_local or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CheckpointError(
            f"the run's base model {name} (model: in {recipe_file}) is missing: it was moved or deleted after training"
            + ("" if Path(name).expanduser().is_absolute() else f" (a relative path, read from the current directory {Path.cwd()})"),
            hint=f"put the base model back at {name}, or set model: in {recipe_file} to the directory it is in now",
            exit_code=2,
        )


def saved_roles(config: dict[str, Any]) -> dict[str, str]:
    """The roles an adapter was built with; files written before roles were saved used the
    layers' attribute names."""
    return config.get("roles") or legacy_module_roles(config["targets"])


def load_adapters_on_meta(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The run's adapters on a meta-device base: real adapter tensors, no base weights.

    Enough for everything that needs ΔW but not the base (rank inspection, streaming
    merge, export). Task-head weights stay in the returned state, not in the model.
    """
    adapter_dir = resolve_adapter_dir(Path(path))
    recipe, state, config = read_adapter(adapter_dir)
    if not config.get("peft_format"):
        require_base_model(recipe, find_recipe_file(adapter_dir), config)
    model = build_on_meta(recipe, label_names=config.get("label_names"))
    inject_adapter(model, recipe.adapter, targets=config["targets"], modules_to_save=[], roles=saved_roles(config))
    adapter_state = {k: v for k, v in state.items() if is_adapter_tensor(k)}
    record = config.get("frozen") or {}
    if not record.get("saved", True):
        drawn = frozen_record(model)
        verify_frozen(record, drawn.get("seed"), drawn.get("checksum"), str(adapter_dir))
    expected = {k for k in adapter_state_dict(model, [], include_frozen=record.get("saved", True)) if is_adapter_tensor(k)}
    missing = set(adapter_state) ^ expected
    if missing:
        raise CheckpointError(f"{adapter_dir}: adapter tensors do not match the recipe ({len(missing)} differ, e.g. {sorted(missing)[0]})")
    model.load_state_dict(adapter_state, strict=False)
    return model, {"adapter_dir": str(adapter_dir), "recipe": recipe, "config": config, "state": state}


def load_adapters_for_updates(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """As `load_adapters_on_meta`, for reading each layer's W' − W0: a DoRA adapter's update
    depends on W0, so its base is loaded (unquantized, as the checkpoint stores it)."""
    model, meta = load_adapters_on_meta(path)
    if not meta["recipe"].adapter.use_dora:
        return model, meta
    run = load_run(path, dtype="auto", quantize=False, data=False)
    run.load_weights()
    return run.prepared.model, meta

"""Recipes: YAML files validated into typed, strict settings.

Every section rejects unknown keys (with a "did you mean" suggestion), checks types and
ranges, and a few rules tie fields together (a classification task needs a label column).
Errors name the YAML path and raise `RecipeError` before anything is loaded or written.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from .adapters import REGISTRY
from .adapters.base import StrictModel
from .errors import RecipeError

Task = Literal["classification", "causal-lm", "instruction", "chat"]

# Discriminated on `type`: each adapter module contributes its own strict config class.
AdapterSection = Annotated[
    Union[tuple(cls.config_class for cls in REGISTRY.values())],  # type: ignore[valid-type]
    Field(discriminator="type"),
]


class DataSource(StrictModel):
    path: str = Field(description="Embedded alias, local file, directory or glob, or a hub dataset id.")
    config: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Hub dataset split.")
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows of this source.")


class DataConfig(StrictModel):
    train: str | list[str | DataSource] = Field(
        description="Embedded alias (chatterbot, shakespeare), a local .jsonl/.json/.csv/.parquet/.txt file, directory or glob, "
        "a hub dataset id, or a list of these (concatenated; each may be {path, max_rows, config, split})."
    )
    eval: str | None = Field(None, description="Held-out file; default: a deterministic split of `train`.")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of `train` held out when `eval` is not given.")
    split_seed: int = Field(0, description="Seed of the train/held-out split.")
    max_train_samples: int | None = Field(None, gt=0, description="Use at most this many training examples (default: all).")
    max_eval_samples: int | None = Field(
        None, gt=0, description="Use at most this many held-out examples (default: all); with the split made from `train`, "
        "this many rows are held out and the rest train."
    )
    text_column: str = Field("text", description="Text of each example (classification, causal-lm).")
    text_pair_column: str | None = Field(None, description="Second text for pair classification.")
    label_column: str | None = Field(None, description="Class labels (classification).")
    labels: list[str] | None = Field(None, description="Keep only rows with these labels, in this order.")
    prompt_column: str = Field("prompt", description="instruction: the prompt (masked out of the loss; chat template when the tokenizer has one).")
    response_column: str = Field("response", description="instruction: the response (the loss is on these tokens only).")
    max_length: int = Field(128, ge=8, description="Tokens per example (block size when packing).")
    packing: bool = Field(True, description="causal-lm: concatenate texts and cut blocks of max_length.")
    messages_column: str = Field("messages", description="chat: the column of turns (OpenAI role/content or ShareGPT from/value); "
                                 "with the default, a file without it but with 'conversations' uses that.")
    train_on: Literal["assistant", "last", "all"] = Field("assistant", description="chat/instruction: loss on every assistant turn, the last one, or all tokens.")
    input_column: str | None = Field(None, description="instruction: optional second part of the prompt (Alpaca's 'input').")
    on_bad_rows: Literal["error", "drop"] = Field("error", description="Rows with a missing, null or non-text field, or nothing to train on: "
                                                  "stop with the file and row (error) or leave them out and report the count (drop).")
    max_held_out: int | None = Field(1000, gt=0, description="Cap on the held-out split made from `train` (the rest trains); null: no cap.")
    group_by_length: bool = Field(False, description="Batch examples of similar length together (less padding; deterministic in seed and step).")
    num_proc: int | None = Field(None, gt=0, description="Processes for tokenization (default 1).")


#: Optimizer steps when neither `training.max_steps` nor `training.epochs` is given.
DEFAULT_MAX_STEPS = 200


class TrainingConfig(StrictModel):
    max_steps: int | None = Field(None, gt=0, description=f"Optimizer steps ({DEFAULT_MAX_STEPS} when `epochs` is not set either).")
    epochs: float | None = Field(
        None,
        gt=0.0,
        description="Passes over the training split instead of `max_steps`: steps = ceil(epochs x train examples / "
        "(batch_size x gradient_accumulation_steps x processes)); the resolved count is saved in the run's recipe.yaml.",
    )
    batch_size: int = Field(16, gt=0, description="Examples per device per micro-batch.")
    eval_batch_size: int | None = Field(None, gt=0, description="Batch size of held-out evaluation (default: batch_size).")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(1e-3, gt=0.0, description="AdamW learning rate (peak, after warm-up).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warm-up: linear to 0, half a cosine to 0, or constant.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up from 0 to learning_rate.")
    warmup_ratio: float | None = Field(
        None, ge=0.0, lt=1.0, description="Warm-up as a share of the total steps (ceil(ratio x steps)), instead of `warmup_steps`."
    )
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping; null disables it.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field("auto", description="auto: bf16 or fp16 on a GPU that has it, none on CPU.")
    seed: int = Field(0, description="Seeds data order, task-head initialisation and dropout.")
    gradient_checkpointing: bool = Field(False, description="Recompute layer activations in backward (non-reentrant): less memory, ~30% more compute.")
    distributed: Literal["auto", "ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"] = Field(
        "auto",
        description="Multi-process engine under `accelerate launch`; auto: what the accelerate config asks for (FSDP, DeepSpeed), else DDP.",
    )
    log_every: int = Field(10, gt=0, description="Write a metrics.jsonl record (and a log line) every N steps.")
    eval_every: int | None = Field(None, gt=0, description="Evaluate every N steps (always at the end).")
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N steps (always at the end).")
    save_total_limit: int | None = Field(2, gt=0, description="Keep at most this many checkpoints.")
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab"]] = Field(
        default_factory=list,
        description="Experiment trackers (through accelerate) that receive the metrics.jsonl records; tensorboard writes "
        "to output_dir/tensorboard, the others need their package installed.",
    )
    tracker_project: str = Field("tnlora", description="Project (wandb, trackio) or experiment (mlflow) name for report_to.")
    run_name: str | None = Field(None, description="Run name for report_to; default: the name of output_dir.")

    @model_validator(mode="before")
    @classmethod
    def _default_length(cls, raw: Any) -> Any:
        # max_steps has a default only when epochs does not decide the length instead.
        if isinstance(raw, dict) and raw.get("max_steps") is None and raw.get("epochs") is None:
            return {**raw, "max_steps": DEFAULT_MAX_STEPS}
        return raw

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads a bare `no` as false


class QuantizationConfig(StrictModel):
    bits: Literal[4, 8] = Field(description="Load the frozen base in 4-bit (QLoRA-style) or 8-bit through bitsandbytes.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="4-bit: quantize the quantization constants too.")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="4-bit matmul dtype; auto: bf16 on a GPU that has it, else fp32.")


class EvalGenerateConfig(StrictModel):
    """`tnlora eval RUN --generate`: greedy generations for the held-out examples, scored
    against their references (exact match, extracted-answer accuracy, BLEU, chrF, ROUGE-L)."""

    max_new_tokens: int = Field(128, gt=0, description="Most tokens generated per held-out prompt.")
    batch_size: int | None = Field(None, gt=0, description="Prompts per generation batch (default: training.eval_batch_size or batch_size).")
    max_examples: int | None = Field(None, gt=0, description="Score only the first N held-out examples.")
    answer_pattern: str = Field(
        r"(-?[\d,]*\.?\d+)",
        description="Regex of the answer in a text (its last match; group 1 if it has one): accuracy of the extracted answer. Default: the last number.",
    )
    show: int = Field(3, ge=0, description="Examples printed with reference, base and tuned output.")

    @field_validator("answer_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        import re

        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class Recipe(StrictModel):
    model: str = Field(description="Embedded alias (minilm, smollm2-135m), a local directory, or a hub id.")
    task: Task = Field(
        description="classification (text or text pair -> label, head trained), causal-lm (next-token loss), "
        "instruction (loss on the response only; chat template when the tokenizer has one), "
        "chat (multi-turn conversations, loss on the assistant turns as data.train_on says)."
    )
    adapter: AdapterSection
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output_dir: str = Field("runs/run", description="Run directory: adapter/, checkpoints/, metrics.jsonl, loss.png, eval.json, recipe.yaml.")
    model_dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="dtype of the frozen base weights; adapters are always fp32. auto: the checkpoint's."
    )
    model_attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa",
        description="Attention kernel of the base model: sdpa (PyTorch's fused attention), eager (plain matmuls), "
        "flash_attention_2 (needs the flash-attn package and a CUDA GPU; use with bfloat16/float16 model_dtype).",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the model directory or hub repository.")
    allow_pickle: bool = Field(False, description="Load a base model stored only as pickled weights (pytorch_model.bin) with torch's weights-only loader; refused by default.")
    quantization: QuantizationConfig | None = Field(None, description="Quantize the frozen base (adapters and task head stay full precision).")
    eval_generate: EvalGenerateConfig = Field(default_factory=EvalGenerateConfig)


# ---------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override (`--set a.b=v`) and validate a recipe file."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"recipe file {path} is a directory", hint="pass the path of a YAML recipe inside it, e.g. recipes/quickstart.yaml")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist", hint="pass the path of a YAML recipe, e.g. recipes/quickstart.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}, line {line})", hint="save the recipe as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}", hint="fix the YAML syntax") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys, got {type(raw).__name__}")
    apply_overrides(raw, overrides or [])
    return validate_recipe(raw, source=str(path))


def apply_overrides(raw: dict, overrides: list[str]) -> None:
    """Apply `key.path=value` overrides in place; values are parsed as YAML."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE", hint="for example --set training.max_steps=50")
        parts = key.strip().split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise RecipeError(f"--set {item!r}: {where} is not a section", hint=f"{where} holds a value; set it directly")
            node = child
        try:
            node[parts[-1]] = yaml.load(value, Loader=UniqueKeyLoader) if value != "" else None  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            if value.lstrip().startswith(("[", "{")):  # meant as a list or mapping: a typo, not a string
                raise RecipeError(f"--set {item!r}: not valid YAML ({getattr(exc, 'problem', exc)})", hint="check the brackets and commas, e.g. [q_proj,v_proj]") from None
            node[parts[-1]] = value


def validate_recipe(raw: dict, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping; raise one `RecipeError` naming the first problems."""
    _check_keys(raw, Recipe, ())
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_format_validation_error(exc, raw, source), hint="fix the value in the recipe or with --set KEY=VALUE") from None
    _check_finite(recipe.model_dump(mode="python"), ())
    _cross_checks(recipe)
    return recipe


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (a second `training:`
    section would otherwise silently replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (lines {seen[key]} and {line}); the second would replace the first", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_finite(value: Any, loc: tuple) -> None:
    """No NaN or infinity anywhere: `.inf` passes range checks like `gt=0`."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{_path(loc)}: must be a finite number (got {value})", hint="fix the value in the recipe or with --set KEY=VALUE")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, loc + (k,))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, loc + (i,))


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def _cross_checks(recipe: Recipe) -> None:
    data, training = recipe.data, recipe.training
    if recipe.task == "classification" and not data.label_column:
        raise RecipeError(
            "data.label_column: a classification task needs a label column",
            hint="set data.label_column to the column that holds each example's class",
        )
    targets = recipe.adapter.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as exc:
            raise RecipeError(
                f"adapter.target_modules: {targets!r} is not a valid regular expression ({exc})",
                hint="give a list of module names, e.g. [q_proj, v_proj], or a valid regex",
            ) from None
    if data.labels is not None and len(set(data.labels)) < 2:
        raise RecipeError("data.labels: needs at least two distinct labels", hint="list the classes to keep, or remove the key")
    if training.max_steps is not None and training.epochs is not None:
        raise RecipeError(
            "training: max_steps and epochs are both set; give exactly one",
            hint="remove training.max_steps to train for a number of epochs, or remove training.epochs",
        )
    if training.warmup_ratio is not None and training.warmup_steps > 0:
        raise RecipeError(
            "training: warmup_steps and warmup_ratio are both set; give at most one",
            hint="remove one of training.warmup_steps and training.warmup_ratio",
        )
    if training.max_steps is not None and training.warmup_steps >= training.max_steps:
        raise RecipeError(
            f"training.warmup_steps: {training.warmup_steps} warm-up steps leave no training in {training.max_steps} steps",
            hint="use fewer warm-up steps than training.max_steps",
        )


# ------------------------------------------------------------------- key checking


def _path(parts: tuple) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic model classes inside an annotation (Optional, Union, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _model_classes(typing.get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [c for a in typing.get_args(annotation) for c in _model_classes(a)]
    return []


def _check_keys(raw: Any, model: type[BaseModel], loc: tuple) -> None:
    """Reject unknown keys at every depth, with the nearest valid key as a suggestion."""
    if not isinstance(raw, dict):
        return
    fields = model.model_fields
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(fields)}"
            raise RecipeError(f"{_path(loc + (key,))}: unknown key", hint=hint)
        value = raw[key]
        if _wants_int(fields[key].annotation) and (isinstance(value, bool) or isinstance(value, float)):
            # pydantic would read `true` as 1 and 2.0 as 2: a whole number must be written as one.
            raise RecipeError(f"{_path(loc + (key,))}: expected a whole number, got {value!r}", hint="write an integer, e.g. 100")
    for key, value in raw.items():
        classes = _model_classes(fields[key].annotation)
        if not classes:
            continue
        if key == "adapter" and model is Recipe:
            _check_keys(value, _adapter_config_class(value, loc + (key,)), loc + (key,))
        elif len(classes) == 1:
            _check_keys(value, classes[0], loc + (key,))


def _wants_int(annotation: Any) -> bool:
    """int or int | None (not bool, not a union with float)."""
    if annotation is int:
        return True
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args == [int]
    return False


def _adapter_config_class(raw: Any, loc: tuple) -> type[BaseModel]:
    if not isinstance(raw, dict):
        raise RecipeError(f"{_path(loc)}: must be a mapping with at least 'type' and 'target_modules'", hint="e.g. adapter: {type: lora, target_modules: [query, value]}")
    kind = raw.get("type")
    names = list(REGISTRY)
    if kind is None:
        raise RecipeError(f"{_path(loc + ('type',))}: missing", hint=f"set the adapter type, one of: {', '.join(names)}")
    if kind not in REGISTRY:
        close = difflib.get_close_matches(str(kind), names, n=1, cutoff=0.5)
        hint = (f"did you mean '{close[0]}'? " if close else "") + f"available adapters: {', '.join(names)}"
        raise RecipeError(f"{_path(loc + ('type',))}: unknown adapter type '{kind}'", hint=hint)
    return REGISTRY[kind].config_class


def _format_validation_error(exc: ValidationError, raw: dict, source: str) -> str:
    """One line per offending path; union-member and discriminator noise removed."""
    messages: dict[str, list[str]] = {}
    for err in exc.errors():
        node: Any = raw
        kept: list = []
        for part in err["loc"]:
            # Keep only the parts of the location that exist in the user's YAML.
            if isinstance(node, dict) and part in node:
                kept.append(part)
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                kept.append(part)
                node = node[part]
            elif err["type"] == "missing" and isinstance(node, dict) and isinstance(part, str) and part not in REGISTRY:
                kept.append(part)
                break
        path = _path(tuple(kept))
        msg = "required key is missing" if err["type"] == "missing" else err["msg"]
        if "input" in err and err["type"] != "missing" and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r})"
        if msg not in messages.setdefault(path, []):
            messages[path].append(msg)
    lines = [f"{path}: {' or '.join(msgs)}" for path, msgs in messages.items()]
    head = f"invalid recipe {source}" if len(lines) > 1 else ""
    return (head + ":\n  " + "\n  ".join(lines)) if head else lines[0]

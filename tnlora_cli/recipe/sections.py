"""Recipes: YAML files validated into typed, strict settings.

Every section rejects unknown keys (with a "did you mean" suggestion), checks types and
ranges, and a few rules tie fields together (a classification task needs a label column).
Errors name the YAML path and raise `RecipeError` before anything is loaded or written.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from ..adapters.configs import CONFIGS, StrictModel

Task = Literal["classification", "image-classification", "causal-lm", "instruction", "chat"]
#: Tasks whose model predicts one label per example through a freshly created, fully trained head.
CLASSIFICATION_TASKS = ("classification", "image-classification")
IMAGE_TASK = "image-classification"

# Discriminated on `type`: one strict config class per adapter (adapters/configs.py, no torch).
AdapterSection = Annotated[
    Union[tuple(CONFIGS.values())],  # type: ignore[valid-type]
    Field(discriminator="type"),
]


class DataSource(StrictModel):
    path: str = Field(description="Embedded alias, local file, directory or glob, or a hub dataset id.")
    config: str | None = Field(None, description="Hub dataset configuration name (a local path or embedded set is read whole: refused there).")
    split: str = Field("train", description="Hub dataset split (a local path or embedded set is read whole: another split is refused there).")
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows of this source.")


class DataConfig(StrictModel):
    train: str | list[str | DataSource] = Field(
        description="Embedded alias (chatterbot, shakespeare; mnist for image-classification), a local .jsonl/.json/.csv/.parquet/.txt file, directory or glob, "
        "a hub dataset id, or a list of these (concatenated; each may be {path, max_rows, config, split})."
    )
    eval: str | DataSource | None = Field(None, description="Held-out file (or {path, max_rows, config, split}, e.g. a hub dataset's test "
                                          "split); default: a deterministic split of `train`.")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of `train` held out when `eval` is not given.")
    split_seed: int = Field(0, description="Seed of the train/held-out split.")
    max_train_samples: int | None = Field(None, gt=0, description="Use at most this many training examples (default: all).")
    max_eval_samples: int | None = Field(
        None, gt=0, description="Use at most this many held-out examples (default: all); with the split made from `train`, "
        "this many rows are held out and the rest train."
    )
    text_column: str = Field("text", description="Text of each example (classification, causal-lm).")
    text_pair_column: str | None = Field(None, description="Second text for pair classification.")
    label_column: str | None = Field(None, description="Class labels (classification; image-classification: default `label`).")
    labels: list[str] | None = Field(None, description="Keep only rows with these labels, in this order (image-classification: the classes, "
                                     "in this order; an image with another label is a bad row).")
    shots_per_class: int | None = Field(None, gt=0, description="Classification: train on K examples of each class, drawn from the training split "
                                        "with sample_seed (few-shot, as TRAC's 10 per class); a class with fewer is refused.")
    sample_seed: int = Field(0, description="Seed of the shots_per_class draw.")
    augment: Literal["none", "flip", "crop_flip"] = Field(
        "none", description="image-classification: training images randomly flipped horizontally (flip), or cropped (random-resized crop, "
        "scale 0.08-1, aspect 3/4-4/3, of the cached image) and flipped (crop_flip); drawn from the training RNG like dropout (deterministic "
        "in seed and step, resumed exactly); evaluation never augments.")
    image_column: str = Field("image", description="image-classification: the image of each row of a JSONL/CSV/Parquet file (a path relative "
                              "to the file, or image bytes); an image folder has one sub-folder per class instead.")
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
    num_proc: int | None = Field(None, gt=0, description="Processes for tokenization (default: none, the calling process tokenizes; forking worker processes can hang where threads already run).")


#: Optimizer steps when neither `training.max_steps` nor `training.epochs` is given.
DEFAULT_MAX_STEPS = 200
#: The most optimizer steps a run may have (a typo such as 1e29 would otherwise overflow the
#: progress display and the schedule; a billion steps is years of training).
MAX_STEPS_LIMIT = 1_000_000_000


class TrainingConfig(StrictModel):
    max_steps: int | None = Field(
        None, gt=0, le=MAX_STEPS_LIMIT, description=f"Optimizer steps ({DEFAULT_MAX_STEPS} when `epochs` is not set either; at most {MAX_STEPS_LIMIT:,})."
    )
    epochs: float | None = Field(
        None,
        gt=0.0,
        le=MAX_STEPS_LIMIT,
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
    compile: bool = Field(
        False,
        description="torch.compile the adapted model (adapters included) before training: the first steps pay for "
        "compilation, later ones run fused kernels. One process or DDP (not fsdp or deepspeed).",
    )
    distributed: Literal["auto", "ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"] = Field(
        "auto",
        description="Multi-process engine under `accelerate launch`; auto: what the accelerate config asks for (FSDP, DeepSpeed), else DDP.",
    )
    log_every: int = Field(10, gt=0, description="Write a metrics.jsonl record (and a log line) every N steps.")
    eval_every: int | None = Field(None, gt=0, description="Evaluate every N steps (always at the end).")
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N steps (always at the end).")
    save_every_minutes: float | None = Field(
        30,
        gt=0,
        description="Also checkpoint when this many minutes of training have passed since the last checkpoint (null: by steps "
        "only). SIGINT/SIGTERM always save a checkpoint after the step in progress.",
    )
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

        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class Recipe(StrictModel):
    model: str = Field(description="Embedded alias (minilm, smollm2-135m; resnet-18, resnet-18-1ch with random weights), a local directory, or a hub id.")
    task: Task = Field(
        description="classification (text or text pair -> label, head trained), image-classification (image -> label, "
        "head trained; any AutoModelForImageClassification model), causal-lm (next-token loss), "
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

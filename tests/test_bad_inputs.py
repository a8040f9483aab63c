"""A catalogue of bad inputs and faults: each gets one message, the right exit code, no
traceback, and leaves the disk as promised.

Adding a case is one line in one of the tables below. Cases run in-process through typer's
CliRunner against a few shared tiny runs (trained once per module, two steps each).

    R(id, mutation, message)                -> `tnlora train RECIPE` with the recipe changed
    Y(id, yaml_text_edit, message)          -> the recipe file's text changed
    C(id, argv, exit, message, check=None)  -> any command; {run}, {ckpt}, {base}, {tmp}, {recipe} are filled in
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pytest
import torch
import yaml
from conftest import write_recipe
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tnlora_cli.cli import app
from tnlora_cli.run.resume import write_manifest

runner = CliRunner()


@pytest.fixture(autouse=True)
def _wide_console(wide_console):
    """Messages on one line each (rich would wrap them at 80 columns)."""


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def mutate(raw: dict) -> None:
        node = raw
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return mutate


def _drop(path: str) -> Callable[[dict], None]:
    def mutate(raw: dict) -> None:
        node = raw
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node.pop(last)

    return mutate


def _rows(task: str, rows: list, **data: Any) -> Callable[[dict], None]:
    """Train the tiny Llama on these rows (written beside the recipe) for a chat or instruction task."""

    def mutate(raw: dict) -> None:
        path = Path(raw["output_dir"]).parent / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        raw.update(task=task, model=str(Path(raw["model"]).parent / "llama"), data={"train": str(path), "max_length": 32, **data})
        raw["adapter"]["target_modules"] = ["q_proj", "v_proj"]

    return mutate


def _images(damage: Callable[[Path], None] | None = None, model: str = "vit", task: str = "image-classification", **data: Any) -> Callable[[dict], None]:
    """Train a tiny vision model (test_images) on an image folder beside the recipe, damaged by `damage`."""

    def mutate(raw: dict) -> None:
        data_ = dict(data)
        from test_images import image_folder, save_vision_models

        root = Path(raw["output_dir"]).parent
        folder = image_folder(root / "images", per_class=4)
        if damage:
            damage(folder)
        train = folder / data_.pop("train") if "train" in data_ else folder  # a file inside the folder
        raw.update(task=task, model=str(save_vision_models(root / "models")[model]), data={"train": str(train), **data_})
        raw["adapter"]["target_modules"] = ["q_proj", "v_proj"]

    return mutate


def _write(name: str, content: bytes | Callable[[Path], bytes]) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(content(folder) if callable(content) else content)


_HI = {"role": "user", "content": "what is the cat"}
_CALL = {"type": "function", "function": {"name": "find", "arguments": '{"q": "cat"}'}}


class R(NamedTuple):
    id: str
    mutate: Callable[[dict], None]
    message: str
    exit: int = 2


class Y(NamedTuple):
    id: str
    edit: Callable[[str], str | bytes]
    message: str
    exit: int = 2


class C(NamedTuple):
    id: str
    argv: list[str]
    exit: int
    message: str
    check: Callable[[dict], None] | None = None
    #: Environment variables for the command ({tmp}, {recipe}, ... filled in as in argv).
    env: dict[str, str] | None = None


# ----------------------------------------------------------------- recipe values
RECIPE_CASES = [
    R("unknown top key", _set("epochz", 3), r"epochz: unknown key"),
    R("unknown training key", _set("training.lerning_rate", 0.1), r"did you mean 'learning_rate'"),
    R("max_steps true", _set("training.max_steps", True), r"training.max_steps: expected a whole number, got True"),
    R("max_steps 2.5", _set("training.max_steps", 2.5), r"training.max_steps: expected a whole number"),
    R("max_steps 0", _set("training.max_steps", 0), r"training.max_steps"),
    R("max_steps negative", _set("training.max_steps", -5), r"training.max_steps"),
    R("max_steps string", _set("training.max_steps", "many"), r"training.max_steps"),
    R("batch_size 0", _set("training.batch_size", 0), r"training.batch_size"),
    R("batch_size true", _set("training.batch_size", True), r"training.batch_size: expected a whole number"),
    R("batch_size 1e20 string", _set("training.batch_size", "1e20"), r"training.batch_size"),
    R("batch_size beyond memory", _set("training.batch_size", 10**12), r"memory estimate .* exceeds .* available.*--skip-memory-check"),
    R("learning_rate nan", _set("training.learning_rate", float("nan")), r"training.learning_rate"),
    R("learning_rate inf", _set("training.learning_rate", float("inf")), r"training.learning_rate: must be a finite number"),
    R("learning_rate negative", _set("training.learning_rate", -1.0), r"training.learning_rate"),
    R("learning_rate text", _set("training.learning_rate", "fast"), r"training.learning_rate"),
    R("weight_decay negative", _set("training.weight_decay", -0.1), r"training.weight_decay"),
    R("weight_decay inf", _set("training.weight_decay", float("inf")), r"training.weight_decay: must be a finite number"),
    R("max_grad_norm inf", _set("training.max_grad_norm", float("inf")), r"training.max_grad_norm: must be a finite number"),
    R("max_grad_norm 0", _set("training.max_grad_norm", 0), r"training.max_grad_norm"),
    R("warmup too long", _set("training.warmup_steps", 500), r"training.warmup_steps"),
    R("warmup true", _set("training.warmup_steps", True), r"training.warmup_steps: expected a whole number"),
    R("scheduler unknown", _set("training.lr_scheduler", "zigzag"), r"training.lr_scheduler"),
    R("mixed precision unknown", _set("training.mixed_precision", "fp8"), r"training.mixed_precision"),
    R("distributed unknown", _set("training.distributed", "mpi"), r"training.distributed"),
    R("log_every 0", _set("training.log_every", 0), r"training.log_every"),
    R("eval_every negative", _set("training.eval_every", -1), r"training.eval_every"),
    R("save_every 0", _set("training.save_every", 0), r"training.save_every"),
    R("save_total_limit 0", _set("training.save_total_limit", 0), r"training.save_total_limit"),
    R("accumulation 0", _set("training.gradient_accumulation_steps", 0), r"training.gradient_accumulation_steps"),
    R("eval_batch_size 0", _set("training.eval_batch_size", 0), r"training.eval_batch_size"),
    R("seed text", _set("training.seed", "lucky"), r"training.seed"),
    R("training not a mapping", _set("training", [1, 2]), r"training"),
    R("adapter type unknown", _set("adapter.type", "lorax"), r"unknown adapter type 'lorax'"),
    R("adapter type missing", _drop("adapter.type"), r"adapter.type: missing"),
    R("adapter not a mapping", _set("adapter", "lora"), r"adapter: must be a mapping"),
    R("adapter r 0", _set("adapter.r", 0), r"adapter.r"),
    R("adapter r true", _set("adapter.r", True), r"adapter.r: expected a whole number"),
    R("adapter alpha inf", _set("adapter.alpha", float("inf")), r"adapter.alpha: must be a finite number"),
    R("adapter unknown key", _set("adapter.rank", 4), r"adapter.rank: unknown key"),
    R("target regex invalid", _set("adapter.target_modules", "query(["), r"adapter.target_modules: .* is not a valid regular expression"),
    R("target matches nothing", _set("adapter.target_modules", ["nonexistent_proj"]), r"target_modules"),
    R("task unknown", _set("task", "translation"), r"task"),
    R("task missing", _drop("task"), r"task: required key is missing"),
    R("model missing", _drop("model"), r"model: required key is missing"),
    R("model directory missing", _set("model", "/nonexistent/model"), r"does not exist|no config"),
    R("data missing", _drop("data"), r"data: required key is missing"),
    R("data.train missing", _drop("data.train"), r"data.train: required key is missing"),
    R("eval_fraction 1.5", _set("data.eval_fraction", 1.5), r"data.eval_fraction"),
    R("eval_fraction nan", _set("data.eval_fraction", float("nan")), r"data.eval_fraction"),
    R("max_length 4", _set("data.max_length", 4), r"data.max_length"),
    R("max_length true", _set("data.max_length", True), r"data.max_length: expected a whole number"),
    R("max_length beyond positions", _set("data.max_length", 4096), r"data.max_length: 4096 tokens exceed the 128 positions"),
    R("classification without label column", _drop("data.label_column"), r"data.label_column"),
    R("labels single", _set("data.labels", ["pos"]), r"data.labels: needs at least two"),
    R("model_dtype int8", _set("model_dtype", "int8"), r"model_dtype"),
    R("quantization bits 3", _set("quantization", {"bits": 3}), r"quantization.bits"),
    # The 32-wide tiny BERT: widths bitsandbytes' CPU 4-bit kernels mishandle, refused by layer name.
    R("4-bit layers too narrow for the CPU kernels", _set("quantization", {"bits": 4}), r"multiple of 64.*attention\.self\.query \(32 -> 32\)"),
    R("output_dir list", _set("output_dir", ["a", "b"]), r"output_dir"),
    R("trust_remote_code text", _set("trust_remote_code", "maybe"), r"trust_remote_code"),
    R("allow_pickle text", _set("allow_pickle", "sometimes"), r"allow_pickle"),
    # output:
    R("adapter type switched, other type's keys left", _set("adapter.type", "tera"),
      r"adapter\.(r|alpha), adapter\.(r|alpha): unknown keys for adapter type tera .*--set 'adapter=\{type: tera, target_modules: \[query, value\]\}'"),
    R("adapter key of another type", _set("adapter.indim", 4), r"adapter.indim: unknown key for adapter type lora \(keys of tera\).*--unset adapter.indim"),
    # chat:
    R("chat ShareGPT row in an OpenAI file", _rows("chat", [{"messages": [_HI, {"role": "assistant", "content": "the cat"}]},
                                                            {"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "the"}]}]),
      r"row 2: turn 1 is ShareGPT style \(from/value\), but the turns are read as OpenAI style \(role/content\), as detected from the file's first conversation"),
    R("chat tool call arguments not JSON", _rows("chat", [{"messages": [_HI, {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "find", "arguments": "{q: cat"}}]}]}]), r"row 1: turn 2's tool_calls\[0\] \(find\): arguments are not valid JSON"),
    R("chat tool calls on a user turn", _rows("chat", [{"messages": [{**_HI, "tool_calls": [_CALL]}]}]), r"row 1: turn 1 has tool_calls but role 'user'"),
    R("chat tool calls the template cannot render", _rows("chat", [{"messages": [_HI, {"role": "assistant", "content": "let me see", "tool_calls": [_CALL]}]}]),
      r"row 1: the chat template does not render tool calls \(turn 2 has 1\)"),
    R("chat content null and a template without tools", _rows("chat", [{"messages": [_HI, {"role": "assistant", "content": None, "tool_calls": [_CALL]}]}]),
      r"row 1: the chat template cannot render this conversation"),
    R("chat tools column not a list", _rows("chat", [{"messages": [_HI, {"role": "assistant", "content": "the cat"}], "tools": "find"}]),
      r"row 1: field 'tools' is not a list of tool schemas"),
    R("chat assistant turn only spaces", _rows("chat", [{"messages": [_HI, {"role": "assistant", "content": "  "}]}]), r"row 1: assistant turn 2 is empty"),
    R("every row dropped for max_length", _rows("instruction", [{"prompt": "what is the cat " * 20, "response": "the cat"}] * 30),
      r"data: 30 of 30 rows read were dropped \(30: no trained token within data.max_length=32 \(the prompt fills it\)\), so 0 examples are too few to hold out"),
    R("bad rows dropped before the split", _rows("instruction", [{"prompt": "what", "response": None}] * 5 + [{"prompt": "what", "response": "the"}], on_bad_rows="drop"),
      r"data: 5 of 6 rows read were dropped \(5: field 'response' is missing or null\), so 1 example is too few"),
    # cache:
    R("exclude regex invalid", _set("adapter.exclude_modules", "query(["), r"adapter.exclude_modules: 'query\(\[' is not a valid regular expression"),
    # train:
    R("max_steps 1e29", _set("training.max_steps", 10**29), r"training.max_steps: Input should be less than or equal to 1000000000"),
    R("epochs 1e15", lambda r: r["training"].update(max_steps=None, epochs=1e15), r"training.epochs: Input should be less than or equal to 1000000000"),
    R("save_every_minutes 0", _set("training.save_every_minutes", 0), r"training.save_every_minutes: Input should be greater than 0"),
    # images:
    R("image truncated", _images(_write("red/001.png", lambda f: (f / "red/000.png").read_bytes()[:150])), r"data: \S+/red/001\.png: not a readable image"),
    R("image file not an image", _images(_write("green/readme.txt", b"notes")), r"data: \S+/green/readme\.txt: not a readable image"),
    R("image path unreadable", _images(lambda f: (f / "index.jsonl").write_text('{"image": "red/000.png", "label": "red"}\n{"image": "gone.png", "label": "green"}\n'),
                                       train="index.jsonl"), r"index\.jsonl row 2: cannot read \S+/gone\.png \(No such file or directory\)"),
    R("image label not in data.labels", _images(labels=["green", "red"]), r"data: \S+/stripes/000\.png: label 'stripes' is not in data.labels \(green, red\)"),
    R("image class folder empty", _images(lambda f: (f / "blue").mkdir()), r"data.train: class folder \S+/blue is empty"),
    R("image smaller than one patch", _images(lambda f: __import__("test_images").draw("red", __import__("random").Random(0), (4, 6)).save(f / "red/tiny.png")),
      r"red/tiny\.png: the image is 4x6, smaller than one 8x8 patch"),
    R("vision model under a text task", _images(task="classification", label_column="label"), r"task: classification is for language models, and the model is a vision model \(ViTConfig\).*task: image-classification"),
    R("text model under the image task", _set("task", "image-classification"), r"task: image-classification needs a vision model .* BertConfig"),
    # dora:
    R("use_dora on a nonlinear tensorguide", _set("adapter", {"type": "tensorguide", "target_modules": ["query"], "activation": "relu", "use_dora": True}),
      r"adapter.use_dora: DoRA rescales a weight update, but TensorGuide with activation: relu is a nonlinear branch"),
    R("use_dora not a boolean", _set("adapter.use_dora", "maybe"), r"adapter.use_dora"),
    # images2:
    R("image smaller than a ResNet's stem stride", _images(lambda f: __import__("test_images").draw("red", __import__("random").Random(0), (3, 5)).save(f / "red/tiny.png"),
                                                          model="resnet"), r"red/tiny\.png: the image is 3x5, smaller than one 4x4 patch"),
    # mnist:
    R("image alias under a text task", _set("data.train", "mnist"), r"data.train: 'mnist' is an embedded image data set, which only task image-classification reads"),
    # probe:
    R("augment under a text task", _set("data.augment", "flip"), r"data.augment: flip augments images, and task classification reads text"),
    R("image_column of an image folder", _images(image_column="pix"), r"data.image_column: 'pix' names a column, but data.train is an image folder .*which has no columns"),
    R("split of a local file", lambda r: r["data"].update(eval={"path": r["data"]["train"], "split": "test"}),
      r"data.eval.split: 'test' selects part of a hub dataset, but '\S+' is a local path, read whole"),
    R("image folder without class sub-folders", _images(train="red"), r"data.train: \S+/red has no class sub-folders .*a sub-folder named after the class"),
    R("labels of mixed types", _images(lambda f: (f / "index.jsonl").write_text('{"image": "red/000.png", "label": 1}\n{"image": "red/001.png", "label": "red"}\n'),
                                       train="index.jsonl"), r"data.label_column: column 'label' of \S+/index\.jsonl holds values of mixed types"),
    R("image paths and numbers mixed", _images(lambda f: (f / "index.jsonl").write_text('{"image": "red/000.png", "label": "red"}\n{"image": 7, "label": "red"}\n'),
                                               train="index.jsonl"), r"data.image_column: column 'image' of \S+/index\.jsonl holds neither image paths nor image bytes \(values of mixed types\)"),
    R("all-linear on a CNN whose only linear layer is the head", lambda r: (_images(model="resnet")(r), r["adapter"].update(target_modules="all-linear")),
      r"adapter.target_modules: 'all-linear' leaves out the output head, and this model has no other linear layer \(its linear layers: classifier.1\)"),
    R("labels listed twice", _set("data.labels", ["pos", "neg", "pos"]), r"data.labels: 'pos' listed more than once"),
]

# ----------------------------------------------------------------- recipe files
YAML_CASES = [
    Y("duplicate top-level section", lambda t: t + "training:\n  max_steps: 3\n", r"key 'training' appears twice \(lines \d+ and \d+\)"),
    Y("duplicate nested key", lambda t: t.replace("  max_steps: 2\n", "  max_steps: 2\n  max_steps: 3\n"), r"key 'max_steps' appears twice"),
    Y("non-UTF-8 bytes", lambda t: t.encode() + b"# caf\xe9\n", r"not UTF-8 text \(byte \d+, line \d+\)"),
    Y("YAML syntax error", lambda t: t + "training: [unclosed\n", r"not valid YAML \(line \d+"),
    Y("recipe is a list", lambda t: "- a\n- b\n", r"a recipe must be a mapping"),
    Y("recipe is empty", lambda t: "", r"required key is missing"),
    Y("tab indentation", lambda t: t + "extra:\n\t- x\n", r"not valid YAML"),
]


def _corrupt_config(d: Path) -> None:
    (d / "config.json").write_text("{not json")


def _unknown_type(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "bertoid"}))


def _remote_code(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_x.XModel"}}))


def _truncate_weights(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _garbage_weights(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 100)


def _only_pickle(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")


def _no_config(d: Path) -> None:
    (d / "config.json").unlink()


# model directory damage -> (mutation of a copy of the tiny BERT, message)
MODEL_CASES = [
    ("corrupt config.json", _corrupt_config, r"config.json is not valid JSON"),
    ("unknown model_type", _unknown_type, r"model_type 'bertoid'"),
    ("remote code refused", _remote_code, r"needs its own Python code.*trust_remote_code"),
    ("truncated safetensors", _truncate_weights, r"model.safetensors is damaged"),
    ("garbage safetensors", _garbage_weights, r"model.safetensors is damaged"),
    ("pickle only refused", _only_pickle, r"only pickled weights.*allow_pickle"),
    ("no config.json", _no_config, r"has no config.json"),
]


def _no_file(pattern: str) -> Callable[[dict], None]:
    def check(ctx: dict) -> None:
        found = list(Path(ctx["tmp"]).glob(pattern))
        assert not found, f"{pattern} should not exist: {found}"

    return check


def _run_intact(ctx: dict) -> None:
    run = Path(ctx["run"])
    assert (run / "adapter/adapter_model.safetensors").is_file() and (run / "recipe.yaml").is_file()


def _base_intact(ctx: dict) -> None:
    assert load_file(str(Path(ctx["base"]) / "model.safetensors")).keys() == ctx["base_keys"]


# ----------------------------------------------------------------- commands on runs
COMMAND_CASES = [
    C("eval missing run", ["eval", "{tmp}/nope"], 2, r"nope does not exist"),
    C("eval batch-size -4", ["eval", "{run}", "--batch-size", "-4"], 2, r"--batch-size"),
    C("eval batch-size 0", ["eval", "{run}", "--batch-size", "0"], 2, r"--batch-size"),
    C("eval dir without adapter", ["eval", "{tmp}"], 2, r"holds no adapter"),
    C("merge missing run", ["merge", "{tmp}/nope", "--out", "{tmp}/m"], 2, r"does not exist", _no_file("m")),
    C("merge out exists", ["merge", "{run}", "--out", "{tmp}"], 2, r"already exists.*--force"),
    C("merge dtype int8", ["merge", "{run}", "--out", "{tmp}/m", "--dtype", "int8"], 2, r"--dtype int8: unknown", _no_file("m")),
    C("merge max-shard-size lots", ["merge", "{run}", "--out", "{tmp}/m", "--max-shard-size", "lots"], 2, r"--max-shard-size 'lots': not a size", _no_file("m")),
    C("merge out is the run", ["merge", "{run}", "--out", "{run}", "--force"], 2, r"--out .* is the run", _run_intact),
    C("merge out is the adapter", ["merge", "{run}", "--out", "{run}/adapter", "--force"], 2, r"is its adapter", _run_intact),
    C("merge out inside the run", ["merge", "{run}", "--out", "{run}/merged", "--force"], 2, r"lies inside the run", _run_intact),
    C("merge out contains the run", ["merge", "{run}", "--out", "{runparent}", "--force"], 2, r"contains the run", _run_intact),
    C("merge out is the base model", ["merge", "{run}", "--out", "{base}", "--force"], 2, r"is the base model", _base_intact),
    C("merge out inside the base model", ["merge", "{run}", "--out", "{base}/sub", "--force"], 2, r"lies inside the base model", _base_intact),
    C("merge of a checkpoint into its run", ["merge", "{ckpt}", "--out", "{run}", "--force"], 2, r"is the run", _run_intact),
    C("export neither rank nor energy", ["export", "{run}", "--out", "{tmp}/e"], 2, r"exactly one of --rank and --energy", _no_file("e")),
    C("export rank 0", ["export", "{run}", "--out", "{tmp}/e", "--rank", "0"], 2, r"--rank 0", _no_file("e")),
    C("export energy 2", ["export", "{run}", "--out", "{tmp}/e", "--energy", "2"], 2, r"--energy 2", _no_file("e")),
    C("export out is the adapter", ["export", "{run}", "--out", "{run}/adapter", "--rank", "2", "--force"], 2, r"is its adapter", _run_intact),
    C("export out exists", ["export", "{run}", "--out", "{tmp}", "--rank", "2"], 2, r"already exists"),
    C("inspect-rank rtol nan", ["inspect-rank", "{run}", "--rtol", "nan"], 2, r"--rtol nan: must be a number in \[0, 1\)"),
    C("inspect-rank rtol inf", ["inspect-rank", "{run}", "--rtol", "inf"], 2, r"--rtol inf"),
    C("inspect-rank rtol negative", ["inspect-rank", "{run}", "--rtol", "-1"], 2, r"--rtol -1"),
    C("inspect-rank json is a directory", ["inspect-rank", "{run}", "--json", "{tmp}"], 2, r"--json .* is a directory"),
    C("inspect-rank csv is a directory", ["inspect-rank", "{run}", "--csv", "{tmp}"], 2, r"--csv .* is a directory"),
    C("inspect-rank plot in a missing folder", ["inspect-rank", "{run}", "--plot", "{tmp}/no/such/r.png"], 2, r"does not exist"),
    C("inspect-rank missing run", ["inspect-rank", "{tmp}/nope"], 2, r"does not exist"),
    C("train resume path bad", ["train", "{recipe}", "--resume", "{tmp}/nope"], 2, r"not a checkpoint directory"),
    C("train into a finished run", ["train", "{recipe}"], 2, r"already holds a run", _run_intact),
    C("train recipe is a directory", ["train", "{tmp}"], 2, r"is a directory"),
    C("train recipe missing", ["train", "{tmp}/nope.yaml"], 2, r"does not exist"),
    C("train processes 0", ["train", "{recipe}", "--dry-run", "--processes", "0"], 2, r"--processes"),
    C("set without =", ["train", "{recipe}", "--set", "training.max_steps"], 2, r"expected KEY=VALUE"),
    C("set into a value", ["train", "{recipe}", "--set", "model.x=1"], 2, r"model is not a section"),
    C("set broken YAML list", ["train", "{recipe}", "--set", "adapter.target_modules=[query,value"], 2, r"not valid YAML"),
    C("set inf learning rate", ["train", "{recipe}", "--set", "training.learning_rate=.inf"], 2, r"must be a finite number"),
    C("count-params nothing", ["count-params"], 2, r"give a RECIPE or --model"),
    C("count-params unknown model", ["count-params", "--model", "no-such-model", "-s", "adapter.type=lora", "-s", "adapter.target_modules=[q]"], 2,
      r"no config for 'no-such-model'"),
    # output:
    C("eval batch-size 0 in one line", ["eval", "{run}", "--batch-size", "0"], 2, r"^error: .*eval: invalid value for '--batch-size'.* hint: run '.*eval --help'"),
    C("unknown option", ["eval", "{run}", "--batchsize", "4"], 2, r"^error: .*eval: no such option: --batchsize"),
    C("unknown command", ["evaluate", "{run}"], 2, r"^error: .*no such command 'evaluate'"),
    C("missing argument", ["merge"], 2, r"^error: .*merge: missing argument"),
    C("option of the wrong type", ["generate", "{run}", "--prompt", "hi", "--max-new-tokens", "many"], 2, r"^error: .*invalid value for '--max-new-tokens'"),
    C("unset a key the recipe lacks", ["train", "{recipe}", "--unset", "adapter.dropout"], 2, r"--unset adapter.dropout: adapter has no key 'dropout'"),
    C("unset into a value", ["train", "{recipe}", "--unset", "model.name"], 2, r"--unset model.name: model has no key 'name'"),
    C("switch adapter by replacing the section", ["train", "{recipe}", "--dry-run", "--set", "adapter={{type: tera, target_modules: [query, value]}}"], 0, r"tera on"),
    # cache:
    C("prepare json is a directory", ["prepare", "{recipe}", "--json", "{tmp}"], 2, r"--json .* is a directory.*give a file path"),
    C("prepare json in a missing folder", ["prepare", "{recipe}", "--json", "{tmp}/no/such/p.json"], 2, r"no/such, which does not exist", _no_file("no")),
    C("prepare without a recipe", ["prepare"], 2, r"give a RECIPE to prepare"),
    C("prepare list-cache with a recipe", ["prepare", "{recipe}", "--list-cache"], 2, r"act on the whole cache: give no RECIPE"),
    C("prepare list-cache and prune-cache", ["prepare", "--list-cache", "--prune-cache"], 2, r"give one at a time"),
    C("prepare older-than without prune-cache", ["prepare", "--older-than", "3"], 2, r"--older-than goes with --prune-cache"),
    C("prepare all without prune-cache", ["prepare", "{recipe}", "--all"], 2, r"--all goes with --prune-cache"),
    C("prepare prune older-than negative", ["prepare", "--prune-cache", "--older-than", "-1"], 2, r"--older-than -1: must be a number of days >= 0"),
    C("prepare prune older-than nan", ["prepare", "--prune-cache", "--older-than", "nan"], 2, r"--older-than nan: must be a number of days"),
    C("prepare prune all and older-than", ["prepare", "--prune-cache", "--all", "--older-than", "3"], 2, r"--all and --older-than: give one"),
    C("data cache path is a file", ["prepare", "{recipe}"], 2, r"TNLORA_DATA_CACHE: .*recipe.yaml is a file, not a directory", env={"TNLORA_DATA_CACHE": "{recipe}"}),
    C("data cache path under a file", ["eval", "{run}"], 2, r"TNLORA_DATA_CACHE: .*/sub is not a directory \(.*recipe.yaml is a file\)", env={"TNLORA_DATA_CACHE": "{recipe}/sub"}),
    C("count-params directory without config.json", ["count-params", "--model", "{tmp}", "-s", "adapter.type=lora", "-s", "adapter.target_modules=[q]"], 2,
      r"model: .*work has no config.json"),
    # peft:
    C("export as-peft with rank", ["export", "{run}", "--out", "{tmp}/e", "--as-peft", "--rank", "2"], 2, r"--rank and --energy apply to --as-lora only", _no_file("e")),
    C("export as-peft out exists", ["export", "{run}", "--out", "{tmp}", "--as-peft"], 2, r"already exists"),
]

# ----------------------------------------------------------------- runs and checkpoints (need a private copy)


def _garble_adapter_config(run: Path) -> None:
    (run / "adapter/adapter_config.json").write_text("{garbage")


def _truncate_adapter(run: Path) -> None:
    f = run / "adapter/adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:40])


def _nan_adapter(run: Path) -> None:
    f = run / "adapter/adapter_model.safetensors"
    state = load_file(str(f))
    state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    save_file(state, str(f))


def _move_base(run: Path) -> None:
    (run.parent.parent / "base").rename(run.parent.parent / "base-moved")


def _damage_all_checkpoints(run: Path) -> None:
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "training_state.safetensors").write_bytes(b"broken")


RUN_CASES = [
    ("eval garbage adapter_config", _garble_adapter_config, ["eval", "{run}"], 1, r"adapter_config.json is not valid JSON"),
    ("inspect-rank truncated adapter", _truncate_adapter, ["inspect-rank", "{run}"], 1, r"adapter_model.safetensors is damaged"),
    ("export non-finite adapter", _nan_adapter, ["export", "{run}", "--out", "{tmp}/e", "--rank", "2"], 1, r"non-finite values"),
    ("inspect-rank non-finite adapter", _nan_adapter, ["inspect-rank", "{run}"], 1, r"non-finite values"),
    ("merge non-finite adapter", _nan_adapter, ["merge", "{run}", "--out", "{tmp}/m"], 1, r"non-finite values"),
    ("resume with every checkpoint damaged", _damage_all_checkpoints, ["train", "{recipe}", "--resume", "auto"], 2, r"every checkpoint .* is damaged"),
    ("resume with changed learning rate", lambda run: None, ["train", "{recipe}", "--resume", "auto", "--set", "training.learning_rate=0.5"], 2,
     r"differs from the checkpoint's in training.learning_rate"),
    ("resume with changed adapter.r", lambda run: None, ["train", "{recipe}", "--resume", "auto", "--set", "adapter.r=8"], 2, r"adapter.r \(4 -> 8\)"),
    ("resume with a changed global batch", lambda run: None, ["train", "{recipe}", "--resume", "auto", "--set", "training.batch_size=2"], 2,
     r"training.batch_size \(4 -> 2\)"),
    ("resume with a changed held-out split", lambda run: None, ["train", "{recipe}", "--resume", "auto", "--set", "data.max_eval_samples=8"], 2,
     r"data.max_eval_samples \(16 -> 8\)"),
    ("resume with max_steps below checkpoint", lambda run: None, ["train", "{recipe}", "--resume", "auto", "--set", "training.max_steps=1"], 2,
     r"training.max_steps: 1 is below the checkpoint's step 2"),
    # train:
    ("merge with the base moved", _move_base, ["merge", "{run}", "--out", "{tmp}/m"], 2,
     r"base model \S+/base \(model: in \S+recipe.yaml\) is missing: it was moved or deleted after training.*put the base model back at"),
    ("eval with the base moved", _move_base, ["eval", "{run}"], 2, r"base model \S+/base \(model: in \S+recipe.yaml\) is missing"),
]


# ====================================================================== fixtures


@pytest.fixture(scope="module")
def trained(tiny_models, data_files, tmp_path_factory):
    """One finished two-step run with checkpoints at steps 1 and 2 (kept as the template)."""
    from tnlora_cli.recipe.load import validate_recipe
    from tnlora_cli.train import train

    root = tmp_path_factory.mktemp("bad_inputs")
    raw = {
        "model": str(tiny_models["bert"]),
        "task": "classification",
        "adapter": {"type": "lora", "target_modules": ["query", "value"], "r": 4, "alpha": 8},
        "data": {"train": str(data_files["classification"]), "max_length": 32, "label_column": "label", "max_train_samples": 64, "max_eval_samples": 16},
        "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "log_every": 1, "save_every": 1, "seed": 0},
        "output_dir": str(root / "template" / "run"),
    }
    train(validate_recipe(raw))
    return root, raw


def _ctx(trained, tmp_path: Path, tiny_models) -> dict:
    """A private copy of the run and of the base model, so cases may damage them."""
    root, raw = trained
    run = tmp_path / "runs" / "run"
    shutil.copytree(Path(raw["output_dir"]), run)
    base = tmp_path / "base"
    shutil.copytree(tiny_models["bert"], base)
    raw = copy.deepcopy(raw)
    raw["output_dir"], raw["model"] = str(run), str(base)
    # the copied run's recipes name the copied base model, as if trained there
    for recipe_file in [run / "recipe.yaml", *run.glob("checkpoints/*/recipe.yaml")]:
        recipe_file.write_text(recipe_file.read_text().replace(str(tiny_models["bert"]), str(base)))
    for ckpt in run.glob("checkpoints/*"):
        write_manifest(ckpt)
    work = tmp_path / "work"
    work.mkdir()
    recipe = write_recipe(tmp_path / "recipe.yaml", raw)
    return {
        "run": str(run), "runparent": str(run.parent), "ckpt": str(sorted((run / "checkpoints").iterdir())[-1]), "base": str(base),
        "tmp": str(work), "recipe": str(recipe), "raw": raw, "base_keys": load_file(str(base / "model.safetensors")).keys(),
    }


def _invoke(argv: list[str], ctx: dict, env: dict[str, str] | None = None):
    args = [a.format(**ctx) for a in argv]
    return runner.invoke(app, args, env={k: v.format(**ctx) for k, v in (env or {}).items()} or None)


def _assert_one_message(result, exit_code: int, message: str) -> None:
    output = result.output
    assert result.exit_code == exit_code, f"exit {result.exit_code}, expected {exit_code}:\n{output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), f"raised {result.exception!r}"
    assert "Traceback" not in output, output
    flat = " ".join(output.split())  # rich wraps long lines
    assert re.search(message, flat), f"{message!r} not in:\n{output}"
    if exit_code:
        assert len(re.findall(r"^error:", output, re.M)) == 1 and "╭" not in output, f"expected one message, no box:\n{output}"


# ====================================================================== tests


def test_max_length_beyond_positions_is_said_before_a_memory_estimate(make_recipe, tmp_path, monkeypatch):
    """A certain error comes first: with 1 MiB "available", the estimate would refuse too."""
    import tnlora_cli.training.memory as memcheck

    monkeypatch.setattr(memcheck, "available_memory", lambda: 2**20)
    raw = make_recipe()
    raw["data"]["max_length"] = 4096
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    _assert_one_message(runner.invoke(app, ["train", str(recipe)]), 2, r"data.max_length: 4096 tokens exceed the 128 positions")
    raw["data"]["max_length"] = 128
    raw["training"]["batch_size"] = 4096  # the estimate pads to the prepared lengths (short here)
    recipe.write_text(yaml.safe_dump(raw))
    _assert_one_message(runner.invoke(app, ["train", str(recipe)]), 2, r"training: the memory estimate .* exceeds the 1 MiB available")


@pytest.mark.parametrize("case", RECIPE_CASES, ids=lambda c: c.id)
def test_bad_recipe_values(case: R, make_recipe, tmp_path):
    raw = make_recipe()
    raw["training"]["max_steps"] = 2
    case.mutate(raw)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["train", str(recipe)])
    _assert_one_message(result, case.exit, case.message)
    assert not (tmp_path / "run").exists(), "a refused recipe must write nothing"


@pytest.mark.parametrize("case", YAML_CASES, ids=lambda c: c.id)
def test_bad_recipe_files(case: Y, make_recipe, tmp_path):
    raw = make_recipe()
    raw["training"]["max_steps"] = 2
    text = case.edit(yaml.safe_dump(raw, sort_keys=False))
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(text if isinstance(text, bytes) else text.encode())
    _assert_one_message(runner.invoke(app, ["train", str(recipe)]), case.exit, case.message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, damage, message", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_damaged_model_directories(name, damage, message, make_recipe, tiny_models, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_models["bert"], base)
    damage(base)
    raw = make_recipe()
    raw["model"] = str(base)
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", raw))])
    _assert_one_message(result, 2, message)
    assert not (tmp_path / "run").exists()
    if name == "pickle only refused":  # ... and count-params (config only) still works on it
        counted = runner.invoke(app, ["count-params", "--model", str(base), "--task", "classification", "-s", "adapter.type=lora", "-s", "adapter.target_modules=[query]"])
        assert counted.exit_code == 0, counted.output


@pytest.mark.parametrize("case", COMMAND_CASES, ids=lambda c: c.id)
def test_bad_command_inputs(case: C, trained, tiny_models, tmp_path):
    ctx = _ctx(trained, tmp_path, tiny_models)
    _assert_one_message(_invoke(case.argv, ctx, case.env), case.exit, case.message)
    if case.check:
        case.check(ctx)


@pytest.mark.parametrize("name, damage, argv, exit_code, message", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_damaged_runs(name, damage, argv, exit_code, message, trained, tiny_models, tmp_path):
    ctx = _ctx(trained, tmp_path, tiny_models)
    if "resume" in name:
        shutil.rmtree(Path(ctx["run"]) / "adapter")  # an unfinished run, to be resumed
    damage(Path(ctx["run"]))
    _assert_one_message(_invoke(argv, ctx), exit_code, message)
    assert not list(Path(ctx["tmp"]).iterdir()), "nothing may be written"
    assert not (Path(ctx["run"]) / "adapter").exists() or "resume" not in name


# ----------------------------------------------------------------- generation
# gen:
# `generate`, `chat` and `eval --generate` on generative models: a tiny Llama instruction run
# ({llama_run}), the tiny GPT-2 and Llama model directories ({gpt2}, {llama}, 128 positions
# each) and prompt files in {inputs}. Nothing may be written to {tmp}, and {inputs}/exists.jsonl
# keeps its text.
GENERATE_CASES = [
    C("generate output exists", ["generate", "{gpt2}", "--prompt", "hi", "--output", "{inputs}/exists.jsonl"], 2, r"--output .*exists.jsonl already exists.*--force"),
    C("generate output is a directory", ["generate", "{gpt2}", "--input", "{inputs}/ok.jsonl", "--output", "{tmp}"], 2, r"--output .* is a directory"),
    C("generate output folder is a file", ["generate", "{gpt2}", "--prompt", "hi", "--output", "{inputs}/ok.jsonl/out.jsonl"], 2, r"ok.jsonl is a file, not a folder"),
    C("generate input not UTF-8", ["generate", "{gpt2}", "--input", "{inputs}/latin1.jsonl", "--output", "{tmp}/o.jsonl"], 2, r"latin1.jsonl is not UTF-8 text \(byte \d+, line 2\)"),
    C("generate input is a directory", ["generate", "{gpt2}", "--input", "{inputs}"], 2, r"--input: .* is a directory"),
    C("generate input empty prompt", ["generate", "{gpt2}", "--input", "{inputs}/empty_prompt.jsonl", "--output", "{tmp}/o.jsonl"], 2, r"line 2 has an empty 'prompt'"),
    C("generate prompt empty", ["generate", "{gpt2}", "--prompt", ""], 2, r"--prompt is empty"),
    C("generate prompt blank", ["generate", "{llama_run}", "--prompt", "  "], 2, r"--prompt is empty"),
    C("generate temperature nan", ["generate", "{gpt2}", "--prompt", "hi", "--temperature", "nan"], 2, r"--temperature is nan"),
    C("generate temperature inf", ["generate", "{gpt2}", "--prompt", "hi", "--temperature", "inf"], 2, r"--temperature is inf"),
    C("generate temperature negative", ["generate", "{gpt2}", "--prompt", "hi", "--temperature", "-1"], 2, r"--temperature is -1"),
    C("generate top-p nan", ["generate", "{gpt2}", "--prompt", "hi", "--top-p", "nan"], 2, r"--top-p is nan"),
    C("generate max-new-tokens 1e9", ["generate", "{gpt2}", "--prompt", "hi", "--max-new-tokens", "1000000000"], 2,
      r"--prompt: \d+ prompt tokens \+ --max-new-tokens 1000000000 .* exceed the 128 positions the model has"),
    C("generate gpt2 long prompt after short ones", ["generate", "{gpt2}", "--input", "{inputs}/long_last.jsonl", "--output", "{tmp}/o.jsonl", "--batch-size", "1"], 2,
      r"line 3: 2\d\d prompt tokens .* exceed the 128 positions"),
    C("generate llama prompt beyond positions", ["generate", "{llama}", "--input", "{inputs}/long_last.jsonl", "--raw"], 2,
      r"line 3: 200 prompt tokens .* exceed the 128 positions the model has \(max_position_embeddings\).*shorten the prompt"),
    C("generate run max-new-tokens beyond positions", ["generate", "{llama_run}", "--input", "{inputs}/ok.jsonl", "--max-new-tokens", "126"], 2,
      r"line 1: \d+ prompt tokens \+ --max-new-tokens 126 .*lower --max-new-tokens to at most \d+"),
    C("eval generate max-new-tokens 0", ["eval", "{llama_run}", "--generate", "--max-new-tokens", "0"], 2, r"--max-new-tokens is 0"),
    C("eval generate max-new-tokens 1e9", ["eval", "{llama_run}", "--generate", "--max-new-tokens", "1000000000"], 2, r"held-out example \d+(, turn \d+)?: .* exceed the 128 positions"),
    C("chat temperature nan", ["chat", "{llama_run}", "--temperature", "nan"], 2, r"--temperature is nan"),
]


@pytest.fixture(scope="module")
def generative(tiny_models, data_files, tmp_path_factory):
    """A two-step LoRA instruction run on the tiny Llama, and prompt files."""
    from tnlora_cli.recipe.load import validate_recipe
    from tnlora_cli.train import train

    root = tmp_path_factory.mktemp("bad_generation")
    raw = {
        "model": str(tiny_models["llama"]), "task": "instruction",
        "adapter": {"type": "lora", "target_modules": ["q_proj", "v_proj"], "r": 4, "alpha": 8},
        "data": {"train": str(data_files["instruction"]), "max_length": 32, "max_eval_samples": 4},
        "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "log_every": 1, "seed": 0},
        "output_dir": str(root / "run"),
    }
    train(validate_recipe(raw))
    inputs = root / "inputs"
    inputs.mkdir()
    line = json.dumps({"prompt": "what is the cat"}) + "\n"
    (inputs / "ok.jsonl").write_text(line)
    (inputs / "exists.jsonl").write_text("keep me\n")
    (inputs / "latin1.jsonl").write_bytes(line.encode() + b'{"prompt": "caf\xe9"}\n')
    (inputs / "empty_prompt.jsonl").write_text(line + json.dumps({"prompt": " "}) + "\n")
    (inputs / "long_last.jsonl").write_text(line + line + json.dumps({"prompt": " ".join(["cat"] * 200)}) + "\n")
    return {"llama_run": str(root / "run"), "gpt2": str(tiny_models["gpt2"]), "llama": str(tiny_models["llama"]), "inputs": str(inputs)}


@pytest.mark.parametrize("case", GENERATE_CASES, ids=lambda c: c.id)
def test_bad_generation_inputs(case: C, generative, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    run = Path(generative["llama_run"])
    before = {p: p.read_bytes() for p in run.iterdir() if p.is_file()}
    ctx = {**generative, "tmp": str(work)}
    _assert_one_message(_invoke(case.argv, ctx), case.exit, case.message)
    assert not list(work.iterdir()), "nothing may be written"
    assert (Path(generative["inputs"]) / "exists.jsonl").read_text() == "keep me\n"
    assert {p: p.read_bytes() for p in run.iterdir() if p.is_file()} == before, "the run's files are left as they were"
    if case.check:
        case.check(ctx)

"""Shared fixtures: tiny random models built from configs, a word-level tokenizer, small data.

Nothing here downloads: models are made from `transformers` configs and saved to a
session temp directory, the tokenizer is built with `tokenizers` from a fixed word list.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prepared-data cache of this test session only (subprocesses inherit it), removed at exit.
if "TNLORA_DATA_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TNLORA_DATA_CACHE"] = tempfile.mkdtemp(prefix="tnlora-test-data-")
    atexit.register(shutil.rmtree, os.environ["TNLORA_DATA_CACHE"], True)

WORDS = (
    "the a cat dog sat on mat ran fast slow good great bad awful movie film plot actor happy sad "
    "what is why how who when where do you like to eat drink play read write code python java "
    "computer science math music art sport ball game team win lose day night sun moon star sky"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' <eos> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<eos>", "<user>", "<assistant>", "<system>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", eos_token="<eos>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _tiny_configs(vocab_size: int) -> dict:
    from transformers import BertConfig, GPT2Config, LlamaConfig

    return {
        "bert": BertConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=128, pad_token_id=0,
            # No dropout in the base, so runs with different batch layouts (DDP vs one
            # process) are comparable; adapter dropout still exercises the RNG.
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        ),
        # GQA (4 query heads, 2 key/value heads) and tied input/output embeddings.
        "llama": LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0, eos_token_id=4, bos_token_id=2,
        ),
        # GPT-2 uses Conv1D (weights stored as (in, out)).
        "gpt2": GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128, eos_token_id=4, bos_token_id=2),
        # Widths bitsandbytes' CPU 4-bit kernels accept on every CPU (in_features a multiple of 64,
        # out_features of 32; see `model.checks.check_cpu_4bit_layers`): the 4-bit tests' models.
        "bert-wide": BertConfig(
            vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=128, pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        ),
        "llama-wide": LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0, eos_token_id=4, bos_token_id=2,
        ),
    }


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Directories holding tiny random BERT, Llama and GPT-2 models with the tokenizer."""
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("models")
    tokenizer = make_tokenizer()
    paths = {}
    for name, config in _tiny_configs(len(tokenizer)).items():
        torch.manual_seed(0)
        model = AutoModel.from_config(config)
        # Save as the task's base model (a causal LM keeps its head); heads are added on load.
        if config.model_type in ("llama", "gpt2"):
            from transformers import AutoModelForCausalLM

            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config)
        path = root / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths


def _sentence(rng: random.Random, label: int) -> str:
    # A learnable rule: each class has its own marker words.
    markers = [["good", "great", "happy"], ["bad", "awful", "sad"], ["code", "python", "java"]][label]
    filler = [w for w in WORDS if w not in sum(([["good", "great", "happy"], ["bad", "awful", "sad"], ["code", "python", "java"]]), [])]
    words = [rng.choice(filler) for _ in range(6)] + [rng.choice(markers), rng.choice(markers)]
    rng.shuffle(words)
    return " ".join(words)


@pytest.fixture(scope="session")
def data_files(tmp_path_factory) -> dict[str, Path]:
    """Small jsonl files for each task."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    cls = [{"text": _sentence(rng, i % 3), "label": ["pos", "neg", "tech"][i % 3]} for i in range(240)]
    lm = [{"text": " ".join(rng.choice(WORDS[:20]) for _ in range(40))} for _ in range(60)]
    inst = [{"prompt": f"what is {rng.choice(WORDS)}", "response": f"the {w} is {w}"} for w in (rng.choice(WORDS) for _ in range(120))]
    files = {}
    for name, rows in {"classification": cls, "causal-lm": lm, "instruction": inst}.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[name] = path
    return files


@pytest.fixture
def make_recipe(tiny_models, data_files, tmp_path):
    """Recipe dict for a tiny model; tests tweak it and write it with `write_recipe`."""

    def _make(model: str = "bert", task: str = "classification", **adapter) -> dict:
        targets = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}[model.removesuffix("-wide")]
        recipe = {
            "model": str(tiny_models[model]),
            "task": task,
            "adapter": {"type": "lora", "target_modules": targets, "r": 4, "alpha": 8, **adapter},
            "data": {"train": str(data_files[task]), "max_length": 32},
            "training": {"max_steps": 100, "batch_size": 8, "learning_rate": 3e-2, "log_every": 10, "seed": 0},
            "output_dir": str(tmp_path / "run"),
        }
        if task == "classification":
            recipe["data"]["label_column"] = "label"
        return recipe

    return _make


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")


#: The lines of faulthandler's report (on SIGABRT): the error, each thread and its frames.
STACK_LINE_STARTS = ("Fatal Python error", "Thread 0x", "Current thread", "  File ", "  <no Python frame>")


def accelerate_launch(flags: list[str], port: int, *tnlora_args: str, timeout: float = 300, module: str = "tnlora_cli") -> subprocess.CompletedProcess:
    """`accelerate launch FLAGS --num_processes 2 ... -m tnlora_cli TNLORA_ARGS`, one torch thread
    per process (`module`: another entry point that ends by running tnlora's CLI). A launch that
    outlives `timeout` fails the test with the Python stacks of every process in it
    (faulthandler prints them on SIGABRT), so a hang says where it hangs."""
    args = [ACCELERATE, "launch", *flags, "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port), "-m", module, *tnlora_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_tree(proc.pid, signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            _signal_tree(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        stacks = "\n".join(line for line in err.splitlines() if line.startswith(STACK_LINE_STARTS))
        # The stacks first: a report that keeps only the head of a long failure still shows where it hung.
        pytest.fail(f"the launch did not end within {timeout:.0f} s; every process's Python stacks:\n{stacks[-8000:]}\n"
                    f"stdout:\n{out[-1500:]}\nstderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _signal_tree(pid: int, sig: int) -> None:
    """Send `sig` to `pid` and all its descendants (Linux /proc); processes gone meanwhile are skipped."""
    gone = (ProcessLookupError, FileNotFoundError, PermissionError)
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(*gone):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [pid], [pid]
    while todo:
        found = children.get(todo.pop(), [])
        tree += found
        todo += found
    for member in tree:
        with contextlib.suppress(*gone):
            os.kill(member, sig)



def trained_token_runs(example) -> list[list[int]]:
    """The runs of consecutive trained tokens of a prepared example (each label equal to its token)."""
    from tnlora_cli.data.chat import IGNORE_INDEX

    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


@pytest.fixture
def wide_console():
    """Messages on one line each (rich would wrap them at 80 columns)."""
    from tnlora_cli import cli

    widths = cli.console.width, cli.out_console.width
    cli.console.width = cli.out_console.width = 4000
    yield
    cli.console.width, cli.out_console.width = widths


def assert_same_adapters(run_a: Path, run_b: Path, rtol: float, atol: float) -> None:
    """The adapter files of two run directories hold the same tensors, to the tolerance."""
    from safetensors.torch import load_file

    a = load_file(str(run_a / "adapter/adapter_model.safetensors"))
    b = load_file(str(run_b / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}")

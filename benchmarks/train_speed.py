"""Whole training steps: `tnlora train` against HF Trainer + peft LoRA and a bare PyTorch loop.

    python benchmarks/train_speed.py --quick               # MiniLM + SmolLM2 on a CPU, a few minutes
    python benchmarks/train_speed.py --tasks minilm --adapters lora,trac,tera --compile
    python benchmarks/train_speed.py --tasks llama-2-7b --layers 2 --batch 4 --seq 512   # a GPU

The same model, data, adapter targets, batch and steps through three trainers:

- `tnlora:<adapter>`: the library's `train` (what `tnlora train` runs: its loop with the divergence
  guard, clipping, logging every `warmup` steps, checkpoints as the recipe says, the held-out
  comparison at the end); throughput from its own metrics.jsonl windows after the first.
- `trainer`: transformers' `Trainer` with peft's LoRA (same r, alpha, dropout, targets, head).
- `bare`: a plain PyTorch loop with peft's LoRA: AdamW, the schedule, clipping; nothing else.

Each runs in its own process, in an interleaved order, on the micro-batches tnlora itself draws
for those steps (its `BatchStream`, in order), so every trainer sees the same tokens. Tokens/s
counts non-padding tokens over the timed steps (after `--warmup`); peak memory is
`torch.cuda.max_memory_allocated` on a GPU and the process's peak RSS on a CPU (the whole run).
Tasks: `minilm` (the quickstart's classification of chatterbot topics), `smollm2` (chatterbot
instruction data), `llama-2-7b` (a random model of Llama-2-7B's layer shapes, `--layers` deep,
causal LM on packed blocks of `--seq` tokens; meant for a GPU).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from step_time import ADAPTERS

TASKS = {
    "minilm": {
        "model": "minilm", "task": "classification", "targets": ["query", "value"],
        "data": {"train": "chatterbot", "text_column": "prompt", "text_pair_column": "response", "label_column": "category",
                 "labels": ["trivia", "coding", "ai", "psychology", "emotion", "literature", "humor", "money", "science", "greetings"],
                 "eval_fraction": 0.2},
        "batch": 16, "seq": 64, "accumulation": 1, "lr": 5e-3,
    },
    "smollm2": {
        "model": "smollm2-135m", "task": "instruction", "targets": ["q_proj", "v_proj"],
        "data": {"train": "chatterbot", "prompt_column": "prompt", "response_column": "response"},
        "batch": 4, "seq": 96, "accumulation": 2, "lr": 1e-3,
    },
    "llama-2-7b": {
        "model": None, "task": "causal-lm", "targets": ["q_proj", "v_proj"], "data": {"packing": True}, "model_dtype": "bfloat16",
        "batch": 4, "seq": 512, "accumulation": 1, "lr": 1e-3,
    },
}


def _llama_shapes_model(layers: int, seq: int, root: Path) -> tuple[str, str]:
    """A random Llama-2-7B-shaped model (`layers` deep) with a word-level tokenizer, and a text
    file of random words to pack: what speed and memory need, without any download."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from tnlora_cli.model.meta import load_config

    words = [f"w{i}" for i in range(31000)]
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "<eos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="<eos>")
    config = load_config("llama-2-7b")
    config.num_hidden_layers, config.vocab_size, config.pad_token_id, config.eos_token_id = layers, len(vocab), 0, 2
    config.max_position_embeddings = max(config.max_position_embeddings, seq)
    torch.manual_seed(0)
    model_dir = root / "model"
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    data = root / "text.jsonl"
    with data.open("w") as f:
        for _ in range(4000):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(200))}) + "\n")
    return str(model_dir), str(data)


def _recipe(args: argparse.Namespace, adapter: dict, out: Path) -> dict:
    spec = TASKS[args.task]
    data = {**spec["data"], "max_length": args.seq or spec["seq"], "max_held_out": 16}
    model = spec["model"]
    if model is None:
        model, data["train"] = args.model_dir, args.data_file
    steps = args.warmup + args.steps
    return {
        "model": model, "task": spec["task"], "model_dtype": spec.get("model_dtype", "float32"),
        "adapter": {"target_modules": spec["targets"], **adapter},
        "data": data,
        "training": {"max_steps": steps, "batch_size": args.batch or spec["batch"], "gradient_accumulation_steps": spec["accumulation"],
                     "learning_rate": spec["lr"], "warmup_steps": 1, "log_every": args.warmup, "seed": 0, "compile": args.compile_case},
        "output_dir": str(out),
    }


def _peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _clock(args: argparse.Namespace):
    """cpu: this process's CPU time (robust to other processes' load on a busy CPU machine);
    wall: elapsed time (always on a GPU)."""
    import torch

    return time.process_time if args.clock == "cpu" and not torch.cuda.is_available() else time.perf_counter


def run_tnlora(args: argparse.Namespace, adapter: str, out: Path) -> dict:
    import torch

    from tnlora_cli import train
    from tnlora_cli.recipe.load import validate_recipe
    from tnlora_cli.report.reporter import Reporter

    clock, total = _clock(args), args.warmup + args.steps
    marks: dict[int, float] = {}

    class Clock(Reporter):
        """The loop reports every finished step: the timed span runs from the end of the
        last warm-up step to the end of the last step, as for the other trainers."""

        def advance(self, completed: int, fields: dict | None = None) -> None:
            if completed in (args.warmup, total):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks[completed] = clock()

    result = train(validate_recipe(_recipe(args, ADAPTERS[adapter], out)), check_memory=False, reporter=Clock())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "train_loss" in r]
    # tokens of every window but the first (warm-up): its tokens/s times its own elapsed time
    tokens = sum(w["tokens_per_s"] * w["seconds_per_step"] * (w["step"] - b["step"]) for b, w in itertools.pairwise(windows))
    seconds = marks[total] - marks[args.warmup]
    return {"tokens_per_s": tokens / seconds, "step_s": seconds / args.steps, "peak_bytes": _peak_bytes(), "trainable": result.parameters["trainable"]}


def _baseline_inputs(args: argparse.Namespace, out: Path):
    """tnlora's prepared data and base model (same head init), peft's LoRA on it, and the
    micro-batches tnlora draws for these steps."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from tnlora_cli.data.examples import collate
    from tnlora_cli.model.build import load_inputs
    from tnlora_cli.model.loading import head_module_names, load_model
    from tnlora_cli.recipe.load import validate_recipe
    from tnlora_cli.training.batches import BatchStream

    recipe = validate_recipe(_recipe(args, ADAPTERS["lora"], out))
    inputs = load_inputs(recipe)
    set_seed(recipe.training.seed)
    model = load_model(inputs.model_path, recipe.task, dtype=recipe.model_dtype, label_names=inputs.data.label_names,
                       pad_token_id=inputs.tokenizer.pad_token_id, attn_implementation=recipe.model_attn_implementation)
    lora = ADAPTERS["lora"]
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora.get("dropout", 0.0),
                             target_modules=TASKS[args.task]["targets"], modules_to_save=head_module_names(model, recipe.task) or None)
    model = get_peft_model(model, peft_config)
    train_split, cfg = inputs.data.train, recipe.training
    stream = BatchStream(len(train_split), cfg.seed)
    take = train_split.take if hasattr(train_split, "take") else (lambda idx: [train_split[i] for i in idx])
    micro = [collate(take(stream.indices(i, cfg.batch_size, 1, 0)), inputs.tokenizer.pad_token_id)
             for i in range(cfg.max_steps * cfg.gradient_accumulation_steps)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return recipe, model.to(device), micro, device


def _tokens(micro: list, args: argparse.Namespace, accumulation: int) -> int:
    return sum(int(b["attention_mask"].sum()) for b in micro[args.warmup * accumulation :])


def run_bare(args: argparse.Namespace, out: Path) -> dict:
    import torch

    recipe, model, micro, device = _baseline_inputs(args, out)
    cfg = recipe.training
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)) * max(0.0, 1 - s / cfg.max_steps))
    acc, cuda = cfg.gradient_accumulation_steps, device.type == "cuda"
    model.train()
    clock, start = _clock(args), 0.0
    for step in range(cfg.max_steps):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            start = clock()
        for batch in micro[step * acc : (step + 1) * acc]:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            (loss / acc).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = clock() - start
    return {"tokens_per_s": _tokens(micro, args, acc) / seconds, "step_s": seconds / args.steps, "peak_bytes": _peak_bytes(), "trainable": sum(p.numel() for p in params)}


def run_trainer(args: argparse.Namespace, out: Path) -> dict:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    recipe, model, micro, device = _baseline_inputs(args, out)
    cfg, cuda = recipe.training, device.type == "cuda"
    marks: dict[int, float] = {}
    clock = _clock(args)

    class Clock(TrainerCallback):
        def on_step_end(self, _args, state, _control, **_kwargs):
            if state.global_step in (args.warmup, cfg.max_steps):
                if cuda:
                    torch.cuda.synchronize()
                marks[state.global_step] = clock()

    class InOrder(Trainer):
        def _get_train_sampler(self, *_a, **_k):
            return SequentialSampler(self.train_dataset)

    training_args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=1, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_steps=cfg.max_steps, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm, logging_steps=args.warmup, save_strategy="no",
        report_to=[], bf16=cuda, use_cpu=not cuda, dataloader_num_workers=0, seed=cfg.seed, remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = InOrder(model=model, args=training_args, train_dataset=micro, data_collator=lambda items: items[0], callbacks=[Clock()])
    trainer.train()
    seconds = marks[cfg.max_steps] - marks[args.warmup]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"tokens_per_s": _tokens(micro, args, cfg.gradient_accumulation_steps) / seconds, "step_s": seconds / args.steps,
            "peak_bytes": _peak_bytes(), "trainable": trainable}


def run_case(case: str, args: argparse.Namespace) -> dict:
    args.compile_case = case.endswith("+compile")
    with tempfile.TemporaryDirectory(prefix="tnlora-train-speed-") as tmp:
        out = Path(tmp) / "run"
        if case == "trainer":
            return run_trainer(args, out)
        if case == "bare":
            return run_bare(args, out)
        return run_tnlora(args, case.split(":", 1)[1].removesuffix("+compile"), out)


def _table(task: str, args: argparse.Namespace, results: dict[str, dict]) -> list[str]:
    spec = TASKS[task]
    lora, trainer, bare = results.get("tnlora:lora"), results.get("trainer"), results.get("bare")
    title = (f"{task}: batch {args.batch or spec['batch']} x {args.seq or spec['seq']} tokens (max), accumulation {spec['accumulation']}, "
             f"{args.steps} timed steps after {args.warmup}, device {results[next(iter(results))]['device']}, {args.clock} clock")
    lines = [title, "",
             "| trainer | trainable | tokens/s | x Trainer+peft | x bare loop | x tnlora lora | peak MiB | x Trainer+peft |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def ratio(r: dict, base: dict | None, key: str, invert: bool = False) -> str:
        if base is None:
            return "-"
        return f"{(base[key] / r[key]) if invert else (r[key] / base[key]):.2f}"

    for case, r in results.items():
        lines.append(f"| {case} | {r['trainable']:,} | {r['tokens_per_s']:.0f} | {ratio(r, trainer, 'tokens_per_s')} | {ratio(r, bare, 'tokens_per_s')} | "
                     f"{ratio(r, lora, 'tokens_per_s')} | {r['peak_bytes'] / 2**20:.0f} | {ratio(r, trainer, 'peak_bytes')} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="minilm,smollm2", help=f"comma-separated: {', '.join(TASKS)}")
    parser.add_argument("--adapters", default=",".join(ADAPTERS), help="tnlora adapters to train (lora is always included)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps (also tnlora's log window)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every case, interleaved; the best round counts")
    parser.add_argument("--batch", type=int, default=0, help="examples per micro-batch (0: the task's)")
    parser.add_argument("--seq", type=int, default=0, help="data.max_length (0: the task's)")
    parser.add_argument("--layers", type=int, default=2, help="llama-2-7b: decoder layers")
    parser.add_argument("--compile", action="store_true", help="also tnlora's lora with training.compile: true")
    parser.add_argument("--cases", help="exactly these cases, e.g. tnlora:lora,tnlora:lora+compile (trainer, bare, tnlora:<adapter>[+compile])")
    parser.add_argument("--quick", action="store_true", help="a few minutes on a small CPU: 6 timed steps after 3, lora, trac and tensorguide")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: time by process CPU time (CPU runs; robust to a busy machine)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = min(args.steps, 6), min(args.warmup, 3)
        if args.adapters == parser.get_default("adapters"):
            args.adapters = "lora,trac,tensorguide"
    if args.case:
        import torch

        result = run_case(args.case, args)
        result["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        print(json.dumps(result))
        return

    adapters = ["lora"] + [a for a in args.adapters.split(",") if a and a != "lora"]
    cases = ["trainer", "bare"] + [f"tnlora:{a}" for a in adapters] + (["tnlora:lora+compile"] if args.compile else [])
    if args.cases:
        cases = args.cases.split(",")
    report, everything = [], {}
    for task in args.tasks.split(","):
        extra: list[str] = []
        tmp = None
        if TASKS[task]["model"] is None:
            tmp = tempfile.TemporaryDirectory(prefix="tnlora-llama-shapes-")
            model_dir, data_file = _llama_shapes_model(args.layers, args.seq or TASKS[task]["seq"], Path(tmp.name))
            extra = ["--model-dir", model_dir, "--data-file", data_file]
        results: dict[str, dict] = {}
        for round_ in range(args.rounds):
            for case in cases:  # interleaved: a burst of load hits every trainer alike
                cmd = [sys.executable, __file__, "--case", case, "--task", task, *extra, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq), "--layers", str(args.layers),
                       "--clock", args.clock]
                started = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, check=False)
                if proc.returncode != 0:
                    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    print(f"{task} {case}: failed ({tail})", file=sys.stderr)
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{task} round {round_ + 1} {case}: {r['tokens_per_s']:.0f} tokens/s, {time.perf_counter() - started:.0f} s in all", file=sys.stderr)
                if case not in results or r["tokens_per_s"] > results[case]["tokens_per_s"]:
                    results[case] = r
        if tmp is not None:
            tmp.cleanup()
        if results:
            report += _table(task, args, results) + [""]
            everything[task] = results
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    report.append(f"load average at the end: {' '.join(load)}; cores: {os.cpu_count()}")
    text = "\n".join(report)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": everything}, indent=2))
    if not everything or any(not math.isfinite(r["tokens_per_s"]) for res in everything.values() for r in res.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Speed of `tnlora generate`, `chat` and `eval --generate` against plain transformers.

    python benchmarks/generate.py [--adapters lora,vera,...] [--commands generate,prompt,compare,chat,eval]
                                  [--prompts 4] [--max-new-tokens 16] [--batch-size 4] [--repeats 2]

For each adapter: a run on the embedded SmolLM2-135M (q_proj/v_proj, random non-zero adapter
weights, so the update is not zero), `tnlora merge`d to a directory once. Two measurements:

- **Decoding** (in one process, loading not timed, one warm-up each, then `--repeats` runs of
  each side, alternating which goes first): `load_generator(run)` +
  `Generator.generate` (linear adapters merged in memory, a nonlinear one on the adapter path)
  against `AutoModelForCausalLM.from_pretrained(merged)` + `generate` on the same chat-formatted
  prompts, greedy, the same length-sorted left-padded batches. Tokens/s of each, the ratio
  (target >= 0.95), and whether the texts agree. `tensorguide-tanh` cannot be merged: it is
  timed against the base model, which shows the cost of the adapter path (target: <= 1.1x).
- **End to end** (each command a fresh process, wall time from start to exit: Python, imports,
  loading, the merge and its check, held-out losses, generation, writing): every command in
  `--commands` against what a user would write with transformers alone
  (`python benchmarks/generate.py plain ...`, which imports no tnlora) on the merged directory
  (the base model for `tensorguide-tanh`):
    generate  `tnlora generate RUN --input P.jsonl --output O.jsonl`  vs  batched generate, JSONL out
    prompt    `tnlora generate RUN --prompt TEXT` (streams)           vs  one streamed generate
    compare   `tnlora generate RUN --input P.jsonl --compare`         vs  base model, then merged model
    chat      `printf 'turn\n...' | tnlora chat RUN`                   vs  the same conversation, streamed
    eval      `tnlora eval RUN --generate`                            vs  held-out loss and replies of base
                                                                          and merged (held-out rows given
                                                                          tokenized, as tnlora's data cache has them)
  Runs alternate tnlora-plain, plain-tnlora (`--repeats`), so a load that drifts hits both
  sides alike; the mean of each side is shown, with the ratio tnlora / plain (target <= 1.1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ADAPTERS = {
    "lora": {"r": 8, "alpha": 16},
    "vera": {"r": 256, "d_initial": 0.1},
    "loretta": {"r": 8, "alpha": 16, "tt_rank": 5},
    "tensorguide": {"hidden": 8, "ranks": 4},
    "tensorguide-tanh": {"hidden": 8, "ranks": 4, "activation": "tanh"},
    "trac": {"r": 8, "alpha": 16},
    "tera": {"outdim": 8},
}
PROMPTS = [
    "What is your favourite book?", "Do you like music?", "Tell me a joke.", "What is the capital of France?",
    "How are you today?", "What do you know about computers?", "Can you help me with my homework?", "Who are you?",
    "What is the meaning of life?", "Do you like sports?", "What is a computer?", "Where do you live?",
]


def build_run(workdir: Path, name: str) -> Path:
    from tnlora_cli.model.build import adapter_metadata, prepare
    from tnlora_cli.model.state import adapter_state_dict
    from tnlora_cli.recipe.load import validate_recipe
    from tnlora_cli.run.checkpoint import save_adapter

    run = workdir / name
    if (run / "adapter").is_dir():
        return run
    adapter = {"type": name.split("-")[0], "target_modules": ["q_proj", "v_proj"], **ADAPTERS[name]}
    raw = {
        "model": "smollm2-135m", "task": "instruction", "output_dir": str(run), "adapter": adapter,
        "data": {"train": "chatterbot", "max_length": 64, "max_eval_samples": 4},
    }
    prepared = prepare(validate_recipe(raw))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in prepared.model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(raw))
    save_adapter(run / "adapter", adapter_state_dict(prepared.model, []), adapter_metadata(prepared))
    return run


def plain_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> tuple[list[list[int]], float]:
    """Greedy, left-padded, length-sorted batches through transformers alone."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    eos = tokenizer.eos_token_id
    start = time.perf_counter()
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = tokenizer.pad({"input_ids": [prompts[i] for i in idx]}, padding_side="left", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        width = batch["input_ids"].shape[1]
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            outputs[i] = new[: new.index(eos)] if eos in new else new
    return outputs, time.perf_counter() - start


def _format(tokenizer, prompt: str | list[dict]) -> list[int]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _load_plain(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return tokenizer, AutoModelForCausalLM.from_pretrained(path).to(device).eval()


def plain_main(argv: list[str]) -> None:
    """The plain-transformers side of the end-to-end comparison: what a user writes without tnlora."""
    parser = argparse.ArgumentParser(prog="generate.py plain")
    parser.add_argument("command", choices=["generate", "prompt", "chat", "eval"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--base", help="generate: also the base model, first (as --compare); eval: the base model")
    parser.add_argument("--input")
    parser.add_argument("--output")
    parser.add_argument("--prompt")
    parser.add_argument("--heldout")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    from transformers import TextStreamer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer, model = _load_plain(args.model)
    greedy = {"max_new_tokens": args.max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    if args.command in ("prompt", "chat"):
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        turns = [args.prompt] if args.command == "prompt" else [line.rstrip("\n") for line in sys.stdin if line.strip()]
        messages: list[dict] = []
        for turn in turns:
            messages.append({"role": "user", "content": turn})
            ids = torch.tensor([_format(tokenizer, messages)], device=model.device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **greedy)
            new = out[0, ids.shape[1] :].tolist()
            eos = tokenizer.eos_token_id
            messages.append({"role": "assistant", "content": tokenizer.decode(new[: new.index(eos)] if eos in new else new, skip_special_tokens=True).strip()})
        return
    if args.command == "generate":
        rows = [json.loads(line) for line in Path(args.input).read_text().splitlines() if line.strip()]
        prompts = [_format(tokenizer, r["prompt"]) for r in rows]
        columns = {}
        if args.base:
            base_tokenizer, base = _load_plain(args.base)
            columns["base_completion"] = plain_generate(base, base_tokenizer, prompts, args.max_new_tokens, args.batch_size)[0]
            del base
        columns["completion"] = plain_generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)[0]
        records = [{"prompt": r["prompt"], **{k: tokenizer.decode(v[i], skip_special_tokens=True).strip() for k, v in columns.items()}} for i, r in enumerate(rows)]
        Path(args.output).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        return
    # eval: token-weighted held-out loss and greedy replies, base model then merged model
    import torch.nn.functional as F

    heldout = [json.loads(line) for line in Path(args.heldout).read_text().splitlines()]
    report = {}
    for name, (tok, net) in (("base", _load_plain(args.base)), ("tuned", (tokenizer, model))):
        loss_sum, count = 0.0, 0
        for s in range(0, len(heldout), args.batch_size):
            rows = heldout[s : s + args.batch_size]
            width = max(len(r["input_ids"]) for r in rows)
            ids = torch.tensor([r["input_ids"] + [tok.pad_token_id] * (width - len(r["input_ids"])) for r in rows], device=net.device)
            labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows], device=net.device)
            mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows], device=net.device)
            with torch.no_grad():
                logits = net(input_ids=ids, attention_mask=mask).logits.float()
            loss_sum += F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum").item()
            count += int((labels[:, 1:] != -100).sum())
        replies = plain_generate(net, tok, [r["prompt_ids"] for r in heldout], args.max_new_tokens, args.batch_size)[0]
        report[name] = {"loss": loss_sum / max(count, 1), "replies": [tok.decode(r, skip_special_tokens=True).strip() for r in replies]}
    Path(args.output).write_text(json.dumps(report))


def _timed(argv: list[str], stdin: str | None = None) -> float:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TNLORA_PROGRESS": "plain", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(argv, input=stdin, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def end_to_end(run: Path, reference: Path, base: Path, command: str, workdir: Path, args) -> tuple[float, float]:
    """Mean wall seconds of the tnlora command and of its plain equivalent, runs interleaved."""
    prompts = (PROMPTS * 4)[: args.prompts]
    file = workdir / "prompts.jsonl"
    file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    sizes = ["--max-new-tokens", str(args.max_new_tokens)]
    batch = ["--batch-size", str(args.batch_size)]
    tnlora = [sys.executable, "-m", "tnlora_cli"]
    plain = [sys.executable, str(Path(__file__).resolve()), "plain"]
    stdin = None
    if command in ("generate", "compare"):
        extra = ["--compare"] if command == "compare" else []
        ours = [*tnlora, "generate", str(run), "--input", str(file), "--output", str(workdir / "tnlora.jsonl"), "--force", *sizes, *batch, *extra]
        theirs = [*plain, "generate", "--model", str(reference), "--input", str(file), "--output", str(workdir / "plain.jsonl"), *sizes, *batch]
        theirs += ["--base", str(base)] if command == "compare" else []
    elif command == "prompt":
        ours = [*tnlora, "generate", str(run), "--prompt", prompts[0], *sizes]
        theirs = [*plain, "prompt", "--model", str(reference), "--prompt", prompts[0], *sizes]
    elif command == "chat":
        stdin = "".join(p + "\n" for p in prompts)
        ours = [*tnlora, "chat", str(run), *sizes]
        theirs = [*plain, "chat", "--model", str(reference), *sizes]
    else:
        from tnlora_cli.evaluation.text import split_prompt_reference
        from tnlora_cli.generation.generator import inspect_source
        from tnlora_cli.model.build import load_inputs

        held = workdir / f"{run.name}-heldout.jsonl"
        if not held.is_file():
            examples = load_inputs(inspect_source(run).recipe).data.eval
            held.write_text("".join(json.dumps({"input_ids": e["input_ids"], "labels": e["labels"], "prompt_ids": split_prompt_reference(e)[0]}) + "\n"
                                    for e in examples))
        ours = [*tnlora, "eval", str(run), "--generate", *sizes, *batch, "--json"]
        theirs = [*plain, "eval", "--model", str(reference), "--base", str(base), "--heldout", str(held), "--output", str(workdir / "plain-eval.json"), *sizes, *batch]
    times: dict[str, list[float]] = {"tnlora": [], "plain": []}
    for repeat in range(args.repeats):
        order = [("tnlora", ours), ("plain", theirs)]
        for side, argv in order if repeat % 2 == 0 else order[::-1]:
            if side == "tnlora" and command == "eval":
                (run / "eval.json").unlink(missing_ok=True)  # losses computed, as the plain side does
            times[side].append(_timed(argv, stdin))
    if command == "generate" and reference != base:  # a merged adapter: the same greedy text
        same = [json.loads(line)["completion"] for line in (workdir / "tnlora.jsonl").read_text().splitlines()]
        assert same == [json.loads(line)["completion"] for line in (workdir / "plain.jsonl").read_text().splitlines()], f"{run.name}: texts differ"
    return sum(times["tnlora"]) / len(times["tnlora"]), sum(times["plain"]) / len(times["plain"])


def main() -> None:
    if sys.argv[1:2] == ["plain"]:
        plain_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/tnlora-generate-bench")
    parser.add_argument("--adapters", default=",".join(ADAPTERS))
    parser.add_argument("--commands", default="generate,prompt,compare,chat,eval", help="end-to-end commands ('' for none)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="end-to-end runs per side, alternating which side goes first")
    parser.add_argument("--skip-decoding", action="store_true")
    args = parser.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM

    from tnlora_cli.generation.generator import SamplingSettings, load_generator
    from tnlora_cli.merge import merge_run
    from tnlora_cli.model.embedded import smollm2_path

    transformers.logging.set_verbosity_error()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = smollm2_path()
    commands = [c for c in args.commands.split(",") if c]
    print(f"device {device}, {args.prompts} prompts, {args.max_new_tokens} new tokens, batch {args.batch_size}, greedy")
    print(f"load at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1, 5, 15 min), {os.cpu_count()} CPUs")
    decoding, e2e = [], []
    for name in args.adapters.split(","):
        run = build_run(workdir, name)
        gen = load_generator(run)
        mode = gen.mode
        merged = workdir / f"{name}-merged"
        reference = merged if mode == "merged in memory" else base  # no merged directory: the base model's speed
        if mode == "merged in memory" and not merged.is_dir():
            merge_run(run, merged, verify=False)
        if not args.skip_decoding:
            prompts = [gen.encode(gen.format([{"role": "user", "content": p}])) for p in (PROMPTS * 4)[: args.prompts]]
            tokenizer = gen.tokenizer
            model = AutoModelForCausalLM.from_pretrained(reference).to(device).eval()
            gen.generate(prompts[:1], settings)  # warm-up (and the merge, for linear adapters)
            plain_generate(model, tokenizer, prompts[:1], args.max_new_tokens, args.batch_size)  # warm-up
            tnlora_s = plain_s = 0.0
            for repeat in range(args.repeats):  # alternating which goes first, as end to end
                for side in ("tnlora", "plain") if repeat % 2 == 0 else ("plain", "tnlora"):
                    start = time.perf_counter()
                    if side == "tnlora":
                        texts = gen.generate(prompts, settings)
                        tnlora_s += time.perf_counter() - start
                    else:
                        outputs, seconds = plain_generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
                        plain_s += seconds
            del gen
            tokens = sum(len(o) for o in outputs) * args.repeats
            same = "- (vs base)" if reference == base else all(t == tokenizer.decode(o, skip_special_tokens=True).strip() for t, o in zip(texts, outputs))
            decoding.append(f"| {name} | {mode} | {tokens} | {tokens / tnlora_s:.1f} | {tokens / plain_s:.1f}{' (base)' if reference == base else ''} "
                            f"| {plain_s / tnlora_s:.2f} | {same} |")
            print(decoding[-1], flush=True)
            del model
        else:
            del gen
        for command in commands:
            ours, theirs = end_to_end(run, reference, base, command, workdir, args)
            e2e.append(f"| {name} | {command} | {ours:.1f} | {theirs:.1f}{' (base)' if reference == base else ''} | {ours / theirs:.2f} |")
            print(e2e[-1], flush=True)
    if decoding:
        print(f"\ndecoding (in one process, loading not timed, {args.repeats} interleaved runs per side)\n")
        print("| adapter | tnlora path | tokens | tnlora tok/s | plain tok/s | ratio | same text |\n|---|---|---:|---:|---:|---:|---|")
        print("\n".join(decoding))
    if e2e:
        print(f"\nend to end (each command a fresh process, mean of {args.repeats} interleaved runs per side)\n")
        print("| adapter | command | tnlora s | plain s | × plain |\n|---|---|---:|---:|---:|")
        print("\n".join(e2e))
    print(f"\nload at end: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1, 5, 15 min)")


if __name__ == "__main__":
    main()

"""Decoding speed of `tnlora generate` against the merged directory through plain transformers.

    python benchmarks/generate.py [--adapters lora,vera,...] [--prompts 8] [--max-new-tokens 32] [--batch-size 8]

For each adapter: a run on the embedded SmolLM2-135M (q_proj/v_proj, random non-zero adapter
weights, so the update is not zero), `tnlora merge`d to a directory; then, with the same
chat-formatted prompts, greedy decoding and the same batching:
- tnlora: `load_generator(run)` + `Generator.generate` (linear adapters merged in memory,
  a nonlinear one runs the adapter path);
- plain: `AutoModelForCausalLM.from_pretrained(merged)` + `generate` on left-padded batches.
Loading is not timed; each side is warmed up once. Prints tokens/s of each and the ratio
tnlora / plain (target >= 0.95 for every linear adapter), and whether the texts agree.
`tensorguide-tanh` (activation tanh) cannot be merged: it is timed against the base model
alone, which shows the cost of the adapter path.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/tnlora-generate-bench")
    parser.add_argument("--adapters", default=",".join(ADAPTERS))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
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
    print(f"device {device}, {args.prompts} prompts, {args.max_new_tokens} new tokens, batch {args.batch_size}, greedy")
    print(f"{'adapter':18s} {'tnlora path':34s} {'tokens':>6s} {'tnlora tok/s':>12s} {'plain tok/s':>12s} {'ratio':>6s}  same text")
    for name in args.adapters.split(","):
        run = build_run(workdir, name)
        gen = load_generator(run)
        prompts = [gen.encode(gen.format([{"role": "user", "content": p}])) for p in (PROMPTS * 4)[: args.prompts]]
        gen.generate(prompts[:1], settings)  # warm-up (and the merge, for linear adapters)
        start = time.perf_counter()
        texts = gen.generate(prompts, settings)
        tnlora_s = time.perf_counter() - start
        mode = gen.mode
        tokenizer = gen.tokenizer
        del gen
        if mode == "merged in memory":
            reference = workdir / f"{name}-merged"
            if not reference.is_dir():
                merge_run(run, reference, verify=False)
        else:
            reference = smollm2_path()  # no merged directory exists: the base model's speed
        model = AutoModelForCausalLM.from_pretrained(reference).to(device).eval()
        plain_generate(model, tokenizer, prompts[:1], args.max_new_tokens, args.batch_size)  # warm-up
        outputs, plain_s = plain_generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
        tokens = sum(len(o) for o in outputs)
        same = "- (vs base)" if mode != "merged in memory" else all(t == tokenizer.decode(o, skip_special_tokens=True).strip() for t, o in zip(texts, outputs))
        print(f"{name:18s} {mode:34s} {tokens:6d} {tokens / tnlora_s:12.1f} {tokens / plain_s:12.1f} {plain_s / tnlora_s:6.2f}  {same}")
        del model


if __name__ == "__main__":
    main()

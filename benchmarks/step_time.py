"""Training-step time and peak memory of every adapter, as ratios to LoRA, in one run.

    python benchmarks/step_time.py                       # MiniLM config, CPU, batch 16 x 128
    python benchmarks/step_time.py --model llama-2-7b --layers 2 --batch 4 --seq 512   # a GPU
    python benchmarks/step_time.py --before /tmp/old      # each case also with the tnlora_cli in /tmp/old
    pip install 'tnlora[bench]'                           # adds peft's LoRA as a second baseline
                                                          # and peft-<type>: tnlora's adapters through peft

`--dora-pairs` times each adapter (`--cases`, default peft's LoRA and the six) against itself with
`use_dora: true` in one process, their steps alternating, and prints the ratio (with `--before`,
also with the earlier package): the measure for what DoRA adds, finer than two processes apart.

`--before DIR` times every case a second time with the `tnlora_cli` package found in DIR (e.g.
`git archive REV tnlora_cli | tar -x -C DIR`), interleaved with the current one, and adds the
ratio now / before: how a change to the forward paths moved each adapter's whole step.

Each case runs in its own process (a fresh model from the config, random weights, the
adapter on the attention query/value layers) for `--steps` timed optimizer steps after
`--warmup`; the parent prints a table with the ratios to tnlora's LoRA and to peft's LoRA.
Peak memory is `torch.cuda.max_memory_allocated` on a GPU and the process's peak RSS on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ADAPTERS = {
    "lora": {"type": "lora", "r": 8, "alpha": 16},
    "vera": {"type": "vera", "r": 256},
    "loretta": {"type": "loretta", "r": 8, "alpha": 16, "tt_rank": 5},
    "trac": {"type": "trac", "r": 8, "alpha": 16, "activation": "softmax"},
    "tera": {"type": "tera", "outdim": 8},
    "tensorguide": {"type": "tensorguide", "hidden": 8, "ranks": 4},
}
#: Variants timed by step_time only: TeRA_iden (identity factors) and LoRA on the q and v
#: slices of GPT-2's fused c_attn (a GPT-2 model of the same depth, whatever --model says).
VARIANTS = {
    "tera-iden": {"type": "tera", "outdim": 8, "variant": "iden"},
    "lora-fused": {"type": "lora", "r": 8, "alpha": 16},
}
CASE_MODEL = {"lora-fused": ("gpt2", ["c_attn.q", "c_attn.v"])}
#: tnlora's tensor-network adapters through peft (`import tnlora_cli.peft`): the same modules.
PEFT_TN = ["trac", "tera", "loretta", "tensorguide"]
#: `<case>-dora`: the same adapter with `use_dora: true` (peft-lora-dora: peft's `LoraConfig(use_dora=True)`).
DORA = ["peft-lora-dora", *(f"{kind}-dora" for kind in ADAPTERS)]
CASES = ["peft-lora", *ADAPTERS, *VARIANTS, *(f"peft-{kind}" for kind in PEFT_TN), *DORA]


def _targets(model) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return ["q_proj", "v_proj"] if "q_proj" in names else ["query", "value"]


def build_case(case: str, args: argparse.Namespace):
    """A fresh model with the case's adapter: (one optimizer step as a function, trainable
    parameters, device)."""
    import torch
    from transformers import AutoModel

    from tnlora_cli.adapters import REGISTRY
    from tnlora_cli.model.inject import inject_adapter
    from tnlora_cli.model.meta import load_config

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.manual_seed(0)
    model_name, fixed_targets = CASE_MODEL.get(case, (args.model, None))
    config = load_config(model_name)
    if args.layers:
        for key in ("num_hidden_layers", "n_layer"):
            if hasattr(config, key):
                setattr(config, key, args.layers)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModel.from_config(config).to(device=device, dtype=dtype)
    targets = fixed_targets or _targets(model)
    dora = case.endswith("-dora")
    case = case.removesuffix("-dora")
    if case == "peft-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=dora))
    elif case.startswith("peft-"):
        from peft import get_peft_model

        from tnlora_cli.integrations.peft import CONFIG_CLASSES

        kind = case.removeprefix("peft-")
        settings = {k: v for k, v in ADAPTERS[kind].items() if k != "type"}
        model = get_peft_model(model, CONFIG_CLASSES[kind](target_modules=targets, **settings))
    else:
        settings = {**ADAPTERS, **VARIANTS}[case]
        cfg = REGISTRY[settings["type"]].config_class(target_modules=targets, **settings, use_dora=dora)
        inject_adapter(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out = model(input_ids=ids).last_hidden_state
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, params, device


def _clock(args: argparse.Namespace, device):
    # cpu: this process's CPU time, which other processes' load barely moves (with one thread,
    # OMP_NUM_THREADS=1, it is the step's own compute); wall: elapsed time (always on a GPU).
    return time.process_time if args.clock == "cpu" and device.type == "cpu" else time.perf_counter


def _timed(step, device, clock) -> float:
    import torch

    start = clock()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def run_case(case: str, args: argparse.Namespace) -> dict:
    import torch

    step, params, device = build_case(case, args)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock = _clock(args, device)
    times = [_timed(step, device, clock) for _ in range(args.steps)]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": case, "device": str(device), "step_s": statistics.median(times), "peak_bytes": peak, "trainable": sum(p.numel() for p in params)}


def run_pair(case: str, args: argparse.Namespace) -> dict:
    """`case` and `case-dora` in one process, their steps alternating: a burst of load from
    elsewhere, or the machine's clock and caches drifting, hits both alike."""
    plain, _, device = build_case(case, args)
    dora, _, _ = build_case(f"{case}-dora", args)
    for _ in range(args.warmup):
        plain(), dora()
    clock = _clock(args, device)
    times: dict[str, list[float]] = {"plain": [], "dora": []}
    for _ in range(args.steps):
        times["plain"].append(_timed(plain, device, clock))
        times["dora"].append(_timed(dora, device, clock))
    return {"case": case, "device": str(device), **{f"{k}_s": statistics.median(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="minilm, a shipped config (llama-2-7b, roberta-base, ...) or a directory")
    parser.add_argument("--layers", type=int, default=0, help="truncate to this many layers (0: all)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: time steps by process CPU time (CPU runs; robust to a busy machine)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--pair", help=argparse.SUPPRESS)
    parser.add_argument("--dora-pairs", action="store_true", help="each adapter against itself with DoRA, in one process, steps alternating")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--before", help="a directory holding an earlier tnlora_cli: time every case with it too")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every case, interleaved; the fastest round counts")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return
    if args.pair:
        print(json.dumps(run_pair(args.pair, args)))
        return

    results: dict[str, dict] = {}
    before: dict[str, dict] = {}
    own = ["--model", args.model, "--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--clock", args.clock] + (["--cpu"] if args.cpu else [])
    if args.dora_pairs:
        dora_pairs(args, own)
        return
    for _ in range(args.rounds):
        for case in args.cases.split(","):
            # now and before back to back: a burst of load from elsewhere hits both alike
            for store, src in ((results, None), (before, args.before)):
                if src is None and store is before:
                    continue
                if store is before and case.startswith("peft-lora"):
                    continue  # peft does not change with tnlora
                env = dict(os.environ)
                if src is not None:
                    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
                proc = subprocess.run([sys.executable, __file__, "--case", case, *own], capture_output=True, text=True, env=env, check=False)
                if proc.returncode != 0:
                    reason = "peft not installed" if "No module named 'peft'" in proc.stderr else (proc.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"{case}{' (before)' if src else ''}: skipped ({reason})", file=sys.stderr)
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{case}{' (before)' if src else ''}: {1e3 * r['step_s']:.1f} ms", file=sys.stderr, flush=True)
                if case not in store or r["step_s"] < store[case]["step_s"]:
                    store[case] = r
    if "lora" not in results:
        sys.exit("the lora baseline did not run")
    base, peft = results["lora"], results.get("peft-lora")
    device = base["device"]
    print(f"model {args.model} (layers {args.layers or 'all'}), batch {args.batch} x {args.seq}, device {device}, median of {args.steps} steps, "
          f"{'process CPU' if args.clock == 'cpu' and device == 'cpu' else 'wall'} time")
    # DoRA rows: "x same" is the ratio to the same adapter without DoRA (peft-lora-dora: to peft-lora).
    header = (
        f"{'adapter':<18} {'trainable':>10} {'step ms':>9} {'x lora':>7} {'x peft':>7} {'x same':>7} {'peak MB':>9} {'x lora':>7} {'x peft':>7}"
    )
    if before:
        header += f" {'before ms':>10} {'now/before':>10}"
    print(header)
    print("-" * len(header))
    for case, r in results.items():
        t_peft = f"{r['step_s'] / peft['step_s']:.2f}" if peft else "-"
        m_peft = f"{r['peak_bytes'] / peft['peak_bytes']:.2f}" if peft else "-"
        same = results.get(case.removesuffix("-dora")) if case.endswith("-dora") else None
        t_same = f"{r['step_s'] / same['step_s']:.2f}" if same else "-"
        print(
            f"{case:<18} {r['trainable']:>10,} {1e3 * r['step_s']:>9.1f} {r['step_s'] / base['step_s']:>7.2f} {t_peft:>7} {t_same:>7} "
            f"{r['peak_bytes'] / 2**20:>9.0f} {r['peak_bytes'] / base['peak_bytes']:>7.2f} {m_peft:>7}"
            + (f" {1e3 * before[case]['step_s']:>10.1f} {r['step_s'] / before[case]['step_s']:>10.2f}" if case in before else "")
        )
    if os.path.exists("/proc/loadavg"):
        with open("/proc/loadavg") as f:
            print(f"load average at the end: {' '.join(f.read().split()[:3])}; cores: {os.cpu_count()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


def _subprocess(flag: str, case: str, own: list[str], src: str | None) -> dict | None:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, flag, case, *own], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        reason = "peft not installed" if "No module named 'peft'" in proc.stderr else (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"{case}{' (before)' if src else ''}: skipped ({reason})", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dora_pairs(args: argparse.Namespace, own: list[str]) -> None:
    """The `--dora-pairs` table: per adapter, plain and DoRA steps alternating in one process;
    over `--rounds`, the median ratio counts (each round's is printed as it comes)."""
    given = [c for c in args.cases.split(",") if not c.endswith("-dora")] if args.cases != ",".join(CASES) else ["peft-lora", *ADAPTERS]
    rows: dict[str, dict[str, list[dict]]] = {case: {"now": [], "before": []} for case in given}
    for _ in range(args.rounds):
        for case in given:
            for label, src in (("now", None), ("before", args.before)):
                if label == "before" and (src is None or case.startswith("peft-")):
                    continue
                r = _subprocess("--pair", case, own, src)
                if r is not None:
                    rows[case][label].append(r)
                    print(f"{case} ({label}): {1e3 * r['plain_s']:.1f} / {1e3 * r['dora_s']:.1f} ms, x{r['dora_s'] / r['plain_s']:.3f}", file=sys.stderr, flush=True)
    device = next((runs["now"][0]["device"] for runs in rows.values() if runs["now"]), "?")
    print(f"model {args.model} (layers {args.layers or 'all'}), batch {args.batch} x {args.seq}, device {device}, median of {args.steps} "
          f"alternating steps per round, {args.rounds} round(s), {'process CPU' if args.clock == 'cpu' and device == 'cpu' else 'wall'} time")
    header = f"{'adapter':<14} {'plain ms':>9} {'DoRA ms':>9} {'x same':>7}" + (f" {'before x same':>14}" if args.before else "")
    print(header)
    print("-" * len(header))

    def ratio(runs: list[dict]) -> float:
        return statistics.median(r["dora_s"] / r["plain_s"] for r in runs)

    for case, runs in rows.items():
        if not runs["now"]:
            continue
        plain = statistics.median(r["plain_s"] for r in runs["now"])
        dora = statistics.median(r["dora_s"] for r in runs["now"])
        line = f"{case:<14} {1e3 * plain:>9.1f} {1e3 * dora:>9.1f} {ratio(runs['now']):>7.2f}"
        if args.before:
            line += f" {ratio(runs['before']):>14.2f}" if runs["before"] else f" {'-':>14}"
        print(line)
    if os.path.exists("/proc/loadavg"):
        with open("/proc/loadavg") as f:
            print(f"load average at the end: {' '.join(f.read().split()[:3])}; cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()

"""Write arithmetic word problems as chat rows ({"messages": [...]}, JSON lines; train and eval files).

    python benchmarks/make_arithmetic_data.py benchmarks/quality/data [--train 3000] [--eval 200] [--seed 0]

The CPU-sized stand-in for GSM8K in `benchmarks/quality.py`: one- and two-step problems
with whole-number answers (sums, differences, products, shares), named people and objects
drawn from fixed lists. A short system turn asks for the number alone (shorter than the
model's default system prompt, and fair to the base model), and the reply is the number, so
`tnlora eval --generate` scores it by exact match. Deterministic in --seed; no eval problem appears in the train file.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from pathlib import Path

from tnlora_cli.run.atomic import write_jsonl

NAMES = "Ana Ben Carla Dev Elif Femi Gus Hana Ivan Jade Kofi Lena Milo Nora Omar Pia Raj Sara Tom Uma Vera Wes Yara Zoe".split()
SYSTEM = "Reply with the answer as a number only."
THINGS = "apples marbles stickers books pencils coins shells cards stamps cookies beads eggs".split()


def _add(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b


def _subtract(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a = rng.randint(10, 90)
    b = rng.randint(1, a - 1)
    return f"{name} had {a} {thing} and gave away {b}. How many {thing} are left?", a - b


def _multiply(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    return f"{name} buys {a} bags with {b} {thing} in each bag. How many {thing} does {name} buy?", a * b


def _share(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    per, people = rng.randint(2, 12), rng.randint(2, 8)
    return f"{name} shares {per * people} {thing} equally among {people} friends. How many {thing} does each friend get?", per


def _two_step(rng: random.Random) -> tuple[str, int]:
    name, other, thing = *rng.sample(NAMES, 2), rng.choice(THINGS)
    a, b = rng.randint(5, 40), rng.randint(2, 30)
    c = rng.randint(1, a + b - 1)
    return (f"{name} has {a} {thing}. {other} gives {name} {b} more, then {name} uses {c}. "
            f"How many {thing} does {name} have now?", a + b - c)


KINDS: tuple[Callable[[random.Random], tuple[str, int]], ...] = (_add, _subtract, _multiply, _share, _two_step)


def problems(n: int, rng: random.Random, exclude: set[str]) -> list[dict]:
    rows: list[dict] = []
    while len(rows) < n:
        prompt, answer = rng.choice(KINDS)(rng)
        if prompt in exclude:
            continue
        exclude.add(prompt)
        rows.append({"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": str(answer)},
        ]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seen: set[str] = set()
    held_out = problems(args.eval, rng, seen)  # drawn first: the train file never repeats one
    train = problems(args.train, rng, seen)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "arithmetic_train.jsonl", train)
    write_jsonl(args.out_dir / "arithmetic_eval.jsonl", held_out)
    print(f"wrote {len(train)} train and {len(held_out)} eval problems to {args.out_dir}")


if __name__ == "__main__":
    main()

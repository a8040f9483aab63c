"""Write a synthetic instruction file: N rows of {"prompt", "response"} in JSON lines.

    python benchmarks/make_instruction_data.py OUT.jsonl [--rows 100000] [--seed 0]

Words are drawn from a fixed English list, prompts of 20-60 words and responses of 40-160,
so 100,000 rows come to about 15 M SmolLM2 tokens once chat-templated (the size the data
benchmark is specified at). Deterministic in --seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = (
    "the of and to in is was for on that with as by at from it be this are an or which his have not had but one all "
    "their were they her she there been when who will more no if out so said what up its about into than them can only "
    "other new some time could these two may then first any like now my such make over our even most after also made many "
    "before must through back years where much your way well down should because each just those people how too little state "
    "good very world still own see men work long here get both between life being under never day same another know while last "
    "might great old year off come since against go came right used take three model data train learn network tensor adapter"
).split()


def row(rng: random.Random) -> dict[str, str]:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))).capitalize() + "?"
    response = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 160))).capitalize() + "."
    return {"prompt": prompt, "response": response}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    with tmp.open("w") as f:
        for _ in range(args.rows):
            f.write(json.dumps(row(rng)) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.rows:,} rows to {args.out}")


if __name__ == "__main__":
    main()

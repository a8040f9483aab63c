"""Write the quickstart's chatterbot topics as a generation task: chat rows, train and eval files.

    python benchmarks/make_topic_data.py benchmarks/quality/data [--eval-fraction 0.2] [--seed 0]

The same 10 topics as `recipes/quickstart.yaml`, asked of a chat model: the system turn lists
the topics, the user turn holds the exchange (prompt and reply), and the assistant names the
topic in one word, so `tnlora eval --generate` scores it by exact match. The split is a
deterministic shuffle in --seed; rows come from the embedded chatterbot corpus.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from tnlora_cli.run.atomic import write_jsonl

LABELS = ["trivia", "coding", "ai", "psychology", "emotion", "literature", "humor", "money", "science", "greetings"]
SYSTEM = "Name the topic of this exchange with one word from: " + ", ".join(LABELS) + "."


def chat_row(row: dict[str, str]) -> dict:
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Prompt: {row['prompt']}\nReply: {row['response']}"},
        {"role": "assistant", "content": row["category"]},
    ]}


def main() -> None:
    from tnlora_cli.data.embedded import chatterbot_rows

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--eval-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [r for r in chatterbot_rows() if r["category"] in LABELS]
    random.Random(args.seed).shuffle(rows)
    n_eval = round(len(rows) * args.eval_fraction)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "topics_train.jsonl", [chat_row(r) for r in rows[n_eval:]])
    write_jsonl(args.out_dir / "topics_eval.jsonl", [chat_row(r) for r in rows[:n_eval]])
    print(f"wrote {len(rows) - n_eval} train and {n_eval} eval exchanges to {args.out_dir}")


if __name__ == "__main__":
    main()

"""Preparation at scale: the same prepared data whatever `data.num_proc`, progress through the
reporter on every long phase, and memory-mapped pages given back while reading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import make_tokenizer

from tnlora_cli.data.mapped import release_mapped_pages
from tnlora_cli.data.prepare import prepare_data
from tnlora_cli.data.workers import worker_count
from tnlora_cli.errors import DataError
from tnlora_cli.recipe.sections import DataConfig
from tnlora_cli.report.reporter import Reporter

WORDS = ["what", "is", "the", "cat", "dog", "good", "why", "sat"]


def _rows(n: int, bad: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        prompt = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 7))
        response = " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(1 + i % 5))
        if not bad:
            rows.append({"prompt": prompt, "response": response})
        elif i % 41 == 5:
            rows.append({"prompt": prompt, "response": None})  # dropped: null response
        elif i % 53 == 7:
            rows.append({"prompt": "why " * 40, "response": response})  # dropped: the prompt fills max_length
        else:
            rows.append({"prompt": prompt * (1 + (i % 11 == 0) * 6), "response": response})  # some cut at max_length
    return rows


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prepared(data: Path, cache: Path, monkeypatch, **cfg) -> tuple[list, list, dict]:
    monkeypatch.setenv("TNLORA_DATA_CACHE", str(cache))
    prepared = prepare_data(DataConfig(train=str(data), max_length=32, on_bad_rows="drop", **cfg), "instruction", make_tokenizer())
    examples = [[(list(e["input_ids"]), list(e["labels"])) for e in split] for split in (prepared.train, prepared.eval)]
    report = {k: v for k, v in prepared.report.items() if k != "cache"}
    return examples[0], examples[1], report


# Forked tokenizer workers can hang in a process that already runs threads (workers.py); in the
# suite's long-lived pytest workers they did once, so these run only when asked for.
forks = pytest.mark.skipif(not os.environ.get("TNLORA_TEST_FORK"), reason="forks worker processes: set TNLORA_TEST_FORK=1")


@forks
def test_one_and_two_processes_prepare_the_same_examples_in_the_same_order(tmp_path, monkeypatch):
    data = _jsonl(tmp_path / "d.jsonl", _rows(2500))
    one = _prepared(data, tmp_path / "c1", monkeypatch, num_proc=1)
    two = _prepared(data, tmp_path / "c2", monkeypatch, num_proc=2)
    assert one == two
    report = one[2]
    assert report["truncated"] > 0 and sum(report["dropped"].values()) > 50 and report["rows_read"] == {str(data): 2500}
    assert len(one[0]) + len(one[1]) == 2500 - sum(report["dropped"].values())


@forks
def test_a_bad_row_names_the_same_row_from_a_worker_process(tmp_path, monkeypatch):
    rows = _rows(2000, bad=False)
    rows[1733] = {"prompt": "what", "response": 7}
    data = _jsonl(tmp_path / "d.jsonl", rows)
    monkeypatch.setenv("TNLORA_DATA_CACHE", str(tmp_path / "c"))
    for num_proc in (1, 2):
        with pytest.raises(DataError, match="row 1734: field 'response' is not text"):
            prepare_data(DataConfig(train=str(data), max_length=32, num_proc=num_proc, on_bad_rows="error"), "instruction", make_tokenizer())


class Recording(Reporter):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def start(self, total: int, description: str, completed: int = 0) -> None:
        self.events.append(("start", description, total))

    def advance(self, completed: int, fields: dict | None = None) -> None:
        self.events.append(("advance", completed, fields))

    def finish(self) -> None:
        self.events.append(("finish",))


def test_every_long_phase_reports_rows_and_rows_per_second(tmp_path, monkeypatch):
    data = _jsonl(tmp_path / "d.jsonl", _rows(300))
    monkeypatch.setenv("TNLORA_DATA_CACHE", str(tmp_path / "c"))
    reporter = Recording()
    prepared = prepare_data(DataConfig(train=str(data), max_length=32, on_bad_rows="drop"), "instruction", make_tokenizer(), reporter=reporter)
    kept = prepared.report["train_examples"] + prepared.report["eval_examples"]
    tasks, current = {}, None
    for event in reporter.events:
        if event[0] == "start":
            current = event[1]
            tasks[current] = []
        elif event[0] == "advance":
            tasks[current].append(event[1:])
        else:
            current = None
    assert list(tasks) == [f"reading {data}", f"tokenizing {data}", "writing the prepared training examples"]
    assert reporter.events[-1] == ("finish",) and sum(e[0] == "start" for e in reporter.events) == sum(e[0] == "finish" for e in reporter.events)
    for name, expected in zip(tasks, (300, 300, kept)):
        completed, fields = tasks[name][-1]
        assert completed == expected and fields["rows/s"] > 0, (name, tasks[name])
    # A second run opens the cache: nothing to read, tokenize or write.
    again = Recording()
    prepare_data(DataConfig(train=str(data), max_length=32, on_bad_rows="drop"), "instruction", make_tokenizer(), reporter=again)
    assert again.events == []


def test_worker_processes_are_the_recipes_choice_never_the_default():
    assert worker_count(None, 10**9) is None  # forking where threads run can hang: see workers.py
    assert worker_count(1, 10**9) is None and worker_count(4, 10) == 4 and worker_count(4, 2) == 2


def test_mapped_arrow_pages_are_given_back_and_read_again(tmp_path):
    import datasets

    path = tmp_path / "t.arrow"
    ds = datasets.Dataset.from_dict({"x": list(range(200_000))})
    ds = ds.map(lambda b: b, batched=True, cache_file_name=str(path))
    assert sum(ds["x"][:1000]) == sum(range(1000))
    assert release_mapped_pages() > 0
    assert ds["x"][199_999] == 199_999 and sum(ds["x"]) == sum(range(200_000))


def test_tnlora_prepare_shows_the_progress_of_each_phase(make_recipe, tmp_path, monkeypatch):
    from conftest import write_recipe
    from typer.testing import CliRunner

    from tnlora_cli.cli import app

    monkeypatch.setenv("TNLORA_DATA_CACHE", str(tmp_path / "c"))
    data = _jsonl(tmp_path / "d.jsonl", _rows(200, bad=False))
    raw = make_recipe("llama", "instruction")
    raw["data"] = {"train": str(data), "max_length": 32}
    result = CliRunner().invoke(app, ["prepare", str(write_recipe(tmp_path / "r.yaml", raw))])
    assert result.exit_code == 0, result.output
    for phase in (f"reading {data}", f"tokenizing {data}", "writing the prepared training examples"):
        assert f"{phase} finished" in result.output, result.output
    assert "rows/s" in result.output

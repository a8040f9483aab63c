"""`tnlora prepare`, the cache, and bad data: one message naming file and row, exit 2,
nothing written (or, with data.on_bad_rows: drop, left out and counted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tokenizer, write_recipe
from typer.testing import CliRunner

from tnlora_cli.cli import app
from tnlora_cli.data.chat import IGNORE_INDEX
from tnlora_cli.data.prepare import prepare_data
from tnlora_cli.recipe.sections import DataConfig

GOOD = {"prompt": "what is the cat", "response": "the cat is good"}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TNLORA_DATA_CACHE", str(root))
    return root


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _prepare(make_recipe, tmp_path, train: str, task: str = "instruction", **data) -> tuple:
    raw = make_recipe("llama", "instruction")
    raw["task"] = task
    raw["data"] = {"train": train, "max_length": 32, **data}
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["prepare", str(recipe), "--json", str(out)])
    return result, out


def _built(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if p.is_dir()] if cache.exists() else []


def test_prepare_reports_and_the_second_run_hits_the_cache(make_recipe, tmp_path, cache):
    rows = [GOOD] * 30 + [{"prompt": "why " * 40, "response": "the dog"}]  # the last one is cut at 32 tokens
    data = _jsonl(tmp_path / "d.jsonl", rows)
    result, out = _prepare(make_recipe, tmp_path, str(data), on_bad_rows="drop")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["cache"] == "miss" and report["train_examples"] + report["eval_examples"] == 30
    assert report["eval_examples"] == 3 and report["dropped"] == {"no trained token within data.max_length=32 (the prompt fills it)": 1}
    sample = report["samples"][0]
    assert len(sample["input_ids"]) == len(sample["labels"]) and IGNORE_INDEX in sample["labels"]
    assert report["train_tokens"] == sum(1 for _ in sample["input_ids"]) * report["train_examples"]
    assert "training examples" in result.output and "cache miss" in result.output
    again, out2 = _prepare(make_recipe, tmp_path, str(data), on_bad_rows="drop")
    assert json.loads(out2.read_text())["cache"] == "hit" and len(_built(cache)) == 1
    # Changing the data section (or the file) makes a new cache entry.
    data.write_text(data.read_text() + json.dumps(GOOD) + "\n")
    third, out3 = _prepare(make_recipe, tmp_path, str(data), on_bad_rows="drop")
    assert json.loads(out3.read_text())["cache"] == "miss" and len(_built(cache)) == 2


@pytest.mark.parametrize(
    "rows, task, expected",
    [
        ([GOOD, {"prompt": "why"}], "instruction", "row 2: field 'response' is missing or null"),
        ([GOOD, GOOD, {"prompt": None, "response": "the"}], "instruction", "row 3: field 'prompt' is missing or null"),
        ([GOOD, {"prompt": "why", "response": 5}], "instruction", "row 2: field 'response' is not text"),
        ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat"}]},
          {"messages": [{"role": "user", "content": "hi"}]}], "chat", "row 2: the conversation has no assistant turn"),
        ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}], "chat", "row 1: turn 2's content is missing or null"),
        ([{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}], "chat", "row 1: turn 2 has role 'bot'"),
        ([GOOD, "{not json"], "instruction", "row 2 is not valid JSON"),
    ],
)
def test_bad_rows_stop_with_file_and_row(make_recipe, tmp_path, cache, rows, task, expected):
    data = _jsonl(tmp_path / "bad.jsonl", rows)
    result, out = _prepare(make_recipe, tmp_path, str(data), task=task)
    assert result.exit_code == 2, result.output
    assert str(data) in result.output.replace("\n", "") and expected in " ".join(result.output.split())
    assert "Traceback" not in result.output and not out.exists() and _built(cache) == []


def test_bad_files(make_recipe, tmp_path, cache):
    cases = {}
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases[str(empty)] = "is empty"
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes((json.dumps(GOOD) + "\n").encode() + '{"prompt": "caf\xe9", "response": "x"}\n'.encode("latin-1"))
    cases[str(latin)] = "row 2 is not UTF-8"
    folder = tmp_path / "train.jsonl"
    folder.mkdir()
    cases[str(folder)] = "is a directory with no"
    cases["someone/some-dataset"] = "hub dataset 'someone/some-dataset', and tnlora is offline"
    for source, expected in cases.items():
        result, out = _prepare(make_recipe, tmp_path, source)
        assert result.exit_code == 2, result.output
        assert expected in " ".join(result.output.split()), result.output
        assert not out.exists() and _built(cache) == []


def test_dropping_bad_rows_counts_them_and_never_trains_on_none(tmp_path, cache):
    rows = [GOOD] * 20 + [{"prompt": "what", "response": None}, {"prompt": None, "response": "None"}, {"prompt": "why", "response": 7}]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    tok = make_tokenizer()
    prepared = prepare_data(DataConfig(train=str(data), max_length=32, on_bad_rows="drop"), "instruction", tok)
    assert len(prepared.train) + len(prepared.eval) == 20
    assert sum(prepared.report["dropped"].values()) == 3
    assert all("None" not in tok.decode(e["input_ids"]) for e in list(prepared.train) + list(prepared.eval))


def test_alpaca_rows_and_the_held_out_cap(tmp_path, cache):
    rows = [{"instruction": "what is", "input": "the cat" if i % 2 else "", "output": "the cat sat"} for i in range(50)]
    data = _jsonl(tmp_path / "alpaca.jsonl", rows)
    tok = make_tokenizer()
    prepared = prepare_data(DataConfig(train=str(data), max_length=32, eval_fraction=0.2, max_held_out=4), "instruction", tok)
    assert len(prepared.eval) == 4 and len(prepared.train) == 46
    assert any("capped" in n for n in prepared.report["notes"]) and any("Alpaca" in n for n in prepared.report["notes"])
    texts = {tok.decode(e["input_ids"]) for e in prepared.train}
    assert any("what is the cat" in t for t in texts) and any("what is the cat" not in t for t in texts)


def test_length_grouped_batches_are_deterministic_and_pad_less():
    import torch

    from tnlora_cli.training.batches import BatchStream

    lengths = torch.randint(5, 200, (512,), generator=torch.Generator().manual_seed(0)).tolist()

    def padding(stream):
        pad = 0
        for m in range(64):
            batch = [lengths[i] for i in stream.indices(m, 8, 1, 0)]
            pad += sum(max(batch) - n for n in batch)
        return pad

    grouped = BatchStream(512, 3, lengths, 64 * 8)
    same = BatchStream(512, 3, lengths, 64 * 8)
    assert [grouped.indices(m, 8, 1, 0) for m in range(70)] == [same.indices(m, 8, 1, 0) for m in range(70)]
    assert sorted(i for m in range(64) for i in grouped.indices(m, 8, 1, 0)) == list(range(512))
    assert padding(grouped) < padding(BatchStream(512, 3)) / 4

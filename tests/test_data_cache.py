"""The data cache: tokenized once and split afterwards, checked on open (a damaged entry is
rebuilt with a warning), no leftovers of dead processes, `prepare --list-cache` /
`--prune-cache`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import make_tokenizer, write_recipe
from typer.testing import CliRunner

from tnlora_cli.cli import app
from tnlora_cli.data import cache as data_cache
from tnlora_cli.data import prepare as prep
from tnlora_cli.recipe.sections import DataConfig

runner = CliRunner()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TNLORA_DATA_CACHE", str(root))
    return root


@pytest.fixture(autouse=True)
def _wide_console(wide_console):
    """Messages on one line each (rich would wrap them at 80 columns)."""


def _entries(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _cfg(data_files, **data) -> DataConfig:
    return DataConfig(train=str(data_files["instruction"]), max_length=32, **data)


def _rows(examples) -> list[tuple]:
    return [(tuple(e["input_ids"]), tuple(e["labels"])) for e in examples]


def test_held_out_settings_reuse_the_tokenized_data(data_files, cache, monkeypatch):
    tokenizer = make_tokenizer()
    first = prep.prepare_data(_cfg(data_files), "instruction", tokenizer)
    assert first.report["cache"]["hit"] is False
    everything = sorted(_rows(first.train) + _rows(first.eval))

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(prep, "_tokenize", no_tokenizing)
    for settings in ({"max_eval_samples": 5}, {"eval_fraction": 0.25}, {"split_seed": 3}, {"max_held_out": 4}, {"max_train_samples": 10}):
        other = prep.prepare_data(_cfg(data_files, **settings), "instruction", tokenizer)
        assert other.report["cache"]["hit"] is True, settings
        if "max_train_samples" not in settings:
            assert sorted(_rows(other.train) + _rows(other.eval)) == everything, settings
    assert len(prep.prepare_data(_cfg(data_files, max_eval_samples=5), "instruction", tokenizer).eval) == 5
    assert len(_entries(cache)) == 1


def _truncate_arrow(entry: Path) -> None:
    arrow = next(entry.glob("train/*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:1000])


def _garbage_report(entry: Path) -> None:
    (entry / "report.json").write_text("{garbage")


def _same_size_garbage_report(entry: Path) -> None:
    text = (entry / "report.json").read_text()
    (entry / "report.json").write_text(text.replace('"task"', '"tusk"'))


def _no_manifest(entry: Path) -> None:
    (entry / data_cache.MANIFEST).unlink()


def _zeroed_arrow_tail(entry: Path) -> None:
    arrow = next(entry.glob("train/*.arrow"))
    data = arrow.read_bytes()
    arrow.write_bytes(data[: len(data) - 64] + b"\0" * 64)


@pytest.mark.parametrize("damage", [_truncate_arrow, _garbage_report, _same_size_garbage_report, _no_manifest, _zeroed_arrow_tail],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_entry_is_rebuilt_with_a_warning(damage, data_files, cache):
    tokenizer = make_tokenizer()
    first = prep.prepare_data(_cfg(data_files), "instruction", tokenizer)
    before = _rows(first.train), _rows(first.eval)
    del first  # its memory map would read the damaged file
    (entry,) = _entries(cache)
    damage(entry)
    warnings: list[str] = []
    again = prep.prepare_data(_cfg(data_files), "instruction", tokenizer, warn=warnings.append)
    assert any("damaged" in w and str(entry) in w for w in warnings), warnings
    assert again.report["cache"] == {"path": str(entry), "hit": False, "rebuilt": True}
    assert (_rows(again.train), _rows(again.eval)) == before
    assert data_cache.damage(entry) is None
    warnings.clear()
    assert prep.prepare_data(_cfg(data_files), "instruction", tokenizer, warn=warnings.append).report["cache"]["hit"] and not warnings


@pytest.mark.parametrize("damage", [_truncate_arrow, _garbage_report], ids=["truncated arrow", "garbage report.json"])
def test_prepare_train_and_eval_rebuild_a_damaged_entry_without_a_traceback(damage, make_recipe, cache, tmp_path):
    raw = make_recipe("llama", "instruction")
    raw["training"]["max_steps"] = 1
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    assert runner.invoke(app, ["prepare", str(recipe)]).exit_code == 0
    for argv in (["prepare", str(recipe)], ["train", str(recipe)], ["eval", raw["output_dir"]]):
        damage(_entries(cache)[0])
        result = runner.invoke(app, argv)
        assert result.exit_code == 0 and result.exception is None, result.output
        assert "Traceback" not in result.output and "is damaged" in result.output and "rebuilding it" in result.output


def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(data_files, cache):
    tokenizer = make_tokenizer()
    prep.prepare_data(_cfg(data_files), "instruction", tokenizer)
    dead_key, live_key = "a" * 24, "b" * 24
    for key in (dead_key, live_key):
        tmp = cache / f".{key}.tmp-4194303-deadbeef"  # what atomic_directory names a build in progress
        tmp.mkdir()
        (tmp / "data.arrow").write_bytes(b"x" * 1000)
    (cache / f"{'c' * 24}.lock").touch()  # a lock file a killed process left
    live_lock = cache / f"{live_key}.lock"
    held = data_cache._acquire(live_lock, blocking=True)  # another preparation of live_key is running
    try:
        warnings: list[str] = []
        again = prep.prepare_data(_cfg(data_files), "instruction", tokenizer, warn=warnings.append)
        assert again.report["cache"]["hit"]
        left = sorted(p.name for p in cache.iterdir())
        assert left == sorted([f".{live_key}.tmp-4194303-deadbeef", live_lock.name, _entries(cache)[0].name]), left
        assert sum("left in the data cache by an interrupted process" in w for w in warnings) == 1, warnings
    finally:
        data_cache._release(live_lock, held)
    # no lock file stays behind a finished preparation
    prep.prepare_data(_cfg(data_files, split_seed=1), "instruction", tokenizer)
    assert not list(cache.glob("*.lock")) and not list(cache.glob(".*"))


def test_the_key_lock_survives_its_file_being_removed(cache):
    """A lock file removed by its releasing holder is never locked by two processes: a waiter
    that opened the removed file retries on the new one."""
    cache.mkdir()
    path = cache / "k.lock"
    first = data_cache._acquire(path, blocking=True)
    stale = os.open(path, os.O_RDWR)  # a waiter opened the file before the holder released it
    data_cache._release(path, first)
    second = data_cache._acquire(path, blocking=True)  # a newcomer creates and locks a new file
    import fcntl

    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the old inode is free: the waiter gets it ...
    assert not os.path.samestat(os.fstat(stale), os.stat(path))  # ... and sees it is no longer the lock
    assert data_cache._acquire(path, blocking=False) is None  # the live lock holds
    os.close(stale)
    data_cache._release(path, second)


def _prepare_twice(make_recipe, tmp_path) -> None:
    for task in ("instruction", "causal-lm"):
        raw = make_recipe("llama", task)
        assert runner.invoke(app, ["prepare", str(write_recipe(tmp_path / f"{task}.yaml", raw))]).exit_code == 0


def test_list_and_prune_the_cache(make_recipe, cache, tmp_path):
    assert "holds no entries" in runner.invoke(app, ["prepare", "--list-cache"]).output
    _prepare_twice(make_recipe, tmp_path)
    old, new = sorted(_entries(cache), key=lambda p: p.name)
    forty_days_ago = time.time() - 40 * 86400
    earlier_version = cache / ("e" * 24)  # an entry an older tnlora wrote (no manifest)
    (earlier_version / "train").mkdir(parents=True)
    for entry in (old, earlier_version):
        os.utime(entry, (forty_days_ago, forty_days_ago))
    (cache / f".{'d' * 24}.tmp-4194303-0").mkdir()
    listed = runner.invoke(app, ["prepare", "--list-cache"])
    assert listed.exit_code == 0, listed.output
    assert old.name in listed.output and new.name in listed.output and "3 entries" in listed.output
    assert "(40 d ago)" in listed.output and "instruction.jsonl" in listed.output and "older tnlora version" in listed.output
    pruned = runner.invoke(app, ["prepare", "--prune-cache"])
    assert pruned.exit_code == 0, pruned.output
    assert "removed 2 cache entries" in pruned.output and "not used for 30 days" in pruned.output and "1 leftovers of earlier preparations" in pruned.output
    assert _entries(cache) == [new] and not list(cache.glob(".*"))
    kept = runner.invoke(app, ["prepare", "--prune-cache", "--older-than", "1"])
    assert "removed 0 cache entries" in kept.output and _entries(cache) == [new]
    everything = runner.invoke(app, ["prepare", "--prune-cache", "--all"])
    assert "removed 1 cache entry" in everything.output and _entries(cache) == []


def test_prune_keeps_an_entry_in_use(make_recipe, cache, tmp_path):
    _prepare_twice(make_recipe, tmp_path)
    busy, _ = _entries(cache)
    lock = cache / f"{busy.name}.lock"
    fd = data_cache._acquire(lock, blocking=True)
    try:
        result = runner.invoke(app, ["prepare", "--prune-cache", "--all"])
    finally:
        data_cache._release(lock, fd)
    assert "removed 1 cache entry" in result.output and f"kept 1 in use by another process: {busy.name}" in result.output
    assert _entries(cache) == [busy]


def test_the_data_cache_path_is_a_file(make_recipe, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for value, message in ((blocker, f"{blocker} is a file, not a directory"), (blocker / "sub", f"{blocker / 'sub'} is not a directory ({blocker} is a file)")):
        monkeypatch.setenv("TNLORA_DATA_CACHE", str(value))
        result = runner.invoke(app, ["prepare", str(write_recipe(tmp_path / "r.yaml", make_recipe()))])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert f"TNLORA_DATA_CACHE: {message}" in result.output


def test_prepare_honours_allow_pickle(make_recipe, tiny_models, cache, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_models["bert"], base)
    (base / "model.safetensors").unlink()
    (base / "pytorch_model.bin").write_bytes(b"not read by prepare")
    raw = make_recipe()
    raw["model"] = str(base)
    refused = runner.invoke(app, ["prepare", str(write_recipe(tmp_path / "r.yaml", raw))])
    assert refused.exit_code == 2 and "allow_pickle" in refused.output
    raw["allow_pickle"] = True
    allowed = runner.invoke(app, ["prepare", str(write_recipe(tmp_path / "r.yaml", raw))])
    assert allowed.exit_code == 0, allowed.output


def test_manifest_samples_large_files_and_hashes_small_ones_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(data_cache, "WHOLE_HASH_LIMIT", 4096)
    monkeypatch.setattr(data_cache, "SAMPLE_BLOCK", 256)
    big = tmp_path / "e" / "big.arrow"
    big.parent.mkdir()
    big.write_bytes(bytes(range(256)) * 100)
    data_cache.write_manifest(big.parent, {})
    assert data_cache.damage(big.parent) is None
    offsets = data_cache._sample_offsets(big.stat().st_size)
    assert offsets[0] == 0 and offsets[-1] == 25600 - 256 and len(offsets) == data_cache.SAMPLE_BLOCKS
    data = bytearray(big.read_bytes())
    data[offsets[3] + 10] ^= 1  # a flipped byte in a sampled block
    big.write_bytes(bytes(data))
    assert data_cache.damage(big.parent) == "big.arrow does not match its digest"
    manifest = json.loads((big.parent / "manifest.json").read_text())
    assert set(manifest["files"]) == {"big.arrow"}

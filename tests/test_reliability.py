"""Faults that must lose nothing and publish nothing wrong: the run lock, the divergence
guard, `--overwrite`, damaged checkpoints, stale files of killed processes, signals, and
full disks. Tiny BERT, a few steps per run."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tnlora_cli.errors import DivergenceError, RunInUseError
from tnlora_cli.recipe.load import validate_recipe
from tnlora_cli.run.layout import checkpoint_dirs
from tnlora_cli.run.lock import RunLock
from tnlora_cli.train import train

ROOT = Path(__file__).resolve().parents[1]


def _raw(make_recipe, tmp_path: Path, **training) -> dict:
    raw = make_recipe("bert", "classification")
    raw["data"].update(max_train_samples=64, max_eval_samples=16)
    raw["training"].update({"max_steps": 4, "batch_size": 4, "log_every": 1, **training})
    raw["output_dir"] = str(tmp_path / "run")
    return raw


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter/adapter_model.safetensors"))


def test_a_second_run_in_a_locked_directory_is_refused_at_once(make_recipe, tmp_path):
    raw = _raw(make_recipe, tmp_path, max_steps=1)
    with RunLock(Path(raw["output_dir"])):  # another process's lock (flock is per open file)
        with pytest.raises(RunInUseError, match=r"in use by another tnlora process \(pid \d+\)"):
            train(validate_recipe(raw))
        assert sorted(p.name for p in Path(raw["output_dir"]).iterdir()) == [".tnlora.lock"]
    train(validate_recipe(raw))  # released: the next run goes ahead
    assert (Path(raw["output_dir"]) / "adapter").is_dir()


def test_a_killed_process_leaves_no_lock(make_recipe, tmp_path):
    run = tmp_path / "run"
    code = f"from tnlora_cli.run.lock import RunLock; RunLock({str(run)!r}).acquire(); import os; os.kill(os.getpid(), 9)"
    child = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr  # it took the lock and was killed holding it
    assert (run / ".tnlora.lock").is_file()
    with RunLock(run):
        pass


@pytest.mark.parametrize("lr", [1e30, 1e38])
def test_divergence_stops_the_run_and_publishes_nothing(make_recipe, tmp_path, lr):
    raw = _raw(make_recipe, tmp_path, learning_rate=lr, max_grad_norm=None, save_every=1, max_steps=6)
    with pytest.raises(DivergenceError) as info:
        train(validate_recipe(raw))
    message = info.value.message
    assert "training diverged at step" in message and "no adapter was published" in message
    run = Path(raw["output_dir"])
    assert not (run / "adapter").exists()
    for ckpt in checkpoint_dirs(run):  # every checkpoint that was written is finite
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "adapter/adapter_model.safetensors")).values())


def test_divergence_message_names_step_last_loss_and_checkpoint(make_recipe, tmp_path):
    """A NaN loss at step 3 (inputs made non-finite from then on): the step, the last finite
    loss and the step-2 checkpoint are named."""
    from tnlora_cli.training import loop as train_module

    raw = _raw(make_recipe, tmp_path, save_every=2, max_steps=4)
    calls = {"n": 0}
    original = train_module.DivergenceGuard.add

    def poisoned(self, loss, labels=None):
        calls["n"] += 1
        original(self, loss * float("nan") if calls["n"] >= 3 else loss, labels)

    train_module.DivergenceGuard.add = poisoned
    try:
        with pytest.raises(DivergenceError) as info:
            train(validate_recipe(raw))
    finally:
        train_module.DivergenceGuard.add = original
    assert "step 3" in info.value.message and "at step 2" in info.value.message and "step-000002" in info.value.message


def test_overwrite_keeps_the_previous_run_until_the_new_one_succeeds(make_recipe, tmp_path):
    raw = _raw(make_recipe, tmp_path, max_steps=2)
    train(validate_recipe(raw))
    run = Path(raw["output_dir"])
    before = _adapter(run)
    failing = _raw(make_recipe, tmp_path, learning_rate=1e30, max_grad_norm=None, max_steps=4)
    with pytest.raises(DivergenceError):
        train(validate_recipe(failing), overwrite=True)
    after = _adapter(run)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert validate_recipe(raw).training.learning_rate == pytest.approx(
        __import__("yaml").safe_load((run / "recipe.yaml").read_text())["training"]["learning_rate"]
    )
    assert not (run / ".previous-run").exists()
    train(validate_recipe(_raw(make_recipe, tmp_path, max_steps=3)), overwrite=True)
    assert not (run / ".previous-run").exists() and _records(run)[-2]["step"] == 3


def test_a_killed_overwrite_puts_the_previous_run_back(make_recipe, tmp_path):
    raw = _raw(make_recipe, tmp_path, max_steps=2)
    train(validate_recipe(raw))
    run = Path(raw["output_dir"])
    before = _adapter(run)
    train(validate_recipe(_raw(make_recipe, tmp_path, max_steps=4, save_every=1)), overwrite=True, stop_after=1)  # "killed" after step 1
    assert (run / ".previous-run/adapter").is_dir() and not (run / "adapter").exists()
    with pytest.raises(Exception, match="already holds a run"):
        train(validate_recipe(raw))  # a plain start restores the previous run, which is then protected
    assert torch.equal(_adapter(run)[next(iter(before))], before[next(iter(before))])


def test_damaged_latest_checkpoint_falls_back_with_a_warning(make_recipe, tmp_path):
    raw = _raw(make_recipe, tmp_path, save_every=1, max_steps=4, save_total_limit=3)
    train(validate_recipe(raw), stop_after=3)
    run = Path(raw["output_dir"])
    latest = checkpoint_dirs(run)[-1]
    weights = latest / "adapter/adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a tensor: still loads, but is not what was written
    weights.write_bytes(bytes(data))
    messages: list[str] = []

    class Capture:
        def __getattr__(self, name):
            return (lambda *a, **k: messages.append(str(a[0]))) if name == "status" else (lambda *a, **k: None)

    train(validate_recipe(raw), resume="auto", reporter=Capture())
    assert any("step-000003 is damaged" in m and "checksum" in m for m in messages), messages
    steps = [r["step"] for r in _records(run) if "train_loss" in r]
    assert steps == [1, 2, 3, 4], "one record per step after resuming from step 2"


def test_resume_records_each_step_once(make_recipe, tmp_path):
    raw = _raw(make_recipe, tmp_path, save_every=2, max_steps=5)
    train(validate_recipe(raw), stop_after=3)  # step 3 logged, checkpoint at 2 and 3
    run = Path(raw["output_dir"])
    (checkpoint_dirs(run)[-1] / "training_state.json").unlink()  # as if killed after logging step 3, before its checkpoint
    import shutil

    shutil.rmtree(checkpoint_dirs(run)[-1])
    train(validate_recipe(raw), resume="auto")
    steps = [r["step"] for r in _records(run) if "train_loss" in r]
    assert steps == [1, 2, 3, 4, 5]


def test_changed_safe_keys_are_allowed_on_resume(make_recipe, tmp_path):
    raw = _raw(make_recipe, tmp_path, save_every=1, max_steps=2)
    train(validate_recipe(raw), stop_after=1)
    raw["training"].update(max_steps=3, log_every=2, save_total_limit=1, eval_every=5)
    result = train(validate_recipe(raw), resume="auto")
    assert result.steps == 3


def test_a_dead_runs_leftovers_are_cleaned_and_not_mixed_in(make_recipe, tmp_path):
    raw = _raw(make_recipe, tmp_path, max_steps=2)
    run = Path(raw["output_dir"])
    (run / "checkpoints" / ".step-000001.tmp").mkdir(parents=True)
    (run / ".adapter.tmp-999999-abcd1234").mkdir()
    (run / "checkpoints" / ".step-000004.deleting").mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 7, "train_loss": 9.0}) + "\n")  # a run killed before its first checkpoint
    train(validate_recipe(raw))
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".tnlora.lock"]
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())
    assert [r["step"] for r in _records(run) if "train_loss" in r] == [1, 2]


def test_pruning_never_leaves_a_half_checkpoint(make_recipe, tmp_path, monkeypatch):
    """Killed while deleting an old checkpoint (simulated: the deletion removes one file and
    dies): no checkpoint under its real name is incomplete."""
    import shutil

    from tnlora_cli.run.resume import checkpoint_problem

    real_rmtree, fired = shutil.rmtree, []

    def dying_rmtree(path, ignore_errors=False, **kwargs):
        if Path(path).name in ("step-000001", ".step-000001.deleting") and not fired:
            fired.append(path)
            (Path(path) / "training_state.json").unlink()
            raise RuntimeError("killed while pruning")
        real_rmtree(path, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", dying_rmtree)
    raw = _raw(make_recipe, tmp_path, save_every=1, max_steps=3, save_total_limit=1)
    with pytest.raises(RuntimeError, match="killed while pruning"):
        train(validate_recipe(raw))
    run = Path(raw["output_dir"])
    assert fired and checkpoint_dirs(run)
    assert all(checkpoint_problem(c) is None for c in checkpoint_dirs(run)), [checkpoint_problem(c) for c in checkpoint_dirs(run)]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tnlora_cli", *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "400"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_run_saves_a_checkpoint_that_resumes_bit_for_bit(make_recipe, tmp_path, sig):
    """No save_every: SIGTERM (a preemption) or SIGINT (Ctrl-C) mid-run still saves a checkpoint
    after the step in progress and says so; resuming it ends with the uninterrupted run's adapter.
    A constant learning rate makes the straight run's length irrelevant to the steps before it."""
    from conftest import write_recipe

    killed = _raw(make_recipe, tmp_path, max_steps=100000, log_every=1, lr_scheduler="constant")
    recipe = write_recipe(tmp_path / "r.yaml", killed)
    run = Path(killed["output_dir"])
    proc = subprocess.Popen(_cli("train", str(recipe)), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    err = " ".join(err.split())
    assert proc.returncode == 130 and "Traceback" not in err, err
    (saved,) = checkpoint_dirs(run)
    step = int(saved.name.split("-")[1])
    assert 3 <= step < 100000
    assert f"training interrupted by {signal.Signals(sig).name} at step {step}/100000: saved checkpoint {saved}" in err, err
    assert "--resume auto" in err and not (run / "adapter").exists()

    killed["training"]["max_steps"] = step + 2  # a safe change on resume
    train(validate_recipe(killed), resume="auto")
    straight = dict(killed, output_dir=str(tmp_path / "straight"))
    train(validate_recipe(straight))
    a, b = _adapter(tmp_path / "straight"), _adapter(run)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["step"] for r in _records(run) if "train_loss" in r] == list(range(1, step + 3))


def test_a_checkpoint_is_saved_every_save_every_minutes(make_recipe, tmp_path, monkeypatch):
    """The default cadence is by the clock (training.save_every_minutes, 30): here the clock
    runs 20 minutes per step, so steps 2 and 4 of 5 are saved (and no other)."""
    from tnlora_cli.training import loop

    clock = iter(range(0, 10**6, 20 * 60))
    monkeypatch.setattr(loop, "_clock", lambda: next(clock))
    raw = _raw(make_recipe, tmp_path, max_steps=5, save_total_limit=None)
    assert validate_recipe(raw).training.save_every_minutes == 30
    train(validate_recipe(raw))
    assert [c.name for c in checkpoint_dirs(Path(raw["output_dir"]))] == ["step-000002", "step-000004"]


def test_sigkill_during_merge_leaves_nothing_a_later_merge_trips_over(make_recipe, tmp_path):
    raw = _raw(make_recipe, tmp_path, max_steps=2)
    train(validate_recipe(raw))
    out = tmp_path / "merged"
    proc = subprocess.Popen(_cli("merge", raw["output_dir"], "--out", str(out), "--no-verify"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".merged.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not out.exists()
    leftovers = list(tmp_path.glob(".merged.tmp-*"))
    result = subprocess.run(_cli("merge", raw["output_dir"], "--out", str(out), "--no-verify"), env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".merged.tmp-*")), leftovers


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB file system, where the test may mount one (root in a container); else skip."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_merge_fails_cleanly(make_recipe, tmp_path, small_tmpfs):
    from typer.testing import CliRunner

    from tnlora_cli.cli import app

    raw = _raw(make_recipe, tmp_path, max_steps=2)
    train(validate_recipe(raw))
    (small_tmpfs / "filler").write_bytes(b"x" * 700_000)
    result = CliRunner().invoke(app, ["merge", raw["output_dir"], "--out", str(small_tmpfs / "m")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "not enough disk space" in result.output or "disk is full" in result.output
    assert "0.0 GiB" not in result.output
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler"]


def test_disk_full_checkpoint_keeps_earlier_checkpoints(make_recipe, tmp_path, small_tmpfs):
    from conftest import write_recipe
    from typer.testing import CliRunner

    from tnlora_cli.cli import app

    raw = _raw(make_recipe, tmp_path, max_steps=40, save_every=1, save_total_limit=100)
    raw["output_dir"] = str(small_tmpfs / "run")
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", raw))])
    assert result.exit_code == 1, result.output
    assert "disk is full" in " ".join(result.output.split()) and "Traceback" not in result.output
    saved = checkpoint_dirs(small_tmpfs / "run")
    assert saved, "some checkpoints fit before the disk filled"
    from tnlora_cli.run.resume import checkpoint_problem

    assert all(checkpoint_problem(c) is None for c in saved)
    assert not list((small_tmpfs / "run" / "checkpoints").glob(".*"))


def test_read_only_output_dir_is_one_message(make_recipe, tmp_path):
    from conftest import write_recipe
    from typer.testing import CliRunner

    from tnlora_cli.cli import app

    mount = tmp_path / "ro"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        raw = _raw(make_recipe, tmp_path, max_steps=2)
        raw["output_dir"] = str(mount / "run")
        result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", raw))])
        assert result.exit_code == 2 and "read-only file system" in result.output and "Traceback" not in result.output, result.output
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_sigkill_during_training_then_resume_equals_the_uninterrupted_run(make_recipe, tmp_path):
    """A real SIGKILL at whatever point training has reached once checkpoint 3 exists (often
    mid-step or mid-save); `--resume auto` then ends with the straight run's adapter."""
    from conftest import write_recipe

    straight = _raw(make_recipe, tmp_path, save_every=1, max_steps=8, save_total_limit=2)
    straight["output_dir"] = str(tmp_path / "straight")
    train(validate_recipe(straight))
    killed = dict(straight, output_dir=str(tmp_path / "killed"))
    recipe = write_recipe(tmp_path / "k.yaml", killed)
    proc = subprocess.Popen(_cli("train", str(recipe)), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (Path(killed["output_dir"]) / "checkpoints" / "step-000003").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert not (Path(killed["output_dir"]) / "adapter").exists(), "killed too late to test anything"
    train(validate_recipe(killed), resume="auto")
    a, b = _adapter(tmp_path / "straight"), _adapter(tmp_path / "killed")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
    steps = [r["step"] for r in _records(tmp_path / "killed") if "train_loss" in r]
    assert steps == list(range(1, 9)), steps


# cache:
def test_a_preparation_killed_while_building_leaves_nothing_the_next_trips_over(data_files, tmp_path, monkeypatch):
    """SIGKILL after the tokenized data is written into the entry's temporary directory, before
    it is published: the next preparation removes the temporary and the lock file, says so, and
    builds the entry; afterwards no lock file and no hidden file is left."""
    from conftest import make_tokenizer

    from tnlora_cli.data.prepare import prepare_data
    from tnlora_cli.recipe.sections import DataConfig

    cache = tmp_path / "cache"
    code = (
        "import os, sys; sys.path.insert(0, 'tests')\n"
        "from conftest import make_tokenizer\n"
        "from tnlora_cli.data import prepare as prep\n"
        "from tnlora_cli.recipe.sections import DataConfig\n"
        "build = prep._build\n"
        "def build_then_die(*args):\n"
        "    build(*args)\n"
        "    os.kill(os.getpid(), 9)\n"
        "prep._build = build_then_die\n"
        f"prep.prepare_data(DataConfig(train={str(data_files['instruction'])!r}, max_length=32), 'instruction', make_tokenizer())\n"
    )
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**_env(), "TNLORA_DATA_CACHE": str(cache)}, capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    leftovers = sorted(p.name for p in cache.iterdir())
    assert len(leftovers) == 2 and leftovers[0].startswith(".") and ".tmp-" in leftovers[0] and leftovers[1].endswith(".lock"), leftovers
    assert sum(f.stat().st_size for f in (cache / leftovers[0]).rglob("*") if f.is_file()) > 0  # the tokenized data

    monkeypatch.setenv("TNLORA_DATA_CACHE", str(cache))
    warnings: list[str] = []
    data = prepare_data(DataConfig(train=str(data_files["instruction"]), max_length=32), "instruction", make_tokenizer(), warn=warnings.append)
    assert data.report["cache"]["hit"] is False and len(data.train) > 0
    assert [w for w in warnings if leftovers[0] in w and "interrupted process" in w], warnings
    assert [p.name for p in cache.iterdir()] == [leftovers[1].removesuffix(".lock")]  # the entry alone


class _Messages:
    """A reporter that keeps its status lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __getattr__(self, name):
        return (lambda *a, **k: self.lines.append(str(a[0]))) if name == "status" else (lambda *a, **k: None)


def test_a_diverged_overwrite_names_no_checkpoint_that_the_restore_removed(make_recipe, tmp_path):
    raw = _raw(make_recipe, tmp_path, max_steps=2)
    train(validate_recipe(raw))
    run = Path(raw["output_dir"])
    failing = _raw(make_recipe, tmp_path, learning_rate=1e30, max_grad_norm=None, max_steps=6, save_every=1)
    with pytest.raises(DivergenceError) as info:
        train(validate_recipe(failing), overwrite=True)
    message = str(info.value)
    assert "training diverged at step" in message and f"the previous run in {run} was put back" in message, message
    assert "step-0000" not in message and "--resume auto" not in message, message
    assert not checkpoint_dirs(run) and (run / "adapter").is_dir()  # the previous run had none; its adapter is back


def test_resume_auto_in_an_empty_directory_says_it_starts_fresh(make_recipe, tmp_path):
    raw = _raw(make_recipe, tmp_path, max_steps=1)
    messages = _Messages()
    train(validate_recipe(raw), resume="auto", reporter=messages)
    assert any("holds no checkpoint yet; starting a new run from step 0" in m for m in messages.lines), messages.lines


def test_a_destroyed_adapter_is_published_with_a_loud_verdict(make_recipe, tmp_path):
    """lr 1e20 leaves finite but enormous adapter values: the run ends, and its table and
    eval.json say the tuned model is worse than the base and collapsed."""
    from conftest import write_recipe
    from typer.testing import CliRunner

    from tnlora_cli.cli import app

    raw = make_recipe("llama", "causal-lm")
    raw["training"].update(max_steps=3, batch_size=4, learning_rate=1e20, log_every=1)
    raw["output_dir"] = str(tmp_path / "run")
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", raw))], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    verdict = json.loads((tmp_path / "run/eval.json").read_text())["verdict"]
    assert verdict["worse_than_base"] and verdict["collapsed"], verdict
    output = " ".join(result.output.split())
    assert "WARNING: see below" in output and "WARNING: the tuned model is worse than the base" in output, output
    assert "WARNING: the tuned model's outputs collapsed" in output


@pytest.mark.parametrize("model, task", [("llama", "causal-lm"), ("bert", "classification")])
def test_a_sound_run_has_a_clean_verdict(make_recipe, tmp_path, model, task):
    raw = make_recipe(model, task)
    raw["training"].update(max_steps=60)
    result = train(validate_recipe(raw))
    assert result.verdict == {"worse_than_base": False, "collapsed": False, "warnings": []}, (result.evaluation, result.verdict)
    assert json.loads((Path(raw["output_dir"]) / "eval.json").read_text())["verdict"] == result.verdict


def test_the_verdict_rules():
    from tnlora_cli.evaluation.verdict import judge

    base, uniform = {"loss": 2.0}, math.log(1000)
    varied = {"outputs": 1000, "predictions": [3, 7], "labels": [1, 2]}
    constant = {"outputs": 1000, "predictions": [3], "labels": [1, 2]}
    assert judge({"base": base, "tuned": {"loss": 1.5}}, varied)["warnings"] == []
    assert judge({"base": base, "tuned": {"loss": 2.0001}}, varied)["warnings"] == []  # within 1e-4: noise, not a finding
    assert judge({"base": base, "tuned": {"loss": 1.5}}, constant)["warnings"] == []  # constant but better than the base
    finding = judge({"base": base, "tuned": {"loss": 2.5}}, constant)
    assert finding["worse_than_base"] and finding["collapsed"] and "predicts 3 at every held-out position" in finding["warnings"][1]
    assert judge({"base": base, "tuned": {"loss": 2.5}}, varied) | {"warnings": None} == {"worse_than_base": True, "collapsed": False, "warnings": None}
    assert judge({"tuned": {"loss": uniform}}, varied)["collapsed"]  # no base row (sharded head): ln K still tells
    assert not judge({"base": {"loss": uniform * 1.001}, "tuned": {"loss": uniform}}, varied)["collapsed"]  # a random base is at ln K too


@pytest.mark.parametrize("command", ["merge", "export"])
def test_out_on_a_mount_point_is_refused_before_the_work(make_recipe, tmp_path, small_tmpfs, command):
    from typer.testing import CliRunner

    from tnlora_cli.cli import app

    raw = _raw(make_recipe, tmp_path, max_steps=1)
    train(validate_recipe(raw))
    extra = ["--rank", "2"] if command == "export" else []
    result = CliRunner().invoke(app, [command, raw["output_dir"], "--out", str(small_tmpfs), "--force", *extra], env={"COLUMNS": "400"})
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in output, output
    assert f"--out {small_tmpfs} is a mount point" in output and f"--out {small_tmpfs / 'merged'}" in output, output
    assert list(small_tmpfs.iterdir()) == [] and not list(tmp_path.glob(".tmpfs.tmp-*"))
def _stderr_until(proc: subprocess.Popen, text: str) -> str:
    """The process's stderr up to the end of the first line holding `text` (or to its end),
    read byte by byte from an unbuffered pipe so that `communicate` returns exactly the rest."""
    seen = b""
    while True:
        byte = proc.stderr.read(1)
        if not byte:
            return seen.decode()
        seen += byte
        if byte == b"\n" and text.encode() in seen.splitlines()[-1]:
            return seen.decode()


@pytest.mark.parametrize("command", ["generate", "eval --generate"])
def test_sigterm_in_generation_says_what_was_interrupted(make_recipe, tmp_path, command):
    """SIGTERM while the tuned model generates (generate) or once the run is loaded (eval
    --generate): exit 130, one message naming the phase, nothing written."""
    raw = make_recipe("llama", "instruction")
    raw["data"]["max_eval_samples"] = 48
    raw["training"].update(max_steps=2, batch_size=4)
    train(validate_recipe(raw))
    run = Path(raw["output_dir"])
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    out = tmp_path / "out.jsonl"
    if command == "generate":
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"what is the {w}"}) + "\n" for w in ["cat", "dog", "sun", "team"] * 100))
        argv = ["generate", str(run), "--input", str(prompts), "--output", str(out), "--batch-size", "1", "--max-new-tokens", "90"]
        ready = "merging the adapters"
    else:
        argv = ["eval", str(run), "--generate", "--batch-size", "1", "--max-new-tokens", "90"]
        ready = "loading"
    env = {**_env(), "TNLORA_PROGRESS": "plain"}
    proc = subprocess.Popen(_cli(*argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    seen = _stderr_until(proc, ready)
    assert proc.poll() is None, seen
    time.sleep(1)  # into the phase
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    err = seen + rest.decode()
    assert proc.returncode == 130, err
    flat = " ".join(err.split())
    kept = f"nothing was written to {out}" if command == "generate" else "generations.jsonl and eval.json were left as they were"
    phase = r"generating \(tuned\) \(\d+/400 done\)" if command == "generate" else r"(loading|held-out loss|generating|merging)[^;]*"
    assert re.search(rf"error: {re.escape(command)} interrupted while {phase}; {re.escape(kept)}", flat), err
    assert "Traceback" not in err and "finished at step" not in err and flat.count("error:") == 1
    assert not out.exists() and not [p for p in [*run.iterdir(), *tmp_path.iterdir()] if ".tmp-" in p.name]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_an_interrupted_image_prepare_says_where_and_leaves_no_cache_entry(tmp_path, monkeypatch, wide_console):
    """Ctrl-C while `prepare` decodes images: exit 130, one message naming the phase, no cache
    entry or contact sheet; the same command then prepares the data."""
    from test_images import image_folder, make_image_recipe, save_vision_models
    from typer.testing import CliRunner

    from conftest import write_recipe
    from tnlora_cli.cli import app
    from tnlora_cli.data import images

    monkeypatch.setenv("TNLORA_DATA_CACHE", str(tmp_path / "cache"))
    folder = image_folder(tmp_path / "images", per_class=4)
    recipe = write_recipe(tmp_path / "recipe.yaml", make_image_recipe(save_vision_models(tmp_path / "models"), folder, tmp_path / "run"))
    sheet = tmp_path / "sheet.png"
    original, calls = images._decode, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(images, "_decode", interrupted)
    result = CliRunner().invoke(app, ["prepare", str(recipe), "--contact-sheet", str(sheet)])
    flat = " ".join(result.output.split())
    assert result.exit_code == 130, result.output
    assert re.search(rf"error: prepare interrupted while decoding the training images[^;]*; nothing half-written is left in the data cache or at "
                     rf"{re.escape(str(sheet))}", flat), result.output
    assert "Traceback" not in result.output and flat.count("error:") == 1 and not sheet.exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    monkeypatch.setattr(images, "_decode", original)
    again = CliRunner().invoke(app, ["prepare", str(recipe), "--contact-sheet", str(sheet)])
    assert again.exit_code == 0 and sheet.exists(), again.output


def test_an_interrupt_just_after_the_temporary_directory_appears_removes_it(tmp_path, monkeypatch):
    """A SIGTERM sent on seeing `.NAME.tmp-*` (as a user's kill, or test_merge, does) can land
    between making the directory and the code that cleans it up: it must still be removed."""
    from tnlora_cli.run.atomic import atomic_directory

    real_mkdir = Path.mkdir

    def mkdir_then_interrupt(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if ".tmp-" in self.name:
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "mkdir", mkdir_then_interrupt)
    with pytest.raises(KeyboardInterrupt), atomic_directory(tmp_path / "merged"):
        pass
    assert list(tmp_path.iterdir()) == []

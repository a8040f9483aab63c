"""Plain progress lines when the output is not a terminal; the rich bar stays for terminals."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_recipe

from tnlora_cli.report.plainlog import PlainProgress, use_plain_lines

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"^training step (\d+)/6  loss [0-9.e+-]+  lr [0-9.e+-]+  tok/s [0-9.e+-]+  elapsed \d+:\d\d:\d\d  remaining (\d+:\d\d:\d\d|\?)$"
)


def test_train_in_a_batch_job_prints_one_plain_line_per_log_every(make_recipe, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tnlora_cli.cli import app

    monkeypatch.delenv("TNLORA_PROGRESS", raising=False)
    raw = make_recipe("bert", "classification")
    raw["training"].update(max_steps=6, log_every=2)
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", raw))])  # output is not a terminal
    assert result.exit_code == 0, result.output
    lines = [m for m in map(LINE.match, result.output.splitlines()) if m]
    assert [int(m.group(1)) for m in lines] == [2, 4, 6], result.output
    assert lines[-1].group(2) == "0:00:00"  # nothing remains at the last step
    assert "training finished at step 6/6" in result.output
    progress_lines = [line for line in result.output.splitlines() if re.search(r"training.* \d+/6", line)]
    assert len(progress_lines) == 4  # the three lines and the last one; no bar redrawn into the log


def test_the_choice_follows_the_terminal_unless_overridden(monkeypatch):
    monkeypatch.delenv("TNLORA_PROGRESS", raising=False)
    assert use_plain_lines(is_terminal=False) and not use_plain_lines(is_terminal=True)
    monkeypatch.setenv("TNLORA_PROGRESS", "bar")
    assert not use_plain_lines(is_terminal=False)
    monkeypatch.setenv("TNLORA_PROGRESS", "plain")
    assert use_plain_lines(is_terminal=True)


def test_rich_bar_is_kept_on_a_terminal(monkeypatch):
    import io

    from rich.console import Console

    from tnlora_cli import cli

    monkeypatch.delenv("TNLORA_PROGRESS", raising=False)
    monkeypatch.setattr(cli, "console", Console(file=io.StringIO(), force_terminal=True))
    reporter = cli.RichReporter()
    reporter.start(4, "training")
    assert reporter.progress is not None and reporter.plain is None
    reporter.finish()


@pytest.mark.parametrize("total", [5, 40])
def test_slow_work_without_values_prints_at_tenths(total):
    now = [0.0]
    lines: list[str] = []
    progress = PlainProgress(lines.append, total, "merging", clock=lambda: now[0])
    for i in range(1, total + 1):
        now[0] += 100.0  # every step slower than the quiet period
        progress.advance(i)
    progress.finish()
    assert len(lines) == min(total, 10) + 1
    assert lines[-2].startswith(f"merging step {total}/{total}") and lines[-1].startswith("merging finished")
    assert "remaining 0:00:00" in lines[-2] and lines[-1].endswith(f"in {'1:06:40' if total == 40 else '0:08:20'}")


def test_fast_work_without_values_stays_quiet():
    lines: list[str] = []
    progress = PlainProgress(lines.append, 100, "merging", clock=lambda: 0.0)
    for i in range(1, 101):
        progress.advance(i)
    assert lines == []


# ---------------------------------------------------------------- what a log file shows


def _pipe(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI as a batch job runs it: stdout and stderr are pipes, not a terminal."""
    import os

    env = {**os.environ, **(env or {})}
    for name in ("COLUMNS", "TERMINAL_WIDTH", "TNLORA_PROGRESS"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "tnlora_cli", *argv], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def _commands() -> dict[str, list[str]]:
    """Command name -> every option's longest spelling."""
    import typer

    from tnlora_cli.cli import app

    group = typer.main.get_command(app)
    return {name: [max(p.opts, key=len) for p in cmd.params if p.opts and p.opts[0].startswith("-")] for name, cmd in group.commands.items()}


def test_help_in_a_log_keeps_every_option_name_whole():
    commands = _commands()
    assert "--skip-memory-check" in commands["train"]
    for name, options in commands.items():
        result = _pipe(name, "--help")
        assert result.returncode == 0, result.stderr
        assert "…" not in result.stdout, f"{name} --help is cut:\n{result.stdout}"
        for option in options:
            assert re.search(rf"{re.escape(option)}(?![\w-])", result.stdout), f"{name} --help lacks {option} whole:\n{result.stdout}"


def test_prepare_marks_trained_tokens_with_brackets_in_a_log(make_recipe, tmp_path):
    raw = make_recipe("llama", "instruction")
    report_path = tmp_path / "report.json"
    result = _pipe("prepare", str(write_recipe(tmp_path / "r.yaml", raw)), "--json", str(report_path))
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout  # no colour codes in a file
    report = json.loads(report_path.read_text())
    lines = [line for line in result.stdout.splitlines() if line.startswith("sample ")]
    assert len(lines) == len(report["samples"]) >= 1
    for line, sample in zip(lines, report["samples"]):
        trained = "".join(t for t, keep in zip(sample["tokens"], sample["trained"]) if keep)
        masked = "".join(t for t, keep in zip(sample["tokens"], sample["trained"]) if not keep)
        marked = re.findall(r"\[\[(.*?)\]\]", line, re.S)
        assert trained and "".join(marked) == trained, line
        assert re.sub(r"\[\[.*?\]\]", "", line, flags=re.S).removeprefix(f"sample {lines.index(line)}: ") == masked
    assert "[[...]]: tokens in the loss" in result.stdout


def test_prepare_on_a_terminal_keeps_colour_without_brackets():
    from rich.console import Console

    from tnlora_cli import cli

    sample = {"tokens": ["Q", ":", " A"], "trained": [False, False, True]}
    console = Console(file=io.StringIO(), force_terminal=True, color_system="truecolor")
    console.print(cli._sample_text(0, sample, colour=True))
    out = console.file.getvalue()
    assert "[[" not in out and "\x1b[" in out
    assert cli._sample_text(0, sample, colour=False).plain == "sample 0: Q:[[ A]]"


def test_inspect_rank_in_a_log_shows_every_role_whole(make_recipe, tmp_path):
    from tnlora_cli.recipe.load import validate_recipe
    from tnlora_cli.train import train

    raw = make_recipe("llama", "causal-lm")
    raw["adapter"]["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    raw["training"].update(max_steps=1)
    run = tmp_path / "a-run-directory-with-a-long-name-as-real-runs-have" / "smollm2-all-linear-lora-r4"
    raw["output_dir"] = str(run)
    train(validate_recipe(raw))
    result = _pipe("inspect-rank", str(run))
    assert result.returncode == 0, result.stderr
    for role in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert re.search(rf"│ {re.escape(role)} +│", result.stdout), f"{role} not whole:\n{result.stdout}"
    assert "…" not in result.stdout, result.stdout

    export = _pipe("export", str(run), "--out", str(tmp_path / "lora"), "--rank", "2")
    assert export.returncode == 0, export.stderr
    assert "…" not in export.stdout and "model.layers.1.mlp.down_proj" in export.stdout


def test_export_summarises_a_long_table(tmp_path):
    from rich.console import Console

    from tnlora_cli import cli

    layers = [{"name": f"model.layers.{i // 7}.{role}", "rank": 8, "relative_error": 0.01 * (1 + i % 7)}
              for i, role in enumerate(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] * 24)]
    console = Console(file=io.StringIO(), width=10_000)
    original = cli.out_console
    cli.out_console = console
    try:
        cli._print_export(layers, tmp_path / "lora")
    finally:
        cli.out_console = original
    out = console.file.getvalue()
    rows = [line for line in out.splitlines() if line.startswith("│ model.layers.")]
    assert len(rows) == 2 * cli.TABLE_ENDS  # 168 layers: the first and last five
    assert rows[0].startswith("│ model.layers.0.self_attn.q_proj") and rows[-1].startswith("│ model.layers.23.mlp.down_proj")
    assert f"158 more layers (all in {tmp_path / 'lora' / 'tnlora_export.json'})" in out
    assert "168 layers; rank 8; relative error (Frobenius) median 4.00e-02, largest 7.00e-02 (model.layers.0.mlp.down_proj)" in out

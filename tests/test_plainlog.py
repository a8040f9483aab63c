"""Plain progress lines when the output is not a terminal; the rich bar stays for terminals."""

from __future__ import annotations

import re

import pytest
from conftest import write_recipe

from tnlora_cli.report.plainlog import PlainProgress, use_plain_lines

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

"""The `tnlora` command: parse, call the library, render with rich."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup
from typer.exceptions import TyperException

from .errors import TnloraError
from .report.plainlog import HELP_LOG_WIDTH, TRAINED_CLOSE, TRAINED_OPEN, PlainProgress, fit_console, use_plain_lines
from .report.reporter import Reporter


class _Commands(TyperGroup):
    """The command group, with command-line mistakes (a value out of range, an unknown option or
    command, a missing argument) said like every other user error: one line and a hint, exit 2,
    instead of click's boxed usage panel."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        if not sys.stdout.isatty() and not os.environ.get("TERMINAL_WIDTH"):
            import typer.rich_utils

            typer.rich_utils.MAX_WIDTH = HELP_LOG_WIDTH  # help in a file: option names whole
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:  # end of input at a prompt
            console.print("aborted", highlight=False)
            sys.exit(1)
        except TyperException as exc:
            if type(exc).__name__ != "NoArgsIsHelpError":  # the help is already printed
                _print_usage_error(exc)
            sys.exit(getattr(exc, "exit_code", 2))
        sys.exit(code if isinstance(code, int) else 0)


def _print_usage_error(exc: TyperException) -> None:
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    ctx = getattr(exc, "ctx", None)
    where = f"{ctx.command_path}: " if ctx is not None else ""
    console.print(f"[bold red]error:[/bold red] {escape(where + message[:1].lower() + message[1:])}", highlight=False, soft_wrap=True)
    if ctx is not None:
        console.print(f"  [yellow]hint:[/yellow] run '{escape(ctx.command_path)} --help' to see what it accepts", highlight=False, soft_wrap=True)


app = typer.Typer(
    name="tnlora",
    help="Fine-tune Hugging Face models with tensor-network adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Commands,
)
console = Console(stderr=True)
out_console = Console()


class PhaseReporter(Reporter):
    """Shows nothing; remembers the phase under way (the last status or task and its steps)
    so that an interruption can say where it stopped."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.done: tuple[int, int] | None = None

    def status(self, message: str) -> None:
        self.phase, self.done = message, None

    def start(self, total: int, description: str, completed: int = 0) -> None:
        self.phase, self.done = description, (completed, total)

    def advance(self, completed: int, fields: dict[str, Any] | None = None) -> None:
        if self.done is not None:
            self.done = (completed, self.done[1])

    def where(self) -> str:
        """The phase under way, as "while PHASE (N/TOTAL done)"."""
        if self.phase is None:
            return "while starting"
        steps = f" ({self.done[0]}/{self.done[1]} done)" if self.done else ""
        return f"while {self.phase}{steps}"


class RichReporter(PhaseReporter):
    """Progress bar with live loss / lr / tokens-per-second, and one line per evaluation;
    plain log lines instead of the bar when the output is not a terminal."""

    def __init__(self) -> None:
        super().__init__()
        self.progress: Progress | None = None
        self.task: Any = None
        self.plain: PlainProgress | None = None

    def status(self, message: str) -> None:
        super().status(message)
        console.print(f"[dim]{escape(message)}[/dim]")

    def start(self, total: int, description: str, completed: int = 0) -> None:
        super().start(total, description, completed)
        if use_plain_lines(console.is_terminal):
            self.plain = PlainProgress(lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True), total, description, completed)
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.progress.start()
        # A total of 0 is not known beforehand (the rows of a file being read): the bar pulses.
        self.task = self.progress.add_task(description, total=total or None, completed=completed, info="")

    def advance(self, completed: int, fields: dict[str, Any] | None = None) -> None:
        super().advance(completed, fields)
        if self.plain is not None:
            self.plain.advance(completed, fields)
            return
        if self.progress is None:
            return
        info = None
        if fields:
            info = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        self.progress.update(self.task, completed=completed, **({"info": info} if info else {}))

    def finish(self) -> None:
        if self.plain is not None:
            self.plain.finish()
            self.plain = None
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def metrics(self, step: int, values: dict[str, float]) -> None:
        text = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
        (self.progress.console if self.progress else console).print(f"step {step}: held-out {text}")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # On CPUs with AVX512-BF16, bitsandbytes warns at import that it could not fetch an optional
    # kernel from the hub (`pip install kernels`): noise on every 4-bit run, and offline anyway.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the library; a user error becomes one message and an exit code, no traceback."""
    debug = os.environ.get("TNLORA_DEBUG") == "1"
    try:
        return fn(*args, **kwargs)
    except TnloraError as exc:
        _print_error(exc)
        if debug:
            raise
        raise typer.Exit(exc.exit_code) from None
    except OSError as exc:
        message = _os_error_message(exc)
        if message is None or debug:
            raise
        console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False)
        raise typer.Exit(2 if exc.errno in (errno.EACCES, errno.EROFS, errno.EISDIR, errno.ENOTDIR) else 1) from None
    except Exception as exc:
        # Writers that are not Python's own (safetensors) report a full disk in their message.
        if "No space left on device" not in str(exc) or debug:
            raise
        console.print(f"[bold red]error:[/bold red] {escape(_os_error_message(OSError(errno.ENOSPC, 'no space')) or '')}", highlight=False)
        raise typer.Exit(1) from None


def _print_error(exc: TnloraError) -> None:
    console.print(f"[bold red]error:[/bold red] {escape(exc.message)}", highlight=False)
    if exc.hint:
        console.print(f"  [yellow]hint:[/yellow] {escape(exc.hint)}", highlight=False)


@contextlib.contextmanager
def _interruptible(command: str, reporter: PhaseReporter, kept: Callable[[], str]) -> Iterator[None]:
    """SIGINT or SIGTERM during `command`: one message naming the phase it stopped in and
    what was left as it was (`kept`), exit 130 as for training."""
    from .errors import InterruptedRun

    with _sigterm_as_interrupt():
        try:
            yield
        except KeyboardInterrupt:
            reporter.finish()
            _print_error(InterruptedRun(f"{command} interrupted {reporter.where()}; {kept()}", hint="run the same command again"))
            raise typer.Exit(InterruptedRun.exit_code) from None


def _os_error_message(exc: OSError) -> str | None:
    """A disk or permission problem, said in one line (anything else keeps its traceback)."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return f"the disk is full{where}; nothing was published (a temporary directory was removed, earlier checkpoints are kept)"
    if exc.errno in (errno.EACCES, errno.EROFS):
        return f"cannot write{where}: {'read-only file system' if exc.errno == errno.EROFS else 'permission denied'}; choose a writable directory"
    if exc.errno in (errno.EISDIR, errno.ENOTDIR):
        return f"{exc.strerror}{where}"
    return None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's stop) ends training like Ctrl-C: the run says what was saved."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _metrics_table(title: str, rows: dict[str, dict[str, float]], majority: float | None = None) -> Table:
    columns = list(next(iter(rows.values())))
    table = Table(title=title)
    table.add_column("model")
    for c in columns:
        table.add_column(c, justify="right")
    for name, values in rows.items():
        table.add_row(name, *(f"{values[c]:.4f}" for c in columns))
    if majority is not None:
        table.caption = f"majority-class accuracy: {majority:.4f}"
    return table


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"tnlora {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Fine-tune Hugging Face models with tensor-network adapters."""
    fit_console(console)
    fit_console(out_console)


SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a recipe key, e.g. --set training.max_steps=50 (repeatable). "
                    "Another adapter type: replace the section, --set 'adapter={type: tera, target_modules: [q_proj, v_proj]}'.")]
UnsetOpt = Annotated[Optional[list[str]], typer.Option("--unset", help="Remove a recipe key before the --set overrides, e.g. --unset adapter.dropout (repeatable).")]


def _sample_text(i: int, sample: dict, colour: bool) -> Text:
    """A tokenized example: trained tokens bold green, masked ones dim; a class label after the text.

    Without colour (a log file, NO_COLOR) each run of trained tokens is put in [[ ]] instead.
    """
    text = Text(f"sample {i}: ")
    if sample.get("trained") is None:
        text.append("".join(sample["tokens"]))
        text.append(f"  -> label {sample['label']}", style="bold green")
        return text
    previous = False
    for token, trained in zip(sample["tokens"], sample["trained"]):
        if not colour and trained != previous:
            text.append(TRAINED_OPEN if trained else TRAINED_CLOSE)
        text.append(token, style="bold green" if trained else "dim")
        previous = bool(trained)
    if not colour and previous:
        text.append(TRAINED_CLOSE)
    return text


def _print_samples(samples: list[dict]) -> None:
    colour = out_console.color_system is not None and not out_console.no_color  # NO_COLOR: brackets too
    for i, sample in enumerate(samples):
        out_console.print(_sample_text(i, sample, colour))
    if samples and samples[0].get("trained") is not None:
        marked = "green" if colour else f"{TRAINED_OPEN}...{TRAINED_CLOSE}"
        out_console.print(f"[dim]{escape(marked)}: tokens in the loss; the rest is masked[/dim]", highlight=False)


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe, e.g. recipes/quickstart.yaml.")],
    set_: SetOpt = None,
    unset: UnsetOpt = None,
    resume: Annotated[Optional[str], typer.Option(help="'auto' (latest checkpoint in output_dir) or a checkpoint directory.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start again in an output_dir that already holds a run.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show matched modules, exact counts, a memory estimate and tokenized samples; load no weights, write nothing.")] = False,
    processes: Annotated[int, typer.Option(min=1, help="With --dry-run: estimate memory per process for this many processes (training.distributed decides what is sharded).")] = 1,
    skip_memory_check: Annotated[bool, typer.Option("--skip-memory-check", help="Train even when the dry-run memory estimate exceeds the memory available.")] = False,
) -> None:
    """Fine-tune the recipe's model with its adapter; writes adapter, metrics and plots to output_dir.

    Runs on one CPU or GPU, or data-parallel under `accelerate launch -m tnlora_cli train ...`.
    """
    from .recipe.load import load_recipe

    spec = _run(load_recipe, recipe, set_ or [], unset or [])  # before torch loads: a recipe error is refused at once
    _quiet_libraries()
    from .train import train as run_train
    from .training.launch import leave_launched_process

    if dry_run:
        from .dryrun import dry_run as run_dry

        _print_dry_run(_run(run_dry, spec, processes=processes))
        return
    with _sigterm_as_interrupt():
        result = _run(run_train, spec, resume=resume, overwrite=overwrite, reporter=RichReporter(), check_memory=not skip_memory_check)
    if result.evaluation is not None:
        _print_train_result(result)
    leave_launched_process()


def _print_train_result(result: Any) -> None:
    out_console.print(f"trainable parameters: {result.parameters['trainable']:,} of {result.parameters['total']:,}")
    warnings = (result.verdict or {}).get("warnings", [])
    table = _metrics_table(f"held-out metrics after {result.steps} steps" + (" -- WARNING: see below" if warnings else ""), result.evaluation, result.majority_rate)
    out_console.print(table)
    for line in warnings:  # a destroyed adapter is not a success: said in words, visible in a log without colour
        out_console.print(f"[bold red]WARNING:[/bold red] {escape(line)}", highlight=False)
    out_console.print(f"run written to {result.output_dir} (adapter/, metrics.jsonl, loss.png, eval.json)")


@app.command()
def prepare(
    recipe: Annotated[Optional[Path], typer.Argument(help="YAML recipe whose data section to prepare.")] = None,
    set_: SetOpt = None,
    unset: UnsetOpt = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report (counts, cache, samples with input_ids and labels) as JSON.")] = None,
    contact_sheet: Annotated[Optional[Path], typer.Option("--contact-sheet", help="image-classification: write a PNG of the first training images with their labels, as stored and (with data.augment) as augmented.")] = None,
    list_cache: Annotated[bool, typer.Option("--list-cache", help="List the data cache's entries (size, last used, data, tokenizer) instead; no RECIPE.")] = False,
    prune_cache: Annotated[bool, typer.Option("--prune-cache", help="Remove cache entries not used for --older-than days (default 30), or every entry with --all; no RECIPE.")] = False,
    older_than: Annotated[Optional[float], typer.Option("--older-than", help="With --prune-cache: days since an entry was last used (default 30).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="With --prune-cache: remove every entry not in use.")] = False,
) -> None:
    """Read, check and tokenize the recipe's data into the cache that training opens.

    Prints rows read, examples, tokens, truncated and dropped rows with reasons, the cache
    location and whether it was a hit, and two samples with the trained tokens highlighted.
    `--list-cache` and `--prune-cache` show and trim the cache ($TNLORA_DATA_CACHE, else
    ~/.cache/tnlora/data).
    """
    if list_cache or prune_cache:
        _cache_command(recipe, set_, json_out, list_cache, prune_cache, older_than, all_)
        return
    if older_than is not None or all_:
        _run(_input_error, f"{'--older-than' if older_than is not None else '--all'} goes with --prune-cache")
    if recipe is None:
        _run(_input_error, "give a RECIPE to prepare (or --list-cache / --prune-cache)")
    _refuse_output_file("--json", json_out)
    _refuse_output_file("--contact-sheet", contact_sheet)
    from .recipe.load import load_recipe

    spec = _run(load_recipe, recipe, set_ or [], unset or [])  # before torch loads: a recipe error is quick
    if contact_sheet is not None and spec.task != "image-classification":
        _run(_input_error, f"--contact-sheet shows training images: it needs an image-classification recipe (this is {spec.task})",
             "leave out --contact-sheet, or give a recipe with task: image-classification")
    _quiet_libraries()
    from .prepare import prepare_report

    reporter = RichReporter()
    outputs = [str(p) for p in (contact_sheet, json_out) if p is not None]

    def kept() -> str:
        # Cache entries, --json and --contact-sheet are published whole (run/atomic.py) or not at all.
        return "nothing half-written is left in the data cache" + (f" or at {' and '.join(outputs)}" if outputs else "")

    with _interruptible("prepare", reporter, kept):
        report = _run(prepare_report, spec, reporter=reporter, contact_sheet=contact_sheet)
        _print_prepare(report)
        if contact_sheet:
            out_console.print(f"contact sheet written to {contact_sheet}")
        if json_out:
            from .run.atomic import write_json

            _run(write_json, json_out, report)
            out_console.print(f"report written to {json_out}")


def _refuse_output_file(option: str, target: Path | None) -> None:
    """Before any work: an output file option (these replace an existing file) whose folder exists."""
    if target is not None:
        from .run.outputs import check_output_file

        _run(check_output_file, target, option, True, missing_folder_ok=False)


def _cache_command(recipe: Path | None, set_: Any, json_out: Path | None, list_cache: bool, prune_cache: bool, older_than: float | None, all_: bool) -> None:
    from .prepare import list_cache as run_list
    from .prepare import prune_cache as run_prune

    if recipe is not None or set_ or json_out is not None:
        _run(_input_error, "--list-cache and --prune-cache act on the whole cache: give no RECIPE, --set or --json")
    if list_cache and prune_cache:
        _run(_input_error, "--list-cache and --prune-cache: give one at a time")
    if list_cache and (older_than is not None or all_):
        _run(_input_error, f"{'--older-than' if older_than is not None else '--all'} goes with --prune-cache")
    if all_ and older_than is not None:
        _run(_input_error, "--all and --older-than: give one (--all removes every entry not in use)")
    if list_cache:
        root, entries = _run(run_list)
        _print_cache(root, entries)
        return
    days = None if all_ else 30.0 if older_than is None else older_than
    result = _run(run_prune, days)
    which = "every entry" if days is None else f"entries not used for {days:g} days"
    out_console.print(f"removed {len(result.removed)} cache {'entry' if len(result.removed) == 1 else 'entries'} "
                      f"({_size(result.freed)}): {which}", highlight=False)
    if result.in_use:
        out_console.print(f"kept {len(result.in_use)} in use by another process: {', '.join(e.key for e in result.in_use)}", highlight=False)
    if result.leftovers:
        out_console.print(f"removed {len(result.leftovers)} leftovers of earlier preparations (temporary entries, lock files)", highlight=False)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _print_cache(root: str, entries: list) -> None:
    import time

    if not entries:
        out_console.print(f"the data cache {root} holds no entries", highlight=False)
        return
    table = Table(title=f"data cache {root}")
    for column in ("entry", "size", "last used (UTC)", "task", "data", "tokenizer"):
        table.add_column(column, justify="right" if column == "size" else "left", no_wrap=column in ("entry", "size"))
    now = time.time()
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.last_used)) + f" ({(now - e.last_used) / 86400:.0f} d ago)"
        about = e.about
        data = ", ".join(about.get("train", [])) + (f"; eval {', '.join(about['eval'])}" if about.get("eval") else "")
        if not e.current:
            data = "(older tnlora version, or damaged: not used by this version)"
        table.add_row(e.key, _size(e.size), when, str(about.get("task", "")), data, Path(str(about.get("tokenizer", ""))).name)
    table.caption = f"{len(entries)} entries, {_size(sum(e.size for e in entries))}; tnlora prepare --prune-cache [--older-than DAYS | --all]"
    out_console.print(table)


def _print_prepare(report: dict[str, Any]) -> None:
    table = Table(title=f"prepared data ({report['task']})")
    table.add_column("")
    table.add_column("count", justify="right")
    for source, n in report["rows_read"].items():
        table.add_row(f"rows read: {source}", f"{n:,}")
    table.add_row("training examples", f"{report['train_examples']:,}")
    table.add_row("held-out examples", f"{report['eval_examples']:,}")
    image = report.get("image")
    if image:  # images: their size and classes instead of tokens
        table.add_row(f"image size (channels x height x width; {image['source']})", f"{image['channels']}x{image['height']}x{image['width']}")
        for split, counts in report.get("per_class", {}).items():
            for label, n in counts.items():
                table.add_row(f"{split} images of class {label} (before the split)" if split == "train" else f"{split} images of class {label}", f"{n:,}")
        for conversion, n in report.get("converted", {}).items():
            table.add_row(f"converted {conversion}", f"{n:,}")
    else:
        table.add_row("training tokens", f"{report['train_tokens']:,}")
        if report.get("train_trained_tokens") is not None:
            table.add_row("  of which trained (in the loss)", f"{report['train_trained_tokens']:,}")
        if report.get("train_tool_calls"):
            table.add_row("  tool calls trained", f"{report['train_tool_calls']:,}")
        table.add_row(f"truncated at {report['max_length']} tokens", f"{report['truncated']:,}")
    for reason, n in report["dropped"].items():
        table.add_row(f"dropped: {reason}", f"{n:,}")
    out_console.print(table)
    for note in report.get("notes", []):
        out_console.print(f"[dim]{note}[/dim]")
    out_console.print(f"cache {report['cache']}: {report['cache_path']}")
    _print_samples(report["samples"])


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="Run directory, checkpoint, or adapter directory.")],
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Evaluation batch size (default: the recipe's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    generate_: Annotated[bool, typer.Option("--generate", help="Instruction runs: also generate replies to the held-out prompts and score them (exact match, answer accuracy, BLEU, chrF, ROUGE-L); writes generations.jsonl and eval.json's 'generate' entry.")] = False,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="With --generate: most tokens per reply (default: the recipe's eval_generate.max_new_tokens).")] = None,
    harness: Annotated[Optional[str], typer.Option(help="lm-evaluation-harness tasks, comma-separated (e.g. hellaswag,arc_easy; needs tnlora[harness]); results go to harness.json.")] = None,
    harness_include: Annotated[Optional[Path], typer.Option(help="With --harness: a directory of local task YAML files.")] = None,
    harness_limit: Annotated[Optional[int], typer.Option(help="With --harness: at most this many examples per task.")] = None,
) -> None:
    """Held-out metrics of the tuned model and of its base (accuracy and macro-F1, or loss and perplexity)."""
    _quiet_libraries()
    from .evaluate import evaluate_run

    if generate_ and harness:
        _run(_input_error, "--generate and --harness are separate evaluations: run them one at a time")
    if generate_:
        _eval_generate(run_dir, batch_size, max_new_tokens, as_json)
        return
    if harness:
        _eval_harness(run_dir, harness, harness_include, harness_limit, batch_size, as_json)
        return

    report = _run(evaluate_run, run_dir, batch_size=batch_size, reporter=Reporter() if as_json else RichReporter())
    if as_json:
        print(json.dumps(report, indent=2))
        return
    out_console.print(_metrics_table(f"{run_dir}: {report['n_examples']} held-out examples", report["metrics"], report["majority_rate"]))
    for label, accuracy in report.get("per_class_accuracy", {}).items():
        out_console.print(f"accuracy of class {label}: " + ("no held-out image" if accuracy is None else f"{accuracy:.4f}"))
    if report.get("confusion_png"):
        out_console.print(f"confusion matrix: {report['confusion_png']}")


def _eval_generate(run_dir: Path, batch_size: Optional[int], max_new_tokens: Optional[int], as_json: bool) -> None:
    from .evaluate import evaluate_generation

    reporter = PhaseReporter() if as_json else RichReporter()
    with _interruptible("eval --generate", reporter, lambda: "generations.jsonl and eval.json were left as they were"):
        report = _run(evaluate_generation, run_dir, batch_size=batch_size, max_new_tokens=max_new_tokens, reporter=reporter)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    out_console.print(_metrics_table(f"{run_dir}: {report['n_replies']} greedy replies in {report['n_examples']} held-out examples", report["metrics"]))
    out_console.print(f"scored: {report['scored']}")
    if report["examples"]:
        table = Table(title="examples", show_lines=True)
        for column in ("prompt", "reference", "base", "tuned"):
            table.add_column(column, overflow="fold")
        for r in report["examples"]:
            # The conversation before the reply, as text; its end is the part that differs.
            prompt = r["prompt"] if len(r["prompt"]) <= 120 else "…" + r["prompt"][-120:]
            table.add_row(prompt, r["reference"], r["base"], r["tuned"])
        out_console.print(table)
    out_console.print(f"bleu and chrf are sacrebleu's (0-100); replies written to {report['generations']}, metrics to eval.json ('generate')")


def _eval_harness(run_dir: Path, tasks: str, include: Optional[Path], limit: Optional[int], batch_size: Optional[int], as_json: bool) -> None:
    from .evaluation.harness import run_harness

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    report = _run(run_harness, run_dir, names, include_path=include, limit=limit, batch_size=batch_size or 1, reporter=Reporter() if as_json else RichReporter())
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"{run_dir}: lm-evaluation-harness")
    for column in ("task", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for task, values in report["results"].items():
        for metric, value in values.items():
            table.add_row(task, metric, f"{value:.4f}")
    out_console.print(table)
    out_console.print(f"harness results written to {report['path']}")


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (its final adapter, else its latest checkpoint), a checkpoint, or an adapter directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the merged model to.")],
    dtype: Annotated[Optional[str], typer.Option(help="float32, bfloat16 or float16 (default: the base checkpoint's dtype).")] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB or 500MB.")] = "5GB",
    force: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    verify: Annotated[bool, typer.Option(help="Reload the result and compare logits with the adapter model.")] = True,
) -> None:
    """Merge the adapter into the base weights: a directory from_pretrained loads without tnlora.

    Streams safetensors shard by shard, keeps the base's dtype, unties tied weights it changes,
    verifies the result against the adapter model, and writes atomically.
    """
    _quiet_libraries()
    from .merge import merge_run

    _cleanup_on_sigterm()
    report = _run(merge_run, run_dir, out, dtype=dtype, force=force, verify=verify, max_shard_size=max_shard_size, reporter=RichReporter())
    for note in report.untied:
        out_console.print(f"untied {note}: the merged directory stores both weights and tie_word_embeddings is false")
    out_console.print(f"merged {report.merged_layers} layers into {report.dtype} weights ({report.mode}, {report.shards} shard(s)): {report.out}")
    if report.max_abs_diff is not None:
        out_console.print(
            f"verified: max |logit difference| {report.max_abs_diff:.3g}, mean {report.mean_abs_diff:.3g} (tolerance {report.tolerance:.3g})"
        )
    else:
        out_console.print("not verified (--no-verify)")
    if report.quantized_bits:
        out_console.print(
            f"note: the adapter was trained on a {report.quantized_bits}-bit base and is merged into the original "
            f"{report.dtype} weights; the {report.quantized_bits}-bit training model differs from the merged model by up to "
            f"{report.quantization_gap:.3g} in the logits (the quantization's rounding, not the merge)"
        )


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory, checkpoint, or adapter directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for adapter_config.json + adapter_model.safetensors.")],
    as_lora: Annotated[bool, typer.Option("--as-lora", help="Export the update as an ordinary LoRA (truncated SVD; the default).")] = True,
    as_peft: Annotated[bool, typer.Option("--as-peft", help="Export the adapter itself in peft's format, no SVD: LoRA and VeRA as peft's own, "
                                          "the tensor-network adapters as tnlora's peft types (load after `import tnlora_cli.peft`).")] = False,
    rank: Annotated[Optional[int], typer.Option(help="Rank of every exported layer.")] = None,
    energy: Annotated[Optional[float], typer.Option(help="Per layer, the smallest rank keeping this share of the spectrum's energy (e.g. 0.99).")] = None,
    force: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Export any adapter's update as an ordinary LoRA (truncated SVD, peft's format), or
    (--as-peft) the adapter itself as an exact peft adapter.

    peft and LoRA-serving engines load the result; the relative error of each layer is printed.
    """
    _quiet_libraries()
    from .export import export_as_lora, export_as_peft

    if as_peft:
        if rank is not None or energy is not None:
            _run(_input_error, "export --as-peft writes the adapter exactly: --rank and --energy apply to --as-lora only")
        written = _run(export_as_peft, run_dir, out, force=force)
        out_console.print(f"peft adapter written to {written}")
        return

    report = _run(export_as_lora, run_dir, out, rank=rank, energy=energy, force=force, reporter=RichReporter())
    _print_export(report.layers, out)


#: Tables longer than this show their first and last `TABLE_ENDS` rows and a summary.
TABLE_ROWS = 24
TABLE_ENDS = 5


def _print_export(layers: list[dict], out: Path) -> None:
    """The per-layer table, cut to its ends when long (every row is in tnlora_export.json), and a summary."""
    table = Table(title=f"LoRA export to {out}")
    for column in ("layer", "rank", "relative error"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    shown = layers if len(layers) <= TABLE_ROWS else layers[:TABLE_ENDS] + [None] + layers[-TABLE_ENDS:]
    for row in shown:
        if row is None:
            table.add_row(f"... {len(layers) - 2 * TABLE_ENDS} more layers (all in {out / 'tnlora_export.json'})", "", "")
        else:
            table.add_row(row["name"], str(row["rank"]), f"{row['relative_error']:.2e}")
    out_console.print(table)
    errors = sorted(row["relative_error"] for row in layers)
    ranks = [row["rank"] for row in layers]
    worst = max(layers, key=lambda row: row["relative_error"])
    out_console.print(
        f"{len(layers)} layers; rank {min(ranks)}" + (f"-{max(ranks)}" if max(ranks) != min(ranks) else "")
        + f"; relative error (Frobenius) median {errors[len(errors) // 2]:.2e}, largest {worst['relative_error']:.2e} ({worst['name']})"
    )


def _sampling(max_new_tokens: int, temperature: float, top_p: float, seed: Optional[int], batch_size: int) -> Any:
    from .generation.generator import SamplingSettings

    settings = SamplingSettings(max_new_tokens, temperature, top_p, seed, batch_size)
    return _run(settings.check)


MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="Most tokens to generate per prompt.")]
TemperatureOpt = Annotated[float, typer.Option(help="0 (default): greedy decoding; above 0: sample at this temperature.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="With sampling: keep the smallest token set holding this probability mass.")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Seed for sampling: the same seed gives the same text.")]
MergeOpt = Annotated[bool, typer.Option(help="Merge linear adapters into the weights in memory (exact, verified; fastest decoding).")]


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="Run directory, checkpoint, adapter directory, or merged model directory.")],
    prompt: Annotated[Optional[str], typer.Option(help="One prompt; the reply streams to the terminal.")] = None,
    input_: Annotated[Optional[Path], typer.Option("--input", "-i", help="JSONL file, one {\"prompt\": ...} per line (a \"reference\" is kept).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="JSONL file for the completions (default: print them).")] = None,
    force: Annotated[bool, typer.Option(help="Replace --output if it exists.")] = False,
    max_new_tokens: MaxNewOpt = 128,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch (length-sorted, left-padded).")] = 8,
    base: Annotated[bool, typer.Option("--base", help="Generate with the adapters off (the base model).")] = False,
    compare: Annotated[bool, typer.Option("--compare", help="Generate with the base and the tuned model; show them side by side.")] = False,
    raw: Annotated[bool, typer.Option("--raw", help="Give the prompt as it is, without the training prompt format.")] = False,
    merge_: MergeOpt = True,
) -> None:
    """Generate text with a tuned model: prompts are formatted as training formatted them.

    Greedy by default. Example: tnlora generate runs/smollm2-chatterbot --prompt "Do you like music?"
    """
    _quiet_libraries()
    from .generate import generate_rows
    from .generation.generator import inspect_source, load_generator
    from .generation.prompts import prompt_option, read_prompt_file
    from .run.atomic import write_jsonl
    from .run.outputs import check_output_file

    settings = _sampling(max_new_tokens, temperature, top_p, seed, batch_size)
    if (prompt is None) == (input_ is None):
        _run(_input_error, "give exactly one of --prompt TEXT or --input FILE.jsonl")
    if base and compare:
        _run(_input_error, "--base and --compare exclude each other (--compare already shows the base)")
    if output is not None:  # before the work: a refusal after generating everything would lose it
        _run(check_output_file, output, "--output", force)
    source = _run(inspect_source, run_dir)
    if (base or compare) and source.kind != "run":
        _run(_input_error, f"{run_dir} is a model directory without an adapter: --base/--compare need a run")
    rows = [_run(prompt_option, prompt)] if prompt is not None else _run(read_prompt_file, input_, source.prompt_column, source.response_column)
    reporter = RichReporter()
    def kept() -> str:
        return "no completions were written" if output is None else f"nothing was written to {output}"

    with _interruptible("generate", reporter, kept):
        gen = _run(load_generator, run_dir, merge=merge_, reporter=reporter)
        if prompt is not None and not compare:
            text = gen.encode(gen.format([{"role": "user", "content": prompt}], raw=raw))
            reporter.status("generating" + (" (base)" if base else " (tuned)" if gen.has_adapter else ""))
            completion = _run(gen.stream, text, settings, _write_stdout, adapters=not base)
            sys.stdout.write("\n")
            console.print(f"[dim]{'base model (adapters off)' if base else gen.mode}[/dim]")
            if output is not None:
                _run(write_jsonl, output, [{"prompt": prompt, "completion": completion}])
            return
        result = _run(generate_rows, gen, rows, settings, base=base, compare=compare, raw=raw, reporter=reporter)
        if output is not None:
            _run(write_jsonl, output, result.rows)
    console.print(f"[dim]tuned model: {gen.mode}" + (f", merge verified (max |logit diff| {result.merge_max_diff:.2g})" if result.merge_max_diff is not None else "") + "[/dim]")
    if compare:
        table = Table(title=f"{run_dir}: base vs tuned", show_lines=True)
        for column in ("prompt", "base", "tuned") + (("reference",) if any("reference" in r for r in result.rows) else ()):
            table.add_column(column, overflow="fold")
        for r in result.rows:
            table.add_row(r["prompt"], r["base_completion"], r["completion"], *([r.get("reference", "")] if len(table.columns) == 4 else []))
        out_console.print(table)
    if output is not None:
        console.print(f"{len(result.rows)} completions written to {output}")
    elif not compare:
        for r in result.rows:
            print(json.dumps(r, ensure_ascii=False))


@app.command()
def chat(
    run_dir: Annotated[Path, typer.Argument(help="Run directory, checkpoint, adapter directory, or merged model directory.")],
    system: Annotated[Optional[str], typer.Option(help="System prompt for the conversation.")] = None,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    base: Annotated[bool, typer.Option("--base", help="Chat with the base model (adapters off).")] = False,
    merge_: MergeOpt = True,
) -> None:
    """Talk to a tuned model, turn by turn; replies stream. /reset starts over, /exit ends.

    Reads standard input, so it also runs from a pipe: printf 'hi\\n/exit\\n' | tnlora chat RUN
    """
    _quiet_libraries()
    from .generate import chat_session
    from .generation.generator import inspect_source, load_generator

    settings = _sampling(max_new_tokens, temperature, top_p, seed, 1)
    if base and _run(inspect_source, run_dir).kind != "run":
        _run(_input_error, f"{run_dir} is a model directory without an adapter: --base needs a run")
    reporter = RichReporter()
    with _interruptible("chat", reporter, lambda: "the conversation ended (chat keeps no file)"):
        gen = _run(load_generator, run_dir, merge=merge_, reporter=reporter)
    if gen.source.task == "causal-lm":
        console.print("[yellow]note:[/yellow] a causal-lm run was trained on plain text; each turn is continued as text")

    def lines() -> Any:
        while True:
            if sys.stdin.isatty():
                sys.stdout.write("you: ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            if not line:
                return
            yield line

    reporter.status("chatting")
    with _interruptible("chat", reporter, lambda: "the conversation ended (chat keeps no file)"):
        _run(chat_session, gen, settings, lines(), _write_stdout, system=system, base=base)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _input_error(message: str, hint: str | None = None) -> None:
    from .errors import InputError

    raise InputError(message, hint=hint)


def _cleanup_on_sigterm() -> None:
    """SIGTERM unwinds like an error, so temporary output is removed (SIGKILL cannot be
    caught; the destination is still never half-written, only a hidden temp dir remains)."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@app.command("count-params")
def count_params_(
    recipe: Annotated[Optional[Path], typer.Argument(help="YAML recipe (or give --model and --set adapter...).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model: a shipped config (llama-2-7b, roberta-base, ...), minilm, or a directory.")] = None,
    task: Annotated[Optional[str], typer.Option(help="classification, image-classification, causal-lm or instruction (without a recipe: causal-lm).")] = None,
    set_: SetOpt = None,
    unset: UnsetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Exact trainable, frozen and stored parameters per module role, from the config alone.

    The base model is built on the meta device: no weights, no network.

    Example: tnlora count-params --model llama-2-7b --set adapter.type=tera
    --set adapter.target_modules=\\[q_proj,v_proj] --set adapter.indim=4096 --set adapter.outdim=8
    """  # \\[ : a literal bracket in Rich markup, which would otherwise swallow [q_proj,v_proj]
    from .recipe.load import apply_overrides, load_recipe, remove_keys, validate_recipe

    overrides = list(set_ or [])
    if model:
        overrides.append(f"model={model}")
    if task:
        overrides.append(f"task={task}")
    if recipe is not None:
        spec = _run(load_recipe, recipe, overrides, unset or [])
    else:
        if not model:
            from .model.meta import shipped_configs

            console.print(f"[bold red]error:[/bold red] give a RECIPE or --model (shipped configs: {', '.join(shipped_configs())})")
            raise typer.Exit(2)
        # Data is not read when counting; placeholders satisfy the schema.
        raw: dict[str, Any] = {"task": "causal-lm", "adapter": {}, "data": {"train": "-", "label_column": "label"}}
        _run(remove_keys, raw, unset or [])
        _run(apply_overrides, raw, overrides)
        spec = _run(validate_recipe, raw, "command line")
    _quiet_libraries()
    from .count import count_params

    report = _run(count_params, spec)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    _print_counts(report)


@app.command()
def schema(
    fmt: Annotated[str, typer.Option("--format", "-f", help="json or yaml.")] = "json",
) -> None:
    """Print the recipe's JSON Schema: every section and adapter, with descriptions, defaults and ranges.

    Point an editor's YAML language server at it for completion and checking while writing recipes.
    """
    from .recipe.schema import dump_schema

    if fmt not in ("json", "yaml"):
        console.print(f"[bold red]error:[/bold red] --format {fmt}: expected json or yaml", highlight=False)
        raise typer.Exit(2)
    sys.stdout.write(dump_schema(fmt))


def _print_dry_run(report: Any) -> None:
    table = Table(title="adapted modules")
    for column in ("role", "layers", "first", "last"):
        table.add_column(column)
    for role, names in report.modules.items():
        table.add_row(role, str(len(names)), names[0], names[-1])
    out_console.print(table)
    _print_counts(report.counts)
    memory = Table(title="memory estimate")
    memory.add_column("part")
    memory.add_column("GiB", justify="right")
    for part, value in report.memory.items():
        memory.add_row(f"[bold]{part}" if part == "total" else part, f"{value / 2**30:.3f}")
    out_console.print(memory)
    for note in report.notes:
        out_console.print(f"[dim]{note}[/dim]")
    _print_samples(report.samples)


def _print_counts(report: Any) -> None:
    table = Table(title=f"{report.adapter} on {report.model}")
    for column in ("module role", "layers", "trainable", "frozen", "stored"):
        table.add_column(column, justify="left" if column == "module role" else "right")
    for role, c in report.roles.items():
        table.add_row(role, str(c.layers) if c.layers else "-", f"{c.trainable:,}", f"{c.frozen:,}", f"{c.stored:,}")
    total = report.adapter_total
    table.add_section()
    table.add_row("[bold]adapter total", str(total.layers), f"[bold]{total.trainable:,}", f"{total.frozen:,}", f"{total.stored:,}")
    if report.head.layers:
        label = "task head (trained in full)" if report.head_is_task_head else f"trained in full: {', '.join(report.head_modules)}"
        table.add_row(label, str(report.head.layers), f"{report.head.trainable:,}", "0", f"{report.head.trainable:,}")
    out_console.print(table)
    out_console.print(f"base model: {report.base_parameters:,} parameters; adapter trainable = {report.trainable_percent:.4f}% of base + adapter")


@app.command("inspect-rank")
def inspect_rank(
    runs: Annotated[list[Path], typer.Argument(help="Run directories, checkpoints or adapter directories.")],
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG: one panel per module role, rank against layer.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write every layer's statistics as JSON.")] = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Write every layer's statistics as CSV.")] = None,
    rtol: Annotated[Optional[float], typer.Option(help="Singular values above rtol x the largest count (default: eps(fp32) x max(m, n)).")] = None,
    dense: Annotated[bool, typer.Option(help="Dense SVD of every ΔW, even where the factors give it exactly.")] = False,
) -> None:
    """Rank, effective rank and spectrum of every adapter's weight update ΔW, per layer."""
    _quiet_libraries()
    from .ranks import inspect_run, write_csv
    from .report.plots import plot_ranks

    for option, target in (("--plot", plot), ("--json", json_out), ("--csv", csv_out)):
        _refuse_output_file(option, target)

    reports = [_run(inspect_run, run, rtol=rtol, dense=dense, reporter=RichReporter()) for run in runs]
    table = Table(title="rank of ΔW per module role")
    for column in ("run", "role", "layers", "rank (min-max)", "max rank", "effective rank", "rank @99% energy", "method"):
        table.add_column(column, justify="left" if column in ("run", "role", "method") else "right")
    for report in reports:
        for role in dict.fromkeys(layer["role"] for layer in report["layers"]):
            rows = [layer for layer in report["layers"] if layer["role"] == role]
            if rows[0]["rank"] is None:
                table.add_row(report["label"], role, str(len(rows)), "nonlinear", str(rows[0]["max_rank"]), "-", "-", "nonlinear")
                continue
            ranks = [r["rank"] for r in rows]
            eff = sum(r["effective_rank"] for r in rows) / len(rows)
            r99 = sum(r["rank_99"] for r in rows) / len(rows)
            table.add_row(report["label"], role, str(len(rows)), f"{min(ranks)}-{max(ranks)}", str(rows[0]["max_rank"]), f"{eff:.1f}", f"{r99:.1f}", rows[0]["method"])
    out_console.print(table)
    if plot:
        plot_ranks(reports, plot)
        out_console.print(f"plot written to {plot}")
    if json_out:
        from .run.atomic import write_json

        write_json(json_out, reports)
    if csv_out:
        write_csv(reports, csv_out)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())

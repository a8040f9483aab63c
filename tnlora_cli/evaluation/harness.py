"""lm-evaluation-harness on a tuned model (optional extra: `pip install 'tnlora[harness]'`).

The adapted model is handed to the harness as a model object (its `HFLM` wrapper takes a
loaded `PreTrainedModel`), so nothing is downloaded or saved first; linear adapters are
merged in memory (verified) as for `tnlora generate`. Standard tasks need the network the
first time (the harness downloads their datasets); local task YAMLs (`--harness-include`)
run offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..generation.generator import load_generator
from ..report.reporter import Reporter
from ..run.atomic import write_json
from ..run.layout import find_recipe_file, resolve_adapter_dir


def _require_harness() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise InputError(
            "--harness needs lm-evaluation-harness, which is not installed",
            hint="pip install 'tnlora[harness]' (or pip install lm_eval)",
        ) from None
    return lm_eval


def run_harness(
    path: str | Path,
    tasks: list[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    chat_template: bool | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Run harness `tasks` on the tuned model of RUN; save the harness's results JSON as
    `harness.json` beside the run's recipe (or in a model directory). Returns
    {"results": {task: {metric: value}}, "path": ...}."""
    reporter = reporter or Reporter()
    lm_eval = _require_harness()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise InputError(f"--harness-include: {include_path} is not a directory", hint="give the directory that holds your task YAML files")
    manager = None
    if include_path is not None:
        # Indexing the harness's own thousands of task files takes a while: skip it when
        # the local directory holds every task asked for.
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            manager = local
    manager = manager or TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise InputError(
            f"--harness: unknown task(s) {', '.join(unknown)}",
            hint="`lm_eval ls tasks` lists the harness's tasks; local ones come from --harness-include DIR",
        )
    gen = load_generator(path, reporter=reporter)
    gen.use_tuned()
    # Instruction runs were trained on chat-formatted prompts: let the harness format its
    # prompts the same way unless told otherwise.
    if chat_template is None:
        chat_template = gen.source.task != "causal-lm" and bool(getattr(gen.tokenizer, "chat_template", None))
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    # Training tokenizes without the tokenizer's own special tokens (the chat template
    # writes them), so the harness must not add a BOS token either.
    lm = HFLM(pretrained=gen.model, tokenizer=gen.tokenizer, batch_size=batch_size, add_bos_token=False)
    reporter.status(f"running lm-evaluation-harness: {', '.join(tasks)} ({gen.mode})")
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        apply_chat_template=chat_template,
        log_samples=False,
        bootstrap_iters=0,
    )
    output = json.loads(json.dumps(output, default=handle_non_serializable))
    output["tnlora"] = {"run": str(path), "tuned_model": gen.mode, "chat_template": chat_template}
    path = Path(path)
    out_dir = find_recipe_file(resolve_adapter_dir(path)).parent if gen.has_adapter else path
    write_json(out_dir / "harness.json", output)
    summary = {
        task: {k.removesuffix(",none"): v for k, v in values.items() if isinstance(v, (int, float)) and not k.endswith("_stderr,none")}
        for task, values in output["results"].items()
    }
    return {"results": summary, "path": str(out_dir / "harness.json")}

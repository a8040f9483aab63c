"""Text generation from a run, checkpoint, adapter directory or merged model directory.

Prompts are formatted exactly as training formatted them (`data.format_prompt`). Linear
adapters are merged into the weights in memory before the tuned model generates, so decoding
runs at the base model's speed with its KV cache; the merge is verified against the adapter
path on the first prompt. A nonlinear TensorGuide branch or a quantized base keeps the
adapter path. The base model ("adapters off") is always generated before the merge.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.chat import format_prompt
from ..errors import InputError, MergeError
from ..model.inject import adapted_layers, adapters_disabled, merge_units
from ..model.loading import default_device
from ..model.merging import merge_into_base
from ..report.reporter import Reporter
from ..run.layout import ADAPTER_CONFIG, resolve_adapter_dir

GENERATIVE_TASKS = ("instruction", "causal-lm", "chat")


@dataclass(frozen=True)
class SamplingSettings:
    """How tokens are chosen. temperature 0 is greedy decoding (the default)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    batch_size: int = 8

    def check(self) -> SamplingSettings:
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens is {self.max_new_tokens}", hint="generate at least 1 token, e.g. --max-new-tokens 128")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"--temperature is {self.temperature}", hint="use 0 for greedy decoding or a positive finite value to sample")
        if not 0 < self.top_p <= 1:
            raise InputError(f"--top-p is {self.top_p}", hint="top-p is a probability mass in (0, 1]")
        if self.batch_size < 1:
            raise InputError(f"--batch-size is {self.batch_size}", hint="use 1 or more")
        return self


@dataclass
class Source:
    """What RUN points at, found without loading any weights."""

    path: Path
    kind: str  # "run" (adapter + recipe) or "model" (a plain or merged model directory)
    task: str
    recipe: Any = None
    prompt_column: str = "prompt"
    response_column: str = "response"


def inspect_source(path: str | Path) -> Source:
    """Classify RUN and refuse what cannot generate (a classification run) before loading."""
    path = Path(path)
    if (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        config = json.loads((path / "config.json").read_text())
        architectures = config.get("architectures") or []
        if architectures and not any(a.endswith(("CausalLM", "LMHeadModel")) for a in architectures):
            raise InputError(
                f"{path} holds a {architectures[0]}, not a model that generates text",
                hint="give a causal-LM model directory, or a run of an instruction / causal-lm recipe",
            )
        return Source(path, "model", "instruction")
    from ..model.build import adapter_recipe

    recipe = adapter_recipe(resolve_adapter_dir(path))  # a tnlora run, or a peft-format tnlora adapter
    if recipe.task not in GENERATIVE_TASKS:
        raise InputError(
            f"{path} is {'an' if recipe.task[0] in 'aeiou' else 'a'} {recipe.task} run: its model predicts labels, it does not generate "
            f"text (generate and chat are for language models: {', '.join(GENERATIVE_TASKS)} runs)",
            hint=f"use `tnlora eval {path}` to score it",
        )
    return Source(path, "run", recipe.task, recipe, recipe.data.prompt_column, recipe.data.response_column)


@dataclass
class Generator:
    """A model ready to generate, with the adapters it may switch off or merge."""

    model: nn.Module
    tokenizer: Any
    source: Source
    mergeable: bool
    mode: str  # how the tuned model runs: "merged in memory", "adapter path (...)", "plain model"
    merged: bool = False
    merge_max_diff: float | None = None
    eos_ids: list[int] = field(default_factory=list)
    #: The LoadedRun behind a run (its recipe, data and held-out split); None for a model directory.
    run: Any = None
    #: Where the phases of generation (the merge and its check) are reported.
    reporter: Reporter = field(default_factory=Reporter)

    @property
    def has_adapter(self) -> bool:
        return self.source.kind == "run"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --------------------------------------------------------------- prompts

    def format(self, messages: list[dict[str, str]], raw: bool = False) -> str:
        """The prompt text as training formatted it; causal-lm runs (and `raw`) continue the text as given."""
        if raw or self.source.task == "causal-lm":
            return "".join(m["content"] for m in messages)
        return format_prompt(self.tokenizer, messages)

    def encode(self, text: str) -> list[int]:
        # Training tokenizes with add_special_tokens=False: the template supplies them.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text if self.source.task == "causal-lm" else text.strip()

    @property
    def positions(self) -> tuple[int, str] | None:
        """How many positions the model has and the config key that says so (None: no limit known)."""
        config = getattr(self.model, "config", None)
        for key in ("max_position_embeddings", "n_positions"):
            limit = getattr(config, key, None)
            if isinstance(limit, int) and limit > 0:
                return limit, key
        return None

    def room_problem(self, n_prompt: int, max_new_tokens: int, where: str) -> str | None:
        """Why a prompt of `n_prompt` tokens cannot be generated from, or None when it can.
        Learned positions (GPT-2) fail with an index error past the end; rotary ones (Llama)
        run on, outside anything the model was trained for."""
        if self.positions is None:
            return None
        limit, key = self.positions
        if n_prompt + max_new_tokens <= limit:
            return None
        return (
            f"{where}: {n_prompt} prompt tokens + --max-new-tokens {max_new_tokens} = {n_prompt + max_new_tokens} "
            f"exceed the {limit} positions the model has ({key})"
        )

    def check_room(self, prompts: list[list[int]], max_new_tokens: int, where: list[str] | None = None) -> None:
        """Refuse, before anything is generated, an empty prompt or one that would run past
        the model's positions (the longest prompt is the one named)."""
        where = where or [f"prompt {i + 1}" for i in range(len(prompts))]
        for ids, name in zip(prompts, where):
            if not ids:
                raise InputError(f"{name}: the prompt is empty after formatting (0 tokens)", hint="give a prompt with text in it")
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        n = len(prompts[longest])
        problem = self.room_problem(n, max_new_tokens, where[longest])
        if problem is not None:
            limit = self.positions[0]
            hint = (
                f"lower --max-new-tokens to at most {limit - n}" if n < limit
                else f"shorten the prompt: the model has {limit} positions for the prompt and its reply together"
            )
            raise InputError(problem, hint=hint)

    # ------------------------------------------------------------ adapters

    def _prepare(self, adapters: bool, probe: list[int]) -> contextlib.AbstractContextManager:
        """Context for one generation call: adapters off, or (tuned) merged once if exact."""
        if not adapters:
            if not self.has_adapter:
                raise InputError(f"{self.source.path} is a model directory without an adapter: there is no base to compare with",
                                 hint="give the run directory to use --base or --compare")
            if self.merged:
                raise RuntimeError("the base model was asked for after the adapters were merged (generate the base first)")
            return adapters_disabled(self.model)
        if self.mergeable and not self.merged:
            self._merge(probe)
        return contextlib.nullcontext()

    def use_tuned(self, probe: list[int] | None = None) -> None:
        """Merge now (when exact), verified on `probe`: for callers that run the model
        themselves (the harness), or that report the merge as a phase of its own."""
        if self.mergeable and not self.merged:
            self._merge(probe or self.encode(self.format([{"role": "user", "content": "Hello, how are you?"}])))

    @torch.no_grad()
    def _merge(self, probe: list[int]) -> None:
        """Merge ΔW into the weights and check the logits on `probe` against the adapter path."""
        from ..model.merging import TOLERANCES, untie_in_memory

        self.reporter.status("merging the adapters into the weights in memory and checking the logits against the adapter path")
        ids = torch.tensor([probe[:64] or [self.tokenizer.eos_token_id or 0]], device=self.device)
        reference = self.model(input_ids=ids).logits.float()
        untie_in_memory(self.model)  # a tied output head must not change the embeddings
        dtype = next(layer.base_layer.weight.dtype for _, layer in merge_units(self.model))
        merge_into_base(self.model)
        self.merged = True
        logits = self.model(input_ids=ids).logits.float()
        atol, rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
        self.merge_max_diff = (logits - reference).abs().max().item()
        tolerance = atol + rtol * reference.abs().max().item()
        if not self.merge_max_diff <= tolerance:
            raise MergeError(
                f"the merged weights differ from the adapter path by up to {self.merge_max_diff:.3g} in the logits (tolerance {tolerance:.3g})",
                hint="generate with --no-merge (adapter path) or report this as a bug",
            )

    # ----------------------------------------------------------- generation

    def _generation_config(self, settings: SamplingSettings):
        from transformers import GenerationConfig

        sample = settings.temperature > 0
        return GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            do_sample=sample,
            temperature=settings.temperature if sample else None,
            top_p=settings.top_p if sample else None,
            top_k=0 if sample else None,  # only temperature and top-p shape the distribution
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def _completion_ids(self, new: list[int]) -> list[int]:
        for i, t in enumerate(new):
            if t in self.eos_ids:
                return new[:i]
        return new

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        settings: SamplingSettings,
        *,
        adapters: bool = True,
        progress: Callable[[int], None] | None = None,
        where: list[str] | None = None,
    ) -> list[str]:
        """Completions of token-id prompts, in length-sorted left-padded batches, in input order.
        Every prompt is checked against the model's positions first (`where` names them)."""
        if not prompts:
            return []
        self.check_room(prompts, settings.max_new_tokens, where)
        if settings.seed is not None:
            from transformers import set_seed

            set_seed(settings.seed)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[str] = [""] * len(prompts)
        config = self._generation_config(settings)
        pad = self.tokenizer.pad_token_id
        self.model.eval()
        with self._prepare(adapters, prompts[order[0]]):
            for start in range(0, len(order), settings.batch_size):
                idx = order[start : start + settings.batch_size]
                width = max(len(prompts[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    n = len(prompts[i])
                    ids[row, width - n :] = torch.tensor(prompts[i])
                    mask[row, width - n :] = 1
                result = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), generation_config=config)
                for row, i in enumerate(idx):
                    out[i] = self.decode(self._completion_ids(result[row, width:].tolist()))
                if progress is not None:
                    progress(min(start + settings.batch_size, len(order)))
        return out

    @torch.no_grad()
    def stream(
        self, prompt: list[int], settings: SamplingSettings, on_text: Callable[[str], None], *, adapters: bool = True, where: str = "--prompt"
    ) -> str:
        """Generate one completion, handing text to `on_text` as tokens are decoded."""
        from transformers import TextStreamer

        self.check_room([prompt], settings.max_new_tokens, [where])

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    on_text(text)

        if settings.seed is not None:
            from transformers import set_seed

            set_seed(settings.seed)
        streamer = _Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.model.eval()
        with self._prepare(adapters, prompt):
            ids = torch.tensor([prompt], device=self.device)
            result = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=self._generation_config(settings), streamer=streamer
            )
        return self.decode(self._completion_ids(result[0, len(prompt) :].tolist()))


def load_generator(
    path: str | Path, *, merge: bool = True, device: str | torch.device | None = None, reporter: Reporter | None = None, data: bool = False
) -> Generator:
    """Load RUN for generation. Linear adapters are merged on first tuned use when `merge`.
    `data` also prepares the run's data (its held-out split, for `eval --generate`); plain
    generation reads none, so it works where the training data is gone."""
    reporter = reporter or Reporter()
    source = inspect_source(path)
    if source.kind == "model":
        from transformers import AutoModelForCausalLM

        from ..model.loading import load_tokenizer

        reporter.status(f"loading the model in {path}")
        tokenizer = load_tokenizer(str(source.path))
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype="auto")
        model.to(device or default_device())
        return _finish(Generator(model, tokenizer, source, mergeable=False, mode="plain model", reporter=reporter))
    from ..model.build import load_run

    reporter.status(f"loading {path}: the tokenizer{', the data' if data else ''}, the base model {source.recipe.model} and the adapter")
    run = load_run(path, data=data, warn=reporter.status)
    run.load_weights()
    model = run.prepared.model
    if run.prepared.recipe.quantization is None:
        model.to(device or default_device())
    nonlinear = [name for name, layer in adapted_layers(model) if not layer.adapter.is_linear]
    if run.prepared.recipe.quantization is not None:
        mergeable, mode = False, f"adapter path ({run.prepared.recipe.quantization.bits}-bit base)"
    elif nonlinear:
        mergeable, mode = False, "adapter path (nonlinear adapter)"
    elif not merge:
        mergeable, mode = False, "adapter path (--no-merge)"
    else:
        mergeable, mode = True, "merged in memory"
    return _finish(Generator(model, run.prepared.tokenizer, source, mergeable=mergeable, mode=mode, run=run, reporter=reporter))


def _finish(gen: Generator) -> Generator:
    eos = {gen.tokenizer.eos_token_id}
    configured = getattr(getattr(gen.model, "generation_config", None), "eos_token_id", None)
    eos |= set(configured if isinstance(configured, list) else [configured])
    gen.eos_ids = sorted(e for e in eos if e is not None)
    gen.model.eval()
    return gen

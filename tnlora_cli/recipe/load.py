"""Reading a recipe: YAML (duplicate keys refused), `--set` overrides, unknown keys with
suggestions, pydantic types and ranges, cross-field rules, and errors that name the YAML path.
Nothing is loaded or written before a recipe has passed."""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from ..adapters.configs import CONFIGS
from ..errors import RecipeError
from .sections import Recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None, unset: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file: keys in `unset` (`--unset a.b`) are removed
    first, then `overrides` (`--set a.b=v`) applied in order."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"recipe file {path} is a directory", hint="pass the path of a YAML recipe inside it, e.g. recipes/quickstart.yaml")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist", hint="pass the path of a YAML recipe, e.g. recipes/quickstart.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}, line {line})", hint="save the recipe as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}", hint="fix the YAML syntax") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys, got {type(raw).__name__}")
    remove_keys(raw, unset or [])
    apply_overrides(raw, overrides or [])
    return validate_recipe(raw, source=str(path))


def remove_keys(raw: dict, keys: list[str]) -> None:
    """Remove `key.path` entries in place (`--unset`); a key the recipe does not have is refused,
    so a typo is never ignored."""
    for key in keys:
        parts = key.strip().split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:i]) or "the recipe"
                raise RecipeError(f"--unset {key}: {where} has no key '{part}'", hint="give the dotted path of a key the recipe sets, e.g. --unset adapter.dropout")
            if i == len(parts) - 1:
                del node[part]
            else:
                node = node[part]


def apply_overrides(raw: dict, overrides: list[str]) -> None:
    """Apply `key.path=value` overrides in place; values are parsed as YAML."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE", hint="for example --set training.max_steps=50")
        parts = key.strip().split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise RecipeError(f"--set {item!r}: {where} is not a section", hint=f"{where} holds a value; set it directly")
            node = child
        try:
            node[parts[-1]] = yaml.load(value, Loader=UniqueKeyLoader) if value != "" else None  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            if value.lstrip().startswith(("[", "{")):  # meant as a list or mapping: a typo, not a string
                raise RecipeError(f"--set {item!r}: not valid YAML ({getattr(exc, 'problem', exc)})", hint="check the brackets and commas, e.g. [q_proj,v_proj]") from None
            node[parts[-1]] = value


def validate_recipe(raw: dict, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping; raise one `RecipeError` naming the first problems."""
    _check_keys(raw, Recipe, ())
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_format_validation_error(exc, raw, source), hint="fix the value in the recipe or with --set KEY=VALUE") from None
    _check_finite(recipe.model_dump(mode="python"), ())
    _cross_checks(recipe)
    return recipe


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (a second `training:`
    section would otherwise silently replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (lines {seen[key]} and {line}); the second would replace the first", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_finite(value: Any, loc: tuple) -> None:
    """No NaN or infinity anywhere: `.inf` passes range checks like `gt=0`."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{_path(loc)}: must be a finite number (got {value})", hint="fix the value in the recipe or with --set KEY=VALUE")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, loc + (k,))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, loc + (i,))


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def _cross_checks(recipe: Recipe) -> None:
    data, training = recipe.data, recipe.training
    if recipe.task == "classification" and not data.label_column:
        raise RecipeError(
            "data.label_column: a classification task needs a label column",
            hint="set data.label_column to the column that holds each example's class",
        )
    for key, spec in (("target_modules", recipe.adapter.target_modules), ("exclude_modules", recipe.adapter.exclude_modules)):
        if isinstance(spec, str) and spec != "all-linear":
            try:
                re.compile(spec)
            except re.error as exc:
                raise RecipeError(
                    f"adapter.{key}: {spec!r} is not a valid regular expression ({exc})",
                    hint="give a list of module names, e.g. [q_proj, v_proj], or a valid regex",
                ) from None
    if data.labels is not None and len(set(data.labels)) < 2:
        raise RecipeError("data.labels: needs at least two distinct labels", hint="list the classes to keep, or remove the key")
    if data.labels is not None and len(set(data.labels)) < len(data.labels):
        # Each listed label is a class of the head: a repeat would add a class no row has.
        twice = sorted({label for label in data.labels if data.labels.count(label) > 1})
        raise RecipeError(f"data.labels: {', '.join(map(repr, twice))} listed more than once", hint="list each class once")
    if training.max_steps is not None and training.epochs is not None:
        raise RecipeError(
            "training: max_steps and epochs are both set; give exactly one",
            hint="remove training.max_steps to train for a number of epochs, or remove training.epochs",
        )
    if training.warmup_ratio is not None and training.warmup_steps > 0:
        raise RecipeError(
            "training: warmup_steps and warmup_ratio are both set; give at most one",
            hint="remove one of training.warmup_steps and training.warmup_ratio",
        )
    if training.max_steps is not None and training.warmup_steps >= training.max_steps:
        raise RecipeError(
            f"training.warmup_steps: {training.warmup_steps} warm-up steps leave no training in {training.max_steps} steps",
            hint="use fewer warm-up steps than training.max_steps",
        )


def _path(parts: tuple) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic model classes inside an annotation (Optional, Union, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _model_classes(typing.get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [c for a in typing.get_args(annotation) for c in _model_classes(a)]
    return []


def _check_keys(raw: Any, model: type[BaseModel], loc: tuple) -> None:
    """Reject unknown keys at every depth, with the nearest valid key as a suggestion."""
    if not isinstance(raw, dict):
        return
    fields = model.model_fields
    if loc == ("adapter",):
        _check_other_adapter_keys(raw, fields)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(fields)}"
            raise RecipeError(f"{_path(loc + (key,))}: unknown key", hint=hint)
        value = raw[key]
        if _wants_int(fields[key].annotation) and (isinstance(value, bool) or isinstance(value, float)):
            # pydantic would read `true` as 1 and 2.0 as 2: a whole number must be written as one.
            raise RecipeError(f"{_path(loc + (key,))}: expected a whole number, got {value!r}", hint="write an integer, e.g. 100")
    for key, value in raw.items():
        classes = _model_classes(fields[key].annotation)
        if not classes:
            continue
        if key == "adapter" and model is Recipe:
            _check_keys(value, _adapter_config_class(value, loc + (key,)), loc + (key,))
        elif len(classes) == 1:
            _check_keys(value, classes[0], loc + (key,))


def _check_other_adapter_keys(section: dict, fields: dict) -> None:
    """Keys of other adapter types: most often a recipe written for one type whose `type` was
    changed with --set. Refused (they would be settings silently dropped), all of them at once,
    with how to replace the whole section."""
    foreign = {key: [kind for kind, config in CONFIGS.items() if key in config.model_fields] for key in section if key not in fields}
    foreign = {key: kinds for key, kinds in foreign.items() if kinds}
    if not foreign:
        return
    kind = section.get("type")
    targets = section.get("target_modules", ["q_proj", "v_proj"])
    targets = "[" + ", ".join(map(str, targets)) + "]" if isinstance(targets, list) else str(targets)
    owners = sorted({k for kinds in foreign.values() for k in kinds}, key=list(CONFIGS).index)
    keys = ", ".join(f"adapter.{key}" for key in foreign)
    raise RecipeError(
        f"{keys}: unknown key{'s' if len(foreign) > 1 else ''} for adapter type {kind} (keys of {', '.join(owners)})",
        hint=f"to switch adapter type, replace the whole section: --set 'adapter={{type: {kind}, target_modules: {targets}}}' "
        f"(add {kind}'s own keys inside the braces); or remove them: " + " ".join(f"--unset adapter.{key}" for key in foreign),
    )


def _wants_int(annotation: Any) -> bool:
    """int or int | None (not bool, not a union with float)."""
    if annotation is int:
        return True
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args == [int]
    return False


def _adapter_config_class(raw: Any, loc: tuple) -> type[BaseModel]:
    if not isinstance(raw, dict):
        raise RecipeError(f"{_path(loc)}: must be a mapping with at least 'type' and 'target_modules'", hint="e.g. adapter: {type: lora, target_modules: [query, value]}")
    kind = raw.get("type")
    names = list(CONFIGS)
    if kind is None:
        raise RecipeError(f"{_path(loc + ('type',))}: missing", hint=f"set the adapter type, one of: {', '.join(names)}")
    if kind not in CONFIGS:
        close = difflib.get_close_matches(str(kind), names, n=1, cutoff=0.5)
        hint = (f"did you mean '{close[0]}'? " if close else "") + f"available adapters: {', '.join(names)}"
        raise RecipeError(f"{_path(loc + ('type',))}: unknown adapter type '{kind}'", hint=hint)
    return CONFIGS[kind]


def _format_validation_error(exc: ValidationError, raw: dict, source: str) -> str:
    """One line per offending path; union-member and discriminator noise removed."""
    messages: dict[str, list[str]] = {}
    for err in exc.errors():
        node: Any = raw
        kept: list = []
        for part in err["loc"]:
            # Keep only the parts of the location that exist in the user's YAML.
            if isinstance(node, dict) and part in node:
                kept.append(part)
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                kept.append(part)
                node = node[part]
            elif err["type"] == "missing" and isinstance(node, dict) and isinstance(part, str) and part not in CONFIGS:
                kept.append(part)
                break
        path = _path(tuple(kept))
        msg = "required key is missing" if err["type"] == "missing" else err["msg"]
        if "input" in err and err["type"] != "missing" and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r})"
        if msg not in messages.setdefault(path, []):
            messages[path].append(msg)
    lines = [f"{path}: {' or '.join(msgs)}" for path, msgs in messages.items()]
    head = f"invalid recipe {source}" if len(lines) > 1 else ""
    return (head + ":\n  " + "\n  ".join(lines)) if head else lines[0]

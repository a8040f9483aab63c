"""The package's floor plan: the public API the README shows, verbs on top and wings below,
imports that only point down, and no cycles."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tnlora_cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tnlora_cli"
VERBS = {"train", "prepare", "evaluate", "generate", "merge", "export", "ranks", "count", "dryrun"}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """Module -> the tnlora_cli modules it imports (anywhere in its body, type-only imports too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                if target in modules and target not in (name, "tnlora_cli"):
                    found.add(target)
        edges[name] = found
    return edges


def test_the_readme_python_section_imports_the_verbs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Python\n\n```python\n(.*?)```", readme, re.S).group(1)
    first = block.splitlines()[0]
    assert first == "from tnlora_cli import evaluate_run, load_recipe, merge_run, train"
    from tnlora_cli import evaluate_run, load_recipe, merge_run, train
    from tnlora_cli.evaluate import evaluate_run as evaluate_def
    from tnlora_cli.merge import merge_run as merge_def
    from tnlora_cli.recipe.load import load_recipe as load_def
    from tnlora_cli.train import train as train_def

    assert (train, evaluate_run, merge_run, load_recipe) == (train_def, evaluate_def, merge_def, load_def)
    assert callable(train) and train.__module__ == "tnlora_cli.train"
    for name in tnlora_cli.__all__:
        assert getattr(tnlora_cli, name) is not None, name
    with pytest.raises(AttributeError):
        tnlora_cli.no_such_name  # noqa: B018


def test_importing_the_package_stays_cheap():
    code = "import sys, tnlora_cli; from tnlora_cli import train; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]


def test_verbs_on_top_and_wings_below():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    wings = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert len(top) <= 14, top
    assert VERBS <= set(top)
    assert len(wings) >= 6, wings
    for wing in wings:
        assert ast.get_docstring(ast.parse((PACKAGE / wing / "__init__.py").read_text())), f"{wing}/__init__.py has no docstring"


def test_imports_point_down_and_never_cycle():
    edges = _imports()
    verbs = {f"tnlora_cli.{v}" for v in VERBS}
    for module, targets in edges.items():
        if module.count(".") > 1:  # a module in a wing
            assert not targets & (verbs | {"tnlora_cli.cli"}), f"{module} imports a verb: {targets & verbs}"
        elif module in verbs:
            assert not targets & verbs, f"the verb {module} imports another verb: {targets & verbs}"
    # no cycles: a depth-first search finds no back edge
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            assert state.get(target) != 1, "import cycle: " + " -> ".join(path + [target])
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])

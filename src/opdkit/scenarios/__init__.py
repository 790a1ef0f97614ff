"""Built-in scenarios: models and datasets built once into a cache, then loaded like any user's.

``builtin:<scenario>/<name>`` names a folder (a model) or a JSONL split inside the scenario's cache
folder, ``$OPDKIT_CACHE`` or ``~/.cache/opdkit``. The first use builds the whole scenario.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

from ..errors import OPDError, closest


def cache_root() -> Path:
    return Path(os.environ.get("OPDKIT_CACHE", Path.home() / ".cache" / "opdkit"))


SCENARIOS = ("arith", "branch", "smollm2")


def resolve_builtin(spec: str) -> Path:
    """``builtin:arith/teacher`` -> the cached folder, building the whole scenario where any of its parts is missing."""
    scenario, _, name = spec.removeprefix("builtin:").partition("/")
    if scenario not in SCENARIOS:
        raise OPDError(f"unknown built-in scenario {scenario!r}{closest(scenario, SCENARIOS)}; known: {list(SCENARIOS)}")
    module = importlib.import_module(f".{scenario}", __name__)
    if name not in module.ARTIFACTS:
        raise OPDError(f"{spec!r}: scenario {scenario!r} has no {name!r}{closest(name, module.ARTIFACTS)}; "
                       f"it provides {sorted(module.ARTIFACTS)}")
    folder = cache_root() / module.FOLDER
    # any artifact missing (a cache written before the scenario gained one, e.g. smollm2's student-20): build them all
    if not all((folder / artifact).exists() for artifact in module.ARTIFACTS.values()):
        build_atomically(module, folder)
    return folder / module.ARTIFACTS[name]


def build_atomically(module, folder: Path, **options) -> None:
    """``module.build`` (with ``options``) writes into a temporary folder that replaces ``folder`` only once
    complete, so an interrupted build never leaves a half-written scenario that later runs would load."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    module.build(tmp, **options)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)

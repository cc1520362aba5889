"""The repository's scripts (jobs/, benchmarks/, scripts/) as modules: they are files, not a package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    """Import REPO/relpath once per session under a name of its own (e.g. "script_jobs_evaluate"). The module is
    registered before it runs, as dataclasses need; scripts only define things at import time (main is guarded)."""
    name = "script_" + relpath.removesuffix(".py").replace("/", "_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / relpath)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]

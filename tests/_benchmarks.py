"""Load a script of benchmarks/ as a module, for the tests that call its functions in process.

benchmarks/ is not a package (its scripts run as ``python benchmarks/NAME.py``), so the tests import them by path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module, loaded once per process.

    The module is registered in ``sys.modules`` before it runs: dataclasses resolve their annotations through it.

    Args:
        name: the script's file name without ``.py``, e.g. ``"bench"``.

    Returns:
        The loaded module, the same object on every call.

    Raises:
        FileNotFoundError: when benchmarks/ has no such script.
    """
    module_name = f"benchmark_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = BENCHMARKS / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark script {path}")
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None  # a .py file always has a source loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module

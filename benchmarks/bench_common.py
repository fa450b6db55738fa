"""What every section of ``benchmarks/bench.py`` shares: the input files, the model variants it times, the
alternating timer, and the check that bentoml can be imported."""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from snodevit import MNIST_OVERRIDES, create_model

REPO = Path(__file__).resolve().parent.parent
DIGIT = REPO / "examples" / "digit_7.png"
MICRO = dict(MNIST_OVERRIDES, dim=24, depth=2, num_heads=2, rank=4, time_hidden_dim=16, noise_dim=4)
PREPROCESSING = {"image_size": 28, "channels": 1, "mean": [0.1307], "std": [0.3081]}
CLASS_NAMES = [str(i) for i in range(10)]
DEMO_NAME = "snodevit-mnist"
SHIPPED = REPO / "models" / "snodevit-mnist"  # the trained, calibrated model the repository ships


def time_alternating(fns: dict[str, Callable[[], Any]], *, budget_s: float, min_runs: int = 3, max_runs: int = 20,
                     sync: Callable[[], None] | None = None) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Milliseconds per call of each function, timed in alternation so drifting background load hits all alike.

    Each function is called once first (warm-up; its output is returned). A warm-up call slower than 2 s counts
    as a run too (the code paths are already warm from smaller sizes; repeating a 20 s call twice more is the
    budget of the whole section). Then rounds run until every function has ``min_runs`` runs and ``budget_s``
    seconds have passed, or ``max_runs``.

    Returns:
        ({name: [ms, ...]}, {name: warm-up output}).
    """
    sync = sync or (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    outputs: dict[str, Any] = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        outputs[name] = fn()
        sync()
        warm = time.perf_counter() - t
        if warm > 2.0:
            times[name].append(warm * 1e3)
    slowest = max((v[0] for v in times.values() if v), default=0.0) / 1e3
    runs_needed = min_runs if slowest < 2.0 else max(2, min_runs - 1)
    start = time.perf_counter()
    while True:
        n = min(len(v) for v in times.values())
        if n >= max_runs or (n >= runs_needed and time.perf_counter() - start >= budget_s):
            return times, outputs
        for name, fn in fns.items():
            if len(times[name]) > n:
                continue
            t = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t) * 1e3)


@dataclass(frozen=True)
class Variant:
    name: str  # the label in the tables
    factory: str  # create_model name
    overrides: dict[str, Any]

    def build(self) -> torch.nn.Module:
        torch.manual_seed(0)
        model = create_model(self.factory, **self.overrides).eval()
        torch.nn.init.normal_(model.head.weight)  # timing does not depend on the values; keep logits non-trivial
        return model


#: "-last": the same architecture with noise in the last block only (``noise_blocks=1``): the blocks before it are
#: an ODE run once per image, and only the last block is folded over the samples.
FULL_VARIANTS = (Variant("tiny", "tiny", dict(MNIST_OVERRIDES)),
                 Variant("tiny-last", "tiny", dict(MNIST_OVERRIDES, noise_blocks=1)),
                 Variant("small", "small", dict(MNIST_OVERRIDES)))
QUICK_VARIANTS = (Variant("micro", "tiny", MICRO), Variant("micro-last", "tiny", dict(MICRO, noise_blocks=1)))


def bentoml_missing() -> str | None:
    """Why bentoml cannot be imported here (the import error's text), or None when it can: the sections that
    start real servers need it."""
    try:
        importlib.import_module("bentoml")
    except ImportError as err:
        return str(err)
    return None

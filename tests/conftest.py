"""Pin precision "auto" to fp32 for the whole test run, here and in every server and CLI the tests start.

The tests compare answers with fp32 references (plain loops, ONNX Runtime, the service against the CLI) at
float32 tolerances; on a CPU with native bf16, "auto" would run those answers in bf16. The tests of bf16 ask for
it explicitly, and the tests of the "auto" rule patch ``cpu_has_bf16`` themselves.
"""

from __future__ import annotations

import os

import pytest

os.environ["SNODEVIT_PRECISION"] = "fp32"  # inherited by `bentoml serve` and `snodevit` subprocesses


@pytest.fixture(autouse=True)
def _auto_precision_is_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    import snodevit.inference.precision

    monkeypatch.setattr(snodevit.inference.precision, "cpu_has_bf16", lambda: False)

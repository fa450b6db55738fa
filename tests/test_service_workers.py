"""SNODEVIT_WORKERS: BentoML worker processes, each with its own model, sharing the cores without oversubscribing.

The real two-worker server (both processes answering under load at concurrency 32) is measured by
``benchmarks/scale_out.py`` (``make bench-scale``), which takes too long for ``make test`` on two cores; here: the
setting's rules and that the service declaration carries it.
"""

from __future__ import annotations

import pytest
import torch

from service.settings import DECLARED_FIELDS, ServiceSettings
from service.testing import prepare_service


def test_each_worker_gets_its_share_of_the_cores() -> None:
    cores = torch.get_num_threads()
    assert ServiceSettings().workers == 1 and ServiceSettings().threads == cores  # one worker: as before
    for workers in (1, 2, 3, 64):
        assert ServiceSettings(workers=workers).threads == max(1, cores // workers)
    assert ServiceSettings(workers=2, threads=5).threads == 5  # an explicit SNODEVIT_THREADS wins
    env = {"SNODEVIT_WORKERS": "2", "SNODEVIT_THREADS": "0"}  # 0: the default, the cores shared out
    assert ServiceSettings.from_env(env).threads == max(1, cores // 2)


def test_workers_is_declared_and_checked() -> None:
    assert "workers" in DECLARED_FIELDS  # the decorator needs it when service.service is imported
    assert ServiceSettings.from_env({"SNODEVIT_WORKERS": "3"}, only=DECLARED_FIELDS).workers == 3
    with pytest.raises(ValueError, match="SNODEVIT_WORKERS must be > 0"):
        ServiceSettings.from_env({"SNODEVIT_WORKERS": "0"})
    with pytest.raises(ValueError, match="SNODEVIT_WORKERS must be an integer"):
        ServiceSettings.from_env({"SNODEVIT_WORKERS": "two"})


def test_the_service_declaration_carries_the_workers() -> None:
    prepared = prepare_service()
    declared = prepared.module.DECLARED  # type: ignore[union-attr]
    assert prepared.service_class.config.get("workers") == declared.workers

"""Section 3b of ``benchmarks/bench.py``: Monte Carlo speed over HTTP, the shipped model (a stochastic tail: noise in
the last block only, its samples sharing the drift) against its every-block twin, in fp32 and bf16, each server
alone."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bench_common import (CLASS_NAMES, DIGIT, FULL_VARIANTS, PREPROCESSING, QUICK_VARIANTS, SHIPPED,
                          bentoml_missing)
from bench_service import without_latencies
from snodevit import create_model


#: The servers of the Monte Carlo speed section: key -> (model, SNODEVIT_PRECISION, table label). "last": the
#: shipped model (its stochastic tail); "every": the same blocks with noise in every block (the architecture it was
#: trained as) and the shipped model's calibration and gate (untrained: the weights do not change the cost).
MC_SERVERS: dict[str, tuple[str, str, str]] = {
    "every": ("every", "fp32", "noise in every block, fp32"),
    "last": ("last", "fp32", "noise in the last block, fp32"),
    "every_bf16": ("every", "bf16", "noise in every block, bf16"),
    "last_bf16": ("last", "bf16", "noise in the last block, bf16"),
}
#: (S, concurrency, measured requests, warm-up requests) of every server in the section.
MC_LEVELS = ((32, 1, 40, 4), (32, 32, 256, 32), (8, 1, 60, 5), (8, 32, 384, 32))
QUICK_MC_LEVELS = ((4, 1, 4, 1), (4, 4, 8, 4))


def _mc_models(workdir: Path, quick: bool) -> dict[str, Path]:
    """The two served architectures: the shipped model as it is, and a noise-in-the-last-block twin carrying its
    meta.json (calibration and feature-density gate included: the features have the same shape). --quick: micro
    twins with the test calibration."""
    from service.testing import CALIBRATION
    from snodevit import load_model, save_model

    if quick or not (SHIPPED / "meta.json").is_file():
        meta = {"class_names": CLASS_NAMES, "preprocessing": PREPROCESSING, "data": "mnist5k",
                "calibration": CALIBRATION}
        return {k: save_model(v.build(), workdir / f"mc-{k}", meta=meta)
                for k, v in zip(("every", "last"), QUICK_VARIANTS if quick else FULL_VARIANTS[:2])}
    model, meta = load_model(SHIPPED)
    every = {**model.cfg.to_dict(), "noise_blocks": 0, "ood_diffusion_scale": 0.0, "magnitude_input": "tokens"}
    twin = create_model("tiny", **every).eval()
    keep = {k: v for k, v in meta.items() if k not in ("weights_sha256",)}
    return {"every": save_model(twin, workdir / "mc-every", meta=keep), "last": SHIPPED}


def mc_speed_http(quick: bool, threads: int, progress: bool, workdir: Path) -> dict[str, Any]:
    """Served images/s and latency of both architectures in fp32 and bf16 at S=32 and S=8, concurrency 1 and 32.

    Each server runs alone: it is started, warmed up, measured and stopped before the next one starts, so no idle
    server shares the two cores with the one being measured.
    """
    if (err := bentoml_missing()) is not None:
        return {"skipped": f"bentoml is not importable here ({err}); the section needs it"}
    from http_load import Server, http_load

    from service.store import register_model, temporary_home

    image = DIGIT.read_bytes()
    levels = QUICK_MC_LEVELS if quick else MC_LEVELS
    servers = {k: v for k, v in MC_SERVERS.items() if not (quick and v[1] == "bf16")}
    home = workdir / "bentoml-mc"
    with temporary_home(home):
        tags = {k: str(register_model(d, name=f"snodevit-mc-{k}", labels={"stage": "bench"}))
                for k, d in _mc_models(workdir, quick).items()}
    out: dict[str, Any] = {"model": "micro twins (--quick)" if quick else "the shipped model and its every-block twin",
                           "levels": [list(lv) for lv in levels], "servers": {}}
    bar = tqdm(total=len(servers) * len(levels), desc="http, Monte Carlo speed", disable=not progress,
               dynamic_ncols=True)
    for key, (arch, precision, label) in servers.items():
        env = {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "SNODEVIT_MODEL": tags[arch],
               "SNODEVIT_TIMEOUT_S": "300", "SNODEVIT_THREADS": str(threads), "SNODEVIT_PRECISION": precision}
        server = Server(env)
        try:
            startup = server.wait_ready()
            rows = []
            for s, c, n, warm in levels:
                row = asyncio.run(http_load(server.url, image, s, c, n, warm))
                rows.append({"num_samples": s, **without_latencies(row)})
                bar.update()
        finally:
            server.stop()
        out["servers"][key] = {"label": label, "architecture": arch, "precision": precision, "startup_s": startup,
                               "rows": rows}
    bar.close()
    return out

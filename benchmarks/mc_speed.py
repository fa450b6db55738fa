"""What the Monte Carlo samples cost: the shipped model (a stochastic tail, noise in the last block only, its
samples sharing the drift) against its every-block twin (the architecture it was trained as, noise in every block),
in process and served over HTTP, in one run on one machine.

In process, through the one inference function (``LoadedModel.predict``, the gate's features included):

* images/s at B = 16, S = 32 of both models, and their ratio;
* the shipped model at B = 32: the folded S = 32 forward against one deterministic pass of the same model (zero
  noise), and ``predict`` at S = 32 against ``predict`` at S = 1;

over HTTP (``benchmarks/bench_mc.py``'s servers, each alone, fp32): images/s at S = 32 with 32 concurrent clients of
both, their ratio, and the shipped model's served rate against its in-process rate at B = 32.

Usage::

    python benchmarks/mc_speed.py --out docs/mc-speed          # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from snodevit.inference.backends import open_model  # noqa: E402
from snodevit.inference.passes import sample_in_passes  # noqa: E402
from snodevit.machine import cpu_name  # noqa: E402

from bench_common import DIGIT, SHIPPED  # noqa: E402


def _rate(fn: Any, images: int, repeats: int) -> float:
    """Images per second of ``fn()`` (which handles ``images`` images): the best of ``repeats`` timed calls."""
    fn()  # warm-up
    best = min(_timed(fn) for _ in range(repeats))
    return images / best


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def in_process(models: dict[str, Path], repeats: int) -> dict[str, Any]:
    """Images/s of ``predict`` for each model at B = 16, S = 32, and the shipped model's S = 32 / S = 1 / one
    deterministic pass at B = 32."""
    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(0)
    x16, x32 = torch.randn(16, 1, 28, 28, generator=gen), torch.randn(32, 1, 28, 28, generator=gen)
    for key, path in models.items():
        loaded = open_model(path, "torch", "cpu", "fp32")
        out[f"{key}: B=16 S=32"] = _rate(lambda: loaded.predict(x16, num_samples=32, seed=0), 16, repeats)
    shipped = open_model(models["shipped"], "torch", "cpu", "fp32")
    m = shipped.backend
    zero = torch.zeros(m.noise_shape(32)[1:])
    with torch.no_grad():
        out["shipped: B=32 deterministic pass"] = _rate(lambda: m.forward_head(m.forward_features(x32, zero)), 32,
                                                        repeats)
    noise = torch.randn(m.noise_shape(32, 32), generator=gen)
    with torch.no_grad():  # the folded Monte Carlo forward alone (gate features included), as predict runs it
        out["shipped: B=32 S=32 forward"] = _rate(lambda: sample_in_passes(m, x32, noise, features=True), 32, repeats)
    out["shipped: B=32 S=1"] = _rate(lambda: shipped.predict(x32, num_samples=1, seed=0), 32, repeats)
    out["shipped: B=32 S=32"] = _rate(lambda: shipped.predict(x32, num_samples=32, seed=0), 32, repeats)
    out["ratio shipped / every-block, B=16 S=32"] = out["shipped: B=16 S=32"] / out["every-block: B=16 S=32"]
    out["cost of the S=32 forward in deterministic passes, B=32"] = (out["shipped: B=32 deterministic pass"]
                                                                      / out["shipped: B=32 S=32 forward"])
    out["cost of predict at S=32 in predicts at S=1, B=32"] = out["shipped: B=32 S=1"] / out["shipped: B=32 S=32"]
    return out


def over_http(models: dict[str, Path], workdir: Path, requests: int) -> dict[str, Any]:
    """Served images/s at S = 32 with 32 concurrent clients, each server alone (fp32, 2 threads)."""
    from http_load import Server, http_load

    from service.store import register_model, temporary_home

    home = workdir / "bentoml"
    with temporary_home(home):
        tags = {k: str(register_model(p, name=f"snodevit-speed-{k.replace(' ', '-')}")) for k, p in models.items()}
    out: dict[str, Any] = {}
    for key, tag in tags.items():
        server = Server({"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "SNODEVIT_MODEL": tag,
                         "SNODEVIT_TIMEOUT_S": "300", "SNODEVIT_THREADS": "2", "SNODEVIT_PRECISION": "fp32"})
        try:
            server.wait_ready()
            row = asyncio.run(http_load(server.url, DIGIT.read_bytes(), 32, 32, requests, 32))
        finally:
            server.stop()
        out[f"{key}: S=32, 32 clients"] = {k: v for k, v in row.items() if k != "latencies_ms"}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for mc-speed.md and mc-speed.json")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per in-process figure (the best counts)")
    p.add_argument("--requests", type=int, default=256, help="measured requests per server")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="snodevit-mc-speed-") as tmp:
        from bench_mc import _mc_models

        twins = _mc_models(Path(tmp), quick=False)
        models = {"shipped": twins["last"], "every-block": twins["every"]}
        result: dict[str, Any] = {"in_process": in_process(models, args.repeats),
                                  "http": over_http(models, Path(tmp), args.requests)}
    http = result["http"]
    rate = {k: v["requests_per_s"] for k, v in http.items()}  # one image per request
    result["http_ratio shipped / every-block"] = rate["shipped: S=32, 32 clients"] / rate["every-block: S=32, 32 clients"]
    result["http / in-process, shipped S=32"] = rate["shipped: S=32, 32 clients"] / result["in_process"]["shipped: B=32 S=32"]
    result["setup"] = {"cpu": cpu_name(), "torch": torch.__version__, "threads": 2, "model": str(SHIPPED),
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "seconds": time.perf_counter() - started, "command": "python " + " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mc-speed.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "mc-speed.md").write_text(render(result))
    print((args.out / "mc-speed.md").read_text())
    return 0


def render(r: dict[str, Any]) -> str:
    s, ip = r["setup"], r["in_process"]
    lines = ["# What the Monte Carlo samples cost", "",
             f"{s['cpu']}, {s['threads']} threads, torch {s['torch']}, {s['date']}, {s['seconds']:.0f} s. Command:", "",
             f"    {s['command']}", "", "In process (`LoadedModel.predict`, fp32, the gate's features included):", "",
             "| figure | images/s or ratio |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" if "ratio" not in k and "cost" not in k else f"| {k} | **{v:.2f}x** |"
              for k, v in ip.items()]
    lines += ["", "Served (`bentoml serve`, one worker, fp32, S = 32, 32 concurrent clients, each server alone):", "",
              "| server | images/s | p50 latency | p99 latency |", "|---|---:|---:|---:|"]
    for k, v in r["http"].items():
        lines.append(f"| {k} | {v['requests_per_s']:.1f} | {v['p50_ms']:.0f} ms | {v['p99_ms']:.0f} ms |")
    lines += ["", f"Served shipped / every-block: **{r['http_ratio shipped / every-block']:.2f}x**; served / in-process "
              f"(shipped, S = 32): **{r['http / in-process, shipped S=32']:.2f}**.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

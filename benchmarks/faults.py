"""``make bench-faults``: each fault against the real server (and the real ``snodevit score``) ->
``docs/reliability.md`` (+ ``reliability.json``).

1. ``snodevit score`` onto a full tmpfs (then room again, ``--resume``) and onto a read-only one;
2. ``bentoml serve`` on a broken model (weights changed after registration, weights cut short, calibration gone);
3. kill -9 of the worker under load (8 clients, S = 32): recovery time, what ``/readyz`` said meanwhile;
4. SIGTERM under load (8 clients, S = 32): what happened to each request, readiness, the exit code;
5. the drain deadline (``SNODEVIT_DRAIN_S=1``, S = 256): what has not finished by then;
6. a soak: 64 closed-loop clients for 10 minutes (statuses, admitted p50/p99, RSS over time).

The shipped model (``models/snodevit-mnist``) is registered into a temporary BentoML home; nothing outside
``--out`` and a temporary folder is touched (the tmpfs mounts are removed).

Usage::

    flock /tmp/snodevit-heavy.lock make bench-faults                 # the full run (about 16 minutes)
    python benchmarks/faults.py --quick --out runs/faults-quick      # 30-second soak (about 4 minutes)
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):  # `python benchmarks/faults.py` from a checkout that is not pip-installed
    if _p not in sys.path:
        sys.path.insert(0, _p)

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from calibration.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from faults_disk import score_faults  # noqa: E402
from faults_models import FAULTS, broken_entry  # noqa: E402
from faults_report import markdown  # noqa: E402
from faults_server import broken_start, crash_recovery, drain_under_load  # noqa: E402
from faults_soak import soak  # noqa: E402
from http_load import Server  # noqa: E402
from service.store import register_model, use_home  # noqa: E402
from snodevit.data import load_dataset  # noqa: E402

DIGIT = (REPO / "examples" / "digit_7.png").read_bytes()


def _server_faults(env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """One server: ready time and its admission block, then kill -9 of its worker, then SIGTERM (which ends it)."""
    server = Server(env)
    try:
        ready_s = server.wait_ready()
        admission = httpx.get(f"{server.url}/metadata", timeout=30).json()["admission"]
        print(f"ready in {ready_s:.1f} s; admission {admission}", flush=True)
        crash = crash_recovery(server, DIGIT, clients=args.clients, num_samples=args.num_samples, load_s=3.0)
        print(f"kill -9: {crash}", flush=True)
        drain = drain_under_load(server, DIGIT, clients=args.clients, num_samples=args.num_samples, load_s=3.0)
        print(f"SIGTERM: { {k: v for k, v in drain.items() if k != 'outcomes'} }", flush=True)
    finally:
        server.stop()
    return {"ready_s": round(ready_s, 2), "admission": admission, "crash": crash, "drain": drain}


def _deadline(env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """SIGTERM with SNODEVIT_DRAIN_S=1 while requests of S = 256 run: those not done by then are answered 503."""
    server = Server({**env, "SNODEVIT_DRAIN_S": "1"})
    try:
        server.wait_ready()
        figures = drain_under_load(server, DIGIT, clients=args.clients, num_samples=256, load_s=3.0)
    finally:
        server.stop()
    print(f"deadline: { {k: v for k, v in figures.items() if k != 'outcomes'} }", flush=True)
    return figures


def _soak(env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    server = Server(env)
    try:
        server.wait_ready()
        figures = soak(server, DIGIT, concurrency=args.concurrency, duration_s=args.soak_s,
                       num_samples=args.num_samples)
    finally:
        server.stop()
    figures["exit_code_after_sigterm"] = server.proc.returncode
    print(f"soak: { {k: v for k, v in figures.items() if k not in ('memory', 'tenths')} }", flush=True)
    return figures


def _score_inputs(folder: Path, count: int) -> Path:
    images, _ = load_dataset("mnist5k").raw("test")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(images[i][0].numpy()).save(buf, "PNG")
        (folder / f"digit{i:04d}.png").write_bytes(buf.getvalue())
    return folder


def _machine() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpus": os.cpu_count(),
            "commit": commit.stdout.strip(), "python": sys.version.split()[0]}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every fault, in order; the figures as one dict."""
    t0 = time.perf_counter()
    model = args.model.resolve()
    shown = model.relative_to(REPO) if model.is_relative_to(REPO) else model
    results: dict[str, Any] = {"machine": _machine(), "quick": args.quick, "model": str(shown),
                               "clients": args.clients, "num_samples": args.num_samples}
    results["score"] = score_faults(work, args.model, _score_inputs(work / "inputs", args.score_images))
    print(f"score: {results['score']}", flush=True)
    home = use_home(work / "bentoml")
    tag = str(register_model(args.model, name="snodevit-faults", labels={"stage": "faults"}))
    env = {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "SNODEVIT_MODEL": tag}
    results["broken"] = {}
    for fault in FAULTS:
        results["broken"][fault] = broken_start({**env, "SNODEVIT_MODEL": broken_entry(tag, fault)}, DIGIT)
        print(f"broken {fault}: {results['broken'][fault]}", flush=True)
    results["server"] = _server_faults(env, args)
    results["deadline"] = _deadline(env, args)
    results["soak"] = _soak(env, args)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 30-second soak instead of 10 minutes")
    p.add_argument("--out", type=Path, default=REPO / "docs", help="where reliability.md/.json go (default docs/)")
    p.add_argument("--model", type=Path, default=REPO / "models" / "snodevit-mnist", help="the model directory")
    p.add_argument("--soak-s", type=float, default=None, help="soak seconds (default 600; 30 with --quick)")
    p.add_argument("--concurrency", type=int, default=64, help="soak clients (default 64)")
    p.add_argument("--clients", type=int, default=8, help="clients during kill -9 and SIGTERM (default 8)")
    p.add_argument("--num-samples", type=int, default=32, help="S of every request (default 32)")
    p.add_argument("--score-images", type=int, default=128, help="images scored onto the small disks")
    args = p.parse_args(argv)
    args.soak_s = args.soak_s or (30.0 if args.quick else 600.0)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="snodevit-faults-") as tmp:
        results = run(args, Path(tmp))
    atomic_write_json(args.out / "reliability.json", results)
    atomic_write_bytes(args.out / "reliability.md", markdown(results).encode())
    print(f"wrote {args.out / 'reliability.md'} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

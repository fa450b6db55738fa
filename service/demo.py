"""``python -m service.demo``: make sure the model store holds a demo model for ``bentoml serve``.

When the store (``BENTOML_HOME``) has no ``snodevit-mnist`` model, this

1. takes a trained checkpoint: with ``--pretrained DIR`` (what ``make serve`` does, with the checkpoint the repo
   ships in ``models/snodevit-mnist``) it verifies that checkpoint's weights against the SHA-256 in its meta.json
   and copies it to ``--out``; otherwise it trains one:
   ``snodevit train --variant snodevit_mnist_every_block --data mnist5k --epochs 40 --precision bf16 --out
   runs/demo-every-block`` (about 9 minutes on 2 idle CPU cores; fp32 and ~11 minutes on a CPU without native
   bf16), then ``snodevit tail --model runs/demo-every-block --out runs/demo`` (the shipped architecture, preset
   ``snodevit_mnist``, in about a minute); a finished run is reused;
2. calibrates it: ``snodevit calibrate --model runs/demo --data mnist5k --out runs/demo/calibration``;
3. exports it: ``snodevit export --model runs/demo --out runs/demo/model.onnx --attention-maps`` (a failed export
   is reported and the model is registered without it);
4. registers it as ``snodevit-mnist`` (``service.store.register_model``),

and prints what it did and how long each step took. With a model already there it only says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import bentoml
from bentoml import Tag
from bentoml.exceptions import NotFound

from calibration.files import atomic_write_bytes
from snodevit.checkpoint import CheckpointError, load_model, weights_hash
from snodevit.inference.precision import PRECISIONS, cpu_has_bf16

from .store import DEFAULT_NAME, ONNX_FILE, register_model, stored_metadata

Runner = Callable[[list[str]], int]
Step = Callable[[str, list[str]], None]  # runs one `snodevit` command, timed; exits when it fails


def _snodevit(args: list[str]) -> int:
    """Run a ``snodevit`` subcommand in this interpreter's environment, output straight to the terminal."""
    return subprocess.run([sys.executable, "-m", "snodevit.cli", *args], check=False).returncode


def trained(model_dir: Path) -> bool:
    """A finished training run: weights plus meta.json whose history covers all the configured epochs."""
    meta_path = model_dir / "meta.json"
    if not (model_dir / "model.safetensors").is_file() or not meta_path.is_file():
        return False
    training = json.loads(meta_path.read_text()).get("training") or {}
    epochs = (training.get("config") or {}).get("epochs")
    return epochs is not None and len(training.get("history") or []) >= epochs


def calibrated(model_dir: Path) -> bool:
    return bool(json.loads((model_dir / "meta.json").read_text()).get("calibration"))


def copy_pretrained(source: Path, out: Path) -> str:
    """Copy the finished checkpoint ``source`` to ``out`` after checking its weights hash; returns the hash.

    Raises:
        SystemExit: ``source`` is not a finished run, or its weights do not match the SHA-256 in its meta.json.
    """
    if not trained(source):
        raise SystemExit(f"service.demo: --pretrained {source} is not a finished training run "
                         "(needs model.safetensors, config.json and meta.json with the full history)")
    try:
        model, meta = load_model(source)
    except CheckpointError as err:
        raise SystemExit(f"service.demo: --pretrained {source}: {err}") from err
    digest = weights_hash(model)
    if digest != meta.get("weights_sha256"):
        raise SystemExit(f"service.demo: --pretrained {source}: weights hash {digest[:12]} does not match "
                         f"meta.json's {str(meta.get('weights_sha256'))[:12]}; the checkpoint was altered")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json", "meta.json"):  # meta last: `trained(out)` looks at it
        atomic_write_bytes(out / name, (source / name).read_bytes())
    return digest


def existing(name: str) -> str | None:
    """The newest stored version of ``name``, or None."""
    try:
        return str(bentoml.models.get(f"{name}:latest").tag)
    except NotFound:
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default=DEFAULT_NAME, help="model store name (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="training output folder (default: %(default)s)")
    p.add_argument("--data", default="mnist5k", help="data set to train and calibrate on (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=40, help="training epochs (default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="training precision (default: bf16 on a CPU with native bf16, else auto)")
    p.add_argument("--pretrained", type=Path, default=None, metavar="DIR",
                   help="start from this finished checkpoint (verified by its weights hash) instead of training")
    p.add_argument("--force", action="store_true", help="register a new version even when the store has one")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after --: more `snodevit train` options, e.g. -- --diffusion-scale 1.0")
    return p


def _weights(args: argparse.Namespace, step: Step, steps: list[tuple[str, float]], extra: list[str]) -> bool:
    """Step 1: a finished run in ``args.out`` (reused, copied from ``--pretrained`` or trained).

    Returns:
        Whether new weights were written to ``args.out`` (a graph already there then belongs to older ones).
    """
    out = args.out
    if trained(out):
        print(f"== train: reusing the finished run in {out}")
        return False
    if args.pretrained is not None:
        t0 = time.perf_counter()
        digest = copy_pretrained(args.pretrained, out)
        steps.append(("copy checkpoint", time.perf_counter() - t0))
        recipe = (json.loads((out / "meta.json").read_text()).get("provenance") or {}).get("command")
        print(f"== train: skipped, using the shipped checkpoint {args.pretrained} (weights {digest[:12]} verified"
              + (f"; trained by `{recipe}`" if recipe else "") + "); `make serve RETRAIN=1` trains from scratch")
    else:
        precision = args.precision or ("bf16" if cpu_has_bf16() else "auto")
        every = out.with_name(out.name + "-every-block")  # the shipped recipe: train with noise in every block,
        if not trained(every):  # then give the model its stochastic tail (snodevit.training.tail)
            step("train", ["train", "--variant", "snodevit_mnist_every_block", "--data", args.data, "--epochs",
                           str(args.epochs), "--precision", precision, "--out", str(every), *extra])
        step("tail", ["tail", "--model", str(every), "--out", str(out), "--data", args.data])
    return True


def _calibrate(out: Path, data: str, step: Step) -> bool:
    """Step 2: calibrate ``out`` unless its meta.json already is. Returns whether it ran."""
    if calibrated(out):
        print(f"== calibrate: {out}/meta.json is already calibrated")
        return False
    # S=8 keeps the first `make serve` near its 10-minute budget on 2 cores; the full S=32 report is
    # `snodevit calibrate --model runs/demo --data mnist5k --out DIR`.
    step("calibrate", ["calibrate", "--model", str(out), "--data", data, "--out", str(out / "calibration"),
                       "--num-samples", "8"])
    return True


def _export(out: Path, stale: bool, step: Step) -> Path | None:
    """Step 3: the ONNX graph of ``out`` (exported again when ``stale``); None when the export failed."""
    onnx = out / ONNX_FILE
    if onnx.is_file() and not stale:
        print(f"== export: reusing {onnx}")
        return onnx
    try:
        step("export", ["export", "--model", str(out), "--out", str(onnx), "--attention-maps"])
    except SystemExit as err:
        print(f"{err}; registering without the ONNX graph (the torch backend does not need it)")
        return None
    return onnx


def _register(out: Path, name: str, onnx: Path | None) -> Tag:
    """Step 4: register ``out`` (with its graph when it matches) in the model store."""
    try:
        return register_model(out, name=name, onnx_path=onnx, labels={"stage": "demo"})
    except ValueError as err:  # CheckpointError: e.g. a stale graph from an earlier run
        if onnx is None:
            raise
        print(f"== register: {err}; registering without the ONNX graph")
        return register_model(out, name=name, labels={"stage": "demo"})


def main(argv: Sequence[str] | None = None, runner: Runner = _snodevit) -> int:
    args = build_parser().parse_args(argv)
    extra = [a for a in args.train_args if a != "--"] if args.train_args else []
    home = os.environ.get("BENTOML_HOME", "~/bentoml")
    found = existing(args.name)
    if found and not args.force:
        print(f"model store {home} already has {found}; nothing to do (--force registers a new version)")
        return 0

    start = time.perf_counter()
    steps: list[tuple[str, float]] = []

    def step(label: str, argv_: list[str]) -> None:
        print(f"== {label}: snodevit {' '.join(argv_)}", flush=True)
        t0 = time.perf_counter()
        code = runner(argv_)
        steps.append((label, time.perf_counter() - t0))
        if code != 0:
            raise SystemExit(f"service.demo: `snodevit {' '.join(argv_)}` failed with exit code {code}")

    new_weights = _weights(args, step, steps, extra)
    ran_calibration = _calibrate(args.out, args.data, step)
    onnx = _export(args.out, ran_calibration or new_weights, step)
    t0 = time.perf_counter()
    tag = _register(args.out, args.name, onnx)
    steps.append(("register", time.perf_counter() - t0))
    md = stored_metadata(str(tag))
    print(f"== registered {tag} in {home}: weights {md['version']}, backends {', '.join(md['backends'])}, "
          f"{'calibrated' if md['calibrated'] else 'not calibrated'}")
    timing = ", ".join(f"{label} {seconds:.1f} s" for label, seconds in steps)
    print(f"done in {time.perf_counter() - start:.1f} s ({timing})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""mnist5k test accuracy at equal epochs, one backprop mode against another (``benchmarks/memory.py``).

Each model is trained and evaluated by the real command line, as a user would: ``snodevit train --variant
snodevit_mnist_every_block --data mnist5k --epochs E --seed S --backprop MODE`` then ``snodevit evaluate --split test
--num-samples 8 --seed 0 --json``. Checkpoints stay under the runs folder and are reused on a rerun.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

EVAL_SAMPLES = 8  # S of the test accuracy, as in the README's accuracy table


def train_command(mode: str, seed: int, epochs: int, out: Path, device: str) -> list[str]:
    """The `snodevit train` command of one model (the shipped architecture, fp32 so the modes compare alike)."""
    return [sys.executable, "-m", "snodevit", "train", "--variant", "snodevit_mnist_every_block", "--data", "mnist5k",
            "--epochs", str(epochs), "--seed", str(seed), "--backprop", mode, "--precision", "fp32",
            "--device", device, "--out", str(out), "--json", "--no-progress"]


def evaluate_command(out: Path, device: str) -> list[str]:
    return [sys.executable, "-m", "snodevit", "evaluate", "--model", str(out), "--data", "mnist5k", "--split",
            "test", "--num-samples", str(EVAL_SAMPLES), "--seed", "0", "--device", device, "--json"]


def _run_json(cmd: list[str]) -> dict[str, Any]:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_and_evaluate(mode: str, seed: int, epochs: int, runs: Path, device: str,
                       retrain: bool = False) -> dict[str, Any]:
    """Train (unless a finished checkpoint of the same recipe is there) and evaluate one model."""
    out = runs / f"acc-{mode}-e{epochs}-s{seed}"
    figures_file = out / "train_figures.json"
    if retrain or not figures_file.exists():
        start = time.perf_counter()
        figures = _run_json(train_command(mode, seed, epochs, out, device))
        figures["wall_seconds"] = time.perf_counter() - start
        figures_file.write_text(json.dumps(figures))
    train = json.loads(figures_file.read_text())
    evaluation = _run_json(evaluate_command(out, device))
    return {"mode": mode, "seed": seed, "epochs": epochs, "model": str(out),
            "test_accuracy": evaluation["accuracy"], "test_nll": evaluation["nll"],
            "train_seconds": train["train_seconds"], "final_val_accuracy": train["final_val_accuracy"]}


def accuracy_rows(modes: tuple[str, ...], seeds: tuple[int, ...], epochs: int, runs: Path, device: str,
                  retrain: bool = False, jobs: int = 1) -> list[dict[str, Any]]:
    """One row per (mode, seed), seeds outer so an interrupted run has whole pairs.

    ``jobs`` > 1 trains that many models at once (each a `snodevit train` process): worth it on a GPU, where one
    small model leaves the device mostly idle; on a CPU the processes only share the cores.
    """
    runs.mkdir(parents=True, exist_ok=True)
    pairs = [(mode, seed) for seed in seeds for mode in modes]

    def one(pair: tuple[str, int]) -> dict[str, Any]:
        row = train_and_evaluate(pair[0], pair[1], epochs, runs, device, retrain)
        print(f"  {row['mode']:10s} seed {row['seed']}: test accuracy {row['test_accuracy']:.4f} "
              f"({row['train_seconds']:.0f} s of training)", flush=True)
        return row

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, pairs))

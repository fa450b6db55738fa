"""Training under torchrun: real ``torchrun --nproc_per_node 2`` jobs on loopback with gloo, no mocks.

* The DDP gradient of two ranks, each on half of a global batch, equals the single-process gradient of the whole
  batch (float64, a deterministic model), with ``--backprop checkpoint`` and ``reversible`` too (their blocks'
  parameter gradients reach DDP's all-reduce), and the DistributedSampler gives the ranks disjoint shares that change
  with ``set_epoch`` (``tests/_ddp_worker.py``).
* ``torchrun ... -m snodevit train`` trains: the loss falls, rank 0 alone prints and saves, the provenance records
  the world size.
* Without torchrun nothing changes (the variables are read, no process group starts).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from snodevit.data.sets import load_dataset
from snodevit.training import distributed

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    return subprocess.run([*TORCHRUN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_ddp_gradient_equals_the_single_process_gradient_of_the_global_batch() -> None:
    done = _torchrun(str(ROOT / "tests" / "_ddp_worker.py"))
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["world_size"] == 2
    assert figures["params_with_grad"] == figures["params"]  # every parameter took part in the all-reduce
    assert figures["grad_max_abs"] > 1e-3  # a gradient worth comparing
    assert figures["grad_max_abs_diff"] < 1e-12
    for mode, (diff, scale) in figures["backprop_modes"].items():  # checkpointed and BDIA blocks under DDP too
        assert scale > 1e-3 and diff < 1e-12, (mode, diff, scale)
    assert figures["rank_batch"] == 4  # the global batch of 8 split over two ranks
    for ranks in figures["epochs"]:  # 20 items, 2 ranks, batches of 4, the last partial batch dropped
        assert all(len(share) == 8 for share in ranks)
        assert len(set(ranks[0]) | set(ranks[1])) == 16
    assert figures["epochs"][0] != figures["epochs"][1]  # set_epoch reshuffles
    assert figures["sum"] == [3.0] and figures["count"] == 6  # (1 + 2) and (3 + 3) over the ranks


def test_torchrun_trains_with_rank_0_alone_printing_and_saving(tmp_path: Path) -> None:
    images, labels = load_dataset("mnist5k").raw("train")  # uint8 (N, 1, 28, 28)
    per_class = {c: 0 for c in range(10)}
    for image, label in zip(images, labels):
        c = int(label)
        if per_class[c] < 6:
            (tmp_path / "data" / str(c)).mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.fromarray(image[0].numpy()).save(buf, "PNG")
            (tmp_path / "data" / str(c) / f"{per_class[c]}.png").write_bytes(buf.getvalue())
            per_class[c] += 1
        if min(per_class.values()) == 6:
            break
    out = tmp_path / "model"
    done = _torchrun("-m", "snodevit", "train", "--data", f"imagefolder:{tmp_path / 'data'}", "--image-size", "28",
                     "--variant", "snodevit_mnist", "--epochs", "10", "--batch-size", "8", "--lr", "3e-3",
                     "--device", "cpu", "--no-progress", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("training snodevit_mnist") == 1  # rank 0 alone prints
    assert done.stderr.count("epoch   1") == 1
    meta = json.loads((out / "meta.json").read_text())
    assert meta["provenance"]["world_size"] == 2 and meta["provenance"]["launcher"] == "torchrun"
    history = meta["training"]["history"]
    assert len(history) == 10
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_the_torchrun_variables_are_read_all_or_none() -> None:
    assert distributed.from_env({}) is None
    job = distributed.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert job == distributed.Distributed(rank=3, local_rank=1, world_size=4) and not job.is_main
    with pytest.raises(ValueError, match="start distributed training with torchrun"):
        distributed.from_env({"RANK": "0"})
    with pytest.raises(ValueError, match="incoherent"):
        distributed.from_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert distributed.rank_batch(64, None) == 64 and distributed.rank_batch(64, job) == 16
    with pytest.raises(ValueError, match="multiple of the 4 processes"):
        distributed.rank_batch(30, job)
    assert distributed.rank_seed(7, None) == distributed.rank_seed(7, distributed.Distributed(0, 0, 2)) == 7

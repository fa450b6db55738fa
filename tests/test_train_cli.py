"""Training, checkpoints and the CLI around them, on small data the tests write."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.optim.swa_utils import AveragedModel

from snodevit import MNIST_OVERRIDES, CheckpointError, create_model, load_model, save_model
from snodevit.cli.main import build_parser, main
from snodevit.data.sets import load_dataset
from snodevit.training.train import TrainConfig, cpu_has_bf16, ema_multi_avg_fn, train_model

TINY = dict(dim=24, depth=2, num_heads=2, rank=4, time_hidden_dim=16, noise_dim=4)


def _write_folder(root: Path, n_per_class: int = 12) -> Path:
    """Three easily separable classes of 16x16 RGB images: bright left half, bright right half, dark."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["left", "right", "dark"]):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            img = rng.integers(0, 40, size=(16, 16, 3), dtype=np.uint8)
            if c == 0:
                img[:, :8] += 200
            elif c == 1:
                img[:, 8:] += 200
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def test_a_few_training_steps_lower_the_loss_on_an_image_folder(tmp_path: Path) -> None:
    bundle = load_dataset(f"imagefolder:{_write_folder(tmp_path / 'data')}", image_size=16, augment="light")
    assert bundle.class_names == ["dark", "left", "right"]
    torch.manual_seed(0)
    model = create_model("tiny", image_size=16, in_channels=3, patch_size=4, num_classes=3, stem="conv", **TINY)
    tc = TrainConfig(epochs=12, batch_size=8, lr=3e-3, warmup_epochs=1, num_workers=0)
    result = train_model(model, bundle.train, bundle.calibration, tc, out_dir=tmp_path / "m", progress=False)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0] - 0.2, losses
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert not list((tmp_path / "m").glob("*.tmp")), "temporary files left behind"


def test_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = create_model("tiny", **MNIST_OVERRIDES, **TINY).eval()
    torch.nn.init.normal_(m.head.weight)
    save_model(m, tmp_path, {"class_names": list("0123456789")})
    m2, meta = load_model(tmp_path)
    x = torch.randn(2, 1, 28, 28)
    noise = torch.randn(m.noise_shape(2, 3))
    assert torch.equal(m.sample_logits(x, noise=noise), m2.sample_logits(x, noise=noise))
    assert meta["class_names"] == list("0123456789") and len(meta["weights_sha256"]) == 64
    assert m2.cfg == m.cfg
    # No pickle anywhere: the weights file is safetensors (8-byte header length + JSON header).
    raw = (tmp_path / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8:8 + header_len])


def test_broken_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(tmp_path)


def test_cli_bad_data_gives_a_message_and_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--data", "mnist6k", "--out", str(tmp_path / "m"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "mnist6k" in err and "Traceback" not in err
    code = main(["train", "--data", f"imagefolder:{tmp_path / 'missing'}", "--out", str(tmp_path / "m")])
    assert code == 2 and "missing" in capsys.readouterr().err
    code = main(["train", "--data", "digits", "--noise-blocks", "7", "--out", str(tmp_path / "m"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "noise_blocks" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_bf16_training_on_the_cpu_or_a_clear_error(tmp_path: Path) -> None:
    """precision='bf16' autocasts on CPUs with native bf16 (and still learns); elsewhere it names the problem."""
    bundle = load_dataset(f"imagefolder:{_write_folder(tmp_path / 'data')}", image_size=16)
    torch.manual_seed(0)
    model = create_model("tiny", image_size=16, in_channels=3, patch_size=4, num_classes=3, stem="conv", **TINY)
    tc = TrainConfig(epochs=8, batch_size=8, lr=3e-3, warmup_epochs=1, num_workers=0, precision="bf16")
    if not cpu_has_bf16():
        with pytest.raises(ValueError, match="native bf16"):
            train_model(model, bundle.train, bundle.calibration, tc, progress=False)
        return
    result = train_model(model, bundle.train, bundle.calibration, tc, progress=False)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0] - 0.2, losses
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay fp32
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")


def test_cli_train_then_evaluate_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _write_folder(tmp_path / "data", n_per_class=10)
    out = tmp_path / "model"
    code = main(["train", "--data", f"imagefolder:{data}", "--image-size", "16", "--out", str(out), "--epochs", "2",
                 "--batch-size", "8", "--noise-dim", "4", "--noise-blocks", "1", "--json"])
    assert code == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["config"]["image_size"] == 16 and figures["best_epoch"] >= 1
    assert figures["config"]["noise_blocks"] == 1
    assert figures["config"]["num_steps"] == 2  # plain tiny: no field rewritten behind the flags (the preset has 1)
    # The checkpoint says how it was made: the full command, defaults spelled out, re-parsable to the same run.
    made = json.loads((out / "meta.json").read_text())["provenance"]
    argv = shlex.split(made["command"])
    assert argv[:2] == ["snodevit", "train"] and made["torch"] == torch.__version__ and made["device"] == "cpu"
    again = build_parser().parse_args(argv[1:])
    assert (again.epochs, again.batch_size, again.noise_dim, again.image_size, again.out, again.variant) == \
        (2, 8, 4, 16, out, "tiny")
    code = main(["evaluate", "--model", str(out), "--data", f"imagefolder:{data}", "--split", "test",
                 "--num-samples", "3", "--json"])
    assert code == 0
    ev = json.loads(capsys.readouterr().out)
    assert 0.0 <= ev["accuracy"] <= 1.0 and ev["images"] == 3 and ev["nll"] > 0
    assert ev["mean_epistemic_uncertainty"] >= 0


def test_cli_info_prints_parameter_counts(capsys: pytest.CaptureFixture) -> None:
    assert main(["info", "tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert 0.9e6 < info["inputs"]["224px RGB, patch 16"]["parameters"] < 1.5e6


def test_ema_average_matches_a_plain_loop() -> None:
    """AveragedModel with ema_multi_avg_fn equals a hand-written EMA with timm's warm-up of the decay."""
    torch.manual_seed(0)
    live = torch.nn.Linear(3, 2)
    ema = AveragedModel(live, multi_avg_fn=ema_multi_avg_fn(0.9))
    expected = [p.detach().clone() for p in live.parameters()]
    for n in range(30):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn_like(p))
        ema.update_parameters(live)
        if n == 0:  # the first update copies the weights
            expected = [p.detach().clone() for p in live.parameters()]
        else:
            d = min(0.9, (1 + n) / (10 + n))
            expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, live.parameters())]
    for e, a in zip(expected, ema.module.parameters()):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_ema_training_saves_and_leaves_the_averaged_weights(tmp_path: Path) -> None:
    bundle = load_dataset(f"imagefolder:{_write_folder(tmp_path / 'data')}", image_size=16)

    def run(ema_decay: float, out: Path) -> torch.nn.Module:
        torch.manual_seed(0)
        model = create_model("tiny", image_size=16, in_channels=3, patch_size=4, num_classes=3, stem="conv", **TINY)
        tc = TrainConfig(epochs=3, batch_size=8, lr=3e-3, warmup_epochs=1, num_workers=0, ema_decay=ema_decay)
        train_model(model, bundle.train, bundle.calibration, tc, out_dir=out, progress=False)
        return model

    plain, averaged = run(0.0, tmp_path / "plain"), run(0.9, tmp_path / "ema")
    saved, meta = load_model(tmp_path / "ema")
    assert meta["training"]["config"]["ema_decay"] == 0.9
    for (name, a), b in zip(averaged.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b), name  # the model trained in place holds what was saved
    w_plain, w_ema = plain.head.weight.detach(), averaged.head.weight.detach()
    assert not torch.allclose(w_plain, w_ema), "the average should differ from the last weights"
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)

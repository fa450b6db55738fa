"""SDE-Net-style data-dependent diffusion: config, forward/backward, the BCE term, training, export, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Subset

from snodevit import MNIST_OVERRIDES, SNodeViT, SNodeViTConfig, create_model, load_model, predict
from snodevit.cli.main import main
from snodevit.data.sets import load_dataset
from snodevit.training.train import OOD_NOISE_SCALES, TrainConfig, ood_perturb, shuffle_cells, train_model

SMALL = dict(MNIST_OVERRIDES, dim=24, depth=2, num_heads=2, rank=4, time_hidden_dim=16, noise_dim=4, num_steps=1)


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Micro models train several times faster on one thread than on two busy ones (no spinning workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(scale: float = 5.0, **kw: Any) -> SNodeViT:
    torch.manual_seed(0)
    m = create_model("tiny", **{**SMALL, "ood_diffusion_scale": scale, **kw})
    torch.nn.init.normal_(m.head.weight)  # the head starts at zero; give the tests non-trivial logits
    return m


def _images(b: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- config
def test_default_off_keeps_the_model_and_old_checkpoints_unchanged(tmp_path: Path) -> None:
    plain = create_model("tiny", **SMALL)
    assert plain.diffusion_head is None and not plain.cfg.ood_diffusion
    assert not any("diffusion_head" in k for k in plain.state_dict())
    # a config written before the field existed still loads, with the feature off
    old = {k: v for k, v in plain.cfg.to_dict().items() if k != "ood_diffusion_scale"}
    assert SNodeViTConfig.from_dict(old).ood_diffusion_scale == 0.0
    with_head = _model()
    assert {k for k in with_head.state_dict() if "diffusion_head" in k} == {
        "diffusion_head.token_mlp.0.weight", "diffusion_head.token_mlp.0.bias", "diffusion_head.token_mlp.1.weight",
        "diffusion_head.token_mlp.1.bias", "diffusion_head.out.weight", "diffusion_head.out.bias"}


@pytest.mark.parametrize("overrides, message", [
    (dict(ood_diffusion_scale=-1.0), "ood_diffusion_scale must be a finite number >= 0"),
    (dict(ood_diffusion_scale=float("nan")), "ood_diffusion_scale must be a finite number >= 0"),
    (dict(ood_diffusion_scale=2.0, noise_dim=0), "needs noise_dim > 0"),
])
def test_bad_config_is_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model("tiny", **{**SMALL, **overrides})


@pytest.mark.parametrize("kw, message", [
    (dict(ood_diffusion_weight=-0.5), "ood_diffusion_weight"),
    (dict(ood_diffusion_weight=float("inf")), "ood_diffusion_weight"),
    (dict(ood_noise_std=0.0), "ood_noise_std"),
    (dict(ood_shuffle_grid=1), "ood_shuffle_grid"),
    (dict(ood_shuffle_grid=-2), "ood_shuffle_grid"),
])
def test_bad_train_config_is_refused(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)


# ----------------------------------------------------------------------------------------------- forward
def test_the_magnitude_scales_the_noise_of_every_block() -> None:
    """Reference: the same weights without the head, fed the noise multiplied by scale * c(x) by hand."""
    m = _model(scale=5.0).eval()
    with torch.no_grad():
        m.diffusion_head.out.weight.normal_(std=2.0)  # make c(x) differ between images
        m.diffusion_head.out.bias.zero_()
    plain = SNodeViT(m.cfg.replace(ood_diffusion_scale=0.0)).eval()
    missing = plain.load_state_dict(m.state_dict(), strict=False)
    assert missing.missing_keys == [] and all(k.startswith("diffusion_head") for k in missing.unexpected_keys)
    x = _images(3)
    noise = torch.randn(m.noise_shape(3, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        c = torch.sigmoid(m.diffusion_head(m.embed(x)))  # (B,)
        assert float(c.max() - c.min()) > 1e-3
        got = m.sample_logits(x, noise=noise)
        ref = plain.sample_logits(x, noise=noise * (5.0 * c).view(1, 3, 1, 1, 1, 1))
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        # the single-sample path applies the same magnitude
        torch.testing.assert_close(m(x, noise[0]), got[0], rtol=0, atol=1e-5)
        # zero noise is still the deterministic ODE path, whatever the magnitude
        zero = torch.zeros_like(noise)
        torch.testing.assert_close(m.sample_logits(x, noise=zero), plain.sample_logits(x, noise=zero), rtol=0, atol=0)


def test_forward_backward_reaches_every_parameter_and_the_bce_only_the_head() -> None:
    m = _model().train()
    x, y = _images(6), torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(0))
    logits, reg = m.forward_train(x, generator=torch.Generator().manual_seed(0))
    assert logits.shape == (6, 10) and torch.isfinite(logits).all()
    perturbed = ood_perturb(x, 2.0, torch.Generator().manual_seed(1))
    bce = m.ood_diffusion_loss(x, perturbed)
    assert torch.isfinite(bce) and bce > 0
    bce.backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(n.startswith("diffusion_head.") for n in with_grad)  # tokens are detached
    m.zero_grad()
    (torch.nn.functional.cross_entropy(logits, y) + reg + m.ood_diffusion_loss(x, perturbed)).backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert no_grad == []


def test_the_bce_pass_leaves_the_batch_norm_statistics_alone() -> None:
    m = _model().train()
    before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    x = _images(8)
    m.ood_diffusion_loss(x, x + 5.0)
    after = {k: v for k, v in m.state_dict().items() if "running" in k}
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    assert m.stem.training  # the stem's mode is restored
    with pytest.raises(ValueError, match="ood_diffusion_scale > 0"):
        create_model("tiny", **SMALL).ood_diffusion_loss(x, x)


def test_ood_perturb_adds_noise_at_each_scale() -> None:
    x = torch.zeros(10, 1, 28, 28)
    a = ood_perturb(x, 2.0, torch.Generator().manual_seed(0))
    b = ood_perturb(x, 2.0, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    chunks = a.chunk(len(OOD_NOISE_SCALES))
    # the coarsest scale is one offset per image, the finest one value per pixel
    assert float(chunks[0].flatten(1).std(dim=1).max()) < 1e-5 and float(chunks[0].abs().min()) > 0
    assert float(chunks[-1].std()) == pytest.approx(2.0, rel=0.15)
    for chunk in chunks[1:]:
        assert float(chunk.flatten(1).std(dim=1).min()) > 0.3


# ----------------------------------------------------------------------------------------------- training
def test_a_short_run_lowers_the_bce_and_separates_clean_from_perturbed(tmp_path: Path) -> None:
    bundle = load_dataset("mnist5k", augment="light")
    torch.manual_seed(0)
    m = _model(scale=10.0)
    tc = TrainConfig(epochs=3, batch_size=16, lr=1e-2, warmup_epochs=0.5, num_workers=0, ood_diffusion_weight=1.0)
    result = train_model(m, Subset(bundle.train, range(160)), Subset(bundle.calibration, range(32)), tc,
                         out_dir=tmp_path / "m", progress=False)
    bces = [row["train_ood_bce"] for row in result.history]
    assert bces[-1] < 0.7 * bces[0], bces
    loaded, meta = load_model(tmp_path / "m")
    assert loaded.cfg.ood_diffusion_scale == 10.0 and meta["training"]["config"]["ood_diffusion_weight"] == 1.0
    images = torch.stack([bundle.test[i][0] for i in range(64)])
    with torch.no_grad():
        clean = loaded.diffusion_magnitude(loaded.embed(images))
        noisy = loaded.diffusion_magnitude(loaded.embed(ood_perturb(images, 2.0, torch.Generator().manual_seed(3))))
    assert float(clean.mean()) < float(noisy.mean())
    pred_clean = predict(loaded, images, num_samples=4, seed=0)
    assert torch.isfinite(pred_clean.summary.epistemic).all()


def test_weight_without_a_head_is_refused() -> None:
    bundle = load_dataset("mnist5k")
    with pytest.raises(ValueError, match="ood_diffusion_scale > 0"):
        train_model(create_model("tiny", **SMALL), Subset(bundle.train, range(32)), Subset(bundle.train, range(8)),
                    TrainConfig(epochs=1, batch_size=16, num_workers=0, ood_diffusion_weight=1.0), progress=False)


def test_divergence_is_reported() -> None:
    bundle = load_dataset("mnist5k")
    model = create_model("tiny", **SMALL)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="diverged at epoch 1"):
        train_model(model, Subset(bundle.train, range(32)), Subset(bundle.train, range(8)),
                    TrainConfig(epochs=1, batch_size=16, num_workers=0), progress=False)


# ----------------------------------------------------------------------------------------------- export, CLI
def test_export_parity_holds_with_the_magnitude_head(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from export import OnnxPredictor, check_parity, export_onnx

    m = _model(scale=5.0).eval()
    with torch.no_grad():
        m.diffusion_head.out.weight.normal_(std=2.0)
        m.diffusion_head.out.bias.zero_()
    meta = {"class_names": [str(i) for i in range(10)],
            "preprocessing": {"image_size": 28, "channels": 1, "mean": [0.1307], "std": [0.3081]}}
    path = export_onnx(m, tmp_path / "model.onnx", meta=meta)
    pred = OnnxPredictor(path, device="cpu", intra_op_threads=1)
    assert check_parity(m, pred, batch_size=3, num_samples=4) <= 1e-4
    x = _images(2)
    torch.testing.assert_close(predict(pred, x, num_samples=3, seed=5).logits,
                               predict(m, x, num_samples=3, seed=5).logits, rtol=0, atol=1e-4)


def test_cli_trains_with_the_sde_net_term(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for c, name in enumerate(["a", "b"]):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(10):
            img = rng.integers(0, 40, size=(16, 16), dtype=np.uint8)
            img[:, c * 8:(c + 1) * 8] += 200
            Image.fromarray(img).save(tmp_path / "data" / name / f"{i}.png")
    out = tmp_path / "model"
    code = main(["train", "--data", f"imagefolder:{tmp_path / 'data'}", "--image-size", "16", "--out", str(out),
                 "--epochs", "1", "--batch-size", "8", "--noise-dim", "4", "--ood-diffusion-weight", "0.5", "--json"])
    assert code == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["config"]["ood_diffusion_scale"] == 20.0 and figures["train_config"]["ood_diffusion_weight"] == 0.5
    assert json.loads((out / "config.json").read_text())["ood_diffusion_scale"] == 20.0
    code = main(["train", "--data", f"imagefolder:{tmp_path / 'data'}", "--image-size", "16", "--out", str(out),
                 "--epochs", "1", "--ood-diffusion-weight", "-1"])
    assert code == 2 and "ood_diffusion_weight" in capsys.readouterr().err


def test_shuffle_cells_permutes_whole_cells_per_image() -> None:
    """Reference: a plain loop that finds, for every output cell, the input cell it equals."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 2, 30, 29, generator=g)  # sides not multiples of the grid: the remainder stays in place
    y = shuffle_cells(x, 4, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and not torch.equal(x, y)
    torch.testing.assert_close(y[..., 28:, :], x[..., 28:, :], rtol=0, atol=0)
    torch.testing.assert_close(y[..., :, 28:], x[..., :, 28:], rtol=0, atol=0)
    orders = []
    for b in range(4):
        cells = [x[b, :, 7 * i:7 * i + 7, 7 * j:7 * j + 7] for i in range(4) for j in range(4)]
        order = []
        for i in range(4):
            for j in range(4):
                out = y[b, :, 7 * i:7 * i + 7, 7 * j:7 * j + 7]
                order.append(next(k for k, c in enumerate(cells) if torch.equal(c, out)))
        assert sorted(order) == list(range(16))  # a permutation: every cell once
        orders.append(order)
    assert len({tuple(o) for o in orders}) > 1  # each image its own order
    assert torch.equal(y, shuffle_cells(x, 4, torch.Generator().manual_seed(1)))  # seeded
    with pytest.raises(ValueError, match="grid"):
        shuffle_cells(x, 1)


def test_ood_perturb_adds_a_shuffled_chunk_on_request() -> None:
    x = torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    plain = ood_perturb(x, 2.0, torch.Generator().manual_seed(0))
    mixed = ood_perturb(x, 2.0, torch.Generator().manual_seed(0), shuffle_grid=4)
    chunks = x.chunk(len(OOD_NOISE_SCALES) + 1)
    last = mixed[-chunks[-1].shape[0]:]
    # the shuffled chunk keeps each image's pixels (no noise), in another arrangement
    for a, b in zip(last, chunks[-1]):
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values) and not torch.equal(a, b)
    assert mixed.shape == plain.shape == x.shape

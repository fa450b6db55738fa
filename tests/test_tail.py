"""The stochastic tail: the one-Euler-step shortcut of ``sample_logits`` against the plain per-sample path, the
feature-reading magnitude head, building a tail model from a trained one, fitting it, and `snodevit tail`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from snodevit.checkpoint import load_model, save_model
from snodevit.cli.main import main
from snodevit.config import MNIST_OVERRIDES, SNodeViTConfig, get_config
from snodevit.model import SNodeViT, create_model
from snodevit.training.tail import TailConfig, stochastic_tail_of, synthetic_outliers, train_stochastic_tail

MICRO = dict(dim=24, depth=3, num_heads=2, rank=4, time_hidden_dim=16, time_embed_dim=8, noise_dim=4, num_steps=1)


def _tail_model(seed: int = 0) -> SNodeViT:
    torch.manual_seed(seed)
    m = create_model("tiny", **MNIST_OVERRIDES, **MICRO, noise_blocks=1, ood_diffusion_scale=4.0,
                     magnitude_input="features").double().eval()
    with torch.no_grad():  # a head that reads its input and a classifier that is not all zeros
        torch.nn.init.normal_(m.head.weight)
        torch.nn.init.normal_(m.diffusion_head.net[-1].weight, std=0.1)
        m.diffusion_head.net[-1].bias.fill_(0.0)
    return m


def test_shared_euler_step_equals_the_per_sample_path() -> None:
    m = _tail_model()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    noise = m.draw_noise(3, 5, torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, attn, feats = m.sample_logits(x, noise=noise, return_attention=True, return_features=True)
        for i in range(5):  # the plain path: every block for one sample, as training runs it
            tokens, aux = m.forward_features(x, noise[i], need_weights=True, return_aux=True)
            torch.testing.assert_close(logits[i], m.forward_head(tokens), rtol=0, atol=1e-10)
            torch.testing.assert_close(attn[i], aux.attention, rtol=0, atol=1e-10)
    assert logits.std(dim=0).max() > 1e-3  # the samples differ
    assert feats.shape == (5, 3, m.cfg.num_gate_features, m.cfg.gate_feature_dim)
    # the prefix features are shared by the samples, the last block's are not
    assert torch.equal(feats[0, :, :-1], feats[4, :, :-1]) and not torch.equal(feats[0, :, -1], feats[4, :, -1])


def test_magnitude_reads_the_prefix_features_of_each_image() -> None:
    m = _tail_model()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    _, feats, _ = m.prefix_features(x)
    assert feats.shape == (4, 1 + m.cfg.first_noise_block, m.cfg.gate_feature_dim)
    c = m.diffusion_magnitude(feats)
    assert c.shape == (4,) and bool(((c > 0) & (c < m.cfg.ood_diffusion_scale)).all()) and c.std() > 0
    with torch.no_grad():  # c(x) = 0: the samples agree, the model is its ODE
        m.diffusion_head.net[-1].weight.zero_()
        m.diffusion_head.net[-1].bias.fill_(-1e4)
        logits = m.sample_logits(x, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits[0], logits[3], rtol=0, atol=1e-12)
    torch.testing.assert_close(logits[0], m.forward_head(m.forward_features(x, torch.zeros(m.noise_shape(4)[1:],
                                                                                          dtype=x.dtype))))


def test_an_old_config_without_the_new_fields_still_builds() -> None:
    d = get_config("snodevit_mnist_every_block").to_dict()
    for key in ("magnitude_input", "noise_blocks", "ood_diffusion_scale"):
        d.pop(key)
    cfg = SNodeViTConfig.from_dict(d)
    assert cfg.magnitude_input == "tokens" and cfg.num_noise_blocks == cfg.depth and not cfg.ood_diffusion
    with pytest.raises(ValueError, match="magnitude_input must be one of"):
        cfg.replace(magnitude_input="pixels")


def test_the_tail_preset_is_what_tail_of_makes_of_the_shipped_architecture() -> None:
    assert stochastic_tail_of(create_model("snodevit_mnist_every_block")).cfg == get_config("snodevit_mnist")
    assert get_config("snodevit_mnist").samples_share_all_but_last_step
    assert not get_config("snodevit_mnist_every_block").samples_share_all_but_last_step


def test_tail_of_keeps_the_source_weights() -> None:
    torch.manual_seed(0)
    source = create_model("tiny", **MNIST_OVERRIDES, **MICRO).eval()
    tail = stochastic_tail_of(source, 6.0)
    assert tail.cfg.noise_blocks == 1 and tail.cfg.ood_diffusion_scale == 6.0 and tail.magnitude_from_features
    own = tail.state_dict()
    for key, value in source.state_dict().items():
        if key in own and own[key].shape == value.shape:
            assert torch.equal(own[key], value), key
    # the ODE blocks' TimeNets keep the rows of everything but the diffusion gate
    w = "blocks.0.timenet.net.2.weight"
    torch.testing.assert_close(own[w], source.state_dict()[w][: own[w].shape[0]])
    with pytest.raises(ValueError, match="one Euler step"):
        stochastic_tail_of(create_model("tiny", **MNIST_OVERRIDES, **{**MICRO, "num_steps": 2}))


def test_synthetic_outliers_are_made_from_the_images_alone() -> None:
    images = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8)
    a = synthetic_outliers(images, 16, torch.Generator().manual_seed(3))
    b = synthetic_outliers(images, 16, torch.Generator().manual_seed(3))
    assert a.dtype == torch.uint8 and a.shape == (16, 1, 28, 28) and torch.equal(a, b)
    with pytest.raises(ValueError, match="n must be >= 4"):
        synthetic_outliers(images, 3, torch.Generator())


def test_fitting_the_tail_raises_the_magnitude_on_outliers_only() -> None:
    torch.manual_seed(0)
    m = stochastic_tail_of(create_model("tiny", **MNIST_OVERRIDES, **MICRO).eval())
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 28, 28), generator=gen, dtype=torch.uint8)
    images[:, :, :, :14] = 0  # "digits" with an empty left half
    outliers = synthetic_outliers(images, 64, gen)
    norm = lambda u: (u.float() / 255 - 0.13) / 0.3  # noqa: E731
    labels = torch.randint(0, 10, (64,), generator=gen)
    figures = train_stochastic_tail(m, norm(images), labels, norm(outliers),
                                    TailConfig(magnitude_steps=150, diffusion_steps=20, batch_size=32), progress=False)
    assert figures["magnitude_outlier_mean"] > figures["magnitude_train_mean"] + 0.3
    assert all(p.requires_grad for p in m.parameters())  # handed back trainable
    with pytest.raises(ValueError, match="samples_out must be >= 2"):
        TailConfig(samples_out=1)


def test_tail_command_writes_a_loadable_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = create_model("tiny", **MNIST_OVERRIDES, **MICRO)
    save_model(source, tmp_path / "src", {"class_names": [str(i) for i in range(10)], "data": "digits",
                                          "calibration": {"temperature": 2.0}})
    assert main(["tail", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "src")]) == 2
    code = main(["tail", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--no-progress", "--json",
                 "--magnitude-steps", "20", "--diffusion-steps", "5"])
    assert code == 0
    model, meta = load_model(tmp_path / "out")
    assert model.magnitude_from_features and "calibration" not in meta
    assert meta["stochastic_tail"]["data"] == "digits"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["noise_blocks"] == 1

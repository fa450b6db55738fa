"""The named presets: the shipped recipe is data in the config registry, not a branch in the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from snodevit import MNIST_OVERRIDES, SNodeViTConfig, create_model, get_config, list_variants
from snodevit.cli.main import build_parser
from snodevit.cli.train import model_config

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "snodevit-mnist"


@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="no shipped checkpoint")
def test_the_shipped_preset_is_the_shipped_architecture() -> None:
    shipped = json.loads((SHIPPED / "config.json").read_text())
    built = get_config("snodevit_mnist").to_dict()
    # the fields the checkpoint has are equal; any it lacks (a checkpoint older than a field) are their defaults
    assert {k: built[k] for k in shipped} == shipped
    assert {k: v for k, v in built.items() if k not in shipped} == {
        k: v for k, v in SNodeViTConfig().to_dict().items() if k not in shipped}
    assert SNodeViTConfig.from_dict(shipped) == get_config("snodevit_mnist") == create_model("snodevit_mnist").cfg
    # the shipped weights fit it exactly: same parameter names and shapes (TimeNet(cfg) included)
    missing, unexpected = create_model("snodevit_mnist").load_state_dict(load_file(SHIPPED / "model.safetensors"))
    assert not missing and not unexpected


def test_the_preset_is_a_registered_variant_that_takes_overrides() -> None:
    assert {"snodevit_mnist", "snodevit_mnist_every_block"} <= set(list_variants())
    assert get_config("snodevit_mnist_every_block") == get_config("tiny", **MNIST_OVERRIDES, num_steps=1)
    assert get_config("snodevit_mnist") == get_config("tiny", **MNIST_OVERRIDES, num_steps=1, noise_blocks=1,
                                                      ood_diffusion_scale=8.0, magnitude_input="features")
    assert get_config("snodevit_mnist_every_block", num_steps=2) == get_config("tiny", **MNIST_OVERRIDES)
    assert get_config("tiny").num_steps == SNodeViTConfig.num_steps  # plain tiny keeps the default steps


def test_train_builds_the_variant_it_is_given_and_nothing_else() -> None:
    parse = build_parser().parse_args
    base = ["train", "--out", "unused"]
    # --variant snodevit_mnist on 28x28 grayscale digits is the shipped config; --variant tiny is plain tiny
    assert model_config(parse(base + ["--variant", "snodevit_mnist"]), 28, 1, 10) == get_config("snodevit_mnist")
    assert model_config(parse(base + ["--variant", "tiny"]), 28, 1, 10) == get_config("tiny", **MNIST_OVERRIDES)
    assert model_config(parse(base), 28, 1, 10).num_steps == SNodeViTConfig.num_steps
    # flags override the preset's fields, and the data its input fields
    cfg = model_config(parse(base + ["--variant", "snodevit_mnist", "--num-steps", "3"]), 32, 3, 4)
    assert (cfg.num_steps, cfg.image_size, cfg.in_channels, cfg.num_classes) == (3, 32, 3, 4)

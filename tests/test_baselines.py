"""MC dropout, deep ensembles and the diffusion-off SDE model behind the shared ``predict`` protocol."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from snodevit import MNIST_OVERRIDES, SNodeViT, create_model, predict
from snodevit.evaluation.baselines import DeepEnsemble, DiffusionOff, MCDropout

SMALL = dict(MNIST_OVERRIDES, dim=24, depth=2, num_heads=2, rank=4, time_hidden_dim=16, num_steps=1)


def _model(seed: int = 0, **kw: Any) -> SNodeViT:
    torch.manual_seed(seed)
    m = create_model("tiny", **{**SMALL, "noise_dim": 0, **kw}).eval()
    nn.init.normal_(m.head.weight)  # the head starts at zero; give the tests non-trivial logits
    return m


def _images(b: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- ensemble
def test_ensemble_samples_are_each_members_logits() -> None:
    members = [_model(seed) for seed in (0, 1, 2)]
    ens = DeepEnsemble(members)
    x = _images(5)
    pred = predict(ens, x, num_samples=3, seed=0)
    with torch.no_grad():
        expected = torch.stack([m(x) for m in members])  # a plain loop over the members, one forward each
    assert pred.logits.shape == (3, 5, 10)
    torch.testing.assert_close(pred.logits, expected, rtol=0, atol=1e-6)
    # summarised like any other backend: the mean of the members' softmaxes
    torch.testing.assert_close(pred.summary.probs, expected.softmax(-1).mean(0), rtol=0, atol=1e-6)
    assert float(pred.summary.epistemic.min()) > 0  # different members disagree


def test_ensemble_attention_and_argument_checks() -> None:
    members = [_model(seed) for seed in (0, 1)]
    ens = DeepEnsemble(members)
    x = _images(2)
    logits, attn = ens.sample_logits(x, 2, return_attention=True)
    assert logits.shape == (2, 2, 10) and attn.shape == (2, 2, 2, 50, 50)
    with pytest.raises(ValueError, match="number of ensemble members"):
        ens.sample_logits(x, 3)
    with pytest.raises(ValueError, match="at least 2 members"):
        DeepEnsemble(members[:1])
    with pytest.raises(ValueError, match="deterministic"):
        DeepEnsemble([members[0], _model(noise_dim=4)])
    with pytest.raises(ValueError, match="member 1"):
        DeepEnsemble([members[0], _model(num_classes=3)])


# ----------------------------------------------------------------------------------------------- MC dropout
def test_mc_dropout_samples_differ_and_are_reproducible_from_the_seed() -> None:
    mc = MCDropout(_model(dropout=0.3))
    x = _images(4)
    a = predict(mc, x, num_samples=6, seed=7)
    b = predict(mc, x, num_samples=6, seed=7)
    c = predict(mc, x, num_samples=6, seed=8)
    assert torch.equal(a.logits, b.logits)
    assert not torch.allclose(a.logits, c.logits)
    spread = (a.logits - a.logits.mean(0)).abs().amax(dim=(0, 2))  # (B,): every image's samples differ
    assert bool((spread > 1e-3).all())
    assert float(a.summary.epistemic.min()) > 0
    assert not mc.model.training  # eval mode throughout: the stem's batch norm uses running statistics


def test_mc_dropout_answer_does_not_depend_on_the_batch() -> None:
    mc = MCDropout(_model(dropout=0.2))
    x = _images(3)
    together = predict(mc, x, num_samples=4, seed=[10, 11, 12]).logits
    alone = predict(mc, x[1:2], num_samples=4, seed=11).logits
    torch.testing.assert_close(together[:, 1:2], alone, rtol=0, atol=1e-5)


def test_mc_dropout_with_p0_is_the_deterministic_model() -> None:
    model = _model(dropout=0.0)
    mc = MCDropout(model)
    x = _images(3)
    logits = predict(mc, x, num_samples=4, seed=0).logits
    with torch.no_grad():
        ref = model(x)
    for s in range(4):
        torch.testing.assert_close(logits[s], ref, rtol=0, atol=1e-6)


def test_mc_dropout_masks_match_dropouts_rate_and_scale() -> None:
    """The hook is dropout: each kept unit is scaled by 1/(1-p) and about a fraction p is dropped."""
    model = _model(dropout=0.25)
    mc = MCDropout(model)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hidden = model.blocks[0].mlp[2]  # the dropout on the MLP's hidden layer
    assert hidden in mc.dropouts
    hidden.register_forward_hook(lambda mod, inp, out: seen.append((inp[0], out)))  # runs after the mask hook
    mc.sample_logits(_images(4), 8, generator=torch.Generator().manual_seed(0))
    x, y = seen[0]
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert abs(1 - kept.double().mean().item() - 0.25) < 0.02
    # outside sample_logits the hooks are inert: a plain eval forward is deterministic
    with torch.no_grad():
        assert torch.equal(model(_images(2)), model(_images(2)))


@pytest.mark.parametrize("attention", ["ksvd", "softmax"])
def test_mc_dropout_reaches_every_dropout_layer(attention: str) -> None:
    """Every layer that dropped units in training drops them at test time (no inference path may skip one)."""
    model = _model(dropout=0.1, attention=attention)
    mc = MCDropout(model)
    calls = {id(m): 0 for m in mc.dropouts}

    def count(mod: nn.Module, inp: Any, out: Any) -> None:
        calls[id(mod)] += 1

    for m in mc.dropouts:
        m.register_forward_hook(count)
    mc.sample_logits(_images(2), 3, generator=torch.Generator().manual_seed(0))
    assert len(mc.dropouts) == 3 * model.cfg.depth  # attention output, MLP hidden, MLP output per block
    assert all(n > 0 for n in calls.values()), calls


def test_mc_dropout_argument_checks() -> None:
    with pytest.raises(ValueError, match="deterministic"):
        MCDropout(_model(noise_dim=4))
    mc = MCDropout(_model(dropout=0.1))
    with pytest.raises(ValueError, match="noise must have shape"):
        mc.sample_logits(_images(2), noise=torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="num_samples"):
        mc.sample_logits(_images(2))


# ----------------------------------------------------------------------------------------------- diffusion off
def test_diffusion_off_is_the_zero_noise_path() -> None:
    model = _model(noise_dim=4)
    off = DiffusionOff(model)
    x = _images(3)
    pred = predict(off, x, num_samples=2, seed=0)
    ref = model.sample_logits(x, noise=torch.zeros(model.noise_shape(3, 2)))
    torch.testing.assert_close(pred.logits, ref, rtol=0, atol=0)
    assert float(pred.summary.epistemic.max()) == 0.0
    noisy = predict(model, x, num_samples=2, seed=0).logits
    assert not torch.allclose(noisy, pred.logits)
    with pytest.raises(ValueError, match="stochastic"):
        DiffusionOff(_model())

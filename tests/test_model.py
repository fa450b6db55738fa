"""Model contract: shapes, gradients, noise as an input, deterministic limits (timm / torchsde style tests)."""

from __future__ import annotations

import pytest
import torch

from snodevit import MNIST_OVERRIDES, SNodeViTConfig, count_parameters, create_model, get_config, list_variants
from snodevit.config import ATTENTION_TYPES
from snodevit.nn.attention import _iterative_pinv
from snodevit.nn.solvers import SOLVERS, check_solver

SMALL = dict(MNIST_OVERRIDES, dim=24, depth=2, num_heads=2, rank=4, time_hidden_dim=16, noise_dim=4)


def _model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    m = create_model("tiny", **{**SMALL, **kw}).eval()
    torch.nn.init.normal_(m.head.weight)  # the head starts at zero; give the tests non-trivial logits
    return m


@pytest.mark.parametrize("variant", ["tiny", "small", "base", "large"])
def test_parameter_counts_match_the_seed_table(variant: str) -> None:
    # The seed's table at 224 px, 10 classes; we promise +-25 %.
    target = {"tiny": 1.2e6, "small": 4.8e6, "base": 19e6, "large": 76e6}[variant]
    with torch.device("meta"):
        n = count_parameters(create_model(variant))
    assert 0.75 * target <= n <= 1.25 * target, n


@pytest.mark.parametrize("attention", ATTENTION_TYPES)
@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_shapes_no_nans_and_gradients(attention: str, solver: str, stem: str) -> None:
    m = _model(attention=attention, solver=solver, stem=stem).train()
    x = torch.randn(3, 1, 28, 28)
    logits, reg = m.forward_train(x, generator=torch.Generator().manual_seed(0))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    (logits.square().mean() + reg).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    m.eval()
    s = m.sample_logits(x, 5)
    assert s.shape == (5, 3, 10) and torch.isfinite(s).all()


@pytest.mark.parametrize("variant", list_variants())
def test_every_variant_builds_for_cifar_and_mnist_shapes(variant: str) -> None:
    for overrides, shape in ((dict(image_size=32, patch_size=4, stem="conv"), (1, 3, 32, 32)),
                             (MNIST_OVERRIDES, (1, 1, 28, 28))):
        cfg = get_config(variant, **overrides)
        assert cfg.num_tokens == (cfg.image_size // cfg.patch_size) ** 2 + 1
    # Forward only the two smallest on CPU to keep the suite fast.
    if variant in ("tiny", "small"):
        m = create_model(variant, image_size=32, patch_size=4, stem="conv").eval()
        assert m.sample_logits(torch.randn(1, 3, 32, 32), 2).shape == (2, 1, 10)


def test_fused_and_explicit_softmax_attention_agree() -> None:
    m = _model(attention="softmax")
    x = torch.randn(2, 1, 28, 28)
    noise = torch.randn(m.noise_shape(2, 3))
    fused = m.sample_logits(x, noise=noise)
    for blk in m.blocks:
        blk.attn.fused = False
    explicit = m.sample_logits(x, noise=noise)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ATTENTION_TYPES)
def test_same_noise_identical_different_noise_different(attention: str) -> None:
    m = _model(attention=attention)
    x = torch.randn(2, 1, 28, 28)
    noise = torch.randn(m.noise_shape(2, 4), generator=torch.Generator().manual_seed(1))
    a = m.sample_logits(x, noise=noise)
    b = m.sample_logits(x, noise=noise.clone())
    assert torch.equal(a, b)
    c = m.sample_logits(x, noise=torch.randn(m.noise_shape(2, 4), generator=torch.Generator().manual_seed(2)))
    assert not torch.allclose(a, c)
    # The S samples themselves differ from each other.
    assert (a.std(dim=0) > 0).all()
    # noise=None with a seeded generator is reproducible too.
    g1 = m.sample_logits(x, 4, generator=torch.Generator().manual_seed(5))
    g2 = m.sample_logits(x, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_zero_noise_is_the_deterministic_ode_path(solver: str) -> None:
    m = _model(solver=solver)
    x = torch.randn(2, 1, 28, 28)
    zero = m.sample_logits(x, noise=torch.zeros(m.noise_shape(2, 3)))
    # The same weights without a diffusion term integrate the ODE.
    tokens, _ = m.integrate(m.embed(x), None)
    ode = m.forward_head(tokens)
    torch.testing.assert_close(zero, ode.expand(3, -1, -1), atol=1e-6, rtol=1e-6)
    assert torch.equal(zero[0], zero[1])


def test_one_euler_step_without_diffusion_is_a_pre_norm_transformer_block() -> None:
    m = _model(num_steps=1, noise_dim=0, attention="softmax")
    blk = m.blocks[0]
    x = torch.randn(2, 50, 24)
    out, _ = blk(x, None)
    tp = blk.timenet(blk.t_grid)
    h = blk.norm1(x) * (1 + tp.scale1[0]) + tp.shift1[0]
    y = x + tp.gate1[0] * blk.attn(h).out
    ref = y + tp.gate2[0] * blk.mlp(blk.norm2(y) * (1 + tp.scale2[0]) + tp.shift2[0])
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("attention", ATTENTION_TYPES)
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_folded_samples_equal_a_loop_over_the_same_noise(attention: str, solver: str) -> None:
    m = _model(attention=attention, solver=solver)
    x = torch.randn(3, 1, 28, 28)
    noise = torch.randn(m.noise_shape(3, 4))
    folded = m.sample_logits(x, noise=noise)
    looped = torch.stack([m(x, noise[s]) for s in range(4)])
    torch.testing.assert_close(folded, looped, atol=1e-5, rtol=1e-5)
    # And per image: no statistic couples images of a batch.
    single = m.sample_logits(x[1:2], noise=noise[:, 1:2])
    torch.testing.assert_close(folded[:, 1:2], single, atol=1e-5, rtol=1e-5)


def test_attention_weights_are_row_stochastic_for_every_backend() -> None:
    for attention in ATTENTION_TYPES:
        m = _model(attention=attention)
        _, attn = m.sample_logits(torch.randn(2, 1, 28, 28), 2, return_attention=True)
        assert attn.shape == (2, 2, 2, 50, 50)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 2, 50), atol=1e-5, rtol=0)


def test_noise_generation_is_cheap_relative_to_the_forward_pass() -> None:
    # Not a timing: the number of normals per sample is a tiny fraction of the forward pass's multiply-adds.
    m = create_model("tiny", **MNIST_OVERRIDES)
    per_sample = 1
    for d in m.noise_shape(1, 1):
        per_sample *= d
    macs = m.cfg.depth * m.cfg.num_steps * m.cfg.num_tokens * 12 * m.cfg.dim**2
    assert per_sample < 0.001 * macs


def test_bad_inputs_raise_clear_errors() -> None:
    m = _model()
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        m.sample_logits(torch.randn(2, 3, 32, 32), 2)
    with pytest.raises(ValueError, match="noise must have shape"):
        m.sample_logits(torch.randn(2, 1, 28, 28), noise=torch.randn(2, 2, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="num_samples"):
        m.sample_logits(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="floating point"):
        m.sample_logits(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), 2)


def test_config_validation_names_the_problem() -> None:
    with pytest.raises(ValueError, match="attention must be one of"):
        SNodeViTConfig(attention="flash")
    with pytest.raises(ValueError, match="solver must be one of"):
        SNodeViTConfig(solver="rk4")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        SNodeViTConfig(dim=100, num_heads=3)
    with pytest.raises(ValueError, match="unknown variant"):
        get_config("huge")
    with pytest.raises(ValueError, match="unknown override"):
        get_config("tiny", widht=3)
    cfg = get_config("tiny", **MNIST_OVERRIDES)
    assert SNodeViTConfig.from_dict(cfg.to_dict()) == cfg


def test_solvers_declare_what_they_support() -> None:
    assert SOLVERS["euler"].sde_type == "ito" and SOLVERS["heun"].sde_type == "stratonovich"
    with pytest.raises(ValueError, match="does not support noise type"):
        check_solver("euler", "scalar")


def test_performer_features_are_fixed_in_eval_and_redrawn_in_training() -> None:
    m = _model(attention="performer")
    omega = m.blocks[0].attn.omega.clone()
    m.sample_logits(torch.randn(1, 1, 28, 28), 2)
    assert torch.equal(omega, m.blocks[0].attn.omega)
    m.train()
    m.forward_train(torch.randn(2, 1, 28, 28))
    assert not torch.equal(omega, m.blocks[0].attn.omega)


def test_nystrom_pseudo_inverse_matches_torch_pinv() -> None:
    a = torch.softmax(torch.randn(3, 6, 6, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(_iterative_pinv(a, iters=20), torch.linalg.pinv(a), atol=1e-6, rtol=1e-6)


def test_adaptive_rank_grows_with_tokens_within_bounds() -> None:
    small = get_config("tiny", rank_mode="adaptive", image_size=28, patch_size=4)  # 50 tokens
    big = get_config("tiny", rank_mode="adaptive", image_size=112, patch_size=4)  # 785 tokens
    assert 4 <= small.effective_rank < big.effective_rank <= small.head_dim
    assert get_config("tiny").effective_rank == 8


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_noise_in_the_last_blocks_only(solver: str) -> None:
    """noise_blocks=L: the first depth-L blocks are ODE blocks without diffusion parameters, run once per image;
    the folded samples still equal a loop of single passes over the same noise, attention maps cover every block."""
    m = _model(depth=3, noise_blocks=1, solver=solver)
    assert m.cfg.num_noise_blocks == 1 and m.cfg.first_noise_block == 2
    assert [hasattr(b, "diff_gate") for b in m.blocks] == [False, False, True]
    x = torch.randn(2, 1, 28, 28)
    noise = torch.randn(m.noise_shape(2, 4))
    assert noise.shape[2] == 1
    folded, attn = m.sample_logits(x, noise=noise, return_attention=True)
    looped = torch.stack([m(x, noise[s]) for s in range(4)])
    torch.testing.assert_close(folded, looped, atol=1e-5, rtol=1e-5)
    assert attn.shape == (4, 2, 3, m.cfg.num_tokens, m.cfg.num_tokens)
    assert torch.equal(attn[0, :, :2], attn[3, :, :2])  # shared ODE prefix: the same maps for every sample
    assert not torch.equal(folded[0], folded[1])  # the last block still spreads the samples
    torch.testing.assert_close(m.sample_logits(x, noise=torch.zeros_like(noise))[0],
                               m.sample_logits(x, noise=torch.zeros_like(noise))[1])
    m.train()
    logits, reg = m.forward_train(x, generator=torch.Generator().manual_seed(0))
    (logits.square().mean() + reg).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing
    with pytest.raises(ValueError, match=r"noise must have shape \(S, B, L, K, N, m\)"):
        m.sample_logits(x, noise=torch.randn(4, 2, 3, *noise.shape[3:]))
    with pytest.raises(ValueError, match="noise_blocks"):
        get_config("tiny", **{**SMALL, "depth": 3, "noise_blocks": 4})

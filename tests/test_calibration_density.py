"""Class-conditional Gaussian feature density (calibration.density) against scikit-learn's Mahalanobis distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from calibration import FeatureDensity, fit_feature_density

N, G, D, C = 240, 3, 6, 4


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % C
    mix = torch.randn(G, D, D, generator=gen, dtype=torch.float64)  # correlated groups
    x = torch.einsum("ngd,gde->nge", torch.randn(N, G, D, generator=gen, dtype=torch.float64), mix)
    return x + 2.0 * labels.view(-1, 1, 1).double(), labels


def test_group_scores_equal_sklearn_mahalanobis_to_the_closest_class() -> None:
    x, y = _data()
    fd = fit_feature_density(x, y, C)
    new = 3.0 * torch.randn(17, G, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for g in range(G):
        xs, ys = x[:, g].numpy(), y.numpy()
        means = np.stack([xs[ys == c].mean(0) for c in range(C)])
        lw = LedoitWolf(assume_centered=True).fit(xs - means[ys])
        ref = np.stack([lw.mahalanobis(new[:, g].numpy() - means[c]) for c in range(C)], 1).min(1)
        np.testing.assert_allclose(fd.group_scores(new)[:, g].numpy(), ref, rtol=1e-10)


def test_score_sums_groups_scaled_to_one_on_training_data() -> None:
    x, y = _data()
    fd = fit_feature_density(x, y, C)
    per = fd.group_scores(x)  # (N, G)
    assert per.mean(dim=0).tolist() == pytest.approx([1.0 * s for s in fd.scale.tolist()])
    torch.testing.assert_close(fd.score(x), (per / fd.scale).sum(dim=1))
    assert float(fd.score(x).mean()) == pytest.approx(G)
    # any leading shape: (S, B, G, D) -> (S, B)
    assert fd.score(x[:12].reshape(3, 4, G, D)).shape == (3, 4)


def test_far_points_score_higher() -> None:
    x, y = _data()
    fd = fit_feature_density(x, y, C)
    far = x[:50] + 25.0
    assert float(fd.score(far).min()) > float(fd.score(x).max())


def test_tensors_round_trip() -> None:
    x, y = _data()
    fd = fit_feature_density(x, y, C)
    back = FeatureDensity.from_tensors(fd.to_tensors())
    torch.testing.assert_close(back.score(x), fd.score(x), rtol=0, atol=0)
    assert back == fd and back is not fd
    with pytest.raises(ValueError, match="lack"):
        FeatureDensity.from_tensors({"means": fd.means})


def test_rounded_density_survives_a_float32_file_to_the_bit() -> None:
    x, y = _data()
    fd = fit_feature_density(x, y, C)
    r = fd.rounded()
    stored = FeatureDensity.from_tensors({k: v.float() for k, v in r.to_tensors().items()})  # what a file keeps
    assert stored == r and r != fd
    torch.testing.assert_close(stored.score(x), r.score(x), rtol=0, atol=0)
    torch.testing.assert_close(r.score(x), fd.score(x), rtol=1e-4, atol=0)  # rounding moves scores very little


def test_bad_inputs_are_refused() -> None:
    x, y = _data()
    with pytest.raises(ValueError, match="at least 2"):
        fit_feature_density(x[:5], torch.tensor([0, 0, 1, 1, 2]), C)  # class 3 missing
    with pytest.raises(ValueError, match="features"):
        fit_feature_density(x[:, 0], y, C)
    fd = fit_feature_density(x, y, C)
    with pytest.raises(ValueError, match=r"\(G, D\)"):
        fd.score(torch.zeros(2, G, D + 1))
    with pytest.raises(ValueError, match="fit together"):
        FeatureDensity(fd.means, fd.whitening[:1], fd.scale)

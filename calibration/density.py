"""Feature-space density for out-of-distribution detection: class-conditional Gaussians with a shared covariance
on several feature groups, summed into one score.

For each feature group ``g`` (here: a pooled D-vector per network layer), the class means ``mu_gc`` and one shared
covariance ``Sigma_g`` are fitted on training features (Ledoit-Wolf shrinkage, so a few thousand images give a
well-conditioned estimate in D = 96 dimensions or more). The Mahalanobis score of a feature ``f_g`` is the
squared distance to the closest class mean,

.. math::
    d_g(f) = \\min_c (f_g - \\mu_{gc})^\\top \\Sigma_g^{-1} (f_g - \\mu_{gc}),

and the groups are combined with equal weight after dividing each by its mean on the training features:
``score(f) = sum_g d_g(f) / mean_train(d_g)``. Low layers see pixel statistics (noise, constant images, inverted
contrast), high layers see shapes (letters, rotated digits); the sum flags both. Nothing here looks at
out-of-distribution data: the fit uses training features only, and the threshold is fitted separately on
held-out in-distribution scores (:mod:`calibration.novelty`). Lee et al. weight the layers with a regression
fitted on OOD validation data, which this deliberately does not do.

Scores are computed as ``|| f W - mu W ||^2`` with ``W`` the Cholesky factor of the precision matrix
(``Sigma^-1 = W W^T``), in float64.

References:
    Lee, Lee, Lee, Shin. "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
    Attacks." NeurIPS 2018 (class-conditional Gaussians with a tied covariance on every layer's features).
    Mukhoti, Kirsch, van Amersfoort, Torr, Gal. "Deep Deterministic Uncertainty: A New Simple Baseline." CVPR 2023.
    Ledoit & Wolf. "A well-conditioned estimator for large-dimensional covariance matrices." J. Multivariate
    Analysis, 2004.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._validation import check_float_tensor, check_labels

__all__ = ["FeatureDensity", "fit_feature_density"]


@dataclass(frozen=True, eq=False)
class FeatureDensity:
    """Fitted class-conditional Gaussians on G feature groups of width D, for C classes. Tensors are float64."""

    means: Tensor  # (G, C, D) class means of each group
    whitening: Tensor  # (G, D, D) W with W W^T = Sigma^-1, the shared precision of each group
    scale: Tensor  # (G,) mean Mahalanobis score of each group on the training features

    def __post_init__(self) -> None:
        g, c, d = self.means.shape
        if tuple(self.whitening.shape) != (g, d, d) or tuple(self.scale.shape) != (g,):
            raise ValueError(f"FeatureDensity: means {tuple(self.means.shape)}, whitening "
                             f"{tuple(self.whitening.shape)} and scale {tuple(self.scale.shape)} do not fit together "
                             "((G, C, D), (G, D, D), (G,))")
        if not bool((self.scale > 0).all()):
            raise ValueError("FeatureDensity: every group's scale must be > 0")

    @property
    def num_groups(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[2]

    def group_scores(self, features: Tensor) -> Tensor:
        """Squared Mahalanobis distance to the closest class mean, per group.

        Args:
            features: (..., G, D).

        Returns:
            (..., G) float64.
        """
        if features.shape[-2:] != self.means.shape[::2]:
            raise ValueError(f"features must end in (G, D) = ({self.num_groups}, {self.dim}), "
                             f"got shape {tuple(features.shape)}")
        w = self.whitening.to(features.device)
        z = torch.einsum("...gd,gde->...ge", features.double(), w)  # (..., G, D) whitened
        mu = torch.einsum("gcd,gde->gce", self.means.to(features.device), w)  # (G, C, D)
        d2 = ((z.unsqueeze(-2) - mu) ** 2).sum(dim=-1)  # (..., G, C)
        return d2.min(dim=-1).values

    def score(self, features: Tensor) -> Tensor:
        """The combined score ``sum_g d_g / scale_g``: (..., G, D) -> (...,) float64; larger = more unusual."""
        return (self.group_scores(features) / self.scale.to(features.device)).sum(dim=-1)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureDensity):
            return NotImplemented
        return all(torch.equal(a, b) for a, b in zip(self.to_tensors().values(), other.to_tensors().values()))

    __hash__ = None  # type: ignore[assignment]  # mutable tensors inside: not hashable, as a dataclass with eq

    def rounded(self) -> FeatureDensity:
        """The same density with every value rounded to float32 (still held in float64): what a float32 file keeps,
        so that scores computed before saving equal those computed after loading, to the bit."""
        return FeatureDensity(*(t.float().double() for t in (self.means, self.whitening, self.scale)))

    def to_tensors(self) -> dict[str, Tensor]:
        return {"means": self.means.contiguous(), "whitening": self.whitening.contiguous(),
                "scale": self.scale.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> FeatureDensity:
        missing = {"means", "whitening", "scale"} - set(tensors)
        if missing:
            raise ValueError(f"FeatureDensity tensors lack {sorted(missing)}")
        return cls(tensors["means"].double(), tensors["whitening"].double(), tensors["scale"].double())


def fit_feature_density(features: Tensor, labels: Tensor, num_classes: int) -> FeatureDensity:
    """Fit class means and a shared Ledoit-Wolf covariance per feature group.

    Args:
        features: (N, G, D) training features (one vector per group and image).
        labels: (N,) int64 class of each image; every class must occur at least twice.
        num_classes: C.

    Returns:
        The fitted :class:`FeatureDensity`.

    Raises:
        ValueError: bad shapes or values, or a class with fewer than two images.
    """
    from sklearn.covariance import LedoitWolf

    check_float_tensor(features, "features", 3, "(N, G, D)")
    check_labels(labels, features.shape[0], num_classes)
    counts = torch.bincount(labels, minlength=num_classes)
    if int(counts.min()) < 2:
        raise ValueError(f"every class needs at least 2 training images to fit its mean; counts {counts.tolist()}")
    x = features.double()
    onehot = torch.nn.functional.one_hot(labels, num_classes).double()  # (N, C)
    means = torch.einsum("nc,ngd->gcd", onehot, x) / counts.double().view(1, -1, 1)  # (G, C, D)
    centred = x - means[:, labels].transpose(0, 1)  # (N, G, D)
    whitening = []
    for g in range(x.shape[1]):
        precision = torch.from_numpy(LedoitWolf(assume_centered=True).fit(centred[:, g].numpy()).precision_)
        precision = 0.5 * (precision + precision.T)  # exact symmetry for the Cholesky factorisation
        whitening.append(torch.linalg.cholesky(precision))  # lower-triangular W, W W^T = Sigma^-1
    w = torch.stack(whitening)  # (G, D, D)
    unscaled = FeatureDensity(means, w, torch.ones(x.shape[1], dtype=torch.float64))
    scale = unscaled.group_scores(x).mean(dim=0)  # (G,)
    return FeatureDensity(means, w, scale)

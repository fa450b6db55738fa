r"""Temperature scaling of Monte Carlo logits.

One scalar T > 0 divides every Monte Carlo sample's logits before the probabilities are averaged over the S
samples,

.. math::
    p_T(y \mid x) = \frac{1}{S} \sum_{s=1}^{S} \mathrm{softmax}(z_s / T)_y ,

and T is fitted by minimising the negative log-likelihood of that averaged prediction on a held-out calibration
split. Scaling each sample (rather than the averaged probabilities) keeps the spread between samples, which is
what the epistemic part of the uncertainty is made of. With S = 1 it is the temperature scaling of Guo et al.

References:
    Guo et al. "On Calibration of Modern Neural Networks." ICML 2017.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from ._validation import check_float_tensor, check_int_arg, check_labels, check_positive_finite_arg

logger = logging.getLogger(__name__)

T_MIN, T_MAX = 1e-2, 1e2  # the fitted temperature is clipped to this range

__all__ = ["apply_temperature", "calibrated_nll", "fit_temperature"]


def _check_logit_samples(logit_samples: Tensor) -> None:
    check_float_tensor(logit_samples, "logit_samples", 3, "(S, N, C)")
    if logit_samples.shape[2] < 2:
        raise ValueError(f"`logit_samples` must have at least 2 classes (last dim), got shape "
                         f"{tuple(logit_samples.shape)}")


def _check_logits_labels(logit_samples: Tensor, labels: Tensor) -> None:
    _check_logit_samples(logit_samples)
    check_labels(labels, logit_samples.shape[1], logit_samples.shape[2])


def _mixture_nll(logits: Tensor, labels: Tensor, log_t: Tensor) -> Tensor:
    """NLL of ``mean_s softmax(z_s / T)`` at the labels, computed in log space (stable for any T).

    Args:
        logits: (S, N, C) float64 logits.
        labels: (N,) int64 labels.
        log_t: 0-d or (1,) log temperature.

    Returns:
        0-d tensor, the mean NLL in nats.
    """
    s, n, _ = logits.shape
    logp = torch.log_softmax(logits / log_t.exp(), dim=-1)  # (S, N, C)
    logp_y = logp.gather(-1, labels.view(1, n, 1).expand(s, n, 1)).squeeze(-1)  # (S, N)
    log_mix = torch.logsumexp(logp_y, dim=0) - math.log(s)  # (N,) log of the sample-averaged probability
    return -log_mix.mean()


def calibrated_nll(logit_samples: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    r"""NLL of the temperature-scaled, sample-averaged prediction.

    .. math::
        \mathrm{NLL}(T) = -\frac{1}{N} \sum_i \log \frac{1}{S} \sum_s \mathrm{softmax}(z_{s,i} / T)_{y_i}

    Args:
        logit_samples: (S, N, C) Monte Carlo logits.
        labels: (N,) int64 true classes.
        temperature: T > 0.

    Returns:
        The NLL in nats as a float.

    Raises:
        ValueError: on a bad ``temperature`` or invalid tensors.

    Example:
        >>> z = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
        >>> round(calibrated_nll(z, torch.tensor([0, 0]), temperature=2.0), 6)
        0.643669
    """
    check_positive_finite_arg(temperature, "temperature")
    _check_logits_labels(logit_samples, labels)
    log_t = torch.tensor(math.log(temperature), dtype=torch.float64, device=logit_samples.device)
    return float(_mixture_nll(logit_samples.double(), labels.long(), log_t))


def fit_temperature(logit_samples: Tensor, labels: Tensor, max_iter: int = 100, init: float = 1.0) -> float:
    r"""Fit the temperature T that minimises the calibration NLL of the sample-averaged prediction.

    .. math::
        T^\star = \arg\min_{T > 0} -\frac{1}{N} \sum_i \log \frac{1}{S}
        \sum_s \mathrm{softmax}(z_{s,i} / T)_{y_i}

    The search runs over ``log T`` (so T stays positive) with L-BFGS and a strong-Wolfe line search on a
    float64 copy; for S = 1 the objective is convex in 1/T. The result is clipped to [``T_MIN``, ``T_MAX``]
    (a separable calibration split would otherwise drive T to 0), and if it is not finite or its NLL is higher
    than at T = 1, the fit is discarded with a logged warning and 1.0 is returned: the fitted temperature is
    never worse than no scaling on the calibration data.

    Args:
        logit_samples: (S, N, C) Monte Carlo logits of the calibration split (S = 1 for a deterministic model;
            use ``logits.unsqueeze(0)`` for an (N, C) tensor).
        labels: (N,) int64 true classes.
        max_iter: maximum number of L-BFGS iterations, >= 1.
        init: starting temperature, > 0.

    Returns:
        The fitted temperature as a float.

    Raises:
        ValueError: on a bad ``max_iter``/``init`` or invalid tensors.

    Example:
        >>> z = torch.tensor([[[4.0, 0.0], [4.0, 0.0], [4.0, 0.0], [0.0, 4.0]]])  # every answer 98% sure
        >>> t = fit_temperature(z, torch.tensor([0, 0, 1, 1]))  # but only 3 of 4 right
        >>> round(t, 4), round(4 / math.log(3), 4)  # the T at which softmax(z / T) says 75%
        (3.641, 3.641)
    """
    check_int_arg(max_iter, "max_iter", 1)
    check_positive_finite_arg(init, "init")
    _check_logits_labels(logit_samples, labels)
    logits, y, log_t = _lbfgs_log_temperature(logit_samples, labels, max_iter, init)
    t = float(log_t.detach().exp())
    t = min(max(t, T_MIN), T_MAX) if math.isfinite(t) else math.nan
    return _no_worse_than_one(logits, y, t)


def _lbfgs_log_temperature(logit_samples: Tensor, labels: Tensor, max_iter: int,
                           init: float) -> tuple[Tensor, Tensor, Tensor]:
    """Minimise the mixture NLL over ``log T`` with L-BFGS (strong-Wolfe line search).

    Args:
        logit_samples: (S, N, C) Monte Carlo logits.
        labels: (N,) class indices.
        max_iter: maximum number of L-BFGS iterations.
        init: starting temperature.

    Returns:
        ``(logits, y, log_t)``: the (S, N, C) float64 copy of the logits, the (N,) int64 labels on their device,
        and the fitted (1,) log temperature (unclipped).
    """
    # a fresh float64 copy made with autograd on, so this also works when called under no_grad/inference_mode
    with torch.inference_mode(False), torch.enable_grad():
        logits = logit_samples.detach().to(torch.float64, copy=True)
        y = labels.detach().to(device=logits.device, dtype=torch.long, copy=True)
        log_t = torch.tensor([math.log(init)], dtype=torch.float64, device=logits.device, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = _mixture_nll(logits, y, log_t)
            loss.backward()
            return loss

        optimizer.step(closure)
    return logits, y, log_t


def _no_worse_than_one(logits: Tensor, y: Tensor, t: float) -> float:
    """``t`` when its calibration NLL is finite and no higher than at T = 1; otherwise 1.0, with a warning.

    Args:
        logits: (S, N, C) float64 logits.
        y: (N,) int64 labels.
        t: the clipped fitted temperature, or NaN when the fit diverged.
    """
    with torch.no_grad():
        nll_1 = float(_mixture_nll(logits, y, torch.zeros((), dtype=torch.float64, device=logits.device)))
        nll_t = (float(_mixture_nll(logits, y, torch.tensor(math.log(t), dtype=torch.float64, device=logits.device)))
                 if math.isfinite(t) else math.inf)
    if not math.isfinite(nll_t) or nll_t > nll_1:
        logger.warning("fit_temperature: fitted T=%s gives NLL %.6g > %.6g at T=1; keeping T=1", t, nll_t, nll_1)
        return 1.0
    logger.info("fit_temperature: T=%.4f, calibration NLL %.4f -> %.4f (S=%d, N=%d)", t, nll_1, nll_t,
                logits.shape[0], logits.shape[1])
    return t


def apply_temperature(logit_samples: Tensor, temperature: float) -> Tensor:
    r"""Temperature-scaled, sample-averaged probabilities.

    .. math::
        p_{i} = \frac{1}{S} \sum_s \mathrm{softmax}(z_{s,i} / T)

    Args:
        logit_samples: (S, N, C) Monte Carlo logits.
        temperature: T > 0 (from :func:`fit_temperature`).

    Returns:
        (N, C) probabilities in the dtype of ``logit_samples``; rows sum to 1.

    Raises:
        ValueError: on a bad ``temperature`` or invalid tensors.

    Example:
        >>> z = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])  # S=2 samples of one image
        >>> [round(v, 4) for v in apply_temperature(z, 2.0)[0].tolist()]
        [0.6155, 0.3845]
    """
    check_positive_finite_arg(temperature, "temperature")
    _check_logit_samples(logit_samples)
    return torch.softmax(logit_samples / temperature, dim=-1).mean(dim=0)

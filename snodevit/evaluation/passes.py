"""Seeded passes of a model over image sets: the one seeding rule of evaluation, image i gets ``seed + i``.

Two ways through the same rule:

* :func:`collect`: a labelled data set through ``loaded.predict`` (what ``snodevit evaluate`` reports, and what
  the tests compare the calibrate pipeline with);
* :func:`run_passes`: every set the calibrate pipeline measures (calibration and test splits, rotations, digits,
  pixel noise, far-OOD sets), as raw Monte Carlo logits plus the gate's feature densities, through the same
  ``draw_noise`` and ``sample_in_passes`` as ``predict``, so the logits and gate scores are the ones the
  service answers for these images.

Because an image's noise depends on its index only, not on its batch, every number is reproducible.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import calibration as cal
from calibration.conformal import conformal_quantile_index

from snodevit.data import (DIGIT_CLASSES, DatasetBundle, constant_images, inverted_images, letter_images,
    load_dataset, normalize, photo_crops, pixel_noise_images, resize_tensor, rotate_images, uniform_noise_images)
from snodevit.evaluation.config import FAR_OOD_SETS, CalibrateConfig, fitted_counts
from snodevit.inference.backends import LoadedModel
from snodevit.inference.passes import draw_noise, sample_in_passes
from snodevit.inference.summary import UncertaintySummary, summarize

logger = logging.getLogger(__name__)


def pass_seeds(seed: int, start: int, count: int) -> list[int]:
    """The seeds of ``count`` images starting at index ``start`` of a pass: image i gets ``seed + i``."""
    return list(range(seed + start, seed + start + count))


def collect(loaded: LoadedModel, dataset: Dataset, num_samples: int, seed: int, batch_size: int,
            progress: bool = True) -> dict[str, Tensor]:
    """Run the shared inference function over a labelled data set, image i seeded with ``seed + i``.

    Args:
        loaded: the model, with its stored calibration.
        dataset: yields (normalised image (C, H, W), int label), in a fixed order.
        num_samples: S Monte Carlo samples per image.
        seed: the seed of image 0.
        batch_size: images per ``predict`` call (the answers do not depend on it).
        progress: show a progress bar (on stderr).

    Returns:
        ``probs`` (N, C), ``labels`` (N,), ``total``/``aleatoric``/``epistemic`` (N,) and the raw ``logits``
        (S, N, C), on the CPU.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    out: dict[str, list] = {k: [] for k in ("probs", "labels", "total", "aleatoric", "epistemic", "logits")}
    start = 0
    for images, labels in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
        seeds = pass_seeds(seed, start, len(labels))
        start += len(labels)
        pred = loaded.predict(images, num_samples=num_samples, seed=seeds)
        s = pred.summary
        out["probs"].append(s.probs.cpu())
        out["labels"].append(labels)
        out["total"].append(s.total.cpu())
        out["aleatoric"].append(s.aleatoric.cpu())
        out["epistemic"].append(s.epistemic.cpu())
        out["logits"].append(pred.logits.cpu())
    return {k: torch.cat(v, dim=1 if k == "logits" else 0) for k, v in out.items()}


@dataclass
class Pass:
    """One pass over an image set: raw logits, the density gate scores and, once T is known, the served summary."""

    logits: Tensor  # (S, N, C) raw Monte Carlo logits
    labels: Tensor  # (N,) int64 (zeros for OOD sets)
    density: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # candidate -> (N,) mean over samples
    summary: UncertaintySummary | None = None
    temperature: float | None = None
    # fewer samples n -> the feature-density score of the mean over each image's first n samples, (N,)
    density_by_count: dict[int, Tensor] = dataclasses.field(default_factory=dict)

    def at_count(self, n: int) -> Pass:
        """The pass an answer of the first ``n`` samples would have given (each image's noise is drawn sample by
        sample, so those are exactly the samples of an n-sample run), scaled at this pass's temperature when known.

        Raises:
            KeyError: ``n`` is below S and no density score was kept for it.
        """
        if n == self.logits.shape[0]:
            return self
        density = {"feature_density": self.density_by_count[n]} if "feature_density" in self.density else {}
        out = Pass(self.logits[:n], self.labels, density)
        return out.scale(self.temperature) if self.temperature is not None else out

    def scale(self, temperature: float) -> Pass:
        """Summarise the logits at ``temperature``, as the service does; returns ``self``."""
        self.summary = summarize(self.logits, temperature)
        self.temperature = temperature
        return self

    def unscaled(self) -> Pass:
        """A new pass over the same logits at T = 1 (the figures before scaling)."""
        return Pass(self.logits, self.labels).scale(1.0)

    @property
    def s(self) -> UncertaintySummary:
        """The summary of the last :meth:`scale`."""
        if self.summary is None:
            raise RuntimeError("call scale(T) first")
        return self.summary

    @property
    def correct(self) -> Tensor:
        """(N,) bool: the top class is the label."""
        return self.s.prediction == self.labels

    def uncertainty(self, name: str) -> Tensor:
        """(N,) float64 uncertainty score ``name`` (UNCERTAINTY_SCORES), larger = less sure."""
        if name == "max_probability":
            return 1.0 - self.s.probs.double().max(dim=-1).values
        return {"entropy": self.s.total, "mutual_information": self.s.epistemic,
                "aleatoric": self.s.aleatoric}[name].double()

    def decision_scores(self, score: str) -> tuple[Tensor, bool]:
        """(N,) score the accept rule looks at, as ``snodevit.inference`` reads it, and whether higher is surer."""
        return (self.s.confidence, True) if score == "confidence" else (self.s.epistemic, False)

    def gate_score(self, name: str) -> Tensor:
        """(N,) float64 score of a single gate candidate (not a union), as ``OodGate`` computes it when served."""
        if name in self.density:
            return self.density[name]
        if name == "energy":
            assert self.temperature is not None
            t = self.temperature
            return (-t * torch.logsumexp(self.logits.double() / t, dim=-1)).mean(dim=0)
        if name == "mutual_information":
            return self.s.epistemic.double()
        if name == "max_probability":
            return 1.0 - self.s.confidence.double()
        raise KeyError(name)


@dataclass
class Passes:
    """The raw logits of every image set, in the order they were run."""

    calibration: Pass
    test: Pass
    rotated: dict[float, Pass]  # angle (degrees, not a multiple of 360) -> the rotated test split
    digits: Pass | None  # scikit-learn's digits, for digit models only
    pixel_noise: Pass  # the test split under heavy pixel noise (labelled)
    ood: dict[str, Pass]  # far-OOD set name -> its pass (labels are placeholders, but for inverted digits)

    def at_count(self, n: int) -> Passes:
        """Every pass as :meth:`Pass.at_count` of ``n`` samples."""
        def at(p: Pass | None) -> Pass | None:
            return None if p is None else p.at_count(n)
        return Passes(at(self.calibration), at(self.test), {a: at(p) for a, p in self.rotated.items()},  # type: ignore[arg-type,misc]
                      at(self.digits), at(self.pixel_noise), {k: at(p) for k, p in self.ood.items()})  # type: ignore[arg-type]

    def named(self) -> dict[str, Pass]:
        """Every evaluated set by display name: test, rotations, digits, pixel noise, then the far-OOD sets."""
        out = {"test": self.test}
        out |= {f"rotated {a:g}": p for a, p in sorted(self.rotated.items())}
        if self.digits is not None:
            out["sklearn digits"] = self.digits
        out["pixel noise"] = self.pixel_noise
        return out | dict(self.ood)


class Runner:
    """Runs the model over uint8 image sets with one progress bar over every image of every pass.

    Image i of a pass is seeded with ``cfg.seed + i`` (:func:`pass_seeds`) and batched by ``cfg.batch_size``, as
    `snodevit evaluate` and `snodevit score` seed and batch, through the same ``draw_noise`` and
    ``sample_in_passes`` as ``predict``.
    """

    def __init__(self, loaded: LoadedModel, cfg: CalibrateConfig, total: int, progress: bool) -> None:
        self.loaded = loaded
        self.cfg = cfg
        self.densities: dict[str, tuple[cal.FeatureDensity, slice]] = {}  # candidate -> density, feature groups
        self.bar = tqdm(total=total, desc="calibrate", unit="img", disable=not progress, dynamic_ncols=True)

    def _batches(self, name: str, images: Tensor, num_samples: int, features: bool) -> Iterator[tuple[Tensor, ...]]:
        self.bar.set_description(f"calibrate [{name}]")
        bs = self.cfg.batch_size
        backend = self.loaded.backend
        for start in range(0, len(images), bs):
            prep = self.loaded.preprocessing
            x = normalize(resize_tensor(images[start:start + bs], prep), prep).to(self.loaded.device)
            seeds = pass_seeds(self.cfg.seed, start, len(x))
            noise = draw_noise(backend, seeds, num_samples, device=x.device, dtype=x.dtype)
            with torch.no_grad():
                out = sample_in_passes(backend, x, noise, features=features, precision=self.loaded.precision)
            self.bar.update(len(x))
            yield out if isinstance(out, tuple) else (out,)

    def train_features(self, images: Tensor) -> Tensor:
        """(N, G, D) pooled features of one sample per training image, for fitting the density."""
        feats = [out[-1][0].double().cpu() for out in self._batches("training features", images, 1, True)]
        return torch.cat(feats)

    def run(self, name: str, images: Tensor, labels: Tensor) -> Pass:
        """Raw logits of ``images`` (uint8 (N, C, H, W)) and the mean per-sample score of every fitted density."""
        logits, density = [], {k: [] for k in self.densities}
        counts = [n for n in fitted_counts(self.cfg.num_samples) if n < self.cfg.num_samples]
        by_count: dict[int, list[Tensor]] = {n: [] for n in counts}
        for out in self._batches(name, images, self.cfg.num_samples, bool(self.densities)):
            logits.append(out[0].cpu())
            for key, (fd, groups) in self.densities.items():
                # as OodGate.image_scores: the density of the mean feature over the samples
                feats = out[-1][:, :, groups].cpu().double()
                density[key].append(fd.score(feats.mean(dim=0)))  # (B,)
                if key == "feature_density":
                    for n in counts:
                        by_count[n].append(fd.score(feats[:n].mean(dim=0)))
        return Pass(torch.cat(logits, dim=1), labels.to(torch.int64),  # (S, N, C)
                    {k: torch.cat(v) for k, v in density.items()},
                    density_by_count={n: torch.cat(v) for n, v in by_count.items() if v})

    def fit_densities(self, train: Tensor, train_labels: Tensor) -> None:
        """Fit the gate's densities on training features: every layer's, and the last block's alone."""
        feats = self.train_features(train)  # (N, G, D)
        groups = self.loaded.cfg.num_gate_features
        c = self.loaded.cfg.num_classes
        # rounded to float32 as meta.json keeps it, so every score measured here is the one served
        self.densities["feature_density"] = (cal.fit_feature_density(feats, train_labels, c).rounded(),
                                             slice(0, groups))
        last = slice(groups - 1, groups)
        self.densities["feature_density_last"] = (
            cal.fit_feature_density(feats[:, last], train_labels, c).rounded(), last)

    def close(self) -> None:
        """Close the progress bar."""
        self.bar.close()


def _cap(images: Tensor, labels: Tensor, cap: int | None) -> tuple[Tensor, Tensor]:
    """The first ``cap`` items (splits are in hash order, so a prefix is a class-mixed sample)."""
    return (images, labels) if cap is None else (images[:cap], labels[:cap])


def _check_inputs(loaded: LoadedModel, bundle: DatasetBundle, cfg: CalibrateConfig, n_cal: int) -> None:
    """Fail before the first forward pass, with a message a user can act on."""
    if bundle.preprocessing.channels != loaded.cfg.in_channels:
        raise ValueError(f"data set {bundle.spec} has {bundle.preprocessing.channels}-channel images, but the model "
                         f"expects {loaded.cfg.in_channels}; calibrate on the data the model was trained on")
    if bundle.num_classes != loaded.cfg.num_classes:
        raise ValueError(f"data set {bundle.spec} has {bundle.num_classes} classes, but the model predicts "
                         f"{loaded.cfg.num_classes}; calibrate on the data the model was trained on")
    for a in cfg.alphas:
        if conformal_quantile_index(n_cal, a) > n_cal:
            raise ValueError(f"alpha {a:g} is too small for {n_cal} calibration images: split conformal needs at "
                             f"least {math.ceil(1 / a - 1 - 1e-9)} (ceil((n + 1)(1 - alpha)) <= n); use a larger "
                             "alpha or more calibration data")
    if bundle.preprocessing.mean != loaded.preprocessing.mean or bundle.preprocessing.std != loaded.preprocessing.std:
        logger.warning("data set %s has mean/std %s/%s, the model %s/%s; images are normalised with the model's, "
                       "as the service does", bundle.spec, bundle.preprocessing.mean, bundle.preprocessing.std,
                       loaded.preprocessing.mean, loaded.preprocessing.std)


def _is_digit_model(loaded: LoadedModel) -> bool:
    """Whether scikit-learn's digits are a shifted domain of this model (one channel, classes 0-9)."""
    return loaded.cfg.in_channels == 1 and list(loaded.class_names) == list(DIGIT_CLASSES)


def run_passes(loaded: LoadedModel, bundle: DatasetBundle, cfg: CalibrateConfig,
               progress: bool) -> tuple[Passes, cal.FeatureDensity]:
    """Check the inputs, fit the feature densities on the training split, then run the model over every image set.

    Args:
        loaded: the model.
        bundle: its data set (training, calibration and test splits).
        cfg: seeds, batch size, samples, caps, angles and OOD set size.
        progress: show one progress bar over every pass (on stderr).

    Returns:
        The passes and the density of every feature group (what a ``feature_density`` gate serves).

    Raises:
        ValueError: images with another channel count or class count than the model, or an alpha too small for
            the calibration split.
    """
    prep = loaded.preprocessing
    cal_images, cal_labels = _cap(*bundle.raw("calibration"), cfg.max_images)
    test_images, test_labels = _cap(*bundle.raw("test"), cfg.max_images)
    train_images, train_labels = _cap(*bundle.raw("train"), cfg.max_train_images)
    _check_inputs(loaded, bundle, cfg, len(cal_labels))
    digits = _cap(*load_dataset("digits").raw("all"), cfg.max_images) if _is_digit_model(loaded) else None
    angles = [a for a in cfg.angles if a % 360.0 != 0.0]  # 0 degrees is the test pass itself
    total = (len(train_labels) + len(cal_labels) + len(test_labels) * (3 + len(angles))
             + (0 if digits is None else len(digits[1])) + cfg.num_ood * (len(FAR_OOD_SETS) - 1))
    runner = Runner(loaded, cfg, total, progress)
    try:
        runner.fit_densities(train_images, train_labels)
        no_label = torch.zeros(cfg.num_ood, dtype=torch.int64)
        passes = Passes(
            calibration=runner.run("calibration split", cal_images, cal_labels),
            test=runner.run("test split", test_images, test_labels),
            rotated={a: runner.run(f"rotated {a:g} deg", rotate_images(test_images, a), test_labels) for a in angles},
            digits=None if digits is None else runner.run("digits", *digits),
            pixel_noise=runner.run("pixel noise", pixel_noise_images(test_images, seed=cfg.seed), test_labels),
            ood={"uniform_noise": runner.run("uniform noise", uniform_noise_images(cfg.num_ood, prep, cfg.seed),
                                             no_label),
                 "photo_crops": runner.run("photo crops", photo_crops(cfg.num_ood, prep, cfg.seed), no_label),
                 "constant": runner.run("constant images", constant_images(cfg.num_ood, prep), no_label),
                 "inverted_digits": runner.run("inverted digits", inverted_images(test_images), test_labels),
                 "letters": runner.run("letters", letter_images(cfg.num_ood, prep, cfg.seed), no_label)})
    finally:
        runner.close()
    return passes, runner.densities["feature_density"][0]

"""Adaptive Monte Carlo sampling (``num_samples="auto"``): prefix noise, the stopping rule, its answers.

References: a plain ``predict`` call with the same seed and the number of samples the adaptive run used, a
simulation of the Monte Carlo spread of the uncertainty estimates, and the batch-scoring CLI's own rows.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import snodevit
from snodevit.cli.main import main
from snodevit.data.sets import load_dataset
from snodevit.inference.adaptive import AdaptiveSampling, settled
from snodevit.inference.fitted import Calibration
from snodevit.inference.passes import draw_noise
from snodevit.inference.predictor import predict
from snodevit.inference.summary import summarize, uncertainty_standard_errors
from snodevit.inference.records import prediction_records

SMALL = dict(snodevit.MNIST_OVERRIDES, dim=24, depth=2, num_heads=2, rank=4, time_hidden_dim=16, noise_dim=4)
CAL = Calibration(temperature=1.3, conformal_thresholds={"0.1": 0.8}, decision_threshold=0.6, target_risk=0.02)
# Loose enough that these random-weight images stop after different numbers of rounds (checked below).
MIXED = AdaptiveSampling(max_samples=16, first_round=4, round_size=4, z=1.0, tolerance=0.5)
NAMES = [str(i) for i in range(10)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Micro passes: on a machine shared with other jobs, two intra-op threads make them 10-100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> snodevit.SNodeViT:
    torch.manual_seed(0)
    m = snodevit.create_model("tiny", **SMALL).eval()
    torch.nn.init.normal_(m.head.weight)  # the head starts at zero; give the tests non-trivial answers
    return m


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    test = load_dataset("mnist5k").test
    return torch.stack([test[i][0] for i in range(12)])


def test_noise_of_n_samples_is_the_prefix_of_a_longer_draw(model) -> None:
    seeds = [3, 2**62, 0]
    full = draw_noise(model, seeds, 32)
    assert full.shape == model.noise_shape(3, 32)
    for n in (1, 5, 8, 17):
        assert torch.equal(draw_noise(model, seeds, n), full[:n])
    assert torch.equal(draw_noise(model, seeds[1:2], 9), full[:9, 1:2])  # a column depends only on its seed
    assert not torch.equal(full[:, 0], full[:, 2])


def test_rounds_and_argument_checks() -> None:
    assert AdaptiveSampling().rounds() == [8, 16, 24, 32]
    assert AdaptiveSampling(max_samples=32, first_round=5, round_size=10).rounds() == [5, 15, 25, 32]
    assert AdaptiveSampling(max_samples=4, first_round=4).rounds() == [4]
    for kwargs, name in [({"max_samples": 0}, "max_samples"), ({"first_round": 40}, "first_round"),
                         ({"round_size": 1.5}, "round_size"), ({"z": 0.0}, "z"),
                         ({"tolerance": math.nan}, "tolerance")]:
        with pytest.raises(ValueError, match=name):
            AdaptiveSampling(**kwargs)


def test_bad_num_samples_and_misplaced_rule_are_refused(model, images) -> None:
    for bad in (0, "many", 2.5, True):
        with pytest.raises(ValueError, match="num_samples"):
            predict(model, images[:1], num_samples=bad, seed=0)
    with pytest.raises(ValueError, match="adaptive"):
        predict(model, images[:1], num_samples=8, seed=0, adaptive=AdaptiveSampling())


def test_adaptive_answer_is_the_fixed_answer_with_the_samples_it_used(model, images) -> None:
    # float64, so that the other images in a pass cannot move the float32 answer by a rounding step.
    m, x = model.double(), images.double()
    try:
        seeds = list(range(100, 112))
        auto = predict(m, x, num_samples="auto", seed=seeds, calibration=CAL, adaptive=MIXED)
        assert len(set(auto.num_samples)) >= 3 and set(auto.num_samples) <= {4, 8, 12, 16}
        records = prediction_records(auto, NAMES, 3)
        for b, n in enumerate(auto.num_samples):
            plain = predict(m, x[b:b + 1], num_samples=n, seed=seeds[b], calibration=CAL)
            assert records[b] == prediction_records(plain, NAMES, 3)[0]  # every number, label and decision
            assert records[b]["num_samples"] == n
            assert torch.equal(auto.logits[:n, b], plain.logits[:, 0])
            assert torch.isnan(auto.logits[n:, b]).all()  # the samples it did not draw
    finally:
        model.float()


def test_lone_image_in_one_round_is_bit_identical_in_float32(model, images) -> None:
    rule = AdaptiveSampling(max_samples=32, first_round=8, tolerance=1e9, z=1e-9)  # settles at the first check
    for b in range(3):
        auto = predict(model, images[b:b + 1], num_samples="auto", seed=7, calibration=CAL, adaptive=rule)
        plain = predict(model, images[b:b + 1], num_samples=8, seed=7, calibration=CAL)
        assert auto.num_samples == [8]
        assert prediction_records(auto, NAMES, 3) == prediction_records(plain, NAMES, 3)


def test_unsettled_images_run_to_the_maximum_and_agree_with_fixed_s(model, images) -> None:
    rule = AdaptiveSampling(max_samples=12, first_round=4, round_size=4, tolerance=1e-12)
    auto = predict(model, images[:4], num_samples="auto", seed=5, calibration=CAL, adaptive=rule)
    fixed = predict(model, images[:4], num_samples=12, seed=5, calibration=CAL)
    assert auto.num_samples == [12] * 4
    torch.testing.assert_close(auto.logits, fixed.logits, atol=1e-5, rtol=1e-5)  # passes of 4 rows vs one of 12
    assert torch.equal(auto.summary.prediction, fixed.summary.prediction) and torch.equal(auto.accept, fixed.accept)


def test_identical_samples_settle_at_once_and_flipping_labels_do_not() -> None:
    rule = AdaptiveSampling(z=3.0, tolerance=0.05)
    same = torch.tensor([[2.0, 0.0, -1.0]]).expand(8, 1, 3)
    assert settled(same, Calibration(), rule).tolist() == [True]
    assert settled(same[:1], Calibration(), rule).tolist() == [False]  # one sample: no spread to judge from
    flip = torch.tensor([[[3.0, 0.0, 0.0]], [[0.0, 3.0, 0.0]]]).repeat(4, 1, 1)  # (8, 1, 3), top class alternates
    flip[0, 0, 0] += 0.1
    assert settled(flip, Calibration(), AdaptiveSampling(tolerance=1e9)).tolist() == [False]
    # A confident label whose confidence sits on the decision threshold is not settled; far from it, it is.
    near = torch.tensor([[[2.0, 0.0, 0.0]], [[2.2, 0.0, 0.0]]]).repeat(4, 1, 1)
    conf = float(summarize(near).confidence[0])
    loose = AdaptiveSampling(tolerance=1e9)
    assert settled(near, Calibration(decision_threshold=conf), loose).tolist() == [False]
    assert settled(near, Calibration(decision_threshold=conf - 0.3), loose).tolist() == [True]


def test_uncertainty_standard_errors_match_the_spread_over_repeated_runs() -> None:
    # Sample probabilities of one image come from a fixed distribution; the standard deviation of the estimates
    # over many independent runs of n samples is the reference for the delta-method standard errors.
    gen = torch.Generator().manual_seed(0)
    n, runs, c = 32, 4000, 4
    centre = torch.tensor([1.5, 0.5, 0.0, -0.5], dtype=torch.float64)
    logits = centre + 0.6 * torch.randn(runs, n, c, generator=gen, dtype=torch.float64)
    p_s = torch.softmax(logits, dim=-1).transpose(0, 1)  # (n, runs, C): each column one run of n samples
    s = summarize(logits.transpose(0, 1))
    spread = [s.total.double().std(), s.aleatoric.double().std(), s.epistemic.double().std()]
    estimated = [se.mean() for se in uncertainty_standard_errors(p_s)]
    for ref, est in zip(spread, estimated):
        assert float(est) == pytest.approx(float(ref), rel=0.1)


def test_score_cli_auto_reports_the_samples_each_image_used(model, images, tmp_path: Path) -> None:
    raw, _ = load_dataset("mnist5k").raw("test")
    paths = []
    for i in range(5):
        buf = io.BytesIO()
        Image.fromarray(raw[i, 0].numpy()).save(buf, "PNG")
        (tmp_path / f"d{i}.png").write_bytes(buf.getvalue())
        paths.append(tmp_path / f"d{i}.png")
    model_dir = snodevit.save_model(model, tmp_path / "model", meta={
        "class_names": NAMES, "preprocessing": load_dataset("mnist5k").preprocessing.to_dict(),
        "calibration": CAL.to_dict()})
    out = tmp_path / "rows.csv"
    code = main(["score", *map(str, paths), "--model", str(model_dir), "--out", str(out), "--num-samples", "auto",
                 "--seed", "4", "--no-progress", "--workers", "0", "--json"])
    assert code == 0
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    pred = predict(model, images[:5], num_samples="auto", seed=4, calibration=CAL)
    for i, rec in enumerate(prediction_records(pred, NAMES, 3)):
        row = rows[f"d{i}.png"]
        assert int(row["num_samples"]) == rec["num_samples"] and 8 <= rec["num_samples"] <= 32
        assert (row["label"], row["decision"]) == (rec["label"], rec["decision"])
    with pytest.raises(SystemExit) as exit_info:
        main(["score", str(paths[0]), "--model", str(model_dir), "--out", str(tmp_path / "x.csv"),
              "--num-samples", "sometimes"])
    assert exit_info.value.code == 2

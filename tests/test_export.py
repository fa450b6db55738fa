"""ONNX export: ONNX Runtime against PyTorch on the same noise, dynamic B and S, metadata, bad files, the CLI.

Each model is exported once per module (exports take seconds); the batch size and sample count are varied at
run time, which is what proves they are dynamic in the graph.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest
import torch

import snodevit
from export import OnnxModelError, OnnxPredictor, check_parity, export_onnx, read_onnx_metadata
from snodevit import MNIST_OVERRIDES, Calibration, SNodeViT, create_model, predict, save_model
from snodevit.checkpoint import read_meta, weights_hash
from snodevit.cli.main import main
from snodevit.config import ATTENTION_TYPES
from snodevit.data import Preprocessing

TOL = 1e-4
SMALL = dict(MNIST_OVERRIDES, dim=24, depth=2, num_heads=2, rank=4, time_hidden_dim=16, noise_dim=4)
META: dict[str, Any] = {
    "class_names": [f"digit {i}" for i in range(10)],
    "preprocessing": {"image_size": 28, "channels": 1, "mean": [0.1307], "std": [0.3081], "resize": "pad_resize"},
    "calibration": {"temperature": 1.7, "conformal_score": "lac", "conformal_thresholds": {"0.1": 0.9},
                    "decision_score": "epistemic", "decision_threshold": 0.05, "target_risk": 0.02},
}
# name -> (model overrides, export with attention maps)
VARIANTS: dict[str, tuple[dict[str, Any], bool]] = {
    "ksvd-sde-euler": ({}, False),
    "ksvd-sde-heun-maps": (dict(solver="heun"), True),
    "softmax-ode-euler": (dict(attention="softmax", noise_dim=0), False),
    "ksvd-sde-last-block-maps": (dict(noise_blocks=1), True),  # ODE prefix shared by the samples
}


def _model(**kw: Any) -> SNodeViT:
    torch.manual_seed(0)
    m = create_model("tiny", **{**SMALL, **kw}).eval()
    torch.nn.init.normal_(m.head.weight)  # the head starts at zero; give the tests non-trivial logits
    return m


def _images(b: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


class Exported:
    def __init__(self, name: str, model: SNodeViT, path: Path) -> None:
        self.name, self.model, self.path = name, model, path
        self.predictor = OnnxPredictor(path, device="cpu", intra_op_threads=1)


@pytest.fixture(scope="module")
def get_export(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Exported]:
    """Export each variant on first use, once per module."""
    cache: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in cache:
            overrides, maps = VARIANTS[name]
            model = _model(**overrides)
            path = export_onnx(model, tmp_path_factory.mktemp(name) / "model.onnx", meta=META, attention_maps=maps)
            cache[name] = Exported(name, model, path)
        return cache[name]

    return get


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request: pytest.FixtureRequest, get_export: Callable[[str], Exported]) -> Exported:
    return get_export(request.param)


# ----------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("s", [1, 8])
def test_onnx_runtime_matches_pytorch_on_the_same_noise(exported: Exported, b: int, s: int) -> None:
    m = exported.model
    x = _images(b)
    noise = torch.randn(m.noise_shape(b, s), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m.sample_logits(x, noise=noise)
    got = exported.predictor.sample_logits(x, noise=noise)
    assert got.shape == (s, b, 10) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    diff = float((got - ref).abs().max())
    assert diff <= TOL, f"{exported.name} B={b} S={s}: max abs diff {diff:.2e}"


def test_noise_is_a_live_input_and_zero_noise_gives_the_deterministic_path(exported: Exported) -> None:
    m, pred = exported.model, exported.predictor
    x = _images(2)
    zero = torch.zeros(m.noise_shape(2, 3))
    got = pred.sample_logits(x, noise=zero)
    with torch.no_grad():
        tokens, _ = m.integrate(m.embed(x), None)  # the ODE: no diffusion term at all
        ode = m.forward_head(tokens)
    assert float((got - ode).abs().max()) <= TOL
    assert float((got - got[:1]).abs().max()) == 0.0  # every sample identical
    noisy = pred.sample_logits(x, noise=torch.randn(m.noise_shape(2, 3), generator=torch.Generator().manual_seed(3)))
    spread = float((noisy - noisy[:1]).abs().max())
    if m.cfg.stochastic:
        assert spread > 1e-3, "the graph ignores its noise input"
    else:
        assert spread == 0.0


def test_noise_drawn_from_a_generator_matches_the_model(exported: Exported) -> None:
    x = _images(3)
    with torch.no_grad():
        ref = exported.model.sample_logits(x, 4, generator=torch.Generator().manual_seed(5))
    got = exported.predictor.sample_logits(x, 4, generator=torch.Generator().manual_seed(5))
    assert float((got - ref).abs().max()) <= TOL


def test_predict_gives_the_same_answer_on_both_backends(exported: Exported) -> None:
    pytest.importorskip("calibration.conformal")  # predict builds the conformal sets with it
    m, pred = exported.model, exported.predictor
    x = _images(3, seed=7)
    maps = pred.has_attention
    kwargs = dict(num_samples=6, seed=[11, 12, 13], calibration=pred.calibration, alpha=0.1, attention=maps,
                  pool=pred.cfg.pool)
    a = predict(pred, x, **kwargs)
    b = predict(m, x, **kwargs)
    assert a.seeds == b.seeds == [11, 12, 13]
    assert float((a.logits - b.logits).abs().max()) <= TOL
    for field in ("probs", "total", "aleatoric", "epistemic", "std"):
        diff = float((getattr(a.summary, field) - getattr(b.summary, field)).abs().max())
        assert diff <= TOL, f"{field}: {diff:.2e}"
    assert a.prediction_sets is not None and torch.equal(a.prediction_sets, b.prediction_sets)
    assert torch.equal(a.accept, b.accept)
    if maps:
        assert a.attention is not None and b.attention is not None and a.rollout is not None
        assert float((a.attention - b.attention).abs().max()) <= TOL
        assert float((a.rollout - b.rollout).abs().max()) <= TOL


def test_attention_output_matches_pytorch(get_export: Callable[[str], Exported]) -> None:
    e = get_export("ksvd-sde-heun-maps")
    m = e.model
    x = _images(3)
    noise = torch.randn(m.noise_shape(3, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref_logits, ref_attn = m.sample_logits(x, noise=noise, return_attention=True)
    logits, attn = e.predictor.sample_logits(x, noise=noise, return_attention=True)
    assert attn.shape == (8, 3, m.cfg.depth, m.cfg.num_tokens, m.cfg.num_tokens)
    assert float((logits - ref_logits).abs().max()) <= TOL
    assert float((attn - ref_attn).abs().max()) <= TOL
    assert torch.allclose(attn.sum(-1), torch.ones(()), atol=1e-4)  # rows stay stochastic


# ----------------------------------------------------------------------------------------------- metadata
def test_metadata_round_trips_and_the_file_alone_describes_the_model(exported: Exported) -> None:
    md = read_onnx_metadata(exported.path)
    m, pred = exported.model, exported.predictor
    assert md["config"] == m.cfg == pred.cfg
    assert md["class_names"] == pred.class_names == META["class_names"]
    assert md["preprocessing"] == pred.preprocessing == Preprocessing.from_dict(META["preprocessing"])
    assert md["calibration"] == pred.calibration == Calibration.from_dict(META["calibration"])
    assert md["weights_sha256"] == pred.weights_sha256 == weights_hash(m)
    assert md["version"] == snodevit.__version__
    graph_opset = {o.domain: o.version for o in onnx.load(str(exported.path)).opset_import}[""]
    assert md["opset"] == graph_opset >= 18
    c = m.cfg
    assert md["noise_shape"] == {"rule": "(S, B, L, K, N, m)", "L": c.num_noise_blocks or c.depth, "K": c.num_steps,
                                 "N": c.num_tokens, "m": c.noise_dim}
    assert md["dynamic"] is True and md["static_sizes"] is None
    want = {"logits", "attention", "features"} if VARIANTS[exported.name][1] else {"logits", "features"}
    assert set(md["outputs"]) == want  # every graph carries the OOD gate's features
    assert pred.noise_shape(3, 5) == m.noise_shape(3, 5)
    assert SNodeViT(md["config"]).noise_shape(2, 4) == m.noise_shape(2, 4)  # rebuildable from the file


def _refuse_non_strict(token: str) -> None:
    raise AssertionError(f"not strict JSON: holds {token}")


def test_metadata_is_strict_json_and_reads_infinite_thresholds_back() -> None:
    """A calibration that accepts nothing and puts every class in the set; and one from an older meta.json."""
    from export.metadata import decode_metadata, encode_metadata

    cfg = _model().cfg
    for threshold in (float("inf"), "Infinity"):  # an older meta.json's float inf, and what to_dict writes now
        calibration = {**META["calibration"], "conformal_thresholds": {"0.1": threshold},
                       "decision_score": "confidence", "decision_threshold": threshold}
        props = encode_metadata(cfg, {**META, "calibration": calibration}, weights_sha256="ab" * 32, opset=18,
                                attention_maps=False, static_sizes=None, version="test")
        written = json.loads(props["snodevit.calibration"], parse_constant=_refuse_non_strict)
        assert written["decision_threshold"] == written["conformal_thresholds"]["0.1"] == "Infinity"
        md = decode_metadata(props, "test.onnx")
        assert md["calibration"].decision_threshold == md["calibration"].threshold_for(0.1) == float("inf")


def _foreign_onnx(path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "foreign", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, str(path))


@pytest.mark.parametrize("kind, problem", [
    ("truncated", "not a readable ONNX model"),
    ("empty", "is empty"),
    ("random-bytes", "not a readable ONNX model"),
    ("foreign", "no snodevit metadata"),
    ("stripped", "no snodevit metadata"),
])
def test_unusable_files_raise_a_clear_error(get_export: Callable[[str], Exported], tmp_path: Path, kind: str,
                                            problem: str) -> None:
    good = get_export("ksvd-sde-euler").path
    bad = tmp_path / f"{kind}.onnx"
    data = good.read_bytes()
    if kind == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "random-bytes":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "foreign":
        _foreign_onnx(bad)
    else:  # our graph with the metadata removed
        proto = onnx.load(str(good))
        del proto.metadata_props[:]
        onnx.save(proto, str(bad))
    pattern = re.escape(str(bad)) + ".*" + problem
    with pytest.raises(OnnxModelError, match=pattern):
        OnnxPredictor(bad, device="cpu")
    with pytest.raises(OnnxModelError, match=pattern):
        read_onnx_metadata(bad)
    assert issubclass(OnnxModelError, ValueError)


def test_missing_file_and_unusable_device(get_export: Callable[[str], Exported], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        OnnxPredictor(tmp_path / "nope.onnx")
    good = get_export("ksvd-sde-euler").path
    with pytest.raises(ValueError, match="device"):
        OnnxPredictor(good, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            OnnxPredictor(good, device="cuda")
        # "auto" must not even request the CUDA provider here, so ONNX Runtime logs no CUDA error
        assert OnnxPredictor(good).providers == ["CPUExecutionProvider"]


def test_input_contract(get_export: Callable[[str], Exported]) -> None:
    e = get_export("ksvd-sde-euler")
    pred, m = e.predictor, e.model
    with pytest.raises(ValueError, match=r"images must have shape \(B, 1, 28, 28\)"):
        pred.sample_logits(torch.zeros(2, 3, 28, 28), 2)
    with pytest.raises(ValueError, match="floating point"):
        pred.sample_logits(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="noise must have shape"):
        pred.sample_logits(_images(2), noise=torch.zeros(m.noise_shape(3, 2)))
    with pytest.raises(ValueError, match="noise must have shape"):
        pred.sample_logits(_images(2), num_samples=4, noise=torch.zeros(m.noise_shape(2, 2)))
    with pytest.raises(ValueError, match="num_samples"):
        pred.sample_logits(_images(2))
    with pytest.raises(ValueError, match="--attention-maps"):
        pred.sample_logits(_images(2), 2, return_attention=True)
    # float64 inputs are accepted and cast, as the model would compute them in float32
    noise = torch.randn(m.noise_shape(2, 2), generator=torch.Generator().manual_seed(0))
    got = pred.sample_logits(_images(2).double(), noise=noise.double())
    with torch.no_grad():
        assert float((got - m.sample_logits(_images(2), noise=noise)).abs().max()) <= TOL


# ----------------------------------------------------------------------------------------------- options
def test_static_export_at_opset_18_and_argument_checks(tmp_path: Path) -> None:
    m = _model(depth=1, num_steps=1)
    with pytest.raises(ValueError, match="opset must be >= 18"):
        export_onnx(m, tmp_path / "a.onnx", meta=META, opset=17)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        export_onnx(m, tmp_path / "a.onnx", meta=META, batch_size=1)
    with pytest.raises(ValueError, match="preprocessing"):
        export_onnx(m, tmp_path / "a.onnx", meta={"class_names": META["class_names"]})
    with pytest.raises(ValueError, match="class names"):
        export_onnx(m, tmp_path / "a.onnx", meta={**META, "class_names": ["a", "b"]})
    assert not list(tmp_path.iterdir())  # nothing written by the failed calls

    m.train()
    path = export_onnx(m, tmp_path / "static.onnx", meta=META, opset=18, dynamic=False, batch_size=2, num_samples=3)
    assert m.training  # the caller's mode is restored
    m.eval()
    proto = onnx.load(str(path))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    dims = [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    assert dims[0][0] == 2 and dims[1][:2] == [3, 2]  # fixed B and S
    pred = OnnxPredictor(path, device="cpu")
    assert pred.metadata["dynamic"] is False and pred.metadata["static_sizes"] == {"batch_size": 2, "num_samples": 3}
    assert check_parity(m, pred, batch_size=2, num_samples=3) <= TOL
    with pytest.raises(ValueError, match="static shapes"):
        pred.sample_logits(_images(1), 3)
    assert [p.name for p in tmp_path.iterdir()] == ["static.onnx"]  # no temp file left behind


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_exports_a_checkpoint_and_reports_parity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _model(attention="softmax", noise_dim=0, solver="heun")
    save_model(model, tmp_path / "ckpt", meta=META)
    out = tmp_path / "out" / "model.onnx"
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--out", str(out), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["path"] == str(out) and figures["size_bytes"] == out.stat().st_size > 0
    assert 0.0 <= figures["parity_max_abs_diff"] <= TOL
    assert figures["attention_maps"] is False and figures["opset"] >= 18
    pred = OnnxPredictor(out, device="cpu")
    assert pred.class_names == META["class_names"]
    assert pred.weights_sha256 == weights_hash(model) == read_meta(tmp_path / "ckpt")["weights_sha256"]
    assert pred.calibration == Calibration.from_dict(META["calibration"])
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]

    assert main(["export", "--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "model.txt")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and ".onnx" in err


# ----------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_provider_with_iobinding(exported: Exported) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider")
    pred = OnnxPredictor(exported.path, device="cuda")
    assert pred.providers[0] == "CUDAExecutionProvider" and pred.device.type == "cuda"
    m = exported.model
    x = _images(3).cuda()
    noise = torch.randn(m.noise_shape(3, 8), generator=torch.Generator().manual_seed(2)).cuda()
    got = pred.sample_logits(x, noise=noise)  # bound to the CUDA tensors, no host copy
    assert got.is_cuda and got.shape == (8, 3, 10)
    with torch.no_grad():
        ref = m.sample_logits(x.cpu(), noise=noise.cpu())
    assert float((got.cpu() - ref).abs().max()) <= 1e-3  # TF32 convolutions on the GPU
    if pred.has_attention:
        logits, attn = pred.sample_logits(x, noise=noise, return_attention=True)
        assert logits.is_cuda and attn.is_cuda and attn.shape[:2] == (8, 3)


# ----------------------------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("attention", [a for a in ATTENTION_TYPES if a not in ("ksvd", "softmax")])
def test_every_other_attention_backend_exports_and_matches(attention: str, tmp_path: Path) -> None:
    m = _model(attention=attention, depth=1, num_steps=1)  # one drift evaluation keeps the export short
    pred = OnnxPredictor(export_onnx(m, tmp_path / "m.onnx", meta=META, attention_maps=True), device="cpu")
    x = _images(3)
    noise = torch.randn(m.noise_shape(3, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_logits, ref_attn = m.sample_logits(x, noise=noise, return_attention=True)
    logits, attn = pred.sample_logits(x, noise=noise, return_attention=True)
    assert float((logits - ref_logits).abs().max()) <= TOL
    assert float((attn - ref_attn).abs().max()) <= TOL


# ----------------------------------------------------------------------------------------------- OOD gate
def test_features_output_matches_pytorch(exported: Exported) -> None:
    m = exported.model
    x = _images(3)
    noise = torch.randn(m.noise_shape(3, 4), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = m.sample_logits(x, noise=noise, return_features=True)[1]
    got_logits, got = exported.predictor.sample_logits(x, noise=noise, return_features=True)
    assert got.shape == (4, 3, m.cfg.num_gate_features, m.cfg.gate_feature_dim)
    assert float((got - ref).abs().max()) <= TOL


def _gated_meta(model: SNodeViT) -> tuple[dict[str, Any], Calibration]:
    """META plus a feature-density gate fitted on the model's own features of random images, with a threshold
    at the median score of other images, so that about half of a test batch is flagged."""
    import dataclasses

    from calibration import fit_feature_density
    from snodevit.inference.fitted import OodGate

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(120, 1, 28, 28, generator=gen)
    with torch.no_grad():
        feats = model.sample_logits(x, noise=torch.randn(model.noise_shape(120, 1), generator=gen),
                                    return_features=True)[1][0]
    density = fit_feature_density(feats.double(), torch.arange(120) % 10, 10)
    probe = _images(40, seed=21) * 1.5
    with torch.no_grad():
        probe_feats = model.sample_logits(probe, noise=torch.randn(model.noise_shape(40, 1), generator=gen),
                                          return_features=True)[1][0]
    threshold = float(density.score(probe_feats.double()).median())
    base = Calibration.from_dict(META["calibration"])
    gated = dataclasses.replace(base, ood_gate=OodGate(score="feature_density", threshold=threshold,
                                                       review_rate=0.05, density=density, calibration_images=40))
    return {**META, "calibration": gated.to_dict()}, Calibration.from_dict(gated.to_dict())


@pytest.mark.parametrize("variant", ["ksvd-sde-euler", "ksvd-sde-last-block-maps"])
def test_gate_decisions_are_identical_on_both_backends(variant: str, tmp_path: Path) -> None:
    overrides, _ = VARIANTS[variant]
    m = _model(**overrides)
    meta, gated = _gated_meta(m)
    pred = OnnxPredictor(export_onnx(m, tmp_path / "model.onnx", meta=meta), device="cpu", intra_op_threads=1)
    assert pred.calibration == gated  # the density travels in the graph's metadata, to the bit
    x = _images(40, seed=21) * 1.5  # the probe images: about half above the threshold
    kwargs = dict(num_samples=4, seed=list(range(40)), calibration=pred.calibration)
    a, b = predict(pred, x, **kwargs), predict(m, x, **kwargs)
    assert a.ood_score is not None and b.ood_score is not None and a.out_of_distribution is not None
    assert float((a.ood_score - b.ood_score).abs().max()) <= 1e-4 * float(b.ood_score.abs().max())
    assert torch.equal(a.out_of_distribution, b.out_of_distribution)
    assert 5 <= int(a.out_of_distribution.sum()) <= 35  # the gate really splits the batch
    assert torch.equal(a.accept, b.accept) and a.reason_codes == b.reason_codes
    assert all(code == "out_of_distribution" for code, f in zip(a.reason_codes, a.out_of_distribution) if f)
    # the score is the density of each image's mean feature over its samples (an independent recomputation)
    from snodevit.inference.passes import draw_noise

    noise = draw_noise(m, list(range(40)), 4)
    with torch.no_grad():
        feats = m.sample_logits(x, noise=noise, return_features=True)[1]
    assert gated.ood_gate is not None and gated.ood_gate.density is not None
    ref = gated.ood_gate.density.score(feats.double().mean(dim=0))
    # float32 features from another batch split: equal to float32 rounding, amplified by the inverse covariance
    assert float((b.ood_score - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_gated_calibration_refuses_a_graph_without_features(get_export: Callable[[str], Exported],
                                                             tmp_path: Path) -> None:
    import onnx

    exp = get_export("ksvd-sde-euler")
    meta, _ = _gated_meta(exp.model)
    path = export_onnx(exp.model, tmp_path / "gated.onnx", meta=meta)
    proto = onnx.load(str(path))
    keep = [o for o in proto.graph.output if o.name != "features"]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)  # what a graph exported before the gate existed looks like
    onnx.save(proto, str(tmp_path / "old.onnx"))
    with pytest.raises(OnnxModelError, match="re-export"):
        OnnxPredictor(tmp_path / "old.onnx", device="cpu")

"""Service tier 1 (unit): the service class called directly with a tiny model, and its parts on their own.

The service answers with the numbers of ``snodevit.inference.predict`` +
``snodevit.inference.records.prediction_records``
(the functions the CLI uses), batches concurrent requests without changing their answers beyond float32
round-off, and refuses bad parameters and images with the common error shape.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from starlette.responses import JSONResponse, Response

from service.testing import CALIBRATION, CALIBRATION_FIGURES, prepare_service

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

EXAMPLES = Path(__file__).parent.parent / "examples"
DIGIT_7 = EXAMPLES / "digit_7.png"


@pytest.fixture(scope="module")
def prepared():
    return prepare_service()


@pytest.fixture(scope="module")
def svc(prepared):
    instance = prepared.service_class()
    yield instance
    instance.engine.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def without_timing(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k != "timing"}


def error_of(result: Any) -> tuple[int, dict[str, str]]:
    assert isinstance(result, JSONResponse), f"expected an error response, got {result!r}"
    return result.status_code, json.loads(result.body)


# --------------------------------------------------------------------------------------------- the service


def test_ready_after_warm_up(svc) -> None:
    assert svc.__is_ready__() is True
    info = svc.engine.info
    assert info.backend == "torch" and info.device == "cpu" and info.name == "snodevit-test"


def test_classify_matches_the_shared_inference_path(svc, prepared) -> None:
    """Same image, seed and samples: the numbers of open_model().predict + prediction_records, to the bit."""
    from snodevit.data import decode_image, preprocess
    from snodevit.inference.backends import open_model
    from snodevit.inference.records import prediction_records

    answer = run(svc.classify(image=DIGIT_7, num_samples=8, seed=5, top_k=4, alpha=0.1)).model_dump()
    loaded = open_model(prepared.model_dir)
    x = preprocess(decode_image(DIGIT_7.read_bytes()), loaded.preprocessing)[None]
    expected = prediction_records(loaded.predict(x, num_samples=8, seed=[5], alpha=0.1), loaded.class_names, 4)[0]
    assert {k: answer[k] for k in expected} == expected
    assert answer["model"]["version"] == loaded.version and answer["timing"]["batch_size"] == 1


def test_answer_fields_are_consistent(svc) -> None:
    a = run(svc.classify(image=DIGIT_7, num_samples=8, seed=1, top_k=3, alpha=None)).model_dump()
    probs = [e["probability"] for e in a["top_k"]]
    assert len(a["top_k"]) == 3 and probs == sorted(probs, reverse=True)
    assert a["top_k"][0]["label"] == a["label"] and a["confidence"] == probs[0]
    u = a["uncertainty"]
    assert u["total"] == pytest.approx(u["aleatoric"] + u["epistemic"], abs=1e-5)
    assert 0 <= u["epistemic"] and u["total"] <= math.log(10) + 1e-6 and u["std"] >= 0
    assert a["alpha"] == 0.05  # the smallest fitted alpha by default
    assert a["decision"] == ("accept" if a["confidence"] >= CALIBRATION["decision_threshold"] else "review")
    assert "threshold" in a["reason"] and a["num_samples"] == 8 and a["seed"] == 1
    t = a["timing"]
    assert t["batch_size"] >= 1 and min(t["decode_ms"], t["queue_ms"], t["inference_ms"]) >= 0
    assert t["total_ms"] >= t["inference_ms"]


def test_same_seed_same_answer_other_seed_other_answer(svc) -> None:
    first = run(svc.classify(image=DIGIT_7, num_samples=8, seed=42, top_k=3, alpha=None)).model_dump()
    again = run(svc.classify(image=DIGIT_7, num_samples=8, seed=42, top_k=3, alpha=None)).model_dump()
    other = run(svc.classify(image=DIGIT_7, num_samples=8, seed=43, top_k=3, alpha=None)).model_dump()
    assert without_timing(first) == without_timing(again)
    assert other["uncertainty"] != first["uncertainty"]  # the SDE noise differs


def test_drawn_seed_is_returned_and_reproduces(svc) -> None:
    drawn = run(svc.classify(image=DIGIT_7, num_samples=8, seed=None, top_k=3, alpha=None)).model_dump()
    replay = run(svc.classify(image=DIGIT_7, num_samples=8, seed=drawn["seed"], top_k=3, alpha=None)).model_dump()
    assert without_timing(replay) == without_timing(drawn)


def test_concurrent_requests_share_forward_passes(svc) -> None:
    """Requests arriving together are answered in shared passes, with the answers they get alone."""
    images = [EXAMPLES / f"digit_{d}.png" for d in (7, 2, 0)] * 3
    alone = [run(svc.classify(image=p, num_samples=8, seed=i, top_k=3, alpha=None)).model_dump()
             for i, p in enumerate(images)]

    async def together() -> list[Any]:
        return await asyncio.gather(*(svc.classify(image=p, num_samples=8, seed=i, top_k=3, alpha=None)
                                      for i, p in enumerate(images)))

    shared = [a.model_dump() for a in run(together())]
    assert max(a["timing"]["batch_size"] for a in shared) > 1
    for a, b in zip(shared, alone):
        assert a["label"] == b["label"] and a["seed"] == b["seed"] and a["decision"] == b["decision"]
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)  # float32 round-off of the batch shape
        assert a["uncertainty"]["epistemic"] == pytest.approx(b["uncertainty"]["epistemic"], abs=1e-5)


def test_mixed_num_samples_and_alpha_in_one_batch(svc) -> None:
    async def together() -> list[Any]:
        return await asyncio.gather(
            svc.classify(image=DIGIT_7, num_samples=8, seed=3, top_k=2, alpha=0.05),
            svc.classify(image=DIGIT_7, num_samples=4, seed=3, top_k=5, alpha=0.1),
            svc.classify(image=DIGIT_7, num_samples=8, seed=3, top_k=1, alpha=0.1))

    a, b, c = (x.model_dump() for x in run(together()))
    assert (a["num_samples"], b["num_samples"], c["num_samples"]) == (8, 4, 8)
    assert (a["alpha"], b["alpha"], c["alpha"]) == (0.05, 0.1, 0.1)
    assert (len(a["top_k"]), len(b["top_k"]), len(c["top_k"])) == (2, 5, 1)
    assert set(a["prediction_set"]) >= set(c["prediction_set"])  # a smaller alpha gives a larger (or equal) set


def test_classify_batch_answers_in_order(svc) -> None:
    paths = [EXAMPLES / f"digit_{d}.png" for d in (7, 2, 0, 7)]
    batch = run(svc.classify_batch(images=paths, num_samples=8, seed=9, top_k=3, alpha=None)).model_dump()
    assert [r["index"] for r in batch["results"]] == [0, 1, 2, 3]
    assert batch["results"][0]["timing"]["batch_size"] == 4
    single = run(svc.classify(image=paths[1], num_samples=8, seed=9, top_k=3, alpha=None)).model_dump()
    assert batch["results"][1]["label"] == single["label"]
    assert batch["results"][1]["confidence"] == pytest.approx(single["confidence"], abs=1e-5)
    first, last = batch["results"][0], batch["results"][3]  # the same image and seed in one pass: identical
    assert without_timing({**first, "index": 0}) == without_timing({**last, "index": 0})


def test_explain_maps_are_distributions_over_patches(svc) -> None:
    e = run(svc.explain(image=DIGIT_7, num_samples=8, seed=4, top_k=3, alpha=None)).model_dump()
    g, depth = e["grid_size"], e["depth"]
    assert (g, depth) == (7, 2) and e["pool"] == "cls"
    layers, rollout = torch.tensor(e["layers"]), torch.tensor(e["rollout"])
    assert layers.shape == (depth, g, g) and rollout.shape == (g, g)
    assert torch.allclose(layers.sum(dim=(1, 2)), torch.ones(depth), atol=1e-5)
    assert rollout.sum().item() == pytest.approx(1.0, abs=1e-5) and (layers >= 0).all()
    c = run(svc.classify(image=DIGIT_7, num_samples=8, seed=4, top_k=3, alpha=None)).model_dump()
    assert e["prediction"]["label"] == c["label"]
    assert e["prediction"]["confidence"] == pytest.approx(c["confidence"], abs=1e-5)


def test_explain_image_is_a_png_overlay(svc) -> None:
    r = run(svc.explain_image(image=DIGIT_7, num_samples=4, seed=4, top_k=3, alpha=None, layer=None))
    assert isinstance(r, Response) and r.media_type == "image/png"
    im = Image.open(io.BytesIO(r.body))
    assert im.format == "PNG" and im.mode == "RGB" and im.size == (224, 224)
    assert r.headers["x-snodevit-seed"] == "4" and r.headers["x-snodevit-label"] in [str(i) for i in range(10)]
    layer1 = run(svc.explain_image(image=DIGIT_7, num_samples=4, seed=4, top_k=3, alpha=None, layer=1))
    assert layer1.body != r.body  # a block's own map, not the rollout


def test_metadata_describes_model_calibration_and_limits(svc) -> None:
    md = json.loads(svc.metadata_response().body)
    assert md["classes"] == [str(i) for i in range(10)]
    assert md["calibration"]["alphas"] == [0.05, 0.1] and md["calibration"]["temperature"] == 1.3
    figures = md["calibration"]["figures"]  # what `snodevit calibrate` measured, from meta.json
    assert figures["ece_before"] == 0.08 and figures["ece_after"] == 0.02
    assert figures["coverage"] == CALIBRATION_FIGURES["coverage"] and figures["selective_risk"] == 0.015
    assert figures["bare_coverage"] == CALIBRATION_FIGURES["bare_coverage"]
    assert figures["ood_auroc_mutual_information"] == {"uniform_noise": 0.92, "photo_crops": None}
    assert not {"model", "out", "report"} & set(figures)  # the calibrating machine's paths stay private
    assert md["config"]["depth"] == 2 and md["preprocessing"]["image_size"] == 28
    lim = md["limits"]
    assert lim["num_samples_default"] == 8 and lim["num_samples_max"] == 256 and lim["top_k_max"] == 10
    assert lim["max_images"] == 64 and "PNG" in lim["allowed_formats"]


def test_metadata_is_strict_json_with_infinite_thresholds_and_figures_only_when_calibrated(prepared) -> None:
    """Infinite thresholds (no rule kept the risk target; a split too small for alpha) answer as strings."""
    import dataclasses

    from service.engine import Engine
    from service.settings import ServiceSettings
    from snodevit.inference.fitted import Calibration
    from snodevit.inference.backends import open_model

    def strict(body: bytes) -> dict[str, Any]:
        def refuse(token: str) -> None:
            raise AssertionError(f"/metadata holds {token}: not strict JSON")

        return json.loads(body, parse_constant=refuse)

    loaded = open_model(prepared.model_dir)
    review_all = Calibration(temperature=1.3, conformal_thresholds={"0.05": math.inf, "0.1": 0.8},
                             decision_threshold=math.inf, target_risk=0.001)
    unreadable = {**loaded.meta, "calibration_figures": {"accuracy": "high"}}
    cases = {"review all": (review_all, loaded.meta), "uncalibrated": (Calibration(), loaded.meta),
             "unreadable figures": (review_all, unreadable)}
    answers = {}
    for name, (cal, meta) in cases.items():
        engine = Engine(dataclasses.replace(loaded, calibration=cal, meta=meta), ServiceSettings(), name="t",
                        tag="t:1")
        try:
            answers[name] = strict(JSONResponse(engine.metadata({}).model_dump(mode="json")).body)["calibration"]
        finally:
            engine.close()
    review = answers["review all"]
    assert review["decision_threshold"] == "Infinity" and review["conformal_thresholds"] == {"0.05": "Infinity",
                                                                                              "0.1": 0.8}
    assert review["alphas"] == [0.05, 0.1] and review["figures"]["test_images"] == 200
    plain = answers["uncalibrated"]
    assert plain["fitted"] is False and plain["decision_threshold"] is None and plain["figures"] is None
    assert answers["unreadable figures"]["figures"] is None  # figures for people never stop the service


@pytest.mark.parametrize(("kwargs", "status", "error", "names"), [
    ({"alpha": 0.2}, 400, "invalid_parameter", "alpha"),
    ({"top_k": 11}, 400, "invalid_parameter", "top_k"),
    ({"top_k": 0}, 400, "invalid_parameter", "top_k"),
    ({"num_samples": 0}, 400, "invalid_parameter", "num_samples"),
    ({"num_samples": 257}, 400, "invalid_parameter", "num_samples"),
])
def test_bad_parameters_are_refused_by_name(svc, kwargs, status, error, names) -> None:
    params = {"num_samples": 8, "seed": 1, "top_k": 3, "alpha": None, **kwargs}
    code, body = error_of(run(svc.classify(image=DIGIT_7, **params)))
    assert (code, body["error"]) == (status, error) and body["detail"].startswith(f"{names}:")


def test_bad_layer_is_refused(svc) -> None:
    code, body = error_of(run(svc.explain_image(image=DIGIT_7, num_samples=4, seed=1, top_k=3, alpha=None, layer=2)))
    assert code == 400 and body["detail"].startswith("layer:")


@pytest.mark.parametrize(("data", "status", "error"), [
    (b"", 400, "empty_body"),
    (b"just some text", 415, "not_an_image"),
    (DIGIT_7.read_bytes()[:60], 400, "truncated_image"),
])
def test_bad_images_are_refused(svc, tmp_path: Path, data: bytes, status: int, error: str) -> None:
    path = tmp_path / "upload"
    path.write_bytes(data)
    code, body = error_of(run(svc.classify(image=path, num_samples=8, seed=1, top_k=3, alpha=None)))
    assert (code, body["error"]) == (status, error)


def test_batch_names_the_bad_image(svc, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("not an image")
    code, body = error_of(run(svc.classify_batch(images=[DIGIT_7, bad], num_samples=8, seed=1, top_k=3, alpha=None)))
    assert code == 415 and body["detail"].startswith("images[1]:")


def test_raw_body_answers_like_multipart(svc) -> None:
    from starlette.datastructures import QueryParams

    raw = run(svc.answer_raw("classify", DIGIT_7.read_bytes(), QueryParams("seed=8&num_samples=8")))
    multipart = run(svc.classify(image=DIGIT_7, num_samples=8, seed=8, top_k=3, alpha=None)).model_dump(mode="json")
    assert without_timing(json.loads(raw.body)) == without_timing(multipart)
    code, body = error_of(run(svc.answer_raw("classify", DIGIT_7.read_bytes(), QueryParams("seed=-1"))))
    assert code == 400 and body["detail"].startswith("seed:")
    code, body = error_of(run(svc.answer_raw("classify", DIGIT_7.read_bytes(), QueryParams("sed=1"))))
    assert code == 400 and body["detail"] == "sed: unknown parameter"


# --------------------------------------------------------------------------------------------- the parts


def test_batcher_groups_concurrent_items_and_keeps_order() -> None:
    from service.batching import MicroBatcher

    seen: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        seen.append(list(items))
        time.sleep(0.02)
        return [2 * i for i in items]

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(double, pool, max_batch_size=4, max_wait_s=0.01)

        async def main() -> list[list[int]]:
            return await asyncio.gather(*(batcher.submit([i, 100 + i]) for i in range(5)))

        out = run(main())
        assert out == [[2 * i, 200 + 2 * i] for i in range(5)]
        assert max(len(b) for b in seen) == 4 and sum(len(b) for b in seen) == 10
        assert run(batcher.submit([7])) == [14]  # a new event loop gets a new worker
        batcher.close()


def test_batcher_waits_for_company_only_in_a_burst() -> None:
    """A lone request runs at once; in a burst or after a shared pass the worker waits the window for company."""
    from service.batching import MicroBatcher

    seen: list[list[int]] = []

    def echo(items: list[int]) -> list[int]:
        seen.append(list(items))
        return items

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(echo, pool, max_batch_size=8, max_wait_s=0.02)

        async def lone() -> list[list[int]]:
            out = []
            for i in range(3):
                out.append(await batcher.submit([i]))
                await asyncio.sleep(0.05)  # longer than the window: no company expected
            return out

        assert run(lone()) == [[0], [1], [2]]
        assert batcher.company_waits == 0 and seen == [[0], [1], [2]]

        async def burst() -> list[list[int]]:
            first = await batcher.submit([10])  # after a quiet spell: runs alone, at once
            second = asyncio.create_task(batcher.submit([11]))  # right behind it: a burst, so the worker waits
            await asyncio.sleep(0)
            rest = [asyncio.create_task(batcher.submit([12 + i])) for i in range(2)]  # ... and these join
            out = [first, await second, *[await t for t in rest]]
            assert batcher.company_waits == 1 and seen == [[10], [11, 12, 13]]
            await asyncio.sleep(0.05)  # no burst now, but the last pass was shared: the next arrival waits too
            return [*out, await batcher.submit([20])]

        seen.clear()
        assert run(burst()) == [[10], [11], [12], [13], [20]]
        assert batcher.company_waits == 2 and seen[-1] == [20]
        batcher.close()


def test_batcher_hands_errors_to_every_caller_and_keeps_going() -> None:
    from service.batching import MicroBatcher

    def picky(items: list[int]) -> list[int]:
        if 13 in items:
            raise RuntimeError("unlucky")
        return items

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(picky, pool, max_batch_size=8, max_wait_s=0.05)

        async def main() -> list[Any]:
            out = await asyncio.gather(batcher.submit([1]), batcher.submit([13]), return_exceptions=True)
            return [*out, await batcher.submit([2])]

        first, second, after = run(main())
        assert isinstance(first, RuntimeError) and isinstance(second, RuntimeError) and after == [2]
        batcher.close()


def test_batcher_skips_items_whose_caller_gave_up() -> None:
    from service.batching import MicroBatcher

    started = threading.Event()
    ran: list[list[int]] = []

    def slow(items: list[int]) -> list[int]:
        ran.append(list(items))
        started.set()
        time.sleep(0.2)
        return items

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(slow, pool, max_batch_size=8)

        async def main() -> list[int]:
            first = asyncio.create_task(batcher.submit([1]))
            await asyncio.to_thread(started.wait)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(batcher.submit([2]), 0.05)  # queued behind [1], abandoned
            return await first

        assert run(main()) == [1]
        assert ran == [[1]]
        batcher.close()


def test_settings_from_env() -> None:
    from service.settings import ServiceSettings

    s = ServiceSettings.from_env({"SNODEVIT_NUM_SAMPLES": "16", "SNODEVIT_BACKEND": "onnx",
                                  "SNODEVIT_BATCH_WAIT_MS": "2.5", "OTHER": "x"})
    assert (s.num_samples, s.backend, s.batch_wait_ms, s.max_num_samples) == (16, "onnx", 2.5, 256)
    with pytest.raises(ValueError, match="SNODEVIT_NUM_SAMPLES must be an integer"):
        ServiceSettings.from_env({"SNODEVIT_NUM_SAMPLES": "many"})
    with pytest.raises(ValueError, match="SNODEVIT_MAX_IMAGES must be > 0"):
        ServiceSettings.from_env({"SNODEVIT_MAX_IMAGES": "0"})
    with pytest.raises(ValueError, match="backend must be one of"):
        ServiceSettings.from_env({"SNODEVIT_BACKEND": "tensorrt"})
    with pytest.raises(ValueError, match="MAX_NUM_SAMPLES"):
        ServiceSettings.from_env({"SNODEVIT_NUM_SAMPLES": "300"})
    with pytest.raises(ValueError, match="SNODEVIT_MODEL must name a model"):
        ServiceSettings.from_env({"SNODEVIT_MODEL": ""})


def test_declared_settings_are_read_at_import_the_rest_when_the_service_starts(
        prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only DECLARED_FIELDS shape the class at import; a declared one changed before the start is refused."""
    from service.settings import DECLARED_FIELDS, ServiceSettings

    env = {"SNODEVIT_NUM_SAMPLES": "16", "SNODEVIT_BACKEND": "onnx", "SNODEVIT_MAX_IMAGES": "5"}
    only = ServiceSettings.from_env(env, only=DECLARED_FIELDS)
    assert (only.num_samples, only.backend, only.max_images) == (16, "torch", 64)  # the others keep defaults
    module = prepared.module
    assert module.DECLARED.model == prepared.tag and module.DECLARED.num_samples == 8
    monkeypatch.setenv("SNODEVIT_MAX_IMAGES", "5")  # not declared: read when the service starts
    assert module.started_settings().max_images == 5
    monkeypatch.setenv("SNODEVIT_NUM_SAMPLES", "16")  # declared: the API signatures already say 8
    with pytest.raises(ValueError, match="SNODEVIT_NUM_SAMPLES changed after service.service was imported"):
        module.started_settings()


@pytest.mark.parametrize(("status", "body", "expected"), [
    (400, b'{"error": "x", "detail": "y"}', {"error": "x", "detail": "y"}),
    (400, b'{"error": "1 validation error for Input", "detail": [{"type": "less_than_equal", "loc": ["num_samples"],'
          b' "msg": "Input should be less than or equal to 256"}]}',
     {"error": "invalid_parameter", "detail": "num_samples: Input should be less than or equal to 256"}),
    (400, b'[{"error": "bad thing"}]', {"error": "bad_request", "detail": "bad thing"}),
    (429, b'{"error": "Too many requests"}', {"error": "overloaded", "detail": "Too many requests"}),
    (404, b"Not Found", {"error": "not_found", "detail": "Not Found"}),
    (500, b"", {"error": "internal_error", "detail": "Internal Server Error"}),
])
def test_error_bodies_are_reshaped(status: int, body: bytes, expected: dict[str, str]) -> None:
    from service.errors import reshape_error_body

    assert reshape_error_body(status, body) == expected


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "XyZ") -> tuple[bytes, str]:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize(("parts", "status", "detail"), [
    ([("image", "a.png", b"x"), ("seed", None, b"1")], None, None),
    ([("seed", None, b"1")], 400, "image: missing"),
    ([("image", None, b"http://example.com/x.png")], 400, "image: must be a file upload"),
    ([("image", "a.png", b"x"), ("image", "b.png", b"y")], 400, "takes one"),
    ([("image", "a.png", b"x"), ("num_sample", None, b"1")], 400, "num_sample: unknown form field"),
    ([("image", "a.png", b"x"), ("seed", None, b"1"), ("seed", None, b"2")], 400, "seed: given more than once"),
    ([("image", "a.png", b"x"), ("seed", None, b"1" * 2000)], 400, "seed: value longer"),
    ([("image", "a.png", b"x"), ("seed", "s.txt", b"1")], 400, "seed: must be a plain form field"),
    ([("image", "a" * 300, b"x")], 400, "file name is longer"),
])
def test_form_checks(parts, status, detail) -> None:
    from service.errors import ServiceError
    from service.forms import RouteRule, check_form, scan_multipart

    rule = RouteRule(10**6, "image", 1, frozenset({"seed", "num_samples"}), "/raw/classify")
    body, ctype = _multipart(parts)
    if status is None:
        check_form(scan_multipart(body, ctype), rule, "/classify")
        return
    with pytest.raises(ServiceError) as err:
        check_form(scan_multipart(body, ctype), rule, "/classify")
    assert err.value.status == status and detail in err.value.detail


def test_form_parameters_are_validated_like_the_api_signature() -> None:
    from service.errors import ServiceError
    from service.forms import RouteRule, check_params, scan_multipart
    from service.schemas import params_model
    from service.settings import ServiceSettings

    params = params_model(ServiceSettings(), ("alpha", "num_samples", "seed", "top_k"))
    rule = RouteRule(10**6, "image", 1, frozenset(params.model_fields), "/raw/classify", params)
    ok, ctype = _multipart([("image", "a.png", b"x"), ("num_samples", None, b"16"), ("alpha", None, b"0.1")])
    check_params(scan_multipart(ok, ctype), rule)
    for field, value, detail in [("num_samples", b"257", "num_samples: Input should be less than or equal to 256"),
                                 ("seed", b"-1", "seed: Input should be greater than or equal to 0"),
                                 ("top_k", b"three", "top_k: Input should be a valid integer")]:
        body, ctype = _multipart([("image", "a.png", b"x"), (field, None, value)])
        with pytest.raises(ServiceError) as err:
            check_params(scan_multipart(body, ctype), rule)
        assert err.value.status == 400 and err.value.detail.startswith(detail)


def test_guard_bounds_the_bytes_it_holds() -> None:
    """Bodies are buffered against one budget for all requests: a body that would pass it gets 429."""
    from service.forms import RouteRule
    from service.guard import RequestGuard

    async def echo(scope, receive, send) -> None:
        message = await receive()
        await Response(message["body"])(scope, receive, send)

    rule = RouteRule(1000, "", 0)
    guard = RequestGuard(echo, rules={"/echo": rule}, max_concurrency=4, max_buffered_bytes=100)

    async def post(size: int, declared: bool) -> list:
        sent: list = []
        headers = [(b"content-length", str(size).encode())] if declared else []
        scope = {"type": "http", "method": "PUT", "path": "/echo", "headers": headers, "query_string": b""}
        chunks = [b"x" * 40] * (size // 40) + [b"x" * (size % 40)]

        async def receive():
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

        async def send(message):
            sent.append(message)

        await guard(scope, receive, send)
        return sent

    ok = run(post(80, declared=True))
    assert ok[0]["status"] == 200 and ok[1]["body"] == b"x" * 80
    assert run(post(150, declared=True))[0]["status"] == 429  # refused on its Content-Length
    assert run(post(150, declared=False))[0]["status"] == 429  # refused while streaming in
    assert guard.buffered == 0 and guard.in_flight == 0


def test_multipart_scan_refuses_broken_bodies() -> None:
    from service.errors import ServiceError
    from service.forms import scan_multipart

    body, ctype = _multipart([("image", "a.png", b"x")])
    assert [(p.name, p.filename, p.size) for p in scan_multipart(body, ctype)] == [("image", "a.png", 1)]
    for broken, content_type in [(body[:-10], ctype), (b"garbage", ctype), (body, "multipart/form-data")]:
        with pytest.raises(ServiceError) as err:
            scan_multipart(broken, content_type)
        assert err.value.status == 400 and err.value.error == "malformed_multipart"


def test_guard_refuses_beyond_max_concurrency() -> None:
    """The third concurrent request of a limit of two gets 429 with Retry-After; the first two finish."""
    from service.errors import ErrorShapeMiddleware
    from service.guard import RequestGuard

    release = asyncio.Event()

    async def slow_app(scope, receive, send) -> None:
        await release.wait()
        await Response(b"ok")(scope, receive, send)

    app = ErrorShapeMiddleware(RequestGuard(slow_app, rules={}, max_concurrency=2, guarded_paths=("/metadata",)))

    async def get(sent: list) -> None:
        scope = {"type": "http", "method": "GET", "path": "/metadata", "headers": [], "query_string": b""}

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)

    async def main() -> list[list]:
        results: list[list] = [[], [], []]
        first = [asyncio.create_task(get(results[i])) for i in range(2)]
        await asyncio.sleep(0.01)
        await get(results[2])  # answered at once
        release.set()
        await asyncio.gather(*first)
        return results

    ok1, ok2, refused = run(main())
    assert ok1[0]["status"] == ok2[0]["status"] == 200
    assert refused[0]["status"] == 429 and (b"retry-after", b"1") in refused[0]["headers"]
    assert json.loads(refused[1]["body"])["error"] == "overloaded"


def test_heatmap_overlay() -> None:
    from service.heatmap import overlay_png

    img = torch.zeros(1, 28, 28, dtype=torch.uint8)
    heat = torch.zeros(7, 7)
    heat[0, 0] = 1.0
    im = Image.open(io.BytesIO(overlay_png(img, heat, opacity=1.0)))
    assert im.size == (224, 224) and im.mode == "RGB"
    assert im.getpixel((5, 5)) != im.getpixel((200, 200))  # the hot patch is coloured differently
    with pytest.raises(ValueError, match="uint8"):
        overlay_png(img.float(), heat)
    with pytest.raises(ValueError, match="opacity"):
        overlay_png(img, heat, opacity=2.0)


def test_demo_trains_calibrates_exports_and_registers_once(tmp_path: Path, capsys) -> None:
    """The demo pipeline with a stand-in for the snodevit commands (a real training takes minutes)."""
    from service import demo
    from service.testing import make_tiny_model
    from snodevit.checkpoint import update_meta
    from service.store import stored_metadata, temporary_home

    out = tmp_path / "run"
    calls: list[str] = []

    def fake_snodevit(argv: list[str]) -> int:
        calls.append(argv[0])
        if argv[0] == "train":  # the every-block model, beside --out
            assert argv[argv.index("--out") + 1] == str(out) + "-every-block" and "--diffusion-scale" in argv
            make_tiny_model(tmp_path / "run-every-block", calibrated=False)
        elif argv[0] == "tail":  # its stochastic tail, in --out
            assert argv[argv.index("--model") + 1] == str(out) + "-every-block"
            make_tiny_model(out, calibrated=False)
        elif argv[0] == "calibrate":
            update_meta(out, calibration=CALIBRATION)
        elif argv[0] == "export":
            return 1  # a failed export: registered without the graph
        return 0

    with temporary_home(tmp_path / "bentoml"):
        assert demo.main(["--out", str(out), "--epochs", "2", "--", "--diffusion-scale", "1.0"], fake_snodevit) == 0
        expected = ["train", "tail", "calibrate", "export"]
        assert calls == expected
        meta = stored_metadata("snodevit-mnist:latest")
        assert meta["backends"] == ["torch"] and meta["calibrated"] is True
        printed = capsys.readouterr().out
        assert "registered snodevit-mnist:" in printed and "done in" in printed

        calls.clear()
        assert demo.main(["--out", str(out)], fake_snodevit) == 0
        assert calls == [] and "nothing to do" in capsys.readouterr().out


def test_engine_open_loads_and_runs_the_model_on_one_thread(prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading on the inference thread keeps every torch operator of the model on it: a second thread with its own
    OpenMP team (more OpenMP threads than cores) makes every small operator slower."""
    import service.engine as engine_module
    from service.engine import Engine
    from service.settings import ServiceSettings
    from snodevit.inference.backends import CheckpointError, open_model

    threads: dict[str, list[int]] = {"load": [], "predict": []}
    real_open = engine_module.open_model

    def recording_open(*args: Any, **kwargs: Any) -> Any:
        threads["load"].append(threading.get_ident())
        loaded = real_open(*args, **kwargs)
        real_predict = loaded.predict

        def recording_predict(*a: Any, **kw: Any) -> Any:
            threads["predict"].append(threading.get_ident())
            return real_predict(*a, **kw)

        object.__setattr__(loaded, "predict", recording_predict)
        return loaded

    monkeypatch.setattr(engine_module, "open_model", recording_open)
    engine = Engine.open(prepared.model_dir, ServiceSettings(num_samples=4), name="t", tag="t:1")
    try:
        engine.warm_up()
        image = DIGIT_7.read_bytes()
        params = engine.check(num_samples=4, seed=3, top_k=3, alpha=None)
        answers, _ = run(engine.classify([image], params, endpoint="test"))
        reference = Engine(open_model(prepared.model_dir), ServiceSettings(num_samples=4), name="t", tag="t:1")
        try:
            expected, _ = run(reference.classify([image], params, endpoint="test"))
        finally:
            reference.close()
    finally:
        engine.close()
    assert len(threads["load"]) == 1 and threads["load"][0] != threading.get_ident()
    assert threads["predict"] and set(threads["predict"]) == set(threads["load"])  # one thread for all of it
    assert answers[0][0]["confidence"] == expected[0][0]["confidence"]  # the same model, the same answer
    with pytest.raises(CheckpointError):
        Engine.open(prepared.model_dir / "missing", ServiceSettings(), name="t", tag="t:1")

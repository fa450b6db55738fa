"""Service tier 3 (integration): the real ``bentoml serve`` on a loopback port, spoken to over real HTTP.

The server runs the tiny test model from a temporary BentoML home; it is always stopped (its whole process
group) when the module ends.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.testing import prepare_service

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ROOT = Path(__file__).parent.parent
DIGIT_7 = (ROOT / "examples" / "digit_7.png").read_bytes()
DIGIT_2 = (ROOT / "examples" / "digit_2.png").read_bytes()
STARTUP_TIMEOUT_S = 180.0  # torch + bentoml imports and the warm-up pass on a busy 2-core machine


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def without_timing(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k != "timing"}


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    prepared = prepare_service()
    port = free_port()
    env = {**os.environ, **prepared.env, "OMP_NUM_THREADS": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # `bentoml serve` sets its own
    bentoml_cli = Path(sys.executable).with_name("bentoml")
    log = tempfile.NamedTemporaryFile(prefix="bentoml-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [str(bentoml_cli), "serve", "service.service:SNodeViTService", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{Path(log.name).read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"bentoml serve not ready in {STARTUP_TIMEOUT_S} s:\n{Path(log.name).read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)
        log.close()
        os.unlink(log.name)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server we started and every process it started (its workers run in sessions of their own)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.send_signal(signal.SIGTERM)  # the arbiter stops its workers gracefully
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        child.kill()


def classify(url: str, data: bytes, **form: str) -> httpx.Response:
    return httpx.post(f"{url}/classify", files={"image": ("digit.png", data, "image/png")}, data=form, timeout=60)


def test_classify_multipart_and_raw(server: str) -> None:
    a = classify(server, DIGIT_7, seed="17")
    b = classify(server, DIGIT_7, seed="17")
    raw = httpx.post(f"{server}/classify?seed=17", content=DIGIT_7, headers={"Content-Type": "image/png"}, timeout=60)
    assert a.status_code == b.status_code == raw.status_code == 200
    assert without_timing(a.json()) == without_timing(b.json()) == without_timing(raw.json())
    assert a.json()["model"]["tag"] == prepare_service().tag
    assert httpx.get(f"{server}/livez").status_code == 200
    assert httpx.get(f"{server}/metadata").json()["calibration"]["alphas"] == [0.05, 0.1]


def test_burst_of_sixteen_is_answered_in_shared_passes(server: str) -> None:
    images = [DIGIT_7 if i % 2 else DIGIT_2 for i in range(16)]
    alone = [classify(server, data, seed=str(i)).json() for i, data in enumerate(images)]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as c:
            return await asyncio.gather(*(c.post("/classify", files={"image": ("d.png", data, "image/png")},
                                                 data={"seed": str(i)}) for i, data in enumerate(images)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 16
    answers = [r.json() for r in responses]
    assert max(a["timing"]["batch_size"] for a in answers) > 1
    for shared, single in zip(answers, alone):
        assert shared["seed"] == single["seed"] and shared["label"] == single["label"]
        assert shared["confidence"] == pytest.approx(single["confidence"], abs=1e-5)


def test_bad_inputs_leave_the_server_serving(server: str) -> None:
    assert classify(server, b"not an image").json()["error"] == "not_an_image"

    def eleven_mib() -> Iterator[bytes]:
        for _ in range(11):
            yield b"\0" * 2**20

    big = httpx.post(f"{server}/classify", content=eleven_mib(), headers={"Content-Type": "image/png"}, timeout=60)
    assert big.status_code == 413 and big.json()["error"] == "request_too_large"
    assert httpx.get(f"{server}/readyz").status_code == 200
    assert classify(server, DIGIT_7, seed="1").status_code == 200


def _png(array: Any) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_constant_and_noise_images_are_sent_to_review_as_out_of_distribution(server: str) -> None:
    """Inputs the model was not made for: the out-of-distribution gate answers 'review' and says why."""
    import numpy as np

    rng = np.random.default_rng(0)
    inputs = {"grey": _png(np.full((28, 28), 128, np.uint8)),
              "white 1x1": _png(np.full((1, 1), 255, np.uint8)),
              "noise": _png(rng.integers(0, 256, (28, 28), dtype=np.uint8)),
              "colour noise 64x48": _png(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))}
    gate = httpx.get(f"{server}/metadata", timeout=30).json()["calibration"]["ood_gate"]
    assert gate["score"] == "feature_density" and gate["review_rate"] == 0.02
    for name, data in inputs.items():
        r = classify(server, data, seed="3")
        assert r.status_code == 200, (name, r.text)
        a = r.json()
        assert (a["decision"], a["reason_code"]) == ("review", "out_of_distribution"), (name, a)
        assert a["ood"]["out_of_distribution"] is True and a["ood"]["score"] > a["ood"]["threshold"] == gate["threshold"]
        assert a["reason"].startswith("out-of-distribution score (feature_density)")
    # a training-like digit passes the gate (its review, if any, is for low confidence: the model is random)
    a = classify(server, DIGIT_7, seed="3").json()
    assert a["ood"]["out_of_distribution"] is False and a["reason_code"] != "out_of_distribution"


def test_metrics_show_samples_decisions_batches_and_errors(server: str) -> None:
    text = httpx.get(f"{server}/metrics", timeout=30).text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("snodevit_")}
    images = values['snodevit_images_total{endpoint="classify"}']
    assert images >= 16 + 16 + 3
    assert values["snodevit_mc_samples_total"] >= images * 8  # SNODEVIT_NUM_SAMPLES=8 in the test env
    assert sum(v for k, v in values.items() if k.startswith("snodevit_decisions_total")) >= images
    assert values['snodevit_decisions_total{decision="review",reason="out_of_distribution"}'] >= 4
    # every classified image's gate score / threshold is observed; the OOD ones lie above 1
    assert values["snodevit_ood_score_ratio_count"] >= images
    assert values["snodevit_ood_score_ratio_count"] - values['snodevit_ood_score_ratio_bucket{le="1.0"}'] >= 4
    assert values["snodevit_batch_size_count"] < values["snodevit_batch_size_sum"]  # some passes held several images
    assert values['snodevit_errors_total{error="not_an_image",status="415"}'] >= 1
    assert values['snodevit_errors_total{error="request_too_large",status="413"}'] >= 1
    assert "bentoml_service_request_total" in text

"""The web page at /ui in a real browser: Debian's chromium driven by Playwright, against the real ``bentoml serve``.

It checks what a person sees after uploading a digit and a noise image: the label, the decision and its reason
(the same as a direct POST /classify of the same file, seed and sample count), and the loaded heatmap. Without
chromium or Playwright the test skips and says how to install them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from test_service_integration import server  # noqa: F401  (the real server on a loopback port, a module fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ROOT = Path(__file__).parent.parent
DIGIT_7 = ROOT / "examples" / "digit_7.png"
REASONS = {"accepted": "accepted", "low_confidence": "low confidence",
           "out_of_distribution": "out of distribution"}  # as service/ui/app.js words them
TIMEOUT_MS = 60_000


def chromium_path() -> str:
    """Debian's chromium; skips the test (saying how to install it) when it or Playwright is missing."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("Playwright is not installed: `.venv/bin/pip install playwright` (it is in the `test` extra)")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on PATH: `apt-get install chromium` (Playwright cannot download its own here)")
    return path


@pytest.fixture(scope="module")
def page(request: pytest.FixtureRequest) -> Iterator[Any]:
    executable = chromium_path()  # before the server starts: skipping costs nothing
    url = request.getfixturevalue("server")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.set_default_timeout(TIMEOUT_MS)
            tab.goto(f"{url}/ui")
            tab.wait_for_selector("#model-card table")
            yield tab
        finally:
            browser.close()


def noise_png(path: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, size=(28, 28), dtype=np.uint8)
    Image.fromarray(pixels).save(path)  # (28, 28) uint8: grayscale
    return path


def test_page_is_served_with_its_assets(server: str) -> None:  # noqa: F811
    for path, kind in [("/ui", "text/html"), ("/ui/app.js", "javascript"), ("/ui/style.css", "text/css")]:
        resp = httpx.get(f"{server}{path}", follow_redirects=True, timeout=10)
        assert resp.status_code == 200, path
        assert kind in resp.headers["content-type"], path


def test_upload_digit_and_noise_shows_label_decision_and_heatmap(page: Any, server: str,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    noise = noise_png(tmp_path / "noise.png")
    page.set_input_files("#files", [str(DIGIT_7), str(noise)])
    cards = page.locator(".card")
    for i in range(2):
        # the answer and then the heatmap: both come back before the card stops being busy
        page.wait_for_function("i => { const c = document.querySelectorAll('.card')[i];"
                               " return c && !c.classList.contains('busy') && c.answer &&"
                               " c.querySelector('.heatmap').complete &&"
                               " c.querySelector('.heatmap').naturalWidth > 0; }", arg=i)
    assert cards.count() == 2
    model_card = page.locator("#model-card").inner_text()
    assert "out-of-distribution gate" in model_card and "temperature" in model_card

    for i, file in enumerate([DIGIT_7, noise]):
        card = cards.nth(i)
        assert card.locator(".file-name").inner_text() == file.name
        assert card.locator(".error").is_hidden()
        shown = card.evaluate("c => c.answer")  # the JSON the page got from /classify
        assert card.locator(".label").inner_text() == shown["label"]
        decision = card.locator(".decision").inner_text()
        assert decision == f"{shown['decision'].upper()} · {REASONS[shown['reason_code']]}"
        assert card.locator(".reason").inner_text() == shown["reason"]
        # ... and the service's own answer for this file, seed and sample count. Only the outcome is compared: the
        # page's two images shared one forward pass and this request has its own, and the numbers move with that
        direct = httpx.post(f"{server}/classify", files={"image": (file.name, file.read_bytes(), "image/png")},
                            data={"seed": str(shown["seed"]), "num_samples": str(shown["num_samples"])},
                            timeout=60).json()
        assert (shown["label"], shown["decision"], shown["reason_code"]) == \
            (direct["label"], direct["decision"], direct["reason_code"])
        assert card.locator(".top-k .bar-row").count() == len(direct["top_k"])
        assert card.locator(".uncertainty .bar-row").count() == 3
        assert card.evaluate("c => c.querySelector('.heatmap').naturalWidth") > 0
        if file == noise:
            # uniform noise is nothing like a digit: sent to review (the gate of the tiny test model fires on it)
            assert direct["decision"] == "review"
            assert "REVIEW" in decision


def test_refusal_shows_code_and_detail(page: Any, tmp_path: Path) -> None:
    text = tmp_path / "not-an-image.png"
    text.write_text("this is not a PNG")
    page.locator("#clear").click()
    page.set_input_files("#files", [str(text)])
    error = page.locator(".card .error")
    error.wait_for(state="visible")
    shown = error.inner_text()
    assert "HTTP 4" in shown and "Refused" in shown
    assert len(shown.splitlines()) >= 2  # the code and the service's sentence

"""Every endpoint of the service, called from Python two ways: ``bentoml.SyncHTTPClient`` and plain ``httpx``.

    python examples/api_clients.py [http://127.0.0.1:3000]

The README shows these calls; ``tests/test_openapi.py`` runs this file against the real server, so they keep working.
"""

from __future__ import annotations

import sys
from pathlib import Path

import bentoml
import httpx

HERE = Path(__file__).parent
DIGIT, NOISE = HERE / "digit_7.png", HERE / "ood" / "noise.png"


def with_bentoml(url: str) -> None:
    with bentoml.SyncHTTPClient(url, timeout=60) as client:
        meta = client.metadata()  # POST /metadata
        print("classes", meta["classes"], "alphas", meta["calibration"]["alphas"])
        one = client.classify(image=DIGIT, seed=0, num_samples=32)
        print("classify", one["label"], round(one["confidence"], 4), one["decision"], one["reason_code"])
        batch = client.classify_batch(images=[DIGIT, NOISE], seed=0)
        print("classify_batch", [(r["label"], r["decision"], r["reason_code"]) for r in batch["results"]])
        maps = client.explain(image=DIGIT, seed=0, num_samples=8)
        print("explain", maps["prediction"]["label"], len(maps["layers"]), "blocks,", maps["grid_size"], "x", maps["grid_size"], "grid")
        png = client.explain_image(image=DIGIT, seed=0, num_samples=8, layer=0)  # block 0; the heatmap, saved to a file
        print("explain_image", png.read_bytes()[1:4])


def with_httpx(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        print("metadata", http.get("/metadata").json()["model"]["tag"])
        files = {"image": ("digit_7.png", DIGIT.read_bytes(), "image/png")}
        one = http.post("/classify", files=files, data={"seed": "0", "alpha": "0.1"}).json()
        print("classify", one["label"], one["prediction_set"], one["alpha"])
        raw = http.post("/classify?seed=0&num_samples=auto", content=DIGIT.read_bytes(),
                        headers={"Content-Type": "image/png"}).json()  # the raw body; parameters in the query
        print("classify (raw body, auto)", raw["label"], "after", raw["num_samples"], "samples")
        batch = http.post("/classify_batch", files=[("images", (p.name, p.read_bytes(), "image/png"))
                                                   for p in (DIGIT, NOISE)]).json()
        print("classify_batch", [r["decision"] for r in batch["results"]])
        maps = http.post("/explain", files=files, data={"num_samples": "8"}).json()
        print("explain rollout", len(maps["rollout"]), "x", len(maps["rollout"][0]))
        heat = http.post("/explain_image", files=files, data={"num_samples": "8"})
        print("explain_image", heat.headers["content-type"], heat.headers["X-SNodeViT-Decision"])
        refused = http.post("/classify", files=files, data={"top_k": "0"})
        print("refused", refused.status_code, refused.json())  # every refusal: {"error", "detail"}


if __name__ == "__main__":
    base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:3000"
    with_bentoml(base)
    with_httpx(base)

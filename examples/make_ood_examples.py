"""Write the sample inputs of examples/ood/: images the demo model was not made for, to send to a running server.

    python examples/make_ood_examples.py     # rewrites examples/ood/*.png (deterministic)

Each one should come back with ``"decision": "review"``; docs/bad-inputs.md lists what the shipped model answers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from sklearn.datasets import load_sample_image

HERE = Path(__file__).resolve().parent


def main() -> None:
    out = HERE / "ood"
    out.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    digit = np.asarray(Image.open(HERE / "digit_7.png").convert("L"))
    images = {
        "grey.png": Image.new("L", (28, 28), 128),
        "black_1x1.png": Image.new("L", (1, 1), 0),
        "white_1x1.png": Image.new("L", (1, 1), 255),
        "noise.png": Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)),
        "photo.png": Image.fromarray(load_sample_image("china.jpg")[100:300, 150:350]),
        "ink_on_paper_7.png": Image.fromarray(255 - digit),
        "rotated_90_7.png": Image.fromarray(digit).rotate(90),
        "letter_A.png": Image.new("L", (28, 28), 0),
    }
    ImageDraw.Draw(images["letter_A.png"]).text((14, 14), "A", fill=255, font=ImageFont.load_default(size=22),
                                                anchor="mm")
    for name, image in images.items():
        image.save(out / name)
        print(out / name)


if __name__ == "__main__":
    main()

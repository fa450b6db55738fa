"""The seeding rule of evaluation's passes: image i of a pass gets ``seed + i``, whatever the batching."""

from __future__ import annotations

import torch

from snodevit import MNIST_OVERRIDES, create_model, save_model
from snodevit.data import ImageTensorDataset, load_dataset
from snodevit.evaluation import collect, pass_seeds
from snodevit.inference.backends import open_model

TINY = dict(dim=16, depth=1, num_heads=2, rank=2, time_hidden_dim=8, noise_dim=2)


def test_pass_seeds_are_the_seed_plus_the_index_in_the_pass() -> None:
    assert pass_seeds(0, 0, 3) == [0, 1, 2]
    assert pass_seeds(7, 64, 2) == [71, 72]
    assert pass_seeds(5, 10, 0) == []


def test_collect_does_not_depend_on_the_batch_size(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("tiny", **MNIST_OVERRIDES, **TINY)
    torch.nn.init.normal_(model.head.weight)  # the initial zero head answers the same for every noise
    bundle = load_dataset("mnist5k")
    meta = {"class_names": [str(i) for i in range(10)], "preprocessing": bundle.preprocessing.to_dict()}
    loaded = open_model(save_model(model, tmp_path / "m", meta=meta))
    images, labels = bundle.raw("test")
    ds = ImageTensorDataset(images[:7], labels[:7], loaded.preprocessing)
    whole = collect(loaded, ds, 3, seed=11, batch_size=7, progress=False)
    split = collect(loaded, ds, 3, seed=11, batch_size=3, progress=False)
    assert whole["logits"].shape == (3, 7, 10) and whole["probs"].shape == (7, 10)
    for key in whole:  # the noise is the same; only the float rounding of a batched matmul may differ
        torch.testing.assert_close(whole[key], split[key], rtol=1e-5, atol=1e-5)
    # image i alone, seeded with seed + i, answers what it answered inside the pass
    x = torch.stack([ds[4][0]])
    alone = loaded.predict(x, num_samples=3, seed=[11 + 4]).logits
    torch.testing.assert_close(alone[:, 0], whole["logits"][:, 4], rtol=1e-5, atol=1e-5)
    other = collect(loaded, ds, 3, seed=12, batch_size=7, progress=False)
    assert (other["logits"] - whole["logits"]).abs().max() > 1e-3  # another seed, other noise

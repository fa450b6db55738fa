"""Tests of snodevit.data: split sizes and determinism, the loaders of every spec form, and their errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from snodevit.data import (CIFAR10_MEAN, MNIST5K_MEAN, MNIST5K_STD, VALID_FORMS, DataError, DatasetBundle,
    ImageTensorDataset, Preprocessing, load_dataset, make_loader, parse_data_spec, preprocess, stratified_split,
    train_transform)

SPLIT_NAMES = ("train", "calibration", "test")


@pytest.fixture(scope="module")
def mnist() -> DatasetBundle:
    return load_dataset("mnist5k")


def _fingerprints(images: torch.Tensor) -> set[bytes]:
    return {bytes(img.numpy().tobytes()) for img in images}


def test_mnist5k_split_sizes_shapes_and_classes(mnist: DatasetBundle) -> None:
    assert (len(mnist.train), len(mnist.calibration), len(mnist.test)) == (4000, 500, 500)
    assert mnist.class_names == [str(d) for d in range(10)] and mnist.num_classes == 10
    assert mnist.name == "mnist5k" and mnist.spec == "mnist5k"
    assert mnist.preprocessing == Preprocessing(image_size=28, channels=1, mean=MNIST5K_MEAN, std=MNIST5K_STD)
    x, y = mnist.test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    expected_counts = {"train": 400, "calibration": 50, "test": 50}
    for split in SPLIT_NAMES:
        images, labels = mnist.raw(split)
        assert images.dtype == torch.uint8 and images.shape[1:] == (1, 28, 28) and labels.dtype == torch.int64
        assert torch.bincount(labels, minlength=10).tolist() == [expected_counts[split]] * 10  # stratified
    test_labels = mnist.raw("test")[1]
    assert not torch.equal(test_labels, test_labels.sort().values)  # shuffled, not sorted by label


def test_mnist5k_splits_are_disjoint(mnist: DatasetBundle) -> None:
    prints = {s: _fingerprints(mnist.raw(s)[0]) for s in SPLIT_NAMES}
    # No two of the 5000 images are pixel-identical, so fingerprints identify images.
    assert sum(len(p) for p in prints.values()) == 5000
    assert not prints["train"] & prints["test"] and not prints["train"] & prints["calibration"]
    assert not prints["calibration"] & prints["test"]
    all_images, all_labels = mnist.raw("all")
    assert all_images.shape == (5000, 1, 28, 28) and all_labels.shape == (5000,)


def test_mnist5k_is_deterministic_across_calls(mnist: DatasetBundle) -> None:
    again = load_dataset("mnist5k")
    for split in SPLIT_NAMES:
        assert torch.equal(mnist.raw(split)[0], again.raw(split)[0])
        assert torch.equal(mnist.raw(split)[1], again.raw(split)[1])
    assert mnist.raw("train")[0][0, 0, 0, 0] == 0  # a background pixel
    again.raw("train")[0][0, 0, 0, 0] = 99  # one bundle's tensors alias neither the cache nor another bundle
    assert mnist.raw("train")[0][0, 0, 0, 0] == 0
    assert load_dataset("mnist5k").raw("train")[0][0, 0, 0, 0] == 0


def test_mnist5k_mean_std_constants_match_the_train_split(mnist: DatasetBundle) -> None:
    x = mnist.raw("train")[0].to(torch.float64) / 255
    assert x.mean().item() == pytest.approx(MNIST5K_MEAN[0], abs=1e-4)
    assert x.std(unbiased=False).item() == pytest.approx(MNIST5K_STD[0], abs=1e-4)


def test_dataset_item_matches_served_preprocessing(mnist: DatasetBundle) -> None:
    image_u8, label = mnist.raw("test")[0][7], mnist.raw("test")[1][7]
    served = preprocess(Image.fromarray(image_u8[0].numpy(), "L"), mnist.preprocessing)
    x, y = mnist.test[7]
    assert torch.equal(x, served) and y == int(label)


def test_image_size_override_resizes_on_access() -> None:
    bundle = load_dataset("mnist5k", image_size=32)
    assert bundle.preprocessing.image_size == 32 and bundle.train[0][0].shape == (1, 32, 32)
    assert bundle.raw("train")[0].shape[-2:] == (28, 28)  # raw stays native


def test_digits_bundle() -> None:
    bundle = load_dataset("digits")
    images, labels = bundle.raw("all")
    assert images.shape == (1797, 1, 28, 28) and images.dtype == torch.uint8
    assert int(images.max()) == 255 and int(images.min()) == 0  # MNIST's range, not 0..16
    assert len(bundle.train) + len(bundle.calibration) + len(bundle.test) == 1797
    assert len(bundle.test) == len(bundle.calibration) == 179
    assert bundle.preprocessing.mean == MNIST5K_MEAN  # read by an MNIST model, as a shifted domain
    assert bundle.test[0][0].shape == (1, 28, 28)
    assert len(bundle.split("all")) == 1797
    for split in SPLIT_NAMES:
        assert set(torch.unique(bundle.raw(split)[1]).tolist()) == set(range(10))


def test_stratified_split_is_order_independent_and_covers_everything() -> None:
    labels = np.repeat(np.arange(3), 20)
    keys = [f"k{i}" for i in range(60)]
    a = stratified_split(labels, keys)
    perm = np.random.default_rng(0).permutation(60)
    b = stratified_split(labels[perm], [keys[i] for i in perm])
    for s in SPLIT_NAMES:
        assert sorted(keys[i] for i in a[s]) == sorted(keys[perm[i]] for i in b[s])
    assert sorted(np.concatenate([a[s] for s in SPLIT_NAMES]).tolist()) == list(range(60))
    assert [len(a[s]) for s in SPLIT_NAMES] == [48, 6, 6]


# ----------------------------------------------------------------------------------------------- image folders

def _png(value: int, mode: str = "L", size: tuple[int, int] = (10, 12)) -> bytes:
    buf = io.BytesIO()
    color = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def _write_folder(root: Path, mode: str = "L") -> None:
    for c, name in enumerate(["cat", "ant", "bee"]):
        for i in range(6):
            sub = root / name / ("nested/deeper" if i == 5 else "")
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"img{i}.png").write_bytes(_png(40 * c + i, mode))
    (root / "ant" / "notes.txt").write_text("not an image, skipped")
    (root / "bee" / ".hidden.png").write_bytes(b"skipped too")


def test_imagefolder_splits_classes_and_grayscale(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    bundle = load_dataset(f"imagefolder:{tmp_path}")
    assert bundle.class_names == ["ant", "bee", "cat"]  # sorted
    assert (len(bundle.train), len(bundle.calibration), len(bundle.test)) == (12, 3, 3)
    assert bundle.preprocessing.channels == 1 and bundle.preprocessing.image_size == 32
    x, y = bundle.train[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and 0 <= y < 3
    assert bundle.spec == f"imagefolder:{tmp_path.resolve()}"
    for split, per_class in (("train", 4), ("calibration", 1), ("test", 1)):  # stratified: 6 -> 4 / 1 / 1
        assert torch.bincount(bundle.raw(split)[1], minlength=3).tolist() == [per_class] * 3
    # ant (label 0) images have value 40 + i, cat (label 2) 0 + i: labels follow the sorted folder names.
    images, labels = bundle.raw("all")
    assert torch.all(images[labels == 0].float().mean(dim=(1, 2, 3)) >= 40)
    assert torch.all(images[labels == 2].float().mean(dim=(1, 2, 3)) < 10)
    again = load_dataset(f"imagefolder:{tmp_path}", image_size=16)
    assert torch.equal(again.raw("test")[1], bundle.raw("test")[1]) and again.train[0][0].shape == (1, 16, 16)


def test_imagefolder_rgb_when_any_image_is_color(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    (tmp_path / "cat" / "color.png").write_bytes(_png(100, "RGB"))
    bundle = load_dataset(f"imagefolder:{tmp_path}")
    assert bundle.preprocessing.channels == 3 and len(bundle.preprocessing.mean) == 3
    images, _ = bundle.raw("all")
    assert images.shape[1:] == (3, 32, 32)


def test_imagefolder_corrupt_file_is_named(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    bad = tmp_path / "bee" / "nested" / "broken.png"
    bad.write_bytes(_png(9)[:40])
    with pytest.raises(DataError) as info:
        load_dataset(f"imagefolder:{tmp_path}")
    assert str(bad) in str(info.value)


def test_imagefolder_presplit_folders(tmp_path: Path) -> None:
    for split, count in (("train", 4), ("val", 2), ("test", 3)):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                (tmp_path / split / name / f"{i}.png").write_bytes(_png(i))
    bundle = load_dataset(f"imagefolder:{tmp_path}")
    assert (len(bundle.train), len(bundle.calibration), len(bundle.test)) == (8, 4, 6)
    assert bundle.class_names == ["a", "b"]
    (tmp_path / "test" / "zebra").mkdir()
    (tmp_path / "test" / "zebra" / "z.png").write_bytes(_png(1))
    with pytest.raises(DataError, match="zebra"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset(f"imagefolder:{tmp_path}")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class"):
        load_dataset(f"imagefolder:{tmp_path}")


# ----------------------------------------------------------------------------------------------- CIFAR-10

def _write_cifar(folder: Path, records: int = 3) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, (records, 1), dtype=np.uint8)
        pixels = rng.integers(0, 256, (records, 3072), dtype=np.uint8)
        np.concatenate([labels, pixels], axis=1).tofile(folder / name)
    names = "airplane automobile bird cat deer dog frog horse ship truck".split()
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n")


def test_cifar10_binary(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    _write_cifar(folder)
    bundle = load_dataset(f"cifar10:{tmp_path}")
    assert (len(bundle.train), len(bundle.calibration), len(bundle.test)) == (14, 1, 3)  # last 10% = calibration
    assert bundle.class_names[0] == "airplane" and len(bundle.class_names) == 10
    assert bundle.preprocessing.channels == 3 and bundle.preprocessing.mean == CIFAR10_MEAN
    raw = np.fromfile(folder / "data_batch_5.bin", dtype=np.uint8).reshape(3, 3073)
    images, labels = bundle.raw("calibration")
    assert int(labels[0]) == raw[-1, 0]
    assert np.array_equal(images[0].numpy(), raw[-1, 1:].reshape(3, 32, 32))  # R plane, G plane, B plane
    test_images, test_labels = bundle.raw("test")
    raw_test = np.fromfile(folder / "test_batch.bin", dtype=np.uint8).reshape(3, 3073)
    assert test_labels.tolist() == raw_test[:, 0].tolist()
    assert bundle.test[0][0].shape == (3, 32, 32)
    assert load_dataset(f"cifar10:{folder}").raw("train")[1].tolist() == bundle.raw("train")[1].tolist()


def test_cifar10_missing_files_message(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    _write_cifar(folder)
    (folder / "data_batch_3.bin").unlink()
    (folder / "test_batch.bin").unlink()
    with pytest.raises(DataError) as info:
        load_dataset(f"cifar10:{tmp_path}")
    message = str(info.value)
    assert "data_batch_3.bin" in message and "test_batch.bin" in message and str(folder) in message
    assert "data_batch_1.bin" not in message


def test_cifar10_truncated_batch(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    _write_cifar(folder)
    with (folder / "data_batch_2.bin").open("ab") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(DataError, match="data_batch_2.bin"):
        load_dataset(f"cifar10:{folder}")


def test_cifar10_python_version_is_refused(tmp_path: Path) -> None:
    py = tmp_path / "cifar-10-batches-py"
    py.mkdir()
    (py / "data_batch_1").write_bytes(b"\x80\x04pickle")
    with pytest.raises(DataError, match="binary version"):
        load_dataset(f"cifar10:{tmp_path}")


# ----------------------------------------------------------------------------------------------- specs, loaders

@pytest.mark.parametrize("spec", ["", "mnist", "cifar100:/x", "imagefolder", "imagefolder:", "cifar10: ",
                                  "mnist5k:/tmp", "digits:x"])
def test_bad_specs_list_the_valid_forms(spec: str) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(spec)
    assert VALID_FORMS in str(info.value)
    assert isinstance(info.value, ValueError)


def test_parse_data_spec() -> None:
    assert str(parse_data_spec(" MNIST5K ")) == "mnist5k"
    parsed = parse_data_spec("imagefolder:/data/x:y")
    assert parsed.kind == "imagefolder" and parsed.path == Path("/data/x:y")


def test_bad_options() -> None:
    with pytest.raises(ValueError, match=r"augment must be one of \['none', 'light', 'light_flip'\], got 'heavy'"):
        load_dataset("mnist5k", augment="heavy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("mnist5k", image_size=0)
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("mnist5k").raw("val")  # type: ignore[arg-type]


def test_train_transform_light(mnist: DatasetBundle) -> None:
    transform = train_transform(mnist.preprocessing, "light")
    image = mnist.raw("train")[0][0]
    torch.manual_seed(0)
    out = transform(image)
    assert out.shape == image.shape and out.dtype == torch.uint8
    assert not torch.equal(out, image)
    assert torch.equal(train_transform(mnist.preprocessing, "none")(image), image)
    augmented = load_dataset("mnist5k", augment="light")
    assert augmented.train.transform is not None and augmented.test.transform is None
    assert augmented.train[0][0].shape == (1, 28, 28)


def test_make_loader_is_seeded(mnist: DatasetBundle) -> None:
    small = ImageTensorDataset(*mnist.raw("test"), mnist.preprocessing)

    def first_labels(seed: int) -> list[int]:
        return next(iter(make_loader(small, 32, shuffle=True, seed=seed)))[1].tolist()

    assert first_labels(3) == first_labels(3)
    assert first_labels(3) != first_labels(4)
    xb, yb = next(iter(make_loader(small, 16, shuffle=False, seed=0, pin_memory=False)))
    assert xb.shape == (16, 1, 28, 28) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(small, 0, shuffle=False, seed=0)

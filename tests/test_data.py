"""Tests of scaling.data: every loader on small files in the real on-disk formats.

Fixtures write CIFAR-10/100 pickles, STL-10 binaries, ImageFolder PNGs and Parquet shards into
``tmp_path``; torchvision's own readers (with their md5 check of the official files switched off
in the test) serve as the reference interpretation of the CIFAR and STL-10 formats.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from torchvision.io import write_png

from scaling.data import (
    DATASET_NAMES,
    SHAPE_NAMES,
    DataError,
    DatasetSplits,
    ImageSet,
    export_parquet,
    generate_shapes,
    load_dataset,
)

# --- writers of the real on-disk formats ----------------------------------------------------------


def _pickle(path: Path, obj: object) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def _random_cifar(rng: np.random.Generator, n: int, num_classes: int) -> tuple[np.ndarray, list[int]]:
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = (np.arange(n) % num_classes)[rng.permutation(n)].tolist()
    return data, labels


def write_cifar10(root: Path, per_batch: int = 12, n_test: int = 10) -> Path:
    """``root/cifar-10-batches-py`` with data_batch_1..5, test_batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = _random_cifar(rng, n_test if name == "test_batch" else per_batch, 10)
        filenames = [f"{j}.png" for j in range(len(labels))]
        entry = {"batch_label": f"batch {i}", "labels": labels, "data": data, "filenames": filenames}
        _pickle(folder / name, entry)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(
        folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}
    )
    return root


def write_cifar100(root: Path, n_train: int = 150, n_test: int = 100) -> Path:
    """``root/cifar-100-python`` with train, test and meta."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in (("train", n_train), ("test", n_test)):
        data, fine = _random_cifar(rng, n, 100)
        entry = {
            "filenames": [f"{j}.png" for j in range(n)],
            "batch_label": name,
            "fine_labels": fine,
            "coarse_labels": [f // 5 for f in fine],
            "data": data,
        }
        _pickle(folder / name, entry)
    _pickle(
        folder / "meta",
        {
            "fine_label_names": [f"class{i}" for i in range(100)],
            "coarse_label_names": [f"super{i}" for i in range(20)],
        },
    )
    return root


def write_stl10(root: Path, n_train: int = 20, n_test: int = 10) -> Path:
    """``root/stl10_binary`` with {train,test}_{X,y}.bin: column-major 3x96x96 images, 1-based labels."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)  # (N, C, H, W)
        labels = (np.arange(n) % 10)[rng.permutation(n)].astype(np.uint8) + 1
        (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())
        (folder / f"{split}_y.bin").write_bytes(labels.tobytes())
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names))
    return root


def write_imagefolder(root: Path, *, with_test: bool, per_class: int = 8) -> Path:
    """``root/train/<class>/*.png`` (some grayscale, some of other sizes) and optionally ``root/test``."""
    gen = torch.Generator().manual_seed(3)
    splits = [("train", per_class)] + ([("test", 3)] if with_test else [])
    for split, n in splits:
        for cls in ("ant", "bee", "cat"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                channels = 1 if i == 0 else 3
                side = 24 if i == 1 else 16
                image = torch.randint(0, 256, (channels, side, side), dtype=torch.uint8, generator=gen)
                write_png(image, str(root / split / cls / f"{i:03d}.png"))
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    return root


# --- the conformance class: every dataset meets the same contract -----------------------------


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("data")
    roots = {
        "cifar10": write_cifar10(base / "cifar10"),
        "cifar100": write_cifar100(base / "cifar100"),
        "stl10": write_stl10(base / "stl10"),
        "imagefolder": write_imagefolder(base / "imagefolder", with_test=False),
    }
    splits = load_dataset("shapes", size=300, image_size=20, seed=0)
    export_parquet(splits, base / "parquet", rows_per_shard=64)
    roots["parquet"] = base / "parquet"
    return roots


CONFORMANCE_SIZES = {"shapes": 240}


@pytest.mark.parametrize("name", DATASET_NAMES)
class TestConformance:
    """The contract of ``load_dataset`` checked on every dataset."""

    def _load(self, name: str, roots: dict[str, Path], **kwargs: object) -> DatasetSplits:
        return load_dataset(
            name, root=roots.get(name), size=CONFORMANCE_SIZES.get(name), image_size=16, **kwargs
        )

    def test_contract(self, name: str, data_roots: dict[str, Path]) -> None:
        splits = self._load(name, data_roots)
        assert splits.name == name
        assert isinstance(splits.num_classes, int) and splits.num_classes >= 3
        for part in (splits.train, splits.val, splits.test):
            assert isinstance(part, ImageSet)
            assert part.images.dtype == torch.uint8 and part.images.is_contiguous()
            assert part.images.shape[1:] == (3, 16, 16)
            assert part.labels.dtype == torch.int64 and part.labels.shape == (len(part),)
            assert len(part) > 0
            assert int(part.labels.min()) >= 0 and int(part.labels.max()) < splits.num_classes
        with pytest.raises(dataclasses.FrozenInstanceError):
            splits.train = splits.val  # type: ignore[misc]

    def test_deterministic(self, name: str, data_roots: dict[str, Path]) -> None:
        a, b = self._load(name, data_roots, seed=3), self._load(name, data_roots, seed=3)
        for split in ("train", "val", "test"):
            assert torch.equal(getattr(a, split).images, getattr(b, split).images)
            assert torch.equal(getattr(a, split).labels, getattr(b, split).labels)

    def test_fraction_shrinks_train_only(self, name: str, data_roots: dict[str, Path]) -> None:
        full, half = self._load(name, data_roots), self._load(name, data_roots, fraction=0.5)
        assert len(half.train) < len(full.train)
        assert torch.equal(half.val.images, full.val.images) and torch.equal(
            half.test.images, full.test.images
        )
        assert set(half.train.labels.tolist()) == set(full.train.labels.tolist())  # every class kept


# --- shapes ----------------------------------------------------------------------------------------


def _rows(images: torch.Tensor) -> set[bytes]:
    return {bytes(row) for row in images.flatten(1).numpy()}


def test_shapes_byte_identical_for_a_seed_and_different_across_seeds() -> None:
    a_images, a_labels = generate_shapes(500, image_size=24, seed=7)
    b_images, b_labels = generate_shapes(500, image_size=24, seed=7)
    c_images, _ = generate_shapes(500, image_size=24, seed=8)
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    assert not torch.equal(a_images, c_images)


def test_shapes_shape_dtype_range_and_balance() -> None:
    images, labels = generate_shapes(1000, image_size=20, seed=0)
    assert images.shape == (1000, 3, 20, 20) and images.dtype == torch.uint8 and images.is_contiguous()
    assert labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == [100] * 10
    assert len(SHAPE_NAMES) == 10
    # Random colours span the range. Corners are background; the shape covers a good part of the image.
    assert int(images.min()) < 30 and int(images.max()) > 225
    corner = images[:, :, :1, :1].float()
    coverage = (images.float() - corner).abs().amax(dim=1).gt(30).float().mean(dim=(1, 2))
    assert float(coverage.min()) > 0.03 and float(coverage.mean()) > 0.15


def test_shapes_any_resolution() -> None:
    images, _ = generate_shapes(30, image_size=96, seed=0)
    assert images.shape == (30, 3, 96, 96)


def test_shapes_load_dataset_sizes_and_fixed_test_split() -> None:
    a = load_dataset("shapes", size=600, image_size=16, seed=0)
    b = load_dataset("shapes", size=600, image_size=16, seed=1)
    assert len(a.train) + len(a.val) + len(a.test) == 600
    assert len(a.test) == 600 // 6 and len(a.val) == 50
    assert a.class_names == SHAPE_NAMES
    assert torch.equal(a.test.images, b.test.images)  # the test split does not move with the seed
    assert not torch.equal(a.train.images[:50], b.train.images[:50])
    assert not _rows(a.train.images) & _rows(a.test.images)


def _knn_accuracy(train: ImageSet, test: ImageSet, k: int, num_classes: int) -> float:
    """Majority vote of the k nearest training images under cosine similarity of raw pixels."""

    def features(images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(1).float()
        return flat / flat.norm(dim=1, keepdim=True)

    similarity = features(test.images) @ features(train.images).T
    neighbours = similarity.topk(k, dim=1).indices
    votes = torch.zeros(len(test), num_classes).scatter_add_(
        1, train.labels[neighbours], torch.ones(neighbours.shape)
    )
    return float((votes.argmax(dim=1) == test.labels).float().mean())


def test_shapes_raw_pixel_knn_is_weak_but_above_chance() -> None:
    splits = load_dataset("shapes", size=3000, image_size=32, seed=0)
    knn20 = _knn_accuracy(splits.train, splits.test, 20, splits.num_classes)
    knn1 = _knn_accuracy(splits.train, splits.test, 1, splits.num_classes)
    assert 0.10 < knn20 < 0.40, knn20
    assert 0.10 < knn1 < 0.40, knn1


# --- digits ------------------------------------------------------------------------------------------


def test_digits_all_images_gray_repeated_and_scaled() -> None:
    from sklearn.datasets import load_digits

    splits = load_dataset("digits", image_size=8, val_fraction=0.0)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    assert len(splits.val) == 0 and splits.val.images.shape == (0, 3, 8, 8)
    images = splits.train.images
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    assert int(images.max()) == 255
    # Every training image is one of sklearn's digits scaled by 255/16.
    reference = {
        bytes(row) for row in np.rint(load_digits().images * (255 / 16)).astype(np.uint8).reshape(1797, 64)
    }
    assert _rows(images[:, 0]) <= reference


def test_digits_resized_and_split_sizes() -> None:
    splits = load_dataset("digits", image_size=32)
    assert splits.train.images.shape[1:] == (3, 32, 32)
    assert abs(len(splits.test) - 1797 // 6) <= 5 and abs(len(splits.val) - 150) <= 5
    assert torch.bincount(splits.test.labels).min() >= 25  # stratified


# --- val and fraction -----------------------------------------------------------------------------


def test_val_is_deterministic_disjoint_and_seeded() -> None:
    a = load_dataset("shapes", size=1200, image_size=12, seed=0, val_fraction=0.2)
    b = load_dataset("shapes", size=1200, image_size=12, seed=0, val_fraction=0.2)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.val.labels, b.val.labels)
    assert len(a.val) == 200 and len(a.train) == 800
    assert not _rows(a.val.images) & _rows(a.train.images)
    assert torch.bincount(a.val.labels).tolist() == [20] * 10  # stratified
    d0 = load_dataset("digits", image_size=8, seed=0)
    d1 = load_dataset("digits", image_size=8, seed=1)
    assert not torch.equal(d0.val.images, d1.val.images)
    assert torch.equal(d0.test.images, d1.test.images)


def test_fraction_subsets_are_nested_and_stratified() -> None:
    kwargs = {"size": 1200, "image_size": 12, "seed": 5}
    full = load_dataset("shapes", **kwargs)
    half = load_dataset("shapes", fraction=0.5, **kwargs)
    tenth = load_dataset("shapes", fraction=0.1, **kwargs)
    assert len(half.train) == pytest.approx(len(full.train) / 2, abs=10)
    assert len(tenth.train) == pytest.approx(len(full.train) / 10, abs=10)
    assert _rows(tenth.train.images) <= _rows(half.train.images) <= _rows(full.train.images)
    assert torch.bincount(tenth.train.labels, minlength=10).min() >= 8
    tiny = load_dataset("shapes", fraction=0.001, **kwargs)
    assert sorted(tiny.train.labels.tolist()) == list(range(10))  # at least one image per class


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"image_size": 0}, "image_size"),
        ({"size": 0}, "size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_dataset("shapes", **kwargs)  # type: ignore[arg-type]


def test_unknown_dataset_and_too_large_size() -> None:
    with pytest.raises(DataError, match="cifar10"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="1797"):
        load_dataset("digits", size=5000)


# --- CIFAR ----------------------------------------------------------------------------------------


@pytest.fixture
def no_md5_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let torchvision's reference readers open files that are not the official ones."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(torchvision.datasets.stl10, "check_integrity", lambda *args, **kwargs: True)


@pytest.mark.usefixtures("no_md5_check")
def test_cifar10_matches_torchvision_reader(tmp_path: Path) -> None:
    root = write_cifar10(tmp_path)
    splits = load_dataset("cifar10", root=str(root), val_fraction=0.0)
    reference_train = torchvision.datasets.CIFAR10(str(root), train=True, download=False)
    reference_test = torchvision.datasets.CIFAR10(str(root), train=False, download=False)
    assert torch.equal(splits.train.images, torch.from_numpy(reference_train.data).permute(0, 3, 1, 2))
    assert splits.train.labels.tolist() == reference_train.targets
    assert torch.equal(splits.test.images, torch.from_numpy(reference_test.data).permute(0, 3, 1, 2))
    assert splits.test.labels.tolist() == reference_test.targets
    assert splits.num_classes == 10 and splits.class_names == tuple(reference_train.classes)


@pytest.mark.usefixtures("no_md5_check")
def test_cifar100_matches_torchvision_reader(tmp_path: Path) -> None:
    root = write_cifar100(tmp_path)
    splits = load_dataset("cifar100", root=root, val_fraction=0.0)
    reference = torchvision.datasets.CIFAR100(str(root), train=True, download=False)
    assert torch.equal(splits.train.images, torch.from_numpy(reference.data).permute(0, 3, 1, 2))
    assert splits.train.labels.tolist() == reference.targets
    assert splits.num_classes == 100 and len(splits.test) == 100


def test_cifar_resize_size_and_val(tmp_path: Path) -> None:
    root = write_cifar10(tmp_path)
    full = load_dataset("cifar10", root=root, val_fraction=0.0)
    small = load_dataset("cifar10", root=root, val_fraction=0.0, image_size=16)
    expected = TF.resize(
        full.train.images, [16, 16], interpolation=TF.InterpolationMode.BILINEAR, antialias=True
    )
    assert small.train.images.shape == (60, 3, 16, 16) and torch.equal(small.train.images, expected)
    sized = load_dataset("cifar10", root=root, size=35, val_fraction=0.2)
    assert len(sized.train) + len(sized.val) + len(sized.test) == 35
    assert len(sized.test) == 5  # 70 images, 10 of them test: the test share is kept
    assert len(sized.val) == pytest.approx(6, abs=3)


def test_cifar_missing_root_files_and_unsafe_pickles(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="root"):
        load_dataset("cifar10")
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_dataset("cifar10", root=missing)
    with pytest.raises(DataError, match=re.escape("https://www.cs.toronto.edu/~kriz/cifar.html")) as info:
        load_dataset("cifar100", root=tmp_path)
    assert str(tmp_path / "cifar-100-python") in str(info.value)
    root = write_cifar10(tmp_path / "c10")
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", root=root)

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[()]]:
            return (os.getpid, ())

    _pickle(root / "cifar-10-batches-py" / "data_batch_3", {"data": Exploit(), "labels": []})
    with pytest.raises(DataError, match="not allowed"):
        load_dataset("cifar10", root=root)


# --- STL-10 ----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_md5_check")
def test_stl10_matches_torchvision_reader(tmp_path: Path) -> None:
    root = write_stl10(tmp_path)
    splits = load_dataset("stl10", root=root, image_size=96, val_fraction=0.0)
    reference = torchvision.datasets.STL10(str(root), split="train", download=False)
    assert torch.equal(splits.train.images, torch.from_numpy(reference.data))
    assert splits.train.labels.tolist() == reference.labels.tolist()
    assert len(splits.test) == 10 and splits.class_names[0] == "airplane"
    assert load_dataset("stl10", root=root).train.images.shape[1:] == (3, 32, 32)


def test_stl10_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="stl10_binary"):
        load_dataset("stl10", root=tmp_path)
    root = write_stl10(tmp_path / "s")
    (root / "stl10_binary" / "test_y.bin").write_bytes(b"\x01\x02")
    with pytest.raises(DataError, match=re.escape(str(root / "stl10_binary" / "test_X.bin"))):
        load_dataset("stl10", root=root)


# --- ImageFolder ------------------------------------------------------------------------------------


def test_imagefolder_with_test_dir(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path, with_test=True)
    splits = load_dataset("imagefolder", root=root, image_size=16, val_fraction=0.0)
    assert splits.class_names == ("ant", "bee", "cat") and splits.num_classes == 3
    assert len(splits.train) == 24 and len(splits.test) == 9
    # Files of the target size load pixel-exact; grayscale files are repeated to three channels.
    from torchvision.io import ImageReadMode, decode_image

    bee_2 = decode_image(str(root / "train" / "bee" / "002.png"), mode=ImageReadMode.RGB)
    assert bytes(bee_2.flatten().numpy()) in _rows(splits.train.images[splits.train.labels == 1])
    images = splits.train.images
    gray = (images[:, 0] == images[:, 1]).flatten(1).all(1) & (images[:, 0] == images[:, 2]).flatten(1).all(1)
    assert int(gray.sum()) == 3  # one grayscale file per class, repeated to three channels
    assert splits.train.labels[:6].unique().numel() > 1  # not sorted by class


def test_imagefolder_without_test_dir_carves_a_fixed_test_split(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path, with_test=False, per_class=12)
    a = load_dataset("imagefolder", root=root, image_size=16, seed=0)
    b = load_dataset("imagefolder", root=root, image_size=16, seed=1)
    assert len(a.test) == 6 and torch.equal(a.test.images, b.test.images)
    assert len(a.train) + len(a.val) + len(a.test) == 36


def test_imagefolder_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="root"):
        load_dataset("imagefolder")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "train"))):
        load_dataset("imagefolder", root=tmp_path)
    root = write_imagefolder(tmp_path / "broken", with_test=False)
    broken = root / "train" / "bee" / "zzz.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match=re.escape(str(broken))):
        load_dataset("imagefolder", root=root)


# --- Parquet ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_parquet_round_trip_is_byte_identical(tmp_path: Path, encoding: str) -> None:
    splits = load_dataset("shapes", size=300, image_size=16, seed=2)
    paths = export_parquet(splits, tmp_path / "out", encoding=encoding, rows_per_shard=100)
    assert [p.name for p in paths] == [
        "train-00000.parquet",
        "train-00001.parquet",
        "train-00002.parquet",
        "val-00000.parquet",
        "test-00000.parquet",
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in paths
    )  # no temp files
    table = pq.read_table(paths[0])
    assert table.schema.field("image").type == pa.binary() and table.schema.field("label").type == pa.int64()
    assert ("height" in table.column_names) == (encoding == "raw")
    loaded = load_dataset("parquet", root=tmp_path / "out", image_size=16)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(loaded, split).images, getattr(splits, split).images)
        assert torch.equal(getattr(loaded, split).labels, getattr(splits, split).labels)
    assert loaded.num_classes == 10 and loaded.class_names == SHAPE_NAMES


def test_parquet_jpeg_close_and_resizable(tmp_path: Path) -> None:
    splits = load_dataset("shapes", size=120, image_size=32, seed=0)
    export_parquet(splits, tmp_path, encoding="jpeg")
    loaded = load_dataset("parquet", root=tmp_path)
    error = (loaded.train.images.float() - splits.train.images.float()).abs().mean()
    assert float(error) < 10.0  # JPEG at quality 95 on noisy 32x32 images
    assert load_dataset("parquet", root=tmp_path, image_size=16).test.images.shape[1:] == (3, 16, 16)


def test_parquet_reexport_replaces_stale_shards(tmp_path: Path) -> None:
    splits = load_dataset("shapes", size=240, image_size=8)
    export_parquet(splits, tmp_path, rows_per_shard=50)
    assert (tmp_path / "train-00003.parquet").exists()
    export_parquet(splits, tmp_path, rows_per_shard=500)
    expected = ["test-00000.parquet", "train-00000.parquet", "val-00000.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected


def test_parquet_foreign_shards_carve_val_and_test(tmp_path: Path) -> None:
    images, labels = generate_shapes(60, image_size=8, seed=0)
    raw = pa.array([bytes(row) for row in images.flatten(1).numpy()], type=pa.binary())
    n = len(labels)
    table = pa.table(
        {
            "image": raw,
            "label": pa.array(labels.numpy()),
            "height": pa.array(np.full(n, 8, np.int32)),
            "width": pa.array(np.full(n, 8, np.int32)),
            "channels": pa.array(np.full(n, 3, np.int32)),
        }
    )
    pq.write_table(table, tmp_path / "train-00000.parquet")
    splits = load_dataset("parquet", root=tmp_path, image_size=8)
    assert splits.num_classes == 10
    assert len(splits.train) + len(splits.val) + len(splits.test) == 60 and len(splits.test) == 10
    assert _rows(splits.train.images) <= _rows(images)


def test_parquet_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="export_parquet"):
        load_dataset("parquet", root=tmp_path)
    with pytest.raises(ValueError, match="encoding"):
        export_parquet(load_dataset("shapes", size=60, image_size=8), tmp_path, encoding="bmp")

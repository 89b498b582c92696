"""know_core.data: nested subsets, on-disk readers, named data sets (real files, no mocks)."""
from __future__ import annotations

import math
import gzip
import pickle

import numpy as np
import pytest
import torch

from know_core.data import (
    DATASETS,
    DatasetNotFound,
    ImageData,
    load_cifar,
    load_dataset,
    load_idx_dir,
    load_image_folder,
    nested_subsets,
    read_idx,
    subset_sizes,
)

# ----------------------------------------------------------------------- nested subsets


@pytest.mark.parametrize("n, r, stages", [(1797, 0.5, 5), (1348, 0.3, 4), (1000, 0.9, 7), (64, 0.5, 6)])
def test_subset_sizes_are_truncated_powers(n, r, stages):
    """As the release: |Dk| = int(N·r^k), truncated, not rounded."""
    sizes = subset_sizes(n, r, stages)
    assert sizes == [math.floor(n * r**k) for k in range(stages)]
    assert sizes[0] == n
    assert all(a > b for a, b in zip(sizes, sizes[1:]))  # strictly decreasing for these configs


def test_subset_sizes_known_values():
    assert subset_sizes(1797, 0.5, 4) == [1797, 898, 449, 224]  # 224.625 is truncated (round gave 225)
    assert subset_sizes(100, 0.3, 3) == [100, 30, 9]


@pytest.mark.parametrize("n, r, stages", [(1797, 0.5, 5), (1348, 0.3, 4), (500, 0.8, 7)])
def test_nested_subsets_strictly_nested(n, r, stages):
    subsets = nested_subsets(n, r, stages, seed=3)
    assert [len(s) for s in subsets] == subset_sizes(n, r, stages)
    full = subsets[0]
    assert sorted(full.tolist()) == list(range(n))  # D0 is all the data, each index once
    for k in range(1, stages):
        big, small = set(subsets[k - 1].tolist()), set(subsets[k].tolist())
        assert len(small) == len(subsets[k])  # no duplicates
        assert small < big  # strict subset
        np.testing.assert_array_equal(subsets[k], subsets[k - 1][: len(subsets[k])])  # prefixes


def test_nested_subsets_seeded():
    a = nested_subsets(1000, 0.5, 4, seed=7)
    b = nested_subsets(1000, 0.5, 4, seed=7)
    c = nested_subsets(1000, 0.5, 4, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], c[1])
    assert set(a[1].tolist()) != set(c[1].tolist())  # different seeds pick different images
    assert not np.array_equal(a[0], np.arange(1000))  # really shuffled


# --------------------------------------------------------------------------- IDX files


def _idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_uint8(tmp_path, gz):
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    path = tmp_path / ("x.idx" + (".gz" if gz else ""))
    (gzip.open if gz else open)(path, "wb").write(_idx_bytes(arr))
    out = read_idx(path)
    assert out.shape == (5, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)


def test_read_idx_big_endian_int32(tmp_path):
    arr = np.array([[1, -2], [70000, 3]], dtype=">i4")
    (tmp_path / "y.idx").write_bytes(_idx_bytes(arr, 0x0C))
    np.testing.assert_array_equal(read_idx(tmp_path / "y.idx"), [[1, -2], [70000, 3]])


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(path)


def test_read_idx_truncated(tmp_path):
    arr = np.zeros((4, 2), dtype=np.uint8)
    (tmp_path / "short.idx").write_bytes(_idx_bytes(arr)[:-3])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short.idx")


def _write_idx_dir(root, n=6, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    labels[0] = 9  # so the class count is 10
    root.mkdir(parents=True, exist_ok=True)
    opener, suffix = (gzip.open, ".gz") if gz else (open, "")
    for prefix in ("train", "t10k"):
        with opener(root / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as f:
            f.write(_idx_bytes(images))
        with opener(root / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as f:
            f.write(_idx_bytes(labels))
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_dir_images_and_labels(tmp_path, gz):
    images, labels = _write_idx_dir(tmp_path / "fm", gz=gz)
    ds = load_idx_dir(tmp_path / "fm", "train", "fm", "install hint")
    assert isinstance(ds, ImageData)
    assert ds.x.shape == (6, 1, 28, 28) and ds.x.dtype == torch.float32
    assert ds.y.dtype == torch.int64 and ds.num_classes == 10
    torch.testing.assert_close(ds.x[:, 0], torch.from_numpy(images.astype(np.float32) / 255.0))
    assert ds.y.tolist() == labels.tolist()
    assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0


def test_fashion_mnist_from_data_dir(tmp_path):
    images, labels = _write_idx_dir(tmp_path / "fashion", n=4, gz=True, seed=1)
    ds = load_dataset("fashion-mnist", "test", data_dir=str(tmp_path / "fashion"))
    assert ds.name == "fashion-mnist" and len(ds) == 4
    assert ds.y.tolist() == labels.tolist()


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(DatasetNotFound) as err:
        load_dataset("fashion-mnist", "train", data_dir=str(tmp_path / "nowhere"))
    msg = str(err.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert "\n" not in msg
    assert isinstance(err.value, FileNotFoundError)


# ------------------------------------------------------------------------------ CIFAR


def _cifar_batch(n, classes, label_key, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
    labels = rng.integers(0, classes, size=n).tolist()
    return {b"data": data, label_key: labels, b"batch_label": b"x"}


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_cifar10_batches(tmp_path):
    batches = [_cifar_batch(3, 10, b"labels", seed) for seed in range(2)]
    for i, b in enumerate(batches, 1):
        _dump(tmp_path / f"data_batch_{i}", b)
    test = _cifar_batch(2, 10, b"labels", 9)
    _dump(tmp_path / "test_batch", test)

    ds = load_cifar(tmp_path, "train", 10)
    assert ds.x.shape == (6, 3, 32, 32) and ds.num_classes == 10 and ds.name == "cifar10"
    expect = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).astype(np.float32) / 255
    torch.testing.assert_close(ds.x, torch.from_numpy(expect))
    assert ds.y.tolist() == batches[0][b"labels"] + batches[1][b"labels"]

    ds_test = load_dataset("cifar10", "test", data_dir=str(tmp_path))
    assert len(ds_test) == 2 and ds_test.y.tolist() == test[b"labels"]
    # channel-major rows: the first 1024 bytes are the red plane of image 0
    torch.testing.assert_close(ds_test.x[0, 0].reshape(-1), torch.from_numpy(test[b"data"][0, :1024] / 255.0).float())


def test_cifar100_fine_labels(tmp_path):
    train = _cifar_batch(4, 100, b"fine_labels", 0)
    train[b"coarse_labels"] = [0] * 4
    _dump(tmp_path / "train", train)
    _dump(tmp_path / "test", _cifar_batch(2, 100, b"fine_labels", 1))
    ds = load_dataset("cifar100", "train", data_dir=str(tmp_path))
    assert ds.num_classes == 100 and ds.name == "cifar100"
    assert ds.y.tolist() == train[b"fine_labels"]
    assert ds.x.shape == (4, 3, 32, 32)


def test_cifar_missing(tmp_path):
    with pytest.raises(DatasetNotFound, match="--data-dir"):
        load_cifar(tmp_path, "train", 10)
    with pytest.raises(DatasetNotFound, match="--data-dir"):
        load_dataset("cifar100", "train")


# ----------------------------------------------------------------------- image folder


def test_image_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    colours = {"b_red": (255, 0, 0), "a_blue": (0, 0, 255)}  # class order is sorted by name
    for cls, rgb in colours.items():
        (root / "train" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (10, 12), rgb).save(root / "train" / cls / f"{i}.png")
    (root / "train" / "a_blue" / "notes.txt").write_text("not an image")

    ds = load_dataset("image-folder", "train", data_dir=str(root))
    assert ds.x.shape == (4, 3, 32, 32) and ds.num_classes == 2 and ds.name == "train"
    assert ds.y.tolist() == [0, 0, 1, 1]
    # class 0 = a_blue: blue channel 1, red 0; class 1 = b_red: the reverse
    torch.testing.assert_close(ds.x[0, 2], torch.ones(32, 32))
    torch.testing.assert_close(ds.x[0, 0], torch.zeros(32, 32))
    torch.testing.assert_close(ds.x[3, 0], torch.ones(32, 32))

    gray = load_image_folder(root / "train", image_size=8, grayscale=True)
    assert gray.x.shape == (4, 1, 8, 8)


def test_image_folder_empty(tmp_path):
    with pytest.raises(DatasetNotFound, match="class sub-directories"):
        load_image_folder(tmp_path)
    (tmp_path / "cls").mkdir()
    with pytest.raises(DatasetNotFound, match="no .png"):
        load_image_folder(tmp_path)


# ----------------------------------------------------------------- named data sets


def test_unknown_dataset_names_valid_ones():
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet")
    msg = str(err.value)
    assert "imagenet" in msg
    for name in DATASETS:
        assert name in msg


def test_digits_splits(digits_train):
    test = load_dataset("digits", "test")
    everything = load_dataset("digits", "all")
    assert len(everything) == 1797
    assert len(digits_train) + len(test) == 1797 and len(test) == 449
    assert digits_train.x.shape[1:] == (1, 8, 8) and digits_train.num_classes == 10
    assert float(digits_train.x.max()) <= 1.0 and float(digits_train.x.min()) >= 0.0
    # the split is a partition of all 1,797 images (compared as multisets of rows + labels)
    def rows(ds):
        flat = ds.x.reshape(len(ds), -1).mul(16).round().int()
        return sorted(tuple(r) + (int(y),) for r, y in zip(flat.tolist(), ds.y.tolist()))

    assert sorted(rows(digits_train) + rows(test)) == rows(everything)
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "validation")


def test_select_classes_relabels(digits_train):
    sub = digits_train.select_classes([7, 3])
    assert sub.num_classes == 2
    assert set(sub.y.tolist()) == {0, 1}
    assert int((sub.y == 0).sum()) == int((digits_train.y == 7).sum())
    assert int((sub.y == 1).sum()) == int((digits_train.y == 3).sum())
    # images keep their order and pair with the right new label
    keep = (digits_train.y == 7) | (digits_train.y == 3)
    torch.testing.assert_close(sub.x, digits_train.x[keep])
    assert sub.y.tolist() == [0 if v == 7 else 1 for v in digits_train.y[keep].tolist()]
    assert "7,3" in sub.name


def test_take_keeps_metadata(digits_train):
    part = digits_train.take(np.array([5, 0, 5]))
    assert len(part) == 3 and part.num_classes == 10 and part.name == "digits"
    torch.testing.assert_close(part.x[0], digits_train.x[5])
    assert part.y.tolist() == [int(digits_train.y[5]), int(digits_train.y[0]), int(digits_train.y[5])]

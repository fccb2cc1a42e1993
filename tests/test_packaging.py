"""The wheel: every package and module, the named experiments as ``bame/configs/``, the published numbers;
and a non-editable install that finds its configs from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_package_list_in_pyproject_is_complete():
    """pyproject.toml lists packages by hand (configs/ is mapped into bame/): nothing may be missing."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    code = {".".join(p.parent.relative_to(REPO).parts) for top in ("bame", "analysis")
            for p in (REPO / top).rglob("__init__.py")}
    configs = {".".join(("bame", *p.relative_to(REPO).parts)) for p in [REPO / "configs", *(REPO / "configs").rglob("*")]
               if p.is_dir() and any(p.glob("*.yaml"))}
    assert listed == code | configs
    assert tool["package-dir"] == {"bame.configs": "configs"}
    assert set(tool["package-data"]) == {"analysis"} | configs


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(out), str(REPO)], check=True, capture_output=True, text=True, timeout=300)
    (whl,) = out.glob("bame-*.whl")
    return whl


def test_the_wheel_carries_every_module_config_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for top in ("bame", "analysis"):
        for py in (REPO / top).rglob("*.py"):
            assert py.relative_to(REPO).as_posix() in names
    for yaml_file in (REPO / "configs").rglob("*.yaml"):
        assert f"bame/configs/{yaml_file.relative_to(REPO / 'configs').as_posix()}" in names
    assert "analysis/published.csv" in names
    assert not any(n.startswith(("tests/", "configs/", "notebooks/", "runs/")) for n in names)


def test_an_installed_wheel_resolves_named_configs_from_any_directory(wheel, tmp_path):
    """Installed (not editable) into a folder of its own: ``configs_dir`` is the packaged copy, and the
    README's ``configs/quick.yaml``, ``quick`` and ``paper/...`` all load from an unrelated directory."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import bame, bame.config as c\n"
        "print(bame.__file__)\n"
        "print(c.configs_dir())\n"
        "for name in ('quick', 'configs/quick.yaml', 'paper/cifar10_resnet32', 'demo'):\n"
        "    print(name, c.load_config(name).name)\n"
    )
    # -I would drop PYTHONPATH; -P (3.11+) keeps the cwd off sys.path, so only the installed copy is seen.
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == str(site / "bame" / "__init__.py")
    assert lines[1] == str(site / "bame" / "configs")
    assert lines[2:] == ["quick quick", "configs/quick.yaml quick", "paper/cifar10_resnet32 cifar10_resnet32",
                         "demo demo"]

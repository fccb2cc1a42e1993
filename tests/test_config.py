"""Config loading and validation: every error at once, named by file and key; overrides; round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bame.config import (Config, ConfigError, apply_overrides, dump_yaml, from_dict, load_config, to_dict)

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIGS_DIR.rglob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, Config) and cfg.method.pattern == "2:4"


def test_every_error_is_collected_with_file_and_key(tmp_path):
    p = _write(tmp_path, """
train:
  lr: fast
  epochs: [1]
  nesterov: 3
method:
  name: bame
  layuot: row
data:
  name: cifar11
""")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    errors = info.value.errors
    assert len(errors) == 5
    assert all(e.startswith(str(p)) for e in errors)
    text = "\n".join(errors)
    for key in ("train.lr", "train.epochs", "train.nesterov", "method.layuot", "data.name"):
        assert key in text


def test_did_you_mean(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'train.batch_size'"):
        load_config(_write(tmp_path, "train:\n  batchsize: 8\n"))
    with pytest.raises(ConfigError, match=r"did you mean 'srste'"):
        load_config(None, ["method.name=srtse"])
    with pytest.raises(ConfigError, match=r"did you mean 'method.bame.interval_steps'"):
        load_config(None, ["method.bame.interval_step=5"])


def test_value_checks_name_the_key():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["method.pattern=3:2", "train.lr=-1", "method.bame.rho=2"])
    text = "\n".join(info.value.errors)
    assert "method.pattern" in text and "3:2" in text


def test_dotted_overrides_parse_values_as_yaml():
    cfg = load_config(None, ["train.max_steps=7", "train.lr=2e-3", "train.nesterov=true", "method.pattern=1:16",
                             "train.step_milestones=[0.3, 0.6]", "data.train_subset=null"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 0.002 and cfg.train.nesterov is True
    assert cfg.method.pattern == "1:16"  # kept verbatim, not YAML's base-60 integer 76
    assert cfg.train.step_milestones == (0.3, 0.6) and cfg.data.train_subset is None
    assert apply_overrides({"a": {"b": 1}}, ["a.c.d=2"]) == {"a": {"b": 1, "c": {"d": 2}}}
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


def test_overrides_apply_on_top_of_the_file(tmp_path):
    p = _write(tmp_path, "train:\n  lr: 0.5\n  epochs: 3\n")
    cfg = load_config(p, ["train.lr=0.25"])
    assert cfg.train.lr == 0.25 and cfg.train.epochs == 3


def test_yaml_round_trip():
    cfg = load_config(None, ["method.pattern=1:16", "train.step_milestones=[0.5]", "train.max_steps=9",
                             "name=round trip"])
    text = dump_yaml(cfg)
    assert from_dict(yaml.safe_load(text)) == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_unquoted_pattern_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"method.pattern: unquoted N:M pattern read by YAML as 76") as info:
        load_config(_write(tmp_path, "method:\n  pattern: 1:16\n"))
    assert 'pattern: "1:16"' in str(info.value)


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(tmp_path / "nope.yaml")
    assert len(info.value.errors) == 1


@pytest.mark.parametrize("path", CONFIGS, ids=[p.relative_to(CONFIGS_DIR).as_posix() for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.name and cfg.name != Config().name  # run ids carry the config's name: each config sets one
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_shipped_configs_exist():
    names = {p.relative_to(CONFIGS_DIR).as_posix() for p in CONFIGS}
    for name in ("quick.yaml", "fmnist_lenet.yaml", "fmnist_resnet20.yaml", "paper/cifar10_resnet32.yaml",
                 "paper/cifar10_mobilenet_v2.yaml", "paper/imagenet_resnet18.yaml", "paper/imagenet_resnet50.yaml"):
        assert name in names


def test_paper_recipes():
    c = load_config(CONFIGS_DIR / "paper/cifar10_resnet32.yaml").train
    assert (c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay, c.lr_schedule, c.label_smoothing) == \
        (300, 256, 0.1, 0.9, 1e-3, "cosine", 0.1)
    i = load_config(CONFIGS_DIR / "paper/imagenet_resnet50.yaml").train
    assert (i.epochs, i.batch_size, i.lr, i.warmup_epochs, i.weight_decay, i.lr_schedule, i.label_smoothing) == \
        (120, 256, 0.1, 5, 1e-4, "cosine", 0.1)

"""Config loading and validation: every error at once, named by file and key; overrides; round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bame.config import (Config, ConfigError, apply_overrides, available_configs, dump_yaml, from_dict, load_config,
                         resolve_config_path, to_dict)
from bame.schedule import resolve_interval

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
    for name in ("quick.yaml", "fmnist_lenet.yaml", "fmnist_resnet20.yaml", "fmnist_vit.yaml",
                 "paper/cifar10_resnet32.yaml", "paper/cifar10_mobilenet_v2.yaml", "paper/imagenet_resnet18.yaml",
                 "paper/imagenet_resnet50.yaml", "paper/imagenet_deit_small.yaml"):
        assert name in names


def test_paper_recipes():
    c = load_config(CONFIGS_DIR / "paper/cifar10_resnet32.yaml").train
    assert (c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay, c.lr_schedule, c.label_smoothing) == \
        (300, 256, 0.1, 0.9, 1e-3, "cosine", 0.1)
    i = load_config(CONFIGS_DIR / "paper/imagenet_resnet50.yaml").train
    assert (i.epochs, i.batch_size, i.lr, i.warmup_epochs, i.weight_decay, i.lr_schedule, i.label_smoothing) == \
        (120, 256, 0.1, 5, 1e-4, "cosine", 0.1)
    # DeiT (Touvron et al. 2021): lr 5e-4 x total batch / 512 on 4 processes of 256, warm-up from 1e-6, down to 1e-5
    d = load_config(CONFIGS_DIR / "paper/imagenet_deit_small.yaml")
    t, gpus = d.train, 4
    assert (d.model.name, t.optimizer, t.epochs, t.warmup_epochs, t.weight_decay, t.label_smoothing, t.betas, t.eps,
            t.clip_grad_norm, t.lr_schedule) == ("deit_small", "adamw", 300, 5, 0.05, 0.1, (0.9, 0.999), 1e-8, None,
                                                 "cosine")
    assert t.lr == pytest.approx(5e-4 * t.batch_size * gpus / 512)
    assert t.lr * t.warmup_start_factor == pytest.approx(1e-6) and t.lr * t.min_lr_factor == pytest.approx(1e-5)


def test_every_range_error_is_named_in_one_error():
    bad = {
        "train.label_smoothing": "1.5", "train.momentum": "-1", "train.warmup_epochs": "-1", "train.weight_decay": "-0.1",
        "train.batch_size": "0", "train.eval_batch_size": "0", "train.step_gamma": "0", "train.step_milestones[1]": None,
        "train.eval_every_epochs": "-1", "train.checkpoint_every_steps": "0", "train.lr": "0",
        "method.bame.tau": "2", "method.bame.beta": "1", "method.bame.rho": "1.5", "method.bame.t_f_steps": "-3",
        "method.bame.min_changes": "-1", "method.bame.joint_lambda": "-1", "method.bame.interval_fraction": "1.5",
        "method.srste_decay": "-1", "method.asp_prune_fraction": "2",
        "data.test_subset": "0", "data.num_workers": "-1", "data.image_size": "0", "data.synthetic_channels": "0",
        "instrument.block_state_every_adaptations": "-1",
    }
    sets = [f"{k}={v}" for k, v in bad.items() if v is not None] + ["train.step_milestones=[0.5, 75]"]
    with pytest.raises(ConfigError) as info:
        load_config(None, sets)
    errors = info.value.errors
    assert len(errors) == len(bad)
    assert all(e.startswith("<defaults> + --set: ") for e in errors)
    for key in bad:
        assert sum(f": {key}: " in e for e in errors) == 1, key
    text = "\n".join(errors)
    assert "must lie in [0, 1)" in text and "fractions of training" in text and "method.bame.obf=false" in text


def test_every_optimizer_error_is_named_in_one_line():
    """Each key in range for its optimizer, and none of the other family's keys set."""
    adam = {"train.betas": "[0.9]", "train.eps": "0", "train.momentum": "0.5", "train.nesterov": "true",
            "train.clip_grad_norm": "0", "train.warmup_start_factor": "1", "train.min_lr_factor": "-0.1"}
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.optimizer=adamw"] + [f"{k}={v}" for k, v in adam.items()])
    errors = info.value.errors
    assert len(errors) == len(adam) and all(len(e.splitlines()) == 1 for e in errors)
    for key in adam:
        assert sum(f": {key}: " in e for e in errors) == 1, key
    text = "\n".join(errors)
    assert "is SGD's" in text and "train.betas[0]" in text and "two numbers" in text
    with pytest.raises(ConfigError, match=r"train.betas: both must lie in \[0, 1\)"):
        load_config(None, ["train.optimizer=adam", "train.betas=[0.9, 1.0]"])
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.betas=[0.8, 0.99]", "train.eps=1e-6"])  # optimizer sgd
    assert [e.split(": ")[1] for e in info.value.errors] == ["train.betas", "train.eps"]
    assert "train.optimizer=adamw" in info.value.errors[0]
    with pytest.raises(ConfigError, match="train.min_lr_factor: is where 'cosine' ends"):
        load_config(None, ["train.lr_schedule=step", "train.min_lr_factor=0.01"])
    with pytest.raises(ConfigError, match="train.optimizer: 'adamww' is not one of .*did you mean 'adamw'"):
        load_config(None, ["train.optimizer=adamww"])
    cfg = load_config(None, ["train.optimizer=adam", "train.betas=[0, 0.5]", "train.clip_grad_norm=1",
                             "train.momentum=0.9", "train.warmup_start_factor=0", "train.min_lr_factor=0.5"])
    assert cfg.train.betas == (0.0, 0.5) and from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_tau_and_fractions_accept_their_edges():
    cfg = load_config(None, ["method.bame.tau=1", "train.momentum=0", "train.label_smoothing=0", "train.step_gamma=1",
                             "method.bame.interval_fraction=1", "train.step_milestones=[0, 1]", "data.num_workers=0"])
    assert cfg.method.bame.tau == 1.0 and cfg.method.bame.interval_fraction == 1.0


def test_nesterov_needs_momentum():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.nesterov=true", "train.momentum=0"])
    assert len(info.value.errors) == 1
    message = info.value.errors[0]
    assert "train.nesterov" in message and "train.momentum > 0" in message and "train.nesterov=false" in message
    assert load_config(None, ["train.nesterov=true", "train.momentum=0.9"]).train.nesterov


def test_warmup_must_be_shorter_than_the_run():
    with pytest.raises(ConfigError, match=r"train.warmup_epochs: warm-up \(2.0 epochs\) lasts the whole run"):
        load_config(None, ["train.epochs=2", "train.warmup_epochs=2"])
    assert load_config(None, ["train.epochs=0", "train.max_steps=10", "train.warmup_epochs=2"]).train.max_steps == 10


def test_interval_fraction_replaces_interval_steps():
    cfg = load_config(None, ["method.bame.interval_fraction=0.05"])
    assert cfg.method.bame.interval_fraction == 0.05 and cfg.method.bame.interval_steps == 100
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg  # the round trip writes both
    both = load_config(None, ["method.bame.interval_fraction=0.05", "method.bame.interval_steps=20"])
    assert resolve_interval(both.method.bame.interval_steps, both.method.bame.interval_fraction, 1000) == 50
    with pytest.raises(ConfigError, match=r"method.bame.interval_fraction: must lie in \(0, 1\]"):
        load_config(None, ["method.bame.interval_fraction=0"])


def test_named_experiments_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick = load_config(CONFIGS_DIR / "quick.yaml")
    for name in ("quick", "quick.yaml", "configs/quick.yaml", "./configs/quick.yaml"):
        assert load_config(name) == quick, name
    assert load_config("paper/imagenet_resnet50").model.name == "resnet50"
    assert resolve_config_path("quick") == CONFIGS_DIR / "quick.yaml"
    assert {"quick", "demo", "paper/cifar10_resnet32", "study/fmnist_lenet_wide"} <= set(available_configs())
    (tmp_path / "quick.yaml").write_text("name: mine\nmethod:\n  name: static\n")
    assert load_config("quick.yaml").name == "mine"  # a file that exists wins over the named experiment
    assert load_config("quick").name == "quick"


def test_an_unknown_config_lists_the_named_experiments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"qiuck: config file not found; .*paper/cifar10_resnet32.*quick"):
        load_config("qiuck")

"""Typed, frozen experiment configs: YAML files plus dotted ``--set`` overrides, validated at once.

A config has five sections (``data``, ``model``, ``method``, ``train``, ``instrument``); every key has
a documented default here, so a YAML file only names what differs. ``method`` holds the keys every method
shares and one nested section per method that has settings of its own (``method.bame``, ``method.phased``),
defined next to the method (``bame.methods``) and taken from the registry, as are the choices of
``method.name``. Validation collects every error (wrong type, bad choice, unknown key with a did-you-mean)
and raises one :class:`ConfigError` that names the source file and the dotted key of each; a method's
section is checked only when that method runs. The machinery of typed sections is ``bame.schema``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .data.specs import DataConfig
from .instrument import InstrumentConfig
from .layer_patterns import load_scheme, parse_rules
from .methods import METHOD_SECTIONS, METHODS, MethodCommon
from .methods.base import PatternRule
from .methods.bame import BameConfig
from .methods.phased import PhasedConfig
from .optim import OPTIMIZERS
from .schedule import LR_SCHEDULES
from .schema import ConfigError, at_least, choice, from_plain, to_plain

__all__ = [
    "ConfigError", "DataConfig", "ModelConfig", "BameConfig", "PhasedConfig", "MethodConfig", "PatternRule", "TrainConfig",
    "InstrumentConfig", "Config", "load_config", "from_dict", "to_dict", "apply_overrides", "dump_yaml",
    "configs_dir", "available_configs", "resolve_config_path", "experiment_identity", "with_value",
]

@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet20"  # any name in bame.models.available(); classes/channels come from the data


def _method_config() -> type:
    """MethodCommon with ``name``'s choices from the registry, plus one field per registered method section
    (``bame: BameConfig``, ...), by name."""
    name_field = ("name", str, choice(*sorted(METHODS), default=MethodCommon.name))
    sections = [(name, cls, field(default_factory=cls)) for name, cls in sorted(METHOD_SECTIONS.items())]
    doc = ("The ``method`` section: the keys every method shares and each method's own section "
           f"({', '.join(name for name, _, _ in sections)}).")
    return dataclasses.make_dataclass("MethodConfig", [name_field, *sections], bases=(MethodCommon,), frozen=True,
                                      namespace={"__module__": __name__, "__doc__": doc})


MethodConfig = _method_config()


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 10  # the schedule's length (LR, BAME windows) unless max_steps is all there is
    max_steps: Optional[int] = None  # stop after this many optimizer steps
    batch_size: int = 128
    eval_batch_size: int = 512
    seed: int = 0
    # sgd; adam (L2 decay in the gradient) or adamw (decoupled decay), both bame.optim.MaskedAdam: pruned
    # weights do not move and a restarted position restarts as a fresh Adam (docs/method.md, "Optimizers")
    optimizer: str = choice(*OPTIMIZERS, default="sgd")
    lr: float = 0.1
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    betas: tuple[float, ...] = (0.9, 0.999)  # adam / adamw only
    eps: float = 1e-8  # adam / adamw only
    weight_decay: float = 5e-4  # sgd / adam: L2, wd * W in the gradient; adamw: W *= 1 - lr_t * wd
    # exclude norm parameters, biases and the names the model lists in its no_weight_decay() (timm's ViT:
    # pos_embed, cls_token) from weight decay
    no_decay_bn_bias: bool = True
    clip_grad_norm: Optional[float] = None  # clip the gradients' total L2 norm to this before the optimizer step
    lr_schedule: str = choice(*LR_SCHEDULES, default="cosine")
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.0  # the warm-up rises linearly from this fraction of lr (DeiT: 1e-6 / lr)
    min_lr_factor: float = 0.0  # 'cosine' ends at this fraction of lr (DeiT: 1e-5 / lr)
    step_milestones: tuple[float, ...] = (0.5, 0.75)  # 'step': fractions of training
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    amp: str = choice("off", "bf16", "fp16", default="off")  # autocast on the run's device; fp16 adds a GradScaler
    channels_last: bool = False
    device: str = "auto"  # 'auto' (cuda if present), 'cpu', 'cuda', 'cuda:1', ...
    deterministic: bool = True
    eval_every_epochs: float = 1.0
    log_every_steps: int = 50
    checkpoint_every_steps: Optional[int] = None  # also checkpoint every k steps (always at epoch ends)
    progress: bool = True  # tqdm progress bar
    # also write TensorBoard events under RUN/tensorboard/ (rank 0; bame.tensorboard_sink; the tensorboard extra)
    tensorboard: bool = False
    # torchrun: after every mask-adaptation step all-reduce a checksum of each N:M mask and raise if the
    # ranks disagree (two tiny all-reduces per adaptation step; nothing for one process)
    check_mask_sync: bool = True
    # stop the run as 'diverged' once the training loss has been non-finite (NaN, inf) for this many
    # consecutive optimizer steps (steps the fp16 GradScaler skipped do not count); 0: never
    nan_patience: int = 10


@dataclass(frozen=True)
class Config:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    instrument: InstrumentConfig = field(default_factory=InstrumentConfig)


# --------------------------------------------------------------------------------------------------
# validation, and plain dicts


def _check_values(cfg: Config, source: str) -> list[str]:
    """Cross-field and range checks that types cannot express; each message says what to write instead."""
    errors = []

    def bad(key: str, msg: str) -> None:
        errors.append(f"{source}: {key}: {msg}")

    def check(section: Any, prefix: str, keys: tuple[str, ...], low: int, meaning: str = "") -> None:
        for key, msg in at_least(section, keys, low, meaning):
            bad(f"{prefix}.{key}", msg)

    d = cfg.data
    check(d, "data", ("train_subset", "test_subset", "image_size", "synthetic_train_size",
                      "synthetic_test_size", "synthetic_num_classes", "synthetic_image_size",
                      "synthetic_channels"), 1)
    check(d, "data", ("num_workers",), 0, " (0 loads in the main process)")

    # A method's own section (method.bame, ...) is checked only for that method: a static or SR-STE run
    # does not fail on values BAME alone would use.
    for name in METHODS[cfg.method.name].config_sections:
        for key, msg in getattr(cfg.method, name).problems(cfg.method):
            bad(f"method.{name}.{key}", msg)
    if not 0.0 <= cfg.method.asp_prune_fraction <= 1.0:
        bad("method.asp_prune_fraction", f"must lie in [0, 1], got {cfg.method.asp_prune_fraction}")
    if cfg.method.srste_decay < 0:
        bad("method.srste_decay", f"must be >= 0 (SR-STE's lambda_w, e.g. 2e-4), got {cfg.method.srste_decay}")
    if cfg.method.layer_pattern_file is not None:
        try:
            load_scheme(cfg.method.layer_pattern_file)
        except ValueError as err:
            bad("method.layer_pattern_file", str(err))

    t = cfg.train
    if t.epochs <= 0 and t.max_steps is None:
        bad("train.epochs", "must be > 0 (or set train.max_steps)")
    elif t.epochs < 0:
        bad("train.epochs", f"must be >= 0, got {t.epochs} (0: the schedule is train.max_steps long)")
    check(t, "train", ("max_steps", "batch_size", "eval_batch_size", "log_every_steps"), 1)
    if t.checkpoint_every_steps is not None and t.checkpoint_every_steps < 1:
        bad("train.checkpoint_every_steps", f"must be >= 1 or null (checkpoint at epoch ends only), "
            f"got {t.checkpoint_every_steps}")
    if t.lr <= 0:
        bad("train.lr", f"must be > 0, got {t.lr}")
    errors += [f"{source}: {msg}" for msg in _optimizer_problems(t)]
    if t.weight_decay < 0:
        bad("train.weight_decay", f"must be >= 0 (0: no weight decay), got {t.weight_decay}")
    if t.clip_grad_norm is not None and not t.clip_grad_norm > 0:
        bad("train.clip_grad_norm", f"must be > 0 or null (no clipping), got {t.clip_grad_norm}")
    if not 0.0 <= t.warmup_start_factor < 1.0:
        bad("train.warmup_start_factor", f"must lie in [0, 1) (a fraction of train.lr), got {t.warmup_start_factor}")
    if not 0.0 <= t.min_lr_factor < 1.0:
        bad("train.min_lr_factor", f"must lie in [0, 1) (a fraction of train.lr), got {t.min_lr_factor}")
    elif t.min_lr_factor and t.lr_schedule != "cosine":
        bad("train.min_lr_factor", f"is where 'cosine' ends; train.lr_schedule={t.lr_schedule!r} does not read it: "
            f"set it to 0 or use lr_schedule=cosine")
    if t.warmup_epochs < 0:
        bad("train.warmup_epochs", f"must be >= 0 (0: no warm-up), got {t.warmup_epochs}")
    elif 0 < t.epochs <= t.warmup_epochs:
        bad("train.warmup_epochs", f"warm-up ({t.warmup_epochs} epochs) lasts the whole run of {t.epochs} "
            f"epochs: make it shorter than train.epochs")
    for i, m in enumerate(t.step_milestones):
        if not 0.0 <= m <= 1.0:
            bad(f"train.step_milestones[{i}]", f"must lie in [0, 1], got {m}: milestones are fractions of "
                f"training (e.g. [0.5, 0.75]), not epochs or steps")
    if not 0.0 < t.step_gamma <= 1.0:
        bad("train.step_gamma", f"must lie in (0, 1] (the LR factor at each milestone, e.g. 0.1), got {t.step_gamma}")
    if not 0.0 <= t.label_smoothing < 1.0:
        bad("train.label_smoothing", f"must lie in [0, 1), got {t.label_smoothing} (0: off; 0.1 is usual)")
    if t.eval_every_epochs < 0:
        bad("train.eval_every_epochs", f"must be >= 0 (0: evaluate only at the end), got {t.eval_every_epochs}")
    check(t, "train", ("nan_patience",), 0, " (0: no divergence guard)")
    check(cfg.instrument, "instrument", ("block_state_every_adaptations",), 0, " (0: never)")
    return errors


def _optimizer_problems(t: TrainConfig) -> list[str]:
    """``'train.<key>: message'`` for each optimizer key out of range, or set for the other optimizer family."""
    out = []
    default = TrainConfig()
    if t.optimizer == "sgd":
        if not 0.0 <= t.momentum < 1.0:
            out.append(f"train.momentum: must lie in [0, 1), got {t.momentum} (0: plain SGD; 0.9 is usual)")
        elif t.nesterov and t.momentum == 0:
            out.append("train.nesterov: Nesterov momentum needs train.momentum > 0, got train.momentum=0: set "
                       "train.momentum (e.g. 0.9) or train.nesterov=false")
        for key in ("betas", "eps"):
            if getattr(t, key) != getattr(default, key):
                out.append(f"train.{key}: only adam and adamw read it, and train.optimizer is sgd: remove it or set "
                           f"train.optimizer=adamw")
        return out
    if t.momentum != default.momentum:
        out.append(f"train.momentum: is SGD's, and train.optimizer is {t.optimizer}, whose momentum is "
                   f"train.betas[0]: remove train.momentum")
    if t.nesterov:
        out.append(f"train.nesterov: is SGD's, and train.optimizer is {t.optimizer}: remove it")
    if len(t.betas) != 2:
        out.append(f"train.betas: must be two numbers [beta1, beta2], got {list(t.betas)} (e.g. [0.9, 0.999])")
    elif not all(0.0 <= b < 1.0 for b in t.betas):
        out.append(f"train.betas: both must lie in [0, 1), got {list(t.betas)} (e.g. [0.9, 0.999])")
    if not t.eps > 0:
        out.append(f"train.eps: must be > 0 (Adam's denominator term, e.g. 1e-8), got {t.eps}")
    return out


def from_dict(data: dict, source: str = "<dict>") -> Config:
    """Build and validate a :class:`Config`; raises :class:`ConfigError` listing every problem."""
    errors: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the top level must be a mapping of sections, got {type(data).__name__}"])
    data, errors = _check_layer_rules(data, source)
    cfg = from_plain(Config, data, "", errors, source)
    if not errors:
        errors = _check_values(cfg, source)
    if errors:
        raise ConfigError(errors)
    return cfg


def _check_layer_rules(data: dict, source: str) -> tuple[dict, list[str]]:
    """``method.layer_patterns`` checked as written, before conversion (an unquoted ``2:4`` is still the
    integer YAML made of it); a bad list becomes one error naming the rule and is left out of ``data``."""
    method = data.get("method")
    if not isinstance(method, dict) or "layer_patterns" not in method:
        return data, []
    try:
        parse_rules(method["layer_patterns"], "method.layer_patterns")
    except ValueError as err:
        rest = {k: v for k, v in method.items() if k != "layer_patterns"}
        return {**data, "method": rest}, [f"{source}: {err}"]
    return data, []


def to_dict(cfg: Any) -> dict:
    """A plain dict (lists for tuples, the pattern as ``"N:M"``) that :func:`from_dict` turns back into the
    same config."""
    return to_plain(cfg)


def with_value(cfg: Config, key: str, value: Any) -> Config:
    """``cfg`` with the dotted ``key`` (e.g. ``method.bame.rho``) set to ``value``, not validated again."""
    head, _, rest = key.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: with_value(getattr(cfg, head), rest, value)})


def experiment_identity(cfg: Config) -> dict[str, Any]:
    """The resolved config as a dict, less the method sections its method never reads.

    Two runs with equal identities are the same experiment: a static run stays "done" when a default
    of BAME's section changes. Sweeps and the demo use this to skip completed runs.
    """
    data = to_dict(cfg)
    cls = METHODS.get(cfg.method.name)
    used = cls.config_sections if cls is not None else ()
    for key, value in list(data["method"].items()):
        if isinstance(value, dict) and key not in used:
            del data["method"][key]
    return data


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError([f"--set {item!r}: write overrides as key=value, e.g. method.pattern=1:16"])
    key, raw = item.split("=", 1)
    if key.strip().endswith("pattern"):
        value = raw.strip()  # kept verbatim: YAML 1.1 would read 1:16 as a base-60 integer
    else:
        value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict; returns a new dict."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return out


def configs_dir() -> Path:
    """The named experiments: the repository's ``configs/`` in a source checkout (editable install), or
    the copy a wheel installs as ``bame/configs/``."""
    package = Path(__file__).resolve().parent
    checkout = package.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs").is_dir():
        return checkout / "configs"
    return package / "configs"


def available_configs() -> list[str]:
    """Names of the named experiments, e.g. ``quick`` or ``paper/cifar10_resnet32``."""
    root = configs_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself when it exists; else the named experiment it names: ``quick``, ``quick.yaml``,
    ``paper/cifar10_resnet32`` or ``configs/quick.yaml`` (so the README's commands work from any directory
    once bame is installed). Unresolvable paths come back unchanged (``load_config`` then says so)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    name = p.as_posix().removeprefix("./").removeprefix("configs/")
    for candidate in (configs_dir() / name, configs_dir() / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    return p


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        names = ", ".join(available_configs()) or "none found"
        raise ConfigError([f"{path}: config file not found; give a YAML path or a named experiment "
                           f"({names}; e.g. --config quick)"])
    if path.is_dir():
        first = next(iter(sorted(path.glob("*.yaml"))), None)
        example = f" (e.g. {first})" if first is not None else ""
        raise ConfigError([f"{path}: is a folder, not a config file; give a YAML file{example}"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML: {' '.join(str(err).split())}"]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([f"{path}: cannot read it ({err}); give a readable YAML file"]) from None
    return _reject_unquoted_patterns(data)


def _reject_unquoted_patterns(node: Any) -> Any:
    """YAML 1.1 reads an unquoted ``1:16`` as the base-60 integer 76: ask for quotes instead."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "pattern" and isinstance(v, int):
                raise ConfigError([f"method.pattern: unquoted N:M pattern read by YAML as {v}: quote it, "
                                   f"e.g. pattern: \"1:16\""])
            out[k] = _reject_unquoted_patterns(v)
        return out
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    if path is not None:
        path = resolve_config_path(path)
    data = _read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + --set"
    return from_dict(data, source)


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML, every default filled in."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

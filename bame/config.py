"""Typed, frozen experiment configs: YAML files plus dotted ``--set`` overrides, validated at once.

A config has five sections (``data``, ``model``, ``method``, ``train``, ``instrument``); every key has
a documented default here, so a YAML file only names what differs. Validation collects every error
(wrong type, bad choice, unknown key with a did-you-mean) and raises one :class:`ConfigError` that
names the source file and the dotted key of each.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .data.specs import DATASETS
from .nm import Layout, NMPattern

__all__ = [
    "ConfigError", "DataConfig", "ModelConfig", "BameConfig", "PhasedConfig", "MethodConfig", "TrainConfig",
    "InstrumentConfig", "Config", "load_config", "from_dict", "to_dict", "apply_overrides", "dump_yaml",
    "configs_dir", "available_configs", "resolve_config_path",
]


class ConfigError(ValueError):
    """One or more config problems; ``errors`` lists each as ``'<source>: <key>: <message>'``."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid config:\n  " + "\n  ".join(errors))


def _choices(*values: str, default: str) -> Any:
    return field(default=default, metadata={"choices": values})


@dataclass(frozen=True)
class DataConfig:
    name: str = _choices(*DATASETS, default="fashion-mnist")
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


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet20"  # any name in bame.models.available(); classes/channels come from the data


@dataclass(frozen=True)
class BameConfig:
    """BAME's readings of method.md; every default is a hypothesis (see docs/results.md)."""

    block_rows: int = 1  # a block is block_rows x block_groups groups of M
    block_groups: int = 1
    t_i_fraction: float = 0.0  # adaptation window start, as a fraction of training steps
    t_i_steps: Optional[int] = None  # ... or in steps (overrides the fraction)
    t_f_fraction: float = 0.5  # adaptation window end (mask fixed afterwards)
    t_f_steps: Optional[int] = None
    interval_steps: int = 100  # T: adapt once every T steps inside [t_i, t_f)
    # ... or T as a fraction of training steps: T = max(1, round_half_up(fraction * total_steps));
    # when set, it replaces interval_steps (so a config that sets interval_steps can switch with one --set)
    interval_fraction: Optional[float] = None
    # 'absolute': adapt where step % T == 0 (method.md); 't_i': where (step - t_i) % T == 0
    interval_anchor: str = _choices("absolute", "t_i", default="absolute")
    # Regrowth/drop score. 'gradient' (RigL-style regrowth by |g_j|) is the default: on Fashion-MNIST 1:16 it
    # beat 'taylor' by 1.5 points over 3 seeds and tied the static mask (docs/results.md).
    lma: str = _choices("taylor", "gradient", default="gradient")
    obf: bool = True  # oscillation-aware block freezing
    beta: float = 0.9  # EMA decay of the oscillation frequency
    # which blocks get the EMA update on an adaptation step: 'changed' (only blocks whose mask changed;
    # f_b is then the recent share of a block's changes that were oscillations) or 'candidates' (every
    # candidate block, event 0 when it did not oscillate; f_b is then oscillations per adaptation)
    obf_update: str = _choices("changed", "candidates", default="changed")
    obf_bias_correction: bool = False  # compare f_b / (1 - beta^updates) with tau (Adam-style), not f_b
    tau: float = 0.5  # freeze a block once its frequency (in [0, 1]) >= tau, tau in (0, 1] ...
    min_changes: int = 2  # ... and it has changed at least this often
    selection: str = _choices("freeze_then_topk", "joint", default="freeze_then_topk")
    joint_lambda: float = 1.0  # selection 'joint': rank by R_b / (1 + lambda f_b)
    # fraction of a layer's blocks changed per adaptation ... 0.0125, not method.md's 0.05: on Fashion-MNIST 1:16
    # over 10 epochs 0.05 lost 0.53 points to the static mask and 0.0125 0.07; over 3 epochs they tied
    # (docs/results.md). At a fixed T in steps a longer schedule adapts more often: fewer swaps per step.
    rho: float = 0.0125
    rho_decay: str = _choices("cosine", "constant", default="cosine")  # ... decayed to 0 at t_f
    # blocks selected per layer = rounding(rho(t) * num_blocks): 'round' (half up), 'ceil', 'floor'
    rho_rounding: str = _choices("round", "ceil", "floor", default="round")
    swaps_per_block: int = 1
    # LMA scores from the mean candidate gradient of the last score_steps steps up to and including the
    # adaptation step (1: that step's mini-batch only, method.md). Candidate blocks get their dense weight
    # gradient on each of those steps (counted by the ledger); at most T.
    score_steps: int = 1
    regrow: str = _choices("stored", "zero", default="stored")  # value of a regrown weight
    # -- the second family: designated blocks that learn (docs/method.md, "Blocks that learn") --------
    # Which blocks compute their full weight gradient: 'adaptation' (the candidates, on adaptation steps
    # only) or 'window' (the blocks designated at an adaptation step, on every step up to and including the
    # next adaptation step, or t_f).
    designated_grad: str = _choices("adaptation", "window", default="adaptation")
    # 'frozen': pruned weights keep their stored value; 'train': the pruned weights of designated blocks
    # take the optimizer update (momentum, masked weight decay) from that gradient (needs 'window').
    pruned_update: str = _choices("frozen", "train", default="frozen")
    # SR-STE's refined decay lambda_w (1 - m) W on the pruned weights of designated blocks ('train' only);
    # None: method.srste_decay; 0: off
    pruned_decay: Optional[float] = None
    # How a block's mask is re-chosen: 'lma' (its best LMA swap) or 'magnitude' (top-N |W| of each group)
    regrow_rule: str = _choices("lma", "magnitude", default="lma")
    # Which blocks are designated: 'topk' (the top rho(t) of a layer by LMA score) or 'progressive' (every
    # non-frozen block; OBF freezing shrinks the set; rho is unused)
    designation: str = _choices("topk", "progressive", default="topk")


@dataclass(frozen=True)
class PhasedConfig:
    """``phased``: SR-STE until ``switch_fraction`` of the training steps, then a frozen mask (static)."""

    switch_fraction: float = 0.25


@dataclass(frozen=True)
class MethodConfig:
    name: str = _choices("dense", "static", "ste", "srste", "asp", "bame", "phased", default="bame")
    pattern: str = "2:4"  # N:M, e.g. '1:16'
    layout: str = _choices("row", "channel", default="row")
    mask_init: str = _choices("magnitude", "random", default="magnitude")
    first_conv_dense: bool = True
    classifier_dense: bool = True
    depthwise_dense: bool = True
    on_indivisible: str = _choices("dense", "error", default="dense")
    srste_decay: float = 2e-4  # lambda_w of SR-STE
    asp_prune_fraction: float = 0.5  # ASP: one-shot prune at this fraction of training
    # SPARSE weight gradient: dense kernel then mask, only the needed positions (SDDMM), or per layer the
    # faster of the two, timed once (docs/performance.md: where gather pays and where it does not)
    weight_grad_kernel: str = _choices("masked_dense", "gather", "auto", default="masked_dense")
    bame: BameConfig = field(default_factory=BameConfig)
    phased: PhasedConfig = field(default_factory=PhasedConfig)


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 10  # the schedule's length (LR, BAME windows) unless max_steps is all there is
    max_steps: Optional[int] = None  # stop after this many optimizer steps
    batch_size: int = 128
    eval_batch_size: int = 512
    seed: int = 0
    optimizer: str = _choices("sgd", default="sgd")
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_decay_bn_bias: bool = True  # exclude BN parameters and biases from weight decay
    lr_schedule: str = _choices("cosine", "step", "constant", default="cosine")
    warmup_epochs: float = 0.0
    step_milestones: tuple[float, ...] = (0.5, 0.75)  # 'step': fractions of training
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    amp: str = _choices("off", "bf16", "fp16", default="off")  # autocast on the run's device; fp16 adds a GradScaler
    channels_last: bool = False
    device: str = "auto"  # 'auto' (cuda if present), 'cpu', 'cuda', 'cuda:1', ...
    deterministic: bool = True
    eval_every_epochs: float = 1.0
    log_every_steps: int = 50
    checkpoint_every_steps: Optional[int] = None  # also checkpoint every k steps (always at epoch ends)
    progress: bool = True  # tqdm progress bar
    # torchrun: after every mask-adaptation step all-reduce a checksum of each N:M mask and raise if the
    # ranks disagree (two tiny all-reduces per adaptation step; nothing for one process)
    check_mask_sync: bool = True
    # stop the run as 'diverged' once the training loss has been non-finite (NaN, inf) for this many
    # consecutive optimizer steps (steps the fp16 GradScaler skipped do not count); 0: never
    nan_patience: int = 10


@dataclass(frozen=True)
class InstrumentConfig:
    flops: bool = True  # exact per-step FLOPs ledger
    mask_flips: bool = True  # SAD per layer per logged step
    block_state_every_adaptations: int = 1  # save BAME per-block state every k adaptation steps (0: never)


@dataclass(frozen=True)
class Config:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    instrument: InstrumentConfig = field(default_factory=InstrumentConfig)


# --------------------------------------------------------------------------------------------------
# dict <-> dataclass with every error collected


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value: Any, tp: Any, key: str, errors: list[str], source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, errors, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{source}: {key}: expected a mapping (section), got {value!r}")
            return tp()
        return _from_dict(tp, value, key + ".", errors, source)
    if origin is tuple:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            errors.append(f"{source}: {key}: expected a list, got {value!r}")
            return ()
        return tuple(_convert(v, args[0], f"{key}[{i}]", errors, source) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{source}: {key}: expected true/false, got {value!r}")
        return False
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        errors.append(f"{source}: {key}: expected an integer, got {value!r}")
        return 0
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads '2e-4' as a string
            except ValueError:
                pass
        errors.append(f"{source}: {key}: expected a number, got {value!r}")
        return 0.0
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        errors.append(f"{source}: {key}: expected a string, got {value!r}")
        return ""
    errors.append(f"{source}: {key}: unsupported type {_type_name(tp)}")
    return value


def _from_dict(cls: type, data: dict, prefix: str, errors: list[str], source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            errors.append(f"{source}: {prefix}{key}: unknown key{hint}")
            continue
        converted = _convert(value, hints[key], prefix + key, errors, source)
        choices = fields[key].metadata.get("choices")
        if choices and converted not in choices:
            close = difflib.get_close_matches(str(converted), list(choices), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            errors.append(f"{source}: {prefix}{key}: {converted!r} is not one of {list(choices)}{hint}")
            continue
        kwargs[key] = converted
    return cls(**kwargs)


def _check_values(cfg: Config, source: str) -> list[str]:
    """Cross-field and range checks that types cannot express; each message says what to write instead."""
    errors = []

    def bad(key: str, msg: str) -> None:
        errors.append(f"{source}: {key}: {msg}")

    def at_least(section: Any, prefix: str, keys: tuple[str, ...], low: int, meaning: str = "") -> None:
        for key in keys:
            value = getattr(section, key)
            if value is not None and value < low:
                bad(f"{prefix}.{key}", f"must be >= {low}{meaning}, got {value}")

    try:
        pattern = NMPattern.parse(cfg.method.pattern)
    except ValueError as err:
        bad("method.pattern", str(err))
        pattern = None
    Layout.parse(cfg.method.layout)

    d = cfg.data
    at_least(d, "data", ("train_subset", "test_subset", "image_size", "synthetic_train_size",
                         "synthetic_test_size", "synthetic_num_classes", "synthetic_image_size",
                         "synthetic_channels"), 1)
    at_least(d, "data", ("num_workers",), 0, " (0 loads in the main process)")

    b = cfg.method.bame
    for key in ("t_i_fraction", "t_f_fraction"):
        if not 0.0 <= getattr(b, key) <= 1.0:
            bad(f"method.bame.{key}", f"must lie in [0, 1] (a fraction of training), got {getattr(b, key)}")
    at_least(b, "method.bame", ("t_i_steps", "t_f_steps"), 0, " (a 0-based optimizer step)")
    if b.t_i_steps is None and b.t_f_steps is None and b.t_i_fraction > b.t_f_fraction:
        bad("method.bame.t_i_fraction", f"t_i ({b.t_i_fraction}) is after t_f ({b.t_f_fraction})")
    if b.t_i_steps is not None and b.t_f_steps is not None and b.t_i_steps > b.t_f_steps:
        bad("method.bame.t_i_steps", f"t_i_steps ({b.t_i_steps}) is after t_f_steps ({b.t_f_steps})")
    at_least(b, "method.bame", ("interval_steps", "block_rows", "block_groups", "swaps_per_block", "score_steps"), 1)
    if b.interval_fraction is not None and not 0.0 < b.interval_fraction <= 1.0:
        bad("method.bame.interval_fraction", f"must lie in (0, 1] (T as a fraction of training steps), "
            f"got {b.interval_fraction}")
    if pattern is not None and b.swaps_per_block > min(pattern.n, pattern.m - pattern.n) * b.block_rows * b.block_groups:
        bad("method.bame.swaps_per_block", f"{b.swaps_per_block} swaps cannot fit in a block of "
            f"{b.block_rows}x{b.block_groups} groups of {pattern}")
    if not 0.0 < b.beta < 1.0:
        bad("method.bame.beta", f"must lie in (0, 1), got {b.beta}")
    if not 0.0 < b.tau <= 1.0:
        bad("method.bame.tau", f"must lie in (0, 1], got {b.tau}: a block's oscillation frequency is an EMA of "
            f"0/1 events, so tau > 1 never freezes (to turn freezing off set method.bame.obf=false) and "
            f"tau <= 0 freezes every block after min_changes changes")
    at_least(b, "method.bame", ("min_changes",), 0)
    if b.joint_lambda < 0:
        bad("method.bame.joint_lambda", f"must be >= 0 (0 ranks by R_b alone), got {b.joint_lambda}")
    if not 0.0 <= b.rho <= 1.0:
        bad("method.bame.rho", f"must lie in [0, 1], got {b.rho}")
    if b.designated_grad == "window" and b.pruned_update != "train":
        bad("method.bame.designated_grad", "'window' computes the designated blocks' full weight gradient on "
            "every step, which only method.bame.pruned_update=train uses: set pruned_update=train (or "
            "designated_grad=adaptation)")
    if b.pruned_update == "train" and b.designated_grad != "window":
        bad("method.bame.pruned_update", "'train' needs method.bame.designated_grad=window (with 'adaptation' "
            "the designated blocks have a gradient on one step only)")
    if b.pruned_decay is not None and b.pruned_decay < 0:
        bad("method.bame.pruned_decay", f"must be >= 0 or null (method.srste_decay), got {b.pruned_decay}")
    if not 0.0 <= cfg.method.phased.switch_fraction <= 1.0:
        bad("method.phased.switch_fraction", f"must lie in [0, 1] (a fraction of training), "
            f"got {cfg.method.phased.switch_fraction}")
    if not 0.0 <= cfg.method.asp_prune_fraction <= 1.0:
        bad("method.asp_prune_fraction", f"must lie in [0, 1], got {cfg.method.asp_prune_fraction}")
    if cfg.method.srste_decay < 0:
        bad("method.srste_decay", f"must be >= 0 (SR-STE's lambda_w, e.g. 2e-4), got {cfg.method.srste_decay}")

    t = cfg.train
    if t.epochs <= 0 and t.max_steps is None:
        bad("train.epochs", "must be > 0 (or set train.max_steps)")
    elif t.epochs < 0:
        bad("train.epochs", f"must be >= 0, got {t.epochs} (0: the schedule is train.max_steps long)")
    at_least(t, "train", ("max_steps", "batch_size", "eval_batch_size", "log_every_steps"), 1)
    if t.checkpoint_every_steps is not None and t.checkpoint_every_steps < 1:
        bad("train.checkpoint_every_steps", f"must be >= 1 or null (checkpoint at epoch ends only), "
            f"got {t.checkpoint_every_steps}")
    if t.lr <= 0:
        bad("train.lr", f"must be > 0, got {t.lr}")
    if not 0.0 <= t.momentum < 1.0:
        bad("train.momentum", f"must lie in [0, 1), got {t.momentum} (0: plain SGD; 0.9 is usual)")
    elif t.nesterov and t.momentum == 0:
        bad("train.nesterov", "Nesterov momentum needs train.momentum > 0, got train.momentum=0: set "
            "train.momentum (e.g. 0.9) or train.nesterov=false")
    if t.weight_decay < 0:
        bad("train.weight_decay", f"must be >= 0 (0: no weight decay), got {t.weight_decay}")
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
    at_least(t, "train", ("nan_patience",), 0, " (0: no divergence guard)")
    at_least(cfg.instrument, "instrument", ("block_state_every_adaptations",), 0, " (0: never)")
    # A method section (method.bame, ...) is checked only for a method that reads it: a static or SR-STE
    # run does not fail on values BAME alone would use.
    unread = tuple(f"{source}: method.{name}." for name in _unread_method_sections(cfg))
    return [e for e in errors if not e.startswith(unread)]


def _unread_method_sections(cfg: Config) -> list[str]:
    """The nested sections of MethodConfig that ``cfg.method.name`` does not read (its ``config_sections``)."""
    from .methods import METHODS  # imported here: bame.methods imports this module

    cls = METHODS.get(cfg.method.name)
    used = cls.config_sections if cls is not None else ()
    hints = typing.get_type_hints(MethodConfig)
    return [name for name, tp in hints.items() if dataclasses.is_dataclass(tp) and name not in used]


def from_dict(data: dict, source: str = "<dict>") -> Config:
    """Build and validate a :class:`Config`; raises :class:`ConfigError` listing every problem."""
    errors: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the top level must be a mapping of sections, got {type(data).__name__}"])
    cfg = _from_dict(Config, data, "", errors, source)
    if not errors:
        errors = _check_values(cfg, source)
    if errors:
        raise ConfigError(errors)
    return cfg


def to_dict(cfg: Any) -> dict:
    """A plain dict (lists for tuples) that :func:`from_dict` turns back into the same config."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


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

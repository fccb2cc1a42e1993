"""Groups of runs (the seeds of one experiment), their labels, and the tidy per-run table of comparisons.

A *group* is a set of completed runs that differ only in their seed: the same data, model, method,
pattern and the same value of every config key that tells runs apart (:func:`analysis.tables.comparable_keys`,
or keys given as ``by``). Its *settings* name what it changed from a *reference reading* (given, e.g. the
current defaults, or else each key's most common value): ``lma=gradient, rho=0.0125``; the reference
reading itself has empty settings. Its label reads ``bame 1:16 (lma=gradient)``; dense: ``dense``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from bame.contract import DENSE_PATTERN, LAYER_RULE_KEYS, MIXED_PATTERN, is_mixed
from bame.pattern import NMPattern

__all__ = ["DENSE_PATTERN", "MIXED_PATTERN", "METHOD_ORDER", "POINT_COLUMNS", "comparable_keys", "fill_defaults",
           "group_labels", "group_settings", "matching", "pattern_labels", "prepare_groups", "reference_reading",
           "run_groups", "run_points"]

# The columns of run_points, in order (the group keys follow them).
POINT_COLUMNS = ["run_id", "group", "method", "pattern", "settings", "family", "experiment", "seed", "top1",
                 "train_flops"]

# The order methods appear in tables and legends; unknown methods follow alphabetically.
METHOD_ORDER = ("dense", "static", "ste", "srste", "asp", "lbc", "bimask", "bame")

# Config keys that never change the numbers a run produces: not grouped on, not checked.
_IGNORED_KEYS = ("name", "train.seed", "train.device", "train.progress", "data.root", "data.num_workers",
                 "train.eval_batch_size", "train.log_every_steps", "train.checkpoint_every_steps")
_IGNORED_PREFIXES = ("instrument.",)
_CONFIG_PREFIXES = ("data.", "model.", "method.", "train.")
_BASE_KEYS = ("data.name", "model.name")


def _method_rank(name: Any) -> tuple[int, str]:
    name = str(name)
    return (METHOD_ORDER.index(name), name) if name in METHOD_ORDER else (len(METHOD_ORDER), name)


def _pattern_rank(p: Any) -> float:
    """Sort N:M patterns by density (2:4 before 1:4 before 1:16); unparsable ones last."""
    try:
        return -NMPattern.parse(str(p)).density
    except ValueError:
        return math.inf


def pattern_labels(runs: pd.DataFrame, dense: str = "dense") -> pd.Series:
    """The pattern each run shows (index aligned): its ``method.pattern``, ``mixed`` where its config sets
    patterns per layer (:func:`bame.contract.is_mixed`), ``dense`` for the dense method."""
    def label(row: pd.Series) -> str:
        if str(row["method.name"]) == dense:
            return DENSE_PATTERN
        rules = {key: row.get(f"method.{key}") for key in LAYER_RULE_KEYS}
        return MIXED_PATTERN if is_mixed(rules) else str(row["method.pattern"])

    if runs.empty:
        return pd.Series([], dtype=object, index=runs.index)
    return runs.apply(label, axis=1).astype(object)


def _config_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns
            if c.startswith(_CONFIG_PREFIXES) and c not in _IGNORED_KEYS
            and not c.startswith(_IGNORED_PREFIXES) and c not in ("method.name", "method.pattern")]


def _hashable(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def comparable_keys(runs: pd.DataFrame, dense: str = "dense") -> list[str]:
    """Config keys that differ between runs of one (data, model, method, pattern) cell.

    Runs differing in such a key are not seeds of one experiment, so :func:`paper_table` keeps them
    apart. A key is compared only between the runs it applies to (:func:`_applies`). A key that some
    older run folders lack (added to the config later) splits nothing unless two real values differ.
    """
    keys = []
    cell = [k for k in ("data.name", "model.name", "method.name", "method.pattern") if k in runs]
    for col in _config_columns(runs):
        if col in _BASE_KEYS:
            continue
        sub = runs[_applies(runs, col, dense)]
        if sub.empty:
            continue
        values = sub[col].map(_hashable)
        n = values.groupby([sub[k].map(_hashable).astype(str) for k in cell]).nunique(dropna=True)
        if (n > 1).any():
            keys.append(col)
    return keys


def _applies(runs: pd.DataFrame, col: str, dense: str) -> pd.Series:
    """Which runs a config key matters to: ``method.<name>.*`` only to method ``<name>``, other
    ``method.*`` keys to every method but dense, the rest to every run."""
    names = runs["method.name"].astype(str)
    parts = col.split(".")
    if len(parts) > 2 and parts[0] == "method":
        return names == parts[1]
    if parts[0] == "method":
        return names != dense
    return pd.Series(True, index=runs.index)


def _completed(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "completed"] if "status" in runs else runs


def prepare_groups(runs: pd.DataFrame, by: Sequence[str] | None = None,
                   dense: str = "dense") -> tuple[pd.DataFrame, list[str]]:
    """The completed runs with ``method`` and ``pattern`` columns (``dense`` for dense runs) and the group
    keys (``by``, default :func:`comparable_keys`), each key None where it does not apply to the run."""
    runs = _completed(runs).copy()
    keys = list(by) if by is not None else comparable_keys(runs, dense=dense)
    runs["method"] = runs["method.name"].astype(str)
    runs["pattern"] = pattern_labels(runs, dense)
    for key in keys:
        if key not in runs:
            raise KeyError(f"no config key {key!r} in these runs (group keys are dotted config keys, "
                           f"e.g. method.bame.rho)")
        runs[key] = runs[key].map(_hashable).astype(object)
        # a run a key does not apply to (dense and method options, static and BAME's options)
        # must not be split or labelled by it
        runs.loc[~_applies(runs, key, dense), key] = None
    return runs, keys


def fill_defaults(runs: pd.DataFrame, defaults: Mapping[str, Any]) -> pd.DataFrame:
    """A copy of ``runs`` where config keys a run lacks hold the key's default (dotted keys).

    A run from before an option existed ran what the option's default does (a new option's default keeps
    the old behaviour), so it belongs with the new runs at that default, not in a group of its own. Whole
    integers read back as floats (a column with gaps) become ints again where the default is an int.
    """
    runs = runs.copy()
    for key, default in defaults.items():
        if key not in runs:
            runs[key] = pd.Series([default] * len(runs), index=runs.index, dtype=object)
            continue
        column = runs[key].astype(object)
        runs[key] = column.where(column.map(_present), default)
        if type(default) is int:
            runs[key] = runs[key].map(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)
    return runs


def _present(value: Any) -> bool:
    return not (value is None or (isinstance(value, float) and math.isnan(value)))


def reference_reading(runs: pd.DataFrame, keys: Sequence[str], reference: Mapping[str, Any] | None = None,
                      dense: str = "dense") -> dict[str, Any]:
    """The value each key's settings are relative to: ``reference[key]`` when given, else the most
    common value among the runs the key applies to."""
    out: dict[str, Any] = {}
    for key in keys:
        if reference is not None and key in reference:
            out[key] = _hashable(reference[key])
            continue
        applies = runs.loc[_applies(runs, key, dense), key].map(_hashable) if key in runs else pd.Series([], dtype=object)
        modes = applies.dropna().mode()
        out[key] = modes.iloc[0] if len(modes) else None
    return out


def _per_row(runs: pd.DataFrame, fn: Any) -> pd.Series:
    """``fn(row)`` for each run, as an object Series aligned with ``runs`` (empty for no runs)."""
    if runs.empty:
        return pd.Series([], dtype=object, index=runs.index)
    return runs.apply(fn, axis=1).astype(object)


def group_settings(runs: pd.DataFrame, keys: Sequence[str], reference: Mapping[str, Any],
                   dense: str = "dense") -> pd.Series:
    """Per run (index aligned): ``key=value, ...`` for each key (in the order given) that applies to the
    run and whose value differs from ``reference[key]``; ``''`` at the reference reading."""
    applies = {k: _applies(runs, k, dense) for k in keys}

    def text(row: pd.Series) -> str:
        return ", ".join(f"{k.split('.')[-1]}={row[k]}" for k in keys
                         if applies[k][row.name] and _hashable(row[k]) != reference.get(k))

    return _per_row(runs, text)


def _multi(runs: pd.DataFrame) -> list[str]:
    """Data and model columns when the runs span several (their names then join the labels)."""
    return [k for k in ("data.name", "model.name") if k in runs and runs[k].nunique(dropna=False) > 1]


def _labels(runs: pd.DataFrame, settings: pd.Series, dense: str) -> pd.Series:
    multi = _multi(runs)
    patterns = pattern_labels(runs, dense)

    def label(row: pd.Series) -> str:
        method = str(row["method.name"])
        text = method if method == dense else f"{method} {patterns[row.name]}"
        parts = [str(row[k]) for k in multi] + ([settings[row.name]] if settings[row.name] else [])
        return text + (f" ({', '.join(parts)})" if parts else "")

    return _per_row(runs, label)


def run_groups(runs: pd.DataFrame, dense: str = "dense", by: Sequence[str] | None = None,
               reference: Mapping[str, Any] | None = None) -> pd.Series:
    """The group label of each run (index aligned with ``runs``), e.g. ``bame 1:16``, ``dense``.

    The settings of the group keys (``by``, default :func:`comparable_keys`) follow in brackets where
    they differ from the reference reading; so do data and model names when the runs span several.
    """
    if runs.empty:
        return pd.Series([], dtype=object, index=runs.index)
    keys = list(by) if by is not None else comparable_keys(runs, dense=dense)
    settings = group_settings(runs, keys, reference_reading(runs, keys, reference, dense), dense)
    return _labels(runs, settings, dense)


def group_labels(runs: pd.DataFrame) -> pd.Series:
    """The group of each run: the runs' own ``group`` column when they carry one (labels a caller chose, e.g.
    :func:`analysis.reading_label`), else :func:`run_groups`."""
    return runs["group"] if "group" in runs else run_groups(runs)


def matching(runs: pd.DataFrame, settings: Mapping[str, Any]) -> pd.DataFrame:
    """The runs whose config holds every ``settings`` value (dotted keys, e.g. ``{"method.name": "bame",
    "method.bame.interval_steps": 1}``); a key no run has raises KeyError."""
    keep = pd.Series(True, index=runs.index)
    for key, value in settings.items():
        if key not in runs:
            raise KeyError(f"no config key {key!r} in these runs (a dotted config key, e.g. method.bame.rho)")
        want = _hashable(value)
        keep &= runs[key].map(lambda v, want=want: _hashable(v) == want)
    return runs[keep]


def _experiment(runs: pd.DataFrame, keys: Sequence[str]) -> pd.Series:
    """What a control must share with a group: data, model and every group key that is no method option."""
    shared = [k for k in keys if not k.startswith("method.")]

    def name(row: pd.Series) -> str:
        parts = [f"{row.get('data.name')} / {row.get('model.name')}"]
        parts += [f"{k.split('.')[-1]}={row[k]}" for k in shared]
        return ", ".join(parts)

    return _per_row(runs, name)


def run_points(runs: pd.DataFrame, by: Sequence[str] | None = None,
               reference: Mapping[str, Any] | None = None, family_by: str | Sequence[str] | None = None,
               dense: str = "dense") -> pd.DataFrame:
    """One row per completed run, the tidy input of :func:`analysis.pareto_scatter` and the readings table.

    Columns (:data:`POINT_COLUMNS`): ``run_id``; ``group`` (its label); ``method``; ``pattern``
    (``dense`` for dense runs); ``settings`` (what the group changed from the reference reading);
    ``family`` (with ``family_by``: the label of the group without the ``family_by`` keys, so that the
    groups which differ only in those keys, e.g. one reading at several switch fractions, form one
    family; None where the keys do not apply); ``experiment`` (data / model and the group keys that are
    no method option: a control must share it); ``seed``; ``top1`` (final test top-1, %);
    ``train_flops`` (training FLOPs over the whole run, ideal, 2 x MACs); then the group keys.
    ``attrs['group_keys']`` lists the group keys and ``attrs['reference']`` the reference reading.

    Build such a table by hand for other groupings: the figures need only the named columns.
    """
    family_keys = [family_by] if isinstance(family_by, str) else list(family_by or [])
    by = list(by) if by is not None else comparable_keys(_completed(runs), dense=dense)
    runs, keys = prepare_groups(runs, by + [k for k in family_keys if k not in by], dense)
    ref = reference_reading(runs, keys, reference, dense)
    settings = group_settings(runs, keys, ref, dense)
    points = pd.DataFrame({
        "run_id": runs["run_id"],
        "group": _labels(runs, settings, dense),
        "method": runs["method"],
        "pattern": runs["pattern"],
        "settings": settings,
        "family": None,
        "experiment": _experiment(runs, keys),
        "seed": runs["train.seed"],
        "top1": runs["top1"].astype(float),
        "train_flops": runs["ideal_flops"].astype(float),
    }, index=runs.index)
    if family_keys:
        others = [k for k in keys if k not in family_keys]
        in_family = pd.concat([_applies(runs, k, dense) for k in family_keys], axis=1).all(axis=1)
        family = _labels(runs, group_settings(runs, others, ref, dense), dense)
        points["family"] = family.where(in_family, None)
    points = pd.concat([points, runs[keys]], axis=1).reset_index(drop=True)
    points.attrs.update(group_keys=keys, reference=ref)
    return points

"""Short names of readings, for studies whose groups differ in many options at once.

``run_groups`` names a group by every option that differs from a reference (``bame 1:4 (designated_grad=window,
pruned_update=train, designation=progressive, ...)``); :func:`reading_label` says the same in the words of
docs/method.md and the study scripts: ``learning blocks 1:4 (progressive, magnitude, T=1, t_f=0.27)``. Every
method option that differs from the defaults and that the name does not already say is added as ``key=value``,
so two groups that differ get two names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from bame.contract import pattern_label

from .groups import _hashable, _present

__all__ = ["METHOD_NAMES", "reading_label", "reading_labels"]

METHOD_NAMES = {"srste": "SR-STE", "ste": "STE", "asp": "ASP", "bame": "BAME", "lbc": "LBC"}
_BAME = "method.bame."


def _g(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _named(row: Mapping[str, Any]) -> tuple[str, list[str], set[str]]:
    """The name of a run's reading, the details it states, and the config keys those say."""
    method = str(row["method.name"])
    if method == "phased":
        return "phased", [f"switch {_g(row['method.phased.switch_fraction'])}"], {"method.phased.switch_fraction"}
    if method != "bame" or row.get(_BAME + "designated_grad") != "window":
        return METHOD_NAMES.get(method, method), [], set()
    designation = row[_BAME + "designation"]
    details = [str(designation), str(row[_BAME + "regrow_rule"]), f"T={_g(row[_BAME + 'interval_steps'])}"]
    said = {"designated_grad", "pruned_update", "designation", "regrow_rule", "interval_steps"}
    if designation == "progressive":  # its budget is the window's end (rho is unused)
        details.append(f"t_f={_g(row[_BAME + 't_f_fraction'])}")
        said |= {"t_f_fraction", "rho", "rho_decay"}
    else:
        details.append(f"rho={_g(row[_BAME + 'rho'])}" + ("" if row[_BAME + "rho_decay"] == "cosine" else
                                                           f" {row[_BAME + 'rho_decay']}"))
        said |= {"rho", "rho_decay"}
    return "learning blocks", details, {_BAME + k for k in said}


def _method_keys(row: Mapping[str, Any]) -> list[str]:
    """The config keys that shape this run's method: its own section and the options every sparse method reads."""
    method = str(row["method.name"])
    if method == "dense":
        return []
    own = f"method.{method}."
    keys = row.index if isinstance(row, pd.Series) else list(row)  # iterating a Series gives its values
    return [k for k in keys if isinstance(k, str) and (k.startswith(own) or (
        k.startswith("method.") and k.count(".") == 1 and k not in ("method.name", "method.pattern")))]


def reading_label(row: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    """The name of a run's reading (a row of :func:`analysis.load_runs`): the method and pattern, then in brackets
    what sets it apart (``SR-STE 1:16``, ``phased 1:4 (switch 0.27)``, ``BAME 1:16`` at ``defaults``,
    ``learning blocks 1:16 (progressive, magnitude, T=1, t_f=0.27, tau=0.2)``). ``defaults``: dotted config keys
    and their default values (``bame.report.config_defaults()``); a method option that differs from them and
    the name does not say is added as ``key=value``."""
    name, details, said = _named(row)
    for key in _method_keys(row):
        value = row[key]
        if key in said or key not in defaults or not _present(value):
            continue
        if _hashable(value) != _hashable(defaults[key]):
            details.append(f"{key.rsplit('.', 1)[-1]}={_g(value)}")
    pattern = pattern_label(str(row["method.name"]), row.get("method.pattern"))
    head = name if pattern == "dense" else f"{name} {pattern}"
    return head + (f" ({', '.join(details)})" if details else "")


def reading_labels(runs: pd.DataFrame, defaults: Mapping[str, Any]) -> pd.Series:
    """:func:`reading_label` of every run (index aligned), e.g. as the ``group`` column the figures draw by."""
    return pd.Series([reading_label(row, defaults) for _, row in runs.iterrows()], index=runs.index, dtype=object)

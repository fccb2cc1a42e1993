"""Typed, frozen config sections: a field with choices, conversion from plain data with every error
collected, and back to plain data.

A section is a frozen dataclass. ``from_plain(cls, data)`` converts a mapping (from YAML or ``--set``) key by
key to the field types (``int``, ``float``, ``bool``, ``str``, ``Optional``, ``tuple[...]``, a nested section,
an :class:`~bame.pattern.NMPattern` written as ``"N:M"``), checks choices, and names each problem with its
dotted key and a did-you-mean; ``to_plain`` gives the mapping back (a pattern as its text). A section may
check its own values (:meth:`Section.problems`). ``bame.config`` assembles the experiment config from
sections; each method's section lives in the method's own file (``bame.methods``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from typing import Any, Union

from .pattern import NMPattern

__all__ = ["ConfigError", "Section", "choice", "at_least", "from_plain", "to_plain"]


class ConfigError(ValueError):
    """One or more config problems; ``errors`` lists each as ``'<source>: <key>: <message>'``."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid config:\n  " + "\n  ".join(errors))


def choice(*values: str, default: str) -> Any:
    """A string field that takes one of ``values`` (checked on conversion, named in the error)."""
    return field(default=default, metadata={"choices": values})


class Section:
    """Base of a frozen config section that checks its own values beyond their types."""

    def problems(self, method: Any) -> list[tuple[str, str]]:
        """``(key, message)`` for each value out of range, ``key`` relative to the section; ``method`` is the
        method section it belongs to (its pattern, its decays), for the checks that need them."""
        return []


def at_least(section: Any, keys: tuple[str, ...], low: int, meaning: str = "") -> list[tuple[str, str]]:
    """``(key, message)`` for each of ``keys`` (of ``section``) set below ``low`` (``None`` passes)."""
    out = []
    for key in keys:
        value = getattr(section, key)
        if value is not None and value < low:
            out.append((key, f"must be >= {low}{meaning}, got {value}"))
    return out


_INVALID = object()  # a value with no stand-in of its type: the field keeps its default


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
    if tp is NMPattern:  # written as "N:M"; parsed here, once
        if isinstance(value, NMPattern):
            return value
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            errors.append(f"{source}: {key}: expected a string, got {value!r}")
            return _INVALID
        try:
            return NMPattern.parse(str(value))
        except ValueError as err:
            errors.append(f"{source}: {key}: {err}")
            return _INVALID
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{source}: {key}: expected a mapping (section), got {value!r}")
            return tp()
        return from_plain(tp, value, key + ".", errors, source)
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


def from_plain(cls: type, data: dict, prefix: str = "", errors: list[str] | None = None,
               source: str = "<dict>") -> Any:
    """A ``cls`` section from the mapping ``data``, appending each problem to ``errors`` (keys prefixed with
    ``prefix``); a key that does not convert keeps its default."""
    errors = [] if errors is None else errors
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
        if converted is _INVALID:
            continue
        choices = fields[key].metadata.get("choices")
        if choices and converted not in choices:
            close = difflib.get_close_matches(str(converted), list(choices), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            errors.append(f"{source}: {prefix}{key}: {converted!r} is not one of {list(choices)}{hint}")
            continue
        kwargs[key] = converted
    return cls(**kwargs)


def to_plain(section: Any) -> Any:
    """A plain mapping (lists for tuples, ``"N:M"`` for a pattern) that :func:`from_plain` turns back into an
    equal section."""
    if isinstance(section, NMPattern):
        return str(section)
    if dataclasses.is_dataclass(section):
        return {f.name: to_plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
    if isinstance(section, tuple):
        return [to_plain(x) for x in section]
    return section

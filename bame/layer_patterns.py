"""Per-layer N:M patterns: ordered rules on module names, and DominoSearch-style scheme files.

Rules
-----
``method.layer_patterns`` is an ordered list of rules ``{match: ..., pattern: ...}``:

- ``match``: a glob on the module name as ``model.named_modules()`` spells it (``layer1.0.conv1``),
  matched case-sensitively against the whole name with :func:`fnmatch.fnmatchcase` (``*`` also crosses
  dots, ``?`` is one character, ``[seq]`` a set); or, prefixed with ``re:``, a regular expression that must
  match the whole name (:func:`re.fullmatch`), e.g. ``re:layer[12]\\..*``.
- ``pattern``: ``"N:M"`` or ``"dense"`` (``"M:M"`` is dense too).

The first rule that matches a layer decides its pattern; a layer that no rule matches takes the global
pattern. :func:`resolve` returns one :class:`PatternDecision` per layer saying which rule decided it.

Scheme files
------------
A scheme file maps layer names to patterns, in YAML or JSON (:func:`load_scheme`): ``{"conv1": "2:4",
"fc": "dense"}``. Values may also be ``[N, M]`` lists, as DominoSearch writes them; its files are Python
dict reprs (``{'SparseConv0_3-64-(7, 7)': [16, 16], ...}``), which parse as YAML. DominoSearch names its
layers ``SparseConv<i>_<Cin>-<Cout>[-(<kh>, <kw>)]`` and ``Linear<i>_<in>-<out>``, ``i`` counting convs (or
linears) in module order; :func:`scheme_rules` maps such a name to the model's ``i``-th conv (linear) and
checks its channels and kernel, and a plain module name to that module. Each entry becomes an exact-name
rule.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from torch import nn

from .nm import NMPattern

__all__ = ["DENSE", "REGEX_PREFIX", "LayerRule", "PatternDecision", "parse_pattern_value", "parse_rules",
           "decide", "resolve", "unused_rules", "LayerInfo", "load_scheme", "scheme_rules", "model_layers",
           "rules_for_model"]

DENSE = "dense"
REGEX_PREFIX = "re:"
_RULE_KEYS = ("match", "pattern")
_DOMINO = re.compile(r"^(SparseConv|Linear)(\d+)_(\d+)-(\d+)(?:-\((\d+),\s*(\d+)\))?$")


def parse_pattern_value(value: Any, where: str) -> Optional[NMPattern]:
    """``"N:M"``, ``[N, M]``, an ``NMPattern`` or ``"dense"`` -> the pattern, ``None`` for dense."""
    if isinstance(value, str) and value.strip().lower() == DENSE:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"{where}: unquoted N:M pattern read by YAML as the base-60 integer {value}: quote it, "
                         f"e.g. pattern: \"1:16\"")
    if isinstance(value, (list, tuple)) and not (len(value) == 2 and all(isinstance(v, int) for v in value)):
        raise ValueError(f"{where}: invalid pattern {value!r}: write 'N:M' (e.g. '2:4'), [N, M] or 'dense'")
    try:
        pattern = NMPattern.parse(value)
    except (ValueError, TypeError):
        raise ValueError(f"{where}: invalid pattern {value!r}: write 'N:M' with integers 1 <= N <= M "
                         f"(e.g. '2:4'), or 'dense'") from None
    return None if pattern.is_dense else pattern


def _pattern_text(pattern: Optional[NMPattern]) -> str:
    return DENSE if pattern is None else str(pattern)


@dataclass(frozen=True)
class LayerRule:
    """One rule: which names it matches, the pattern it gives them, and where it was written."""

    match: str  # as written: a glob, 're:<regex>', or an exact name
    pattern: Optional[NMPattern]  # None: dense
    kind: str  # 'glob' | 'regex' | 'exact'
    source: str  # e.g. "method.layer_patterns[2]" or "scheme s.yaml: 'SparseConv3_64-256'"

    def matches(self, name: str) -> bool:
        """Whether this rule applies to the module called ``name``."""
        if self.kind == "exact":
            return name == self.match
        if self.kind == "regex":
            return re.fullmatch(self.match[len(REGEX_PREFIX):], name) is not None
        return fnmatch.fnmatchcase(name, self.match)

    def describe(self) -> str:
        return f"{self.source} (match {self.match!r})"


@dataclass(frozen=True)
class PatternDecision:
    """The pattern a layer gets and which rule decided it (``rule`` None: the global pattern)."""

    name: str
    pattern: Optional[NMPattern]  # None: dense
    rule: Optional[int]  # index into the rules
    reason: str  # e.g. "method.layer_patterns[0] (match 'conv*'): 2:4" or "global pattern 1:16"


def _one_rule(raw: Any, where: str) -> LayerRule:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a rule is a mapping {{match: <glob or re:regex>, pattern: 'N:M' or 'dense'}}, "
                         f"got {raw!r}")
    for key in raw:
        if key not in _RULE_KEYS:
            close = difflib.get_close_matches(str(key), _RULE_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}{hint}; a rule takes 'match' and 'pattern'")
    missing = [k for k in _RULE_KEYS if k not in raw]
    if missing:
        raise ValueError(f"{where}: missing {' and '.join(repr(k) for k in missing)}; a rule takes 'match' and 'pattern'")
    match = raw["match"]
    if not isinstance(match, str) or not match.strip():
        raise ValueError(f"{where}: match must be a non-empty string (a glob, or 're:' and a regex), got {match!r}")
    pattern = parse_pattern_value(raw["pattern"], where)
    if match.startswith(REGEX_PREFIX):
        try:
            re.compile(match[len(REGEX_PREFIX):])
        except re.error as err:
            raise ValueError(f"{where}: bad regular expression {match!r}: {err}") from None
        return LayerRule(match, pattern, "regex", where)
    return LayerRule(match, pattern, "glob", where)


def parse_rules(raw: Any, where: str = "method.layer_patterns") -> tuple[LayerRule, ...]:
    """Parse the config's list of rules; ``ValueError`` names the rule (``where[i]``) and what is wrong."""
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"{where} must be a list of rules {{match: ..., pattern: ...}}, got {type(raw).__name__}")
    return tuple(_one_rule(r, f"{where}[{i}]") for i, r in enumerate(raw))


def decide(name: str, rules: Sequence[LayerRule], global_pattern: Optional[NMPattern]) -> PatternDecision:
    """The first rule that matches ``name`` decides; otherwise the global pattern (``None``: dense)."""
    for i, rule in enumerate(rules):
        if rule.matches(name):
            return PatternDecision(name, rule.pattern, i, f"{rule.describe()}: {_pattern_text(rule.pattern)}")
    return PatternDecision(name, global_pattern, None, f"global pattern {_pattern_text(global_pattern)}")


def resolve(names: Iterable[str], rules: Sequence[LayerRule],
            global_pattern: Optional[NMPattern]) -> list[PatternDecision]:
    """One :func:`decide` per name, in order."""
    return [decide(name, rules, global_pattern) for name in names]


def unused_rules(decisions: Iterable[PatternDecision], rules: Sequence[LayerRule]) -> list[LayerRule]:
    """The rules that decided no layer: they match nothing (often a typo) or an earlier rule shadows them."""
    used = {d.rule for d in decisions}
    return [rule for i, rule in enumerate(rules) if i not in used]


@dataclass(frozen=True)
class LayerInfo:
    """What a scheme needs to know of a conv or linear layer."""

    name: str
    kind: str  # 'conv' | 'linear'
    in_channels: int
    out_channels: int
    kernel_size: Optional[tuple[int, int]] = None  # convs only

    @classmethod
    def from_module(cls, name: str, module: nn.Module) -> LayerInfo:
        if isinstance(module, nn.Conv2d):
            return cls(name, "conv", module.in_channels, module.out_channels, tuple(module.kernel_size))
        if isinstance(module, nn.Linear):
            return cls(name, "linear", module.in_features, module.out_features)
        raise ValueError(f"layer {name!r}: a scheme applies to nn.Conv2d and nn.Linear, got {type(module).__name__}")


def load_scheme(path: str | Path) -> dict[str, Optional[NMPattern]]:
    """Read a scheme file (``.json``: JSON; otherwise YAML, which also reads DominoSearch's dict reprs)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"scheme file {str(path)!r} cannot be read: {err.strerror or err}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"scheme file {str(path)!r} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                         f"{first}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"scheme file {str(path)!r}: expected a non-empty mapping of layer name to 'N:M' or "
                         f"'dense', got {type(data).__name__}")
    return {str(k): parse_pattern_value(v, f"scheme file {path.name!r}, layer {str(k)!r}") for k, v in data.items()}


def _domino_target(key: str, match: re.Match, layers: Sequence[LayerInfo], where: str) -> str:
    kind = "conv" if match.group(1) == "SparseConv" else "linear"
    index, cin, cout = (int(match.group(i)) for i in (2, 3, 4))
    of_kind = [layer for layer in layers if layer.kind == kind]
    if index >= len(of_kind):
        raise ValueError(f"{where}: {key!r} is {kind} #{index} in DominoSearch's order, but the model has "
                         f"{len(of_kind)} {kind} layers")
    layer = of_kind[index]
    kernel = (int(match.group(5)), int(match.group(6))) if match.group(5) else None
    if (layer.in_channels, layer.out_channels) != (cin, cout) or (kernel and kernel != layer.kernel_size):
        seen = f"{layer.in_channels}-{layer.out_channels}" + (f" {layer.kernel_size}" if layer.kernel_size else "")
        raise ValueError(f"{where}: {key!r} is {kind} #{index} in DominoSearch's order, but the model's {kind} "
                         f"#{index} {layer.name!r} is {seen}: the scheme was searched on another model")
    return layer.name


def scheme_rules(scheme: dict[str, Optional[NMPattern]], layers: Sequence[LayerInfo],
                 where: str = "scheme") -> tuple[LayerRule, ...]:
    """Exact-name rules from a loaded scheme; ``layers``: the model's convs and linears in module order.

    A key is a module name, or a DominoSearch name mapped as in the module docstring; anything else, or
    two keys for one layer, is a ``ValueError`` naming the key.
    """
    names = [layer.name for layer in layers]
    rules: dict[str, LayerRule] = {}
    for key, pattern in scheme.items():
        source = f"{where}: {key!r}"
        if key in names:
            target = key
        elif (match := _DOMINO.match(key)) is not None:
            target = _domino_target(key, match, layers, where)
        else:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: {key!r} is neither a conv/linear module of the model{hint} nor a "
                             f"DominoSearch name (SparseConv<i>_<Cin>-<Cout>, Linear<i>_<in>-<out>)")
        if target in rules:
            raise ValueError(f"{where}: {key!r} and {rules[target].source.split(': ', 1)[1]} both set layer {target!r}")
        rules[target] = LayerRule(target, pattern, "exact", source)
    return tuple(rules.values())


def model_layers(model: nn.Module) -> list[LayerInfo]:
    """The convs and linears of ``model`` in module order, as schemes see them."""
    return [LayerInfo.from_module(name, module) for name, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear))]


def rules_for_model(model: nn.Module, rules: Sequence[LayerRule], scheme: Optional[str | Path] = None,
                    where: str = "method.layer_pattern_file") -> tuple[LayerRule, ...]:
    """``rules``, then the rules of the scheme file ``scheme`` (if any) mapped onto ``model`` (explicit rules
    come first, so they override the scheme). Raises ``ValueError`` (one line, naming the rule or the key)
    for a scheme that does not fit ``model`` and for an explicit rule that decides no conv/linear of
    ``model``: it matches none (often a typo) or earlier rules take every layer it matches."""
    layers = model_layers(model)
    extra = () if scheme is None else scheme_rules(load_scheme(scheme), layers, f"{where} {Path(scheme).name!r}")
    combined = tuple(rules) + extra
    unused = unused_rules(resolve([layer.name for layer in layers], combined, None), rules)
    if unused:
        shown = ", ".join(layer.name for layer in layers[:6]) + (", ..." if len(layers) > 6 else "")
        raise ValueError(f"{unused[0].describe()} decides no layer: it matches no conv/linear module ({shown}) "
                         f"or an earlier rule takes every layer it matches; fix or remove it")
    return combined

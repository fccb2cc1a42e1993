"""Per-layer pattern rules and scheme files: first match wins, clear one-line errors, DominoSearch names."""

from __future__ import annotations

import json

import pytest
from torch import nn

from bame.layer_patterns import (LayerInfo, decide, load_scheme, parse_pattern_value, parse_rules, resolve,
                                 scheme_rules, unused_rules)
from bame.models import create
from bame.nm import NMPattern

NAMES = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.shortcut.0", "layer3.1.conv2",
         "fc"]
P24, P116 = NMPattern(2, 4), NMPattern(1, 16)


def test_first_match_wins_and_the_global_pattern_is_the_fallback():
    rules = parse_rules([
        {"match": "conv1", "pattern": "dense"},  # exact glob: only the stem, not layer1.0.conv1
        {"match": "layer1.*", "pattern": "2:4"},  # * crosses dots
        {"match": "re:layer[23]\\..*conv\\d", "pattern": "1:8"},  # a whole-name regex
        {"match": "layer2.*", "pattern": "4:4"},  # shadowed for conv layers of layer2 by the rule above
    ])
    got = {d.name: d for d in resolve(NAMES, rules, P116)}
    assert got["conv1"].pattern is None and got["conv1"].rule == 0
    assert got["layer1.0.conv1"].pattern == P24 and got["layer1.0.conv2"].rule == 1
    assert got["layer2.0.conv1"].pattern == NMPattern(1, 8) and got["layer3.1.conv2"].rule == 2
    assert got["layer2.0.shortcut.0"].rule == 3 and got["layer2.0.shortcut.0"].pattern is None  # 4:4 is dense
    assert got["fc"].pattern == P116 and got["fc"].rule is None
    assert got["fc"].reason == "global pattern 1:16"
    assert got["layer1.0.conv1"].reason == "method.layer_patterns[1] (match 'layer1.*'): 2:4"
    assert got["conv1"].reason == "method.layer_patterns[0] (match 'conv1'): dense"
    assert decide("fc", (), None).reason == "global pattern dense"


def test_regex_must_match_the_whole_name_and_globs_are_case_sensitive():
    rules = parse_rules([{"match": "re:conv", "pattern": "2:4"}, {"match": "FC", "pattern": "2:4"}])
    assert [d.rule for d in resolve(["conv", "conv1", "layer1.0.conv", "fc"], rules, P116)] == [0, None, None, None]
    rules = parse_rules([{"match": "*conv?", "pattern": "2:4"}, {"match": "layer[12].0.*", "pattern": "1:4"}])
    assert [d.rule for d in resolve(["conv1", "layer1.0.conv12", "layer1.0.bn", "layer3.0.x"], rules, P116)] == \
        [0, 1, 1, None]


def test_unused_rules_are_reported():
    rules = parse_rules([{"match": "layer*", "pattern": "2:4"}, {"match": "layer1.*", "pattern": "1:4"},
                         {"match": "classifer", "pattern": "dense"}])
    unused = unused_rules(resolve(NAMES, rules, P116), rules)
    assert [r.source for r in unused] == ["method.layer_patterns[1]", "method.layer_patterns[2]"]


@pytest.mark.parametrize("raw,message", [
    ({"match": "x", "pattern": "2:4"}, r"^method.layer_patterns must be a list of rules"),
    (["conv1"], r"^method.layer_patterns\[0\]: a rule is a mapping"),
    ([{"match": "x", "patern": "2:4"}], r"^method.layer_patterns\[0\]: unknown key 'patern' \(did you mean 'pattern'\?\)"),
    ([{"match": "x", "pattern": "2:4", "layout": "row"}], r"unknown key 'layout'; a rule takes 'match' and 'pattern'$"),
    ([{"pattern": "2:4"}], r"^method.layer_patterns\[0\]: missing 'match'"),
    ([{"match": "a", "pattern": "2:4"}, {"match": "re:layer(1", "pattern": "2:4"}],
     r"^method.layer_patterns\[1\]: bad regular expression 're:layer\(1': missing \)"),
    ([{"match": "x", "pattern": "5:4"}], r"^method.layer_patterns\[0\]: invalid pattern '5:4'"),
    ([{"match": "x", "pattern": "sparse"}], r"invalid pattern 'sparse': write 'N:M'.*or 'dense'"),
    ([{"match": "x", "pattern": 124}], r"unquoted N:M pattern read by YAML as the base-60 integer 124: quote it"),
    ([{"match": "", "pattern": "2:4"}], r"match must be a non-empty string"),
])
def test_bad_rules_get_one_line_errors(raw, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_rules(raw)
    assert "\n" not in str(err.value)


def test_pattern_values():
    assert parse_pattern_value("2:4", "x") == P24 and parse_pattern_value([2, 4], "x") == P24
    assert parse_pattern_value("Dense", "x") is None and parse_pattern_value([16, 16], "x") is None
    with pytest.raises(ValueError, match="invalid pattern"):
        parse_pattern_value([2, 4, 8], "x")
    assert parse_rules(None) == ()


def _layers(model: nn.Module) -> list[LayerInfo]:
    return [LayerInfo.from_module(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _domino_name(index: int, layer: LayerInfo, kernel: bool = True) -> str:
    if layer.kind == "linear":
        return f"Linear{index}_{layer.in_channels}-{layer.out_channels}"
    k = f"-({layer.kernel_size[0]}, {layer.kernel_size[1]})" if kernel else ""
    return f"SparseConv{index}_{layer.in_channels}-{layer.out_channels}{k}"


def test_dominosearch_scheme_maps_onto_the_model_in_module_order(tmp_path):
    layers = _layers(create("resnet20", 10))
    convs = [layer for layer in layers if layer.kind == "conv"]
    # DominoSearch writes a Python dict repr: single quotes, [N, M] values, its own layer names
    entries = {_domino_name(0, convs[0]): [16, 16], _domino_name(9, convs[9]): [4, 16],
               _domino_name(10, convs[10], kernel=False): [2, 16], _domino_name(0, layers[-1]): [1, 16]}
    path = tmp_path / "resnet20_M16.txt"
    path.write_text(repr(entries))
    scheme = load_scheme(path)
    assert scheme[_domino_name(9, convs[9])] == NMPattern(4, 16) and scheme[_domino_name(0, convs[0])] is None
    rules = scheme_rules(scheme, layers, "scheme resnet20_M16.txt")
    got = {d.name: d for d in resolve([layer.name for layer in layers], rules, P24)}
    assert convs[9].name == "layer2.0.shortcut.0"  # the 1x1 shortcut counts as a conv, in module order
    assert got["layer2.0.shortcut.0"].pattern == NMPattern(4, 16)
    assert got[convs[10].name].pattern == NMPattern(2, 16)
    assert got["conv1"].pattern is None and got[layers[-1].name].pattern == P116
    assert got["layer1.0.conv1"].rule is None and got["layer1.0.conv1"].pattern == P24
    assert got["layer2.0.shortcut.0"].reason.startswith("scheme resnet20_M16.txt: 'SparseConv9_16-32-(1, 1)'")


def test_scheme_by_module_names_in_json_and_yaml(tmp_path):
    layers = _layers(create("resnet20", 10))
    (tmp_path / "s.json").write_text(json.dumps({"conv1": "dense", "layer1.0.conv1": [2, 4]}))
    (tmp_path / "s.yaml").write_text("conv1: dense\nlayer1.0.conv1: '2:4'\n")
    for name in ("s.json", "s.yaml"):
        rules = scheme_rules(load_scheme(tmp_path / name), layers)
        assert [(r.match, r.pattern, r.kind) for r in rules] == [("conv1", None, "exact"), ("layer1.0.conv1", P24, "exact")]
    (tmp_path / "bad.yaml").write_text("conv1: 2:4\n")
    with pytest.raises(ValueError, match=r"scheme file 'bad.yaml', layer 'conv1': unquoted N:M pattern"):
        load_scheme(tmp_path / "bad.yaml")


def test_scheme_errors_name_the_key(tmp_path):
    layers = _layers(create("resnet20", 10))
    convs = [layer for layer in layers if layer.kind == "conv"]
    with pytest.raises(ValueError, match=r"'layer1.0.cnv1' is neither .* \(did you mean 'layer1.0.conv1'\?\)"):
        scheme_rules({"layer1.0.cnv1": P24}, layers)
    with pytest.raises(ValueError, match=r"'SparseConv1_16-32' is conv #1 .* model's conv #1 'layer1.0.conv1' is "
                                         r"16-16 \(3, 3\): the scheme was searched on another model"):
        scheme_rules({"SparseConv1_16-32": P24}, layers)
    with pytest.raises(ValueError, match=r"'SparseConv1_16-16-\(1, 1\)' is conv #1 .* 'layer1.0.conv1' is 16-16 \(3, 3\)"):
        scheme_rules({"SparseConv1_16-16-(1, 1)": P24}, layers)
    with pytest.raises(ValueError, match=r"'SparseConv99_16-16' is conv #99 in DominoSearch's order, but the model has "
                                         r"\d+ conv layers"):
        scheme_rules({"SparseConv99_16-16": P24}, layers)
    with pytest.raises(ValueError, match=r"'conv1' and 'SparseConv0_3-16' both set layer 'conv1'"):
        scheme_rules({_domino_name(0, convs[0], kernel=False): P24, "conv1": P24}, layers)
    for text, message in [("[1, 2]", "expected a non-empty mapping"), ("{a: [", "is not valid YAML")]:
        (tmp_path / "s.yaml").write_text(text)
        with pytest.raises(ValueError, match=message):
            load_scheme(tmp_path / "s.yaml")
    with pytest.raises(ValueError, match="cannot be read"):
        load_scheme(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="nn.Conv2d and nn.Linear"):
        LayerInfo.from_module("bn", nn.BatchNorm2d(4))

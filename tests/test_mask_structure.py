"""method.mask_structure: transposable in every method that computes masks, BAME's adaptation, the ledger."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bame.config import ConfigError, load_config
from bame.experiment import build
from bame.layers import NMLinear, nm_layers
from bame.nm import is_nm, nm_mask
from bame.step import training_step
from bame.transposable import block_exchange_elementwise_ops, is_transposable_nm, transposable_mask

QUICK = Path(__file__).resolve().parents[1] / "configs" / "quick.yaml"
# LeNet-5-wide: conv2 [32, 400], fc1 [128, 800], fc2 [64, 128] tile by 4, 8 and 16; BAME adapts every 2 steps
WIDE = ["model.name=lenet5_wide", "method.mask_structure=transposable", "method.bame.rho=0.3"]


def _experiment(*sets: str):
    torch.manual_seed(0)
    return build(load_config(QUICK, [*WIDE, *sets]))


def _steps(exp, steps: int, check) -> None:
    """``steps`` training steps on seeded random batches, ``check(step, exp)`` after each."""
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x, y = torch.randn(16, 1, 28, 28, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        training_step(step, exp.model, exp.method, exp.optimizer, exp.ledger, x, y)
        check(step, exp)


def _transposable(exp) -> bool:
    return all(is_transposable_nm(layer.mask, layer.pattern.n, layer.pattern.m, layer.layout, exact=True)
               for _, layer in nm_layers(exp.model))


BAME_READINGS = {
    "gradient": ("method.pattern=2:4", "method.bame.block_rows=4"),
    "taylor-1:16": ("method.pattern=1:16", "method.bame.block_rows=16", "method.bame.lma=taylor"),
    "several-tiles": ("method.pattern=2:8", "method.bame.block_rows=8", "method.bame.block_groups=2",
                      "method.bame.swaps_per_block=3"),
    "magnitude": ("method.pattern=2:4", "method.bame.block_rows=4", "method.bame.regrow_rule=magnitude"),
    "window-lma": ("method.pattern=2:4", "method.bame.block_rows=4", "method.bame.designated_grad=window",
                   "method.bame.pruned_update=train"),
    "window-magnitude": ("method.pattern=1:8", "method.bame.block_rows=8", "method.bame.designated_grad=window",
                         "method.bame.pruned_update=train", "method.bame.regrow_rule=magnitude",
                         "method.bame.designation=progressive"),
}


@pytest.mark.parametrize("reading", sorted(BAME_READINGS))
def test_bame_keeps_every_mask_transposable_after_every_adaptation_step(reading):
    exp = _experiment("method.name=bame", *BAME_READINGS[reading])
    assert _transposable(exp)
    start = {name: layer.mask.clone() for name, layer in nm_layers(exp.model)}
    adapted = []

    def check(step, exp):
        assert _transposable(exp), step
        if exp.method.last_adaptation is not None:
            adapted.append(sum(la.swaps for la in exp.method.last_adaptation.layers))

    _steps(exp, 9, check)  # adaptation steps 0, 2, 4, 6 and the settle step 8 of 'window'
    assert len(adapted) >= 4 and sum(adapted) > 0  # the masks did change
    assert any(not torch.equal(layer.mask, start[name]) for name, layer in nm_layers(exp.model))


def test_bame_ledger_counts_the_exchanges_as_their_closed_form():
    exp = _experiment("method.name=bame", "method.pattern=2:4", "method.bame.block_rows=4")
    seen = []

    def check(step, exp):
        record = exp.method.last_adaptation
        if record is None:
            return
        b, want = exp.method.bcfg, 0
        for la in record.layers:
            layer = dict(nm_layers(exp.model))[la.layer]
            # first family: every non-frozen block scored; OBF updates the blocks that changed
            want += block_exchange_elementwise_ops(la.candidate_blocks, 1, 4, 1, b.lma, b.selection,
                                                   la.selected_blocks, la.selected_blocks, layer.weight.numel())
            assert la.swaps == 2 * la.selected_blocks  # one exchange (two swaps) per changed block
        assert record.scoring_elementwise_ops == want
        seen.append(want)

    _steps(exp, 3, check)
    assert len(seen) == 2 and all(seen)


@pytest.mark.parametrize("method,n,m", [("ste", 2, 4), ("srste", 1, 8), ("phased", 2, 4)])
def test_ste_refresh_is_the_transposable_mask_of_the_weights(method, n, m):
    exp = _experiment(f"method.name={method}", f"method.pattern={n}:{m}", "method.phased.switch_fraction=0.125")
    frozen = {}

    def check(step, exp):
        for name, layer in nm_layers(exp.model):
            if method == "phased" and exp.method.switched:  # frozen at the switch (step 2), as SR-STE left it
                assert torch.equal(layer.mask, frozen.setdefault(name, layer.mask.clone())), step
            else:
                assert torch.equal(layer.mask, transposable_mask(layer.weight.abs(), n, m)), step

    _steps(exp, 4, check)
    assert _transposable(exp) and (method != "phased" or len(frozen) == 3)


@pytest.mark.parametrize("init", ["magnitude", "random"])
def test_mask_init_keeps_the_most_magnitude_or_is_a_random_transposable_mask(init):
    exp = _experiment("method.name=static", "method.pattern=2:4", f"method.mask_init={init}")
    assert _transposable(exp)
    for _, layer in nm_layers(exp.model):
        best = transposable_mask(layer.weight.abs(), 2, 4)
        assert torch.equal(layer.mask, best) == (init == "magnitude")
        assert not torch.equal(layer.mask, nm_mask(layer.weight.abs(), 2, 4))  # not the row mask


def test_asp_prunes_to_a_transposable_mask():
    exp = _experiment("method.name=asp", "method.pattern=2:4", "method.asp_prune_fraction=0.125")  # step 2
    assert all(bool(layer.mask.all()) for _, layer in nm_layers(exp.model))
    pruned_at = []

    def check(step, exp):
        if exp.method.pruned and not pruned_at:
            pruned_at.append(step)
            for _, layer in nm_layers(exp.model):
                assert torch.equal(layer.mask, transposable_mask(layer.weight_at_prune, 2, 4))

    for _, layer in nm_layers(exp.model):  # the weights the prune sees: after step 1's update
        layer.register_forward_pre_hook(lambda mod, _: setattr(mod, "weight_at_prune", mod.weight.detach().abs()))
    _steps(exp, 3, check)
    assert pruned_at == [2] and _transposable(exp)


def test_set_mask_checks_the_structure():
    layer = NMLinear(8, 8, pattern="2:4", mask_structure="transposable")
    row_only = torch.zeros(8, 8, dtype=torch.bool)
    row_only[:, :2] = True  # 2 of every 4 along K, but 4 in each column of the tile
    assert is_nm(row_only, 2, 4) and not is_transposable_nm(row_only, 2, 4)
    with pytest.raises(ValueError, match=r"mask is not transposable 2:4 in layout row"):
        layer.set_mask(row_only)
    layer.set_mask(transposable_mask(torch.rand(8, 8), 2, 4))
    with pytest.raises(ValueError, match=r"Cout=6 is not a multiple of M=4"):
        NMLinear(8, 6, pattern="2:4", mask_structure="transposable")


def test_a_layer_whose_cout_does_not_tile_follows_on_indivisible():
    exp = _experiment("method.name=static", "method.pattern=2:4", "method.classifier_dense=false")
    classifier = next(d for d in exp.method.report.layers if d.name == "classifier")  # [10, 64]
    assert not classifier.sparse and classifier.reason.startswith("Cout=10 does not tile by M=4 for transposable")
    with pytest.raises(ConfigError, match=r"layer 'classifier': weight of shape \(10, 64\) cannot be transposable"):
        _experiment("method.name=static", "method.pattern=2:4", "method.classifier_dense=false",
                    "method.on_indivisible=error")


def test_bame_blocks_must_be_whole_tiles():
    with pytest.raises(ConfigError) as err:
        _experiment("method.name=bame", "method.pattern=2:4")  # block_rows=1
    (line,) = err.value.errors
    assert "method.bame.block_rows: block_rows=1 is not a multiple of M=4" in line
    with pytest.raises(ConfigError, match=r"block_rows=4 is not a multiple of M=8: .*\(pattern 1:8\)"):
        _experiment("method.name=bame", "method.pattern=2:4", "method.bame.block_rows=4",
                    'method.layer_patterns=[{match: fc1, pattern: "1:8"}]')
    _experiment("method.name=static", "method.pattern=2:4")  # BAME's blocks are no concern of static


def test_the_ledger_flags_the_input_gradient_as_n_m_along_cout():
    for structure, flag in (("transposable", True), ("row", False)):
        exp = _experiment("method.name=static", "method.pattern=2:4", f"method.mask_structure={structure}")
        _steps(exp, 1, lambda step, exp: None)
        rows = exp.ledger.epoch_rows(0, 1)
        for row in rows:
            if row["layer"] in ("conv2", "fc1", "fc2") and row["phase"] == "input_grad":
                assert row["nm_on_reduction"] == flag, (structure, row)
            if row["layer"] in ("conv2", "fc1", "fc2") and row["phase"] == "forward":
                assert row["nm_on_reduction"]

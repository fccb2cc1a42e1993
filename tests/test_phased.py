"""``phased``: SR-STE before the switch step and the static mask after it, bit for bit.

Driven by hand in the step order (the ``Run`` of tests/test_methods.py, 30 steps). ``switch_fraction``
0.4 switches at the start of step 12.
"""

from __future__ import annotations

import copy

import pytest
import torch

from bame.config import MethodConfig, PhasedConfig
from bame.autograd import Backward
from test_methods import TOTAL, Run

SWITCH = 12


def cfg(name: str, fraction: float = SWITCH / TOTAL) -> MethodConfig:
    return MethodConfig(name=name, pattern="2:4", first_conv_dense=False, classifier_dense=False,
                        phased=PhasedConfig(switch_fraction=fraction))


def same_model(a: Run, b: Run) -> None:
    for (_, la), (_, lb) in zip(a.layers(), b.layers()):
        assert torch.equal(la.weight, lb.weight) and torch.equal(la.mask, lb.mask)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def test_phased_is_srste_before_the_switch_bit_for_bit():
    phased, srste = Run(cfg("phased")), Run(cfg("srste"))
    assert phased.method.switch_step == SWITCH
    for _ in range(SWITCH):
        phased.one_step()
        srste.one_step()
        same_model(phased, srste)
    assert not phased.method.switched


def test_phased_is_static_after_the_switch_bit_for_bit():
    """From the switch on, phased's steps equal those of a static-mask run started from SR-STE's state at the
    switch: its weights and masks, its momentum at the kept weights (zero at the pruned ones)."""
    phased, srste = Run(cfg("phased")), Run(cfg("srste"))
    phased.run(SWITCH)
    srste.run(SWITCH)
    static = Run(cfg("static"))
    static.model.load_state_dict(srste.model.state_dict())  # weights and SR-STE's current masks
    for p_static, p_srste in zip(static.model.parameters(), srste.model.parameters()):
        buf = srste.opt.state[p_srste]["momentum_buffer"].clone()
        layer = next((lay for _, lay in static.layers() if lay.weight is p_static), None)
        if layer is not None:
            buf = buf * layer.mask
        static.opt.state[p_static]["momentum_buffer"] = buf
    static.step = SWITCH
    masks_at_switch = {n: lay.mask.clone() for n, lay in phased.layers()}
    for _ in range(TOTAL - SWITCH):
        phased.one_step()
        static.one_step()
        same_model(phased, static)
    assert phased.method.switched
    for name, layer in phased.layers():
        assert torch.equal(layer.mask, masks_at_switch[name]) and layer.backward_mode is Backward.SPARSE


def test_the_mask_at_the_switch_is_srstes_and_pruned_weights_stop_moving():
    run = Run(cfg("phased"))
    run.run(SWITCH + 1)
    stored = {n: lay.weight.detach().clone() for n, lay in run.layers()}
    run.run(TOTAL - SWITCH - 1)
    for name, layer in run.layers():
        pruned = ~layer.mask
        assert torch.equal(layer.weight.detach()[pruned], stored[name][pruned])
        assert (run.opt.state[layer.weight]["momentum_buffer"][pruned] == 0).all()


@pytest.mark.parametrize("fraction,twin", [(0.0, "static"), (1.0, "srste")])
def test_switch_at_the_ends_is_static_or_srste(fraction, twin):
    a, b = Run(cfg("phased", fraction)), Run(cfg(twin))
    a.run(TOTAL)
    b.run(TOTAL)
    same_model(a, b)


@pytest.mark.parametrize("at", [SWITCH - 3, SWITCH + 4])
def test_resume_before_and_after_the_switch_is_exact(at):
    a = Run(cfg("phased"))
    a.run(at)
    snap = a.snapshot()
    a.run(TOTAL - at)
    b = Run(cfg("phased"))
    b.restore(copy.deepcopy(snap))
    modes = {lay.backward_mode for _, lay in b.layers()}
    assert modes == {Backward.SPARSE if at >= SWITCH else Backward.SRSTE}  # the weight gradient's cost
    b.run(TOTAL - at)
    same_model(a, b)
    assert b.method.switched

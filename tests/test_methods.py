"""Every method on small real runs, driven by hand in the step order of docs/contracts.md.

BAME is checked against its invariants after every step (exact N per group, zeros in the forward weight,
pruned weights untouched by the optimizer, gradients only at ``mask | candidates``, frozen blocks
unchanged, swaps equal to the brute-force best Taylor swap, selection equal to the top ``rho`` blocks,
nothing after ``t_f``), and the baselines against their defining behaviour.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bame import bame_core
from bame.autograd import Backward
from bame.config import BameConfig, MethodConfig
from bame.layers import NMLayer
from bame.methods import METHODS, MethodContext, create_method
from bame.nm import group_counts, nm_mask, to_blocks

TOTAL = 30
WD = 5e-4
LR = 0.05
BATCH = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convs: intra-op threads only cost (badly so on a loaded machine); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 4, 6, 6, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)


def method_cfg(name: str, **bame) -> MethodConfig:
    base = dict(t_f_fraction=20 / TOTAL, interval_steps=5, rho=0.3, lma="taylor")
    base.update(bame)
    return MethodConfig(name=name, pattern="2:4", first_conv_dense=False, classifier_dense=False,
                        bame=BameConfig(**base))


class Run:
    """A model, a method and an SGD optimizer (momentum 0.9, weight decay) wired like bame/train.py."""

    def __init__(self, cfg: MethodConfig, total: int = TOTAL, device: str = "cpu"):
        self.device = device
        self.method = create_method(cfg, MethodContext(total_steps=total, steps_per_epoch=10, weight_decay=WD))
        self.model = self.method.prepare(tiny_model().to(device))
        mine = {id(p) for p in self.method.self_decayed_parameters()}
        groups = [{"params": [p for p in self.model.parameters() if id(p) in mine], "weight_decay": 0.0},
                  {"params": [p for p in self.model.parameters() if id(p) not in mine], "weight_decay": WD}]
        self.opt = torch.optim.SGD([g for g in groups if g["params"]], lr=LR, momentum=0.9, weight_decay=WD)
        self.method.attach_optimizer(self.opt)
        self.step = 0

    def layers(self) -> list[tuple[str, NMLayer]]:
        return self.method.layers()

    def forward_backward(self, step: int) -> None:
        self.opt.zero_grad(set_to_none=True)
        x, y = batch(step)
        F.cross_entropy(self.model(x.to(self.device)), y.to(self.device)).backward()

    def one_step(self, probe=None) -> None:
        """One step in the loop's order; ``probe(stage, run)`` observes between the stages."""
        step, m = self.step, self.method
        m.before_step(step)
        self.forward_backward(step)
        if probe:
            probe("backward", self)
        m.after_backward(step)
        if probe:
            probe("after_backward", self)
        self.opt.step()
        if probe:
            probe("optimizer", self)
        m.after_optimizer_step(step)
        if probe:
            probe("end", self)
        self.step += 1

    def run(self, steps: int, probe=None) -> None:
        for _ in range(steps):
            self.one_step(probe)

    def snapshot(self) -> dict:
        return {"model": copy.deepcopy(self.model.state_dict()), "opt": copy.deepcopy(self.opt.state_dict()),
                "method": copy.deepcopy(self.method.state_dict()), "step": self.step}

    def restore(self, snap: dict) -> None:
        self.model.load_state_dict(snap["model"])
        self.opt.load_state_dict(snap["opt"])
        self.method.load_state_dict(snap["method"])
        self.step = snap["step"]


def brute_force_block_scores(w, g, mask, grid, layout):
    """R_b = max over every (i kept, j pruned) of one group of the block of g_i w_i - g_j w_j."""
    wb, gb, mb = (to_blocks(t, grid, layout) for t in (w, g, mask))
    s = gb * wb  # [B, G, m]
    pair = s.unsqueeze(-1) - s.unsqueeze(-2)  # [B, G, i, j]
    valid = mb.unsqueeze(-1) & ~mb.unsqueeze(-2)
    pair = torch.where(valid, pair, torch.full_like(pair, -float("inf")))
    return pair.flatten(1).max(dim=1).values


class BameChecker:
    """Records what each stage saw and checks every invariant (single swaps, taylor)."""

    def __init__(self, run: Run, check_swaps: bool = True):
        self.run, self.check_swaps = run, check_swaps
        self.m = run.method
        self.before: dict = {}
        self.changed_steps: list[int] = []
        self.frozen_seen = 0
        self.events_seen = 0

    def __call__(self, stage: str, run: Run) -> None:
        step, m = run.step, self.m
        layers = run.layers()
        if stage == "backward":
            adapting = m.is_adaptation_step(step)
            for name, layer in layers:
                w, g = layer.weight.detach(), layer.weight.grad
                cand = layer.grad_mask
                if not adapting or step >= m.t_f:
                    assert not cand.any(), f"step {step}: candidates off an adaptation step"
                # SPARSE backward: no gradient outside mask | candidates
                assert (g[~(layer.mask | cand)] == 0).all()
                frozen = m.obf[name].frozen
                cand_blocks = to_blocks(cand, m.grids[name], layer.layout).flatten(1)
                assert not cand_blocks[frozen].any(), "frozen blocks got a candidate gradient"
                if adapting and m.budgets(step)[name] > 0:
                    assert cand_blocks[~frozen].all()
                # CPU copies: the records the method hands out are CPU tensors
                self.before[name] = dict(w=w.cpu().clone(), g=g.cpu().clone(), mask=layer.mask.cpu().clone(),
                                         frozen=frozen.cpu().clone())
        elif stage == "after_backward":
            rec = m.last_adaptation
            assert (rec is not None) == (m.is_adaptation_step(step))
            for _, layer in layers:
                assert (layer.weight.grad[~layer.mask] == 0).all()  # masked to the old mask
            if rec is not None:
                assert rec.scoring_elementwise_ops > 0
                self.events_seen += sum(la.oscillation_events for la in rec.layers)
        elif stage == "optimizer":
            for name, layer in layers:
                b = self.before[name]
                pruned = ~b["mask"]
                w_opt = layer.weight.detach().cpu()
                assert torch.equal(w_opt[pruned], b["w"][pruned]), "optimizer moved a pruned weight"
                b["w_opt"] = w_opt.clone()
        elif stage == "end":
            rec = m.last_adaptation
            for name, layer in layers:
                b, grid = self.before[name], m.grids[name]
                n = layer.pattern.n
                assert (group_counts(layer.mask, layer.pattern.m, layer.layout) == n).all()
                assert (layer.masked_weight()[~layer.mask] == 0).all()
                mask, weight = layer.mask.cpu(), layer.weight.detach().cpu()
                changed = to_blocks(mask != b["mask"], grid, layer.layout).flatten(1).any(1)
                assert not changed[b["frozen"]].any(), "a frozen block changed"
                if rec is None:
                    assert not changed.any(), f"step {step}: mask changed off an adaptation step"
                    continue
                self.changed_steps.append(step)
                self.frozen_seen = max(self.frozen_seen, int(m.obf[name].frozen.sum()))
                moved = mask != b["mask"]
                if self.run.method.bcfg.regrow == "stored":
                    assert torch.equal(weight, b["w_opt"])  # swaps never touch stored values
                else:
                    grown = mask & ~b["mask"]
                    assert (weight[grown] == 0).all()
                mom = run.opt.state[layer.weight]["momentum_buffer"].cpu()
                assert (mom[moved] == 0).all(), "momentum survived a swap"
                la = next(la for la in rec.layers if la.layer == name)
                assert la.selected_blocks == int(changed.sum())
                if not self.check_swaps or la.candidate_blocks == 0:
                    continue
                # LMA: every candidate's R_b is the brute-force best Taylor swap (weights before the update)
                best = brute_force_block_scores(b["w"], b["g"], b["mask"], grid, layer.layout)
                cand = ~b["frozen"]
                torch.testing.assert_close(la.last_score[cand], best[cand].float(), rtol=1e-6, atol=1e-9)
                assert torch.isnan(la.last_score[~cand]).all()
                # each changed block made exactly that swap: one out, one in, same group
                wb, gb = to_blocks(b["w"], grid, layer.layout), to_blocks(b["g"], grid, layer.layout)
                old_b = to_blocks(b["mask"], grid, layer.layout)
                new_b = to_blocks(mask, grid, layer.layout)
                drop, grow = (old_b & ~new_b)[changed], (new_b & ~old_b)[changed]  # [C, G, m]
                assert (drop.flatten(1).sum(1) == 1).all() and (grow.flatten(1).sum(1) == 1).all()
                assert torch.equal(drop.sum(-1), grow.sum(-1))  # in the same group
                s = (gb * wb)[changed]
                r = (s * drop).flatten(1).sum(1) - (s * grow).flatten(1).sum(1)
                torch.testing.assert_close(r, best[changed], rtol=1e-6, atol=1e-9)
                # selection: the top budget of the eligible blocks by R_b
                eligible = cand & (best > 0)
                budget = m.budgets(step)[name]
                assert int(changed.sum()) == min(budget, int(eligible.sum()))
                assert eligible[changed].all()
                rest = eligible & ~changed
                if changed.any() and rest.any():
                    assert best[changed].min() >= best[rest].max()


# -- BAME ---------------------------------------------------------------------------------------------

def test_registry_has_every_method():
    assert set(METHODS) >= {"dense", "static", "ste", "srste", "asp", "bame"}


def test_bame_invariants_every_step():
    run = Run(method_cfg("bame"))
    checker = BameChecker(run)
    masks_at_tf = None
    for _ in range(TOTAL):
        run.one_step(checker)
        if run.step == run.method.t_f:
            masks_at_tf = {n: lay.mask.clone() for n, lay in run.layers()}
    assert run.method.t_f == 20
    assert checker.changed_steps and set(checker.changed_steps) <= {0, 5, 10, 15}
    for name, layer in run.layers():  # after t_f nothing changes and no candidate gradient is computed
        assert torch.equal(layer.mask, masks_at_tf[name])
        assert not layer.grad_mask.any()
    assert run.method.adaptations == 4


@pytest.mark.parametrize("overrides", [
    dict(block_rows=2, block_groups=3),
    dict(regrow="zero"),
    dict(interval_anchor="t_i", t_i_steps=3),
    dict(beta=0.2, tau=0.3, min_changes=2, rho=0.6, rho_decay="constant"),
    dict(obf_update="candidates", obf_bias_correction=True, rho=0.6),
])
def test_bame_invariants_hold_for_other_readings(overrides):
    run = Run(method_cfg("bame", **overrides))
    checker = BameChecker(run)
    run.run(TOTAL, checker)
    assert checker.changed_steps


def test_bame_channel_layout_and_gradient_lma_and_multi_swaps_keep_n_per_group():
    for overrides in (dict(lma="gradient"), dict(swaps_per_block=3, block_groups=3), dict(rho_rounding="ceil")):
        cfg = replace(method_cfg("bame", **overrides), layout="channel", pattern="2:4")
        run = Run(cfg)
        run.run(TOTAL, BameChecker(run, check_swaps=False))
        assert run.method.adaptations == 4


def test_oscillating_blocks_freeze_and_then_stay_put():
    # aggressive readings so that a short run oscillates: every block a candidate for change every 2 steps
    cfg = method_cfg("bame", beta=0.2, tau=0.5, min_changes=2, rho=0.8, rho_decay="constant", interval_steps=2,
                     t_f_fraction=1.0)
    run = Run(cfg)
    checker = BameChecker(run)
    run.run(TOTAL, checker)
    assert checker.events_seen > 0
    assert checker.frozen_seen > 0  # and BameChecker checked they never changed afterwards
    for name in run.method.obf:
        st = run.method.obf[name]
        f = bame_core.effective_frequency(st, 0.2)
        # frozen exactly where the rule says so (frozen flags are sticky, the rule held when they were set)
        assert ((f >= 0.5) & (st.changes >= 2) & ~st.frozen).sum() == 0


def test_frozen_blocks_get_no_candidate_gradient_and_never_change():
    run = Run(method_cfg("bame", rho=1.0, rho_decay="constant"))
    state = run.method.state_dict()
    for _, s in state["layers"].items():
        s["frozen"][::2] = True
    run.method.load_state_dict(state)
    frozen_masks = {n: to_blocks(lay.mask, run.method.grids[n], lay.layout)[::2].clone() for n, lay in run.layers()}
    checker = BameChecker(run)
    run.run(TOTAL, checker)
    for name, layer in run.layers():
        assert torch.equal(to_blocks(layer.mask, run.method.grids[name], layer.layout)[::2], frozen_masks[name])
    assert checker.changed_steps


def test_joint_selection_freezes_nothing():
    cfg = method_cfg("bame", selection="joint", beta=0.2, tau=0.1, min_changes=1, rho=0.8, rho_decay="constant",
                     interval_steps=2, t_f_fraction=1.0)
    run = Run(cfg)
    checker = BameChecker(run, check_swaps=False)
    frozen_counts = []
    run.run(TOTAL, lambda stage, r: (checker(stage, r), stage == "end" and r.method.last_adaptation and
                                     frozen_counts.extend(la.frozen_blocks for la in r.method.last_adaptation.layers)))
    assert frozen_counts and max(frozen_counts) == 0
    assert checker.events_seen > 0  # oscillations happened and were tracked, but nothing froze
    assert any(float(st.frequency.max()) > 0 for st in run.method.obf.values())


def test_regrow_zero_vs_stored():
    values = {}
    for regrow in ("stored", "zero"):
        run = Run(method_cfg("bame", regrow=regrow))
        run.method.before_step(0)
        run.forward_backward(0)
        run.method.after_backward(0)
        run.opt.step()
        before = {n: (lay.mask.clone(), lay.weight.detach().clone()) for n, lay in run.layers()}
        run.method.after_optimizer_step(0)
        grown_vals = []
        for name, layer in run.layers():
            grown = layer.mask & ~before[name][0]
            assert grown.any()
            grown_vals.append(layer.weight.detach()[grown])
            assert torch.equal(layer.weight.detach()[~grown], before[name][1][~grown])
            stored = before[name][1][grown]
            if regrow == "stored":
                assert torch.equal(layer.weight.detach()[grown], stored)
        values[regrow] = torch.cat(grown_vals)
    assert (values["zero"] == 0).all() and (values["stored"] != 0).all()


def test_momentum_is_reset_at_both_ends_of_a_swap():
    run = Run(method_cfg("bame"))
    run.run(5)  # momentum builds up; step 5 adapts
    run.method.before_step(5)
    run.forward_backward(5)
    run.method.after_backward(5)
    run.opt.step()
    old = {n: lay.mask.clone() for n, lay in run.layers()}
    momentum = {n: run.opt.state[lay.weight]["momentum_buffer"].clone() for n, lay in run.layers()}
    run.method.after_optimizer_step(5)
    for name, layer in run.layers():
        dropped, grown = old[name] & ~layer.mask, layer.mask & ~old[name]
        assert dropped.any() and (momentum[name][dropped] != 0).all()
        buf = run.opt.state[layer.weight]["momentum_buffer"]
        assert (buf[dropped] == 0).all() and (buf[grown] == 0).all()
        assert torch.equal(buf[~(dropped | grown)], momentum[name][~(dropped | grown)])


def test_rho_follows_the_cosine_schedule_in_records_and_budgets():
    run = Run(method_cfg("bame", rho=0.5))
    rhos, budgets = {}, {}

    def probe(stage, r):
        if stage == "after_backward" and r.method.last_adaptation is not None:
            rhos[r.step] = r.method.last_adaptation.rho
            budgets[r.step] = {la.layer: la.candidate_blocks > 0 for la in r.method.last_adaptation.layers}
    run.run(TOTAL, probe)
    assert sorted(rhos) == [0, 5, 10, 15]
    for s, v in rhos.items():
        assert v == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * s / 20)))
    for name, grid in run.method.grids.items():
        assert run.method.budgets(15)[name] == bame_core.selection_budget(rhos[15], grid.num_blocks)


def test_layer_record_shapes_for_recorders():
    run = Run(method_cfg("bame"))
    run.one_step()
    rec = run.method.last_adaptation
    assert rec.step == 0 and rec.rho == pytest.approx(0.3)
    for la in rec.layers:
        nb = run.method.grids[la.layer].num_blocks
        assert la.num_blocks == nb and la.candidate_blocks == nb
        for t in (la.frequency, la.frozen, la.last_score, la.changes):
            assert t.shape == (nb,) and t.device.type == "cpu"
        assert la.swaps == la.selected_blocks > 0
        assert set(la.score_stats) == {"mean", "max"}


def test_state_dict_round_trip_reproduces_the_next_steps_exactly():
    cfg = method_cfg("bame", beta=0.2, tau=0.5, rho=0.6, interval_steps=3)
    a = Run(cfg)
    a.run(7)  # ends just after the adaptation of step 6
    snap = a.snapshot()
    a.run(TOTAL - 7)
    b = Run(cfg)
    b.restore(snap)
    assert b.step == 7
    b.run(TOTAL - 7)
    for (_, la), (_, lb) in zip(a.layers(), b.layers()):
        assert torch.equal(la.mask, lb.mask) and torch.equal(la.weight, lb.weight)
    for name in a.method.obf:
        for x, y in zip(a.method.obf[name].tensors(), b.method.obf[name].tensors()):
            assert torch.equal(x, y)
    assert a.method.adaptations == b.method.adaptations
    sa, sb = a.method.state_dict(), b.method.state_dict()
    assert all(torch.is_tensor(v) for v in sa["layers"][next(iter(sa["layers"]))].values())
    assert torch.equal(sa["adaptations"], sb["adaptations"])


def test_state_dict_refuses_another_layout_of_blocks():
    a = Run(method_cfg("bame"))
    b = Run(method_cfg("bame", block_rows=2))
    with pytest.raises(ValueError, match="does not fit"):
        b.method.load_state_dict(a.method.state_dict())


def test_non_finite_gradient_skips_the_adaptation():
    run = Run(method_cfg("bame"))
    run.method.before_step(0)
    run.forward_backward(0)
    name, layer = run.layers()[0]
    layer.weight.grad[0, 0, 0, 0] = float("inf")
    masks = {n: lay.mask.clone() for n, lay in run.layers()}
    run.method.after_backward(0)
    assert all(la.selected_blocks == 0 for la in run.method.last_adaptation.layers)
    run.method.after_optimizer_step(0)  # (the loop's grad scaler would skip the optimizer step)
    assert all(torch.equal(lay.mask, masks[n]) for n, lay in run.layers())


def test_bad_block_tiling_names_the_layer():
    with pytest.raises(ValueError, match="layer '0'"):
        Run(method_cfg("bame", block_rows=3))


# -- baselines ----------------------------------------------------------------------------------------

def test_dense_leaves_the_model_untouched():
    run = Run(method_cfg("dense"))
    ref = tiny_model()
    assert [type(m) for m in run.model.modules()] == [type(m) for m in ref.modules()]
    assert not run.layers() and run.method.self_decayed_parameters() == []
    for p, q in zip(run.model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    run.run(3)
    assert run.method.last_adaptation is None


@pytest.mark.parametrize("mask_init", ["magnitude", "random"])
def test_static_mask_never_changes_and_pruned_weights_never_move(mask_init):
    run = Run(replace(method_cfg("static"), mask_init=mask_init))
    masks = {n: lay.mask.clone() for n, lay in run.layers()}
    for _, layer in run.layers():
        assert layer.backward_mode is Backward.SPARSE
        assert (group_counts(layer.mask, 4) == 2).all()
        magnitude = nm_mask(layer.weight.abs(), 2, 4)
        assert torch.equal(layer.mask, magnitude) == (mask_init == "magnitude")
    w0 = {n: lay.weight.detach().clone() for n, lay in run.layers()}

    def probe(stage, r):
        if stage == "backward":
            for _, layer in r.layers():
                assert (layer.weight.grad[~layer.mask] == 0).all()
                layer.saved = (layer.weight.grad.clone(), layer.weight.detach().clone())
        if stage == "after_backward":  # masked gradient plus masked decay
            for _, layer in r.layers():
                g, w = layer.saved
                torch.testing.assert_close(layer.weight.grad, (g + WD * w) * layer.mask)
    run.run(10, probe)
    for name, layer in run.layers():
        assert torch.equal(layer.mask, masks[name])
        assert torch.equal(layer.weight.detach()[~layer.mask], w0[name][~layer.mask])
        assert not torch.equal(layer.weight.detach()[layer.mask], w0[name][layer.mask])
    assert {id(p) for p in run.method.self_decayed_parameters()} == {id(lay.weight) for _, lay in run.layers()}


@pytest.mark.parametrize("name", ["ste", "srste"])
def test_ste_mask_follows_magnitude_every_step(name):
    run = Run(method_cfg(name))
    assert run.method.self_decayed_parameters() == []
    flips = 0

    def probe(stage, r):
        nonlocal flips
        if stage == "backward":
            for _, layer in r.layers():
                assert torch.equal(layer.mask, nm_mask(layer.weight.abs(), 2, 4))  # forward used top-N |W|
                assert (layer.weight.grad[~layer.mask] != 0).any()  # dense weight gradient
                layer.prev = layer.mask.clone()
        if stage == "end":
            for _, layer in r.layers():
                assert torch.equal(layer.mask, nm_mask(layer.weight.abs(), 2, 4))
                flips += int((layer.mask != layer.prev).sum())
    run.run(10, probe)
    assert flips > 0


@pytest.mark.parametrize("name", ["ste", "srste"])
def test_ste_and_srste_gradient_formula(name):
    run = Run(method_cfg(name))
    run.method.before_step(0)
    run.forward_backward(0)
    lam = 2e-4 if name == "srste" else 0.0
    # reference: plain autograd with W*m as a leaf gives g = dL/d(W*m)
    layers = run.layers()
    effs = {n: (lay.weight.detach() * lay.mask).requires_grad_() for n, lay in layers}
    x, y = batch(0)
    h = x
    for module in run.model:
        if isinstance(module, NMLayer):
            n = next(k for k, v in layers if v is module)
            h = (F.conv2d(h, effs[n], module.bias, module.stride, module.padding) if isinstance(module, nn.Conv2d)
                 else F.linear(h, effs[n], module.bias))
        else:
            h = module(h)
    F.cross_entropy(h, y).backward()
    for n, layer in layers:
        expected = effs[n].grad + lam * (~layer.mask) * layer.weight.detach()
        torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-5, atol=1e-7)
        assert layer.backward_mode is (Backward.SRSTE if name == "srste" else Backward.STE)


def test_asp_prunes_at_the_configured_point():
    total = 20
    cfg = replace(method_cfg("asp"), asp_prune_fraction=0.5)
    run = Run(cfg, total=total)
    assert run.method.prune_step == 10
    seen = {}

    def probe(stage, r):
        if stage == "backward":
            for _, layer in r.layers():
                if r.step < 10:
                    assert layer.mask.all() and layer.backward_mode is Backward.DENSE
                else:
                    assert (group_counts(layer.mask, 4) == 2).all() and layer.backward_mode is Backward.SPARSE
                    assert (layer.weight.grad[~layer.mask] == 0).all()
        if stage == "end" and r.step == 9:
            seen["w9"] = {n: lay.weight.detach().clone() for n, lay in r.layers()}
        if stage == "optimizer" and r.step >= 10:
            for n, layer in r.layers():
                assert torch.equal(layer.weight.detach()[~layer.mask], seen["w9"][n][~layer.mask])
    for _ in range(10):
        run.one_step(probe)
    run.method.before_step(10)  # the prune
    for n, layer in run.layers():
        assert torch.equal(layer.mask, nm_mask(seen["w9"][n].abs(), 2, 4))
        buf = run.opt.state[layer.weight]["momentum_buffer"]
        assert (buf[~layer.mask] == 0).all() and (buf[layer.mask] != 0).any()
    run.forward_backward(10)
    run.method.after_backward(10)
    run.opt.step()
    run.method.after_optimizer_step(10)
    run.step = 11
    run.run(total - 11, probe)


def test_asp_resume_restores_the_sparse_phase():
    cfg = replace(method_cfg("asp"), asp_prune_fraction=0.25)
    a = Run(cfg, total=20)
    a.run(8)
    snap = a.snapshot()
    b = Run(cfg, total=20)
    b.restore(snap)
    assert b.method.pruned and all(lay.backward_mode is Backward.SPARSE for _, lay in b.layers())
    a.run(4)
    b.run(4)
    for (_, la), (_, lb) in zip(a.layers(), b.layers()):
        assert torch.equal(la.weight, lb.weight) and torch.equal(la.mask, lb.mask)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bame_on_cuda_keeps_state_on_the_device_and_matches_invariants():
    run = Run(method_cfg("bame"), device="cuda")
    checker = BameChecker(run)
    run.run(TOTAL, checker)
    assert checker.changed_steps
    for st in run.method.obf.values():
        assert all(t.device.type == "cuda" for t in st.tensors())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bame_follows_the_model_to_cuda_after_prepare():
    run = Run(method_cfg("bame"))
    run.model.cuda()
    run.device = "cuda"
    run.opt = torch.optim.SGD(run.model.parameters(), lr=LR, momentum=0.9)
    run.method.attach_optimizer(run.opt)
    run.run(TOTAL, BameChecker(run))
    for st in run.method.obf.values():
        assert st.frequency.device.type == "cuda"

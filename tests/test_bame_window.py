"""BAME's second family of readings: designated blocks that learn (``designated_grad: window``,
``pruned_update: train``, ``regrow_rule``, ``designation``), against a brute-force reference.

Driven by hand in the step order (the ``Run`` of tests/test_methods.py: T = 5, t_f = 20, adaptation at
0, 5, 10, 15, the settle step at 20). A probe recomputes, from the weights, gradients and masks it saw, which
positions must get a gradient on each step, which weights may move, what each re-choice and designation
must be (per group, in plain Python), and the FLOPs ledger's weight-gradient count in closed form.
"""

from __future__ import annotations

import pytest
import torch

from bame.config import ConfigError, load_config
from bame.flops import WEIGHT_GRAD, FlopsLedger
from bame.nm import from_blocks, group_counts, to_blocks
from test_methods import TOTAL, WD, Run, method_cfg

WINDOW = dict(designated_grad="window", pruned_update="train", lma="taylor", rho=0.3, rho_decay="constant")
ADAPT = {0, 5, 10, 15}
SETTLE = 20
POSITIONS = {"0": 8 * 6 * 6, "2": 8 * 6 * 6, "5": 8}  # batch x output positions of each N:M layer


def expand(blocks: torch.Tensor, grid, layer) -> torch.Tensor:
    """[B] bool -> the weight's shape (every position of a block takes the block's value)."""
    b = blocks.view(-1, 1, 1).expand(grid.num_blocks, grid.groups_per_block, grid.m)
    return from_blocks(b, grid, layer.weight.shape, layer.layout)


def top_n_by_magnitude(w_group: list[float], n: int) -> set[int]:
    """The n largest |w| of one group; ties to the earlier position."""
    return set(sorted(range(len(w_group)), key=lambda i: (-abs(w_group[i]), i))[:n])


def best_swap(s_group_list: list[list[float]], mask_groups: list[list[bool]]) -> tuple[float, int, int, int]:
    """Brute-force best Taylor swap of one block: max over groups, kept i, pruned j of s_i - s_j."""
    best = (-float("inf"), -1, -1, -1)
    for gi, (s, keep) in enumerate(zip(s_group_list, mask_groups)):
        for i in range(len(s)):
            for j in range(len(s)):
                if keep[i] and not keep[j] and s[i] - s[j] > best[0]:
                    best = (s[i] - s[j], gi, i, j)
    return best


class WindowProbe:
    """Checks every stage of every step against the brute-force reference (taylor LMA, single swaps).

    ``lma`` re-chooses the designated blocks after the backward of the next adaptation step (it needs their
    gradient there); ``magnitude`` at its start, from the weights the previous step left, as SR-STE refreshes
    its mask. So the expected mask is checked at the end of an ``lma`` step and before the forward of a
    ``magnitude`` one (the ``backward`` stage sees the mask the forward used).
    """

    def __init__(self, run: Run):
        self.run, self.m = run, run.method
        self.b = self.m.bcfg
        self.at_start = self.b.regrow_rule == "magnitude"
        self.expected_designated = {n: torch.zeros(g.num_blocks, dtype=torch.bool) for n, g in self.m.grids.items()}
        self.ledger = FlopsLedger(run.model)
        self.ledger.begin_step()
        self.seen: dict = {}
        self.last_end = {n: dict(w=lay.weight.detach().clone(), mask=lay.mask.clone()) for n, lay in run.layers()}
        self.pruned_moves = 0
        self.designated_steps: set[int] = set()
        self.rechosen_changes = 0

    def __call__(self, stage: str, run: Run) -> None:
        getattr(self, stage)(run.step, run)

    def _adapting(self, step: int) -> bool:
        return step in ADAPT or (step == SETTLE and any(v.any() for v in self.expected_designated.values()))

    def backward(self, step: int, run: Run) -> None:
        self.seen = {}
        budgets = self.m.budgets(step)
        adapting = self._adapting(step)
        for name, layer in run.layers():
            grid = self.m.grids[name]
            held = self.expected_designated[name]
            if self.at_start and adapting:  # re-chosen before the forward, from the last step's weights
                before = self.last_end[name]
                assert torch.equal(before["mask"], self.last_end[name]["mask"])
                want = self._rechosen(name, layer, before["w"], None, before["mask"], held)
                assert torch.equal(layer.mask, want), f"step {step} {name}: magnitude re-choice at the start"
                frozen_now = self.m.obf[name].frozen
                held = (~frozen_now if self.b.designation == "progressive" and step < SETTLE
                        else torch.zeros_like(held))
                self.expected_designated[name] = held.clone()
            frozen = self.m.obf[name].frozen.clone()
            cand = torch.zeros_like(held)
            if step in ADAPT and budgets[name] > 0 and self.b.designation == "topk":
                cand = ~frozen
            expected = expand(held | cand, grid, layer)
            assert torch.equal(layer.grad_mask, expected), f"step {step} {name}: gradient positions"
            g = layer.weight.grad.detach().clone()
            assert (g[~(layer.mask | expected)] == 0).all()
            if held.any():
                self.designated_steps.add(step)
            self.seen[name] = dict(w=layer.weight.detach().clone(), g=g, mask=layer.mask.clone(), frozen=frozen,
                                   held=held.clone(), cand=cand, extra_blocks=int((held | cand).sum()))

    def after_backward(self, step: int, run: Run) -> None:
        for name, layer in run.layers():
            s = self.seen[name]
            update = s["mask"] | expand(s["held"], self.m.grids[name], layer)
            lam = self.m.pruned_decay
            want = (s["g"] + lam * s["w"] * (update & ~s["mask"]) + WD * s["w"]) * update
            torch.testing.assert_close(layer.weight.grad, want, rtol=1e-6, atol=1e-9)

    def optimizer(self, step: int, run: Run) -> None:
        for name, layer in run.layers():
            s = self.seen[name]
            moved = layer.weight.detach() != s["w"]
            update = s["mask"] | expand(s["held"], self.m.grids[name], layer)
            assert not moved[~update].any(), f"step {step}: a weight outside mask | designated moved"
            self.pruned_moves += int((moved & ~s["mask"]).sum())

    def end(self, step: int, run: Run) -> None:
        cost = self.ledger.end_step()
        adapting = self._adapting(step)
        for name, layer in run.layers():
            s, grid = self.seen[name], self.m.grids[name]
            n, m = layer.pattern.n, layer.pattern.m
            assert (group_counts(layer.mask, m, layer.layout) == n).all()
            # the ledger's weight gradient in closed form: the mask's N/M of the layer + the full blocks
            wgrad = cost.by_layer[(name, WEIGHT_GRAD)][0]
            closed = (layer.weight.numel() * n // m + s["extra_blocks"] * grid.groups_per_block * (m - n)) * POSITIONS[name]
            assert wgrad == closed, f"step {step} {name}: ledger {wgrad} != closed form {closed}"
            if self.at_start or not adapting:
                assert torch.equal(layer.mask, s["mask"]), f"step {step}: mask changed after the forward"
            else:
                want = self._rechosen(name, layer, s["w"], s["g"], s["mask"], s["held"])
                assert torch.equal(layer.mask, want), f"step {step} {name}: lma re-choice"
                assert not (to_blocks(layer.mask != s["mask"], grid, layer.layout).flatten(1).any(1) & s["frozen"]).any()
            if adapting:
                self._check_designation(step, name, layer, s)
        for name, layer in run.layers():  # nothing that will not move keeps an optimizer state
            held = expand(self.expected_designated[name], self.m.grids[name], layer)
            mom = run.opt.state[layer.weight]["momentum_buffer"]
            assert (mom[~(layer.mask | held)] == 0).all(), f"step {step}: momentum outside the moving weights"
            self.last_end[name] = dict(w=layer.weight.detach().clone(), mask=layer.mask.clone())
        self.ledger.begin_step()

    def _rechosen(self, name: str, layer, w, g, mask, held) -> torch.Tensor:
        """The brute-force mask after the held blocks' re-choice (magnitude: per group; lma: best swap if > 0)."""
        grid, n = self.m.grids[name], layer.pattern.n
        wb, mb = to_blocks(w, grid, layer.layout), to_blocks(mask, grid, layer.layout)
        new = mb.clone()
        for blk in held.nonzero().flatten().tolist():
            if self.b.regrow_rule == "magnitude":
                for gi in range(grid.groups_per_block):
                    keep = top_n_by_magnitude(wb[blk, gi].tolist(), n)
                    new[blk, gi] = torch.tensor([i in keep for i in range(grid.m)])
            else:
                gb = to_blocks(g, grid, layer.layout)
                r, gi, i, j = best_swap((gb[blk] * wb[blk]).tolist(), mb[blk].tolist())
                if r > 0:
                    new[blk, gi, i], new[blk, gi, j] = False, True
        self.rechosen_changes += int((new != mb).flatten(1).any(1).sum())
        return from_blocks(new, grid, layer.weight.shape, layer.layout)

    def _check_designation(self, step: int, name: str, layer, s: dict) -> None:
        """The designation for the next window: the top budget by brute-force score on the current masks
        (topk), every block not frozen (progressive), none at the settle step."""
        grid = self.m.grids[name]
        frozen = self.m.obf[name].frozen
        if step >= SETTLE:
            want = torch.zeros(grid.num_blocks, dtype=torch.bool)
        elif self.b.designation == "progressive":
            want = ~frozen
        else:
            wb, gb = to_blocks(s["w"], grid, layer.layout), to_blocks(s["g"], grid, layer.layout)
            mb = to_blocks(layer.mask, grid, layer.layout)
            scores = torch.tensor([best_swap((gb[k] * wb[k]).tolist(), mb[k].tolist())[0]
                                   for k in range(grid.num_blocks)])
            eligible = s["cand"] & ~frozen & (scores > 0)
            budget = self.m.budgets(step)[name]
            order = sorted(eligible.nonzero().flatten().tolist(), key=lambda k: (-float(scores[k]), k))[:budget]
            want = torch.zeros(grid.num_blocks, dtype=torch.bool)
            want[order] = True
        assert torch.equal(self.m.designated[name], want), f"step {step} {name}: designation"
        self.expected_designated[name] = want.clone()


@pytest.mark.parametrize("rule,designation", [("magnitude", "topk"), ("lma", "topk"), ("magnitude", "progressive"),
                                              ("lma", "progressive")])
def test_window_reading_against_brute_force(rule, designation):
    run = Run(method_cfg("bame", regrow_rule=rule, designation=designation, **WINDOW))
    probe = WindowProbe(run)
    run.run(TOTAL, probe)
    m = run.method
    assert m.adaptations == 5  # 0, 5, 10, 15 and the settle step 20
    assert probe.pruned_moves > 0, "no pruned weight of a designated block ever moved"
    assert probe.rechosen_changes > 0, "no re-choice changed a mask"
    # the steps on which some block was designated: lma holds a designation through the next adaptation step
    # (whose gradient scores it); magnitude re-chooses at the start of it (progressive designates at once)
    first = 0 if (rule, designation) == ("magnitude", "progressive") else 1
    gaps = ADAPT if (rule, designation) == ("magnitude", "topk") else set()
    assert probe.designated_steps == set(range(first, SETTLE + (rule == "lma"))) - gaps
    for name, layer in run.layers():  # after the settle step: no designation, no extra gradient
        assert not m.designated[name].any() and not layer.grad_mask.any()


def test_progressive_freezing_shrinks_the_designated_set():
    run = Run(method_cfg("bame", regrow_rule="magnitude", designation="progressive", tau=0.1, min_changes=1,
                         beta=0.5, **WINDOW))
    sizes = []
    for _ in range(SETTLE):
        run.one_step()
        if run.method.last_adaptation is not None:
            sizes.append(sum(int(d.sum()) for d in run.method.designated.values()))
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]
    frozen = sum(int(st.frozen.sum()) for st in run.method.obf.values())
    whole = sum(g.num_blocks for g in run.method.grids.values())
    assert sizes[-1] == whole - frozen  # designated = every block not frozen


def test_pruned_decay_zero_and_frozen_pruned_weights_outside_designated_blocks():
    run = Run(method_cfg("bame", regrow_rule="magnitude", pruned_decay=0.0, **WINDOW))
    probe = WindowProbe(run)
    run.run(12, probe)  # after_backward checks the decay term with lambda = 0
    assert run.method.pruned_decay == 0.0


def test_resume_mid_window_is_exact():
    cfg = method_cfg("bame", regrow_rule="magnitude", designation="topk", **WINDOW)
    a = Run(cfg)
    a.run(7)  # designated at 5, window 6..10: mid-window
    assert any(d.any() for d in a.method.designated.values())
    snap = a.snapshot()
    a.run(TOTAL - 7)
    b = Run(cfg)
    b.restore(snap)
    b.run(TOTAL - 7)
    for (name, la), (_, lb) in zip(a.layers(), b.layers()):
        assert torch.equal(la.weight, lb.weight) and torch.equal(la.mask, lb.mask)
        assert torch.equal(a.method.designated[name], b.method.designated[name])


def test_version_1_state_loads_with_nothing_designated():
    run = Run(method_cfg("bame", **WINDOW))
    run.run(3)
    state = run.method.state_dict()
    state["version"] = torch.tensor(1)
    for layer_state in state["layers"].values():
        del layer_state["designated"]
    fresh = Run(method_cfg("bame", **WINDOW))
    fresh.method.load_state_dict(state)
    assert not any(d.any() for d in fresh.method.designated.values())


def test_first_family_is_unchanged_by_the_new_options_defaults():
    """The default reading and the same reading with the new options spelled out give the same steps."""
    a = Run(method_cfg("bame"))
    b = Run(method_cfg("bame", designated_grad="adaptation", pruned_update="frozen", regrow_rule="lma",
                       designation="topk"))
    a.run(TOTAL)
    b.run(TOTAL)
    for (_, la), (_, lb) in zip(a.layers(), b.layers()):
        assert torch.equal(la.weight, lb.weight) and torch.equal(la.mask, lb.mask)


def test_gradient_plan_is_the_closed_form_of_the_window():
    """The declared plan: candidates (every block) on adaptation steps, the rho budget on steps 1..20 of each
    window; progressive: every block on 1..20, nothing on step 0 (no candidates needed)."""
    run = Run(method_cfg("bame", **WINDOW))
    m = run.method
    whole = {n: g.num_blocks for n, g in m.grids.items()}
    budget = m.budgets(0)
    per_step = {}
    for seg in m.gradient_plan(TOTAL):
        for s in range(seg.start, seg.stop):
            per_step[s] = {n: int(f * whole[n]) for n, f in seg.share.items()}
    for s in range(TOTAL):
        want = ({n: whole[n] for n in whole} if s in ADAPT else
                {n: budget[n] for n in whole} if 0 < s <= SETTLE else None)
        assert per_step.get(s) == want, s
    prog = Run(method_cfg("bame", designation="progressive", **WINDOW)).method
    steps = sorted(s for seg in prog.gradient_plan(TOTAL) for s in range(seg.start, seg.stop))
    assert steps == list(range(1, SETTLE + 1))
    # magnitude re-chooses at the start of the next adaptation step: progressive computes on 0 .. t_f - 1;
    # topk's candidates on the adaptation steps and its designated blocks on the steps between them
    prog = Run(method_cfg("bame", designation="progressive", regrow_rule="magnitude", **WINDOW)).method
    steps = sorted(s for seg in prog.gradient_plan(TOTAL) for s in range(seg.start, seg.stop))
    assert steps == list(range(0, SETTLE))
    # re-chosen every step (T = 1), the designation is one segment, not one per step
    every = Run(method_cfg("bame", designation="progressive", regrow_rule="magnitude", interval_steps=1,
                           **WINDOW)).method
    assert [(seg.start, seg.stop) for seg in every.gradient_plan(TOTAL)] == [(0, every.t_f)]
    topk = Run(method_cfg("bame", regrow_rule="magnitude", **WINDOW)).method
    per_step = {s: {n: int(f * whole[n]) for n, f in seg.share.items()}
                for seg in topk.gradient_plan(TOTAL) for s in range(seg.start, seg.stop)}
    assert per_step == {s: (whole if s in ADAPT else budget) for s in range(SETTLE)}


@pytest.mark.parametrize("sets,message", [
    (["method.bame.designated_grad=window"], "pruned_update=train"),
    (["method.bame.pruned_update=train"], "designated_grad=window"),
    (["method.bame.pruned_decay=-1"], "pruned_decay"),
    (["method.name=phased", "method.phased.switch_fraction=1.5"], "switch_fraction"),
])
def test_config_refuses_readings_that_do_not_fit(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, sets)


def test_progressive_magnitude_every_step_without_freezing_is_phased_bit_for_bit():
    """Every block designated on every step, re-chosen by magnitude at the start of every step, nothing
    frozen: SR-STE until t_f, then the mask frozen and static training, which is ``phased`` switching at t_f."""
    from bame.config import MethodConfig, PhasedConfig

    learning = Run(method_cfg("bame", regrow_rule="magnitude", designation="progressive", interval_steps=1,
                              obf=False, **WINDOW))
    phased = Run(MethodConfig(name="phased", pattern="2:4", first_conv_dense=False, classifier_dense=False,
                              phased=PhasedConfig(switch_fraction=SETTLE / TOTAL)))
    used = {}  # the masks each forward used

    def record(label):
        def probe(stage, run):
            if stage == "backward":
                used[label] = [lay.mask.clone() for _, lay in run.layers()]
        return probe

    for _ in range(TOTAL):
        learning.one_step(record("learning"))
        phased.one_step(record("phased"))
        assert all(torch.equal(a, b) for a, b in zip(used["learning"], used["phased"])), learning.step
        for (_, a), (_, b) in zip(learning.layers(), phased.layers()):
            assert torch.equal(a.weight, b.weight), learning.step
    assert phased.method.switched and learning.method.adaptations == SETTLE + 1

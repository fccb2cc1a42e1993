"""``method.bame.score_steps``: LMA scores from the mean candidate gradient of the last k steps.

Driven by hand in the step order (the ``Run`` of tests/test_methods.py): candidate gradients exactly on the
scoring steps, scores equal to the brute-force best swap under the window's mean gradient, exact resume in
the middle of a window, and the limits."""

from __future__ import annotations

import pytest
import torch

from bame.config import ConfigError, load_config
from bame.methods import MethodContext, create_method
from test_methods import TOTAL, Run, brute_force_block_scores, method_cfg

K = 3  # score_steps; T = 5 and t_f = 20 (method_cfg): adaptation at 0, 5, 10, 15


class WindowProbe:
    """Records each step's candidates and gradients, and checks the scores of every adaptation step."""

    def __init__(self, run: Run):
        self.run, self.m = run, run.method
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.before: dict[str, dict[str, torch.Tensor]] = {}
        self.candidate_steps: set[int] = set()
        self.checked = 0

    def __call__(self, stage: str, run: Run) -> None:
        step = run.step
        if stage == "backward":
            layers = run.layers()
            if any(layer.grad_mask.any() for _, layer in layers):
                self.candidate_steps.add(step)
            self.grads[step] = {n: layer.weight.grad.detach().clone() for n, layer in layers}
            self.before = {n: dict(w=layer.weight.detach().clone(), mask=layer.mask.clone(),
                                   frozen=self.m.obf[n].frozen.clone()) for n, layer in layers}
        elif stage == "after_backward" and self.m.last_adaptation is not None:
            window = [s for s in range(step - K + 1, step + 1) if s >= 0]
            for name, layer in run.layers():
                g = sum(self.grads[s][name] for s in window) / len(window)
                b = self.before[name]
                best = brute_force_block_scores(b["w"], g, b["mask"], self.m.grids[name], layer.layout)
                cand = ~b["frozen"]
                torch.testing.assert_close(self.m.last_score[name][cand], best[cand].float(), rtol=1e-5, atol=1e-8)
            self.checked += 1


def test_scores_use_the_mean_candidate_gradient_of_the_window():
    run = Run(method_cfg("bame", score_steps=K))
    probe = WindowProbe(run)
    run.run(TOTAL, probe)
    assert probe.checked == 4  # adaptation steps 0, 5, 10, 15
    assert probe.candidate_steps == {0, 3, 4, 5, 8, 9, 10, 13, 14, 15}
    assert run.method._score_count == 0 and not run.method._score_sum


def test_one_score_step_is_method_md_and_changes_nothing():
    a, b = Run(method_cfg("bame")), Run(method_cfg("bame", score_steps=1))
    a.run(TOTAL)
    b.run(TOTAL)
    for (_, la), (_, lb) in zip(a.layers(), b.layers()):
        assert torch.equal(la.mask, lb.mask) and torch.equal(la.weight, lb.weight)


def test_a_window_with_more_steps_swaps_differently():
    a, b = Run(method_cfg("bame")), Run(method_cfg("bame", score_steps=K))
    a.run(TOTAL)
    b.run(TOTAL)
    assert any(not torch.equal(la.mask, lb.mask) for (_, la), (_, lb) in zip(a.layers(), b.layers()))


def test_resume_in_the_middle_of_a_scoring_window_is_exact():
    whole = Run(method_cfg("bame", score_steps=K))
    whole.run(12)
    first = Run(method_cfg("bame", score_steps=K))
    first.run(9)  # steps 8 scored for the adaptation at 10; 9 and 10 to come
    assert first.method._score_count == 1
    snap = first.snapshot()
    resumed = Run(method_cfg("bame", score_steps=K))
    resumed.restore(snap)
    assert resumed.method._score_count == 1 and set(resumed.method._score_sum) == set(first.method._score_sum)
    resumed.run(3)
    for (_, la), (_, lb) in zip(whole.layers(), resumed.layers()):
        assert torch.equal(la.mask, lb.mask) and torch.equal(la.weight, lb.weight)


def test_score_steps_must_fit_in_the_interval():
    with pytest.raises(ValueError, match=r"score_steps=6 is longer than the adaptation interval T=5"):
        create_method(method_cfg("bame", score_steps=6), MethodContext(total_steps=TOTAL, steps_per_epoch=10,
                                                                        weight_decay=5e-4))
    with pytest.raises(ConfigError, match=r"method.bame.score_steps: must be >= 1"):
        load_config(None, ["method.bame.score_steps=0"])

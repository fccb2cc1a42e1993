"""BAME's invariants checked after every stage of every step of a real ``bame.train`` run (the loop, the
data pipeline, the LR schedule and the recorders included), with the checker of tests/test_methods.py."""

from __future__ import annotations

from pathlib import Path

import bame
from bame.config import load_config
from bame.methods.bame import Bame
from test_methods import BameChecker

QUICK = Path(__file__).resolve().parents[1] / "configs" / "quick.yaml"


class _LoopView:
    """What BameChecker reads from its ``Run``, taken from the method inside ``bame.train``."""

    def __init__(self, method: Bame) -> None:
        self.method, self.step = method, 0

    @property
    def opt(self):
        return self.method.optimizer

    def layers(self):
        return self.method.layers()


def test_bame_invariants_every_step_of_a_real_run(tmp_path, monkeypatch):
    views: dict[int, tuple[_LoopView, BameChecker]] = {}
    seen_steps: list[int] = []

    def checker_of(method: Bame) -> tuple[_LoopView, BameChecker]:
        if id(method) not in views:
            view = _LoopView(method)
            views[id(method)] = (view, BameChecker(view))
        return views[id(method)]

    after_backward, after_optimizer_step = Bame.after_backward, Bame.after_optimizer_step

    def checked_after_backward(self, step):
        view, check = checker_of(self)
        view.step = step
        check("backward", view)
        after_backward(self, step)
        check("after_backward", view)

    def checked_after_optimizer_step(self, step):
        view, check = checker_of(self)
        check("optimizer", view)
        after_optimizer_step(self, step)
        check("end", view)
        seen_steps.append(step)

    monkeypatch.setattr(Bame, "after_backward", checked_after_backward)
    monkeypatch.setattr(Bame, "after_optimizer_step", checked_after_optimizer_step)
    # quick.yaml: 512 synthetic images, batch 64 -> 8 steps/epoch, 2 epochs; BAME adapts every 2 steps up to
    # t_f = 8. Taylor scores, so that every swap is checked against the brute-force best one.
    cfg = load_config(QUICK, ["train.progress=false", "method.name=bame", "method.bame.lma=taylor"])
    res = bame.train(cfg, out_dir=tmp_path, verbose=False)
    assert res.status == "completed"
    ((view, check),) = views.values()
    assert seen_steps == list(range(16))
    assert check.changed_steps and set(check.changed_steps) <= {0, 2, 4, 6}
    assert view.method.adaptations == 4

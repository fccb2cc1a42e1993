"""Pure step functions: window and interval resolution, adaptation steps (both interval anchors), rho decay, ASP
point; and BAME adapting at the steps an interval given as a fraction resolves to."""

from __future__ import annotations

import math

import pytest

from bame.schedule import (adaptation_steps, asp_prune_step, is_adaptation_step, resolve_interval, resolve_step,
                           resolve_window, rho_at, round_half_up)


def test_round_half_up_is_not_bankers_rounding():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 2.49, 0.0)] == [1, 2, 3, 2, 0]


def test_resolve_step_steps_override_fraction_and_clamp():
    assert resolve_step(None, 0.5, 1000) == 500
    assert resolve_step(None, 0.5, 5) == 3  # half up
    assert resolve_step(7, 0.5, 1000) == 7
    assert resolve_step(2000, 0.0, 1000) == 1000
    assert resolve_step(None, 1.0, 30) == 30


def test_resolve_window():
    assert resolve_window(None, 0.0, None, 0.5, 100) == (0, 50)
    assert resolve_window(10, 0.0, 40, 0.9, 100) == (10, 40)
    with pytest.raises(ValueError, match="t_i=60 > t_f=50"):
        resolve_window(None, 0.6, None, 0.5, 100)


def test_adaptation_steps_absolute_anchor_follows_t_mod_T():
    # method.md: t_i <= t < t_f and t % T == 0
    assert adaptation_steps(0, 30, 5) == [0, 5, 10, 15, 20, 25]
    assert adaptation_steps(3, 22, 5, "absolute") == [5, 10, 15, 20]
    assert not is_adaptation_step(30, 0, 30, 5)  # t_f excluded
    assert is_adaptation_step(0, 0, 30, 5)  # t_i included


def test_adaptation_steps_t_i_anchor_starts_at_t_i():
    assert adaptation_steps(3, 22, 5, "t_i") == [3, 8, 13, 18]
    assert adaptation_steps(0, 30, 5, "t_i") == adaptation_steps(0, 30, 5, "absolute")


def test_adaptation_step_rejects_bad_arguments():
    with pytest.raises(ValueError, match="interval"):
        is_adaptation_step(0, 0, 10, 0)
    with pytest.raises(ValueError, match="anchor"):
        is_adaptation_step(0, 0, 10, 5, "relative")


def test_empty_window_never_adapts():
    assert adaptation_steps(10, 10, 1) == []


def test_rho_cosine_decays_to_zero_at_t_f():
    rho, t_i, t_f = 0.2, 10, 50
    assert rho_at(t_i, rho, t_i, t_f) == pytest.approx(rho)
    assert rho_at(30, rho, t_i, t_f) == pytest.approx(rho / 2)
    assert rho_at(20, rho, t_i, t_f) == pytest.approx(rho * 0.5 * (1 + math.cos(math.pi / 4)))
    values = [rho_at(s, rho, t_i, t_f) for s in range(t_i, t_f)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert 0 < values[-1] < 0.001
    assert rho_at(t_f, rho, t_i, t_f) == 0.0
    assert rho_at(t_i - 1, rho, t_i, t_f) == 0.0


def test_rho_constant_inside_window_only():
    assert rho_at(0, 0.05, 0, 10, "constant") == 0.05
    assert rho_at(9, 0.05, 0, 10, "constant") == 0.05
    assert rho_at(10, 0.05, 0, 10, "constant") == 0.0
    with pytest.raises(ValueError, match="rho decay"):
        rho_at(0, 0.05, 0, 10, "linear")


def test_asp_prune_step():
    assert asp_prune_step(0.5, 20) == 10
    assert asp_prune_step(0.0, 20) == 0
    assert asp_prune_step(1.0, 20) == 20


def test_resolve_interval_steps_or_fraction_clamped_to_one():
    assert resolve_interval(100, None, 1000) == 100  # the steps form, as given
    assert resolve_interval(100, 0.05, 1000) == 50  # the fraction replaces the steps
    assert resolve_interval(100, 0.1, 25) == 3  # 2.5 rounds half up
    assert resolve_interval(100, 0.01, 30) == 1  # 0.3 steps: clamped to 1
    assert resolve_interval(100, 0.5, 0) == 1
    assert resolve_interval(7, 1.0, 30) == 30
    with pytest.raises(ValueError, match="interval"):
        resolve_interval(0, None, 30)


def test_bame_with_interval_fraction_adapts_at_the_resolved_steps():
    """T = round_half_up(0.2 * 30) = 6 in the window [0, 20): the method's schedule, the steps it really
    adapts at in a run and the ``bame flops`` plan all follow the resolved T."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    from bame.config import BameConfig, MethodConfig
    from bame.methods import MethodContext, create_method

    total = 30
    cfg = MethodConfig(name="bame", pattern="2:4", first_conv_dense=False, classifier_dense=False,
                       bame=BameConfig(interval_fraction=0.2, t_f_fraction=20 / total, rho=0.3))
    method = create_method(cfg, MethodContext(total_steps=total, steps_per_epoch=10, weight_decay=0.0))
    assert method.interval == 6
    expected = [0, 6, 12, 18]
    assert [s for s in range(total) if method.is_adaptation_step(s)] == expected
    assert adaptation_steps(method.t_i, method.t_f, method.interval) == expected

    torch.manual_seed(0)
    model = method.prepare(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                         nn.Linear(8 * 6 * 6, 10)))
    assert method.adaptation_steps(total) == expected
    assert [(seg.start, seg.stop) for seg in method.gradient_plan(total)] == [(s, s + 1) for s in expected]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method.attach_optimizer(opt)
    adapted = []
    gen = torch.Generator().manual_seed(0)
    for step in range(total):
        before = method.adaptations
        method.before_step(step)
        opt.zero_grad(set_to_none=True)
        x, y = torch.randn(8, 4, 6, 6, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        F.cross_entropy(model(x), y).backward()
        method.after_backward(step)
        opt.step()
        method.after_optimizer_step(step)
        if method.adaptations > before:
            adapted.append(step)
    assert adapted == expected


def test_coalesce_segments_joins_touching_equal_segments_only():
    from bame.schedule import coalesce_segments

    a, b = {"x": 1}, {"x": 2}
    segs = [(0, 1, a), (1, 2, dict(a)), (2, 3, b), (4, 5, b), (5, 6, a)]
    assert coalesce_segments(segs) == [(0, 2, a), (2, 3, b), (4, 5, b), (5, 6, a)]
    assert coalesce_segments([]) == []

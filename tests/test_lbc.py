"""``lbc`` in the loop: every step's cuts, masks and score gradients against an independent
re-implementation of LBC's rules, the optimizer's score group, freezing, ledger, config and state."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from bame.config import ConfigError, load_config
from bame.experiment import build
from bame.lbc_core import lbc_elementwise_ops
from bame.nm import group_view, is_nm
from bame.step import training_step

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = "configs/quick.yaml"
# LeNet-5-wide: conv2 [32,16,5,5], fc1 [128,800], fc2 [64,128] N:M; 64 images of 8 = 8 steps an epoch
SETS = ["model.name=lenet5_wide", "data.synthetic_train_size=64", "train.batch_size=8", "method.name=lbc",
        "train.epochs=2", "method.lbc.t_i_fraction=0.125", "method.lbc.t_f_fraction=0.75"]
TOTAL = 16


def _experiment(*extra: str):
    torch.manual_seed(0)
    return build(load_config(QUICK, SETS + list(extra)))


def _batch(step: int):
    gen = torch.Generator().manual_seed(70 + step)
    return torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def _survivors(step: int, c: int, t_i: float, t_f: float) -> int:
    """Their ResNet schedule in fractions: C up to t_i, then 1 + ceil((C-1)(1 - (t - t_i)/(t_f - t_i))^3), 1 from t_f."""
    t = step / TOTAL
    if t <= t_i:
        return c
    if t >= t_f:
        return 1
    return 1 + math.ceil(round((c - 1) * (1 - (t - t_i) / (t_f - t_i)) ** 3, 9))


class Reference:
    """One layer's combinations kept as Python lists: alive per group, cut by sorting the scores."""

    def __init__(self, groups: int, n: int, m: int):
        self.combos = list(itertools.combinations(range(m), n))
        self.alive = [list(range(len(self.combos))) for _ in range(groups)]
        self.m = m

    def cut(self, scores: torch.Tensor, survivors: int) -> None:
        rows = scores.tolist()
        for g, alive in enumerate(self.alive):
            if len(alive) > survivors:  # keep the highest, the lower combination index of equal ones
                self.alive[g] = sorted(sorted(alive, key=lambda c: (-rows[g][c], c))[:survivors])

    def mask(self) -> torch.Tensor:
        out = torch.zeros(len(self.alive), self.m, dtype=torch.bool)
        for g, alive in enumerate(self.alive):
            for c in alive:
                out[g, list(self.combos[c])] = True
        return out

    def score_grad(self, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        gw = (grad * weight).tolist()
        out = torch.zeros(len(self.alive), len(self.combos), dtype=torch.float64)
        for g, alive in enumerate(self.alive):
            for c in alive:
                out[g, c] = sum(gw[g][j] for j in self.combos[c])
        return out


@pytest.mark.parametrize("pattern", ["2:4", "1:4"])
def test_every_step_follows_their_rules_against_a_reimplementation(pattern):
    exp = _experiment(f"method.pattern={pattern}")
    method, model, opt = exp.method, exp.model, exp.optimizer
    layers = method.layers()
    assert [g["name"] for g in opt.param_groups][-1] == "method"
    assert opt.param_groups[-1]["params"] == method.own_parameters() and len(method.own_parameters()) == 3
    n, m = (int(v) for v in pattern.split(":"))
    checked = [(name, layer) for name, layer in layers if name != "fc1"]  # fc1: 102400 weights, too many for loops
    refs = {name: Reference(layer.weight.numel() // m, n, m) for name, layer in checked}
    c = len(next(iter(refs.values())).combos)
    masks_seen, settled_at = set(), None
    for step in range(TOTAL):
        before = {name: method.state[name].scores.detach().clone() for name, _ in layers}
        method.before_step(step)
        s = _survivors(step, c, 0.125, 0.75)
        for name, layer in checked:
            refs[name].cut(before[name], s)
            groups = group_view(layer.mask, m).reshape(-1, m)
            assert torch.equal(groups, refs[name].mask()), (step, name)
            masks_seen.add(round(float(layer.mask.float().mean()), 3))
        if step == 0:
            assert all(layer.mask.all() for _, layer in layers)  # dense at the start
        opt.zero_grad(set_to_none=True)
        x, y = _batch(step)
        F.cross_entropy(model(x), y).backward()
        method.after_backward(step)
        for name, layer in checked:
            scores = method.state[name].scores
            if s > 1:
                g, w = (group_view(t, m).reshape(-1, m).double() for t in (layer.weight.grad, layer.weight.detach()))
                assert (layer.weight.grad[~layer.mask] == 0).all()  # m * dL/d(W*m)
                torch.testing.assert_close(scores.grad.double(), refs[name].score_grad(g, w), rtol=1e-5, atol=1e-9)
            else:
                assert scores.grad is None and not scores.requires_grad
                settled_at = step if settled_at is None else settled_at
        opt.step()
        method.after_optimizer_step(step)
        for name, _ in layers:
            moved = not torch.equal(method.state[name].scores.detach(), before[name])
            assert moved == (s > 1), (step, name)  # the optimizer updates the scores until they settle
    assert settled_at == 12  # t_f = 0.75 of 16 steps
    for _, layer in layers:
        assert is_nm(layer.mask, n, m, exact=True)
    assert len(masks_seen) >= 3 if n == 1 else len(masks_seen) >= 2  # the density fell in steps


def test_the_ledger_counts_the_current_mask_and_the_score_work():
    exp = _experiment("method.pattern=1:4")
    method, model, opt, ledger = exp.method, exp.model, exp.optimizer, exp.ledger
    densities = []
    for step in range(TOTAL):
        alive_before = {name: int(st.alive.sum()) for name, st in method.state.items()}
        cost = training_step(step, model, method, opt, ledger, *_batch(step)).cost
        expected = 0
        for name, layer in method.layers():
            st = method.state[name]
            nnz = int(layer.mask.sum())
            positions = cost.by_layer[(name, "forward")][1] // layer.weight.numel()
            for phase in ("forward", "input_grad", "weight_grad"):
                assert cost.by_layer[(name, phase)][:2] == (nnz * positions, layer.weight.numel() * positions)
            cutting = int(st.alive.sum()) < alive_before[name]
            expected += lbc_elementwise_ops(st.alive.shape[0], 1, 4, int(st.alive.sum()), nnz, cutting,
                                            scoring=step < 12)
        assert cost.by_phase["adaptation"][0] == expected, step
        densities.append(float(method.layers()[1][1].mask.float().mean()))
    assert densities[0] == 1.0 and densities[-1] == 0.25 and densities == sorted(densities, reverse=True)


def test_patterns_with_too_many_combinations_are_refused_in_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(QUICK, SETS + ["method.pattern=3:16"])
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 1 and "method.lbc.max_combinations" in lines[0] and "pattern 3:16 needs C(16,3)=560" in lines[0]
    load_config(QUICK, SETS + ["method.pattern=3:16", "method.lbc.max_combinations=560"])  # raised: accepted
    with pytest.raises(ConfigError, match="method.lbc.t_i_fraction: needs 0 <= t_i_fraction < t_f_fraction"):
        load_config(QUICK, SETS + ["method.lbc.t_i_fraction=0.8"])
    cfg = load_config(QUICK, ["method.name=lbc"])
    assert (cfg.method.lbc.t_i_fraction, cfg.method.lbc.t_f_fraction, cfg.method.lbc.exponent) == (0.0, 0.5, 3.0)


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_the_cli_refuses_them_in_one_line_before_any_run_folder(tmp_path, capsys, command):
    from bame.cli import main

    out = tmp_path / "runs"
    argv = {"train": ["train", "--config", QUICK, "--out", str(out), "--set", "method.name=lbc", "method.pattern=3:16"],
            "sweep": ["sweep", "--config", QUICK, "--out", str(out), "--methods", "lbc", "--patterns", "2:4,3:16"]}
    assert main(argv[command]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bame: error: ") and "Traceback" not in err, err
    assert "method.lbc.max_combinations" in err and "C(16,3)=560" in err
    assert not out.exists() or not any(out.iterdir())

def test_state_round_trip_continues_exactly_and_refuses_another_pattern():
    a, b = _experiment(), _experiment()
    for step in range(5):
        training_step(step, a.model, a.method, a.optimizer, a.ledger, *_batch(step))
    b.model.load_state_dict(a.model.state_dict())
    b.optimizer.load_state_dict(copy.deepcopy(a.optimizer.state_dict()))
    b.method.load_state_dict(copy.deepcopy(a.method.state_dict()))
    assert b.optimizer.param_groups[-1]["params"] == b.method.own_parameters()  # loaded in place
    for step in range(5, TOTAL):
        ca = training_step(step, a.model, a.method, a.optimizer, a.ledger, *_batch(step)).cost
        cb = training_step(step, b.model, b.method, b.optimizer, b.ledger, *_batch(step)).cost
        assert ca.by_layer == cb.by_layer and ca.by_phase == cb.by_phase, step
    for name, st in a.method.state.items():
        assert torch.equal(st.scores, b.method.state[name].scores) and torch.equal(st.alive, b.method.state[name].alive)
    assert a.method.settled and b.method.settled
    with pytest.raises(ValueError, match="saved scores .* do not fit"):
        _experiment("method.pattern=1:4").method.load_state_dict(a.method.state_dict())

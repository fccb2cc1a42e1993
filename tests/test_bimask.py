"""``bimask`` in the loop: every step's forward mask, permutation and backward mask against loops over
Bi-Mask's rules, its gradients, ledger, config, layer policy and state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bame.bimask_core import bimask_elementwise_ops, search_seed
from bame.config import ConfigError, load_config
from bame.experiment import build
from bame.flops import FlopsLedger
from bame.step import training_step

pytestmark = pytest.mark.usefixtures("one_thread")

# LeNet-5-wide on synthetic 28x28 images: conv2 [32,16,5,5], fc1 [128,800], fc2 [64,128] are N:M
SETS = ["model.name=lenet5_wide", "data.synthetic_train_size=64", "train.batch_size=8", "method.name=bimask",
        "method.bimask.iter=3", "method.bimask.greedy_num=4", "train.seed=3"]
QUICK = "configs/quick.yaml"


def _experiment(*extra: str):
    torch.manual_seed(0)
    return build(load_config(QUICK, SETS + list(extra)))


def _batch(step: int):
    gen = torch.Generator().manual_seed(50 + step)
    return torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def _forward_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Top-n |W| of every m consecutive entries of each row of W[Cout, K], the earlier of equal ones."""
    rows = w.reshape(w.shape[0], -1).tolist()
    out = []
    for row in rows:
        keep = [False] * len(row)
        for start in range(0, len(row), m):
            ranked = sorted(range(start, start + m), key=lambda j: (-abs(row[j]), j))
            for j in ranked[:n]:
                keep[j] = True
        out.append(keep)
    return torch.tensor(out).reshape(w.shape)


def _retained(fwd: torch.Tensor, perm: list[int], n: int, m: int) -> int:
    """Forward-kept weights a backward mask keeps along the permuted Cout: per column, per group of m
    permuted rows, min(n, kept in the group)."""
    rows = fwd.reshape(fwd.shape[0], -1)
    total = 0
    for start in range(0, len(perm), m):
        kept = rows[perm[start:start + m]].sum(0)
        total += int(kept.clamp(max=n).sum())
    return total


def _backward_mask(w: torch.Tensor, fwd: torch.Tensor, perm: list[int], n: int, m: int) -> torch.Tensor:
    """Each column, each group of m permuted output channels: of its forward-kept weights, the n largest |W|
    (the earlier permuted row of equal ones)."""
    w2, f2 = w.reshape(w.shape[0], -1), fwd.reshape(w.shape[0], -1)
    out = torch.zeros_like(f2)
    for k in range(w2.shape[1]):
        for start in range(0, len(perm), m):
            kept = [r for r in perm[start:start + m] if f2[r, k]]
            kept.sort(key=lambda r: (-abs(float(w2[r, k])), perm.index(r)))
            for r in kept[:n]:
                out[r, k] = True
    return out.reshape(w.shape)


def test_every_step_follows_their_rules_against_loops():
    exp = _experiment()
    method, model, opt = exp.method, exp.model, exp.optimizer
    layers = method.layers()
    assert [name for name, _ in layers] == ["conv2", "fc1", "fc2"]
    previous = {}
    for step in range(7):
        method.before_step(step)
        for index, (name, layer) in enumerate(layers):
            n, m = layer.pattern.n, layer.pattern.m
            w = layer.weight.detach()
            assert torch.equal(layer.mask, _forward_mask(w, n, m)), (step, name)
            perm = method.permutations[name].tolist()
            if step % 3 == 0:  # a search: the best of the seeded draws, the first of equal counts
                gen = torch.Generator().manual_seed(search_seed(3, index, step))
                draws = [torch.randperm(w.shape[0], generator=gen).tolist() for _ in range(4)]
                scores = [_retained(layer.mask, d, n, m) for d in draws]
                assert perm == draws[scores.index(max(scores))], (step, name)
            else:
                assert perm == previous[name], (step, name)
            previous[name] = perm
            if name != "fc1":  # fc1's 102400 weights: its backward mask by loops would take a minute
                assert torch.equal(layer.backward_mask, _backward_mask(w, layer.mask, perm, n, m)), (step, name)
            assert not (layer.backward_mask & ~layer.mask).any()
            assert layer.backward_order.tolist() == perm
        opt.zero_grad(set_to_none=True)
        x, y = _batch(step)
        F.cross_entropy(model(x), y).backward()
        method.after_backward(step)
        opt.step()
        method.after_optimizer_step(step)
    assert method.searches == 3 and method.searched_at == 6


def test_gradients_input_through_the_backward_mask_weight_dense_with_srste_decay():
    exp = _experiment("method.srste_decay=0.5")
    method, model = exp.method, exp.model
    method.before_step(0)
    _, fc2 = method.layers()[2]
    x, y = _batch(0)
    hidden = {}
    fc2.register_forward_hook(lambda mod, inp, out: hidden.update(x=inp[0], y=out))
    hidden_grads = {}
    fc2.register_full_backward_hook(lambda mod, gin, gout: hidden_grads.update(gin=gin[0], gout=gout[0]))
    F.cross_entropy(model(x), y).backward()
    g, a = hidden_grads["gout"], hidden["x"].detach()  # [B, 64], [B, 128]
    w = fc2.weight.detach()
    torch.testing.assert_close(hidden_grads["gin"], g @ (w * fc2.backward_mask), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fc2.weight.grad, g.t() @ a + 0.5 * (~fc2.mask) * w, rtol=1e-5, atol=1e-6)
    assert (fc2.weight.grad[~fc2.mask] != 0).all()  # dense: every weight moves


def test_the_ledger_counts_the_backward_mask_and_books_the_mask_work():
    exp = _experiment()
    method, model, opt = exp.method, exp.model, exp.optimizer
    ledger = FlopsLedger(model)
    for step in range(4):
        cost = training_step(step, model, method, opt, ledger, *_batch(step)).cost
        for name, layer in method.layers():
            positions = cost.by_layer[(name, "weight_grad")][0] // layer.weight.numel()
            fwd, inp, wgrad = (cost.by_layer[(name, ph)] for ph in ("forward", "input_grad", "weight_grad"))
            assert fwd[:2] == (layer.weight.numel() // 2 * positions, layer.weight.numel() * positions)
            nnz_b = int(layer.backward_mask.sum())
            assert inp[:2] == (nnz_b * positions, layer.weight.numel() * positions) and nnz_b < fwd[0] // positions
            assert wgrad[0] == wgrad[1] == layer.weight.numel() * positions  # dense
            assert (fwd[2], inp[2], wgrad[2]) == (True, True, False)  # N:M along K / along the permuted Cout
        searched = step % 3 == 0
        expected = sum(bimask_elementwise_ops(layer.weight.numel(), layer.weight.shape[0], 4, 4 if searched else 0)
                       for _, layer in method.layers())
        assert cost.by_phase["adaptation"] == (expected, expected) and method.mask_work_ops() == expected


def test_layers_whose_cout_is_no_multiple_of_m_stay_dense_or_are_refused():
    exp = _experiment("method.pattern=1:16", "method.classifier_dense=false")
    reasons = {d.name: d.reason for d in exp.method.report.layers}
    assert "Cout=10 not a multiple of M=16" in reasons["classifier"]
    assert exp.method.report.sparse_names == ["conv2", "fc1", "fc2"]
    with pytest.raises(ConfigError, match="layer 'classifier': Cout=10 not a multiple of M=16") as err:
        _experiment("method.pattern=1:16", "method.classifier_dense=false", "method.on_indivisible=error")
    assert len(str(err.value).splitlines()) == 2  # the heading and one line


@pytest.mark.parametrize("key,value", [("iter", 0), ("greedy_num", 0)])
def test_options_below_one_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"method.bimask.{key}: must be >= 1, got {value}"):
        load_config(QUICK, SETS + [f"method.bimask.{key}={value}"])


def test_defaults_and_the_seed_of_the_draws():
    cfg = load_config(QUICK, ["method.name=bimask"])
    assert (cfg.method.bimask.iter, cfg.method.bimask.greedy_num) == (100, 100)
    seeds = {search_seed(s, i, t) for s in (0, 1) for i in (0, 1) for t in (0, 100)}
    assert len(seeds) == 8 and all(0 <= s < 2 ** 63 for s in seeds)
    assert search_seed(0, 1, 100) == search_seed(0, 1, 100)
    assert math.ceil(math.log2(16)) * 10 * 2 == bimask_elementwise_ops(10, 5, 16, 0)


def test_state_round_trip_continues_exactly_and_refuses_other_layers():
    a, b = _experiment(), _experiment()
    for step in range(4):
        training_step(step, a.model, a.method, a.optimizer, a.ledger, *_batch(step))
    b.model.load_state_dict(a.model.state_dict())
    b.optimizer.load_state_dict(copy.deepcopy(a.optimizer.state_dict()))  # its own momentum buffers
    b.method.load_state_dict(a.method.state_dict())
    for step in range(4, 8):  # a search at 6: the permutations drawn after the resume are the same
        ca = training_step(step, a.model, a.method, a.optimizer, a.ledger, *_batch(step)).cost
        cb = training_step(step, b.model, b.method, b.optimizer, b.ledger, *_batch(step)).cost
        assert ca.by_layer == cb.by_layer and ca.by_phase == cb.by_phase
    for (name, la), (_, lb) in zip(a.method.layers(), b.method.layers()):
        assert torch.equal(la.weight, lb.weight) and torch.equal(la.backward_mask, lb.backward_mask), name
        assert torch.equal(a.method.permutations[name], b.method.permutations[name])
    state = a.method.state_dict()
    state["permutations"].pop("fc2")
    with pytest.raises(ValueError, match="does not match the model's N:M layers"):
        b.method.load_state_dict(state)

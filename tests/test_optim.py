"""``bame.optim.MaskedAdam`` (train.optimizer adam / adamw) against a brute-force reference and torch's Adam.

The reference below knows nothing of the methods beyond the positions ``U`` each step lets move: per element,
in float64, in Python loops. Its only rule for restarts: an element's moments and step count restart where its
membership in ``U`` changes, and, for the STE family (whose ``U`` is every weight), where its mask flips.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bame.config import BameConfig, MethodConfig, PhasedConfig, load_config
from bame.experiment import build
from bame.methods import MethodContext, create_method
from bame.optim import MaskedAdam, restart_state
from bame.schedule import LRFactor

STEPS = 12
LR, WD, BETAS, EPS = 0.02, 0.1, (0.9, 0.999), 1e-8


# --------------------------------------------------------------------------------------------------
# the brute-force reference


class Reference:
    """Adam / AdamW on flat float64 lists, one element at a time; every element outside ``U`` stays as it is."""

    def __init__(self, numel: int) -> None:
        self.m, self.v, self.k = [0.0] * numel, [0.0] * numel, [0] * numel

    def restart(self, where: list[bool]) -> None:
        for e, hit in enumerate(where):
            if hit:
                self.m[e] = self.v[e] = 0.0
                self.k[e] = 0

    def step(self, w: list[float], g: list[float], U: list[bool], lr: float, wd: float, decoupled: bool) -> None:
        b1, b2 = BETAS
        for e in range(len(w)):
            if not U[e]:
                continue
            self.k[e] += 1
            ge = g[e] if decoupled else g[e] + wd * w[e]
            if decoupled:
                w[e] *= 1 - lr * wd
            self.m[e] = b1 * self.m[e] + (1 - b1) * ge
            self.v[e] = b2 * self.v[e] + (1 - b2) * ge * ge
            m_hat, v_hat = self.m[e] / (1 - b1 ** self.k[e]), self.v[e] / (1 - b2 ** self.k[e])
            w[e] -= lr * m_hat / (math.sqrt(v_hat) + EPS)


def flat(t: torch.Tensor) -> list:
    return t.detach().reshape(-1).tolist()


# --------------------------------------------------------------------------------------------------
# a tiny model driven in the loop's order


def setup(name: str, optimizer: str, **method_keys):
    """An 8x16 N:M linear at 1:4 and a dense classifier, float64, ``name``'s method, MaskedAdam as build() makes
    it (the method's own decay group under adam), a warm-up + cosine schedule."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    cfg = MethodConfig(name=name, pattern="1:4", **method_keys)
    method = create_method(cfg, MethodContext(total_steps=STEPS, steps_per_epoch=4, weight_decay=WD,
                                              optimizer=optimizer))
    model = method.prepare(model)
    mine = {id(p) for p in method.self_decayed_parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) in mine], "weight_decay": 0.0},
              {"params": [p for n, p in model.named_parameters() if id(p) not in mine and n.endswith("weight")]},
              {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0}]
    opt = MaskedAdam([g for g in groups if g["params"]], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                     decoupled=optimizer == "adamw", update_positions=method.update_positions)
    method.attach_optimizer(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LRFactor("cosine", STEPS, 2))
    return model, method, opt, sched


def batch(step: int):
    gen = torch.Generator().manual_seed(50 + step)
    return torch.randn(16, 16, generator=gen, dtype=torch.float64), torch.randint(0, 4, (16,), generator=gen)


def state_of(opt: MaskedAdam, p: torch.Tensor) -> tuple[list, list, list]:
    """m, v and the per-element step counts of ``p`` (a scalar step spread to every element)."""
    s = opt.state[p]
    k = s["step"].expand(p.shape) if s["step"].dim() == 0 else s["step"]
    return flat(s["exp_avg"]), flat(s["exp_avg_sq"]), [int(x) for x in flat(k)]


_BAME = dict(interval_steps=1, rho=0.5, rho_decay="constant", t_f_fraction=0.75, lma="gradient")
CASES = {
    "static": ("static", {}),
    "bame": ("bame", dict(bame=BameConfig(**_BAME))),
    "bame-regrow-zero": ("bame", dict(bame=BameConfig(**_BAME, regrow="zero"))),
    "bame-window-train": ("bame", dict(bame=BameConfig(**_BAME, designated_grad="window", pruned_update="train"))),
    "asp": ("asp", dict(asp_prune_fraction=0.25)),  # prunes at step 3
    "phased": ("phased", dict(phased=PhasedConfig(switch_fraction=0.25))),  # SR-STE, then static from step 3
    "srste": ("srste", {}),
    "ste": ("ste", {}),
    "dense": ("dense", {}),
}
STE_FAMILY = {"srste", "ste", "phased"}  # a mask flip restarts the state (method.flip_reset: null, under Adam)


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_step_equals_the_brute_force_reference(case, optimizer):
    """12 steps: the weights, both moments and the step counts equal the reference's after every step (1e-12,
    float64; step counts exactly); wherever a weight may not move, its moments and step count are zero and
    the weight is bit for bit what it was."""
    name, keys = CASES[case]
    model, method, opt, sched = setup(name, optimizer, **keys)
    params = list(model.parameters())
    refs = {p: Reference(p.numel()) for p in params}
    prev_u = {p: [True] * p.numel() for p in params}
    masks = {layer.weight: layer.mask for _, layer in method.layers()}
    prev_mask = {w: flat(m) for w, m in masks.items()}
    restarts = 0
    for t in range(STEPS):
        method.before_step(t)
        opt.zero_grad(set_to_none=True)
        x, y = batch(t)
        F.cross_entropy(model(x), y).backward()
        method.after_backward(t)
        positions = method.update_positions()
        lr = opt.param_groups[0]["lr"]
        for group in opt.param_groups:
            for p in group["params"]:
                u = flat(positions[p]) if p in positions else [True] * p.numel()
                mask = flat(masks[p]) if p in masks else None
                flips = [a != b for a, b in zip(mask, prev_mask[p])] if mask and name in STE_FAMILY else [False] * len(u)
                where = [a != b or f for a, b, f in zip(u, prev_u[p], flips)]
                restarts += sum(where) if p in masks else 0
                refs[p].restart(where)
                prev_u[p] = u
                if mask:
                    prev_mask[p] = mask
        before = {p: p.detach().clone() for p in params}
        expected = {}
        for group in opt.param_groups:
            for p in group["params"]:
                w = flat(before[p])
                refs[p].step(w, flat(p.grad), prev_u[p], lr, group["weight_decay"], optimizer == "adamw")
                expected[p] = torch.tensor(w, dtype=torch.float64).view_as(p)
        opt.step()
        sched.step()
        for p in params:
            assert torch.allclose(p.detach(), expected[p], rtol=0, atol=1e-12), f"{case} step {t}: weights"
            m, v, k = state_of(opt, p)
            ref = refs[p]
            assert k == ref.k, f"{case} step {t}: step counts"
            assert max(abs(a - b) for a, b in zip(m + v, ref.m + ref.v)) < 1e-12, f"{case} step {t}: moments"
            frozen = ~torch.tensor(prev_u[p]).view_as(p)
            assert torch.equal(p.detach()[frozen], before[p][frozen]), f"{case} step {t}: a frozen weight moved"
            assert all(m[e] == v[e] == k[e] == 0 for e in range(p.numel()) if not prev_u[p][e])
        method.after_optimizer_step(t)
    if name in ("static", "bame", "asp", "phased", "ste", "srste"):
        assert restarts > 0, "no element restarted: the test would not cover restarts"
    nm_steps = state_of(opt, next(iter(masks)))[2] if masks else []
    if name in ("bame", "asp", "phased", "ste", "srste"):
        assert len(set(nm_steps)) > 1, "every element has the same step count: per-element counts untested"


def test_a_restarted_weight_moves_as_a_fresh_adam_and_torchs_scalar_step_would_overshoot():
    """Regrown at global step 10^4: its first update is lr * g / (|g| + eps) (a fresh Adam's); torch's AdamW
    with only the moments reset moves it by (1 - b1) / sqrt(1 - b2) = 3.16 lr."""
    w0 = torch.randn(4, 8)
    ours, theirs = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    opt = MaskedAdam([ours], lr=LR, decoupled=True)
    control = torch.optim.AdamW([theirs], lr=LR, weight_decay=0.0)
    for o, p in ((opt, ours), (control, theirs)):  # 10^4 steps of history, without running them
        o.state[p].update(step=torch.tensor(1e4), exp_avg=torch.randn(4, 8), exp_avg_sq=torch.rand(4, 8))
    regrown = torch.zeros(4, 8, dtype=torch.bool)
    regrown[1, 3] = regrown[2, 5] = True
    opt.param_groups[0]["weight_decay"] = 0.0
    restart_state(opt, ours, regrown)
    for state in (control.state[theirs]["exp_avg"], control.state[theirs]["exp_avg_sq"]):
        state.masked_fill_(regrown, 0)
    g = torch.randn(4, 8)
    ours.grad, theirs.grad = g.clone(), g.clone()
    opt.step()
    control.step()
    moved = (ours.detach() - w0).abs()[regrown]
    assert torch.allclose(moved, LR * g.abs()[regrown] / (g.abs()[regrown] + 1e-8), rtol=1e-5)
    assert torch.allclose((theirs.detach() - w0).abs()[regrown], moved * 0.1 / math.sqrt(0.001), rtol=1e-4)
    assert opt.state[ours]["step"][regrown].tolist() == [1, 1] and int(opt.state[ours]["step"][0, 0]) == 10001


@pytest.mark.parametrize("decoupled", [True, False])
def test_where_nothing_is_masked_it_is_torchs_adamw_or_adam_bit_for_bit(decoupled):
    """float32, a decay and a no-decay group, a parameter without a gradient on some steps: the same bits as
    torch.optim.AdamW / Adam; also once every element has its own step count (all equal) on the CPU."""
    torch.manual_seed(1)
    shapes = [(6, 5), (5,), (3, 6)]
    start = [torch.randn(s) for s in shapes]
    runs = []
    for kind in ("torch", "scalar", "per_element"):
        ps = [w.clone().requires_grad_() for w in start]
        groups = [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}]
        if kind == "torch":
            cls = torch.optim.AdamW if decoupled else torch.optim.Adam
            opt = cls(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        else:
            opt = MaskedAdam(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, decoupled=decoupled)
        runs.append((kind, ps, opt))
    for t in range(10):
        grads = [torch.randn(s) for s in shapes]
        for kind, ps, opt in runs:
            for p, g in zip(ps, grads):
                p.grad = None if (p is ps[1] and t % 3 == 1) else g.clone()
            opt.step()
            if kind == "per_element" and t == 0:
                for p in ps:
                    restart_state(opt, p, torch.zeros_like(p, dtype=torch.bool))  # restarts nothing, per element now
                assert all(opt.state[p]["step"].shape == p.shape for p in ps)
    reference = runs[0][1]
    for kind, ps, _opt in runs[1:]:
        for p, q in zip(ps, reference):
            assert torch.equal(p, q), kind


def test_adamw_decays_the_kept_weights_only_and_nothing_timm_exempts():
    """The small ViT, static 2:4, one step with zero gradients and zero moments: every kept N:M weight scales by
    exactly 1 - lr * wd, pruned weights, pos_embed, cls_token, norms and biases stay as they are, the dense
    patch embedding and head decay."""
    pytest.importorskip("timm")
    cfg = load_config("fmnist_vit", ["method.name=static", "train.optimizer=adamw", "train.lr=1e-3",
                                     "train.weight_decay=0.05"])
    torch.manual_seed(0)
    exp = build(cfg, steps_per_epoch=10)
    model, opt = exp.model, exp.optimizer
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr = opt.param_groups[0]["lr"]
    opt.step()
    after = dict(model.named_parameters())
    layers = dict(exp.method.layers())
    assert layers and all(n.endswith(("qkv", "proj", "fc1", "fc2")) for n in layers)
    for name, layer in layers.items():
        w0, w = before[f"{name}.weight"], layer.weight.detach()
        assert torch.equal(w[layer.mask], w0[layer.mask] * (1 - lr * 0.05))
        assert torch.equal(w[~layer.mask], w0[~layer.mask])
    exempt = [n for n in before if n in ("pos_embed", "cls_token") or n.endswith("bias") or "norm" in n]
    assert {"pos_embed", "cls_token", "norm.weight"} <= set(exempt)
    for name in exempt:
        assert torch.equal(after[name].detach(), before[name]), name
    for name in ("patch_embed.proj.weight", "head.weight"):
        assert torch.equal(after[name].detach(), before[name] * (1 - lr * 0.05)), name


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
@pytest.mark.parametrize("case", ["static", "bame", "bame-window-train", "asp", "phased"])
def test_the_method_adds_l2_decay_to_the_gradient_under_adam_and_none_under_adamw(case, optimizer):
    """after_backward leaves grad * U (AdamW: its optimizer decays) or (grad + wd W) * U (Adam: L2, as SGD), on
    every step, before and after ASP's prune and phased's switch (step 3), on and off BAME's adaptation steps;
    SR-STE's refined decay in designated blocks stays a gradient term under both."""
    name, keys = CASES[case]
    model, method, opt, sched = setup(name, optimizer, **keys)
    for t in range(6):
        method.before_step(t)
        opt.zero_grad(set_to_none=True)
        x, y = batch(t)
        F.cross_entropy(model(x), y).backward()
        raw = {layer: layer.weight.grad.clone() for _, layer in method.layers()}
        method.after_backward(t)
        positions = method.update_positions()
        for layer, g in raw.items():
            w, u = layer.weight.detach(), positions.get(layer.weight, torch.ones_like(layer.mask))
            if name == "bame" and method.train_pruned:
                held = positions[layer.weight] & ~layer.mask
                g = g + method.pruned_decay * w * held
            if optimizer == "adam":
                g = g + WD * w
            assert torch.allclose(layer.weight.grad, g * u, rtol=0, atol=1e-15), f"{case} step {t}"
        opt.step()
        sched.step()
        method.after_optimizer_step(t)

"""``bame.step.training_step`` (the loop's step, used by ``bame.train`` and the benchmarks) against the step
order of docs/contracts.md written out by hand: bit-identical weights, masks, optimizer and method state."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bame.config import BameConfig, MethodConfig
from bame.flops import FlopsLedger
from bame.methods import MethodContext, available_methods, create_method
from bame.step import training_step

STEPS = 12


def _setup(name: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    cfg = MethodConfig(name=name, pattern="2:4", first_conv_dense=False, classifier_dense=False,
                       asp_prune_fraction=0.5, bame=BameConfig(interval_steps=3, rho=0.3, t_f_fraction=0.75))
    method = create_method(cfg, MethodContext(total_steps=STEPS, steps_per_epoch=4, weight_decay=5e-4))
    model = method.prepare(model)
    opt = torch.optim.SGD([*model.parameters(), *method.own_parameters()], lr=0.05, momentum=0.9)
    method.attach_optimizer(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / STEPS)
    return model, method, opt, sched, FlopsLedger(model)


def _batch(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 4, 6, 6, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def _by_hand(step, model, method, opt, sched, ledger, scaler, autocast, checked):
    """The contract, stage by stage."""
    x, y = _batch(step)
    method.before_step(step)
    ledger.begin_step()
    opt.zero_grad(set_to_none=True)
    with autocast():
        loss = F.cross_entropy(model(x), y)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    method.after_backward(step)
    ledger.charge_adaptation(method.mask_work_ops())
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    sched.step()
    method.after_optimizer_step(step)
    if method.last_adaptation is not None:
        checked.append(step)
    return loss.detach(), ledger.end_step()


@pytest.mark.parametrize("amp", ["off", "fp16"])
@pytest.mark.parametrize("name", available_methods())
def test_training_step_equals_the_contract_written_out(name, amp):
    """Same seeds, the two drivers side by side: every tensor of both equal after every step; the
    ``after_update`` callback runs on exactly the adaptation steps."""
    a, b = _setup(name), _setup(name)
    if amp == "fp16":  # the GradScaler path (CPU autocast)
        scalers = [torch.amp.GradScaler("cpu", init_scale=256.0) for _ in range(2)]

        def autocast():
            return torch.autocast("cpu", dtype=torch.float16)
    else:
        scalers, autocast = [None, None], contextlib.nullcontext
    checked_by_hand, checked = [], []
    for step in range(STEPS):
        loss_a, cost_a = _by_hand(step, *a, scalers[0], autocast, checked_by_hand)
        model, method, opt, sched, ledger = b
        outcome = training_step(step, model, method, opt, ledger, *_batch(step), autocast=autocast,
                                scaler=scalers[1], scheduler=sched, after_update=checked.append)
        assert torch.equal(outcome.loss, loss_a) and outcome.cost == cost_a, f"step {step}"
        assert (outcome.adaptation is None) == (step not in checked)
        for (ka, ta), (kb, tb) in zip(a[0].state_dict().items(), model.state_dict().items()):
            assert ka == kb and torch.equal(ta, tb), f"{ka} differs after step {step}"
        assert opt.param_groups[0]["lr"] == a[2].param_groups[0]["lr"]
    assert checked == checked_by_hand
    if name == "bame":
        assert checked, "BAME adapted at no step: the test would not cover the adaptation path"
    for sa, sb in zip(a[2].state_dict()["state"].values(), opt.state_dict()["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert _same(a[1].state_dict(), method.state_dict())


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b

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
from bame.optim import MaskedAdam
from bame.step import training_step

STEPS = 12


def _setup(name: str, optimizer: str = "sgd"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    cfg = MethodConfig(name=name, pattern="2:4", first_conv_dense=False, classifier_dense=False,
                       asp_prune_fraction=0.5, bame=BameConfig(interval_steps=3, rho=0.3, t_f_fraction=0.75))
    method = create_method(cfg, MethodContext(total_steps=STEPS, steps_per_epoch=4, weight_decay=5e-4,
                                              optimizer=optimizer))
    model = method.prepare(model)
    params = [*model.parameters(), *method.own_parameters()]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    else:
        opt = MaskedAdam(params, lr=1e-3, weight_decay=0.05, decoupled=True,
                         update_positions=method.update_positions)
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


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("amp", ["off", "fp16"])
@pytest.mark.parametrize("name", available_methods())
def test_training_step_equals_the_contract_written_out(name, amp, optimizer):
    """Same seeds, the two drivers side by side: every tensor of both equal after every step; the
    ``after_update`` callback runs on exactly the adaptation steps."""
    a, b = _setup(name, optimizer), _setup(name, optimizer)
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
    assert _same(a[2].state_dict(), opt.state_dict()) and opt.state_dict()["state"]
    assert _same(a[1].state_dict(), method.state_dict())


def test_clipping_sees_the_masked_unscaled_gradients():
    """BAME at an adaptation step (candidate gradients computed, then masked): the recorded norm is that of
    the gradients the optimizer would see unclipped, the optimizer sees them scaled to the limit; under the
    fp16 GradScaler (scale 256) the norm is the unscaled one."""
    plain, clipped = _setup("bame", "adamw"), _setup("bame", "adamw")
    x, y = _batch(0)
    free = training_step(0, *plain[:3], plain[4], x, y)
    assert plain[1].last_adaptation is not None and free.grad_norm is None
    masked = [p.grad.clone() for p in plain[0].parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in masked]))
    kept = [layer.mask.clone() for _, layer in clipped[1].layers()]  # the masks of the step (it swaps after)
    out = training_step(0, *clipped[:3], clipped[4], x, y, clip_grad_norm=1e-3)
    assert torch.allclose(out.grad_norm, norm, rtol=1e-6)
    for g, p in zip(masked, clipped[0].parameters()):
        assert torch.allclose(p.grad, g * 1e-3 / (norm + 1e-6), rtol=1e-5, atol=1e-12)
    for mask, (_, layer) in zip(kept, clipped[1].layers()):  # the candidates' gradients were masked before the norm
        assert not layer.weight.grad[~mask].any() and layer.weight.grad[mask].any()

    def fp16():
        return torch.autocast("cpu", dtype=torch.float16)

    norms = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=256.0)):
        model, method, opt, _, ledger = _setup("bame", "adamw")
        norms.append(training_step(0, model, method, opt, ledger, x, y, autocast=fp16, scaler=scaler,
                                   clip_grad_norm=1.0).grad_norm)
    assert torch.allclose(norms[1], norms[0], rtol=1e-2)


def test_a_step_the_fp16_scaler_skips_leaves_adam_untouched():
    """An overflowing scale: the step is skipped whole (no step count, no moments, no decay, weights as they
    were), the scale drops, and the next steps train."""
    model, method, opt, _, ledger = _setup("static", "adamw")
    # each skipped step divides the scale by 2^28: 2^100, 2^72, 2^44, 2^16 (finite from there on)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100, backoff_factor=2.0 ** -28, growth_interval=1000)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training_step(0, model, method, opt, ledger, *_batch(0), scaler=scaler,
                  autocast=lambda: torch.autocast("cpu", dtype=torch.float16))
    assert scaler.get_scale() < 2.0 ** 100 and not opt.state
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for _ in range(3):
        if scaler.get_scale() > 2.0 ** 16:
            training_step(0, model, method, opt, ledger, *_batch(0), scaler=scaler,
                          autocast=lambda: torch.autocast("cpu", dtype=torch.float16))
    assert scaler.get_scale() == 2.0 ** 16
    training_step(1, model, method, opt, ledger, *_batch(1), scaler=scaler,
                  autocast=lambda: torch.autocast("cpu", dtype=torch.float16))
    steps = [s["step"] for s in opt.state.values()]
    assert steps and all(int(s.max()) == 1 for s in steps)
    for _, layer in method.layers():
        assert torch.equal(layer.weight.detach()[~layer.mask], before[f"{_name(model, layer)}.weight"][~layer.mask])


def _name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b

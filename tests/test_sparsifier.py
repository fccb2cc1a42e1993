"""``bame.attach``: a plain loop with the step hooks equals bame's own loop bit for bit (weights, masks, FLOPs,
records), also across a checkpoint of its own; calls out of order and optimizers it cannot mask are refused;
examples/own_loop.py runs."""

from __future__ import annotations

import io
import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bame
from bame import data, models
from bame.config import ConfigError
from bame.nm import is_nm
from bame.schedule import LRFactor
from bame.seed import seed_everything

from conftest import FMNIST_STEPS

REPO = Path(__file__).resolve().parents[1]


def _model_and_optimizer(cfg):
    """LeNet-5 and SGD as a user writes them: biases without decay, everything else with it."""
    model = models.create(cfg.model.name, num_classes=10, in_channels=1, image_size=28)
    tc = cfg.train
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": tc.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, momentum=tc.momentum)
    return model, optimizer


def _attach(model, optimizer):
    sp = bame.attach(model, optimizer, "bame", "2:4", total_steps=FMNIST_STEPS, interval_steps=2, rho=0.2)
    return sp, torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor("cosine", FMNIST_STEPS))


def _train_epoch(model, optimizer, sp, scheduler, loader, first_step: int) -> None:
    for step, (x, y) in enumerate(loader, first_step):
        sp.before_step(step)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        sp.after_backward(step)
        optimizer.step()
        scheduler.step()
        sp.after_optimizer_step(step)


def test_a_plain_loop_with_attach_is_bames_own_loop_bit_for_bit(fmnist_bame_run):
    """Same seed, same batches: bame.train against a user's loop that checkpoints at the end of its first epoch
    (step 5, through torch.save / torch.load(weights_only=True)) and resumes in fresh objects."""
    cfg, ref = fmnist_bame_run
    seed_everything(cfg.train.seed)
    bundle = data.build_datasets(cfg.data)
    loader, _ = data.make_loaders(bundle, cfg.train.batch_size, cfg.train.eval_batch_size, 0, cfg.train.seed)
    model, optimizer = _model_and_optimizer(cfg)  # the global RNG as bame.train leaves it for its model
    sp, scheduler = _attach(model, optimizer)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0]  # taken over by the hooks
    _train_epoch(model, optimizer, sp, scheduler, loader, 0)
    records = {t: sp.records.rows(t) for t in ("masks", "adaptation")}
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "bame": sp.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model, optimizer = _model_and_optimizer(cfg)
    sp, scheduler = _attach(model, optimizer)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    sp.load_state_dict(ckpt["bame"])
    _train_epoch(model, optimizer, sp, scheduler, loader, 5)  # the loader's second epoch

    want, got = ref.model.state_dict(), model.state_dict()
    assert list(want) == list(got)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    flops = ref.summary["flops"]
    assert (sp.ledger.total_ideal_macs, sp.ledger.total_executed_macs) == (flops["ideal_macs"], flops["executed_macs"])
    assert {p: tuple(v) for p, v in sp.ledger.total_by_phase.items()} == {
        p: (v["ideal_macs"], v["executed_macs"]) for p, v in flops["by_phase"].items()}
    run = ref.reader()
    for table in ("masks", "adaptation"):
        rows = records[table] + sp.records.rows(table)
        assert len(rows) > 0
        pd.testing.assert_frame_equal(pd.DataFrame(rows), run.table(table), check_dtype=False)
    for _, layer in sp.method.layers():
        assert is_nm(layer.mask, 2, 4, exact=True)
    assert sp.step == FMNIST_STEPS and sp.scalars["cum_mask_flips"] > 0


def _tiny(**options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sp = bame.attach(model, optimizer, "bame", "2:4", total_steps=8, classifier_dense=False, interval_steps=1,
                     rho=0.5, **options)
    return model, optimizer, sp


def _loss(model):
    return F.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 4, (8,)))


def test_the_optimizer_keeps_training_the_swapped_layers_with_the_decay_taken_over():
    model, optimizer, sp = _tiny()
    (group,) = optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]  # the N:M layers' own
    assert group["weight_decay"] == 0.0 and sp.method.ctx.weight_decay == 1e-3
    assert [id(p) for p in sp.decay.others] == [id(model[i].bias) for i in (0, 2, 4)]
    assert [layer.weight for _, layer in sp.method.layers()] == [model[i].weight for i in (0, 2, 4)]


def _step(model, optimizer, sp, step, skip=""):
    if skip != "before_step":
        sp.before_step(step)
    _loss(model).backward()
    if skip != "after_backward":
        sp.after_backward(step)
    optimizer.step()
    if skip != "after_optimizer_step":
        sp.after_optimizer_step(step)


@pytest.mark.parametrize("skip, fix", [
    ("before_step", r"after_backward\(0\) out of order .*: call sp.before_step\(0\) before the forward pass"),
    ("after_backward", r"optimizer.step\(\) ran in step 0 before sp.after_backward\(0\)"),
    ("after_optimizer_step", r"before_step\(1\) while step 0 is open: call sp.after_optimizer_step\(0\)"),
])
def test_a_missing_hook_is_named(skip, fix):
    model, optimizer, sp = _tiny()
    with pytest.raises(RuntimeError, match=fix):
        _step(model, optimizer, sp, 0, skip)
        _step(model, optimizer, sp, 1)


def test_a_step_index_that_restarts_each_epoch_is_refused():
    model, optimizer, sp = _tiny()
    for step in range(2):
        _step(model, optimizer, sp, step)
    with pytest.raises(RuntimeError, match=r"before_step\(0\), but 2 steps are done: pass the global"):
        sp.before_step(0)


def test_work_between_steps_is_not_charged():
    model, optimizer, sp = _tiny()
    with torch.no_grad():
        model(torch.randn(100, 16))  # an evaluation before the first step
    _step(model, optimizer, sp, 0)
    _loss(model).backward()  # and work after it
    kept = sum(int(layer.mask.sum()) for _, layer in sp.method.layers())
    assert sp.last_cost.by_phase["forward"] == (8 * kept, 8 * (16 * 16 * 2 + 16 * 4))  # batch 8: ideal, executed
    sp.before_step(1)
    assert sp.ledger.end_step().ideal_macs == 0


def test_options_and_optimizers_it_cannot_mask_are_refused():
    with pytest.raises(ConfigError, match=r"method.bame.rhoo: unknown key \(did you mean 'method.bame.rho'\?\)"):
        _tiny(rhoo=0.1)
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
        bame.attach(nn.Linear(4, 4), torch.optim.SGD(nn.Linear(4, 4).parameters(), lr=0.1), total_steps=0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="AdamW decays weights outside the gradient"):
        bame.attach(model, torch.optim.AdamW(model.parameters(), weight_decay=0.05), "static", total_steps=4)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4))
    fine = bame.attach(model, torch.optim.AdamW(model.parameters(), weight_decay=0.0), "static", total_steps=4)
    assert fine.decay.weight_decay == 0.0


def test_a_state_saved_under_other_arguments_is_refused():
    _, _, sp = _tiny()
    state = sp.state_dict()
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    other = bame.attach(model, torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3), "bame", "1:4",
                        total_steps=8, classifier_dense=False, interval_steps=1, rho=0.5)
    with pytest.raises(ValueError, match=r"pattern: '2:4' -> '1:4'"):
        other.load_state_dict(state)


def test_the_own_loop_example_trains_resnet18_on_fashion_mnist(tmp_path, monkeypatch, capsys):
    if not (REPO / "data" / "FashionMNIST" / "raw").is_dir():
        pytest.skip("Fashion-MNIST is not in data/ (make data)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["own_loop.py", "--subset", "128", "--root", str(REPO / "data")])
    runpy.run_path(str(REPO / "examples" / "own_loop.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "epoch 0: loss" in out and "2 steps" in out
    ckpt = torch.load(tmp_path / "own_loop.pt", weights_only=True)
    assert ckpt["bame"]["step"] == 2 and ckpt["bame"]["method_config"]["pattern"] == "1:16"
    masks = {k: v for k, v in ckpt["model"].items() if k.endswith(".mask")}
    assert len(masks) == 19 and all(is_nm(m, 1, 16, exact=True) for m in masks.values())

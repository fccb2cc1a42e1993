"""Recorders: SAD counts, adaptation rows and block snapshots, resume, and that they never change training."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from bame.config import BameConfig, InstrumentConfig, MethodConfig
from bame.flops import FlopsLedger
from bame.instrument import ADAPTATION_COLUMNS, Recorders
from bame.layers import NMConv2d, NMLinear
from bame.methods import AdaptationRecord, LayerAdaptation, MethodContext, create_method


class MemorySink:
    """The sink interface of docs/contracts.md, in memory."""

    def __init__(self) -> None:
        self.tables: dict[str, list[dict]] = {}
        self.arrays: dict[str, dict[str, np.ndarray]] = {}

    def append(self, table: str, row: dict) -> None:
        self.tables.setdefault(table, []).append(dict(row))

    def save_arrays(self, name: str, arrays: dict) -> None:
        self.arrays[name] = {k: np.asarray(v) for k, v in arrays.items()}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(NMLinear(16, 8, pattern="2:4"), nn.ReLU(), NMLinear(8, 4, pattern="2:4"), nn.ReLU(),
                         nn.Linear(4, 3))


def _no_method():
    return SimpleNamespace(last_adaptation=None)


# --------------------------------------------------------------------------------------------------
# mask flips


def test_sad_counts_a_hand_made_mask_change():
    net, sink = _net(), MemorySink()
    rec = Recorders(InstrumentConfig(), net, _no_method(), sink)
    assert rec.on_step_end(0) == {"sad_fraction": 0.0, "cum_mask_flips": 0.0}
    assert "masks" not in sink.tables  # no change, no rows

    # swap kept/pruned in the first group of 3 rows of layer 0: 2 positions change per row
    original = net[0].mask.clone()
    new = original.clone()
    for r in range(3):
        new[r, :4] = ~new[r, :4]
    net[0].set_mask(new)
    out = rec.on_step_end(1)
    total = net[0].mask.numel() + net[2].mask.numel()
    assert out == {"sad_fraction": 12 / total, "cum_mask_flips": 12.0}
    rows = sink.tables["masks"]
    assert rows == [dict(step=1, layer="0", flips=12, flip_fraction=12 / 128),
                    dict(step=1, layer="2", flips=0, flip_fraction=0.0)]
    assert rec.on_step_end(2)["sad_fraction"] == 0.0 and len(sink.tables["masks"]) == 2  # compared to step 1

    # an A -> B -> A change counts twice
    net[0].set_mask(original)
    assert rec.on_step_end(3)["cum_mask_flips"] == 24.0
    assert sink.tables["masks"][-2]["flips"] == 12


def test_sad_also_on_in_place_edits_and_conv_layers():
    torch.manual_seed(0)
    net = nn.Sequential(NMConv2d(4, 8, 3, pattern="1:4"))
    sink = MemorySink()
    rec = Recorders(InstrumentConfig(), net, _no_method(), sink)
    with torch.no_grad():
        net[0].mask.data[0, 0, 0, 0] = ~net[0].mask[0, 0, 0, 0]  # even a write that bypasses the version counter
    assert rec.on_step_end(5)["sad_fraction"] == 1 / net[0].mask.numel()
    assert sink.tables["masks"] == [dict(step=5, layer="0", flips=1, flip_fraction=1 / net[0].mask.numel())]


def test_mask_flips_off_and_dense_models_record_nothing():
    net, sink = _net(), MemorySink()
    rec = Recorders(InstrumentConfig(mask_flips=False), net, _no_method(), sink)
    net[0].set_mask(~net[0].mask)
    assert rec.on_step_end(0) == {} and sink.tables == {}
    dense = nn.Sequential(nn.Linear(4, 4))
    assert Recorders(InstrumentConfig(), dense, _no_method(), sink).on_step_end(0) == {}


def test_state_dict_round_trip_counts_the_next_flips_right():
    net, sink = _net(), MemorySink()
    rec = Recorders(InstrumentConfig(), net, _no_method(), sink)
    net[0].set_mask(~net[0].mask)
    rec.on_step_end(0)
    buf = io.BytesIO()
    torch.save(rec.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    # a fresh process builds the model (initial masks) and the recorders before loading the checkpoint
    net2 = _net()
    rec2 = Recorders(InstrumentConfig(), net2, _no_method(), MemorySink())
    rec2.load_state_dict(state)
    net2.load_state_dict(net.state_dict())
    assert rec2.on_step_end(1) == {"sad_fraction": 0.0, "cum_mask_flips": float(rec.cum_mask_flips)}
    net2[2].set_mask(~net2[2].mask)
    assert rec2.on_step_end(2)["sad_fraction"] == net2[2].mask.numel() / (128 + 32)


# --------------------------------------------------------------------------------------------------
# adaptation rows and block snapshots


def _record(step: int, nblocks=(32, 8)) -> AdaptationRecord:
    layers = []
    for i, nb in enumerate(nblocks):
        freq = torch.linspace(0, 1, nb)
        frozen = freq >= 0.75
        score = torch.full((nb,), float("nan"))
        score[~frozen] = torch.linspace(-1e-6, 3e-7, int((~frozen).sum()))
        layers.append(LayerAdaptation(
            layer=f"layer{i}", num_blocks=nb, candidate_blocks=int((~frozen).sum()), frozen_blocks=int(frozen.sum()),
            selected_blocks=2, swaps=2, oscillation_events=1, score_stats={"mean": -3.5e-7, "max": 3e-7},
            frequency=freq, frozen=frozen, last_score=score, changes=torch.arange(nb) % 5))
    return AdaptationRecord(step=step, rho=0.05, layers=layers, scoring_elementwise_ops=100)


def test_adaptation_rows_and_snapshots_every_k():
    sink = MemorySink()
    method = SimpleNamespace(last_adaptation=None)
    rec = Recorders(InstrumentConfig(mask_flips=False, block_state_every_adaptations=2), nn.Linear(2, 2), method,
                    sink)
    for step in range(0, 60):
        method.last_adaptation = _record(step) if step % 10 == 0 else None
        rec.on_step_end(step)
        rec.on_step_end(step)  # the same record is never recorded twice
    rows = sink.tables["adaptation"]
    assert len(rows) == 6 * 2
    assert all(tuple(r) == ADAPTATION_COLUMNS for r in rows)
    r = rows[0]
    assert (r["step"], r["layer"], r["num_blocks"], r["frozen_blocks"]) == (0, "layer0", 32, 8)
    assert r["candidate_blocks"] == 24 and r["selected_blocks"] == 2 and r["oscillation_events"] == 1
    assert r["score_mean"] == -3.5e-7 and r["score_max"] == 3e-7 and r["rho"] == 0.05
    assert r["freq_mean"] == pytest.approx(0.5) and r["freq_p90"] == pytest.approx(0.9)
    assert r["frozen_fraction"] == 0.25
    # every 2nd adaptation step, the first one included
    assert sorted(sink.arrays) == ["step_00000000", "step_00000020", "step_00000040"]
    snap = sink.arrays["step_00000020"]
    assert set(snap) == {f"layer{i}.{k}" for i in (0, 1) for k in ("frequency", "frozen", "last_score", "changes")}
    assert snap["layer0.frequency"].dtype == np.float16 and snap["layer0.frozen"].dtype == np.bool_
    assert snap["layer0.changes"].dtype == np.int16 and snap["layer0.last_score"].dtype == np.float32
    np.testing.assert_array_equal(snap["layer1.changes"], np.arange(8) % 5)
    expected = _record(20).layers[0].last_score.numpy()
    np.testing.assert_array_equal(snap["layer0.last_score"], expected)  # tiny scores kept exactly
    assert np.isnan(snap["layer0.last_score"][snap["layer0.frozen"]]).all()

    state = rec.state_dict()
    rec2 = Recorders(InstrumentConfig(mask_flips=False, block_state_every_adaptations=2), nn.Linear(2, 2), method,
                     MemorySink())
    rec2.load_state_dict(state)
    rec2.on_step_end(50)  # the step-50 record was already recorded before the checkpoint
    assert rec2.sink.tables == {} and rec2.adaptations_seen == 6


def test_block_state_never_and_wide_change_counts():
    sink = MemorySink()
    record = _record(3)
    record.layers[0].changes = torch.full((32,), 40000)
    method = SimpleNamespace(last_adaptation=record)
    Recorders(InstrumentConfig(block_state_every_adaptations=1), nn.Linear(2, 2), method, sink).on_step_end(3)
    assert sink.arrays["step_00000003"]["layer0.changes"].dtype == np.int32
    sink = MemorySink()
    Recorders(InstrumentConfig(block_state_every_adaptations=0), nn.Linear(2, 2), method, sink).on_step_end(3)
    assert sink.arrays == {} and len(sink.tables["adaptation"]) == 2


# --------------------------------------------------------------------------------------------------
# recorders (and the ledger) observe only


def _train(instrumented: bool, steps: int = 12):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                          nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))
    cfg = MethodConfig(name="bame", pattern="2:4", bame=BameConfig(interval_steps=2, rho=0.3, t_f_fraction=1.0,
                                                                   tau=0.3, min_changes=1))
    method = create_method(cfg, MethodContext(total_steps=steps, steps_per_epoch=steps, weight_decay=5e-4))
    model = method.prepare(model)
    decayed = {id(p) for p in method.self_decayed_parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in decayed], "weight_decay": 5e-4},
              {"params": [p for p in model.parameters() if id(p) in decayed], "weight_decay": 0.0}]
    opt = torch.optim.SGD([g for g in groups if g["params"]], lr=0.1, momentum=0.9)
    method.attach_optimizer(opt)
    sink = MemorySink()
    ledger = FlopsLedger(model, enabled=instrumented)
    rec = Recorders(InstrumentConfig(), model, method, sink) if instrumented else None
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=gen)
        y = torch.randint(0, 5, (4,), generator=gen)
        method.before_step(step)
        ledger.begin_step()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        method.after_backward(step)
        if method.last_adaptation is not None:
            ledger.charge_adaptation(method.last_adaptation.scoring_elementwise_ops)
        opt.step()
        method.after_optimizer_step(step)
        ledger.end_step()
        if rec is not None:
            rec.on_step_end(step)
            with ledger.paused(), torch.no_grad():  # an evaluation pass in between
                model(x)
    return model, sink, ledger


def test_recorders_and_ledger_leave_training_bitwise_identical():
    on, sink, ledger = _train(True)
    off, _, _ = _train(False)
    state_on, state_off = on.state_dict(), off.state_dict()
    assert state_on.keys() == state_off.keys()
    for k in state_on:
        assert torch.equal(state_on[k], state_off[k]), k
    # the instrumented run did observe mask changes and adaptations (the test is not vacuous)
    assert sum(r["flips"] for r in sink.tables["masks"]) > 0
    assert len({r["step"] for r in sink.tables["adaptation"]}) == 6
    assert len(sink.arrays) == 6
    assert ledger.total_by_phase["adaptation"][0] > 0

"""Two CPU processes (gloo on 127.0.0.1) train BAME with DDP: ranks agree, and equal one process.

A 2-rank run with 8 images per rank and a single-process run with 16 images per step see the same
global batches (the single run uses a one-replica DistributedSampler: rank r of 2 takes every second
index of the same permutation), so their gradients agree up to the reduction order. The model,
LeNet-5 (wide: conv2, fc1 and fc2 are 2:4), has no batch norm, so nothing else differs per rank.
"""

from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler

import bame
from bame.config import load_config
from bame.distributed import MaskDisagreement, average_float_buffers, check_masks_agree, mask_fingerprint
from bame.layers import LayerPolicy, nm_layers, sparsify
from bame.runs import load_run
from bame.transposable import is_transposable_nm

QUICK = Path(__file__).resolve().parents[1] / "configs" / "quick.yaml"
WORLD = 2
PER_RANK = 8
# 128 images: 8 global batches of 16 per epoch, 16 schedule steps; BAME adapts at 0, 2, 4, 6; run 10 steps
SETS = ["train.progress=false", "model.name=lenet5_wide", "data.synthetic_train_size=128",
        "data.synthetic_test_size=40", "train.eval_batch_size=8", "train.max_steps=10", "train.log_every_steps=2",
        "method.name=bame", "method.bame.rho=0.3"]


OTHER_READINGS = {
    "window": ["method.bame.designated_grad=window", "method.bame.pruned_update=train",
               "method.bame.regrow_rule=magnitude", "method.bame.designation=progressive"],
    "phased": ["method.name=phased", "method.phased.switch_fraction=0.3"],
    # transposable masks with per-layer patterns: fc1's 1:8 tiles are searched by min-cost flow, the others'
    # 2:4 by enumeration; BAME's rectangle exchanges with the magnitude re-choice, SR-STE's refresh every step
    "transposable-bame": ["method.mask_structure=transposable", "method.bame.block_rows=8",
                          'method.layer_patterns=[{match: fc1, pattern: "1:8"}]', "method.bame.regrow_rule=magnitude"],
    "transposable-srste": ["method.name=srste", "method.mask_structure=transposable",
                           'method.layer_patterns=[{match: fc1, pattern: "1:8"}]'],
    # Bi-Mask's seeded permutation searches (at 0, 3, 6, 9) and LBC's cuts from all-reduced score gradients
    "bimask": ["method.name=bimask", "method.bimask.iter=3", "method.bimask.greedy_num=8"],
    "lbc": ["method.name=lbc"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        cfg = load_config(QUICK, SETS + [f"train.batch_size={PER_RANK}", "train.device=cpu", "train.tensorboard=true"])
        res = bame.train(cfg, out_dir=Path(tmp) / "runs", verbose=False, progress=False)
        model = res.model
        out = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "summary": res.summary,
               "test_acc": res.test_acc, "ideal": res.ideal_macs, "run_dir": res.run_dir}
        # the readings whose masks follow the weights: blocks that learn (magnitude re-choice), phased, and
        # transposable masks with mixed patterns
        for label, extra in OTHER_READINGS.items():
            other = bame.train(load_config(QUICK, SETS + [f"train.batch_size={PER_RANK}", "train.device=cpu", *extra]),
                               out_dir=Path(tmp) / label, verbose=False, progress=False)
            out[label] = {k: v.clone() for k, v in other.model.state_dict().items()}
            for name, layer in nm_layers(other.model):  # Bi-Mask's backward masks live outside the state dict
                if layer.backward_mask is not None:
                    out[label][f"{name}.backward_mask"] = layer.backward_mask.clone()
                    out[label][f"{name}.backward_order"] = layer.backward_order.clone()
        # The check option: flip one kept position of rank 1's first N:M layer -> every rank raises.
        if rank == 1:
            _, layer = next(iter(nm_layers(model)))
            with torch.no_grad():
                layer.mask.view(-1)[0] ^= True
        try:
            check_masks_agree(model, step=99)
            out["check"] = "passed"
        except MaskDisagreement as err:
            out["check"] = str(err)
        bn = torch.nn.BatchNorm1d(3)  # per-rank running statistics are averaged (and counts left alone)
        bn.running_mean.fill_(float(rank))
        out["bn"] = (average_float_buffers(bn), bn.running_mean.tolist(), int(bn.num_batches_tracked))
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _one_replica_loaders(make_loaders):
    """``make_loaders`` whose single-process training order is a one-replica DistributedSampler's."""
    def make(bundle, batch_size, eval_batch_size, num_workers, seed, distributed=False, pin_memory=False):
        train, test = make_loaders(bundle, batch_size, eval_batch_size, num_workers, seed, distributed, pin_memory)
        sampler = DistributedSampler(bundle.train, num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
        return DataLoader(bundle.train, batch_size=batch_size, sampler=sampler, drop_last=True), test
    return make


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ranks_agree_on_masks_and_weights(two_ranks):
    r0, r1 = two_ranks
    assert r0["run_dir"] is not None and r1["run_dir"] is None  # rank 0 writes, rank 1 does not
    masks = [k for k in r0["model"] if k.endswith(".mask")]
    assert len(masks) == 3  # conv2, fc1, fc2
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k  # bit for bit: same all-reduced gradients, same decisions
    assert r0["test_acc"] == r1["test_acc"] and r0["ideal"] == r1["ideal"]


@pytest.mark.parametrize("reading", sorted(OTHER_READINGS))
def test_ranks_agree_under_readings_whose_masks_follow_the_weights(two_ranks, reading):
    r0, r1 = two_ranks
    assert sum(k.endswith(".mask") for k in r0[reading]) == 3
    assert sum(k.endswith(".backward_mask") for k in r0[reading]) == (3 if reading == "bimask" else 0)
    for k, v in r0[reading].items():
        assert torch.equal(v, r1[reading][k]), (reading, k)


def test_mask_check_raises_on_every_rank(two_ranks):
    for r, res in enumerate(two_ranks):
        assert "after step 99" in res["check"] and "differ between ranks" in res["check"], (r, res["check"])


def test_batch_norm_statistics_are_averaged(two_ranks):
    for res in two_ranks:
        assert res["bn"] == (2, [0.5, 0.5, 0.5], 0)  # running_mean and running_var; the count untouched


def test_two_ranks_equal_one_process_with_the_same_global_batch(two_ranks, tmp_path, monkeypatch):
    data_mod = importlib.import_module("bame.data")
    monkeypatch.setattr(data_mod, "make_loaders", _one_replica_loaders(data_mod.make_loaders))
    cfg = load_config(QUICK, SETS + [f"train.batch_size={PER_RANK * WORLD}", "train.device=cpu"])
    single = bame.train(cfg, out_dir=tmp_path, verbose=False, progress=False)
    ddp = two_ranks[0]
    run = load_run(ddp["run_dir"])
    adapt = run.table("adaptation")
    assert sorted(set(adapt["step"])) == [0, 2, 4, 6] and adapt["swaps"].sum() > 0  # the masks did move
    state = single.model.state_dict()
    for k, v in ddp["model"].items():
        if v.dtype == torch.bool:
            assert torch.equal(v, state[k]), k  # same decisions
        else:
            torch.testing.assert_close(v, state[k], rtol=1e-4, atol=1e-5, msg=k)
    # evaluation sharded over ranks with summed counts == one process on the whole test set
    assert ddp["test_acc"] == pytest.approx(single.test_acc)
    s_ddp, s_one = ddp["summary"], single.summary
    assert s_ddp["world_size"] == 2 and s_ddp["steps"] == s_one["steps"] == 10
    assert s_ddp["final"]["test_loss"] == pytest.approx(s_one["final"]["test_loss"], rel=1e-4)
    # FLOPs: per-rank ledgers summed == one ledger over the global batch; the adaptation line (scoring,
    # replicated on every rank) counts once in ideal and on each rank in executed
    f_ddp, f_one = s_ddp["flops"], s_one["flops"]
    assert f_ddp["ranks_summed"] == 2
    adapt = f_one["by_phase"]["adaptation"]["ideal_macs"]
    assert adapt > 0 and f_ddp["by_phase"]["adaptation"] == {"ideal_macs": adapt, "executed_macs": WORLD * adapt}
    assert f_ddp["ideal_macs"] == f_one["ideal_macs"] and f_ddp["dense_macs"] == f_one["dense_macs"]
    assert f_ddp["executed_macs"] == f_one["executed_macs"] + (WORLD - 1) * adapt
    for phase in ("forward", "input_grad", "weight_grad"):
        assert f_ddp["by_phase"][phase] == f_one["by_phase"][phase], phase
    t_ddp, t_one = run.table("flops"), load_run(single.run_dir).table("flops")
    conv = t_one["phase"] != "adaptation"
    assert t_ddp["ideal_macs"].equals(t_one["ideal_macs"])
    assert t_ddp["executed_macs"][conv].equals(t_one["executed_macs"][conv])
    m_ddp = run.table("metrics").query("split == 'train'")
    m_one = load_run(single.run_dir).table("metrics").query("split == 'train'")
    assert m_ddp["cum_ideal_macs"].tolist() == m_one["cum_ideal_macs"].tolist()


def test_fingerprint_sees_a_swap_inside_a_group():
    net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(16, 4))
    sparsify(net, "2:4", policy=LayerPolicy(first_conv_dense=False, classifier_dense=False))
    _, before = mask_fingerprint(net)
    layer = net[1]
    with torch.no_grad():
        row = layer.mask[0, :4].clone()
        layer.mask[0, :4] = row.roll(1)  # same count, other positions
    _, after = mask_fingerprint(net)
    assert before[1, 0] == after[1, 0] and before[1, 1] != after[1, 1] and torch.equal(before[0], after[0])


@pytest.mark.parametrize("reading", ["transposable-bame", "transposable-srste"])
def test_transposable_masks_with_mixed_patterns_agree_and_hold(two_ranks, reading):
    state = two_ranks[0][reading]
    patterns = {"conv2": (2, 4), "fc1": (1, 8), "fc2": (2, 4)}
    for name, (n, m) in patterns.items():
        mask = state[f"{name}.mask"]
        assert is_transposable_nm(mask, n, m, exact=True), (reading, name)
        assert mask.float().mean() == n / m, (reading, name)


def test_rank_0_alone_writes_tensorboard_events_of_the_summed_flops(two_ranks):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = load_run(two_ranks[0]["run_dir"])
    (events,) = (run.path / "tensorboard").iterdir()  # one writer: rank 1 would have opened a second file
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    train = run.table("metrics").query("split == 'train'")
    got = [(e.step, e.value) for e in acc.Scalars("flops_ideal/total")]
    assert got == [(s, pytest.approx(2 * m)) for s, m in zip(train["step"], train["cum_ideal_macs"])]
    adapt = two_ranks[0]["summary"]["flops"]["by_phase"]["adaptation"]["ideal_macs"]
    assert acc.Scalars("flops_ideal/adaptation")[-1].value == pytest.approx(2 * adapt)  # once over the ranks

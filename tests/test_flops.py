"""The FLOPs ledger against closed forms, torch's FlopCounterMode and fvcore; sparse counts; the CLI."""

from __future__ import annotations

import argparse
import csv
import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import bame
from bame import models
from bame.autograd import Backward, WeightGradKernel
from bame.config import load_config
from bame.flops import ADAPTATION, ADAPTATION_LAYER, CONVENTION, FlopsLedger, conv2d_macs, linear_macs, model_step_costs
from bame.flops_report import add_flops_parser
from bame.layers import LayerPolicy, NMConv2d, NMLayer, NMLinear, sparsify
from bame.step import training_step

PHASES = ("forward", "input_grad", "weight_grad")

# (model, image size, batch): torchvision's ResNet-50 at its natural 224, batch 1 to stay fast on a CPU
DENSE_CASES = [("resnet20", 32, 2), ("resnet32", 32, 2), ("mobilenet_v2", 32, 2), ("resnet50", 224, 1)]


def _step(model: nn.Module, x: torch.Tensor, ledger: FlopsLedger):
    ledger.begin_step()
    model(x).sum().backward()
    return ledger.end_step()


def _convs_and_linears(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _flop_counter_divides_grouped_wgrad_by_groups() -> bool:
    """torch's FlopCounterMode (<= 2.14 at least) counts a grouped conv's weight gradient as if the conv
    were dense (``groups`` x too much; fixed upstream by pytorch/pytorch#183405). Probe which one we have."""
    conv = nn.Conv2d(4, 4, 1, groups=4, bias=False)
    x = torch.randn(1, 4, 1, 1)
    with FlopCounterMode(display=False) as fc:
        conv(x).sum().backward()
    fwd = 2 * conv.weight.numel()  # forward = weight grad = 4 MACs; no input grad
    return fc.get_total_flops() == 2 * fwd


# --------------------------------------------------------------------------------------------------
# dense models: ledger == FlopCounterMode (forward + backward) and == fvcore (forward)


@pytest.mark.parametrize("name,size,batch", DENSE_CASES)
def test_dense_model_matches_flop_counter_mode_and_fvcore(name, size, batch):
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, in_channels=3).eval()  # eval: BN stats fixed; counts equal
    x = torch.randn(batch, 3, size, size)
    ledger = FlopsLedger(model)
    with FlopCounterMode(display=False) as fc:
        cost = _step(model, x, ledger)
    ledger.detach()

    # FlopCounterMode counts FLOPs = 2 x MACs of mm/addmm/conv ops, and the first conv's input gradient
    # only when the images require grad (they do not here, and the ledger charges none either).
    layers = _convs_and_linears(model)
    first = layers[0][0]
    assert (first, "input_grad") not in cost.by_layer
    overcount = 0  # FlopCounterMode's grouped-conv weight-gradient bug, made explicit
    if not _flop_counter_divides_grouped_wgrad_by_groups():
        overcount = sum((m.groups - 1) * cost.by_layer[(n, "weight_grad")][0]
                        for n, m in layers if isinstance(m, nn.Conv2d) and m.groups > 1)
    assert 2 * (cost.ideal_macs + overcount) == fc.get_total_flops()
    assert cost.ideal_macs == cost.executed_macs

    # every layer: weight grad == forward; input grad == forward except the first layer
    for n, _ in layers:
        fwd = cost.by_layer[(n, "forward")][0]
        assert cost.by_layer[(n, "weight_grad")][0] == fwd
        if n != first:
            assert cost.by_layer[(n, "input_grad")][0] == fwd
    assert cost.by_phase["forward"][0] == cost.by_phase["weight_grad"][0]
    assert cost.by_phase["input_grad"][0] == cost.by_phase["forward"][0] - cost.by_layer[(first, "forward")][0]

    # fvcore counts one "flop" per MAC; conv + linear only
    from fvcore.nn import FlopCountAnalysis

    fa = FlopCountAnalysis(model, x[:1]).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    ops = fa.by_operator()
    fv = sum(v for k, v in ops.items() if k in ("conv", "linear", "addmm", "matmul", "mm"))
    assert cost.by_phase["forward"][0] == fv * batch


def test_first_layer_input_grad_counted_when_images_require_grad():
    torch.manual_seed(0)
    model = models.create("resnet20", num_classes=10, in_channels=3).eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    ledger = FlopsLedger(model)
    with FlopCounterMode(display=False) as fc:
        cost = _step(model, x, ledger)
    first = _convs_and_linears(model)[0][0]
    assert cost.by_layer[(first, "input_grad")][0] == cost.by_layer[(first, "forward")][0]
    assert cost.by_phase["input_grad"][0] == cost.by_phase["forward"][0]
    assert 2 * cost.ideal_macs == fc.get_total_flops()


def test_closed_forms_and_grouped_convs():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=1),  # plain
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),  # depthwise
        nn.Conv2d(8, 12, (3, 1), stride=(1, 2), padding=(1, 0), groups=2),  # grouped
    )
    x = torch.randn(3, 4, 11, 9)
    ledger = FlopsLedger(net)
    cost = _step(net, x, ledger)
    shapes = [(3, 4, 11, 9)]
    expected = []
    h = x
    for conv in net:
        expected.append(conv2d_macs(tuple(h.shape), tuple(conv.weight.shape), conv.stride, conv.padding,
                                    conv.dilation, conv.groups))
        h = conv(h)
        shapes.append(tuple(h.shape))
    for i, e in enumerate(expected):
        assert cost.by_layer[(str(i), "forward")][0] == e
        assert cost.by_layer[(str(i), "weight_grad")][0] == e
    assert ("0", "input_grad") not in cost.by_layer
    assert cost.by_layer[("1", "input_grad")][0] == expected[1]
    # depthwise: one weight per output channel per kernel tap
    assert expected[1] == 8 * 9 * 3 * shapes[2][2] * shapes[2][3]

    lin = nn.Linear(6, 4)
    xl = torch.randn(2, 5, 6, requires_grad=True)
    ledger = FlopsLedger(lin)
    cost = _step(lin, xl, ledger)
    assert cost.by_phase["forward"][0] == linear_macs((2, 5, 6), (4, 6)) == 4 * 6 * 10
    assert cost.by_phase["input_grad"][0] == cost.by_phase["weight_grad"][0] == 240


def test_conv2d_macs_validates_channels():
    with pytest.raises(ValueError, match="input channels"):
        conv2d_macs((1, 4, 8, 8), (8, 3, 3, 3))


# --------------------------------------------------------------------------------------------------
# sparse models


def _sparse_resnet20(pattern="2:4", mode=Backward.SPARSE, kernel=WeightGradKernel.MASKED_DENSE, **policy):
    torch.manual_seed(0)
    model = models.create("resnet20", num_classes=10, in_channels=3).eval()
    dense = models.create("resnet20", num_classes=10, in_channels=3).eval()
    dense.load_state_dict(model.state_dict())
    sparsify(model, pattern, policy=LayerPolicy(**policy), backward_mode=mode, weight_grad_kernel=kernel)
    return model, dense


def _dense_forward(dense: nn.Module, x: torch.Tensor) -> dict[str, int]:
    ledger = FlopsLedger(dense)
    cost = _step(dense, x, ledger)
    return {n: cost.by_layer[(n, "forward")][0] for n, _ in _convs_and_linears(dense)}


@pytest.mark.parametrize("pattern", ["2:4", "1:16"])
def test_sparse_forward_is_n_over_m_of_dense(pattern):
    n, m = map(int, pattern.split(":"))
    model, dense = _sparse_resnet20(pattern)
    x = torch.randn(2, 3, 32, 32)
    dense_fwd = _dense_forward(dense, x)
    cost = _step(model, x, FlopsLedger(model))
    nm = dict((name, layer) for name, layer in model.named_modules() if isinstance(layer, NMLayer))
    assert len(nm) == len(dense_fwd) - 2  # every conv/linear but the stem and the classifier
    for name, d in dense_fwd.items():
        ideal, executed, flag = cost.by_layer[(name, "forward")]
        assert executed == d  # masked dense kernel: dense work
        if name in nm:
            assert ideal * m == d * n
            assert ideal == int(nm[name].mask.sum()) * d // nm[name].weight.numel()
            assert flag is True
            assert cost.by_layer[(name, "input_grad")][0] == ideal
            assert cost.by_layer[(name, "weight_grad")][:2] == (ideal, d)  # P = m; masked dense kernel
        else:
            assert ideal == d and flag is False


@pytest.mark.parametrize("kernel", list(WeightGradKernel))
def test_sparse_weight_grad_counts_mask_or_grad_mask(kernel):
    model, dense = _sparse_resnet20("2:4", kernel=kernel)
    x = torch.randn(2, 3, 32, 32)
    dense_fwd = _dense_forward(dense, x)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in model.named_modules():
            if isinstance(layer, NMLayer):
                layer.grad_mask.copy_(torch.rand(layer.weight.shape, generator=gen) < 0.2)
    cost = _step(model, x, FlopsLedger(model))
    for name, layer in model.named_modules():
        if not isinstance(layer, NMLayer):
            continue
        positions = dense_fwd[name] // layer.weight.numel()
        ideal, executed, flag = cost.by_layer[(name, "weight_grad")]
        assert ideal == int((layer.mask | layer.grad_mask).sum()) * positions
        if kernel is WeightGradKernel.AUTO:  # whichever kernel the one-time timing chose for this shape
            assert executed in (ideal, dense_fwd[name])
        else:
            assert executed == (ideal if kernel is WeightGradKernel.GATHER else dense_fwd[name])
        assert flag is False


@pytest.mark.parametrize("mode", [Backward.DENSE, Backward.STE, Backward.SRSTE])
def test_dense_weight_grad_modes_count_dense_work(mode):
    model, dense = _sparse_resnet20("2:4", mode=mode)
    x = torch.randn(2, 3, 32, 32)
    dense_fwd = _dense_forward(dense, x)
    cost = _step(model, x, FlopsLedger(model))
    for name, d in dense_fwd.items():
        assert cost.by_layer[(name, "weight_grad")] == (d, d, False)


def test_first_layer_input_grad_is_never_charged_even_when_sparse():
    torch.manual_seed(0)
    model = nn.Sequential(NMConv2d(4, 8, 3, pattern="2:4"), nn.ReLU(), NMConv2d(8, 8, 3, pattern="2:4"))
    first = "0"
    cost = _step(model, torch.randn(2, 4, 8, 8), FlopsLedger(model))
    assert cost.by_layer[("2", "input_grad")][0] > 0
    assert (first, "forward") in cost.by_layer and (first, "weight_grad") in cost.by_layer
    assert (first, "input_grad") not in cost.by_layer


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
                         NMConv2d(8, 8, 3, padding=1, pattern="2:4"), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                         nn.Linear(8, 4))


def test_paused_charges_nothing():
    model = _tiny()  # plain convs, an N:M conv and a linear
    x = torch.randn(2, 3, 8, 8)
    ledger = FlopsLedger(model)
    with ledger.paused():
        with torch.no_grad():
            model(x)
        out = model(x)  # a forward under paused with grad: its backward is not charged either
    out.sum().backward()
    with ledger.paused(), ledger.paused():  # nested pauses
        model(x).sum().backward()
    cost = ledger.end_step()
    assert cost.ideal_macs == cost.executed_macs == 0 and cost.by_layer == {}
    assert ledger.total_ideal_macs == 0
    assert all(layer.observer is not None for layer in model.modules() if isinstance(layer, NMLayer))
    cost = _step(model, x, ledger)
    assert cost.ideal_macs > 0


def _transposable_2_4(cout: int, k: int) -> torch.Tensor:
    """A 2:4 mask that is 2:4 along rows and along columns: keep (i + j) % 4 in {0, 1}."""
    i = torch.arange(cout).unsqueeze(1)
    j = torch.arange(k).unsqueeze(0)
    return ((i + j) % 4) < 2


def test_nm_on_reduction_flags():
    torch.manual_seed(0)
    net = nn.Sequential(NMLinear(16, 8, pattern="2:4"), nn.ReLU(), NMLinear(8, 6, pattern="2:4"), nn.ReLU(),
                        nn.Linear(6, 3))
    x = torch.randn(4, 16, requires_grad=True)
    ledger = FlopsLedger(net)
    cost = _step(net, x, ledger)
    assert cost.by_layer[("0", "forward")][2] is True
    assert cost.by_layer[("0", "weight_grad")][2] is False
    assert cost.by_layer[("2", "input_grad")][2] is False  # Cout = 6 is not a multiple of M = 4
    assert all(cost.by_layer[("4", ph)][2] is False for ph in PHASES)  # dense layer
    # a magnitude mask of random weights is (almost surely) not transposable; a constructed one is
    assert cost.by_layer[("0", "input_grad")][2] is False
    net[0].set_mask(_transposable_2_4(8, 16))
    cost = _step(net, x, ledger)  # the cache sees the new mask version
    assert cost.by_layer[("0", "input_grad")][2] is True
    assert cost.by_layer[("0", "forward")][2] is True
    # a mask that breaks N:M along K (all ones) is recorded honestly
    with torch.no_grad():
        net[0].mask.fill_(True)
    cost = _step(net, x, ledger)
    assert cost.by_layer[("0", "forward")][2] is False and cost.by_layer[("0", "input_grad")][2] is False
    # epoch rows: the flag holds only if it held for every call in the epoch
    rows = {(r["layer"], r["phase"]): r for r in ledger.epoch_rows(0, 3)}
    assert rows[("0", "forward")]["nm_on_reduction"] is False


def test_input_grad_flag_of_a_backward_mask_follows_its_channel_order():
    """A layer with a backward mask of its own (Bi-Mask's) is flagged N:M along Cout in its backward order."""
    from bame.bimask_core import backward_mask

    torch.manual_seed(0)
    net = nn.Sequential(NMLinear(16, 8, pattern="2:4"), nn.ReLU(), nn.Linear(8, 3))
    layer = net[0]
    x = torch.randn(4, 16, requires_grad=True)
    ledger = FlopsLedger(net)
    perm = torch.randperm(8)
    mb = backward_mask(layer.weight, layer.mask, perm, 2, 4)  # N:M along Cout taken in the order perm
    layer.set_backward_mask(mb, perm)
    cost = _step(net, x, ledger)
    ideal, executed, flag = cost.by_layer[("0", "input_grad")]
    assert flag is True and ideal == int(mb.sum()) * 4 < int(layer.mask.sum()) * 4 and executed == 8 * 16 * 4
    assert cost.by_layer[("0", "forward")][:1] == (int(layer.mask.sum()) * 4,)
    wrong = perm.roll(1)  # the same mask read in another order is (here) not N:M along Cout
    assert not bool((mb[wrong].reshape(2, 4, 16).sum(1) <= 2).all())
    layer.set_backward_mask(mb, wrong)
    assert _step(net, x, ledger).by_layer[("0", "input_grad")][2] is False


def test_nm_grouped_conv_counts():
    torch.manual_seed(0)
    conv = NMConv2d(8, 8, 3, padding=1, groups=2, pattern="2:4")  # K = 4*9 = 36
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    cost = _step(conv, x, FlopsLedger(conv))
    dense = conv2d_macs((2, 8, 6, 6), tuple(conv.weight.shape), 1, 1, 1, 2)
    assert cost.by_layer[("", "forward")][:2] == (dense // 2, dense)
    assert cost.by_layer[("", "input_grad")][:2] == (dense // 2, dense)
    assert cost.by_layer[("", "weight_grad")][:2] == (dense // 2, dense)


# --------------------------------------------------------------------------------------------------
# ledger bookkeeping


def test_epoch_rows_totals_adaptation_and_state_dict_round_trip():
    net = _tiny()
    x = torch.randn(2, 3, 8, 8)
    ledger = FlopsLedger(net)
    c1 = _step(net, x, ledger)
    ledger.begin_step()
    net(x).sum().backward()
    ledger.charge_adaptation(1234)
    c2 = ledger.end_step()
    assert c2.by_phase[ADAPTATION] == (1234, 1234)
    assert c2.ideal_macs == c1.ideal_macs + 1234
    assert ledger.total_ideal_macs == c1.ideal_macs + c2.ideal_macs
    assert ledger.total_executed_macs == c1.executed_macs + c2.executed_macs

    state = ledger.state_dict()
    assert state["convention"] == CONVENTION
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    net2 = _tiny()
    resumed = FlopsLedger(net2)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert json.loads(json.dumps(state)) == state  # plain types only

    rows = ledger.epoch_rows(0, 2)
    assert rows == resumed.epoch_rows(0, 2)
    assert [r["layer"] for r in rows] == ["0", "0", "2", "2", "2", "5", "5", "5", ADAPTATION_LAYER]
    assert [r["phase"] for r in rows[:2]] == ["forward", "weight_grad"]  # first conv: no input grad
    by = {(r["layer"], r["phase"]): r for r in rows}
    assert by[("2", "forward")]["ideal_macs"] == 2 * c1.by_layer[("2", "forward")][0]
    assert by[(ADAPTATION_LAYER, ADAPTATION)]["ideal_macs"] == 1234
    assert sum(r["ideal_macs"] for r in rows) == ledger.total_ideal_macs
    assert set(rows[0]) == {"epoch", "step", "layer", "phase", "ideal_macs", "executed_macs", "nm_on_reduction"}
    assert ledger.epoch_rows(1, 2) == []
    assert (resumed.total_ideal_macs, resumed.total_executed_macs, resumed.steps) == (
        ledger.total_ideal_macs, ledger.total_executed_macs, 2)

    # the resumed ledger continues exactly like the original
    c3 = _step(net, x, ledger)
    c3b = _step(net2, x, resumed)
    assert c3.ideal_macs == c3b.ideal_macs
    assert resumed.total_ideal_macs == ledger.total_ideal_macs


def test_disabled_detach_and_layers_swapped_in_later():
    net = _tiny()
    x = torch.randn(2, 3, 8, 8)
    off = FlopsLedger(net, enabled=False)
    cost = _step(net, x, off)
    assert cost.ideal_macs == 0 and off.total_ideal_macs == 0 and off.epoch_rows(0, 1) == []
    assert net[2].observer is None and not net[0]._forward_hooks

    ledger = FlopsLedger(net)
    assert net[2].observer is not None and len(net[0]._forward_hooks) == 1
    ledger.detach()
    assert net[2].observer is None and not net[0]._forward_hooks
    assert _step(net, x, ledger).ideal_macs == 0

    ledger = FlopsLedger(net)
    before = _step(net, x, ledger)
    sparsify(net, "2:4", policy=LayerPolicy(first_conv_dense=False, classifier_dense=False))
    after = _step(net, x, ledger)  # begin_step re-attached to the swapped layers
    assert isinstance(net[5], NMLayer) and net[5].observer is not None
    assert not isinstance(net[0], NMLayer)  # K = 27 is not a multiple of 4: stays dense
    assert after.by_layer[("5", "forward")][0] * 2 == before.by_layer[("5", "forward")][0]
    assert after.by_layer[("0", "forward")] == before.by_layer[("0", "forward")]


def test_model_step_costs_adaptation_step_and_dense_reference():
    model, dense = _sparse_resnet20("2:4")
    dense_costs = model_step_costs(dense, (2, 3, 32, 32))
    costs = model_step_costs(model, (2, 3, 32, 32))
    assert dense_costs.step.by_phase == dense_costs.adapt.by_phase  # no N:M layer: nothing to adapt
    d = dense_costs.step
    first = _convs_and_linears(dense)[0][0]
    assert d.ideal_macs == 3 * d.by_phase["forward"][0] - d.by_layer[(first, "forward")][0]
    # adaptation step: every candidate block -> the weight gradient is dense everywhere
    assert costs.adapt.by_phase["weight_grad"][0] == d.by_phase["weight_grad"][0]
    assert costs.adapt.by_phase["forward"] == costs.step.by_phase["forward"]
    assert costs.step.by_phase["weight_grad"][0] < d.by_phase["weight_grad"][0]
    # grad masks and gradients restored
    assert all(not layer.grad_mask.any() for layer in model.modules() if isinstance(layer, NMLayer))
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# schedule helper and the CLI


def _run_cli(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="bame")
    add_flops_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    out = io.StringIO()
    with redirect_stdout(out):
        assert args.func(args) == 0
    return out.getvalue()


def _config(tmp_path, method: str) -> str:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: synthetic, synthetic_image_size: 16, synthetic_train_size: 1003}\n"
                   "model: {name: resnet20}\n"
                   f"method: {{name: {method}, pattern: '2:4', asp_prune_fraction: 0.25, "
                   "bame: {interval_steps: 10}}\n"
                   "train: {epochs: 2, batch_size: 100}\n")
    return str(cfg)


def test_cli_flops_json_and_table(tmp_path):
    cfg = _config(tmp_path, "bame")
    rep = json.loads(_run_cli(["flops", "--config", cfg, "--set", "train.batch_size=5",
                               "method.bame.rho_decay=constant", "--json"]))
    assert rep["convention"] == CONVENTION
    assert rep["measured_batch"] == 2 and rep["input_shape"] == [5, 3, 16, 16]
    # drop_last: 1003 // 5 = 200 steps per epoch; adaptation at 0, 10, ..., 190 (t_f = 200)
    assert (rep["steps_per_epoch"], rep["run_steps"], rep["adaptation_steps"]) == (200, 400, 20)
    assert rep["dense_step_macs"] > rep["adapt_step_macs"] > rep["step_macs"] > 0
    # constant rho: every layer has candidates on every adaptation step
    assert rep["run_total_macs"] == 380 * rep["step_macs"] + 20 * rep["adapt_step_macs"]
    assert rep["run_total_executed_macs"] == 400 * rep["step_executed_macs"]  # masked dense kernels
    assert rep["dense_run_total_macs"] == 400 * rep["dense_step_macs"]
    # the pass at batch 2 scaled to batch 5 equals a direct measurement at batch 5
    dense5 = model_step_costs(models.create("resnet20", 10, 3), (5, 3, 16, 16))
    assert rep["dense_step_macs"] == dense5.step.ideal_macs
    layer = next(e for e in rep["layers"] if e["sparse"])
    assert set(layer["step"]) == set(PHASES) and layer["step"]["forward"]["nm_on_reduction"] is True
    assert layer["adapt"]["weight_grad"]["ideal"] == layer["dense"]["weight_grad"]["ideal"]
    assert sum(sum(ph["ideal"] for ph in e["step"].values()) for e in rep["layers"]) == rep["step_macs"]

    # cosine rho: late adaptation steps leave small layers without candidates
    cos = json.loads(_run_cli(["flops", "--config", cfg, "--set", "train.batch_size=5", "--json"]))
    assert 400 * cos["step_macs"] < cos["run_total_macs"] < 380 * cos["step_macs"] + 20 * cos["adapt_step_macs"]

    table = _run_cli(["flops", "--config", cfg])
    assert CONVENTION in table and "scaled linearly" in table and "layer1.0.conv1" in table


@pytest.mark.parametrize("method", ["dense", "static", "ste", "srste", "asp"])
def test_cli_flops_other_methods(tmp_path, method):
    rep = json.loads(_run_cli(["flops", "--config", _config(tmp_path, method), "--json"]))
    dense, step = rep["dense_step_macs"], rep["step_macs"]
    assert rep["adaptation_steps"] == 0 and rep["adapt_step_macs"] == step or method == "asp"
    if method == "dense":
        assert step == dense
    elif method == "static":
        assert step < dense and rep["run_total_macs"] == rep["run_steps"] * step
    elif method in ("ste", "srste"):  # 2 f_S + f_D on the N:M layers
        assert step_phase(rep, "weight_grad") == rep["dense_step_by_phase"]["weight_grad"]
        assert step_phase(rep, "forward") < rep["dense_step_by_phase"]["forward"]
    else:  # asp: dense until the prune step (a quarter of 2 x 10 steps = step 5), sparse after
        assert (rep["run_steps"], rep["prune_step"]) == (20, 5)
        assert rep["before_prune_step_macs"] == dense
        assert rep["run_total_macs"] == 5 * dense + 15 * step and step < dense


def step_phase(rep: dict, phase: str) -> int:
    return rep["step_by_phase"][phase]


_HOST_READS = ("__int__", "__bool__", "__float__", "item", "tolist")


@pytest.mark.parametrize("method_name", ["static", "bame", "srste"])
def test_ledger_reads_nothing_from_the_device_in_the_steady_state(monkeypatch, method_name):
    """Counts are cached per mask version (static, bame outside adaptation: no host read at all); a mask
    that changes every step (srste) costs one read for the whole step, at end_step."""
    from bame.config import BameConfig, MethodConfig
    from bame.methods import MethodContext, create_method

    torch.manual_seed(0)
    cfg = MethodConfig(name=method_name, pattern="2:4", bame=BameConfig(interval_steps=4))
    method = create_method(cfg, MethodContext(total_steps=100, steps_per_epoch=10, weight_decay=5e-4))
    model = method.prepare(models.create("resnet20", num_classes=10, in_channels=3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    method.attach_optimizer(opt)
    ledger = FlopsLedger(model)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    reads = []

    def step(t):
        return training_step(t, model, method, opt, ledger, x, y).cost

    for t in range(3):  # step 0 adapts (bame); steps 1 and 2 see its new masks once, then nothing new
        step(t)
    for name in _HOST_READS:
        fn = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _fn=fn, _n=name, **k: reads.append(_n) or _fn(self, *a, **k))
    cost = step(3)
    monkeypatch.undo()
    assert len(reads) == (1 if method_name == "srste" else 0), reads
    for name, layer in model.named_modules():  # and the counts are those of the current masks
        if isinstance(layer, NMLayer):
            ideal, executed, _ = cost.by_layer[(name, "forward")]
            assert ideal == int(layer.mask.sum()) * (executed // layer.weight.numel())


# --------------------------------------------------------------------------------------------------
# the prediction against real runs


QUICK = Path(__file__).resolve().parents[1] / "configs" / "quick.yaml"
# as tests/test_train.py: 128 synthetic images in batches of 16 = 8 steps per epoch, 2 epochs = 16 steps;
# BAME adapts at steps 0, 2, 4, 6 (interval 2, t_f = half the schedule); ASP prunes at step 8
_SMALL = ["train.progress=false", "data.synthetic_train_size=128", "data.synthetic_test_size=32",
          "train.batch_size=16", "train.eval_batch_size=32"]
# BAME made to freeze blocks: every step adapts half the blocks and a block freezes on its first oscillation
_FREEZING = ["method.bame.interval_steps=1", "method.bame.rho=0.5", "method.bame.rho_decay=constant",
             "method.bame.tau=0.01", "method.bame.min_changes=1"]


def _recorded_conv_linear_macs(run_dir: Path) -> tuple[int, int]:
    """(ideal, executed) conv/linear MACs of a finished run: summary.json's by-phase totals without the
    adaptation line (the element-wise scoring and selection ``bame flops`` does not predict), checked
    against the same sums over flops.csv and against the summary's all-phase totals."""
    flops = json.loads((run_dir / "summary.json").read_text())["flops"]
    by_phase = flops["by_phase"]
    ideal = sum(by_phase[ph]["ideal_macs"] for ph in PHASES)
    executed = sum(by_phase[ph]["executed_macs"] for ph in PHASES)
    adapt = by_phase.get(ADAPTATION, {"ideal_macs": 0, "executed_macs": 0})
    assert (flops["ideal_macs"], flops["executed_macs"]) == (ideal + adapt["ideal_macs"],
                                                             executed + adapt["executed_macs"])
    with (run_dir / "flops.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["phase"] != ADAPTATION]
    assert {r["phase"] for r in rows} <= set(PHASES)
    assert (sum(int(r["ideal_macs"]) for r in rows), sum(int(r["executed_macs"]) for r in rows)) == (ideal, executed)
    return ideal, executed


_WINDOW = ["method.bame.designated_grad=window", "method.bame.pruned_update=train"]
_PROGRESSIVE = _WINDOW + ["method.bame.designation=progressive", "method.bame.regrow_rule=magnitude",
                          "method.bame.obf=false"]


@pytest.mark.parametrize("method,extra", [("dense", []), ("static", []), ("ste", []), ("srste", []),
                                          ("asp", []), ("bame", []), ("bame", _FREEZING),
                                          ("bame", ["method.bame.score_steps=2"]),
                                          ("phased", ["method.phased.switch_fraction=0.3"]),
                                          ("bame", _PROGRESSIVE), ("bame", _WINDOW)],
                         ids=["dense", "static", "ste", "srste", "asp", "bame", "bame-freezing", "bame-score-steps",
                              "phased", "bame-progressive", "bame-window-topk"])
def test_cli_flops_run_total_matches_a_real_run(tmp_path, method, extra):
    """``bame flops --json``'s ``run_total_macs`` against the total a real ``bame.train`` run of the same
    config records (conv/linear phases; the adaptation line is booked only by runs).

    Exact for methods whose per-step work does not depend on training (dense, static, ste, srste; asp
    with its dense steps before the prune step): every step of the run costs what the one measured step
    costs. For BAME the prediction assumes every adaptation step computes the candidate gradient of every
    block (nothing frozen), so it is an upper bound, and exact while no block freezes and every layer's
    budget is non-zero: that is quick.yaml (4 adaptation steps early in the window, rho 0.2 of thousands
    of blocks, freezing needs two changes of a block). With freezing forced (``_FREEZING``) the run
    computes fewer candidate gradients and the bound is strict. With ``score_steps=2`` the step before each
    adaptation step computes the candidate gradient too, and the prediction counts it. ``phased`` costs SR-STE's
    step before its switch and the static step after it (exact). Blocks that learn: ``progressive`` without
    OBF designates every block from step 1 to t_f (exact); ``topk`` designates at most the rho budget (a bound). Executed MACs (masked dense kernels) are
    those of the predicted executed total for every method."""
    sets = _SMALL + [f"method.name={method}"] + extra
    rep = json.loads(_run_cli(["flops", "--config", str(QUICK), "--set", *sets, "--json"]))
    res = bame.train(load_config(QUICK, sets), out_dir=tmp_path, verbose=False)
    assert res.status == "completed" and res.steps == rep["run_steps"] == 16
    ideal, executed = _recorded_conv_linear_macs(res.run_dir)
    assert executed == rep["run_total_executed_macs"]
    assert ideal <= rep["run_total_macs"]
    if method in ("asp", "phased"):
        assert 0 < rep["prune_step"] < rep["run_steps"]  # both regimes of the prediction are used
    if extra == _WINDOW:  # topk designates only blocks with a gain: the prediction is an upper bound
        adaptation = list(csv.DictReader((res.run_dir / "adaptation.csv").open()))
        assert sum(int(r["designated_blocks"]) for r in adaptation) > 0
        assert ideal <= rep["run_total_macs"]
        return
    if method == "bame":
        adaptation = list(csv.DictReader((res.run_dir / "adaptation.csv").open()))
        frozen = sum(int(r["frozen_blocks"]) for r in adaptation)
        assert rep["adaptation_steps"] == len({r["step"] for r in adaptation}) > 0
        if extra == _FREEZING:
            assert frozen > 0 and ideal < rep["run_total_macs"]
            return
        assert frozen == 0
    assert ideal == rep["run_total_macs"]
    assert rep["dense_run_total_macs"] == json.loads((res.run_dir / "summary.json").read_text())["flops"]["dense_macs"]


def test_cli_target_ratio_solves_each_budget(tmp_path):
    """``bame flops --target-ratio R`` prints the budget whose whole-run total puts SR-STE / method at R (as
    near as the budget's steps allow), and the plain report at that budget agrees."""
    def total(*sets):
        return json.loads(_run_cli(["flops", "--config", str(QUICK), "--set", *_SMALL, *sets, "--json"]))["run_total_macs"]

    srste = total("method.name=srste")
    target = (1 + srste / total("method.name=static")) / 2  # halfway between SR-STE and the static mask
    for sets in (["method.name=phased"], ["method.name=bame", *_WINDOW, "method.bame.rho_decay=constant"],
                 ["method.name=bame", *_PROGRESSIVE]):
        out = json.loads(_run_cli(["flops", "--config", str(QUICK), "--set", *_SMALL, *sets,
                                   "--target-ratio", str(target), "--json"]))
        assert out["srste_macs"] == srste
        at = total(*sets, f"{out['key']}={out['value']}")
        assert at == out["run_macs"] and abs(srste / at - target) <= abs(out["ratio_other"] - target) + 1e-12
        assert abs(out["ratio"] - target) < 0.01


def test_cli_target_ratio_errors_name_the_fix(capsys):
    from bame.cli import main

    for sets, ratio, message in ((["method.name=static"], "2", "no training-FLOPs budget"),
                                 (["method.name=phased"], "100", "out of reach, even method.phased.switch_fraction=0.0"),
                                 (["method.name=bame", *_WINDOW], "1.0001", "rho_decay=constant")):
        assert main(["flops", "--config", str(QUICK), "--set", *_SMALL, *sets, "--target-ratio", ratio]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_the_calibrated_resnet50_config_is_at_the_papers_ratio():
    """configs/paper/imagenet_resnet50_learning_blocks.yaml: SR-STE / BAME training FLOPs = 2.37 (the paper's
    ratio for ImageNet ResNet-50 at 1:16), as bame flops counts it before training."""
    from dataclasses import replace

    from bame.config import load_config
    from bame.flops_report import flops_report

    cfg = load_config("paper/imagenet_resnet50_learning_blocks")
    srste = flops_report(replace(cfg, method=replace(cfg.method, name="srste")))["run_total_macs"]
    assert srste / flops_report(cfg)["run_total_macs"] == pytest.approx(2.37, abs=0.005)


@pytest.mark.parametrize("method,pattern", [("lbc", "1:4"), ("lbc", "2:4"), ("bimask", "2:4")])
def test_cli_flops_of_the_predecessors_against_a_real_run(tmp_path, method, pattern):
    """LBC: dense steps until the first cut, its transition plan (the most positions the alive combinations
    can cover) until t_f, the N:M step after: exact at N = 1, an upper bound at 2:4. Bi-Mask: forward and
    weight gradient exact, the input gradient at step 0's backward mask near the run's (it moves with the
    weights); executed MACs (masked dense kernels) exact for both."""
    sets = _SMALL + [f"method.name={method}", f"method.pattern={pattern}", "method.bimask.iter=4"]
    rep = json.loads(_run_cli(["flops", "--config", str(QUICK), "--set", *sets, "--json"]))
    res = bame.train(load_config(QUICK, sets), out_dir=tmp_path, verbose=False)
    ideal, executed = _recorded_conv_linear_macs(res.run_dir)
    assert executed == rep["run_total_executed_macs"] and res.steps == rep["run_steps"] == 16
    if method == "lbc":
        assert 0 < rep["prune_step"] < 8 and rep["before_prune_step_macs"] == rep["dense_step_macs"]  # t_f = 8
        assert 16 * rep["step_macs"] < rep["run_total_macs"] < 16 * rep["dense_step_macs"]
        assert ideal == rep["run_total_macs"] if pattern == "1:4" else ideal < rep["run_total_macs"]
        return
    by_phase = json.loads((res.run_dir / "summary.json").read_text())["flops"]["by_phase"]
    for phase in ("forward", "weight_grad"):
        assert by_phase[phase]["ideal_macs"] == 16 * rep["step_by_phase"][phase]
    predicted, ran = 16 * rep["step_by_phase"]["input_grad"], by_phase["input_grad"]["ideal_macs"]
    assert ran != predicted and abs(ran - predicted) < 0.01 * predicted
    assert rep["adaptation_steps"] == 4 and any("backward mask" in note for note in rep["notes"])

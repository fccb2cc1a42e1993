"""method.forward_kernel / input_grad_kernel in the N:M layers: the sparse and auto kernels against the masked
dense ones (float32, gradcheck in float64, autocast), the index refreshed per mask version, fallbacks, what
the ledger and sparsify.csv report."""

import pytest
import torch
import torch.nn.functional as F

import bame.forward_kernels as fk
from bame.autograd import Backward, nm_conv2d, nm_linear
from bame.forward_kernels import FORWARD, INPUT_GRAD, WEIGHT_GRAD, SparseKernels
from bame.layers import NMConv2d, NMLinear
from bame.nm import Layout, NMPattern, random_nm_mask
from bame.runs import load_run

from test_nm_kernels import CONVS, _grads

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = [("sparse", "sparse"), ("auto", "auto"), ("sparse", "masked_dense"), ("masked_dense", "auto")]


def _conv_layer(case, forward, input_grad, dtype=torch.float32, **kw):
    cin, cout, kernel, stride, padding, dilation, pattern, layout = case
    torch.manual_seed(0)
    layer = NMConv2d(cin, cout, kernel, stride, padding, dilation, pattern=pattern, layout=layout,
                     forward_kernel=forward, input_grad_kernel=input_grad, dtype=dtype, **kw)
    gen = torch.Generator().manual_seed(1)
    layer.set_mask(random_nm_mask(layer.weight.shape, layer.pattern.n, layer.pattern.m, gen, layout))
    with torch.no_grad():
        layer.bias.normal_(generator=gen)
    return layer


def _layer_grads(layer, x):
    """Output and the gradients of input, weight and bias of ``layer`` on ``x`` (a fixed probe of the output)."""
    return _grads(lambda x, w, b: _call(layer, x, w, b), x, layer.weight, layer.bias)


def _call(layer, x, w, b):
    """``layer`` on ``x`` with the parameters ``w``, ``b`` (fresh leaves) instead of its own."""
    return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))


@pytest.mark.parametrize("forward,input_grad", SETTINGS)
@pytest.mark.parametrize("case", CONVS)
def test_conv_layer_equals_masked_dense(case, forward, input_grad):
    layer = _conv_layer(case, forward, input_grad)
    x = torch.randn(3, case[0], 9, 8, generator=torch.Generator().manual_seed(2))
    ours = _layer_grads(layer, x)
    ref = _grads(lambda x, w, b: F.conv2d(x, w * layer.mask, b, layer.stride, layer.padding, layer.dilation), x,
                 layer.weight, layer.bias)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    k = layer.sparse_kernels
    expect = {"sparse": "csr", "masked_dense": "masked_dense"}
    for phase, setting in ((FORWARD, forward), (INPUT_GRAD, input_grad)):
        ran = k.describe(phase)
        assert ran == expect[setting] if setting != "auto" else ran.endswith(" (auto)"), (phase, ran)


@pytest.mark.parametrize("forward,input_grad", SETTINGS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_layer_equals_masked_dense(forward, input_grad, bias):
    torch.manual_seed(0)
    layer = NMLinear(32, 12, bias=bias, pattern="1:8", forward_kernel=forward, input_grad_kernel=input_grad)
    layer.set_mask(random_nm_mask(layer.weight.shape, 1, 8, torch.Generator().manual_seed(1)))
    x = torch.randn(2, 5, 32)  # a 3-D input
    fn = lambda x, w, b: nm_linear(x, w, b, layer.mask, None, sparse=layer.sparse_kernels)  # noqa: E731
    ours = _grads(fn, x, layer.weight, layer.bias)
    ref = _grads(lambda x, w, b: F.linear(x, w * layer.mask, b), x, layer.weight, layer.bias)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,weight_grad", [("dense", "masked_dense"), ("sparse", "gather")])
@pytest.mark.parametrize("case", CONVS[:4] + CONVS[5:6])
def test_gradcheck_float64(case, mode, weight_grad):
    """``gather`` after a csr forward: the SDDMM on the forward's columns (tests/test_shared_columns.py)."""
    cin, cout, kernel, stride, padding, dilation, pattern, layout = case
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(cout, cin, *kernel, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(cout, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, cin, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    pat = NMPattern.parse(pattern)
    mask = random_nm_mask(w.shape, pat.n, pat.m, gen, layout)
    sparse = SparseKernels("sparse", "sparse", pat, Layout.parse(layout), weight_grad=weight_grad)
    assert torch.autograd.gradcheck(
        lambda x, w, b: nm_conv2d(x, w, b, mask, None, stride, padding, dilation, mode=mode, kernel=weight_grad,
                                  sparse=sparse), (x, w, b))
    shared = {WEIGHT_GRAD: "gather (shared columns)"} if weight_grad == "gather" else {}
    assert sparse.record == {FORWARD: "csr", INPUT_GRAD: "csr", **shared}


def test_gradcheck_linear_float64():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = random_nm_mask(w.shape, 2, 8, gen)
    sparse = SparseKernels("sparse", "sparse", NMPattern(2, 8), Layout.ROW)
    assert torch.autograd.gradcheck(lambda x, w: nm_linear(x, w, None, mask, mode=Backward.DENSE, sparse=sparse),
                                    (x, w))


def test_autocast_computes_in_float32_and_matches_float32_masked_dense():
    case = CONVS[0]
    layer = _conv_layer(case, "sparse", "sparse")
    x = torch.randn(3, case[0], 9, 8, generator=torch.Generator().manual_seed(2))

    def run(x, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _call(layer, x.to(torch.bfloat16), w, b)
        assert out.dtype == torch.float32
        return out

    ours = _grads(run, x, layer.weight, layer.bias)
    ref = _grads(lambda x, w, b: F.conv2d(x.to(torch.bfloat16).float(), w * layer.mask, b, layer.stride,
                                          layer.padding), x, layer.weight, layer.bias)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_the_index_follows_the_mask_and_the_values_follow_the_weight():
    layer = _conv_layer(CONVS[0], "sparse", "sparse")
    x = torch.randn(2, 8, 9, 8)
    layer(x)  # builds the index of the first mask
    for seed in (3, 4):  # a new mask (written in place), then new weights under the same mask
        if seed == 3:
            layer.set_mask(random_nm_mask(layer.weight.shape, 2, 4, torch.Generator().manual_seed(seed)))
        else:
            with torch.no_grad():
                layer.weight.mul_(-2.0).add_(0.5)
        ref = F.conv2d(x, layer.weight * layer.mask, layer.bias, layer.stride, layer.padding)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_layers_the_sparse_kernels_cannot_run_fall_back_and_say_why():
    layer = NMConv2d(8, 8, 3, padding=1, groups=2, pattern="2:4", forward_kernel="sparse", input_grad_kernel="auto")
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    layer(x).sum().backward()
    ref = F.conv2d(x, layer.weight * layer.mask, layer.bias, padding=1, groups=2)
    torch.testing.assert_close(layer(x), ref)
    assert layer.sparse_kernels.record == {FORWARD: "masked_dense (groups=2: the sparse kernels lower groups=1 "
                                                    "convs only)",
                                           INPUT_GRAD: "masked_dense (groups=2: the sparse kernels lower groups=1 "
                                                       "convs only)"}


def test_auto_keeps_masked_dense_while_the_mask_moves_every_step():
    layer = _conv_layer(CONVS[0], "auto", "auto", backward_mode="srste")
    layer(torch.randn(2, 8, 9, 8, requires_grad=True)).sum().backward()
    assert set(layer.sparse_kernels.record.values()) == {"masked_dense (auto: the mask changes every step)"}


def test_auto_times_once_per_shape_and_records_the_choice(monkeypatch):
    calls = []
    real = fk._time
    monkeypatch.setattr(fk, "_time", lambda key, *a: calls.append(key) or real(key, *a))
    monkeypatch.setattr(fk, "_CHOICES", {})
    layers = [_conv_layer(CONVS[4], "auto", "auto") for _ in range(2)]
    for layer in layers:
        for _ in range(2):
            layer(torch.randn(2, 16, 9, 8, requires_grad=True)).sum().backward()
    assert [k[0] for k in calls] == [FORWARD, INPUT_GRAD]  # two layers of one shape, two steps: timed once
    choices = fk.kernel_choices()
    assert {c.key[0] for c in choices} == {FORWARD, INPUT_GRAD}
    for c in choices:
        assert set(c.seconds) == {"masked_dense", "csr", "bsr"} and c.seconds[c.name] == min(c.seconds.values())
        assert layers[1].sparse_kernels.describe(c.key[0]) == f"{c.name} (auto)"


def test_the_ledger_reports_what_ran():
    costs = []
    layer = _conv_layer(CONVS[0], "sparse", "masked_dense")
    layer.observer = costs.append
    x = torch.randn(2, 8, 9, 8, requires_grad=True)
    layer(x).sum().backward()
    by_phase = {c.phase.value: c for c in costs}
    positions = by_phase[FORWARD].positions
    assert by_phase[FORWARD].executed_macs == by_phase[FORWARD].ideal_macs == int(layer.mask.sum()) * positions
    assert by_phase[INPUT_GRAD].executed_macs == layer.weight.numel() * positions  # masked dense: every weight
    index = fk.nm_index(layer.mask, layer.sparse_kernels)
    assert fk.executed_macs(fk.SparseKernel.COMPILED, INPUT_GRAD, index, positions, 0) == \
        index.ell_t.cols.numel() * positions >= by_phase[INPUT_GRAD].ideal_macs


def test_a_run_records_the_auto_choices_in_sparsify_csv(tmp_path, train_quick):
    train_quick(tmp_path / "runs", "train.max_steps=2", "method.name=static", "method.forward_kernel=auto",
                "method.input_grad_kernel=sparse", "method.weight_grad_kernel=gather")
    run = load_run(next((tmp_path / "runs").rglob("DONE")).parent)
    rows = run.table("sparsify")
    sparse = rows[rows["sparse"]]
    assert len(sparse) and sparse["forward_kernel"].str.endswith(" (auto)").all()
    assert (sparse["input_grad_kernel"] == "csr").all()
    assert (sparse["weight_grad_kernel"] == "gather").all()  # linear layers: no conv columns to share
    for column in ("forward_kernel", "weight_grad_kernel"):
        assert (rows[~rows["sparse"]][column].fillna("") == "").all()
    flops = run.table("flops")
    ig = flops[flops.phase == INPUT_GRAD]
    assert len(ig) and (ig["executed_macs"] == ig["ideal_macs"]).all()  # csr runs the kept weights only


@pytest.mark.slow
def test_auto_with_compiled_kernels_times_them_and_stays_exact(monkeypatch):
    monkeypatch.setattr(fk, "_CHOICES", {})
    case = (4, 6, (3, 3), 1, 1, 1, "1:4", "row")  # stride 1, output rows of 16: direct is a candidate
    layer = _conv_layer(case, "auto", "auto", compile_kernels=True)
    x = torch.randn(2, 4, 6, 16, generator=torch.Generator().manual_seed(2))
    ours = _layer_grads(layer, x)
    ref = _grads(lambda x, w, b: F.conv2d(x, w * layer.mask, b, padding=1), x, layer.weight, layer.bias)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    for c in fk.kernel_choices():
        assert set(c.seconds) == {"masked_dense", "csr", "bsr", "compiled", "direct"}, c.seconds

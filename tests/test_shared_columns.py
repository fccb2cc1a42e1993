"""The conv columns a csr/bsr forward builds, kept for the SDDMM weight gradient: exact against masked-dense
autograd (float32, autocast; gradcheck in float64: tests/test_forward_kernels.py), built once per step, kept
only where the SDDMM may run, what ``auto`` times, what the ledger and the records report."""

import pytest
import torch
import torch.nn.functional as F

import bame.forward_kernels as fk
from bame import kernels, nm_kernels
from bame.forward_kernels import WEIGHT_GRAD, ForwardKernel
from bame.layers import LayerPolicy, sparsify
from bame.nm_kernels import SparseKernel

from test_forward_kernels import _conv_layer, _layer_grads
from test_nm_kernels import CONVS, _grads

pytestmark = pytest.mark.usefixtures("one_thread")
CONV3 = CONVS[0]  # 8 -> 6 channels, 3x3, stride 1, padding 1, 2:4


def _reference(layer, x):
    return _grads(lambda x, w, b: F.conv2d(x, w * layer.mask, b, layer.stride, layer.padding, layer.dilation), x,
                  layer.weight, layer.bias)


@pytest.fixture
def im2col_calls(monkeypatch):
    """How often conv columns ``[K, B*L]`` were built (``_im2col_t``, the builder of both the forward and the
    weight gradient)."""
    calls = []
    real = kernels._im2col_t

    def counted(*args):
        calls.append(args[1])
        return real(*args)
    monkeypatch.setattr(kernels, "_im2col_t", counted)
    monkeypatch.setattr(nm_kernels, "_im2col_t", counted)
    return calls


def _kept_columns(layer, x):
    """One step of ``layer`` on ``x``: the shapes of the ``[K, B*L]`` tensors saved for the backward."""
    k = layer.weight[0].numel()
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.sum().backward()
    positions = x.shape[0] * out.shape[2] * out.shape[3]
    return [s for s in saved if s == (k, positions)]


@pytest.mark.parametrize("kernel", [SparseKernel.CSR, SparseKernel.BSR])
@pytest.mark.parametrize("case", CONVS)
def test_weight_gradient_on_shared_columns_equals_masked_dense(case, kernel, monkeypatch):
    monkeypatch.setattr(fk, "SPARSE_KERNEL", kernel)  # what `sparse` runs
    layer = _conv_layer(case, "sparse", "sparse", weight_grad_kernel="gather")
    x = torch.randn(3, case[0], 9, 8, generator=torch.Generator().manual_seed(2))
    for ours, ref in zip(_layer_grads(layer, x), _reference(layer, x)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert layer.sparse_kernels.record[WEIGHT_GRAD] == "gather (shared columns)"


def test_autocast_shares_float32_columns_and_matches_float32_masked_dense():
    layer = _conv_layer(CONV3, "sparse", "sparse", weight_grad_kernel="gather")
    x = torch.randn(3, CONV3[0], 9, 8, generator=torch.Generator().manual_seed(2))

    def run(x, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x.to(torch.bfloat16),))

    ours = _grads(run, x, layer.weight, layer.bias)
    ref = _grads(lambda x, w, b: F.conv2d(x.to(torch.bfloat16).float(), w * layer.mask, b, layer.stride,
                                          layer.padding), x, layer.weight, layer.bias)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    assert layer.sparse_kernels.record[WEIGHT_GRAD] == "gather (shared columns)"


@pytest.mark.parametrize("weight_grad,mode,kept", [("gather", "sparse", True), ("masked_dense", "sparse", False),
                                                   ("gather", "dense", False)])
def test_columns_are_built_once_per_step_and_kept_only_for_the_sddmm(weight_grad, mode, kept, im2col_calls):
    layer = _conv_layer(CONV3, "sparse", "masked_dense", weight_grad_kernel=weight_grad, backward_mode=mode)
    x = torch.randn(2, CONV3[0], 9, 8)
    kept_shapes = _kept_columns(layer, x)
    assert len(kept_shapes) == kept
    assert len(im2col_calls) == 1  # the forward's; the SDDMM, where it ran, used them


def test_the_ledger_counts_the_sddmm_on_shared_columns():
    costs = []
    layer = _conv_layer(CONV3, "sparse", "masked_dense", weight_grad_kernel="gather")
    layer.observer = costs.append
    layer(torch.randn(2, CONV3[0], 9, 8, requires_grad=True)).sum().backward()
    wg = next(c for c in costs if c.phase.value == WEIGHT_GRAD)
    assert wg.executed_macs == wg.ideal_macs == int(layer.mask.sum()) * wg.positions


def test_auto_times_the_sddmm_on_the_shared_columns(monkeypatch, im2col_calls):
    monkeypatch.setattr(kernels, "_AUTO", {})
    layer = _conv_layer(CONV3, "sparse", "masked_dense", weight_grad_kernel="auto")
    x = torch.randn(2, CONV3[0], 9, 8)
    assert len(_kept_columns(layer, x)) == 1
    assert len(im2col_calls) == 1  # the timed SDDMM runs built no columns of their own
    (choice,) = kernels.auto_kernel_choices()
    assert choice.shared_columns and "shared columns" in choice.key
    expect = "gather (shared columns, auto)" if choice.gather else "masked_dense (auto)"
    assert layer.sparse_kernels.record[WEIGHT_GRAD] == expect


def test_auto_stops_keeping_columns_once_it_chose_masked_dense(monkeypatch):
    monkeypatch.setattr(kernels, "_AUTO", {})
    monkeypatch.setattr(kernels, "_time_kernels",  # masked dense always wins
                        lambda key, g, d, device, shared: kernels.AutoChoice(key, False, 2.0, 1.0, shared))
    layer = _conv_layer(CONV3, "sparse", "masked_dense", weight_grad_kernel="auto")
    x = torch.randn(2, CONV3[0], 9, 8)
    assert len(_kept_columns(layer, x)) == 1  # not decided yet: kept, and timed on them
    assert len(_kept_columns(layer, x)) == 0
    assert layer.sparse_kernels.record[WEIGHT_GRAD] == "masked_dense (auto)"


def test_sparsify_rows_say_which_weight_gradients_ran_on_shared_columns():
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1),
                                torch.nn.Conv2d(8, 4, 1))
    report = sparsify(model, "1:4", policy=LayerPolicy(first_conv_dense=False), forward_kernel="sparse",
                      weight_grad_kernel="gather")
    model[2].sparse_kernels.forward = ForwardKernel.MASKED_DENSE  # no columns to share
    model(torch.randn(2, 8, 6, 6)).sum().backward()
    rows = {r["name"]: r["weight_grad_kernel"] for r in report.to_rows(model)}
    assert rows == {"0": "gather (shared columns)", "1": "gather (shared columns)", "2": "gather"}

"""Every hand-written backward against plain autograd on the masked weight (float64, gradcheck too)."""

import random

import pytest
import torch
import torch.nn.functional as F

from bame.autograd import Backward, Phase, WeightGradKernel, nm_conv2d, nm_linear
from bame.nm import nm_mask

DECAY = 0.37  # a large SR-STE decay so its term is clearly visible


def _random_conv_case(rng: random.Random):
    groups = rng.choice([1, 1, 2])
    cin = groups * rng.choice([2, 4])
    cout = groups * rng.choice([4, 8])
    kh, kw = rng.choice([(1, 1), (3, 3), (2, 3)])
    stride = rng.choice([1, 2, (2, 1)])
    padding = rng.choice([0, 1, (1, 0)])
    dilation = rng.choice([1, 2])
    k = cin // groups * kh * kw
    m = 4 if k % 4 == 0 else (2 if k % 2 == 0 else 1)
    n = max(1, m // 2)
    return dict(cin=cin, cout=cout, kernel=(kh, kw), stride=stride, padding=padding, dilation=dilation,
                groups=groups, n=n, m=m, bias=rng.random() < 0.5)


def _weights(out):
    return torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)


def _reference(op, x, w, b, mask, grad_mask, mode):
    """The gradients each mode must return, from plain autograd on ``W_eff = W * mask``.

    Returns ``(output, input grad, weight grad, bias grad)``; the bias grad is ``None`` without a bias.
    """
    x = x.detach().clone().requires_grad_()
    w_leaf = w.detach().clone().requires_grad_()
    b_leaf = None if b is None else b.detach().clone().requires_grad_()
    w_eff = w_leaf * mask
    w_eff.retain_grad()
    out = op(x, w_eff, b_leaf)
    (out * _weights(out)).sum().backward()
    g_eff = w_eff.grad
    if mode is Backward.DENSE:
        gw = w_leaf.grad  # = g_eff * mask
    elif mode is Backward.STE:
        gw = g_eff
    elif mode is Backward.SRSTE:
        gw = g_eff + DECAY * (~mask) * w
    else:
        gw = g_eff * (mask | grad_mask)
    return out.detach(), x.grad, gw, None if b_leaf is None else b_leaf.grad


def _ours(fn, x, w, b, mask, grad_mask, mode, kernel):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    out = fn(x, w, b, mask, grad_mask, mode, kernel)
    (out * _weights(out)).sum().backward()
    return out.detach(), x.grad, w.grad, None if b is None else b.grad


GRADS = ("output", "input grad", "weight grad", "bias grad")


CONV_SEEDS = range(12)


def test_random_conv_cases_cover_the_bias():
    """The seeds below differentiate a bias with groups=2, dilation 2 and a non-square kernel, and run without one."""
    cases = [_random_conv_case(random.Random(seed)) for seed in CONV_SEEDS]
    with_bias = [c for c in cases if c["bias"]]
    assert any(c["groups"] == 2 for c in with_bias) and any(c["dilation"] == 2 for c in with_bias)
    assert any(c["kernel"] == (2, 3) for c in with_bias) and len(with_bias) < len(cases)


def _conv_case_tensors(seed: int):
    """The random conv case of ``seed``, its input, weight, bias, top-N magnitude mask and conv arguments
    (torch's generator seeded by ``seed``; the caller's next draws follow)."""
    c = _random_conv_case(random.Random(seed))
    torch.manual_seed(seed)
    x = torch.randn(2, c["cin"], 7, 6, dtype=torch.float64)
    w = torch.randn(c["cout"], c["cin"] // c["groups"], *c["kernel"], dtype=torch.float64)
    b = torch.randn(c["cout"], dtype=torch.float64) if c["bias"] else None
    mask = nm_mask(w.abs(), c["n"], c["m"])
    conv = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"])
    return c, x, w, b, mask, conv


@pytest.mark.parametrize("seed", CONV_SEEDS)
@pytest.mark.parametrize("mode", list(Backward))
@pytest.mark.parametrize("kernel", list(WeightGradKernel))
def test_conv_modes_match_autograd(seed, mode, kernel):
    c, x, w, b, mask, conv = _conv_case_tensors(seed)
    grad_mask = torch.rand(w.shape) < 0.2

    def ref_op(x, w_eff, b):
        return F.conv2d(x, w_eff, b, **conv)

    def ours(x, w, b, mask, grad_mask, mode, kernel):
        return nm_conv2d(x, w, b, mask, grad_mask, **conv, mode=mode, srste_decay=DECAY, kernel=kernel)

    ref = _reference(ref_op, x, w, b, mask, grad_mask, mode)
    got = _ours(ours, x, w, b, mask, grad_mask, mode, kernel)
    assert (got[3] is None) == (b is None)
    for r, g, what in zip(ref, got, GRADS):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=f"{what} differs ({c}, {mode})")


@pytest.mark.parametrize("mode", list(Backward))
@pytest.mark.parametrize("kernel", list(WeightGradKernel))
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_linear_modes_match_autograd(mode, kernel, lead):
    torch.manual_seed(0)
    x = torch.randn(*lead, 32, dtype=torch.float64)
    w = torch.randn(6, 32, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    mask = nm_mask(w.abs(), 1, 16)
    grad_mask = torch.rand(w.shape) < 0.3

    def ref_op(x, w_eff, b):
        return F.linear(x, w_eff, b)

    def ours(x, w, b, mask, grad_mask, mode, kernel):
        return nm_linear(x, w, b, mask, grad_mask, mode, DECAY, kernel)

    ref = _reference(ref_op, x, w, b, mask, grad_mask, mode)
    got = _ours(ours, x, w, b, mask, grad_mask, mode, kernel)
    assert got[3] is not None
    for r, g, what in zip(ref, got, GRADS):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=f"{what} differs ({mode}, {lead})")


def test_sparse_weight_grad_is_exactly_zero_outside_needed_positions():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5)
    w = torch.randn(8, 8, 3, 3, requires_grad=True)
    mask = nm_mask(w.detach().abs(), 1, 8)
    grad_mask = torch.zeros_like(mask)
    grad_mask[3] = True
    for kernel in WeightGradKernel:
        w.grad = None
        nm_conv2d(x, w, None, mask, grad_mask, padding=1, mode=Backward.SPARSE, kernel=kernel).sum().backward()
        assert (w.grad[~(mask | grad_mask)] == 0).all()
        assert (w.grad[mask] != 0).any()


GRADCHECK_CONVS = [  # (input shape, weight shape, conv args): small, so float64 gradcheck stays fast
    ((2, 4, 5, 5), (4, 4, 3, 3), dict(stride=2, padding=1)),
    # groups=2, dilation 2, a non-square kernel, stride and padding
    ((2, 4, 6, 7), (4, 2, 2, 3), dict(stride=(2, 1), padding=(1, 0), dilation=2, groups=2)),
]


@pytest.mark.parametrize("mode", list(Backward))
@pytest.mark.parametrize("case", range(len(GRADCHECK_CONVS)))
def test_gradcheck_conv(mode, case):
    x_shape, w_shape, conv = GRADCHECK_CONVS[case]
    torch.manual_seed(case)
    x = torch.randn(*x_shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(*w_shape, dtype=torch.float64)
    b = torch.randn(w_shape[0], dtype=torch.float64, requires_grad=True)
    mask = nm_mask(w.abs(), 2, 4)
    # gradcheck differentiates op(x, W*mask, b) w.r.t. x, W and b numerically: DENSE and SPARSE (no extra
    # positions) must equal it exactly; STE/SRSTE differ by design in W and are checked w.r.t. x and b only.
    w_arg = w.clone().requires_grad_(mode in (Backward.DENSE, Backward.SPARSE))
    kernels = [WeightGradKernel.MASKED_DENSE]
    if mode is Backward.SPARSE and conv.get("groups", 1) == 1:
        kernels.append(WeightGradKernel.GATHER)  # GATHER runs for groups=1 only
    for kernel in kernels:
        assert torch.autograd.gradcheck(
            lambda x, w, b, k=kernel: nm_conv2d(x, w, b, mask, None, **conv, mode=mode, srste_decay=DECAY, kernel=k),
            (x, w_arg, b))


@pytest.mark.parametrize("mode", list(Backward))
def test_gradcheck_linear(mode):
    torch.manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 8, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    mask = nm_mask(w.abs(), 1, 4)
    w_arg = w.clone().requires_grad_(mode in (Backward.DENSE, Backward.SPARSE))
    kernels = [WeightGradKernel.MASKED_DENSE] + ([WeightGradKernel.GATHER] if mode is Backward.SPARSE else [])
    for kernel in kernels:
        assert torch.autograd.gradcheck(lambda x, w, b, k=kernel: nm_linear(x, w, b, mask, None, mode, DECAY, k),
                                        (x, w_arg, b))


def test_observer_reports_each_phase_that_ran():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)  # images: no input gradient wanted
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    mask = nm_mask(w.detach().abs(), 1, 4)
    grad_mask = torch.zeros_like(mask)
    grad_mask[0] = True
    costs = []
    out = nm_conv2d(x, w, None, mask, grad_mask, padding=1, mode=Backward.SPARSE, observer=costs.append)
    out.sum().backward()
    phases = {c.phase: c for c in costs}
    assert set(phases) == {Phase.FORWARD, Phase.WEIGHT_GRAD}  # no input grad for the images
    positions = 2 * 6 * 6
    assert phases[Phase.FORWARD].ideal_macs == int(mask.sum()) * positions == w.numel() // 4 * positions
    assert phases[Phase.FORWARD].executed_macs == w.numel() * positions
    assert phases[Phase.WEIGHT_GRAD].ideal_macs == int((mask | grad_mask).sum()) * positions
    costs.clear()
    xr = x.clone().requires_grad_()
    nm_conv2d(xr, w, None, mask, None, padding=1, mode=Backward.SPARSE, kernel=WeightGradKernel.GATHER,
              observer=costs.append).sum().backward()
    phases = {c.phase: c for c in costs}
    assert phases[Phase.INPUT_GRAD].ideal_macs == int(mask.sum()) * positions
    assert phases[Phase.WEIGHT_GRAD].executed_macs == phases[Phase.WEIGHT_GRAD].ideal_macs


def test_unknown_mode_and_string_padding_errors():
    with pytest.raises(ValueError, match="backward mode"):
        Backward.parse("half")
    with pytest.raises(ValueError, match="numeric padding"):
        nm_conv2d(torch.randn(1, 4, 4, 4), torch.randn(4, 4, 3, 3), padding="same")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gather_1x1_conv_without_unfold_matches_masked_dense(stride, channels_last):
    """1x1 convs take GATHER's im2col-free path (a strided view of the input); channels_last inputs too."""
    torch.manual_seed(0)
    x = torch.randn(3, 16, 9, 9, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 16, 1, 1, dtype=torch.float64)
    mask = nm_mask(w.abs(), 1, 16)
    grad_mask = torch.rand(w.shape) < 0.1
    grads = []
    for kernel in WeightGradKernel:
        wk = w.clone().requires_grad_()
        out = nm_conv2d(x, wk, None, mask, grad_mask, stride=stride, mode=Backward.SPARSE, kernel=kernel)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        grads.append(wk.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-10)


def test_counts_follow_in_place_mask_changes():
    """Non-zero counts are cached per mask version: an in-place change (copy_, a grad_mask write) is seen."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)
    mask = nm_mask(w.detach().abs(), 2, 4)
    grad_mask = torch.zeros_like(mask)
    for kernel in WeightGradKernel:
        for step in range(3):
            costs = []
            nm_linear(x, w, None, mask, grad_mask, Backward.SPARSE, 0.0, kernel, costs.append).sum().backward()
            by = {c.phase: c for c in costs}
            assert by[Phase.FORWARD].ideal_macs == int(mask.sum()) * 2
            assert by[Phase.WEIGHT_GRAD].ideal_macs == int((mask | grad_mask).sum()) * 2
            assert (w.grad[~(mask | grad_mask)] == 0).all() and (w.grad[grad_mask] != 0).all()
            w.grad = None
            with torch.no_grad():
                if step == 0:
                    mask.copy_(nm_mask(torch.rand(4, 16), 1, 4))  # fewer kept weights
                else:
                    grad_mask[1] = True  # candidate positions on an adaptation step
        mask = nm_mask(w.detach().abs(), 2, 4)
        grad_mask = torch.zeros_like(mask)


def test_lazy_counts_reach_only_observers_that_take_them():
    from bame.kernels import LazyMacs

    torch.manual_seed(0)
    x = torch.randn(3, 8)
    w = torch.randn(4, 8, requires_grad=True)
    mask = nm_mask(w.detach().abs(), 1, 4)
    lazy = []

    def observer(cost):
        lazy.append(cost)
    observer.lazy_counts = True
    nm_linear(x, w, None, mask, None, Backward.SPARSE, 0.0, WeightGradKernel.MASKED_DENSE, observer).sum().backward()
    fwd = lazy[0].ideal_macs
    assert isinstance(fwd, LazyMacs) and int(fwd) == 8 * 3  # read on demand: 8 kept weights x 3 rows
    lazy.clear()
    nm_linear(x, w, None, mask, None, Backward.SPARSE, 0.0, WeightGradKernel.MASKED_DENSE, observer).sum().backward()
    assert all(isinstance(c.ideal_macs, int) for c in lazy)  # the count was read once and is cached
    plain = []
    mask2 = nm_mask(torch.rand(4, 8), 2, 4)
    nm_linear(x, w, None, mask2, None, Backward.SPARSE, 0.0, WeightGradKernel.MASKED_DENSE, plain.append)
    assert plain[0].ideal_macs == 16 * 3  # a plain observer gets ints


def test_auto_kernel_times_once_per_shape_and_density(monkeypatch):
    """AUTO runs both kernels once per (shape, density class), keeps the faster, and the result is right."""
    from bame import kernels

    monkeypatch.setattr(kernels, "_AUTO", {})
    torch.manual_seed(0)
    x = torch.randn(4, 64, dtype=torch.float64)
    w = torch.randn(8, 64, dtype=torch.float64)
    mask = nm_mask(w.abs(), 1, 16)
    grads = {}
    for kernel in (WeightGradKernel.MASKED_DENSE, WeightGradKernel.AUTO, WeightGradKernel.AUTO):
        wk = w.clone().requires_grad_()
        nm_linear(x, wk, None, mask, None, Backward.SPARSE, 0.0, kernel).square().sum().backward()
        grads[kernel] = wk.grad
    torch.testing.assert_close(grads[WeightGradKernel.AUTO], grads[WeightGradKernel.MASKED_DENSE], rtol=1e-10,
                               atol=1e-10)
    (choice,) = kernels.auto_kernel_choices()  # the second AUTO call reused the first decision
    assert choice.key[-1] == -4 and choice.gather == (choice.gather_s < choice.masked_dense_s)
    grad_mask = torch.ones_like(mask)  # an adaptation step whose candidates fill the layer: decided apart
    nm_linear(x, w.clone().requires_grad_(), None, mask, grad_mask, Backward.SPARSE, 0.0,
              WeightGradKernel.AUTO).sum().backward()
    assert sorted(c.key[-1] for c in kernels.auto_kernel_choices()) == [-4, 0]


# --------------------------------------------------------------------------------------------------
# a backward mask of its own (Bi-Mask): the input gradient through W * backward_mask, the rest as before


def _reference_with_backward_mask(op, x, w, b, mask, grad_mask, backward_mask, mode):
    """The mode's output, weight and bias gradients from plain autograd on ``W * mask``, and the input
    gradient from plain autograd on ``W * backward_mask`` (same upstream gradient)."""
    out, _, gw, gb = _reference(op, x, w, b, mask, grad_mask, mode)
    x_b = x.detach().clone().requires_grad_()
    out_b = op(x_b, w * backward_mask, None if b is None else b.detach())
    (out_b * _weights(out_b)).sum().backward()
    return out, x_b.grad, gw, gb


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", list(Backward))
def test_backward_mask_moves_only_the_input_gradient(seed, mode):
    c, x, w, b, mask, conv = _conv_case_tensors(seed)
    backward_mask = mask & (torch.rand(w.shape) < 0.6)  # a subset, as Bi-Mask's
    grad_mask = torch.rand(w.shape) < 0.2

    def ref_op(x, w_eff, b):
        return F.conv2d(x, w_eff, b, **conv)

    def ours(x, w, b, mask, grad_mask, mode, kernel):
        return nm_conv2d(x, w, b, mask, grad_mask, **conv, mode=mode, srste_decay=DECAY, kernel=kernel,
                         backward_mask=backward_mask)

    ref = _reference_with_backward_mask(ref_op, x, w, b, mask, grad_mask, backward_mask, mode)
    for kernel in WeightGradKernel:
        got = _ours(ours, x, w, b, mask, grad_mask, mode, kernel)
        for r, g, what in zip(ref, got, GRADS):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=f"{what} differs ({c}, {mode}, {kernel})")
    plain = _reference(ref_op, x, w, b, mask, grad_mask, mode)
    assert not torch.allclose(ref[1], plain[1])  # the backward mask did change the input gradient


@pytest.mark.parametrize("mode", list(Backward))
def test_linear_backward_mask_matches_autograd(mode):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    w = torch.randn(8, 16, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    mask = nm_mask(w.abs(), 2, 4)
    backward_mask = mask & (torch.rand(w.shape) < 0.5)
    grad_mask = torch.rand(w.shape) < 0.3

    def ref_op(x, w_eff, b):
        return F.linear(x, w_eff, b)

    def ours(x, w, b, mask, grad_mask, mode, kernel):
        return nm_linear(x, w, b, mask, grad_mask, mode, DECAY, kernel, backward_mask=backward_mask)

    ref = _reference_with_backward_mask(ref_op, x, w, b, mask, grad_mask, backward_mask, mode)
    got = _ours(ours, x, w, b, mask, grad_mask, mode, WeightGradKernel.MASKED_DENSE)
    for r, g, what in zip(ref, got, GRADS):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=f"{what} differs ({mode})")


@pytest.mark.parametrize("mode", list(Backward))
def test_gradcheck_with_the_forward_mask_as_backward_mask(mode):
    """A backward mask equal to the forward mask is the plain path: gradcheck holds through it (a different
    backward mask is, by design, not the gradient of the forward; the tests above check it against autograd)."""
    torch.manual_seed(2)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    mask = nm_mask(w.abs(), 2, 4)
    w_arg = w.clone().requires_grad_(mode in (Backward.DENSE, Backward.SPARSE))
    assert torch.autograd.gradcheck(
        lambda x, w, b: nm_conv2d(x, w, b, mask, None, padding=1, mode=mode, srste_decay=DECAY,
                                  backward_mask=mask.clone()), (x, w_arg, b))
    xl = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    wl = torch.randn(4, 8, dtype=torch.float64).requires_grad_(mode in (Backward.DENSE, Backward.SPARSE))
    ml = nm_mask(wl.detach().abs(), 1, 4)
    assert torch.autograd.gradcheck(
        lambda x, w: nm_linear(x, w, None, ml, None, mode, DECAY, backward_mask=ml.clone()), (xl, wl))


def test_input_gradient_is_counted_at_the_backward_mask():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    mask = nm_mask(w.detach().abs(), 2, 4)
    backward_mask = mask.clone()
    backward_mask[:4] = False
    costs = []
    nm_conv2d(x, w, None, mask, None, padding=1, mode=Backward.SRSTE, observer=costs.append,
              backward_mask=backward_mask).sum().backward()
    by = {c.phase: c for c in costs}
    positions = 2 * 6 * 6
    assert by[Phase.INPUT_GRAD].ideal_macs == int(backward_mask.sum()) * positions == w.numel() // 4 * positions
    assert by[Phase.FORWARD].ideal_macs == int(mask.sum()) * positions
    assert by[Phase.INPUT_GRAD].executed_macs == by[Phase.WEIGHT_GRAD].ideal_macs == w.numel() * positions

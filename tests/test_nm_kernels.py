"""Every sparse kernel against plain autograd on the masked weight (float32), and gradcheck (float64)."""

import pytest
import torch
import torch.nn.functional as F

import bame.nm_kernels as nk
from bame.nm import random_nm_mask
from bame.nm_compressed import NMIndex
from bame.nm_kernels import SparseKernel, nm_sparse_conv2d, nm_sparse_linear

EAGER = [SparseKernel.CSR, SparseKernel.BSR, SparseKernel.GATHER]
COMPILED = [SparseKernel.COMPILED, SparseKernel.DIRECT]  # torch.compile: a few seconds per shape on a CPU
# (cin, cout, kernel, stride, padding, dilation, pattern, layout): every conv option the layers take
CONVS = [
    (8, 6, (3, 3), 1, 1, 1, "2:4", "row"),
    (8, 4, (3, 3), 2, 1, 1, "1:8", "channel"),
    (4, 6, (3, 3), 1, 2, 2, "1:4", "row"),
    (4, 4, (2, 3), (2, 1), (1, 0), (1, 2), "2:4", "row"),
    (16, 8, (1, 1), 1, 0, 1, "1:16", "row"),  # columns = the input itself
    (16, 8, (1, 1), 2, 0, 1, "1:8", "channel"),  # strided shortcut
    (8, 4, (1, 1), 1, 1, 1, "2:4", "row"),  # padded 1x1
]


def _grads(out_fn, x, w, b):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    out = out_fn(x, w, b)
    probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad((out * probe).sum(), [t for t in (x, w, b) if t is not None])
    return (out.detach(),) + grads


def _conv_case(case, dtype):
    cin, cout, kernel, stride, padding, dilation, pattern, layout = case
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(cout, cin, *kernel, generator=gen, dtype=dtype)
    x = torch.randn(3, cin, 9, 8, generator=gen, dtype=dtype)
    b = torch.randn(cout, generator=gen, dtype=dtype)
    n, m = (int(v) for v in pattern.split(":"))
    mask = random_nm_mask(w.shape, n, m, gen, layout)
    return x, w, b, mask, NMIndex(mask, pattern, layout), dict(stride=stride, padding=padding, dilation=dilation)


def _assert_conv_equals_masked_dense(kernel, case):
    """Output, input, weight and bias gradients of ``kernel`` equal plain autograd on ``W*m`` (float32)."""
    x, w, b, mask, index, args = _conv_case(case, torch.float32)
    ours = _grads(lambda x, w, b: nm_sparse_conv2d(x, w, b, mask, index, kernel, **args), x, w, b)
    ref = _grads(lambda x, w, b: F.conv2d(x, w * mask, b, **args), x, w, b)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", EAGER)
@pytest.mark.parametrize("case", CONVS)
def test_conv_equals_masked_dense(kernel, case):
    _assert_conv_equals_masked_dense(kernel, case)


@pytest.mark.parametrize("kernel", EAGER)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_masked_dense(kernel, bias):
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)  # 3-D input: positions 2x5
    b = torch.randn(6, generator=gen) if bias else None
    mask = random_nm_mask(w.shape, 1, 8, gen)
    index = NMIndex(mask, "1:8")
    ours = _grads(lambda x, w, b: nm_sparse_linear(x, w, b, mask, index, kernel), x, w, b)
    ref = _grads(lambda x, w, b: F.linear(x, w * mask, b), x, w, b)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", EAGER)
def test_gradcheck_float64(kernel):
    x, w, b, mask, index, args = _conv_case(CONVS[3], torch.float64)
    x, w, b = x[:1, :, :5, :5].clone(), w.clone(), b.clone()
    for t in (x, w, b):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: nm_sparse_conv2d(x, w, b, mask, index, kernel, **args), (x, w, b))
    wl = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    xl = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    ml = random_nm_mask(wl.shape, 2, 8)
    il = NMIndex(ml, "2:8")
    assert torch.autograd.gradcheck(lambda x, w: nm_sparse_linear(x, w, None, ml, il, kernel), (xl, wl))


def test_gather_in_chunks_equals_one_piece(monkeypatch):
    x, w, b, mask, index, args = _conv_case(CONVS[0], torch.float32)
    whole = _grads(lambda x, w, b: nm_sparse_conv2d(x, w, b, mask, index, "gather", **args), x, w, b)
    monkeypatch.setattr(nk, "GATHER_CHUNK_BYTES", 256)  # smaller than one position: chunks over L and B
    chunked = _grads(lambda x, w, b: nm_sparse_conv2d(x, w, b, mask, index, "gather", **args), x, w, b)
    for a, r in zip(chunked, whole):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


def test_under_autocast_the_kernels_compute_in_float32():
    x, w, b, mask, index, args = _conv_case(CONVS[0], torch.float32)
    xb = x.to(torch.bfloat16)  # a bf16 activation from an earlier autocast layer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _grads(lambda x, w, b: nm_sparse_conv2d(x, w, b, mask, index, "csr", **args), xb, w, b)
    ref = _grads(lambda x, w, b: F.conv2d(x.float(), w * mask, b, **args), xb, w, b)
    assert all(t.dtype == torch.float32 for t in ours[:1] + ours[2:])  # output and weight/bias gradients
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_unsupported_layers_are_refused_with_the_reason():
    w = torch.randn(4, 2, 3, 3)
    mask = random_nm_mask(w.shape, 1, 2)
    index = NMIndex(mask, "1:2")
    with pytest.raises(ValueError, match="groups=2.*use masked_dense"):
        nm_sparse_conv2d(torch.randn(1, 4, 5, 5), w, None, mask, index, "csr", padding=1, groups=2)
    with pytest.raises(ValueError, match="bfloat16.*use masked_dense"):
        nm_sparse_conv2d(torch.randn(1, 2, 5, 5), w.bfloat16(), None, mask, index, "gather")
    with pytest.raises(ValueError, match="do not match"):
        nm_sparse_conv2d(torch.randn(1, 2, 5, 5), torch.randn(4, 2, 1, 1), None, mask, index, "csr")
    with pytest.raises(ValueError, match="unknown|not a valid"):
        nm_sparse_conv2d(torch.randn(1, 2, 5, 5), w, None, mask, index, "cusparselt")


@pytest.mark.parametrize("kernel", COMPILED)
@pytest.mark.parametrize("case", [CONVS[1], CONVS[6]])  # strided; padded 1x1 (its transposed conv crops)
def test_compiled_equals_masked_dense(kernel, case):
    _assert_conv_equals_masked_dense(kernel, case)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", COMPILED)
@pytest.mark.parametrize("case", CONVS)
def test_compiled_every_conv_option_and_gradcheck(kernel, case):
    _assert_conv_equals_masked_dense(kernel, case)
    x, w, b, mask, index, args = _conv_case(case, torch.float64)
    x, w, b = x[:1].clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, b: nm_sparse_conv2d(x, w, b, mask, index, kernel, **args), (x, w, b))
    wl = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    ml = random_nm_mask(wl.shape, 2, 8)
    assert torch.autograd.gradcheck(lambda x, w: nm_sparse_linear(x, w, None, ml, NMIndex(ml, "2:8"), kernel),
                                    (torch.randn(3, 16, dtype=torch.float64, requires_grad=True), wl))

"""Mixed precision (``train.amp``) on every device that has autocast: the CPU here, CUDA where present.

The CUDA cases are marked ``gpu`` (deselected by default; ``python -m pytest -m gpu`` selects them) and
skip without a CUDA device. The CPU cases run in the default suite, so the autocast path of the custom
autograd functions, the fp16 GradScaler (unscaled before the method sees the gradients) and its checkpoint
are tested on every machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bame
from bame.autograd import Backward, WeightGradKernel, nm_conv2d, nm_linear
from bame.config import load_config
from bame.layers import NMLayer
from bame.methods import available_methods
from bame.nm import is_nm, nm_mask
from bame.runs import load_run

QUICK = Path(__file__).resolve().parents[1] / "configs" / "quick.yaml"
SMALL = ["train.progress=false", "data.synthetic_train_size=256", "data.synthetic_test_size=64",
         "train.batch_size=32", "train.eval_batch_size=64", "model.name=lenet5_wide"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
]


@pytest.fixture(autouse=True)
def _tf32_off(exact_float32):
    """TF32 would blur the float32 references on CUDA. (tests/conftest.py)"""


def _train(tmp_path, device, *sets):
    cfg = load_config(QUICK, SMALL + [f"train.device={device}", *sets])
    return bame.train(cfg, out_dir=tmp_path, verbose=False)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("method", available_methods())
@pytest.mark.parametrize("device", DEVICES)
def test_training_run_per_method_with_amp(tmp_path, device, method, amp):
    """A whole 8-step schedule (BAME adapts at 0, 2, 4, 6; ASP prunes at 4) under autocast with channels_last:
    the run completes, the loss is finite, the float32 master weights and the N:M masks stay on the device;
    fp16 checkpoints its scaler."""
    res = _train(tmp_path, device, f"method.name={method}", f"train.amp={amp}", "train.channels_last=true",
                 "train.epochs=1")
    assert res.status == "completed" and math.isfinite(res.train_loss) and res.test_acc is not None
    assert res.summary["device"].startswith(device)
    nm = [m for m in res.model.modules() if isinstance(m, NMLayer)]
    assert (len(nm) > 0) == (method != "dense")
    for layer in nm:
        assert layer.mask.device.type == device and layer.weight.device.type == device
        assert layer.weight.dtype == torch.float32 and torch.isfinite(layer.weight).all()
        assert is_nm(layer.mask, layer.pattern.n, layer.pattern.m, layer.layout)
    ckpt = load_run(res.run_dir).load_checkpoint()
    assert (ckpt["scaler"] is not None) == (amp == "fp16")
    if method == "bame":
        assert len(load_run(res.run_dir).table("adaptation")) > 0


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("device", DEVICES)
def test_amp_changes_the_numerics_but_stays_close_to_float32(tmp_path, device, amp):
    """The same seeded run in float32 and under autocast: the losses differ (autocast ran) by little."""
    sets = ("method.name=bame", "train.max_steps=4", "method.bame.interval_steps=2")
    full = _train(tmp_path / "fp32", device, *sets)
    half = _train(tmp_path / amp, device, *sets, f"train.amp={amp}")
    assert full.train_loss != half.train_loss
    assert half.train_loss == pytest.approx(full.train_loss, rel=0.05)


def test_amp_without_autocast_for_the_device_warns_and_trains_in_float32(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with pytest.warns(UserWarning, match="no autocast for 'cpu'; training in float32"):
        res = _train(tmp_path, "cpu", "method.name=static", "train.amp=fp16", "train.max_steps=2")
    assert res.status == "completed" and load_run(res.run_dir).load_checkpoint()["scaler"] is None


@pytest.mark.parametrize("kernel", list(WeightGradKernel))
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_conv_backward_keeps_float32_weight_grads(device, amp, kernel):
    """Under autocast the sparse conv computes in half precision; its weight gradient is float32, zero
    off the mask, and equals plain autograd's masked gradient to half-precision accuracy."""
    torch.manual_seed(0)
    x = torch.randn(8, 32, 8, 8, device=device)
    w = torch.randn(64, 32, 3, 3, device=device, requires_grad=True)
    mask = nm_mask(w.detach().abs(), 1, 4)
    with torch.autocast(device, dtype=DTYPES[amp]):
        out = nm_conv2d(x, w, None, mask, None, padding=1, mode=Backward.SPARSE, kernel=kernel)
    assert out.dtype == DTYPES[amp]
    out.float().square().mean().backward()
    assert w.grad.dtype == torch.float32 and (w.grad[~mask] == 0).all()
    w32 = w.detach().clone().requires_grad_()
    F.conv2d(x, w32 * mask, padding=1).square().mean().backward()
    torch.testing.assert_close(w.grad, w32.grad * mask, rtol=5e-2, atol=5e-2 * float(w32.grad.abs().max()))


@pytest.mark.parametrize("mode", list(Backward))
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_linear_gradients_match_plain_autograd(device, amp, mode):
    """Every backward mode of the sparse linear under autocast: input and weight gradients in the
    parameters' dtype (float32), equal to the float32 formula of the mode to half-precision accuracy."""
    torch.manual_seed(0)
    x = torch.randn(16, 64, device=device, requires_grad=True)
    w = torch.randn(32, 64, device=device, requires_grad=True)
    mask = nm_mask(w.detach().abs(), 2, 4)
    grad_mask = torch.rand(w.shape, device=device) < 0.3
    with torch.autocast(device, dtype=DTYPES[amp]):
        out = nm_linear(x, w, None, mask, grad_mask, mode, 0.3, WeightGradKernel.MASKED_DENSE)
    assert out.dtype == DTYPES[amp]
    out.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32
    g_eff = torch.ones(16, 32, device=device).t() @ x.detach()  # dL/dW_eff of sum(x @ W_eff^T)
    expected_w = {Backward.DENSE: g_eff * mask, Backward.STE: g_eff,
                  Backward.SRSTE: g_eff + 0.3 * (~mask) * w.detach(),
                  Backward.SPARSE: g_eff * (mask | grad_mask)}[mode]
    expected_x = torch.ones(16, 32, device=device) @ (w.detach() * mask)
    scale = float(expected_w.abs().max())
    torch.testing.assert_close(w.grad, expected_w, rtol=2e-2, atol=2e-2 * scale)
    torch.testing.assert_close(x.grad, expected_x, rtol=2e-2, atol=2e-2 * float(expected_x.abs().max()))

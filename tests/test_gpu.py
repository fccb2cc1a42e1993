"""CUDA: the backward modes on CUDA against the CPU, no host syncs, torchrun with NCCL.

Mixed precision on CUDA is tested in tests/test_amp.py (its ``cuda`` cases are marked ``gpu`` too).

Deselected by default (``-m gpu`` selects them) and skipped without a CUDA device:

    python -m pytest -m gpu tests/test_gpu.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bame.autograd import Backward, WeightGradKernel, nm_conv2d, nm_linear
from bame.config import BameConfig, MethodConfig
from bame.flops import FlopsLedger
from bame.methods import MethodContext, create_method
from bame.nm import nm_mask
from bame.step import training_step
from bame.runs import load_run

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

QUICK = Path(__file__).resolve().parents[1] / "configs" / "quick.yaml"
SMALL = ["train.progress=false", "data.synthetic_train_size=256", "data.synthetic_test_size=64",
         "train.batch_size=32", "train.eval_batch_size=64", "train.device=cuda", "model.name=lenet5_wide"]


@pytest.fixture(autouse=True)
def _tf32_off(exact_float32):
    """TF32 would make CUDA float32 matmuls/convs differ from the CPU by ~1e-3. (tests/conftest.py)"""


def _grads(fn, x, w, b, device):
    x = x.detach().to(device).requires_grad_()
    w = w.detach().to(device).requires_grad_()
    b = b.detach().to(device).requires_grad_()
    out = fn(x, w, b)
    (out * torch.linspace(-1, 1, out.numel(), device=device).reshape(out.shape)).sum().backward()
    return [t.detach().cpu() for t in (out, x.grad, w.grad, b.grad)]


@pytest.mark.parametrize("kernel", list(WeightGradKernel))
@pytest.mark.parametrize("mode", list(Backward))
@pytest.mark.parametrize("layer", ["conv3x3", "conv1x1_s2", "linear"])
def test_backward_modes_on_cuda_match_the_cpu(mode, kernel, layer):
    torch.manual_seed(0)
    if layer == "linear":
        x, w = torch.randn(12, 64), torch.randn(16, 64)
    elif layer == "conv3x3":
        x, w = torch.randn(4, 16, 9, 9), torch.randn(32, 16, 3, 3)
    else:
        x, w = torch.randn(4, 32, 9, 9), torch.randn(16, 32, 1, 1)
    b = torch.randn(w.shape[0])
    mask = nm_mask(w.abs(), 1, 4)
    grad_mask = torch.rand(w.shape) < 0.2
    results = []
    for device in ("cpu", "cuda"):
        m, g = mask.to(device), grad_mask.to(device)
        if layer == "linear":
            def fn(x, w, b, m=m, g=g):
                return nm_linear(x, w, b, m, g, mode, 0.3, kernel)
        else:
            stride, padding = (2, 0) if layer == "conv1x1_s2" else (1, 1)

            def fn(x, w, b, m=m, g=g, stride=stride, padding=padding):
                return nm_conv2d(x, w, b, m, g, stride=stride, padding=padding, mode=mode, srste_decay=0.3,
                                 kernel=kernel)
        results.append(_grads(fn, x, w, b, device))
    for cpu, cuda, what in zip(*results, ("output", "input grad", "weight grad", "bias grad")):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-4, msg=f"{what}: {layer} {mode} {kernel}")


@pytest.mark.parametrize("method_name", ["static", "bame"])
def test_steady_state_step_with_ledger_does_not_sync(method_name):
    """After warm-up, a normal step (method hooks, ledger, optimizer) issues no synchronising CUDA call."""
    torch.manual_seed(0)
    cfg = MethodConfig(name=method_name, pattern="2:4", bame=BameConfig(interval_steps=4))
    method = create_method(cfg, MethodContext(total_steps=100, steps_per_epoch=10, weight_decay=5e-4))
    from bame import models

    model = method.prepare(models.create("resnet20", num_classes=10, in_channels=3).cuda())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    method.attach_optimizer(opt)
    ledger = FlopsLedger(model)
    x, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 10, (8,), device="cuda")

    def step(t):
        training_step(t, model, method, opt, ledger, x, y)

    for t in range(3):
        step(t)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(3)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_torchrun_two_gpus_nccl(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", "-m", "bame",
           "train", "--config", str(QUICK), "--out", str(tmp_path), "--no-progress", "--set", *SMALL,
           "train.max_steps=6", "train.amp=bf16"]
    out = subprocess.run(cmd, cwd=QUICK.parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (d,) = tmp_path.iterdir()
    r = load_run(d)
    assert r.done and r.summary["world_size"] == 2 and r.summary["flops"]["ranks_summed"] == 2

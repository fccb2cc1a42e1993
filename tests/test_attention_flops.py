"""Attention's QK^T and AV in the FLOPs ledger: closed forms, FlopCounterMode (forward + backward, exactly) on
the small ViT and on DeiT-small at 224, dense in every method, paused / no_grad / detach, and `bame flops`."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bame import models
from bame.attention_flops import attention_backward_macs, attention_forward_macs, attention_modules
from bame.config import load_config
from bame.flops import FlopsLedger
from bame.flops_report import flops_report
from bame.layers import sparsify

pytestmark = pytest.mark.usefixtures("one_thread")

# (model, channels, image size, batch): DeiT-small at its natural 224, batch 1 to stay fast on a CPU
CASES = [("vit_patch4", 1, 28, 2), ("deit_small", 3, 224, 1)]


def _model(name: str, channels: int, size: int, fused: bool) -> nn.Module:
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, in_channels=channels, image_size=size).eval()
    for _, _, attn in attention_modules(model):
        attn.fused_attn = fused  # unfused: QK^T and AV are bmm calls that FlopCounterMode sees on a CPU
    return model


def _step(model: nn.Module, x: torch.Tensor):
    ledger = FlopsLedger(model)
    ledger.begin_step()
    model(x).sum().backward()
    cost = ledger.end_step()
    ledger.detach()
    return cost


def _matmul_rows(cost) -> dict[tuple[str, str], int]:
    return {k: v[0] for k, v in cost.by_layer.items() if k[0].endswith(".attn.matmul")}


def test_closed_forms():
    b, h, n, d = 3, 4, 5, 7
    assert attention_forward_macs(b, h, n, d) == 2 * b * h * n * n * d  # QK^T and AV: B H N^2 d each
    assert attention_backward_macs(b, h, n, d) == 4 * b * h * n * n * d  # dQ, dK, dA, dV


@pytest.mark.parametrize("name,channels,size,batch", CASES)
def test_ledger_equals_flop_counter_mode_forward_and_backward(name, channels, size, batch):
    model = _model(name, channels, size, fused=False)
    x = torch.randn(batch, channels, size, size)
    ledger = FlopsLedger(model)
    with FlopCounterMode(display=False) as fc:
        ledger.begin_step()
        model(x).sum().backward()
        cost = ledger.end_step()
    ledger.detach()
    assert 2 * cost.ideal_macs == fc.get_total_flops()  # every conv, linear and attention matmul
    bmm = sum(v for op, v in fc.get_flop_counts()["Global"].items() if "bmm" in str(op))
    rows = _matmul_rows(cost)
    assert bmm > 0 and 2 * sum(rows.values()) == bmm  # the attention matmuls alone

    tokens = (size // model.patch_embed.proj.kernel_size[0]) ** 2 + 1
    attn = model.blocks[0].attn
    shape = (batch, attn.num_heads, tokens, attn.head_dim)
    blocks = len(model.blocks)
    assert len(rows) == 2 * blocks  # forward and input_grad of every block, no weight_grad
    for i in range(blocks):
        assert rows[(f"blocks.{i}.attn.matmul", "forward")] == attention_forward_macs(*shape)
        assert rows[(f"blocks.{i}.attn.matmul", "input_grad")] == attention_backward_macs(*shape)

    fused = _step(_model(name, channels, size, fused=True), x)  # the count does not depend on the kernel
    assert fused.by_layer == cost.by_layer


def test_attention_is_dense_in_every_method():
    x = torch.randn(2, 1, 28, 28)
    dense = _matmul_rows(_step(_model("vit_patch4", 1, 28, fused=True), x))
    sparse_model = _model("vit_patch4", 1, 28, fused=True)
    sparsify(sparse_model, "1:16")
    cost = _step(sparse_model, x)
    assert _matmul_rows(cost) == dense
    assert all(cost.by_layer[k][1] == v and cost.by_layer[k][2] is False for k, v in dense.items())


def test_paused_no_grad_and_detach():
    model = _model("vit_patch4", 1, 28, fused=True)
    x = torch.randn(2, 1, 28, 28)
    ledger = FlopsLedger(model)
    with ledger.paused():
        model(x).sum().backward()  # evaluation-like: nothing charged, forward or backward
    assert not _matmul_rows(ledger.end_step())
    with torch.no_grad():
        model(x)
    assert set(_matmul_rows(ledger.end_step())) == {(f"blocks.{i}.attn.matmul", "forward") for i in range(6)}
    rows = ledger.epoch_rows(epoch=0, step=2)
    layers = [r["layer"] for r in rows]
    assert layers.index("blocks.0.attn.matmul") < layers.index("blocks.0.attn.qkv")  # model order
    ledger.detach()
    assert all(not m._forward_hooks for _, _, m in attention_modules(model))


def test_bame_flops_lists_the_matmuls_and_its_rows_add_up():
    cfg = load_config("fmnist_vit", ["method.name=srste", "method.pattern=1:16"])
    rep = flops_report(cfg)
    rows = {e["layer"]: e for e in rep["layers"]}
    attn = rows["blocks.0.attn.matmul"]
    assert (attn["kind"], attn["shape"], attn["sparse"], set(attn["step"])) == \
        ("attention", [3, 64], False, {"forward", "input_grad"})
    batch = cfg.train.batch_size
    assert attn["step"]["forward"]["ideal"] == attention_forward_macs(batch, 3, 50, 64)
    assert attn["dense"] == attn["step"]  # dense in every method
    for key, total in (("step", rep["step_macs"]), ("dense", rep["dense_step_macs"])):
        assert sum(ph["ideal"] for e in rep["layers"] for ph in e[key].values()) == total

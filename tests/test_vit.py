"""The timm models: DeiT at 224 and the small ViT, the image size from the data, the one-line error without
timm, the transformer layer policy of ``sparsify``, and one training step of every method."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bame import models
from bame.cli import main
from bame.config import BameConfig, MethodConfig
from bame.flops import FlopsLedger
from bame.layers import NMLayer, NMLinear, sparsify
from bame.methods import METHODS, MethodContext, create_method
from bame.models.vit import TimmNotInstalled
from bame.nm import is_nm
from bame.step import training_step

pytestmark = pytest.mark.usefixtures("one_thread")

TIMM_NAMES = ("deit_tiny", "deit_small", "deit_base", "vit_patch4")
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _vit_params(dim: int, depth: int, heads: int, patch: int, channels: int, classes: int, tokens: int,
                mlp_ratio: int = 4) -> int:
    """Parameters of timm's VisionTransformer (class token, learned position embedding, qkv bias), by hand."""
    hidden = mlp_ratio * dim
    patch_embed = dim * channels * patch * patch + dim
    block = (2 * 2 * dim  # norm1, norm2 (weight + bias)
             + 3 * dim * dim + 3 * dim  # qkv
             + dim * dim + dim  # proj
             + hidden * dim + hidden  # fc1
             + dim * hidden + dim)  # fc2
    return patch_embed + dim + tokens * dim + depth * block + 2 * dim + classes * dim + classes


# (name, dim, depth, heads): DeiT's Table 1
DEIT = [("deit_tiny", 192, 12, 3), ("deit_small", 384, 12, 6), ("deit_base", 768, 12, 12)]


@pytest.mark.parametrize("name,dim,depth,heads", DEIT)
def test_deit_is_built_at_224_with_the_papers_shapes(name, dim, depth, heads):
    model = models.create(name, num_classes=1000)
    tokens = (224 // 16) ** 2 + 1  # 196 patches + the class token
    assert model.pos_embed.shape == (1, tokens, dim)
    assert len(model.blocks) == depth and model.blocks[0].attn.num_heads == heads
    assert sum(p.numel() for p in model.parameters()) == _vit_params(dim, depth, heads, 16, 3, 1000, tokens)


def test_deit_small_forward_at_224():
    model = models.create("deit_small", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 5)


@pytest.mark.parametrize("size", [28, 32])
def test_small_vit_takes_its_image_size_and_channels_from_the_data(size):
    model = models.create("vit_patch4", num_classes=10, in_channels=1, image_size=size)
    tokens = (size // 4) ** 2 + 1
    assert model.pos_embed.shape == (1, tokens, 192)
    assert model.patch_embed.proj.in_channels == 1
    assert sum(p.numel() for p in model.parameters()) == _vit_params(192, 6, 3, 4, 1, 10, tokens)
    assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


def test_image_size_reaches_sized_models_only():
    assert set(TIMM_NAMES) == models.SIZED
    models.create("resnet20", num_classes=10, image_size=28)  # CNNs pool adaptively: not passed to them
    with pytest.raises(ValueError, match=r"image size 30 is not a multiple of its patch size 4 .*28"):
        models.create("vit_patch4", num_classes=10, image_size=30)
    with pytest.raises(ValueError, match="patch size 16"):
        models.create("deit_tiny", num_classes=10, image_size=28)


@pytest.fixture
def no_timm(monkeypatch):
    """As if timm were not installed: ``import timm`` raises ImportError."""
    for mod in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "timm", None)


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_without_timm_a_one_line_error_says_how_to_install_it(no_timm, name):
    with pytest.raises(TimmNotInstalled) as info:
        models.create(name, num_classes=10)
    assert str(info.value) == "the DeiT / ViT models need timm: pip install 'bame[timm]'"
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)
    models.create("resnet20", num_classes=10)  # the rest of the zoo does not need timm


def test_without_timm_the_cli_says_so_in_one_line(no_timm, capsys, tmp_path):
    code = main(["flops", "--set", "model.name=vit_patch4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["bame: error: model.name: the DeiT / ViT models need timm: pip install 'bame[timm]'"]
    out = tmp_path / "runs"
    code = main(["train", "--config", "quick", "--out", str(out), "--set", "model.name=deit_tiny",
                 "data.name=synthetic", "train.max_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["bame: error: model.name: the DeiT / ViT models need timm: pip install 'bame[timm]'"]
    assert not out.exists() or not any(out.iterdir())  # no run folder


# --------------------------------------------------------------------------------------------------
# the layer policy: patch embedding and head dense, qkv / proj / fc1 / fc2 N:M


@pytest.mark.parametrize("pattern", ["2:4", "1:16"])
@pytest.mark.parametrize("name,depth", [("vit_patch4", 6), ("deit_small", 12)])
def test_sparsify_makes_exactly_the_block_linears_nm(name, depth, pattern):
    model = models.create(name, num_classes=10, in_channels=3, image_size=32)
    report = sparsify(model, pattern)
    expected = [f"blocks.{i}.{lin}" for i in range(depth) for lin in BLOCK_LINEARS]
    assert report.sparse_names == expected
    assert all(isinstance(model.get_submodule(n), NMLinear) and str(model.get_submodule(n).pattern) == pattern
               for n in expected)
    rows = {r["name"]: r for r in report.to_rows()}
    assert report.dense_names == ["patch_embed.proj", "head"]
    assert rows["patch_embed.proj"]["reason"] == "first conv, the patch embedding (policy first_conv_dense)"
    assert rows["head"]["reason"] == "classifier, the last linear (policy classifier_dense)"
    assert {rows[n]["reason"] for n in expected} == {f"N:M {pattern}"}


def test_a_cnn_stem_is_called_the_stem():
    report = sparsify(models.create("resnet20", num_classes=10), "2:4")
    assert report.to_rows()[0]["reason"] == "first conv, the stem (policy first_conv_dense)"


# --------------------------------------------------------------------------------------------------
# every method trains the small ViT (a 2-block one, 3 steps)


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_every_method_takes_steps_on_the_small_vit(method_name):
    torch.manual_seed(0)
    model = models.create("vit_patch4", num_classes=10, in_channels=1, image_size=28, depth=2)
    # BAME adapts on every step, in blocks of 2 x 2 groups of each [out, in] weight
    cfg = MethodConfig(name=method_name, pattern="1:4", bame=BameConfig(interval_steps=1, rho=0.5, block_rows=2,
                                                                        block_groups=2, t_f_fraction=1.0))
    method = create_method(cfg, MethodContext(total_steps=4, steps_per_epoch=4, weight_decay=5e-4))
    model = method.prepare(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method.attach_optimizer(opt)
    ledger = FlopsLedger(model)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 1, 28, 28, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    for step in range(3):
        before = {n: (m.weight.detach().clone(), m.mask.clone()) for n, m in model.named_modules()
                  if isinstance(m, NMLayer)}
        out = training_step(step, model, method, opt, ledger, x, y, F.cross_entropy)
        assert torch.isfinite(out.loss)
        assert out.cost.by_layer[("blocks.0.attn.matmul", "forward")][0] > 0
        for n, (w, mask) in before.items():
            layer = model.get_submodule(n)
            dense_phase = method_name == "asp" and not method.pruned  # ASP trains dense before its prune
            if method_name == "lbc":  # the union of its alive combinations: dense until its first cut
                assert layer.mask.float().mean() >= 1 / 4, n
            else:
                assert layer.mask.all() if dense_phase else is_nm(layer.mask, 1, 4), n
            if method_name in ("static", "bame"):  # pruned before and after the step: untouched
                still_pruned = ~mask & ~layer.mask
                assert torch.equal(layer.weight[still_pruned], w[still_pruned]), n
    if method_name == "dense":
        assert not any(isinstance(m, NMLayer) for m in model.modules())
    else:
        assert sum(isinstance(m, NMLayer) for m in model.modules()) == 2 * len(BLOCK_LINEARS)
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, NMLayer)

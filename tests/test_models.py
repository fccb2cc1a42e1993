"""The model zoo: registry, shapes, in_channels, backward, parameter counts, and sparsify's conventions."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from bame import models
from bame.layers import NMLayer, sparsify

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 7  # not 10, so a hard-coded head would show
BATCH = 2
# Natural input size is 32x32 for the CIFAR models; torchvision's ResNets (224 natural) are run at 64
# for speed, which their adaptive pooling allows. The sized models (ViTs) are built for the test's size:
# the small ViT at Fashion-MNIST's 28, DeiT at 32 (2x2 patches of 16; tests/test_vit.py builds them at 224).
TEST_SIZE = {"resnet18": 64, "resnet50": 64, "vit_patch4": 28}
DEFAULT_SIZE = 32

EXPECTED_NAMES = {"resnet20", "resnet32", "resnet56", "wide_resnet32", "mobilenet_v2", "vgg19", "lenet5",
                  "lenet5_wide", "resnet18", "resnet50", "deit_tiny", "deit_small", "deit_base", "vit_patch4"}

ALL = models.available()


def _input(name: str, in_channels: int = 3) -> torch.Tensor:
    size = TEST_SIZE.get(name, DEFAULT_SIZE)
    return torch.randn(BATCH, in_channels, size, size)


def _create(name: str, in_channels: int) -> nn.Module:
    """``name`` for the test's input size (``image_size`` reaches the sized models only)."""
    return models.create(name, num_classes=NUM_CLASSES, in_channels=in_channels,
                         image_size=TEST_SIZE.get(name, DEFAULT_SIZE))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _first_conv_and_classifier(model: nn.Module) -> tuple[nn.Conv2d, nn.Linear]:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return convs[0], linears[-1]


def test_registry_lists_all_names():
    assert sorted(ALL) == ALL
    assert set(ALL) == EXPECTED_NAMES
    assert set(models.MODELS) == EXPECTED_NAMES
    assert all(callable(fn) for fn in models.MODELS.values())


def test_register_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        models.register("resnet20")(lambda num_classes, in_channels=3: nn.Identity())


def test_unknown_name_lists_available_and_suggests_closest():
    with pytest.raises(ValueError) as err:
        models.create("resnet-20", num_classes=10)
    message = str(err.value)
    assert "unknown model 'resnet-20'" in message
    assert "Did you mean 'resnet20'?" in message
    for name in ALL:
        assert name in message


def test_unknown_kwarg_is_not_silently_ignored():
    with pytest.raises(TypeError):
        models.create("resnet20", num_classes=10, no_such_option=1)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("in_channels", [3, 1])
def test_forward_backward_and_in_channels(name, in_channels):
    torch.manual_seed(0)
    model = _create(name, in_channels)
    x = _input(name, in_channels)
    out = model(x)
    assert out.shape == (BATCH, NUM_CLASSES)
    out.square().mean().backward()
    first_conv, classifier = _first_conv_and_classifier(model)
    assert first_conv.in_channels == in_channels
    assert classifier.out_features == NUM_CLASSES
    assert first_conv.weight.grad is not None and classifier.weight.grad is not None
    assert all(p.grad is not None for p in model.parameters())


def test_lenet5_wide_is_nm_at_1_16_in_every_hidden_layer():
    model = models.create("lenet5_wide", num_classes=10, in_channels=1)
    report = sparsify(model, "1:16")
    assert report.sparse_names == ["conv2", "fc1", "fc2"]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("size", [28, 32])
def test_lenet5_takes_mnist_and_cifar_sizes(size):
    model = models.create("lenet5", num_classes=10, in_channels=1)
    assert model(torch.randn(BATCH, 1, size, size)).shape == (BATCH, 10)


# Option-B CIFAR ResNets, 10 classes, counted by hand (weights + BN affine; convs have no bias):
#   3x3 conv a->b: 9ab;  BN c: 2c;  1x1 projection a->b + BN: ab + 2b;  fc w->10: 10w + 10.
#   Block at width w: 2 * 9w^2 + 4w.   First block of a stage a->b: 9ab + 9b^2 + 4b + ab + 2b.
# widths 16/32/64 (stem 3*16*9 + 32 = 464; fc 650):
#   stage 1: n * 4672;  stage 2: 14528 + (n-1) * 18560;  stage 3: 57728 + (n-1) * 73984
#   resnet20 (n=3): 464 + 14016 + 51648 + 205696 + 650 = 272474
#   resnet32 (n=5): 464 + 23360 + 88768 + 353664 + 650 = 466906
#   resnet56 (n=9): 464 + 42048 + 163008 + 649600 + 650 = 855770
# widths 32/64/128, n=5 (stem 3*32*9 + 64 = 928; fc 1290):
#   stage 1: 5 * 18560;  stage 2: 57728 + 4 * 73984;  stage 3: 230144 + 4 * 295424
#   wide_resnet32: 928 + 92800 + 353664 + 1411840 + 1290 = 1860522
# (Option A, zero-padded identity shortcuts, gives the often quoted 0.27M/0.46M/0.85M.)
HAND_COUNTED = {"resnet20": 272_474, "resnet32": 466_906, "resnet56": 855_770, "wide_resnet32": 1_860_522}
COUNT_TOLERANCE = 0.03


@pytest.mark.parametrize("name", sorted(HAND_COUNTED))
def test_cifar_resnet_parameter_counts(name):
    n = _n_params(models.create(name, num_classes=10))
    assert n == pytest.approx(HAND_COUNTED[name], rel=COUNT_TOLERANCE)


def test_cifar_resnet_widths_and_depth():
    assert models.create("wide_resnet32", num_classes=10).widths == (32, 64, 128)
    assert models.create("resnet32", num_classes=10, width_multiplier=2).widths == (32, 64, 128)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        models.resnet_cifar.CifarResNet(21, num_classes=10)


def test_mobilenet_v2_has_torchvision_parameter_count():
    # Strides do not change parameters: the CIFAR variant must match torchvision's MobileNet-V2.
    ours = _n_params(models.create("mobilenet_v2", num_classes=10))
    assert ours == _n_params(torchvision.models.mobilenet_v2(num_classes=10))


def test_mobilenet_v2_cifar_strides_reach_4x4():
    model = models.create("mobilenet_v2", num_classes=10)
    assert model.blocks(model.stem(torch.randn(1, 3, 32, 32))).shape == (1, 320, 4, 4)


def test_vgg19_matches_torchvision_features_less_conv_biases():
    # torchvision's VGG-19-BN features carry a bias per conv channel; ours drop it (BN follows).
    ours = models.create("vgg19", num_classes=10)
    # features only: building the whole torchvision VGG would initialise its 120M-weight 4096-wide head
    tv = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["E"], batch_norm=True)
    conv_biases = sum(m.out_channels for m in tv.modules() if isinstance(m, nn.Conv2d))
    assert _n_params(ours.features) == _n_params(tv) - conv_biases
    assert len([m for m in ours.modules() if isinstance(m, nn.Conv2d)]) == 16


def test_convs_are_kaiming_initialised():
    torch.manual_seed(0)
    model = models.create("vgg19", num_classes=10)
    conv = model.features[-4]  # a 512 -> 512 conv: 2.4M weights, so the std is tight
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.02)


@pytest.mark.parametrize("name", ALL)
def test_sparsify_keeps_first_conv_classifier_and_depthwise_dense(name):
    torch.manual_seed(0)
    model = _create(name, in_channels=1)
    first_conv, classifier = _first_conv_and_classifier(model)
    report = sparsify(model, "2:4")
    assert report.sparse_names, f"{name}: no layer became N:M\n{report}"
    new_first, new_classifier = _first_conv_and_classifier(model)
    assert new_first is first_conv and not isinstance(new_first, NMLayer)
    assert new_classifier is classifier and not isinstance(new_classifier, NMLayer)
    depthwise = [m for m in model.modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    assert all(not isinstance(m, NMLayer) for m in depthwise)
    if name == "mobilenet_v2":
        assert len(depthwise) == 17  # one per inverted-residual block
    with torch.no_grad():
        assert model(_input(name, in_channels=1)).shape == (BATCH, NUM_CLASSES)

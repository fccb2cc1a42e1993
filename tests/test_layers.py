import pytest
import torch
import torchvision
from torch import nn

from bame.autograd import Backward
from bame.layers import LayerPolicy, NMConv2d, NMLinear, nm_layers, sparsify
from bame.nm import is_nm


def _small_net(in_channels: int = 3):
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),  # first conv: dense by policy (K = 27 with 3 channels)
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise: dense by policy
        nn.Conv2d(16, 32, 1),
        nn.Conv2d(32, 30, 3, padding=1),  # K = 288, divisible by 4 and 16
        nn.Conv2d(30, 8, 1),  # K = 30: not divisible by 4 -> dense with a reason
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.Linear(16, 10),  # classifier: dense by policy
    )


def test_sparsify_policy_and_report():
    model = _small_net()
    report = sparsify(model, "2:4")
    reasons = {d.name: d.reason for d in report.layers}
    assert "first conv" in reasons["0"]
    assert "depthwise" in reasons["2"]
    assert "not divisible" in reasons["5"]
    assert "classifier" in reasons["9"]
    assert report.sparse_names == ["3", "4", "8"]
    assert isinstance(model[3], NMConv2d) and isinstance(model[8], NMLinear)
    assert type(model[0]) is nn.Conv2d and type(model[9]) is nn.Linear
    assert "sparse" in str(report) or "N:M" in str(report)
    out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10)


def test_sparsify_copies_weights_and_masks_by_magnitude():
    torch.manual_seed(0)
    model = _small_net()
    w = model[4].weight.detach().clone()
    sparsify(model, "1:4")
    layer = model[4]
    assert torch.equal(layer.weight, w)
    assert is_nm(layer.mask, 1, 4, exact=True)
    # The kept weight of each group is the largest in magnitude.
    kept = (w.abs().reshape(30, -1, 4) * layer.mask.reshape(30, -1, 4)).amax(-1)
    assert torch.equal(kept, w.abs().reshape(30, -1, 4).amax(-1))


@pytest.mark.parametrize("first_conv_dense", [True, False])
@pytest.mark.parametrize("classifier_dense", [True, False])
def test_policy_decides_first_conv_and_classifier(first_conv_dense, classifier_dense):
    model = _small_net(in_channels=4)  # first conv K = 36 and classifier K = 16: both divisible by M = 4
    report = sparsify(model, "2:4", policy=LayerPolicy(first_conv_dense=first_conv_dense,
                                                       classifier_dense=classifier_dense))
    expected = (["0"] if not first_conv_dense else []) + ["3", "4", "8"] + (["9"] if not classifier_dense else [])
    assert report.sparse_names == expected
    assert report.dense_names == [n for n in ["0", "2", "5", "9"] if n not in expected]
    assert isinstance(model[0], NMConv2d) != first_conv_dense
    assert isinstance(model[9], NMLinear) != classifier_dense
    reasons = {d.name: d.reason for d in report.layers}
    assert ("first conv" in reasons["0"]) == first_conv_dense
    assert ("classifier" in reasons["9"]) == classifier_dense
    assert model(torch.randn(2, 4, 8, 8)).shape == (2, 10)


def test_policy_options_and_errors():
    model = _small_net()  # first conv K = 27: the shape keeps it dense even when the policy would not
    report = sparsify(model, "2:4", policy=LayerPolicy(first_conv_dense=False, classifier_dense=False))
    assert report.sparse_names == ["3", "4", "8", "9"]
    assert "not divisible" in {d.name: d.reason for d in report.layers}["0"]
    with pytest.raises(ValueError, match=r"layer '5'.*\(8, 30, 1, 1\) cannot be N:M 2:4"):
        sparsify(_small_net(), "2:4", policy=LayerPolicy(on_indivisible="error"))
    with pytest.raises(ValueError, match="on_indivisible"):
        LayerPolicy(on_indivisible="skip")
    with pytest.raises(ValueError, match="pattern"):
        sparsify(_small_net(), "3:2")


def test_dense_pattern_changes_nothing():
    model = _small_net()
    report = sparsify(model, "4:4")
    assert report.sparse_names == []
    assert not list(nm_layers(model))


def test_state_dict_round_trip_keeps_masks_and_loads_into_fresh_sparsified_model():
    torch.manual_seed(0)
    a = _small_net()
    sparsify(a, "2:4", mask_init="random", generator=torch.Generator().manual_seed(5))
    sd = a.state_dict()
    assert "4.mask" in sd and "4.grad_mask" in sd and sd["4.mask"].dtype == torch.bool
    b = _small_net()
    sparsify(b, "2:4")
    b.load_state_dict(sd)
    assert torch.equal(a[4].mask, b[4].mask)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(a(x), b(x))


def test_forward_uses_masked_weight_and_set_mask_validates():
    torch.manual_seed(0)
    conv = NMConv2d(8, 8, 3, padding=1, pattern="2:4")
    x = torch.randn(1, 8, 5, 5)
    ref = torch.nn.functional.conv2d(x, conv.weight * conv.mask, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), ref)
    with pytest.raises(ValueError, match="not 2:4"):
        conv.set_mask(torch.ones_like(conv.mask))
    with pytest.raises(ValueError, match="shape"):
        conv.set_mask(torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask init"):
        conv.init_mask("best")
    with pytest.raises(ValueError, match=r"\(4, 6\) cannot be N:M 2:4 .*K=6"):
        NMLinear(6, 4, pattern="2:4")


@pytest.mark.parametrize("kernel,dilation,padding", [(3, 1, "same"), ((3, 5), (2, 1), "same"), ((1, 3), 2, "same"),
                                                      (3, 1, "valid"), ((2, 3), 1, "valid")])
def test_string_padding_matches_nn_conv2d(kernel, dilation, padding):
    """'valid' and symmetric 'same' become the equal integers: output, input, weight and bias grads match."""
    torch.manual_seed(0)
    dense = nn.Conv2d(8, 8, kernel, padding=padding, dilation=dilation).double()
    nm = NMConv2d.from_dense(dense, pattern="2:4", backward_mode="dense")
    assert all(isinstance(p, int) for p in nm.padding)
    with torch.no_grad():
        dense.weight.mul_(nm.mask)  # the dense reference uses the masked weight
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [dense(xs[0]), nm(xs[1])]
    if padding == "same":
        assert outs[0].shape[2:] == x.shape[2:]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    for out in outs:
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nm.weight.grad, dense.weight.grad * nm.mask, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nm.bias.grad, dense.bias.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_sparsify_keeps_convs_with_unsupported_padding_dense_and_says_why():
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1),  # first conv: dense by policy
        nn.Conv2d(8, 8, 3, padding="same"),  # symmetric 'same': padding 1, sparse
        nn.Conv2d(8, 8, 3, padding="valid"),  # padding 0, sparse
        nn.Conv2d(8, 8, 2, padding="same"),  # 'same' with an even kernel pads unevenly: dense
        nn.Conv2d(8, 8, (3, 4), padding="same", dilation=(1, 2)),  # even total d*(k-1) = (2, 6): sparse
    )
    x = torch.randn(2, 8, 9, 9)
    ref = model(x)
    report = sparsify(model, "2:4")
    assert report.sparse_names == ["1", "2", "4"]
    assert report.dense_names == ["0", "3"]
    reason = {d.name: d.reason for d in report.layers}["3"]
    assert "padding='same' not supported" in reason and "kernel_size=(2, 2)" in reason
    assert type(model[3]) is nn.Conv2d and model[1].padding == (1, 1) and model[4].padding == (1, 3)
    assert model(x).shape == ref.shape
    with pytest.raises(ValueError, match="padding='same'.*symmetric"):
        NMConv2d(8, 8, 2, padding="same")
    with pytest.raises(ValueError, match="stride 1"):
        NMConv2d(8, 8, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="unknown padding"):
        NMConv2d(8, 8, 3, padding="full")


def test_backward_mode_attribute_drives_the_weight_gradient():
    torch.manual_seed(0)
    lin = NMLinear(16, 4, pattern="1:4", backward_mode="ste")
    assert lin.backward_mode is Backward.STE
    x = torch.randn(8, 16)
    lin(x).sum().backward()
    assert (lin.weight.grad[~lin.mask] != 0).any()  # STE passes the gradient through the mask
    lin.weight.grad = None
    lin.backward_mode = Backward.SPARSE
    lin(x).sum().backward()
    assert (lin.weight.grad[~lin.mask] == 0).all()


def test_torchvision_resnet18_sparsifies_and_trains_one_step():
    model = torchvision.models.resnet18(num_classes=10)
    report = sparsify(model, "2:4")
    assert "conv1" in report.dense_names and "fc" in report.dense_names
    assert len(report.sparse_names) == 19  # 16 block convs + 3 downsample convs
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    for name, layer in nm_layers(model):
        assert (layer.weight.grad[~layer.mask] == 0).all(), name


def test_sparsify_names_cin_in_the_channel_layout_reason():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3), nn.Conv2d(6, 8, 3))
    report = sparsify(model, "2:4", layout="channel", policy=LayerPolicy(first_conv_dense=False, classifier_dense=False))
    reasons = {d.name: d.reason for d in report.layers}
    assert reasons["0"].startswith("Cin/groups not divisible by M=4") and "Cin/groups=3" in reasons["0"]
    assert reasons["1"] == "N:M 2:4"
    assert reasons["2"].startswith("Cin/groups not divisible by M=4")


def test_backward_mask_is_set_in_place_and_stays_out_of_the_state_dict():
    torch.manual_seed(0)
    layer = NMLinear(16, 8, pattern="2:4")
    assert layer.backward_mask is None and layer.backward_order is None
    sd_keys = set(layer.state_dict())
    sub = layer.mask & (torch.rand(8, 16) < 0.5)
    layer.set_backward_mask(sub, torch.arange(8).flip(0))
    buffer = layer.backward_mask
    layer.set_backward_mask(layer.mask)  # written in place, the order dropped
    assert layer.backward_mask is buffer and torch.equal(buffer, layer.mask) and layer.backward_order is None
    assert set(layer.state_dict()) == sd_keys  # a method that sets it rebuilds it from its own state
    with pytest.raises(ValueError, match="backward mask shape"):
        layer.set_backward_mask(torch.ones(8, 8, dtype=torch.bool))
    x = torch.randn(3, 16, requires_grad=True)
    layer.set_backward_mask(sub)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, (layer.weight * sub).sum(0).expand(3, 16))  # dL/dx through W * backward_mask


def test_sparsify_asks_the_methods_own_condition_on_each_layer():
    def cout_of_8(module, pattern):
        return None if module.weight.shape[0] % 8 == 0 else f"Cout={module.weight.shape[0]} is not a multiple of 8"

    torch.manual_seed(0)
    net = _small_net()
    report = sparsify(net, "2:4", layer_problem=cout_of_8)
    reasons = {d.name: d.reason for d in report.layers}
    assert report.sparse_names == ["3", "8"] and reasons["4"] == "Cout=30 is not a multiple of 8"
    with pytest.raises(ValueError, match="layer '4': Cout=30 is not a multiple of 8"):
        sparsify(_small_net(), "2:4", policy=LayerPolicy(on_indivisible="error"), layer_problem=cout_of_8)

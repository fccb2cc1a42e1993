"""N:M sparse layers and ``sparsify``.

``NMConv2d`` / ``NMLinear`` subclass ``nn.Conv2d`` / ``nn.Linear``, so state dicts and torchvision code
keep working. Each carries two boolean buffers that ride along in ``state_dict``:

- ``mask``: the forward mask (``W * mask`` is the weight used in forward and input gradient);
- ``grad_mask``: extra positions whose weight gradient is computed in ``SPARSE`` mode (BAME's
  candidate blocks on an adaptation step; all False otherwise).

A method may also give a layer a **backward mask** (:meth:`NMLayer.set_backward_mask`; Bi-Mask's): the input
gradient then goes through ``W * backward_mask`` instead of ``W * mask``. It is a buffer outside the state
dict (``None`` until set): the method that sets it rebuilds it from its own state.

``backward_mode`` (a :class:`bame.autograd.Backward`) decides what the weight gradient is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from .autograd import Backward, Observer, nm_conv2d, nm_linear
from .kernels import WeightGradKernel
from .nm import Layout, NMPattern, block_grid, is_nm, nm_mask, random_nm_mask

__all__ = ["MASK_INITS", "ON_INDIVISIBLE", "NMLayer", "NMConv2d", "NMLinear", "LayerPolicy", "SparsifyReport", "sparsify", "nm_layers", "mask_table"]


MASK_INITS = ("magnitude", "random")  # top-N |W| of each group, or a random N:M mask
ON_INDIVISIBLE = ("dense", "error")  # a layer whose K is no multiple of M: keep it dense (and say why), or refuse


class NMLayer:
    """What NMConv2d and NMLinear share: pattern, layout, mask buffers, backward mode."""

    weight: torch.Tensor
    mask: torch.Tensor
    grad_mask: torch.Tensor
    backward_mask: Optional[torch.Tensor]  # the input gradient's mask when it has its own (None: ``mask``)
    backward_order: Optional[torch.Tensor]  # int64 [Cout]: the output-channel order it is N:M along (None: as is)

    def _init_nm(self, pattern: NMPattern | str, layout: Layout | str, backward_mode: Backward | str,
                 srste_decay: float, mask_init: str, weight_grad_kernel: WeightGradKernel | str) -> None:
        self.pattern = NMPattern.parse(pattern)
        self.layout = Layout.parse(layout)
        block_grid(self.weight.shape, self.pattern.m, layout=self.layout, n=self.pattern.n)  # raises if not groupable
        self.backward_mode = Backward.parse(backward_mode)
        self.srste_decay = float(srste_decay)
        self.weight_grad_kernel = WeightGradKernel(weight_grad_kernel)
        self.observer: Optional[Observer] = None
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.register_buffer("grad_mask", torch.zeros_like(self.weight, dtype=torch.bool))
        self.register_buffer("backward_mask", None, persistent=False)
        self.register_buffer("backward_order", None, persistent=False)
        self.init_mask(mask_init)

    @torch.no_grad()
    def init_mask(self, how: str = "magnitude", generator: Optional[torch.Generator] = None) -> None:
        """Set the mask to top-N magnitude of the current weights (``magnitude``) or random N:M."""
        n, m = self.pattern.n, self.pattern.m
        if how == "magnitude":
            new = nm_mask(self.weight.abs(), n, m, self.layout)
        elif how == "random":
            new = random_nm_mask(self.weight.shape, n, m, generator, self.layout).to(self.weight.device)
        else:
            raise ValueError(f"unknown mask init {how!r}: use 'magnitude' or 'random'")
        self.mask.copy_(new)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the forward mask; it must have the weight's shape and obey the layer's pattern."""
        if mask.shape != self.weight.shape:
            raise ValueError(f"{type(self).__name__}: mask shape {tuple(mask.shape)} != weight shape "
                             f"{tuple(self.weight.shape)}")
        if not is_nm(mask, self.pattern.n, self.pattern.m, self.layout):
            raise ValueError(f"{type(self).__name__} of shape {tuple(self.weight.shape)}: mask is not "
                             f"{self.pattern} in layout {self.layout.value}")
        self.mask.copy_(mask.to(torch.bool))

    @torch.no_grad()
    def set_backward_mask(self, mask: torch.Tensor, order: Optional[torch.Tensor] = None) -> None:
        """Let the input gradient go through ``W * mask`` (bool, the weight's shape) from now on; ``order``
        (int64 ``[Cout]``) is the output-channel order along which ``mask`` is N:M, for the FLOPs ledger's
        ``nm_on_reduction`` flag (None: the channels as they are). Written in place once set."""
        if mask.shape != self.weight.shape:
            raise ValueError(f"{type(self).__name__}: backward mask shape {tuple(mask.shape)} != weight shape "
                             f"{tuple(self.weight.shape)}")
        if self.backward_mask is None:
            self.backward_mask = torch.zeros_like(self.weight, dtype=torch.bool)
        self.backward_mask.copy_(mask)
        if order is None:
            self.backward_order = None
        elif self.backward_order is None:
            self.backward_order = order.to(self.weight.device, torch.long).clone()
        else:
            self.backward_order.copy_(order)

    @torch.no_grad()
    def adopt(self, dense: nn.Module, mask_init: str = "magnitude",
              generator: Optional[torch.Generator] = None) -> None:
        """Copy ``dense``'s weight (and bias), then set the mask from the copied weights."""
        self.weight.copy_(dense.weight)
        if dense.bias is not None:
            self.bias.copy_(dense.bias)
        self.init_mask(mask_init, generator)

    def masked_weight(self) -> torch.Tensor:
        """``W * mask``: the weight the forward pass uses."""
        return self.weight * self.mask

    def nm_extra_repr(self) -> str:
        return f"pattern={self.pattern}, layout={self.layout.value}, backward={self.backward_mode.value}"


def _constructor_kwargs(nm_kwargs: dict) -> dict:
    """``from_dense`` kwargs less those applied after the weights are copied (mask init, generator)."""
    return {k: v for k, v in nm_kwargs.items() if k not in ("mask_init", "generator")}


def _numeric_padding(padding, kernel_size, stride, dilation):
    """``padding`` as ``nn.Conv2d`` takes it, with ``'valid'`` and ``'same'`` turned into the equal integers.

    ``'valid'`` is 0. ``'same'`` (stride 1 only, as in PyTorch) pads ``d * (k - 1)`` in total per dim,
    ``total // 2`` on the left; that is an ordinary symmetric padding when the total is even. An odd total
    (an even kernel with odd dilation) pads one side more, which ``nm_conv2d`` does not do: ``ValueError``.
    """
    if not isinstance(padding, str):
        return padding
    if padding == "valid":
        return (0, 0)
    if padding != "same":
        raise ValueError(f"NMConv2d: unknown padding {padding!r}: use 'valid', 'same' or integers")
    if any(s != 1 for s in _pair(stride)):
        raise ValueError(f"NMConv2d: padding='same' needs stride 1, got stride={stride!r}")
    totals = [d * (k - 1) for k, d in zip(_pair(kernel_size), _pair(dilation))]
    if any(t % 2 for t in totals):
        raise ValueError(f"NMConv2d cannot do padding='same' for kernel_size={kernel_size!r}, "
                         f"dilation={dilation!r}: it pads d*(k-1)={tuple(totals)} in total, one more on the "
                         f"right than on the left, and only symmetric padding is supported")
    return tuple(t // 2 for t in totals)


def _padding_problem(conv: nn.Conv2d) -> Optional[str]:
    """Why NMConv2d cannot take ``conv``'s padding (``None`` when it can)."""
    try:
        _numeric_padding(conv.padding, conv.kernel_size, conv.stride, conv.dilation)
    except ValueError as err:
        return str(err)
    return None


class NMConv2d(nn.Conv2d, NMLayer):
    """``nn.Conv2d`` with an N:M forward mask and a chosen backward mode.

    String padding becomes the equal integers (``'valid'``: 0; ``'same'``: ``d * (k - 1) / 2`` per side, for
    stride 1 and an even ``d * (k - 1)`` only; see :func:`_numeric_padding`), so ``padding`` is numeric.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 pattern: NMPattern | str = "2:4", layout: Layout | str = Layout.ROW,
                 backward_mode: Backward | str = Backward.SPARSE, srste_decay: float = 2e-4,
                 mask_init: str = "magnitude",
                 weight_grad_kernel: WeightGradKernel | str = WeightGradKernel.MASKED_DENSE,
                 device=None, dtype=None) -> None:
        if padding_mode != "zeros":
            raise ValueError(f"NMConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        padding = _numeric_padding(padding, kernel_size, stride, dilation)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self._init_nm(pattern, layout, backward_mode, srste_decay, mask_init, weight_grad_kernel)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, **nm_kwargs) -> NMConv2d:
        """An NMConv2d with ``conv``'s hyper-parameters and a copy of its weights."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype, mask_init="magnitude",
                    **_constructor_kwargs(nm_kwargs))
        layer.adopt(conv, nm_kwargs.get("mask_init", "magnitude"), nm_kwargs.get("generator"))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nm_conv2d(x, self.weight, self.bias, self.mask, self.grad_mask, self.stride, self.padding,
                         self.dilation, self.groups, self.backward_mode, self.srste_decay,
                         self.weight_grad_kernel, self.observer, self.backward_mask)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.nm_extra_repr()


class NMLinear(nn.Linear, NMLayer):
    """``nn.Linear`` with an N:M forward mask and a chosen backward mode."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 pattern: NMPattern | str = "2:4", layout: Layout | str = Layout.ROW,
                 backward_mode: Backward | str = Backward.SPARSE, srste_decay: float = 2e-4,
                 mask_init: str = "magnitude",
                 weight_grad_kernel: WeightGradKernel | str = WeightGradKernel.MASKED_DENSE,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_nm(pattern, layout, backward_mode, srste_decay, mask_init, weight_grad_kernel)

    @classmethod
    def from_dense(cls, linear: nn.Linear, **nm_kwargs) -> NMLinear:
        """An NMLinear with ``linear``'s shape and a copy of its weights."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, mask_init="magnitude",
                    **_constructor_kwargs(nm_kwargs))
        layer.adopt(linear, nm_kwargs.get("mask_init", "magnitude"), nm_kwargs.get("generator"))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nm_linear(x, self.weight, self.bias, self.mask, self.grad_mask, self.backward_mode,
                         self.srste_decay, self.weight_grad_kernel, self.observer, self.backward_mask)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.nm_extra_repr()


@dataclass(frozen=True)
class LayerPolicy:
    """Which conv/linear layers become N:M (method.md: first conv, classifier and depthwise stay dense)."""

    first_conv_dense: bool = True
    classifier_dense: bool = True
    depthwise_dense: bool = True
    on_indivisible: str = "dense"  # 'dense': keep a layer whose K % M != 0 dense and record why; 'error'

    def __post_init__(self) -> None:
        if self.on_indivisible not in ON_INDIVISIBLE:
            raise ValueError(f"LayerPolicy.on_indivisible must be 'dense' or 'error', got {self.on_indivisible!r}")


@dataclass
class LayerDecision:
    name: str
    kind: str  # 'conv' | 'linear'
    shape: tuple[int, ...]
    sparse: bool
    reason: str


@dataclass
class SparsifyReport:
    """What ``sparsify`` changed and why it left the rest dense."""

    pattern: NMPattern
    layers: list[LayerDecision] = field(default_factory=list)

    @property
    def sparse_names(self) -> list[str]:
        return [d.name for d in self.layers if d.sparse]

    @property
    def dense_names(self) -> list[str]:
        return [d.name for d in self.layers if not d.sparse]

    def to_rows(self) -> list[dict]:
        return [dict(name=d.name, kind=d.kind, shape="x".join(map(str, d.shape)), sparse=d.sparse,
                     reason=d.reason) for d in self.layers]

    def __str__(self) -> str:
        lines = [f"sparsify {self.pattern}: {len(self.sparse_names)} sparse, {len(self.dense_names)} dense"]
        for d in self.layers:
            lines.append(f"  {'N:M ' if d.sparse else 'dense'}  {d.name:<40} {str(d.shape):<22} {d.reason}")
        return "\n".join(lines)


def _first_conv_role(conv: nn.Conv2d) -> str:
    """'patch embedding' for a conv that cuts the image into non-overlapping patches (stride = kernel, no
    padding: a ViT's ``patch_embed.proj``), else 'stem'."""
    patchify = tuple(conv.stride) == tuple(conv.kernel_size) and conv.padding in ("valid", (0, 0))
    return "patch embedding" if patchify else "stem"


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def sparsify(model: nn.Module, pattern: NMPattern | str, *, policy: LayerPolicy = LayerPolicy(),
             layout: Layout | str = Layout.ROW, backward_mode: Backward | str = Backward.SPARSE,
             srste_decay: float = 2e-4, mask_init: str = "magnitude",
             weight_grad_kernel: WeightGradKernel | str = WeightGradKernel.MASKED_DENSE,
             generator: Optional[torch.Generator] = None,
             layer_problem: Optional[Callable[[nn.Module, NMPattern], Optional[str]]] = None) -> SparsifyReport:
    """Swap eligible ``nn.Conv2d`` / ``nn.Linear`` of ``model`` (in place) for NM layers.

    The first conv and the last linear (the classifier) stay dense by default, so do depthwise convs
    and layers whose reduction size K is not a multiple of M. ``layer_problem(module, pattern)``, a method's
    own condition on a layer (Bi-Mask: ``Cout`` a multiple of M), says why a layer cannot be N:M (None: it
    can); such a layer is handled as an indivisible one (``policy.on_indivisible``). Returns a report of
    every decision.
    """
    pattern = NMPattern.parse(pattern)
    layout = Layout.parse(layout)
    report = SparsifyReport(pattern)
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    convs = [n for n, m in candidates if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in candidates if isinstance(m, nn.Linear)]
    first_conv = convs[0] if convs else None
    classifier = linears[-1] if linears else None
    nm_kwargs = dict(pattern=pattern, layout=layout, backward_mode=backward_mode, srste_decay=srste_decay,
                     mask_init=mask_init, weight_grad_kernel=weight_grad_kernel, generator=generator)
    for name, module in candidates:
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        shape = tuple(module.weight.shape)
        reason = None
        if isinstance(module, NMLayer):
            reason = "already N:M"
        elif pattern.is_dense:
            reason = f"pattern {pattern} is dense"
        elif policy.first_conv_dense and name == first_conv:
            reason = f"first conv, the {_first_conv_role(module)} (policy first_conv_dense)"
        elif policy.classifier_dense and name == classifier:
            reason = "classifier, the last linear (policy classifier_dense)"
        elif kind == "conv" and module.groups > 1 and module.groups == module.in_channels and policy.depthwise_dense:
            reason = "depthwise conv (policy depthwise_dense)"
        elif kind == "conv" and module.padding_mode != "zeros":
            reason = f"padding_mode={module.padding_mode!r} not supported"
        elif kind == "conv" and (problem := _padding_problem(module)) is not None:
            reason = f"padding={module.padding!r} not supported ({problem})"
        else:
            try:
                block_grid(module.weight.shape, pattern.m, layout=layout, n=pattern.n)
            except ValueError as err:
                if policy.on_indivisible == "error":
                    raise ValueError(f"layer {name!r}: {err}") from None
                what = "Cin/groups" if layout is Layout.CHANNEL else "K"
                reason = f"{what} not divisible by M={pattern.m} ({err})"
            if reason is None and layer_problem is not None and (problem := layer_problem(module, pattern)):
                if policy.on_indivisible == "error":
                    raise ValueError(f"layer {name!r}: {problem}")
                reason = problem
        if reason is None:
            cls = NMConv2d if kind == "conv" else NMLinear
            _set_submodule(model, name, cls.from_dense(module, **nm_kwargs))
            report.layers.append(LayerDecision(name, kind, shape, True, f"N:M {pattern}"))
        else:
            report.layers.append(LayerDecision(name, kind, shape, isinstance(module, NMLayer), reason))
    return report


def nm_layers(model: nn.Module) -> Iterator[tuple[str, NMLayer]]:
    """``(name, layer)`` for every N:M layer of ``model``, in registration order."""
    for name, module in model.named_modules():
        if isinstance(module, NMLayer):
            yield name, module


@torch.no_grad()
def mask_table(model: nn.Module) -> list[dict]:
    """Per N:M layer of ``model``: its name, shape, pattern, mask density, whether every group keeps exactly N,
    and whether the weight the forward uses (``W * mask``) is zero everywhere the mask is not."""
    return [{"layer": name, "shape": "x".join(map(str, layer.weight.shape)), "pattern": str(layer.pattern),
             "density": layer.mask.float().mean().item(),
             "exactly N per group": is_nm(layer.mask, layer.pattern.n, layer.pattern.m, layer.layout, exact=True),
             "zeros outside the mask": bool((layer.masked_weight()[~layer.mask] == 0).all())}
            for name, layer in nm_layers(model)]

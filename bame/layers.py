"""N:M sparse layers and ``sparsify``.

``NMConv2d`` / ``NMLinear`` subclass ``nn.Conv2d`` / ``nn.Linear``, so state dicts and torchvision code
keep working. Each carries two boolean buffers that ride along in ``state_dict``:

- ``mask``: the forward mask (``W * mask`` is the weight used in forward and input gradient);
- ``grad_mask``: extra positions whose weight gradient is computed in ``SPARSE`` mode (BAME's
  candidate blocks on an adaptation step; all False otherwise).

``backward_mode`` (a :class:`bame.autograd.Backward`) decides what the weight gradient is. Each layer has
its own pattern (``method.layer_patterns`` may give layers different ones) and a mask structure: ``row``
(N:M along K) or ``transposable`` (N:M along K and along Cout in every M x M tile, :mod:`bame.transposable`).

A method may also give a layer a **backward mask** (:meth:`NMLayer.set_backward_mask`; Bi-Mask's): the input
gradient then goes through ``W * backward_mask`` instead of ``W * mask``. It is a buffer outside the state
dict (``None`` until set): the method that sets it rebuilds it from its own state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from .autograd import Backward, Observer, nm_conv2d, nm_linear
from .forward_kernels import FORWARD, INPUT_GRAD, WEIGHT_GRAD, ForwardKernel, SparseKernels
from .contract import DENSE_PATTERN, MASK_STRUCTURES, ROW_MASKS, TRANSPOSABLE
from .kernels import WeightGradKernel
from .layer_patterns import LayerRule, decide
from .nm import Layout, NMPattern, block_grid, is_nm, nm_mask
from .transposable import check_transposable, is_transposable_nm, transposable_mask

__all__ = ["MASK_INITS", "ON_INDIVISIBLE", "MASK_STRUCTURES", "NMLayer", "NMConv2d", "NMLinear", "LayerPolicy",
           "SparsifyReport", "sparsify", "nm_layers", "mask_table"]


MASK_INITS = ("magnitude", "random")  # the mask that keeps the most |W|, or a random one (of the layer's structure)
# a layer whose K (or, for transposable masks, Cout) is no multiple of M: keep it dense (and say why), or refuse
ON_INDIVISIBLE = ("dense", "error")


class NMLayer:
    """What NMConv2d and NMLinear share: pattern, layout, mask structure, mask buffers, backward mode."""

    weight: torch.Tensor
    mask: torch.Tensor
    grad_mask: torch.Tensor
    backward_mask: Optional[torch.Tensor]  # the input gradient's mask when it has its own (None: ``mask``)
    backward_order: Optional[torch.Tensor]  # int64 [Cout]: the output-channel order it is N:M along (None: as is)

    def _init_nm(self, pattern: NMPattern | str, layout: Layout | str, backward_mode: Backward | str,
                 srste_decay: float, mask_init: Optional[str], weight_grad_kernel: WeightGradKernel | str,
                 forward_kernel: ForwardKernel | str = ForwardKernel.MASKED_DENSE,
                 input_grad_kernel: ForwardKernel | str = ForwardKernel.MASKED_DENSE,
                 compile_kernels: bool = False, mask_structure: str = ROW_MASKS) -> None:
        self.pattern = NMPattern.parse(pattern)
        self.layout = Layout.parse(layout)
        block_grid(self.weight.shape, self.pattern.m, layout=self.layout, n=self.pattern.n)  # raises if not groupable
        if mask_structure not in MASK_STRUCTURES:
            raise ValueError(f"unknown mask structure {mask_structure!r}: use one of {list(MASK_STRUCTURES)}")
        self.mask_structure = mask_structure
        if self.transposable:  # raises naming shape and pattern unless Cout (per conv group) tiles by M
            check_transposable(self.weight.shape, self.pattern.n, self.pattern.m, self.layout, getattr(self, "groups", 1))
        self.backward_mode = Backward.parse(backward_mode)
        self.srste_decay = float(srste_decay)
        # forward / input-gradient / weight-gradient kernels, and what ran them (sparsify.csv)
        self.sparse_kernels = SparseKernels(forward_kernel, input_grad_kernel, self.pattern, self.layout,
                                            compile_kernels, weight_grad_kernel)
        self.observer: Optional[Observer] = None
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.register_buffer("grad_mask", torch.zeros_like(self.weight, dtype=torch.bool))
        self.register_buffer("backward_mask", None, persistent=False)
        self.register_buffer("backward_order", None, persistent=False)
        if mask_init is not None:  # None: from_dense sets the mask once the weights are copied
            self.init_mask(mask_init)

    @property
    def transposable(self) -> bool:
        """Whether the mask is N:M along Cout too, in every M x M tile (``mask_structure: transposable``)."""
        return self.mask_structure == TRANSPOSABLE

    @torch.no_grad()
    def structured_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """The mask of this layer's pattern and structure keeping the most ``sum scores * mask``: the top N
        of every group (``row``), or the best transposable mask of every tile (an exact search,
        :func:`bame.transposable.transposable_mask`). ``scores``: the weight's shape, e.g. ``|W|``."""
        n, m = self.pattern.n, self.pattern.m
        if self.transposable:
            return transposable_mask(scores, n, m, self.layout)
        return nm_mask(scores, n, m, self.layout)

    @torch.no_grad()
    def init_mask(self, how: str = "magnitude", generator: Optional[torch.Generator] = None) -> None:
        """Set the mask from the magnitudes of the current weights (``magnitude``: :meth:`structured_mask` of
        ``|W|``) or from random scores (``random``: :meth:`structured_mask` of uniform scores drawn on the CPU
        from ``generator``; for ``row`` a uniformly random N:M mask, for ``transposable`` a random valid one,
        not uniform over them)."""
        if how == "magnitude":
            new = self.structured_mask(self.weight.abs())
        elif how == "random":
            new = self.structured_mask(torch.rand(tuple(self.weight.shape), generator=generator)).to(self.weight.device)
        else:
            raise ValueError(f"unknown mask init {how!r}: use 'magnitude' or 'random'")
        self.mask.copy_(new)

    def obeys(self, mask: torch.Tensor) -> bool:
        """``mask`` keeps at most N of every group, and under ``transposable`` of every tile's column too."""
        n, m = self.pattern.n, self.pattern.m
        return is_nm(mask, n, m, self.layout) and (not self.transposable or is_transposable_nm(mask, n, m, self.layout))

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the forward mask; it must have the weight's shape and obey the layer's pattern and structure."""
        if mask.shape != self.weight.shape:
            raise ValueError(f"{type(self).__name__}: mask shape {tuple(mask.shape)} != weight shape "
                             f"{tuple(self.weight.shape)}")
        if not self.obeys(mask):
            what = "transposable " if self.transposable else ""
            raise ValueError(f"{type(self).__name__} of shape {tuple(self.weight.shape)}: mask is not "
                             f"{what}{self.pattern} in layout {self.layout.value}")
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

    @property
    def weight_grad_kernel(self) -> WeightGradKernel:
        """How backward mode ``sparse`` computes the weight gradient (``method.weight_grad_kernel``)."""
        return self.sparse_kernels.weight_grad

    def _sparse_kernels_in_use(self) -> Optional[SparseKernels]:
        """The kernel settings, or ``None`` when every phase runs masked dense (the plain path)."""
        return self.sparse_kernels if self.sparse_kernels.in_use else None

    def masked_weight(self) -> torch.Tensor:
        """``W * mask``: the weight the forward pass uses."""
        return self.weight * self.mask

    def nm_extra_repr(self) -> str:
        structure = f", mask_structure={self.mask_structure}" if self.transposable else ""
        return f"pattern={self.pattern}, layout={self.layout.value}{structure}, backward={self.backward_mode.value}"


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
                 mask_init: Optional[str] = "magnitude",
                 weight_grad_kernel: WeightGradKernel | str = WeightGradKernel.MASKED_DENSE,
                 forward_kernel: ForwardKernel | str = ForwardKernel.MASKED_DENSE,
                 input_grad_kernel: ForwardKernel | str = ForwardKernel.MASKED_DENSE,
                 compile_kernels: bool = False, mask_structure: str = ROW_MASKS, device=None, dtype=None) -> None:
        if padding_mode != "zeros":
            raise ValueError(f"NMConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        padding = _numeric_padding(padding, kernel_size, stride, dilation)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self._init_nm(pattern, layout, backward_mode, srste_decay, mask_init, weight_grad_kernel, forward_kernel,
                      input_grad_kernel, compile_kernels, mask_structure)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, **nm_kwargs) -> NMConv2d:
        """An NMConv2d with ``conv``'s hyper-parameters and a copy of its weights."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype, mask_init=None,
                    **_constructor_kwargs(nm_kwargs))
        layer.adopt(conv, nm_kwargs.get("mask_init", "magnitude"), nm_kwargs.get("generator"))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nm_conv2d(x, self.weight, self.bias, self.mask, self.grad_mask, self.stride, self.padding,
                         self.dilation, self.groups, self.backward_mode, self.srste_decay,
                         self.weight_grad_kernel, self.observer, self._sparse_kernels_in_use(),
                         self.backward_mask)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.nm_extra_repr()


class NMLinear(nn.Linear, NMLayer):
    """``nn.Linear`` with an N:M forward mask and a chosen backward mode."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 pattern: NMPattern | str = "2:4", layout: Layout | str = Layout.ROW,
                 backward_mode: Backward | str = Backward.SPARSE, srste_decay: float = 2e-4,
                 mask_init: Optional[str] = "magnitude",
                 weight_grad_kernel: WeightGradKernel | str = WeightGradKernel.MASKED_DENSE,
                 forward_kernel: ForwardKernel | str = ForwardKernel.MASKED_DENSE,
                 input_grad_kernel: ForwardKernel | str = ForwardKernel.MASKED_DENSE,
                 compile_kernels: bool = False, mask_structure: str = ROW_MASKS, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_nm(pattern, layout, backward_mode, srste_decay, mask_init, weight_grad_kernel, forward_kernel,
                      input_grad_kernel, compile_kernels, mask_structure)

    @classmethod
    def from_dense(cls, linear: nn.Linear, **nm_kwargs) -> NMLinear:
        """An NMLinear with ``linear``'s shape and a copy of its weights."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, mask_init=None,
                    **_constructor_kwargs(nm_kwargs))
        layer.adopt(linear, nm_kwargs.get("mask_init", "magnitude"), nm_kwargs.get("generator"))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nm_linear(x, self.weight, self.bias, self.mask, self.grad_mask, self.backward_mode,
                         self.srste_decay, self.weight_grad_kernel, self.observer, self._sparse_kernels_in_use(),
                         self.backward_mask)

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
    pattern: str = DENSE_PATTERN  # the layer's own pattern, "2:4"; "dense" for a dense layer
    rule: str = ""  # the per-layer rule that decided it (LayerRule.source); "" for the global pattern


@dataclass
class SparsifyReport:
    """What ``sparsify`` changed and why it left the rest dense."""

    pattern: NMPattern  # the global pattern (layers that no per-layer rule matches)
    layers: list[LayerDecision] = field(default_factory=list)
    mask_structure: str = ROW_MASKS

    @property
    def sparse_names(self) -> list[str]:
        return [d.name for d in self.layers if d.sparse]

    @property
    def dense_names(self) -> list[str]:
        return [d.name for d in self.layers if not d.sparse]

    def to_rows(self, model: Optional[nn.Module] = None) -> list[dict]:
        """One row per decision; with ``model``, what ran the forward and input gradient of its N:M layers."""
        kernels = {n: layer.sparse_kernels for n, layer in nm_layers(model)} if model is not None else {}
        return [dict(name=d.name, kind=d.kind, shape="x".join(map(str, d.shape)), sparse=d.sparse,
                     reason=d.reason, pattern=d.pattern, rule=d.rule,
                     forward_kernel=kernels[d.name].describe(FORWARD) if d.name in kernels else "",
                     input_grad_kernel=kernels[d.name].describe(INPUT_GRAD) if d.name in kernels else "",
                     weight_grad_kernel=kernels[d.name].describe(WEIGHT_GRAD) if d.name in kernels else "")
                for d in self.layers]

    def __str__(self) -> str:
        structure = f", {self.mask_structure} masks" if self.mask_structure != ROW_MASKS else ""
        lines = [f"sparsify {self.pattern}{structure}: {len(self.sparse_names)} sparse, {len(self.dense_names)} dense"]
        for d in self.layers:
            lines.append(f"  {d.pattern:<5}  {d.name:<40} {str(d.shape):<22} {d.reason}")
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


def _policy_reason(name: str, module: nn.Module, policy: LayerPolicy, first_conv: Optional[str],
                   classifier: Optional[str]) -> Optional[str]:
    """Why the layer policy keeps a layer that no per-layer rule names dense (None: it does not)."""
    if policy.first_conv_dense and name == first_conv:
        return f"first conv, the {_first_conv_role(module)} (policy first_conv_dense)"
    if policy.classifier_dense and name == classifier:
        return "classifier, the last linear (policy classifier_dense)"
    if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels and policy.depthwise_dense:
        return "depthwise conv (policy depthwise_dense)"
    return None


def _shape_reason(name: str, module: nn.Module, pattern: NMPattern, layout: Layout, mask_structure: str,
                  policy: LayerPolicy) -> Optional[str]:
    """Why ``module`` cannot be N:M ``pattern`` (None: it can); raises under ``on_indivisible: error``."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} not supported"
        if (problem := _padding_problem(module)) is not None:
            return f"padding={module.padding!r} not supported ({problem})"
    try:
        block_grid(module.weight.shape, pattern.m, layout=layout, n=pattern.n)
    except ValueError as err:
        if policy.on_indivisible == "error":
            raise ValueError(f"layer {name!r}: {err}") from None
        what = "Cin/groups" if layout is Layout.CHANNEL else "K"
        return f"{what} not divisible by M={pattern.m} ({err})"
    if mask_structure == TRANSPOSABLE:
        try:
            check_transposable(module.weight.shape, pattern.n, pattern.m, layout, getattr(module, "groups", 1))
        except ValueError as err:
            if policy.on_indivisible == "error":
                raise ValueError(f"layer {name!r}: {err}") from None
            return f"Cout={module.weight.shape[0]} does not tile by M={pattern.m} for transposable masks ({err})"
    return None


def sparsify(model: nn.Module, pattern: NMPattern | str, *, policy: LayerPolicy = LayerPolicy(),
             layout: Layout | str = Layout.ROW, backward_mode: Backward | str = Backward.SPARSE,
             srste_decay: float = 2e-4, mask_init: str = "magnitude",
             weight_grad_kernel: WeightGradKernel | str = WeightGradKernel.MASKED_DENSE,
             forward_kernel: ForwardKernel | str = ForwardKernel.MASKED_DENSE,
             input_grad_kernel: ForwardKernel | str = ForwardKernel.MASKED_DENSE, compile_kernels: bool = False,
             generator: Optional[torch.Generator] = None, rules: Sequence[LayerRule] = (),
             mask_structure: str = ROW_MASKS,
             layer_problem: Optional[Callable[[nn.Module, NMPattern], Optional[str]]] = None) -> SparsifyReport:
    """Swap eligible ``nn.Conv2d`` / ``nn.Linear`` of ``model`` (in place) for NM layers.

    Each layer's pattern: the first of ``rules`` (:mod:`bame.layer_patterns`) that matches its name, else
    ``pattern``. A rule decides even for the layers the policy keeps dense (a researcher who names a layer
    means it); a layer no rule matches follows the policy: the first conv and the last linear (the
    classifier) stay dense by default, so do depthwise convs. Any layer stays dense where its pattern is
    dense, or its K is not a multiple of M (or, with ``mask_structure='transposable'``, its Cout per conv
    group), unless ``policy.on_indivisible='error'`` (then ``ValueError``). ``layer_problem(module, pattern)``, a
    method's own condition on a layer (Bi-Mask: ``Cout`` a multiple of M), says why a layer cannot be N:M
    (None: it can); such a layer is handled as an indivisible one. Returns a report of every decision.
    """
    pattern = NMPattern.parse(pattern)
    layout = Layout.parse(layout)
    if mask_structure not in MASK_STRUCTURES:
        raise ValueError(f"unknown mask structure {mask_structure!r}: use one of {list(MASK_STRUCTURES)}")
    report = SparsifyReport(pattern, mask_structure=mask_structure)
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    convs = [n for n, m in candidates if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in candidates if isinstance(m, nn.Linear)]
    first_conv = convs[0] if convs else None
    classifier = linears[-1] if linears else None
    nm_kwargs = dict(layout=layout, backward_mode=backward_mode, srste_decay=srste_decay, mask_init=mask_init,
                     weight_grad_kernel=weight_grad_kernel, forward_kernel=forward_kernel,
                     input_grad_kernel=input_grad_kernel, compile_kernels=compile_kernels, generator=generator,
                     mask_structure=mask_structure)
    for name, module in candidates:
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        shape = tuple(module.weight.shape)
        decision = decide(name, rules, None if pattern.is_dense else pattern)
        rule = rules[decision.rule] if decision.rule is not None else None
        own = decision.pattern  # None: dense
        if isinstance(module, NMLayer):
            report.layers.append(LayerDecision(name, kind, shape, True, "already N:M", str(module.pattern)))
            continue
        if rule is None:
            reason = (f"pattern {pattern} is dense" if own is None
                      else _policy_reason(name, module, policy, first_conv, classifier))
        else:
            reason = decision.reason if own is None else None
        if reason is None:
            reason = _shape_reason(name, module, own, layout, mask_structure, policy)
        if reason is None and layer_problem is not None and (problem := layer_problem(module, own)):
            if policy.on_indivisible == "error":
                raise ValueError(f"layer {name!r}: {problem}")
            reason = problem
        source = rule.source if rule is not None else ""
        if reason is None:
            cls = NMConv2d if kind == "conv" else NMLinear
            _set_submodule(model, name, cls.from_dense(module, pattern=own, **nm_kwargs))
            why = f"N:M {own}" + (f", {rule.describe()}" if rule is not None else "")
            report.layers.append(LayerDecision(name, kind, shape, True, why, str(own), source))
        else:
            report.layers.append(LayerDecision(name, kind, shape, False, reason, DENSE_PATTERN, source))
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

"""2:4 semi-structured inference on CUDA: the trained N:M model's 2:4 layers on sparse tensor cores.

:func:`to_semi_structured` swaps each eligible 2:4 layer for a module whose GEMM uses
``torch.sparse.to_sparse_semi_structured`` (linear: ``F.linear``; conv: ``F.unfold`` im2col, or a
strided view for 1x1 convs without padding, then the same GEMM). Layers that miss a constraint
(dtype, shape multiples, groups) are left as they are and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .layers import NMConv2d, NMLayer, NMLinear, nm_layers
from .macs import conv_output_hw
from .nm import Layout, is_nm

__all__ = ["SemiStructuredConv2d", "SemiStructuredLinear", "SemiStructuredReport", "gemm_weight",
           "semi_structured_skip_reason", "to_semi_structured"]


_SEMI_DTYPES = (torch.float16, torch.bfloat16)
# Minimum (rows, cols) of the sparse [Cout, K] operand, each a multiple of it, as torch 2.1-2.14 state it
# per backend for float16 / bfloat16; the backend class's own table is read first when it has one.
_SEMI_MIN_SHAPE = {"cutlass": (32, 64), "cusparselt": (16, 16)}


def _semi_backend(backend: str) -> str:
    if backend not in ("auto", "cutlass", "cusparselt"):
        raise ValueError(f"unknown semi-structured backend {backend!r}: use 'auto', 'cutlass' or 'cusparselt'")
    if backend != "auto":
        return backend
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return "cusparselt" if cusparselt is not None and cusparselt.is_available() else "cutlass"


def _semi_class(backend: str) -> type:
    import torch.sparse as ts  # public classes since torch 2.1

    return ts.SparseSemiStructuredTensorCUTLASS if backend == "cutlass" else ts.SparseSemiStructuredTensorCUSPARSELT


def _semi_min_shape(backend: str, dtype: torch.dtype) -> tuple[int, int]:
    try:
        cfg = _semi_class(backend)._DTYPE_SHAPE_CONSTRAINTS[dtype]
        return int(cfg.sparse_min_rows), int(cfg.sparse_min_cols)
    except (AttributeError, KeyError, ImportError):
        return _SEMI_MIN_SHAPE[backend]


def gemm_weight(layer: NMLayer) -> torch.Tensor:
    """The masked weight as the GEMM operand ``[Cout, K]``, K in the layer's group order.

    Layout ``row``: ``weight.reshape(Cout, -1)`` (K = Cin*kh*kw, the order of ``F.unfold``). Layout
    ``channel`` (conv): K = kh*kw*Cin with Cin fastest, so each group of 4 is contiguous along K.
    """
    w = torch.where(layer.mask, layer.weight.detach(), torch.zeros((), dtype=layer.weight.dtype,
                                                                   device=layer.weight.device))
    if layer.layout is Layout.CHANNEL and w.dim() == 4:
        w = w.permute(0, 2, 3, 1)
    return w.reshape(w.shape[0], -1).contiguous()


def semi_structured_skip_reason(layer: nn.Module, backend: str = "cutlass") -> str | None:
    """Why ``layer`` cannot use 2:4 semi-structured kernels (None when it can); pure, no CUDA needed."""
    if not isinstance(layer, (NMLinear, NMConv2d)):
        return "not an N:M layer"
    if layer.pattern.m != 4 or layer.pattern.n > 2:
        return f"pattern {layer.pattern} is not 2:4 (the kernels need at most 2 of every 4)"
    if isinstance(layer, NMConv2d) and layer.groups != 1:
        return f"grouped conv (groups={layer.groups})"
    if not is_nm(layer.mask, 2, 4, layer.layout):
        return "mask keeps more than 2 of 4 in some group (a kernel would silently drop weights)"
    if layer.weight.dtype not in _SEMI_DTYPES:
        return f"dtype {layer.weight.dtype} (needs float16 or bfloat16: convert the model first)"
    if layer.weight.device.type != "cuda":
        return f"weight on {layer.weight.device} (needs CUDA)"
    rows, cols = layer.weight.shape[0], layer.weight[0].numel()
    min_rows, min_cols = _semi_min_shape(backend, layer.weight.dtype)
    if rows % min_rows or cols % min_cols:
        return (f"GEMM weight [{rows}, {cols}] is not a multiple of [{min_rows}, {min_cols}] "
                f"({backend} {str(layer.weight.dtype).replace('torch.', '')})")
    return None


class SemiStructuredLinear(nn.Module):
    """``F.linear`` with a (semi-structured) ``[Cout, K]`` weight; inference only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SemiStructuredConv2d(nn.Module):
    """A conv as a GEMM with a (semi-structured) ``[Cout, K]`` weight; inference only, groups=1.

    ``x[B, Cin, H, W]`` -> columns ``[B*L, K]`` (``F.unfold``, L = Ho*Wo; a strided view for 1x1 convs
    without padding) -> ``F.linear`` -> ``[B, Cout, Ho, Wo]``. With layout ``channel`` the columns are
    reordered to K = (kh, kw, Cin), the weight's order (see :func:`gemm_weight`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, in_channels: int,
                 kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], layout: Layout | str = Layout.ROW) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.in_channels = in_channels
        self.out_channels = weight.shape[0]
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        self.layout = Layout.parse(layout)

    @classmethod
    def from_nm(cls, conv: NMConv2d, weight: torch.Tensor) -> SemiStructuredConv2d:
        return cls(weight, conv.bias, conv.in_channels, conv.kernel_size, conv.stride, conv.padding,
                   conv.dilation, conv.layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, cin = x.shape[0], self.in_channels
        ho, wo = conv_output_hw(x.shape[2:], self.kernel_size, self.stride, self.padding, self.dilation)
        if self.kernel_size == (1, 1) and self.padding == (0, 0):
            xs = x[:, :, :: self.stride[0], :: self.stride[1]]  # [B, Cin, Ho, Wo]
            cols = xs.permute(0, 2, 3, 1).reshape(-1, cin)  # [B*L, Cin]
        else:
            cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [B, Cin*kk, L]
            k = cols.shape[1]
            if self.layout is Layout.CHANNEL:
                cols = cols.view(b, cin, k // cin, -1).transpose(1, 2).reshape(b, k, -1)  # K = (kk, Cin)
            cols = cols.transpose(1, 2).reshape(-1, k)  # [B*L, K]
        out = F.linear(cols, self.weight, self.bias)  # [B*L, Cout]
        return out.view(b, ho, wo, self.out_channels).permute(0, 3, 1, 2).contiguous()


@dataclass
class SemiStructuredReport:
    """Which N:M layers ``to_semi_structured`` converted and why it left the others."""

    backend: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer name -> reason

    def __str__(self) -> str:
        lines = [f"semi-structured 2:4 ({self.backend}): {len(self.converted)} converted, "
                 f"{len(self.skipped)} left as they are"]
        lines += [f"  2:4    {name}" for name in self.converted]
        lines += [f"  as is  {name:<40} {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def to_semi_structured(model: nn.Module, backend: str = "auto") -> SemiStructuredReport:
    """Swap (in place) each eligible 2:4 N:M layer of a CUDA float16/bfloat16 ``model`` for inference.

    ``backend``: 'auto' (cuSPARSELt when available, else CUTLASS), 'cutlass' or 'cusparselt'. Layers
    that miss a constraint (:func:`semi_structured_skip_reason`) or whose conversion fails stay as
    they are and are listed in the report. Raises ``RuntimeError`` without CUDA.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("to_semi_structured needs a CUDA device (2:4 semi-structured kernels)")
    backend = _semi_backend(backend)
    convert = _semi_class(backend).from_dense
    report = SemiStructuredReport(backend)
    for name, layer in list(nm_layers(model)):
        reason = semi_structured_skip_reason(layer, backend)
        if reason is None and not name:
            reason = "the model itself is the N:M layer: wrap it in a container"
        if reason is not None:
            report.skipped[name] = reason
            continue
        try:
            weight = convert(gemm_weight(layer))
        except (RuntimeError, ValueError) as err:
            report.skipped[name] = f"conversion failed: {err}"
            continue
        if isinstance(layer, NMLinear):
            new: nn.Module = SemiStructuredLinear(weight, layer.bias)
        else:
            new = SemiStructuredConv2d.from_nm(layer, weight)
        _set_submodule(model, name, new)
        report.converted.append(name)
    return report

"""Training FLOPs of self-attention's two matmuls, QK^T and AV, which have no weights (for the ledger).

Convention (docs/method.md, "Exact training FLOPs"), in MACs, for one attention module over a batch of
``B`` sequences of ``N`` tokens, ``H`` heads of dimension ``d``:

- forward: ``S = Q K^T`` ([B, H, N, d] x [B, H, d, N]) and ``O = A V`` ([B, H, N, N] x [B, H, N, d]),
  ``B H N^2 d`` each: :func:`attention_forward_macs` = ``2 B H N^2 d``;
- backward, booked as phase ``input_grad`` (both operands of both matmuls are activations, so every
  gradient here is an input gradient): ``dQ = dS K``, ``dK = dS^T Q``, ``dA = dO V^T``, ``dV = A^T dO``:
  :func:`attention_backward_macs` = ``4 B H N^2 d``.

They are dense in every method (the N:M masks sit on weights; Q, K, V and A are activations) and are charged
under the layer name ``<attention module>.matmul`` (e.g. ``blocks.0.attn.matmul``). Not counted, like batch
norm and activations elsewhere: the scaling of Q, the softmax, dropout, layer norms, and the recomputation of
``Q K^T`` that a fused flash-attention backward runs on a GPU. The count is the same whether timm runs the
fused ``scaled_dot_product_attention`` or its unfused matmuls.

The modules counted are timm's ``Attention`` (the self-attention of its ViT / DeiT blocks); timm is looked up
in ``sys.modules`` only, never imported: a model holding one has imported it already.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["attention_forward_macs", "attention_backward_macs", "attention_modules", "AttentionHooks",
           "MATMUL_SUFFIX"]

MATMUL_SUFFIX = ".matmul"  # the ledger's layer name: <attention module name>.matmul
BACKWARD_MATMULS_PER_FORWARD = 2  # each forward matmul has two operand gradients, each a matmul of its size
_TIMM_MODULES = ("timm.layers.attention", "timm.models.vision_transformer")  # where timm defines Attention


def attention_forward_macs(batch: int, heads: int, tokens: int, head_dim: int) -> int:
    """MACs of ``Q K^T`` plus ``A V`` for self-attention over ``tokens`` tokens: ``2 B H N^2 d``."""
    return 2 * batch * heads * tokens * tokens * head_dim


def attention_backward_macs(batch: int, heads: int, tokens: int, head_dim: int) -> int:
    """MACs of the gradients of both operands of ``Q K^T`` and of ``A V``: ``4 B H N^2 d``."""
    return BACKWARD_MATMULS_PER_FORWARD * attention_forward_macs(batch, heads, tokens, head_dim)


def _attention_types() -> tuple[type, ...]:
    found = {getattr(sys.modules.get(name), "Attention", None) for name in _TIMM_MODULES}
    return tuple(t for t in found if isinstance(t, type))


def attention_modules(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """``(position in model.named_modules(), name, module)`` of every timm ``Attention`` of ``model``."""
    types = _attention_types()
    if not types:
        return []
    return [(i, name, m) for i, (name, m) in enumerate(model.named_modules()) if isinstance(m, types)]


# (layer name, MACs) -> whether the ledger charged it (False: paused or detached)
Charge = Callable[[str, int], bool]


class AttentionHooks:
    """Forward hooks on the attention modules of a model that report their matmul MACs to a ledger.

    ``forward(layer, macs)`` is called on every forward; when it returns True and the matmuls' operands
    need gradients (the module's input or its ``qkv`` parameters require grad, so Q, K and V do), a tensor
    hook on the module's output calls ``backward(layer, macs)`` when the backward reaches the module.
    """

    def __init__(self, forward: Charge, backward: Charge) -> None:
        self._forward, self._backward = forward, backward
        self._hooks: dict[str, tuple[nn.Module, torch.utils.hooks.RemovableHandle]] = {}

    def attach(self, model: nn.Module) -> dict[str, int]:
        """Hook every attention module of ``model`` not hooked yet, unhook those gone; returns the layer names
        with the position of their module in ``model.named_modules()`` (to order the ledger's rows)."""
        found = attention_modules(model)
        current = {name + MATMUL_SUFFIX: module for _, name, module in found}
        positions = {name + MATMUL_SUFFIX: i for i, name, _ in found}
        for layer, (module, handle) in list(self._hooks.items()):
            if current.get(layer) is not module:  # gone, or replaced by another module
                handle.remove()
                del self._hooks[layer]
        for layer, module in current.items():
            if layer not in self._hooks:
                self._hooks[layer] = (module, module.register_forward_hook(self._hook(layer)))
        return positions

    def detach(self) -> None:
        """Remove every hook."""
        for _, handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    def _hook(self, layer: str):
        def on_forward(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]  # [B, N, C]
            b, n = x.shape[0], x.shape[1]
            shape = (b, module.num_heads, n, module.head_dim)
            if not self._forward(layer, attention_forward_macs(*shape)):
                return
            operands_need_grad = x.requires_grad or any(p.requires_grad for p in module.qkv.parameters())
            if not (torch.is_grad_enabled() and operands_need_grad and output.requires_grad):
                return
            backward = attention_backward_macs(*shape)

            def on_grad(_grad: torch.Tensor) -> None:  # returns None: the gradient passes unchanged
                self._backward(layer, backward)
            output.register_hook(on_grad)
        return on_forward

"""Vision transformers through timm: DeiT-tiny/small/base (Touvron et al. 2021) and a small ViT for 28x28/32x32.

timm is an optional extra (``pip install 'bame[timm]'``): the names are always registered, and building one
without timm raises :class:`TimmNotInstalled`, a one-line error that says how to install it. timm is imported
on first use, so ``import bame`` stays fast and works without it.

Every model is built untrained (``pretrained=False``: nothing is fetched at run time) with timm's own init.
Module order, as ``sparsify`` needs it: ``patch_embed.proj`` (a conv of stride = kernel = patch size) is the
first ``nn.Conv2d`` and ``head`` the last ``nn.Linear``, so both stay dense by the layer policy; the ``qkv``,
``proj``, ``fc1`` and ``fc2`` linears of every block become N:M. The attention matmuls (QK^T and AV) have no
weights: :mod:`bame.attention_flops` counts them.

The position embedding has one entry per patch, so these models are registered ``sized``: ``image_size``
comes from the data and must be a multiple of the patch size.
"""

from __future__ import annotations

from torch import nn

from .registry import register

__all__ = ["TimmNotInstalled", "DEIT", "SMALL_VIT"]

DEIT_IMAGE_SIZE = 224
DEIT = {  # our name -> timm's (patch 16; dims 192/384/768, 12 blocks, 3/6/12 heads)
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
}
DEIT_PATCH = 16
# The small ViT: 28x28 Fashion-MNIST gives 7x7 = 49 patches (+1 class token); every linear's K (192, 768)
# is a multiple of 16, so all of them can be N:M up to 1:16.
SMALL_VIT = dict(patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0)
SMALL_VIT_IMAGE_SIZE = 32


class TimmNotInstalled(ImportError, ValueError):
    """A timm model was asked for without timm. Also a ``ValueError``, so the callers that turn a bad
    ``model.name`` into a one-line config error treat it the same way."""


def _timm():
    try:
        import timm
        import timm.models.vision_transformer  # noqa: F401  (the VisionTransformer class)
    except ImportError:
        raise TimmNotInstalled("the DeiT / ViT models need timm: pip install 'bame[timm]'") from None
    return timm


def _check_size(name: str, image_size: int, patch: int) -> None:
    if image_size < patch or image_size % patch:
        raise ValueError(f"model {name!r}: image size {image_size} is not a multiple of its patch size {patch} "
                         f"(use an image size such as {max(patch, image_size // patch * patch)})")


def _deit(name: str, num_classes: int, in_channels: int, image_size: int, **kwargs) -> nn.Module:
    timm = _timm()
    _check_size(name, image_size, DEIT_PATCH)
    return timm.create_model(DEIT[name], pretrained=False, num_classes=num_classes, in_chans=in_channels,
                             img_size=image_size, **kwargs)


@register("deit_tiny", sized=True)
def deit_tiny(num_classes: int, in_channels: int = 3, image_size: int = DEIT_IMAGE_SIZE, **kwargs) -> nn.Module:
    """DeiT-tiny (timm's ``deit_tiny_patch16_224``), ~5.7M parameters for 1000 classes."""
    return _deit("deit_tiny", num_classes, in_channels, image_size, **kwargs)


@register("deit_small", sized=True)
def deit_small(num_classes: int, in_channels: int = 3, image_size: int = DEIT_IMAGE_SIZE, **kwargs) -> nn.Module:
    """DeiT-small (timm's ``deit_small_patch16_224``), ~22.1M parameters for 1000 classes."""
    return _deit("deit_small", num_classes, in_channels, image_size, **kwargs)


@register("deit_base", sized=True)
def deit_base(num_classes: int, in_channels: int = 3, image_size: int = DEIT_IMAGE_SIZE, **kwargs) -> nn.Module:
    """DeiT-base (timm's ``deit_base_patch16_224``), ~86.6M parameters for 1000 classes."""
    return _deit("deit_base", num_classes, in_channels, image_size, **kwargs)


@register("vit_patch4", sized=True)
def vit_patch4(num_classes: int, in_channels: int = 3, image_size: int = SMALL_VIT_IMAGE_SIZE,
               **kwargs) -> nn.Module:
    """A small ViT for 28x28 / 32x32 images: patch 4, dim 192, 6 blocks of 3 heads, MLP 768, class token;
    ~2.7M parameters for 10 classes. ``kwargs`` override timm's ``VisionTransformer`` arguments."""
    timm = _timm()
    args = {**SMALL_VIT, **kwargs}
    _check_size("vit_patch4", image_size, args["patch_size"])
    return timm.models.vision_transformer.VisionTransformer(
        img_size=image_size, in_chans=in_channels, num_classes=num_classes, **args)

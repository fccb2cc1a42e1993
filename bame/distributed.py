"""What torchrun training needs beyond DDP: mask agreement checks, buffer averaging, summed counters.

How the pieces fit (``bame.loop`` wraps the model in ``DistributedDataParallel`` under torchrun):

- **Gradients.** DDP hooks every parameter's gradient accumulator, so the weight gradient our custom
  autograd functions return (``bame.autograd``: dense, straight-through, SR-STE or SPARSE, zero outside
  the needed positions) is averaged over ranks before ``loss.backward()`` returns. ``method.after_backward``
  therefore sees the same gradients on every rank, and BAME, whose decisions depend only on weights,
  masks, gradients and its own tensors, makes the same decisions everywhere.
- **Buffers.** The N:M layers hold two bool buffers per weight (``mask``, ``grad_mask``). DDP's default
  ``broadcast_buffers=True`` would send rank 0's copy of every buffer before every forward: two bytes per
  weight per step (half the volume of the gradient all-reduce itself for float32 weights), and it would
  hide a rank that disagrees. ``bame.loop`` passes ``broadcast_buffers=False``; masks stay equal because
  every rank computes them from equal inputs, :func:`check_masks_agree` proves it after adaptation steps
  (``train.check_mask_sync``), and the floating buffers that do differ per rank (batch-norm running
  statistics, computed on each rank's shard) are averaged by :func:`average_float_buffers` before every
  evaluation and checkpoint.
- **Counters.** Each rank's FLOPs ledger counts the work of its own shard; :func:`all_sum_ints` adds them
  up for the run totals (exact integers: int64 all-reduce).

Every function is a no-op returning its input for one process (``torch.distributed`` not initialised).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layers import nm_layers

__all__ = ["DistContext", "join_process_group", "is_distributed", "world_size", "mask_fingerprint",
           "check_masks_agree", "average_float_buffers", "all_sum_ints", "MaskDisagreement"]

_HASH_MUL = 2654435761  # Knuth's multiplicative hash constant
_HASH_MOD = 2 ** 31 - 1


class MaskDisagreement(RuntimeError):
    """Ranks hold different masks: some decision depended on rank-local data."""


@dataclass(frozen=True)
class DistContext:
    """Rank and world size of this process (1 process unless torchrun initialised torch.distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def current(cls) -> DistContext:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return cls()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks in place (identity for one process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t


def join_process_group() -> bool:
    """Under torchrun (WORLD_SIZE > 1) join the process group (NCCL on CUDA, else gloo); True if joined here."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def mask_fingerprint(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    """``(layer names, int64 [L, 2])``: per N:M layer the number of kept weights and the sum, over kept
    positions ``i`` (flat index), of the hash ``(i * 2654435761) mod (2^31 - 1)``.

    Two masks with the same fingerprint are equal unless a set of changes cancels in both sums
    (negligible: the hash scatters positions over 31 bits). Computed on the mask's device, no host sync.
    """
    names, rows = [], []
    for name, layer in nm_layers(model):
        mask = layer.mask.reshape(-1)
        idx = torch.arange(mask.numel(), device=mask.device, dtype=torch.int64)
        h = (idx * _HASH_MUL) % _HASH_MOD
        rows.append(torch.stack([mask.sum(dtype=torch.int64), (h * mask).sum()]))
        names.append(name)
    if not rows:
        return names, torch.zeros(0, 2, dtype=torch.int64)
    device = rows[0].device
    return names, torch.stack([r.to(device) for r in rows])


def check_masks_agree(model: nn.Module, step: int) -> None:
    """Raise :class:`MaskDisagreement` on every rank if any N:M layer's mask differs between ranks.

    A collective: every rank must call it at the same point (the loop does, after adaptation steps).
    Two small all-reduces (MAX and MIN of the fingerprints, :func:`mask_fingerprint`).
    """
    if not is_distributed():
        return
    import torch.distributed as dist

    names, fp = mask_fingerprint(model)
    if not names:
        return
    fp = fp.to(_collective_device(fp))
    hi, lo = fp.clone(), fp.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    bad = (hi != lo).any(1).tolist()
    if any(bad):
        layers = [n for n, b in zip(names, bad) if b]
        raise MaskDisagreement(
            f"rank {dist.get_rank()}: after step {step} the masks of {len(layers)} N:M layer(s) differ between "
            f"ranks: {layers[:8]}{' ...' if len(layers) > 8 else ''}. A mask decision used rank-local data "
            f"(e.g. gradients before DDP's all-reduce, or a rank-dependent random draw); "
            f"set train.check_mask_sync=false only to debug further")


@torch.no_grad()
def average_float_buffers(model: nn.Module) -> int:
    """Average every floating-point buffer over ranks (batch-norm running mean/var); returns how many.

    Bool and integer buffers (masks, ``num_batches_tracked``) are equal on every rank and left alone.
    One all-reduce of the buffers flattened to float64.
    """
    if not is_distributed():
        return 0
    import torch.distributed as dist

    bufs = [b for b in model.buffers() if b.is_floating_point()]
    if not bufs:
        return 0
    flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in bufs])
    flat = flat.to(_collective_device(flat))
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for b in bufs:
        n = b.numel()
        b.copy_(flat[offset:offset + n].view_as(b).to(device=b.device, dtype=b.dtype))
        offset += n
    return len(bufs)


def all_sum_ints(values: Sequence[int], device: torch.device | str = "cpu") -> list[int]:
    """``values`` summed element-wise over ranks (exact: int64); the values themselves for one process."""
    values = [int(v) for v in values]
    if not is_distributed() or not values:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64, device=device)
    t = t.to(_collective_device(t))
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def _collective_device(t: torch.Tensor) -> torch.device:
    """NCCL needs CUDA tensors, gloo takes CPU ones (and CUDA ones for a few ops only)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return t.device if t.is_cuda else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

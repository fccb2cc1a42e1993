"""Seeded DataLoaders: a training order that a resume can rebuild, and test shards under torchrun."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .datasets import DatasetBundle

__all__ = ["make_loaders"]


def make_loaders(bundle: DatasetBundle, batch_size: int, eval_batch_size: int, num_workers: int, seed: int,
                 distributed: bool = False, pin_memory: bool = False) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)``.

    Training batches are shuffled by a ``torch.Generator`` seeded with ``seed`` (a new order each
    epoch; the same seed gives the same sequence of orders) and the last partial batch is dropped.
    With ``distributed`` a ``DistributedSampler(shuffle=True, seed=seed, drop_last=True)`` shards the
    training set (call ``train_loader.sampler.set_epoch(epoch)`` each epoch; ``batch_size`` is per
    process) and the test set is split into strided shards (rank ``r`` of ``w`` evaluates items
    ``r, r + w, ...``: every item exactly once, no padding), so that counts summed over ranks are the
    whole test set's.
    """
    for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    generator = torch.Generator().manual_seed(seed)  # also seeds the workers' RNGs (augmentation)
    sampler = None
    if distributed:
        sampler = DistributedSampler(bundle.train, shuffle=True, seed=seed, drop_last=True)
    per_process = len(sampler) if sampler is not None else len(bundle.train)
    if per_process < batch_size:
        where = " per process" if distributed else ""
        raise ValueError(f"{bundle.name}: {per_process} training items{where} is fewer than "
                         f"batch_size={batch_size}, so no full batch exists (the last partial batch is "
                         f"dropped): lower train.batch_size or raise data.train_subset")
    common = dict(num_workers=num_workers, pin_memory=pin_memory)
    train = DataLoader(bundle.train, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                       generator=generator, drop_last=True, **common)
    test_set = bundle.test
    if distributed:
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        test_set = Subset(bundle.test, range(rank, len(bundle.test), world))
    test = DataLoader(test_set, batch_size=eval_batch_size, shuffle=False, drop_last=False, **common)
    return train, test

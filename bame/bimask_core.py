"""Bi-Mask's backward mask and its permutation search (Zhang et al., ICML 2023), as pure functions.

Bi-Mask multiplies the forward by ``W * m_f`` (``m_f``: the N:M mask of ``|W|`` along K, :func:`bame.nm.nm_mask`)
and the input gradient by ``(W * m_b)^T``, where the **backward mask** ``m_b`` is N:M along the input
gradient's reduction axis, the output channels, after a permutation ``p`` of them. ``p`` only serves to
build ``m_b``: the weight is never permuted.

The backward mask, for a weight viewed ``W[Cout, K]`` (``Cout`` a multiple of ``m``)
-----------------------------------------------------------------------------------
1. Take the rows of ``|W * m_f|`` and of ``m_f`` in the order ``p``.
2. For every column ``k``, split the permuted rows into groups of ``m`` consecutive ones and keep the
   ``n`` largest of each group.
3. AND with the permuted ``m_f`` and put the rows back in their order: ``m_b[p[i]] = kept[i]``.

So ``m_b`` is a subset of ``m_f``, and each group of ``m`` permuted output channels holds at most ``n``
(exactly ``min(n, f)`` when the group holds ``f`` forward-kept weights): ``nnz(m_b) <= (n/m) numel`` and it
is below that on real weights (2:4, Gaussian W: ``E[min(2, Bin(4, 1/2))] / 4 = 0.406``), so its density
must be measured, never assumed. This follows ``get_n_m_backward_matrix`` of their code, with one
difference in a degenerate case: in step 2 a forward-kept weight always ranks above a pruned one, even
when the kept weight is exactly 0 (their top-n of ``|W * m_f|`` may then pick a pruned zero, which the AND
removes). With that rule ``nnz(m_b)`` is exactly ``sum over groups of min(n, f)``.

The permutation search
----------------------
Every ``iter`` steps their layer draws ``greedy_num`` random permutations and keeps the one whose ``m_b``
retains the most forward-kept weights (a count, not a magnitude), the first of equal counts. The count
depends on ``m_f`` and ``p`` only: :func:`score_permutations` computes it from group counts of ``m_f``,
without sorting. :func:`search_permutation` draws from a ``torch.Generator`` passed in (CPU, so that every
rank and device draws the same permutations), where theirs draws from NumPy's unseeded global state. Their
search forgets the previous permutation (the best count starts at 0); ``incumbent`` optionally keeps it
unless a candidate retains strictly more.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .nm import NMPattern

__all__ = ["check_bimask_shape", "check_permutation", "backward_mask", "score_permutations",
           "PermutationSearch", "search_permutation", "is_nm_along_permuted_cout", "search_seed",
           "bimask_elementwise_ops"]

_CHUNK_ELEMENTS = 1 << 24  # candidates scored at once: candidates x numel(W) bools


def check_bimask_shape(shape: torch.Size | tuple[int, ...], n: int, m: int) -> None:
    """Raise ``ValueError`` naming the shape and the pattern unless ``Cout`` is a multiple of ``m``."""
    NMPattern(n, m)
    shape = tuple(shape)
    if len(shape) < 2 or shape[0] % m:
        raise ValueError(f"weight of shape {shape} cannot have a Bi-Mask backward mask N:M {n}:{m} along Cout: "
                         f"Cout={shape[0] if shape else None} is not a multiple of M={m}; keep the layer dense "
                         f"or use a pattern whose M divides Cout")


def check_permutation(permutation: torch.Tensor, cout: int) -> None:
    """Raise ``ValueError`` unless ``permutation`` is a 1-D permutation of ``range(cout)``."""
    if permutation.dim() != 1 or permutation.numel() != cout or not torch.equal(
            torch.sort(permutation.to("cpu", torch.long)).values, torch.arange(cout)):
        raise ValueError(f"permutation must be a 1-D permutation of range({cout}) (the output channels), "
                         f"got shape {tuple(permutation.shape)}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)  # [Cout, K]


def backward_mask(weight: torch.Tensor, forward_mask: torch.Tensor, permutation: torch.Tensor,
                  n: int, m: int) -> torch.Tensor:
    """Bi-Mask's backward mask ``m_b`` (bool, ``weight``'s shape), built as in the module docstring.

    ``weight``, ``forward_mask``: ``[Cout, ...]``; ``permutation``: int64 ``[Cout]`` of the output channels.
    Ties among equal magnitudes go to the earlier permuted row.
    """
    check_bimask_shape(weight.shape, n, m)
    if forward_mask.shape != weight.shape:
        raise ValueError(f"forward mask shape {tuple(forward_mask.shape)} != weight shape {tuple(weight.shape)}")
    cout = weight.shape[0]
    check_permutation(permutation, cout)
    perm = permutation.to(weight.device, torch.long)
    fwd = _rows(forward_mask).bool()[perm]  # [Cout, K] in permuted order
    # Kept weights rank by |W|, above every pruned weight (-1), so a group keeps min(n, f) kept weights.
    key = torch.where(fwd, _rows(weight.detach()).abs()[perm], -1.0)
    groups = key.reshape(cout // m, m, -1)  # [Cout/m, m, K]: m consecutive permuted rows per column
    top = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]  # [Cout/m, n, K]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True).reshape(cout, -1) & fwd
    out = torch.empty_like(keep)
    out[perm] = keep  # row i of the permuted order is output channel perm[i]
    return out.reshape(weight.shape)


def score_permutations(forward_mask: torch.Tensor, permutations: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``[P]`` int64: ``nnz(m_b)`` for each permutation of ``permutations`` ``[P, Cout]``, i.e. the
    forward-kept weights the backward mask retains, ``sum over groups of min(n, f)``."""
    check_bimask_shape(forward_mask.shape, n, m)
    fwd = _rows(forward_mask).bool()  # [Cout, K]
    cout = fwd.shape[0]
    perms = permutations.to(fwd.device, torch.long)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, fwd.numel()))
    scores = []
    for start in range(0, perms.shape[0], chunk):
        counts = fwd[perms[start:start + chunk]].reshape(-1, cout // m, m, fwd.shape[1]).sum(2)  # [P, Cout/m, K]
        scores.append(counts.clamp(max=n).sum((1, 2)))
    return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.long, device=fwd.device)


@dataclass(frozen=True)
class PermutationSearch:
    """The outcome of one search."""

    permutation: torch.Tensor  # int64 [Cout], on the forward mask's device
    retained: int  # nnz of the backward mask it gives
    candidates: int  # permutations scored (greedy_num, plus the incumbent when given)


def search_permutation(forward_mask: torch.Tensor, n: int, m: int, greedy_num: int, generator: torch.Generator,
                       incumbent: Optional[torch.Tensor] = None) -> PermutationSearch:
    """The best of ``greedy_num`` random output-channel permutations by :func:`score_permutations`.

    Candidates are ``torch.randperm(Cout, generator=generator)``, drawn in turn; the first of equal scores
    wins. With ``incumbent``, it is scored first and only a strictly better candidate replaces it.
    """
    if greedy_num < 1:
        raise ValueError(f"greedy_num must be >= 1, got {greedy_num}")
    cout = forward_mask.shape[0]
    check_bimask_shape(forward_mask.shape, n, m)
    draws = [torch.randperm(cout, generator=generator) for _ in range(greedy_num)]
    if incumbent is not None:
        check_permutation(incumbent, cout)
        draws.insert(0, incumbent.to("cpu", torch.long))
    candidates = torch.stack(draws)  # [P, Cout]
    scores = score_permutations(forward_mask, candidates, n, m)  # [P]
    best = int(torch.argmax(scores))  # first of equal maxima
    return PermutationSearch(candidates[best].to(forward_mask.device), int(scores[best]), len(draws))


def is_nm_along_permuted_cout(mask: torch.Tensor, permutation: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive permuted output channels keeps at most ``n`` per column
    (what the input gradient's ``nm_on_reduction`` flag means for Bi-Mask)."""
    check_bimask_shape(mask.shape, n, m)
    check_permutation(permutation, mask.shape[0])
    rows = _rows(mask).bool()[permutation.to(mask.device, torch.long)]
    return bool((rows.reshape(mask.shape[0] // m, m, -1).sum(1) <= n).all())


def search_seed(run_seed: int, layer_index: int, step: int) -> int:
    """The seed of the generator that draws the candidates of layer ``layer_index``'s search at ``step``: the
    first 8 bytes of SHA-256 of ``"bimask:<run_seed>:<layer_index>:<step>"`` as a little-endian integer below
    2**63. The same on every rank, process and device, and independent of the global RNG state."""
    digest = hashlib.sha256(f"bimask:{run_seed}:{layer_index}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def bimask_elementwise_ops(numel: int, cout: int, m: int, candidates: int) -> int:
    """Element-wise work of one Bi-Mask step of a layer of ``numel`` weights beyond its conv/linear (an
    operation count): the forward mask's and the backward mask's sorts over groups of ``m``, ``numel *
    ceil(log2 m)`` comparisons each, and, on a search step (``candidates`` > 0 permutations scored), per
    candidate ``cout`` random draws and ``2 * numel`` gathers and additions (:func:`score_permutations`)."""
    sort = numel * max(1, math.ceil(math.log2(m)))
    return 2 * sort + candidates * (cout + 2 * numel)

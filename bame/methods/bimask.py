"""``bimask``: Bi-Mask (Zhang et al., ICML 2023), a forward N:M mask and a separate backward mask.

One step ``t`` of an N:M layer (the mask math is :mod:`bame.bimask_core`):

- forward ``X (W * m_f)``, ``m_f`` the top-N ``|W|`` of each group along K (recomputed from the weights
  after every optimizer step, as SR-STE's);
- input gradient ``dY (W * m_b)``, ``m_b`` the **backward mask**: N:M along the output channels taken in
  the order of a permutation ``p`` of them, and a subset of ``m_f``
  (:func:`~bame.bimask_core.backward_mask`, rebuilt every step from ``W``, ``m_f`` and ``p``);
- weight gradient dense with SR-STE's decay: ``dL/d(W * m_f) + lambda_w (1 - m_f) W`` (``method.srste_decay``),
  added once per step.

``p`` is searched on steps ``0, iter, 2 iter, ...``: the best of ``greedy_num`` random permutations by the
forward-kept weights ``m_b`` retains. Candidates come from a CPU generator seeded from the run's seed, the
layer's index and the step (:func:`~bame.bimask_core.search_seed`), so every rank draws the same ones with
no broadcast, and ``p`` and the counters are in the method's state, so a resumed run continues exactly.
Layers whose ``Cout`` is no multiple of M (or grouped convs) cannot have a backward mask: they follow
``method.on_indivisible``. docs/method.md lists where this departs from their code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..autograd import Backward
from ..bimask_core import backward_mask, bimask_elementwise_ops, check_permutation, search_permutation, search_seed
from ..nm import NMPattern
from ..schema import Section, at_least
from .base import register
from .srste import SRSTE

__all__ = ["Bimask", "BimaskConfig"]

_STATE_VERSION = 1


@dataclass(frozen=True)
class BimaskConfig(Section):
    """``bimask``: how often and how widely the backward mask's permutation is searched."""

    iter: int = 100  # search the permutation on steps 0, iter, 2 iter, ... (their --iter)
    # random permutations scored per search: their ImageNet README's and DeiT code's 100 (their options
    # file and CIFAR commands: 10); docs/method.md says why
    greedy_num: int = 100

    def problems(self, method: Any) -> list[tuple[str, str]]:
        return at_least(self, ("iter", "greedy_num"), 1)


@register("bimask", config=BimaskConfig)
class Bimask(SRSTE):
    """Bi-Mask: SR-STE's forward mask and weight gradient, and an input gradient through the backward mask."""

    backward_mode = Backward.SRSTE
    flops_note = ("the input gradient is counted at the density of step 0's backward mask, below N/M; the mask "
                  "moves with the weights, so the run's ledger (which counts each step's) differs slightly")

    def __init__(self, cfg, ctx) -> None:
        super().__init__(cfg, ctx)
        self.iter = cfg.bimask.iter
        self.greedy_num = cfg.bimask.greedy_num
        self.permutations: dict[str, torch.Tensor] = {}  # layer -> int64 [Cout] on the CPU (start: identity)
        self.searches = 0  # searches run so far (each over every N:M layer)
        self.searched_at = -1  # the step whose permutations were searched last
        self._ops = 0  # this step's element-wise mask work

    # -- set-up --------------------------------------------------------------------------------
    def layer_problem(self, module: nn.Module, pattern: NMPattern) -> Optional[str]:
        cout = module.weight.shape[0]
        if getattr(module, "groups", 1) > 1:
            return f"grouped conv (groups={module.groups}): Bi-Mask's backward mask groups output channels"
        if cout % pattern.m:
            return f"Cout={cout} not a multiple of M={pattern.m} (Bi-Mask's backward mask groups output channels)"
        return None

    def prepare(self, model: nn.Module) -> nn.Module:
        super().prepare(model)  # forward masks: top-N |W|
        self.permutations = {name: torch.arange(layer.weight.shape[0]) for name, layer in self.layers()}
        self.before_step(0)  # step 0's permutations and backward masks, so that a step measured now is step 0's
        return model

    def adaptation_steps(self, run_steps: int) -> list[int]:
        """The search steps."""
        return list(range(0, run_steps, self.iter))

    # -- per step hooks ------------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self, step: int) -> None:
        super().before_step(step)  # forward masks from |W| if they are not fresh (a resume)
        searching = step % self.iter == 0
        search_now = searching and self.searched_at != step
        self._ops = 0
        for index, (name, layer) in enumerate(self.layers()):
            n, m = layer.pattern.n, layer.pattern.m
            if search_now:
                generator = torch.Generator().manual_seed(search_seed(self.ctx.seed, index, step))
                found = search_permutation(layer.mask, n, m, self.greedy_num, generator)
                self.permutations[name] = found.permutation.cpu()
            perm = self.permutations[name]
            layer.set_backward_mask(backward_mask(layer.weight, layer.mask, perm, n, m), perm)
            self._ops += bimask_elementwise_ops(layer.weight.numel(), layer.weight.shape[0], m,
                                                self.greedy_num if searching else 0)
        if search_now:
            self.searches += 1
            self.searched_at = step

    def mask_work_ops(self) -> int:
        return self._ops

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The permutations (the backward masks follow from them and the weights) and the search counters."""
        return {"version": _STATE_VERSION, "searches": self.searches, "searched_at": self.searched_at,
                "permutations": {name: p.clone() for name, p in self.permutations.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["version"]) != _STATE_VERSION:
            raise ValueError(f"bimask: method state version {state['version']} is not {_STATE_VERSION}")
        layers = dict(self.layers())
        saved = state["permutations"]
        if set(saved) != set(layers):
            raise ValueError(f"bimask: method state does not match the model's N:M layers: saved {sorted(saved)}, "
                             f"model {sorted(layers)}")
        for name, perm in saved.items():
            check_permutation(perm, layers[name].weight.shape[0])
        super().load_state_dict(state)  # the next before_step recomputes the forward masks
        self.permutations = {name: perm.to("cpu", torch.long).clone() for name, perm in saved.items()}
        self.searches = int(state["searches"])
        self.searched_at = int(state["searched_at"])

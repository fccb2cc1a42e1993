"""The optimizers: SGD (torch's) and Adam / AdamW whose N:M weights move only where their method says.

:class:`MaskedAdam` is ``torch.optim.Adam`` / ``AdamW`` (decoupled decay) with one difference, for the
parameters a method lists in :meth:`bame.methods.Method.update_positions` (the N:M weights of the masked
methods), each with a bool tensor ``U`` of its shape, the positions that move on this step:

- outside ``U`` nothing is read or written: no decay, no moment decay, no step count, no update, so a
  pruned weight keeps its stored value bit for bit;
- the step count is kept **per element** (an int32 tensor of the weight's shape), so an element whose state
  restarts (:func:`restart_state`: a swapped, regrown or flipped position) restarts as a fresh Adam: its
  next update is ``lr * g / (|g| + eps)``, not the up to 6.6x larger update that a per-tensor step count
  gives zeroed moments (docs/method.md, "Optimizers").

A parameter's step count is one scalar, exactly as in torch, until the first step on which it is listed
or the first restart of some of its elements; from then on it is per element. A parameter with a scalar
step goes through ``torch.optim.adam.adam`` (the public functional API, with torch's own choice of
single-tensor or foreach kernels), so where nothing is masked this optimizer *is* ``torch.optim.AdamW``
(``decoupled=True``) or ``torch.optim.Adam``, bit for bit (tested).

One per-element step, at ``U`` only (``k`` the element's step count, ``g`` its gradient)::

    k += 1
    decoupled: w *= 1 - lr * wd          coupled: g = g + wd * w
    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    w -= lr * (m / (1 - b1^k)) / (sqrt(v / (1 - b2^k)) + eps)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import torch
from torch.optim.adam import adam as adam_update  # the public functional API of torch.optim.Adam
from torch import Tensor

__all__ = ["MaskedAdam", "restart_state", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "adam", "adamw")

# What a method answers each step: the parameters that move only at some positions, with those positions.
UpdatePositions = Callable[[], Mapping[Tensor, Tensor]]


def _no_positions() -> Mapping[Tensor, Tensor]:
    return {}


class MaskedAdam(torch.optim.Optimizer):
    """Adam (``decoupled=False``: L2 decay in the gradient) or AdamW (``decoupled=True``) whose parameters
    listed by ``update_positions()`` move only at their positions ``U`` (see the module docstring).

    ``update_positions`` is called once per :meth:`step`; it returns ``{param: U}`` (``U`` bool, the
    parameter's shape) and leaves out every parameter that moves everywhere.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, decoupled: bool,
                 update_positions: UpdatePositions = _no_positions) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"MaskedAdam: lr, eps and weight_decay must be >= 0 and betas in [0, 1), got lr={lr}, "
                             f"betas={betas}, eps={eps}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps, weight_decay=weight_decay,
                        decoupled=bool(decoupled))
        super().__init__(params, defaults)
        self.update_positions = update_positions

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        positions = self.update_positions()
        for group in self.param_groups:
            whole: list[Tensor] = []  # a scalar step: torch's own update
            for p in group["params"]:
                if p.grad is None:
                    continue  # as torch: no step count, no decay, no moment decay
                if p.grad.is_sparse:
                    raise RuntimeError("MaskedAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)  # torch's: a CPU scalar
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                where = positions.get(p)
                if where is None and state["step"].dim() == 0:
                    whole.append(p)
                    continue
                if where is not None and where.shape != p.shape:
                    raise ValueError(f"MaskedAdam: update positions of shape {tuple(where.shape)} for a parameter "
                                     f"of shape {tuple(p.shape)}")
                self._per_element_step(p, state, where, group)
            if whole:
                self._torch_step(whole, group)
        return loss

    def _torch_step(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """``torch.optim.Adam(W)``'s step for parameters whose step count is one scalar."""
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        adam_update(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
            [s["step"] for s in states], foreach=None, capturable=False, differentiable=False, fused=None,
            grad_scale=None, found_inf=None, has_complex=any(torch.is_complex(p) for p in params),
            decoupled_weight_decay=group["decoupled"], amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    @staticmethod
    def _per_element_step(p: Tensor, state: dict[str, Any], where: Optional[Tensor], group: dict[str, Any]) -> None:
        """One step of ``p`` at ``where`` (None: every element), with per-element step counts."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        k = _per_element_steps(p, state)  # int32, p's shape
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if where is None:
            where = torch.ones_like(p, dtype=torch.bool)
        k.add_(where)
        g = torch.where(where, p.grad, 0)
        if wd and group["decoupled"]:
            p.copy_(torch.where(where, p * (1 - lr * wd), p))  # on w_{t-1}, before the update, as torch does
        elif wd:
            g = g.add(p, alpha=wd)
        m.copy_(torch.where(where, m.lerp(g, 1 - beta1), m))
        v.copy_(torch.where(where, (v * beta2).addcmul_(g, g, value=1 - beta2), v))
        # torch's scalars, per element: bias corrections in float64, then the parameter's dtype
        kd = k.double()
        step_size = (lr / (1 - torch.pow(beta1, kd))).to(p.dtype)  # inf where k = 0: not used there
        bias2_sqrt = (1 - torch.pow(beta2, kd)).sqrt().to(p.dtype)
        update = step_size * m / (v.sqrt() / bias2_sqrt + eps)
        p.sub_(torch.where(where, update, 0))

    @torch.no_grad()
    def restart(self, param: Tensor, where: Tensor) -> None:
        """Zero both moments and the step count of ``param`` at ``where`` (its next update there is a fresh
        Adam's); the step count of the others is kept, per element from now on."""
        state = self.state.get(param)
        if not state:
            return  # no state yet: everything starts at zero anyway
        k = _per_element_steps(param, state)
        for value in (state["exp_avg"], state["exp_avg_sq"], k):
            value.masked_fill_(where, 0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, then the per-element step counts back on their parameter's device as int32 (torch's
        loader leaves a ``step`` where it was loaded)."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            step = state.get("step")
            if torch.is_tensor(step) and step.dim() > 0:
                state["step"] = step.to(device=p.device, dtype=torch.int32)


def _per_element_steps(p: Tensor, state: dict[str, Any]) -> Tensor:
    """``state['step']`` as an int32 tensor of ``p``'s shape (a scalar step is spread to every element)."""
    step = state["step"]
    if step.dim() == 0:
        step = state["step"] = torch.full(p.shape, int(step), dtype=torch.int32, device=p.device)
    return step


@torch.no_grad()
def restart_state(optimizer: Optional[torch.optim.Optimizer], param: Tensor, where: Tensor) -> None:
    """Restart the optimizer state of ``param`` at ``where`` (bool, ``param``'s shape): both moments and the
    step count under :class:`MaskedAdam`, every per-element state tensor (SGD's momentum) otherwise."""
    if optimizer is None or param not in optimizer.state:
        return
    if isinstance(optimizer, MaskedAdam):
        optimizer.restart(param, where)
        return
    for value in optimizer.state[param].values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(where, 0)

"""The divergence guard: a run whose loss stays non-finite stops as ``diverged`` instead of completing.

:class:`DivergenceGuard` counts consecutive optimizer steps with a non-finite training loss on the
run's device (no host sync per step); the loop reads it every ``train.nan_patience`` steps, at logs,
checkpoints and the end. Steps that the fp16 ``GradScaler`` skipped (inf/NaN gradients: the weights
did not move, the scale drops) are not counted, nor do they end a streak: that is the scaler doing its
job, not divergence. :func:`nonfinite_entries` finds non-finite weights (the end of a run, export).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = ["DivergenceGuard", "Divergence", "DivergedError", "nonfinite_entries"]


@dataclass(frozen=True)
class Divergence:
    """Where a run diverged; steps count optimizer steps completed, as in ``metrics.csv``."""

    step: int  # the step at which the streak reached the patience
    patience: int
    last_finite_step: Optional[int]  # None: no step had a finite loss
    last_finite_loss: Optional[float]

    def message(self) -> str:
        first = self.step - self.patience + 1
        last = (f"last finite loss {self.last_finite_loss:.6g} at step {self.last_finite_step}"
                if self.last_finite_step is not None else "no step had a finite loss")
        return (f"diverged at step {self.step}: the training loss was not finite for {self.patience} "
                f"consecutive steps (steps {first}-{self.step}, train.nan_patience={self.patience}); {last}")

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "patience": self.patience, "last_finite_step": self.last_finite_step,
                "last_finite_loss": self.last_finite_loss}


class DivergedError(RuntimeError):
    """Raised inside the loop when the guard trips; the loop ends the run as ``diverged``."""

    def __init__(self, divergence: Divergence | str):
        self.divergence = divergence if isinstance(divergence, Divergence) else None
        super().__init__(divergence.message() if isinstance(divergence, Divergence) else divergence)


class DivergenceGuard:
    """Device-side streak of non-finite losses; ``patience`` 0 turns the guard off."""

    def __init__(self, patience: int, device: torch.device):
        self.patience = int(patience)
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.last_finite_loss = torch.full((), math.nan, dtype=torch.float64, device=device)
        self.last_finite_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.tripped_at = torch.full((), -1, dtype=torch.int64, device=device)  # -1: not tripped

    @torch.no_grad()
    def observe(self, step: int, loss: torch.Tensor, skipped: bool = False) -> None:
        """Record the loss of the step that completed ``step`` steps; a scaler-skipped step is ignored."""
        if not self.patience or skipped:
            return
        finite = torch.isfinite(loss.detach()).reshape(())
        self.streak = torch.where(finite, torch.zeros_like(self.streak), self.streak + 1)
        self.last_finite_loss = torch.where(finite, loss.detach().double().reshape(()), self.last_finite_loss)
        self.last_finite_step = torch.where(finite, torch.full_like(self.last_finite_step, step),
                                            self.last_finite_step)
        trips = (self.tripped_at < 0) & (self.streak >= self.patience)
        self.tripped_at = torch.where(trips, torch.full_like(self.tripped_at, step), self.tripped_at)

    def verdict(self) -> Optional[Divergence]:
        """The divergence once the streak has reached the patience, else None (one host read)."""
        if not self.patience:
            return None
        tripped, last_step, last_loss = torch.stack(
            [self.tripped_at.double(), self.last_finite_step.double(), self.last_finite_loss]).tolist()
        if tripped < 0:
            return None
        return Divergence(int(tripped), self.patience, int(last_step) if last_step >= 0 else None,
                          last_loss if last_step >= 0 else None)

    def in_streak(self) -> bool:
        """Whether the latest counted step had a non-finite loss (one host read)."""
        return bool(self.patience) and int(self.streak) > 0

    def state_dict(self) -> dict[str, Any]:
        return {"streak": int(self.streak), "last_finite_loss": float(self.last_finite_loss),
                "last_finite_step": int(self.last_finite_step), "tripped_at": int(self.tripped_at)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("streak", "last_finite_loss", "last_finite_step", "tripped_at"):
            getattr(self, name).fill_(state[name])


def nonfinite_entries(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state`` (a state dict) holding a NaN or an inf."""
    return [k for k, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]

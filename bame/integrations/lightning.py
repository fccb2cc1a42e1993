"""A PyTorch Lightning callback that trains the LightningModule's model N:M under a bame method.

::

    from bame.integrations.lightning import Sparsify
    sparsify = Sparsify(method="bame", pattern="2:4", interval_steps=100)
    trainer = lightning.pytorch.Trainer(max_steps=10_000, callbacks=[sparsify])
    trainer.fit(module, loader)
    sparsify.ledger.total_ideal_macs, sparsify.records.frame("adaptation")

It follows the step order of docs/contracts.md through :class:`bame.sparsifier.Sparsifier`, hook by hook:

- ``setup`` (fit): the module's eligible conv/linear layers become N:M (``method.prepare``), before
  ``configure_optimizers`` builds the optimizer; ``total_steps`` defaults to the Trainer's
  ``estimated_stepping_batches`` (``max_steps``, or the epochs' batches);
- ``on_fit_start``: the optimizer is bound (the weight decay of the groups holding the N:M weights is taken
  over, as ``bame.attach`` does: the update is unchanged, and an LR scheduler from ``configure_optimizers``
  keeps working);
- ``on_train_batch_start``: ``before_step(global_step)`` (once per optimizer step: with
  ``accumulate_grad_batches`` the micro-batches share it);
- ``on_before_optimizer_step`` (after the backward and the unscaling of mixed precision, before gradient
  clipping): ``after_backward``;
- ``on_train_batch_end``, once the optimizer stepped: ``after_optimizer_step``.

Validation and the sanity check run between steps and are not charged to the ledger. The callback's
``state_dict`` (the method's state, the ledger's totals, the recorders' counters) rides in Lightning's
checkpoint, so ``trainer.fit(..., ckpt_path=...)`` resumes exactly where the run stopped. One optimizer;
needs the ``lightning`` package (``pip install 'bame[lightning]'``).
"""

from __future__ import annotations

from typing import Any, Optional

try:
    import lightning.pytorch as pl
except ImportError as err:  # the optional extra
    raise ImportError("bame.integrations.lightning needs PyTorch Lightning: pip install 'bame[lightning]' "
                      "(or pip install lightning)") from err

from ..flops import FlopsLedger
from ..sparsifier import BACKWARD_DONE, IDLE, Sparsifier, prepare

__all__ = ["Sparsify"]


class Sparsify(pl.Callback):
    """Train the LightningModule N:M under ``method`` at ``pattern``; the keyword arguments are
    :func:`bame.attach`'s (``total_steps`` defaults to the Trainer's ``estimated_stepping_batches``)."""

    def __init__(self, method: str = "bame", pattern: str = "2:4", *, total_steps: Optional[int] = None,
                 **options: Any) -> None:
        self.method, self.pattern, self.total_steps, self.options = method, str(pattern), total_steps, options
        self.sparsifier: Optional[Sparsifier] = None
        self._loaded: Optional[dict[str, Any]] = None  # a checkpoint's state, applied once the optimizer is bound

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, pattern=self.pattern)

    @property
    def ledger(self) -> FlopsLedger:
        return self._sp().ledger

    @property
    def records(self) -> Any:
        return self._sp().records

    def _sp(self) -> Sparsifier:
        if self.sparsifier is None:
            raise RuntimeError("Sparsify: nothing is attached yet (trainer.fit sets it up)")
        return self.sparsifier

    # -- set-up ----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.sparsifier is not None:
            return
        total = self.total_steps if self.total_steps is not None else int(trainer.estimated_stepping_batches)
        self.sparsifier = prepare(pl_module, self.method, self.pattern, total_steps=total, **self.options)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"Sparsify: configure_optimizers returned {len(trainer.optimizers)} optimizers; "
                             f"bame trains with exactly one")
        sp = self._sp()
        sp.bind_optimizer(trainer.optimizers[0])
        if self._loaded is not None:
            sp.load_state_dict(self._loaded)
            self._loaded = None

    # -- the step ----------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        sp = self._sp()
        if sp.phase == IDLE:
            sp.before_step(trainer.global_step)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        sp = self._sp()
        sp.after_backward(sp.step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        sp = self._sp()
        if sp.phase == BACKWARD_DONE:
            sp.after_optimizer_step(sp.step)

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.sparsifier.state_dict() if self.sparsifier is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._loaded = state_dict

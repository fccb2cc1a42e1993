"""``bame.integrations.lightning.Sparsify``: a 10-step ``Trainer.fit`` on Fashion-MNIST trains what bame's own
loop trains (weights, N:M masks, FLOPs totals), and a resume from Lightning's checkpoint at the end of the
first epoch ends where the uninterrupted fit ends."""

from __future__ import annotations

import dataclasses

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from bame import data, models
from bame.integrations.lightning import Sparsify
from bame.nm import is_nm
from bame.schedule import LRFactor
from bame.seed import seed_everything

from conftest import FMNIST_STEPS


class Classifier(pl.LightningModule):
    """LeNet-5 with SGD (biases without decay) and a cosine LR stepped every optimizer step, as bame.train."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = models.create(cfg.model.name, num_classes=10, in_channels=1, image_size=28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        tc = self.cfg.train
        named = list(self.named_parameters())  # the N:M layers' parameters: Sparsify swapped them in setup
        groups = [{"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": tc.weight_decay},
                  {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0}]
        optimizer = torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor("cosine", FMNIST_STEPS))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _Replay(torch.utils.data.Sampler):
    """bame.train's order of training images, epoch by epoch. Lightning calls ``set_epoch(e)`` before epoch
    ``e``; a shuffling generator would not do, as Lightning starts more iterations of a loader than one an
    epoch (each draws from it) and its checkpoint does not hold the generator."""

    def __init__(self, epochs: list[list[int]]) -> None:
        self.epochs, self.epoch = epochs, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(self.epochs[self.epoch])

    def __len__(self) -> int:
        return len(self.epochs[0])


def _module_and_loader(cfg):
    """The model of bame.train (same seed, same RNG draws) and a loader of its batches, in its order."""
    seed_everything(cfg.train.seed)
    bundle = data.build_datasets(cfg.data)
    module = Classifier(cfg)
    tc = cfg.train
    indices = dataclasses.replace(bundle, train=_Indices(len(bundle.train)))
    order, _ = data.make_loaders(indices, tc.batch_size, tc.eval_batch_size, 0, tc.seed)  # bame.train's loader
    epochs = [torch.cat(list(order)).tolist() for _ in range(FMNIST_STEPS // len(order))]
    return module, torch.utils.data.DataLoader(bundle.train, tc.batch_size, sampler=_Replay(epochs), drop_last=True)


def _trainer(tmp_path, sparsify: Sparsify) -> pl.Trainer:
    every_epoch = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    return pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=[sparsify, every_epoch],
                      default_root_dir=tmp_path)


def _sparsify() -> Sparsify:
    return Sparsify(method="bame", pattern="2:4", interval_steps=2, rho=0.2)  # total_steps: the Trainer's 10


def _same_as_bame_train(module: Classifier, sparsify: Sparsify, ref) -> None:
    want = ref.model.state_dict()
    got = {k.removeprefix("net."): v for k, v in module.state_dict().items()}
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    flops = ref.summary["flops"]
    ledger = sparsify.ledger
    assert (ledger.total_ideal_macs, ledger.total_executed_macs) == (flops["ideal_macs"], flops["executed_macs"])
    assert {p: tuple(v) for p, v in ledger.total_by_phase.items()} == {
        p: (v["ideal_macs"], v["executed_macs"]) for p, v in flops["by_phase"].items()}
    layers = list(sparsify.sparsifier.method.layers())
    assert len(layers) == ref.summary["sparsify"]["sparse_layers"] == 2
    assert all(is_nm(layer.mask, 2, 4, exact=True) for _, layer in layers)
    assert sparsify.sparsifier.step == FMNIST_STEPS


@pytest.fixture(scope="module")
def fitted(fmnist_bame_run, tmp_path_factory):
    cfg, ref = fmnist_bame_run
    module, loader = _module_and_loader(cfg)
    sparsify = _sparsify()
    tmp = tmp_path_factory.mktemp("lightning")
    trainer = _trainer(tmp, sparsify)
    trainer.fit(module, loader)
    assert trainer.global_step == FMNIST_STEPS
    return cfg, ref, module, sparsify, tmp


def test_a_10_step_fit_trains_what_bames_loop_trains(fitted):
    _, ref, module, sparsify, _ = fitted
    _same_as_bame_train(module, sparsify, ref)
    adaptation = sparsify.records.frame("adaptation")
    assert sorted(set(adaptation["step"])) == [0, 2, 4] and adaptation["selected_blocks"].sum() > 0
    assert ref.reader().table("adaptation")["selected_blocks"].tolist() == adaptation["selected_blocks"].tolist()


def test_a_resume_from_lightnings_checkpoint_is_exact(fitted, tmp_path):
    cfg, ref, _, _, tmp = fitted
    ckpt = tmp / "epoch=0-step=5.ckpt"
    state = torch.load(ckpt, weights_only=True)
    (saved,) = [v for k, v in state["callbacks"].items() if k.startswith("Sparsify")]
    assert saved["step"] == 5 and saved["ledger"]
    module, loader = _module_and_loader(cfg)
    sparsify = _sparsify()
    trainer = _trainer(tmp_path, sparsify)
    trainer.fit(module, loader, ckpt_path=ckpt)
    assert trainer.global_step == FMNIST_STEPS
    _same_as_bame_train(module, sparsify, ref)


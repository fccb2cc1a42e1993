"""The training loop: complete run folders, failure and interrupt endings, exact resume, schedules."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import bame
from bame.config import ConfigError, load_config
from bame.methods import METHODS
from bame.runs import load_run

from bame import experiment, loop, schedule, training
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
QUICK = CONFIGS_DIR / "quick.yaml"
# 128 synthetic images in batches of 16: 8 steps per epoch; 2 epochs = 16 schedule steps;
# BAME adapts at steps 0, 2, 4, 6 (interval 2, t_f = half of the schedule).
SMALL = ["train.progress=false", "data.synthetic_train_size=128", "data.synthetic_test_size=32",
         "train.batch_size=16", "train.eval_batch_size=32"]


class _FakeRecorders:
    """Stands in for bame.instrument.Recorders while that module is not in the tree."""

    def __init__(self, cfg, model, method, sink):
        self.sink, self.calls = sink, 0

    def on_step_end(self, step: int) -> dict:
        self.calls += 1
        return {}

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


@pytest.fixture(autouse=True)
def collaborators(monkeypatch):
    """Install a fake for each collaborator module that is missing (none once they all landed)."""
    try:
        importlib.import_module("bame.instrument")
    except ImportError:
        fake = types.ModuleType("bame.instrument")
        fake.Recorders = _FakeRecorders
        monkeypatch.setitem(sys.modules, "bame.instrument", fake)
    yield


def quick(*sets: str):
    return load_config(QUICK, SMALL + list(sets))


def run(cfg, out, **kw):
    return bame.train(cfg, out_dir=out, verbose=False, **kw)


# --------------------------------------------------------------------------------------------------
# pure pieces


def test_schedule_rule():
    tc = quick("train.epochs=2").train
    s = experiment.run_schedule(tc, 8)
    assert (s.schedule_steps, s.run_steps, s.eval_interval_steps) == (16, 16, 8)
    s = experiment.run_schedule(quick("train.max_steps=5").train, 8)
    assert (s.schedule_steps, s.run_steps) == (16, 5)  # the schedule still follows the epochs
    s = experiment.run_schedule(quick("train.max_steps=50").train, 8)
    assert (s.schedule_steps, s.run_steps) == (16, 16)
    s = experiment.run_schedule(quick("train.epochs=0", "train.max_steps=12").train, 8)
    assert (s.schedule_steps, s.run_steps) == (12, 12)  # no epochs: max_steps is the schedule
    s = experiment.run_schedule(quick("train.epochs=1.1", "train.warmup_epochs=0.5").train, 10)
    assert (s.schedule_steps, s.warmup_steps) == (11, 5)


def test_lr_factor():
    cos = schedule.LRFactor("cosine", total_steps=10, warmup_steps=2)
    assert [cos(0), cos(1), cos(2)] == [0.5, 1.0, 1.0]
    assert cos(6) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    step = schedule.LRFactor("step", 100, milestones=(0.5, 0.75), gamma=0.1)
    assert [step(49), step(50), step(75)] == [1.0, pytest.approx(0.1), pytest.approx(0.01)]
    assert schedule.LRFactor("constant", 10)(7) == 1.0
    deit = schedule.LRFactor("cosine", total_steps=10, warmup_steps=2, start_factor=0.1, min_factor=0.2)
    assert [deit(0), deit(1), deit(2)] == [pytest.approx(0.55), 1.0, 1.0]
    assert deit(6) == pytest.approx(0.6) and deit(10) == pytest.approx(0.2)


def test_param_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    own = [model[3].weight]
    groups = {g["name"]: g for g in experiment.param_groups(model, own, 1e-3, no_decay_bn_bias=True)}
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(groups["decay"]) == {id(model[0].weight)} and groups["decay"]["weight_decay"] == 1e-3
    assert ids(groups["no_decay"]) == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[3].bias)}
    assert ids(groups["self_decayed"]) == {id(model[3].weight)} and groups["self_decayed"]["weight_decay"] == 0
    flat = experiment.param_groups(model, [], 1e-3, no_decay_bn_bias=False)
    assert [g["name"] for g in flat] == ["decay"] and len(flat[0]["params"]) == 6
    scores = nn.Parameter(torch.zeros(3, 6))  # a method's own parameters (LBC's scores): last, the weights' decay
    mine = experiment.param_groups(model, [], 1e-3, no_decay_bn_bias=False, method_own=[scores])
    assert [g["name"] for g in mine] == ["decay", "method"] and mine[1]["params"] == [scores]
    assert mine[1]["weight_decay"] == 1e-3


def test_param_groups_leave_out_what_the_model_declares_undecayed():
    """timm's convention: a model's no_weight_decay() names (ViT: pos_embed, cls_token) get no decay."""
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
            self.body = nn.Sequential(nn.Linear(4, 4))
            self.body.scale = nn.Parameter(torch.ones(4))

        def no_weight_decay(self):
            return {"pos_embed", "body.scale"}

    model = Tokens()
    groups = {g["name"]: {id(p) for p in g["params"]} for g in experiment.param_groups(model, [], 0.05, True)}
    assert groups["no_decay"] == {id(model.pos_embed), id(model.body.scale), id(model.body[0].bias)}
    assert groups["decay"] == {id(model.body[0].weight)}
    assert len(experiment.param_groups(model, [], 0.05, no_decay_bn_bias=False)[0]["params"]) == 4


# --------------------------------------------------------------------------------------------------
# whole runs


def test_quick_run_writes_a_complete_folder(tmp_path):
    res = run(quick("train.max_steps=10"), tmp_path)
    assert res.status == "completed" and res.steps == 10 and res.test_acc is not None
    d = res.run_dir
    for name in ("manifest.json", "config.yaml", "metrics.csv", "flops.csv", "sparsify.csv", "summary.json",
                 "checkpoints/last.pt", "DONE"):
        assert (d / name).is_file(), name
    r = load_run(d)
    assert r.status == "completed" and r.config.train.max_steps == 10
    m = r.table("metrics")
    assert set(m["split"]) == {"train", "test"}
    assert m[m.split == "test"]["step"].tolist() == [8, 10]  # epoch end, then the end of the run
    assert m["cum_ideal_macs"].is_monotonic_increasing and m["cum_ideal_macs"].iloc[-1] == res.ideal_macs > 0
    s = r.summary
    assert s["steps"] == 10 and s["schedule_steps"] == 16 and s["flops"]["ideal_flops"] == 2 * res.ideal_macs
    assert "FLOPs = 2 x MACs" in s["flops"]["convention"]
    assert 0 < s["flops"]["ideal_x_dense"] < 1 and s["flops"]["dense_macs"] > res.ideal_macs
    f = r.table("flops")
    assert f["ideal_macs"].sum() == res.ideal_macs  # the per-layer rows add up to the total
    assert sorted(set(f["step"])) == [8, 10] and sorted(set(f["epoch"])) == [0, 1]
    assert r.table("sparsify")["sparse"].any()
    ckpt = r.load_checkpoint()
    for key in ("model", "optimizer", "scheduler", "method", "ledger", "recorders", "rng", "step", "epoch"):
        assert key in ckpt
    assert any(k.endswith(".mask") for k in ckpt["model"])
    assert ckpt["step"] == 10 and ckpt["rng"]["loader"]
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in res.model.state_dict().items())


class _Boom(Exception):
    pass


def _failing(exc: type[BaseException], at_step: int):
    base = METHODS["static"]

    class Failing(base):
        def after_backward(self, step: int) -> None:
            super().after_backward(step)
            if step == at_step:
                raise exc("injected")

    return Failing


@pytest.mark.parametrize("exc, status", [(_Boom, "failed"), (KeyboardInterrupt, "interrupted")])
def test_failure_and_interrupt_leave_no_done(tmp_path, monkeypatch, exc, status):
    monkeypatch.setitem(METHODS, "static", _failing(exc, at_step=9))
    with pytest.raises(exc):
        run(quick("method.name=static", "train.max_steps=12"), tmp_path)
    (d,) = tmp_path.iterdir()
    r = load_run(d)
    assert r.status == status and not r.done and not (d / "summary.json").exists()
    assert "injected" in r.manifest["error"] or status == "interrupted"
    assert r.load_checkpoint()["step"] == 8  # the epoch-end checkpoint survives for a resume


def test_errors_before_training_leave_no_folder(tmp_path):
    with pytest.raises(ConfigError, match="model.name"):
        run(quick("model.name=lenet6"), tmp_path)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# resume


def _final_state(run_dir: Path) -> dict:
    return load_run(run_dir).load_checkpoint()


def _assert_same_run(a: Path, b: Path) -> None:
    ca, cb = _final_state(a), _final_state(b)
    assert ca["step"] == cb["step"]
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for pa, pb in zip(sa.values(), sb.values()):  # SGD's momentum; Adam's moments and (per-element) step counts
        assert pa.keys() == pb.keys()
        for key in pa:
            assert pa[key].dtype == pb[key].dtype and torch.equal(pa[key], pb[key]), key
    assert ca["ledger"]["total_ideal_macs"] == cb["ledger"]["total_ideal_macs"]
    assert _same_state(ca["method"], cb["method"])  # permutations, scores, counters
    ta, tb = load_run(a).table("metrics"), load_run(b).table("metrics")
    test_a = ta[ta.split == "test"].set_index("step")[["loss", "acc", "cum_ideal_macs"]]
    test_b = tb[tb.split == "test"].set_index("step")[["loss", "acc", "cum_ideal_macs"]]
    common = test_a.index.intersection(test_b.index)
    assert len(common) >= 2
    assert test_a.loc[common].equals(test_b.loc[common])


def _same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):  # NaN where a score was never taken (BAME's last_score) equals NaN
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and bool(
            (a == b).all() if not a.is_floating_point() else torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    return a == b


_WINDOW = ("method.bame.designated_grad=window", "method.bame.pruned_update=train", "method.bame.regrow_rule=magnitude")
_ADAMW = ("train.optimizer=adamw", "train.lr=1e-3", "train.weight_decay=0.05")


@pytest.mark.parametrize("method, k, n, extra", [("bame", 3, 12, ()), ("srste", 5, 12, ()),
                                                 ("bame", 3, 12, _WINDOW),  # designated at 2: mid-window at 3
                                                 ("phased", 3, 12, ()),  # switch at step 4
                                                 ("bame", 3, 12, _ADAMW), ("srste", 5, 12, _ADAMW),  # flips restart
                                                 ("phased", 3, 12, _ADAMW),
                                                 ("bimask", 3, 12, ("method.bimask.iter=2",)),  # searches 2 | 4
                                                 ("lbc", 3, 12, ())],  # cuts on both sides of 3, settled at 8
                         ids=["bame", "srste", "bame-window", "phased", "bame-adamw", "srste-adamw", "phased-adamw",
                              "bimask", "lbc"])
def test_resume_is_exact(tmp_path, method, k, n, extra):
    sets = [f"method.name={method}", *extra]
    full = run(quick(*sets, f"train.max_steps={n}"), tmp_path / "full")
    part = run(quick(*sets, f"train.max_steps={k}"), tmp_path / "part")
    assert part.status == "completed" and load_run(part.run_dir).done
    if method == "bame":
        adapted = load_run(full.run_dir).table("flops")
        assert (adapted["phase"] == "adaptation").any()  # adaptation on both sides of k: steps 0, 2 | 4, 6
    resumed = bame.train(resume=part.run_dir, overrides=[f"train.max_steps={n}"], verbose=False, progress=False)
    assert resumed.run_dir == part.run_dir and resumed.steps == n
    r = load_run(part.run_dir)
    assert r.status == "completed" and r.done and r.config.train.max_steps == n
    assert len(r.manifest["resumes"]) == 1 and r.manifest["resumes"][0]["from_step"] == k
    _assert_same_run(full.run_dir, part.run_dir)
    assert resumed.ideal_macs == full.ideal_macs and resumed.test_acc == full.test_acc


def test_resume_after_a_crash_mid_epoch_drops_rows_after_the_checkpoint(tmp_path, monkeypatch):
    cfg = quick("method.name=static", "train.max_steps=12", "train.checkpoint_every_steps=3",
                "train.log_every_steps=1")
    full = run(cfg, tmp_path / "full")
    with monkeypatch.context() as mp:
        mp.setitem(METHODS, "static", _failing(_Boom, at_step=10))
        with pytest.raises(_Boom):
            run(cfg, tmp_path / "crash")
    (crashed,) = (tmp_path / "crash").iterdir()
    assert load_run(crashed).load_checkpoint()["step"] == 9  # mid-epoch checkpoint
    bame.train(resume=crashed, verbose=False, progress=False)
    _assert_same_run(full.run_dir, crashed)
    steps = load_run(crashed).table("metrics").query("split == 'train'")["step"].tolist()
    assert steps == list(range(1, 13))  # the row of step 10 (logged before the crash) is not doubled


def test_grad_scaler_unscales_before_the_method_sees_gradients(tmp_path, monkeypatch):
    """fp16 AMP's GradScaler, run on the CPU: a power-of-two loss scale is exact in float32, so the run
    equals the unscaled one only if bame's after_backward (masked decay, scores) sees unscaled grads."""
    cfg = quick("train.max_steps=10")
    plain = run(cfg, tmp_path / "plain")
    build = loop.Trainer.build

    def build_with_scaler(self):
        build(self)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)

    monkeypatch.setattr(loop.Trainer, "build", build_with_scaler)
    scaled = run(cfg, tmp_path / "scaled")
    assert load_run(scaled.run_dir).load_checkpoint()["scaler"]["scale"] == 2.0 ** 12
    _assert_same_run(plain.run_dir, scaled.run_dir)


def test_resume_refuses_changed_config_and_nothing_to_do(tmp_path):
    res = run(quick("method.name=static", "train.max_steps=2"), tmp_path)
    with pytest.raises(training.ResumeError, match=r"train\.lr: 0\.05 -> 0\.2"):
        bame.train(resume=res.run_dir, overrides=["train.lr=0.2", "train.max_steps=4"], verbose=False)
    with pytest.raises(training.ResumeError, match=r"nothing to do: .* >= train.max_steps \(2\); raise it, up to .* 16"):
        bame.train(resume=res.run_dir, verbose=False)
    assert load_run(res.run_dir).status == "completed" and load_run(res.run_dir).done
    whole = run(quick("method.name=static", "train.epochs=0.25"), tmp_path)  # a 2-step schedule, run to its end
    with pytest.raises(training.ResumeError, match="ends the whole schedule"):
        bame.train(resume=whole.run_dir, overrides=["train.max_steps=10"], verbose=False)


def test_train_accepts_a_path_and_overrides(tmp_path):
    res = bame.train(QUICK, out_dir=tmp_path, overrides=SMALL + ["train.max_steps=2", "method.name=dense"],
                     verbose=False)
    assert res.steps == 2 and math.isfinite(res.train_loss)
    assert res.summary["flops"]["ideal_x_dense"] == 1.0  # the ledger's dense count matches the dense reference
    assert json.loads((res.run_dir / "manifest.json").read_text())["method"] == "dense"


def test_channels_last_and_amp_on_cpu(tmp_path):
    res = run(quick("train.max_steps=3", "train.channels_last=true", "train.amp=bf16"), tmp_path)
    assert res.status == "completed" and math.isfinite(res.train_loss)
    model = load_run(res.run_dir).load_checkpoint()["model"]
    assert model["conv2.weight"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path):
    """`torchrun --nproc_per_node=2 -m bame train` (gloo): one run folder, written by rank 0 only."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m", "bame",
           "train", "--config", str(QUICK), "--out", str(tmp_path), "--no-progress", "--set", *SMALL,
           "train.max_steps=6"]
    out = subprocess.run(cmd, cwd=QUICK.parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (d,) = tmp_path.iterdir()
    r = load_run(d)
    assert r.done and r.summary["world_size"] == 2 and r.summary["steps"] == 6
    assert r.table("metrics").query("split == 'test'")["step"].tolist() == [4, 6]  # 4 steps/epoch per rank


def test_resume_refuses_a_run_whose_folder_is_locked_and_ignores_recorded_pids(tmp_path):
    """Only the folder's lock counts: a live process holding it blocks a resume (named by its pid); a pid in
    the manifest, dead or reused by an unrelated program, does not."""
    from bame.runlock import RunLock, RunLockedError

    res = run(quick("method.name=static", "train.max_steps=2"), tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        m = json.loads((res.run_dir / "manifest.json").read_text())
        m.update(status="running", pid=sleeper.pid)  # a recorded pid that is alive, but not training it
        (res.run_dir / "manifest.json").write_text(json.dumps(m))
        bame.train(resume=res.run_dir, overrides=["train.max_steps=4"], verbose=False, progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert load_run(res.run_dir).done and load_run(res.run_dir).summary["steps"] == 4
    holding = f"process {os.getpid()} is writing this run folder"
    with RunLock.acquire(res.run_dir), pytest.raises(RunLockedError, match=holding):  # as another writer would
        bame.train(resume=res.run_dir, overrides=["train.max_steps=6"], verbose=False)
    assert load_run(res.run_dir).summary["steps"] == 4


class _Noisy(torch.utils.data.Dataset):
    """Random augmentation drawn from torch's RNG (the main process's, or a worker's)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x + 0.5 * torch.randn_like(x), y


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_with_random_augmentation(tmp_path, monkeypatch, workers):
    """The augmentation RNG (main process, or each worker's stream) and the training's own draws
    (dropout) continue as if the run had never stopped."""
    data_mod = importlib.import_module("bame.data")
    build = data_mod.build_datasets

    def noisy(cfg):
        bundle = build(cfg)
        return dataclasses.replace(bundle, train=_Noisy(bundle.train))

    monkeypatch.setattr(data_mod, "build_datasets", noisy)
    models_mod = importlib.import_module("bame.models")
    create = models_mod.create
    # input dropout: training steps draw from torch's RNG too, between the batches' augmentations
    monkeypatch.setattr(models_mod, "create", lambda *a, **k: nn.Sequential(nn.Dropout(0.2), create(*a, **k)))
    sets = ["method.name=srste", f"data.num_workers={workers}"]
    full = run(quick(*sets, "train.max_steps=11"), tmp_path / "full")
    part = run(quick(*sets, "train.max_steps=3"), tmp_path / "part")
    bame.train(resume=part.run_dir, overrides=["train.max_steps=11"], verbose=False, progress=False)
    _assert_same_run(full.run_dir, part.run_dir)


def test_step_schedule_warmup_nesterov_and_label_smoothing_reach_the_run(tmp_path, monkeypatch):
    """The loop options in a real run: the LR of every logged step follows warm-up then the step decay
    (written out by hand), the optimizer is Nesterov SGD, and the criterion smooths labels (and changes
    the loss against the same seeded run without them)."""
    criteria = []
    real_ce = nn.CrossEntropyLoss

    def recording_ce(*a, **k):
        criteria.append(real_ce(*a, **k))
        return criteria[-1]

    monkeypatch.setattr(loop.nn, "CrossEntropyLoss", recording_ce)
    opts = ["method.name=static", "train.log_every_steps=1", "train.lr=0.05", "train.lr_schedule=step",
            "train.step_milestones=[0.5,0.75]", "train.step_gamma=0.1", "train.warmup_epochs=0.5"]
    res = run(quick(*opts, "train.nesterov=true", "train.momentum=0.9", "train.label_smoothing=0.1"),
              tmp_path / "a")
    lr = load_run(res.run_dir).table("metrics").query("split == 'train'").set_index("step")["lr"]
    # 16 schedule steps, warm-up 4 steps: after s steps the next step's LR is 0.05 x factor(s).
    expected = {1: 0.025, 2: 0.0375, 3: 0.05, 4: 0.05, 7: 0.05, 8: 0.005, 11: 0.005, 12: 0.0005, 15: 0.0005}
    for s, v in expected.items():
        assert lr[s] == pytest.approx(v, rel=1e-9), f"lr after {s} steps"
    ckpt = load_run(res.run_dir).load_checkpoint()
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in ckpt["optimizer"]["param_groups"])
    assert [c.label_smoothing for c in criteria] == [0.1]
    plain = run(quick(*opts, "train.momentum=0.9"), tmp_path / "b")
    assert [c.label_smoothing for c in criteria] == [0.1, 0.0]
    first = [load_run(r.run_dir).table("metrics").query("split == 'train'")["loss"].iloc[0] for r in (res, plain)]
    assert first[0] != first[1]


def test_gradient_clipping_reaches_the_run_and_logs_the_norm(tmp_path):
    """train.clip_grad_norm in a real run: the train rows carry the mean pre-clip norm (absent without
    clipping), and a limit far below it changes the weights against the same seeded run (SGD, where the
    update scales with the gradient)."""
    opts = ["method.name=static", "train.max_steps=4", "train.log_every_steps=2"]
    clipped = run(quick(*opts, "train.clip_grad_norm=1e-3"), tmp_path / "a")
    free = run(quick(*opts), tmp_path / "b")
    rows = load_run(clipped.run_dir).table("metrics").query("split == 'train'")
    assert list(rows["step"]) == [2, 4] and (rows["grad_norm"] > 1e-3).all()
    assert "grad_norm" not in load_run(free.run_dir).table("metrics").columns
    a, b = (load_run(r.run_dir).load_checkpoint()["model"] for r in (clipped, free))
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("paper", ["cifar10_resnet32", "cifar10_mobilenet_v2", "imagenet_resnet18",
                                   "imagenet_resnet50"])
def test_paper_configs_train_end_to_end_on_files_in_the_real_format(tmp_path, paper):
    """Each configs/paper recipe, unchanged but for the data root, the batch and the step count, trains
    through the real loaders (CIFAR's pickle batches, an ImageNet ImageFolder) written by the tests."""
    from test_data import write_cifar, write_image_folder

    root = tmp_path / "data"
    if paper.startswith("cifar10"):
        write_cifar(root, "cifar10")  # 5 x 4 training images, 4 test images
        small = ["train.batch_size=8", "train.eval_batch_size=4"]
    else:
        write_image_folder(root)  # 3 classes x 2 images per split
        small = ["train.batch_size=3", "train.eval_batch_size=6", "data.image_size=32"]
    cfg = load_config(CONFIGS_DIR / "paper" / f"{paper}.yaml",
                      [f"data.root={root}", "data.num_workers=0", "train.max_steps=2", "train.progress=false",
                       *small])
    res = run(cfg, tmp_path / "runs")
    assert res.status == "completed" and res.steps == 2 and math.isfinite(res.train_loss)
    r = load_run(res.run_dir)
    assert r.done and r.summary["final"]["test_acc"] is not None
    assert r.table("sparsify")["sparse"].any()


def test_a_cuda_device_without_an_index_is_local_ranks_under_torchrun(monkeypatch):
    """One GPU per process: 'auto' and 'cuda' pick LOCAL_RANK's device even where nobody called
    torch.cuda.set_device (bame.train from a user's script under torchrun); explicit indices stay."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert experiment.resolve_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    for name in ("auto", "cuda"):
        assert experiment.resolve_device(name) == torch.device("cuda", 3), name
    assert experiment.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert experiment.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert experiment.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        experiment.resolve_device("cuda")

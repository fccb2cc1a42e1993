import argparse
import re
import zlib

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from bame.export import (
    FORMAT_VERSION,
    SemiStructuredConv2d,
    SemiStructuredLinear,
    add_export_parser,
    cli_export,
    compress,
    compressed_nbytes,
    compression_ratio,
    decompress,
    dense_nbytes,
    gemm_weight,
    load_export,
    save_export,
    semi_structured_skip_reason,
    to_semi_structured,
)
from bame.layers import NMConv2d, NMLinear, nm_layers, sparsify
from bame.nm import Layout, group_counts, group_view, random_nm_mask

PATTERNS = ["1:4", "2:4", "1:16", "2:8", "3:8", "4:4"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _masked(w, mask):
    return w * mask


def _random_mask(shape, n, m, layout, gen, thin=True):
    """Random N:M mask; with ``thin`` some groups keep fewer than N (down to none)."""
    mask = random_nm_mask(shape, n, m, gen, layout)
    if thin:
        drop = torch.rand(shape, generator=gen) < 0.3
        mask = mask & ~drop
    return mask


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("layout", ["row", "channel"])
@pytest.mark.parametrize("shape", [(8, 32, 3, 3), (16, 64)], ids=["conv", "linear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_exact(pattern, layout, shape, dtype):
    n, m = map(int, pattern.split(":"))
    gen = torch.Generator().manual_seed(zlib.crc32(f"{pattern}{layout}{shape}".encode()))
    w = torch.randn(shape, generator=gen).to(dtype)
    mask = _random_mask(shape, n, m, layout, gen)
    c = compress(w, mask, pattern, layout)
    g = (shape[0], w[0].numel() // m, n)
    assert c.values.shape == g and c.indices.shape == g
    assert c.values.dtype == dtype and c.indices.dtype == torch.uint8
    assert c.shape == shape and str(c.pattern) == pattern and c.layout is Layout(layout)
    idx = c.indices.long()
    assert int(idx.max()) < m
    if n > 1:
        assert bool((idx[..., 1:] > idx[..., :-1]).all())  # strictly ascending: distinct slots
    out = decompress(c)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, _masked(w, mask))


def test_thin_groups_pad_with_unused_slots_and_zero():
    w = torch.arange(1, 9, dtype=torch.float32).reshape(1, 8)  # two groups of 4
    mask = torch.tensor([[False, False, True, False, False, False, False, False]])
    c = compress(w, mask, "2:4")
    # group 0 keeps position 2 and pads with the first unused position 0; group 1 keeps nothing.
    assert c.indices.tolist() == [[[0, 2], [0, 1]]]
    assert c.values.tolist() == [[[0.0, 3.0], [0.0, 0.0]]]
    assert torch.equal(decompress(c), w * mask)


def test_channel_layout_groups_input_channels():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 8, 3, 3, generator=gen)
    mask = random_nm_mask(w.shape, 2, 4, gen, "channel")
    c = compress(w, mask, "2:4", "channel")
    # the compressed groups are the channel groups of bame.nm's convention
    assert torch.equal(group_counts(mask, 4, "channel"), (c.values != 0).sum(-1))
    ref = group_view(w * mask, 4, "channel").gather(-1, c.indices.long())
    assert torch.equal(ref, c.values)
    assert torch.equal(decompress(c), w * mask)


def test_sizes():
    w = torch.randn(64, 256)
    # 1:16 float32: per group of 16 one value (4 B) + one index (1 B) instead of 64 B
    c = compress(w, random_nm_mask(w.shape, 1, 16), "1:16")
    assert dense_nbytes(c) == 64 * 256 * 4
    assert compressed_nbytes(c) == 64 * 16 * (4 + 1)
    assert compression_ratio(c) == pytest.approx(64 / 5)
    # 2:4 float16: 2 x 2 B values + 2 B indices vs 8 B dense
    c = compress(w.half(), random_nm_mask(w.shape, 2, 4), "2:4")
    assert c.nbytes == 64 * 64 * 6 and c.dense_nbytes == 64 * 256 * 2
    assert c.ratio == pytest.approx(4 / 3)
    # 4:4 is dense: compression only adds the indices
    c = compress(w, torch.ones_like(w, dtype=torch.bool), "4:4")
    assert c.ratio < 1


def test_bad_mask_errors():
    w = torch.randn(4, 16)
    mask = random_nm_mask(w.shape, 2, 4)
    mask[1, :4] = True  # one group keeps 4 of 4
    with pytest.raises(ValueError, match=r"\(4, 16\).*2:4.*1 of 16 groups keep more than 2"):
        compress(w, mask, "2:4")
    with pytest.raises(ValueError, match=r"\(4, 16\).*K=16 is not a multiple of 32"):
        compress(w, torch.ones_like(w, dtype=torch.bool), "1:32")
    with pytest.raises(ValueError, match="mask shape"):
        compress(w, mask[:2], "2:4")
    with pytest.raises(ValueError, match="invalid N:M pattern"):
        compress(w, mask, "5:4")


def _small_net():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),  # first conv: dense by policy
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(32, 16, 1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Linear(32, 10),  # classifier: dense by policy
    )


def _trained_like(pattern="2:4", layout="row", seed=0):
    torch.manual_seed(seed)
    model = _small_net()
    sparsify(model, pattern, layout=layout)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in nm_layers(model):
            layer.init_mask("random", gen)
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("pattern,layout", [("2:4", "row"), ("1:16", "row"), ("2:8", "channel")])
def test_export_load_gives_identical_outputs(tmp_path, pattern, layout):
    model = _trained_like(pattern, layout)
    assert len(list(nm_layers(model))) == 3
    path = tmp_path / "model_nm.pt"
    exported = save_export(path, model)
    assert exported["format_version"] == FORMAT_VERSION
    assert exported["pattern"] == pattern and exported["layout"] == layout
    assert set(exported["nm_layers"]) == {"3", "5", "8"}
    assert not any(k.endswith("mask") for k in exported["dense"])
    state = load_export(path)
    dense = _small_net().eval()
    dense.load_state_dict(state)  # strict: same keys as the dense architecture
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(dense(x), model(x))
    for name, layer in nm_layers(model):
        assert torch.equal(state[f"{name}.weight"], layer.weight * layer.mask)
    # the file loads without unpickling arbitrary objects
    assert torch.load(path, weights_only=True)["keys"] == list(state)


def test_save_export_refuses_to_overwrite_and_state_dict_needs_pattern(tmp_path):
    model = _trained_like()
    path = tmp_path / "m.pt"
    save_export(path, model)
    with pytest.raises(FileExistsError, match="already exists"):
        save_export(path, model)
    save_export(path, model, overwrite=True)
    with pytest.raises(ValueError, match="pattern="):
        save_export(tmp_path / "s.pt", model.state_dict())
    exported = save_export(tmp_path / "s.pt", model.state_dict(), pattern="2:4")
    assert set(exported["nm_layers"]) == {"3", "5", "8"}


def test_export_of_masks_breaking_the_pattern_names_the_layer(tmp_path):
    model = _trained_like()
    state = model.state_dict()
    state["8.mask"][:] = True
    with pytest.raises(ValueError, match=r"layer '8'.*\(32, 16\).*2:4"):
        save_export(tmp_path / "x.pt", state, pattern="2:4")


def _make_run(tmp_path, model, pattern="2:4", layout="row"):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = {"model": {"name": "small"}, "method": {"name": "static", "pattern": pattern, "layout": layout}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    torch.save({"model": model.state_dict(), "optimizer": {}, "step": 10,
                # an older bame's checkpoint: NumPy's RNG key as an ndarray (loaded through a narrow allow-list)
                "rng": {"numpy": np.random.RandomState(0).get_state()}}, run / "checkpoints" / "last.pt")
    return run


def _parse(argv):
    parser = argparse.ArgumentParser(prog="bame")
    add_export_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_export_writes_and_refuses_to_overwrite(tmp_path, capsys):
    model = _trained_like()
    run = _make_run(tmp_path, model)
    args = _parse(["export", str(run)])
    assert args.func is cli_export
    assert cli_export(args) == 0
    out = capsys.readouterr().out
    assert "3 N:M layers" in out and "N:M weights:" in out and "whole model:" in out
    path = run / "export" / "model_nm.pt"
    dense = _small_net().eval()
    dense.load_state_dict(load_export(path))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(dense(x), model(x))
    before = path.read_bytes()
    assert cli_export(_parse(["export", str(run)])) == 2
    assert re.search("bame: error: .*model_nm.pt already exists.*--out", capsys.readouterr().err)
    assert path.read_bytes() == before
    other = tmp_path / "elsewhere" / "m.pt"
    assert cli_export(_parse(["export", str(run), "--out", str(other)])) == 0
    assert other.is_file()


def test_cli_export_clear_errors(tmp_path, capsys):
    def error(run_dir):
        assert cli_export(_parse(["export", str(run_dir)])) == 2
        return capsys.readouterr().err

    assert re.search("run folder .*nope not found", error(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert "checkpoints/last.pt not found" in error(tmp_path / "empty")
    run = _make_run(tmp_path, _trained_like(), pattern="1:16")  # masks are 2:4, config says 1:16
    assert re.search(r"layer '3'.*not 1:16", error(run))
    assert not (run / "export" / "model_nm.pt").exists()
    (run / "config.yaml").unlink()
    assert "config.yaml not found" in error(run)


# ---- 2:4 semi-structured inference ----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["row", "channel"])
@pytest.mark.parametrize("conv_args", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, dilation=2),
                                       dict(kernel_size=1, stride=2), dict(kernel_size=1, padding=1),
                                       dict(kernel_size=(1, 3), padding=(0, 1), bias=False)])
def test_gemm_conv_matches_masked_conv(layout, conv_args):
    """The im2col re-layout of SemiStructuredConv2d, checked on the CPU with a dense GEMM weight."""
    torch.manual_seed(0)
    conv = NMConv2d(8, 12, pattern="2:4", layout=layout, mask_init="random", dtype=torch.float64, **conv_args)
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    gemm = SemiStructuredConv2d.from_nm(conv, gemm_weight(conv))
    with torch.no_grad():
        torch.testing.assert_close(gemm(x), conv(x))
    lin = NMLinear(16, 8, pattern="2:4", mask_init="random", dtype=torch.float64)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(SemiStructuredLinear(gemm_weight(lin), lin.bias)(x), lin(x))


def test_semi_structured_skip_reasons():
    assert "not 2:4" in semi_structured_skip_reason(NMLinear(64, 64, pattern="1:16"))
    assert "float16" in semi_structured_skip_reason(NMLinear(64, 64, pattern="2:4"))
    assert "groups=2" in semi_structured_skip_reason(NMConv2d(64, 64, 3, groups=2, pattern="2:4"))
    assert "CUDA" in semi_structured_skip_reason(NMLinear(64, 64, pattern="2:4", dtype=torch.float16))
    loaded = NMLinear(64, 64, pattern="2:4", dtype=torch.float16)
    loaded.mask.fill_(True)  # e.g. a state dict loaded over the buffer
    assert "more than 2 of 4" in semi_structured_skip_reason(loaded)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            to_semi_structured(nn.Sequential(NMLinear(64, 64)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["row", "channel"])
def test_to_semi_structured_matches_masked_model(dtype, layout):
    torch.manual_seed(0)
    model = nn.Sequential(
        NMConv2d(64, 128, 3, padding=1, pattern="2:4", layout=layout, mask_init="random"),  # K = 576
        nn.ReLU(),
        NMConv2d(128, 128, 1, stride=2, pattern="2:4", layout=layout, mask_init="random"),  # 1x1: K = 128
        nn.ReLU(),
        NMConv2d(128, 40, 3, padding=1, pattern="2:4", layout=layout, mask_init="random"),  # Cout 40: left as is
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        NMLinear(40, 256, pattern="2:4", mask_init="random"),  # K = 40: left as is
        nn.ReLU(),
        NMLinear(256, 128, pattern="2:4", mask_init="random"),
    ).to("cuda", dtype).eval()
    x = torch.randn(8, 64, 16, 16, device="cuda", dtype=dtype)
    with torch.no_grad():
        ref = model(x)
        report = to_semi_structured(model)
        out = model(x)
    assert report.converted == ["0", "2", "9"], str(report)
    assert set(report.skipped) == {"4", "7"}
    assert isinstance(model[0], SemiStructuredConv2d) and isinstance(model[9], SemiStructuredLinear)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_export_of_an_unfinished_run_warns_and_records_its_step_and_status(tmp_path, capsys, monkeypatch):
    import bame
    from bame.cli import main
    from bame.methods import METHODS

    from test_train import _failing, quick

    monkeypatch.setitem(METHODS, "static", _failing(KeyboardInterrupt, at_step=9))
    with pytest.raises(KeyboardInterrupt):
        bame.train(quick("method.name=static", "train.max_steps=12"), out_dir=tmp_path, verbose=False)
    (run,) = tmp_path.iterdir()
    assert main(["export", str(run)]) == 0
    captured = capsys.readouterr()
    assert "bame: warning: run" in captured.err and "is interrupted, not completed" in captured.err
    assert "at step 8" in captured.err and "(interrupted), checkpoint at step 8" in captured.out
    exported = torch.load(run / "export" / "model_nm.pt", weights_only=True)
    assert exported["source"] == {"run_id": run.name, "status": "interrupted", "step": 8}
    assert load_export(exported).keys()  # the extra entry does not disturb loading

"""The run-folder contract (bame.contract) and the pattern value (bame.pattern): one spelling of each name,
and what the writers really write matches it."""

from __future__ import annotations

import datetime as dt

import pytest

from bame import contract
from bame.pattern import Layout, NMPattern


def test_a_pattern_is_a_value_equal_to_its_text():
    p = NMPattern.parse(" 1 : 16 ")
    assert p == NMPattern(1, 16) and p == "1:16" and str(p) == "1:16" and p.slug == "1of16"
    assert p != "2:4" and p != NMPattern(2, 4) and p != 16
    assert hash(p) == hash("1:16") and {p: 1}["1:16"] == 1
    assert Layout.parse("ROW") is Layout.ROW


def test_the_run_id_and_the_pattern_a_reader_shows():
    when = dt.datetime(2025, 1, 1, 12, 0, 0)
    assert contract.run_id(when, "quick", "bame", NMPattern(2, 4), 0) == "20250101-120000-quick-bame-2of4-s0"
    assert contract.run_id(when, "my exp", "static", "1:16", 3) == "20250101-120000-my_exp-static-1of16-s3"
    assert contract.run_id(when, "quick", "dense", "2:4", 1) == "20250101-120000-quick-dense-s1"
    assert contract.pattern_label("dense", "2:4") == "dense" and contract.pattern_label("bame", "1:16") == "1:16"


def test_block_snapshot_names_round_trip():
    assert contract.block_name(100) == "step_00000100"
    assert contract.block_step(contract.block_name(100) + ".npz") == 100
    assert contract.block_step("notes.txt") is None


def test_phases_and_columns_are_spelled_once():
    from bame.autograd import Phase
    from bame.instrument import ADAPTATION_COLUMNS

    assert tuple(p.value for p in Phase) == contract.LAYER_PHASES
    assert contract.PHASES == contract.LAYER_PHASES + (contract.ADAPTATION,)
    assert ADAPTATION_COLUMNS is contract.ADAPTATION_COLUMNS


def test_patternless_methods_are_the_methods_without_n_m_layers():
    from bame.methods import METHODS

    assert set(contract.PATTERNLESS_METHODS) == {name for name, cls in METHODS.items() if cls.backward_mode is None}


@pytest.mark.parametrize("table", [contract.FLOPS_TABLE, contract.MASKS_TABLE, contract.ADAPTATION_TABLE,
                                   contract.SPARSIFY_TABLE, contract.METRICS_TABLE])
def test_real_run_folders_hold_the_contract_columns(runs_root, table):
    folders = sorted(p.parent for p in runs_root.glob(f"quick/*/{contract.MANIFEST}"))
    headers = set()
    for folder in folders:
        path = folder / contract.table_file(table)
        if path.exists():
            headers.add(tuple(path.read_text().splitlines()[0].split(",")))
    assert headers, table
    for header in headers:
        columns = contract.TABLE_COLUMNS[table]
        if table == contract.METRICS_TABLE:  # then the recorders' scalars
            header = header[:len(columns)]
        assert header == columns

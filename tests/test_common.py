"""dejavu_common: one kept-count rule, layer specs, atomic writes, the embedded model, the dump format."""

import json
import math
import os

import pytest

from dejavu_common import dump_format
from dejavu_common.helpers import (KeepError, LayerSpecError, atomic_write, check_keep, embedded_gguf, kept_count,
                                   parse_layers, write_json_atomic)


def test_kept_count_fractions_and_counts():
    assert kept_count(0.07, 100) == 7          # 0.07 * 100 = 7.000000000000001 keeps 7, not 8
    assert kept_count(0.3, 10) == 3
    assert kept_count(0.5, 9) == 5             # ceil(4.5)
    assert kept_count(0.1, 1536) == 154
    assert kept_count(1e-6, 10) == 1           # at least one
    assert kept_count(1.0, 7) == 7
    assert kept_count(1, 7) == 7               # 1 is the whole width, not one unit
    assert kept_count(5, 64) == 5 and kept_count(64.0, 64) == 64


@pytest.mark.parametrize("keep", [0, -0.5, -3, float("nan"), float("inf"), 1.5, "x"])
def test_bad_keep_is_an_error_naming_the_flag(keep):
    with pytest.raises(KeepError, match="--mlp-keep"):
        check_keep(keep, "--mlp-keep")
    with pytest.raises(KeepError, match="--mlp-keep"):
        kept_count(keep, 64, "--mlp-keep")


def test_count_above_the_width_is_an_error():
    with pytest.raises(KeepError, match=r"--mlp-keep 1000: keeps 1000 units, but there are only 64"):
        kept_count(1000, 64, "--mlp-keep")


def test_one_rounding_rule_everywhere():
    from dejavu_llama.modules import sparse_execution
    from dejavu_study.report import runs
    from sparse_predictor import labels, metrics

    assert sparse_execution.count_or_none(0.07, 100) == labels.topk_count(0.07, 100) == 7
    assert metrics.kept_count is kept_count and sparse_execution.kept_count is kept_count
    assert runs.kept_fraction(0.07, 100) == pytest.approx(0.07)


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3] and parse_layers(None, [2, 5]) == [2, 5]
    assert parse_layers("0-1,3", 4) == [0, 1, 3]
    assert parse_layers("2-", 4) == [2, 3]          # to the last layer
    assert parse_layers("-1", 30) == [29] and parse_layers("28-29", 30) == [28, 29]
    assert parse_layers("3,1,1", [1, 3, 7]) == [1, 3]
    for bad in ("", "a", "1-2-3", "3-1"):
        with pytest.raises(LayerSpecError, match="--L"):
            parse_layers(bad, 4, "--L")
    with pytest.raises(LayerSpecError, match=r"--L '5'.*\[5\] not among the available 0-3"):
        parse_layers("5", 4, "--L")


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(str(path), {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(str(path)) as handle:
            handle.write('{"half": ')
            raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary file left behind
    with pytest.raises(ValueError):
        write_json_atomic(str(path), {"a": math.nan})  # JSON has no NaN
    assert json.loads(path.read_text()) == {"a": 1}


def test_embedded_model_is_found():
    folder, name = embedded_gguf()
    assert os.path.isfile(os.path.join(folder, name)) and name.endswith(".gguf")


def test_dump_meta_is_checked_by_one_definition(tmp_path):
    dims = {"hidden_size": 8, "intermediate_size": 16, "num_heads": 2}
    meta = dump_format.new_meta("m", "llama-save", 10, dims, 3, "requests.jsonl")
    assert dump_format.check_meta(meta, "meta.json") is meta
    assert meta["model_type"] == "llama" and meta["rows"] == {"0": 0, "1": 0, "2": 0}
    assert dump_format.tap_widths(meta) == {"att_x": 8, "mlp_x": 8, "mlp_label": 16, "att_label": 2}
    assert dump_format.dump_file("d", "mlp_label", 10) == os.path.join("d", "mlp_label_10.mmap")
    for key, value, message in (("version", 2, "version"), ("dtype", "float32", "dtype"),
                                ("num_heads", -1, "num_heads"), ("rows", [], "rows")):
        with pytest.raises(dump_format.DumpError, match=f"meta.json.*{message}"):
            dump_format.check_meta({**meta, key: value}, "meta.json")
    del meta["capacity"]
    with pytest.raises(dump_format.DumpError, match="lacks keys: capacity"):
        dump_format.check_meta(meta, "meta.json")

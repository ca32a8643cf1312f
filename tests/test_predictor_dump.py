"""Dump reader: the exact format, row counts from meta.json, and clear errors for bad files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
from sparse_predictor.dump_reader import DumpError, DumpReader
from sparse_predictor.synthetic import make_dump, write_dump


@pytest.fixture
def dump(tmp_path):
    path = tmp_path / "dump"
    make_dump(str(path), model_type="llama", rows=40, capacity=64, hidden_size=8,
              intermediate_size=12, num_heads=4, num_layers=3)
    return path


def test_reads_the_format(dump):
    meta = json.loads((dump / "meta.json").read_text())
    assert meta["format"] == "dejavu-sp-dump" and meta["rows"] == {"0": 40, "1": 40, "2": 40}
    # raw float16 memmaps without a header: capacity * width * 2 bytes
    assert os.path.getsize(dump / "mlp_label_2.mmap") == 64 * 12 * 2
    reader = DumpReader(str(dump))
    assert (reader.capacity, reader.hidden_size, reader.intermediate_size, reader.num_heads) == (64, 8, 12, 4)
    assert reader.layers == [0, 1, 2] and reader.model_type == "llama"
    assert reader.att_x(1).shape == (64, 8) and reader.mlp_x(1).shape == (64, 8)
    assert reader.mlp_label(0).shape == (64, 12) and reader.att_label(2).shape == (64, 4)
    assert reader.att_x(0).dtype == np.float16
    assert not reader.mlp_x(0).flags.writeable
    raw = np.fromfile(dump / "att_x_1.mmap", dtype=np.float16).reshape(64, 8)
    np.testing.assert_array_equal(reader.att_x(1)[:40], raw[:40])


def test_rows_for_is_the_min_over_layers(tmp_path):
    arrays = {(tap, l): np.ones((10, w), np.float32) for l in range(2)
              for tap, w in (("att_x", 4), ("mlp_x", 4), ("mlp_label", 6), ("att_label", 2))}
    write_dump(str(tmp_path), arrays, model_type="opt", capacity=16, hidden_size=4, intermediate_size=6,
               num_heads=2, layers=[0, 1], rows={0: 10, 1: 7})
    reader = DumpReader(str(tmp_path))
    assert reader.rows_for([0]) == 10 and reader.rows_for([0, 1]) == 7
    with pytest.raises(DumpError, match="layer 5 is not in dump"):
        reader.rows_for([5])


def test_missing_file_names_the_file(dump):
    os.remove(dump / "att_x_1.mmap")
    reader = DumpReader(str(dump))
    with pytest.raises(DumpError, match="missing dump file") as err:
        reader.att_x(1)
    assert str(dump / "att_x_1.mmap") in str(err.value)


def test_short_file_names_the_file(dump):
    path = dump / "mlp_label_0.mmap"
    with open(path, "r+b") as f:
        f.truncate(64 * 12 * 2 - 2)
    with pytest.raises(DumpError, match="short dump file") as err:
        DumpReader(str(dump)).mlp_label(0)
    assert str(path) in str(err.value)


def test_mismatched_file_names_the_file(dump):
    meta = json.loads((dump / "meta.json").read_text())
    meta["num_heads"] = 3  # the att_label files were written with 4 heads
    (dump / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DumpError, match="mismatched dump file") as err:
        DumpReader(str(dump)).att_label(1)
    assert str(dump / "att_label_1.mmap") in str(err.value)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("hidden_size"), "lacks keys: hidden_size"),
    (lambda m: m.update(format="other"), "format"),
    (lambda m: m.update(dtype="float32"), "dtype"),
    (lambda m: m.update(rows={"0": 999}), "outside"),
])
def test_bad_meta_json(dump, change, message):
    meta = json.loads((dump / "meta.json").read_text())
    change(meta)
    (dump / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DumpError, match=message) as err:
        DumpReader(str(dump))
    assert str(dump / "meta.json") in str(err.value)


def test_missing_meta_json(dump):
    os.remove(dump / "meta.json")
    with pytest.raises(DumpError, match="missing dump metadata file") as err:
        DumpReader(str(dump))
    assert str(dump / "meta.json") in str(err.value)


def test_cli_reports_a_missing_file_without_traceback(dump, tmp_path):
    os.remove(dump / "mlp_x_0.mmap")
    proc = subprocess.run(
        [sys.executable, str(REPO / "sparse_predictor" / "main_mlp_llama.py"), "--data-path", str(dump),
         "--L", "0", "--ckpt-dir", str(tmp_path / "ckpt"), "--no-progress"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert str(dump / "mlp_x_0.mmap") in proc.stderr
    assert "Traceback" not in proc.stderr

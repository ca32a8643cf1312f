"""The GPU benchmark's dry run: without CUDA, benchmarks/bench_gpu.py runs its steps at tiny dims
on the CPU, and with TRITON_INTERPRET=1 the parts of one layer's sparse MLP too (the Triton
kernels through the interpreter). A GPU machine is lent for minutes at a time, so the script it
runs is checked here first: every row it writes, none of them a speed."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("top-K", "top-K unsorted", "sort of the kept indices", "top-K sorted, one Triton program",
         "gathered gate/up (Triton)", "gathered down (Triton)", "whole predicted MLP")


def test_the_gpu_benchmark_dry_run_writes_every_row(tmp_path):
    pytest.importorskip("triton")
    output = tmp_path / "bench_gpu.json"
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_gpu.py"), "--device", "cpu",
                             "--json", str(output)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["dry_run"] and report["device"] == "cpu"
    rows = {row["measure"]: row for row in report["rows"]}
    expected = ["dense MLP", "engine decode (cuda backend)", "engine decode / memory bound",
                "sparse decode, MLP keep 0.5, heads keep 0.5"]
    expected += [f"keep {keep}: {part}" for keep in (0.5, 0.25, 0.1) for part in PARTS]
    expected += [f"sparse decode, MLP keep {keep}" for keep in (0.5, 0.25, 0.1)]
    missing = [measure for measure in expected if measure not in rows]
    assert not missing, f"rows missing from the dry run: {missing}"
    assert all(row["value"] > 0 for row in report["rows"])
    assert all("dry run" in rows[f"keep 0.5: {part}"]["case"] for part in PARTS)
    # float32 random scores have no ties: the one-program selection keeps topk's set
    assert rows["keep 0.25: top-K sorted, one Triton program"]["note"] == "the same kept set as topk: True"

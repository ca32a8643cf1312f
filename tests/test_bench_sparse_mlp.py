"""The sparse MLP benchmark with half-precision weights, at tiny dims: the paths it times compute
what torch computes in that dtype, and every target row is written. None of it is a speed."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_sparse_mlp  # noqa: E402
from dejavu_llama.modules import cpu_kernels  # noqa: E402

TINY = {"tiny": dict(d=64, inter=192, reference_D=64, layers=2, heads=4, kv_heads=2, head_dim=16)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_each_dtype_times_the_right_paths(monkeypatch, dtype):
    if cpu_kernels.kernel_library() is None:
        pytest.skip(cpu_kernels.unavailable_reason())
    monkeypatch.setattr(bench_sparse_mlp, "CONFIGS", TINY)
    monkeypatch.setattr(bench_sparse_mlp, "KEEPS", (0.5, 0.25))
    result = bench_sparse_mlp.run(quick=True, threads=1, dtype=dtype, log=lambda *_: None)
    info = result["configs"]["tiny"]
    assert info["dtype"] == dtype and info["mlp_bytes"] == 3 * 64 * 192 * getattr(torch, dtype).itemsize
    # Against torch in the weights' dtype: the kernels sum in float32, torch rounds its products.
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    assert info["gathered_vs_masked_max_abs_error"] < tolerance
    assert info["kernel_dense_vs_torch_max_abs_error"] < tolerance
    assert info["predicted_layer_vs_its_steps_max_abs_error"] < 1e-5  # the same kernels, two ways
    targets = {(row["keep"], row["measure"]) for row in result["rows"] if "target" in row}
    assert {keep for keep, _ in targets} == {0.5, 0.25} and len(targets) == 4
    measures = {row["measure"] for row in result["rows"]}
    assert "gathered MLP standalone, every neuron in order" in measures
    scattered = [row for row in result["rows"] if row["measure"] == "gathered MLP standalone, no predictor"]
    assert {row["keep"] for row in scattered} == {0.5, 0.25}
    assert all("of the in-order gather's rate" in row["note"] for row in scattered)
    assert any("no C kernel" in m or "torch path" in m for m in measures) == (dtype == "float32")

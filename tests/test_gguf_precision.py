"""The embedded GGUF written again at F16 and BF16 (gguf_precision.py, the converter's --gguf-out):
the same metadata, the same tensors, each weight matrix the source's de-quantized values rounded
to the new type, 1-D tensors kept in F32; bad input is a named error."""

import os

import numpy as np
import pytest

from conftest import run_python
from dejavu_common.helpers import embedded_gguf
from dejavu_llama.gguf_precision import GGUFPrecisionError, write_gguf

gguf = pytest.importorskip("gguf")

# relative rounding of the type (half an ulp), with room for values near the subnormal range
ROUNDING = {"f16": 2.0**-11, "bf16": 2.0**-8}


@pytest.fixture(scope="module")
def source():
    folder, name = embedded_gguf()
    return os.path.join(folder, name)


@pytest.mark.parametrize("gguf_type", ["f16", "bf16"])
def test_the_weights_are_the_sources_rounded_to_the_type(source, gguf_type, tmp_path):
    out = write_gguf(source, str(tmp_path / f"model.{gguf_type}.gguf"), gguf_type, progress=False)
    assert os.listdir(tmp_path) == [os.path.basename(out)]  # no temporary file left
    original, written = gguf.GGUFReader(source), gguf.GGUFReader(out)
    for name, field in original.fields.items():
        if not name.startswith("GGUF.") and name != "general.file_type":
            assert written.fields[name].contents() == field.contents(), name
    assert written.fields["general.file_type"].contents() == {"f16": 1, "bf16": 32}[gguf_type]
    assert [t.name for t in written.tensors] == [t.name for t in original.tensors]
    matrices = 0
    for before, after in zip(original.tensors, written.tensors):
        a = gguf.dequantize(before.data, before.tensor_type)
        b = gguf.dequantize(after.data, after.tensor_type)
        assert a.shape == b.shape, before.name
        if a.ndim == 1:
            assert after.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(a, b), before.name
            continue
        matrices += 1
        assert after.tensor_type.name == gguf_type.upper(), before.name
        assert np.all(np.abs(a - b) <= ROUNDING[gguf_type] * np.abs(a) + 1e-7), before.name
    assert matrices == 30 * 7 + 1  # every layer's seven matrices and the tied embedding


def test_bad_input_is_a_named_error(tmp_path):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model")
    with pytest.raises(GGUFPrecisionError, match="notes.gguf"):
        write_gguf(str(not_gguf), str(tmp_path / "out.gguf"), "f16", progress=False)
    with pytest.raises(GGUFPrecisionError, match="missing.gguf"):
        write_gguf(str(tmp_path / "missing.gguf"), str(tmp_path / "out.gguf"), "f16", progress=False)
    with pytest.raises(GGUFPrecisionError, match="q8"):
        write_gguf(str(not_gguf), str(tmp_path / "out.gguf"), "q8", progress=False)
    assert not (tmp_path / "out.gguf").exists()
    folder, _ = embedded_gguf()
    result = run_python(["convert_llama_checkpoint.py", "--model-name", folder, "--save-path", str(tmp_path / "x"),
                         "--gguf-out", str(tmp_path / "out.gguf")])
    assert result.returncode == 2 and "--gguf-file" in result.stderr

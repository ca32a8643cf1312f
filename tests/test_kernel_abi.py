"""The C kernels' ABI as cpu_kernels.py reads it from decode_kernels.c's ABI block: the ctypes
structs have the C layout's sizes, every exported function has its signature, and a block not
in the form the parser reads is an error naming the line."""

import ctypes
import re
import shutil
import subprocess

import pytest

from dejavu_llama.modules import cpu_kernels
from dejavu_llama.modules.cpu_kernels import AbiError, parse_abi


@pytest.fixture(scope="module")
def lib(kernel_lib):
    return kernel_lib


def test_the_structs_other_modules_build_are_the_parsed_ones():
    assert cpu_kernels.LlamaLayer is cpu_kernels.ABI.structs["llama_layer"]
    assert [name for name, _ in cpu_kernels.MlpWeights._fields_] == [
        "A", "B", "a_bias", "b_bias", "T", "bias", "lda", "ldb", "ldt", "rows", "d", "weights"]
    assert dict(cpu_kernels.LayerStep._fields_)["scale"] is ctypes.c_float
    assert dict(cpu_kernels.MlpStep._fields_)["mlp"] is ctypes.POINTER(cpu_kernels.MlpWeights)
    assert [cpu_kernels.MLP_NONE, cpu_kernels.MLP_DENSE, cpu_kernels.MLP_PREDICTED, cpu_kernels.MLP_TEAL,
            cpu_kernels.MLP_CATS] == list(range(5))
    assert cpu_kernels.MAX_THREADS == 256


@pytest.mark.parametrize("name", sorted(cpu_kernels.ABI.structs))
def test_every_struct_has_the_c_size(lib, name):
    assert lib.dejavu_struct_size(name.encode()) == ctypes.sizeof(cpu_kernels.ABI.structs[name])


def test_every_function_has_its_signature(lib):
    assert lib.dejavu_struct_size(b"no_such_struct") == 0
    for name, (restype, argtypes) in cpu_kernels.ABI.functions.items():
        function = getattr(lib, name)
        assert function.argtypes == argtypes and function.restype is restype, name
    assert cpu_kernels.ABI.functions["dejavu_get_threads"] == (ctypes.c_int, [])


def test_every_exported_function_is_declared(lib):
    """The library exports no function the ABI block leaves out (one Python would call untyped)."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm to list the library's symbols")
    listing = subprocess.run([nm, "-D", "--defined-only", lib._name], capture_output=True, text=True, check=True)
    exported = {line.split()[-1] for line in listing.stdout.splitlines() if line.split()[-2:-1] == ["T"]}
    assert exported == set(cpu_kernels.ABI.functions)


def test_a_layer_call_with_a_kind_the_family_lacks_is_refused(lib):
    """OPT runs its dense MLP only; an unknown kind is refused before anything is read."""
    layer, step = cpu_kernels.OptLayer(), cpu_kernels.LayerStep()
    for kind in (cpu_kernels.MLP_NONE, cpu_kernels.MLP_PREDICTED, cpu_kernels.MLP_TEAL, cpu_kernels.MLP_CATS):
        assert lib.dejavu_opt_layer(layer, cpu_kernels.MlpStep(kind=kind), step) != 0
    assert lib.dejavu_llama_layer(cpu_kernels.LlamaLayer(), cpu_kernels.MlpStep(kind=99), step) != 0
    # a sparse kind missing its weights
    assert lib.dejavu_llama_layer(cpu_kernels.LlamaLayer(), cpu_kernels.MlpStep(kind=cpu_kernels.MLP_CATS), step) != 0


BLOCK = """/* ABI BEGIN */
#define LIMIT 4
typedef enum {{ KIND_A, KIND_B }} kind;
typedef struct {{
  const float* data;  /* a comment */
  int64_t n;
  kind which;
}} thing;
{extra}
int use(const thing* t, float f, int64_t* out);
/* ABI END */
"""


def test_a_regular_block_parses():
    abi = parse_abi(BLOCK.format(extra=""))
    assert abi.constants == {"LIMIT": 4, "KIND_A": 0, "KIND_B": 1}
    thing = abi.structs["thing"]
    assert thing.__name__ == "Thing"
    assert thing._fields_ == [("data", ctypes.c_void_p), ("n", ctypes.c_int64), ("which", ctypes.c_int)]
    assert abi.functions["use"] == (ctypes.c_int, [ctypes.POINTER(thing), ctypes.c_float, ctypes.c_void_p])


@pytest.mark.parametrize("extra, message", [
    ("typedef struct {\n  const float *a, *b;\n} two;", "line 10: struct two: cannot read the field"),
    ("typedef struct {\n  float a; float b;\n} two;", "line 10: struct two: cannot read the field"),
    ("typedef struct {\n  double a;\n} wide;", "line 10: unknown type 'double'"),
    ("int f(unknown_t* p);", "line 9: unknown type 'unknown_t*'"),
    ("int f(const float*);", "line 9: f: cannot read the parameter"),
    ("static int g(void) { return 0; }", "line 9: cannot read 'static int g(void) { return 0; }'"),
    ("typedef enum { X = 3 } valued;", "line 9: enum valued: cannot read the member"),
    ("typedef struct {\n  int64_t n;\n\n  double x;\n} wide;", "line 12: unknown type 'double'"),
    ("int use(void);", "line 10: use is declared twice"),  # at the second declaration
])
def test_a_malformed_declaration_is_an_error_naming_its_line(extra, message):
    with pytest.raises(AbiError, match=re.escape(message)):
        parse_abi(BLOCK.format(extra=extra), origin="kernels.c")


def test_a_source_without_one_block_is_an_error():
    with pytest.raises(AbiError, match="ABI BEGIN"):
        parse_abi("int f(void);")
    with pytest.raises(AbiError, match="unclosed"):
        parse_abi("/* ABI BEGIN */\nint f(void); /* open\n/* ABI END")

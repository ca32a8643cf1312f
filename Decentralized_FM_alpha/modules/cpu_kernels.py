"""The C kernels of CPU decoding (decode_kernels.c beside this file), loaded through ctypes.

They run one token at batch 1 in float32 on the CPU: one-row Linear products, the
gathered (sparse) MLP, DejaVu's predicted MLP in one call, and a whole Llama or OPT decoder
layer in one call (dejavu_llama_layer, dejavu_opt_layer: the weights, an mlp_step saying which
MLP runs after the attention, dense or Llama's sparse ones, and a layer_step of the token's
input, output, cache and position). The C source's ABI block declares every struct and
exported function once: parse_abi reads it into the ctypes structs below (LlamaLayer, MlpStep,
...) and the functions' signatures, from the source alone (no compiler needed). Their products split
their rows over a pool of threads inside the library: set_num_threads(n) (default: torch's
thread count when the library is loaded); the results are the same for any thread count.
The source is compiled once with the system C compiler (about 1 s) into a per-machine cache
($DEJAVU_KERNEL_CACHE, default $TMPDIR/dejavu_kernels_<uid>); where there is no compiler the
callers fall back to torch ops, which give the same numbers. DEJAVU_CPU_KERNELS=0 (or
ENABLED = False at run time) turns the kernels off.
"""

import ctypes
import hashlib
import logging
import operator
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections import namedtuple

logger = logging.getLogger(__name__)

SOURCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_kernels.c")
ENABLED = True  # configure(enabled=False): torch ops everywhere
_state = {"lib": None, "tried": False, "error": None, "threads": None,  # threads: set before the load
          "cache_folder": None, "compiler": None}


def configure(enabled=True, cache_folder=None, compiler=None):
    """The process's kernel settings (a command's edge sets them from DEJAVU_CPU_KERNELS,
    DEJAVU_KERNEL_CACHE and CC: decode/environment.py): whether the kernels run, where the
    compiled library is kept (default: $TMPDIR/dejavu_kernels_<uid>) and which compiler builds it
    (default: gcc, else cc). The folder and compiler apply to a library not loaded yet."""
    global ENABLED
    ENABLED = bool(enabled)
    _state["cache_folder"], _state["compiler"] = cache_folder, compiler


# ---- the ABI, read from decode_kernels.c's block between ABI BEGIN and ABI END ----------------------------
class AbiError(ValueError):
    """The C source's ABI block is not in the form parse_abi reads."""


class _Unreadable(Exception):
    """What a reader of one declaration found wrong, and where in the block (parse_abi names the line)."""

    def __init__(self, message, position):
        super().__init__(message)
        self.position = position


# structs {C name: ctypes Structure}, enums {C name: [member names]}, functions {name: (restype, argtypes)},
# constants {name: int} (the #defines and the enums' members)
Abi = namedtuple("Abi", "structs enums functions constants")

_SCALARS = {"float": ctypes.c_float, "int": ctypes.c_int, "int64_t": ctypes.c_int64}
_POINTEES = ("float", "int64_t", "uint8_t", "void")  # pointers to these travel as addresses (c_void_p)
_NAME = r"[A-Za-z_]\w*"
_DECLARATION = re.compile(rf"(?:const\s+)?({_NAME})\s*(\*?)\s*({_NAME})")
_DEFINE = re.compile(rf"#define[ \t]+({_NAME})[ \t]+(\d+)[ \t]*$", re.M)
_ENUM = re.compile(rf"typedef\s+enum\s*\{{([^}}]*)\}}\s*({_NAME})\s*;")
_STRUCT = re.compile(rf"typedef\s+struct\s*\{{([^}}]*)\}}\s*({_NAME})\s*;")
_PROTOTYPE = re.compile(rf"(?:const\s+)?({_NAME})\s+({_NAME})\s*\(([^)]*)\)\s*;")


def _class_name(c_name):
    return "".join(part.capitalize() for part in c_name.split("_"))


def parse_abi(source, origin="decode_kernels.c"):
    """The Abi of a C source's block from the comment holding `ABI BEGIN` to the one holding `ABI END`:
    #defines of integers, enums, structs (one field per line) and function prototypes, in the
    types _ctype names. AbiError, naming the line, for anything else."""
    lines = source.split("\n")
    begin = [i for i, line in enumerate(lines) if "ABI BEGIN" in line]
    end = [i for i, line in enumerate(lines) if "ABI END" in line]
    if len(begin) != 1 or len(end) != 1 or end[0] <= begin[0]:
        raise AbiError(f"{origin}: expected one block from a line with ABI BEGIN to a line with ABI END")
    # Comments become spaces (their newlines kept), so a statement's offset still gives its line.
    block = "\n".join(lines[begin[0]:end[0] + 1])
    block = re.sub(r"/\*.*?\*/|//[^\n]*", lambda comment: re.sub(r"[^\n]", " ", comment.group()), block, flags=re.S)
    if "/*" in block:
        raise AbiError(f"{origin}: an unclosed comment in the ABI block")

    def line(position):
        return begin[0] + 1 + block.count("\n", 0, position)

    abi = Abi({}, {}, {}, {})
    position = 0
    while True:
        while position < len(block) and block[position].isspace():
            position += 1
        if position == len(block):
            return abi
        for pattern, read in ((_DEFINE, _read_define), (_ENUM, _read_enum), (_STRUCT, _read_struct),
                              (_PROTOTYPE, _read_prototype)):
            match = pattern.match(block, position)
            if match:
                try:
                    read(match, abi)
                except _Unreadable as problem:
                    raise AbiError(f"{origin} line {line(problem.position)}: {problem}") from None
                position = match.end()
                break
        else:
            text = block[position:].split("\n", 1)[0].strip()
            raise AbiError(f"{origin} line {line(position)}: cannot read {text!r}: expected a #define of an integer, "
                           "a typedef of an enum or struct, or a function prototype")


def _declare(table, name, value, position):
    if name in table:
        raise _Unreadable(f"{name} is declared twice", position)
    table[name] = value


def _read_define(match, abi):
    _declare(abi.constants, match.group(1), int(match.group(2)), match.start())


def _read_enum(match, abi):
    names = [name.strip() for name in match.group(1).split(",")]
    for value, name in enumerate(names):
        if not re.fullmatch(_NAME, name):
            raise _Unreadable(f"enum {match.group(2)}: cannot read the member {name!r}: expected plain names, no "
                              "values", match.start())
        _declare(abi.constants, name, value, match.start())
    _declare(abi.enums, match.group(2), names, match.start())


def _read_struct(match, abi):
    c_name, fields, position = match.group(2), [], match.start(1)
    for text in match.group(1).split("\n"):
        line, position = text.strip(), position + len(text) + 1
        if not line:
            continue
        field = _DECLARATION.fullmatch(line[:-1].strip()) if line.endswith(";") else None
        if field is None:
            raise _Unreadable(f"struct {c_name}: cannot read the field {line!r}: expected one `[const] type name;` "
                              "or `[const] type* name;` a line", position - len(text) - 1)
        fields.append((field.group(3), _ctype(field.group(1), field.group(2), abi, position - len(text) - 1)))
    _declare(abi.structs, c_name, type(_class_name(c_name), (ctypes.Structure,), {
        "_fields_": fields, "__doc__": f"decode_kernels.c's {c_name}", "__module__": __name__}), match.start())


def _read_prototype(match, abi):
    restype, name, text = match.groups()
    parameters = [] if text.strip() == "void" else [part.strip() for part in text.split(",")]
    argtypes = []
    for parameter in parameters:
        found = _DECLARATION.fullmatch(parameter)
        if found is None:
            raise _Unreadable(f"{name}: cannot read the parameter {parameter!r}: expected `[const] type [*]name`",
                              match.start())
        argtypes.append(_ctype(found.group(1), found.group(2), abi, match.start()))
    _declare(abi.functions, name, (_ctype(restype, "", abi, match.start()), argtypes), match.start())


def _ctype(base, pointer, abi, position):
    """The ctypes type of C's `base` (a pointer where `pointer` is '*'): the scalars, the structs and
    enums declared before it, pointers to them, addresses (float*, int64_t*, uint8_t*, void*) and char*."""
    if pointer:
        if base in abi.structs:
            return ctypes.POINTER(abi.structs[base])
        if base == "char":
            return ctypes.c_char_p
        if base in _POINTEES:
            return ctypes.c_void_p
    elif base in _SCALARS:
        return _SCALARS[base]
    elif base in abi.enums:
        return ctypes.c_int  # C stores an enum of small values as an int
    raise _Unreadable(f"unknown type {base + pointer!r}", position)


def _read_source():
    with open(SOURCE_PATH) as f:
        return f.read()


ABI = parse_abi(_read_source())
MAX_THREADS = ABI.constants["MAX_THREADS"]
# The structs other modules build (views of weights, a step's arguments), and the MLP kinds of mlp_step.
LlamaLayer, OptLayer, MlpWeights, PredictorWeights, TealWeights, LayerStep, MlpStep = (ABI.structs[name] for name in (
    "llama_layer", "opt_layer", "mlp_weights", "predictor_weights", "teal_weights", "layer_step", "mlp_step"))
MLP_NONE, MLP_DENSE, MLP_PREDICTED, MLP_TEAL, MLP_CATS = (ABI.constants[name] for name in (
    "MLP_NONE", "MLP_DENSE", "MLP_PREDICTED", "MLP_TEAL", "MLP_CATS"))
# weight_type of the weight matrices' element type, by torch dtype name
WEIGHT_TYPES = {"float32": ABI.constants["WEIGHTS_F32"], "bfloat16": ABI.constants["WEIGHTS_BF16"],
                "float16": ABI.constants["WEIGHTS_F16"]}


def weight_type(dtype):
    """The kernels' weight_type of a torch dtype, or None where they cannot read it."""
    return WEIGHT_TYPES.get(str(dtype).rsplit(".", 1)[-1])


def struct_pointer(reference):
    """A ctypes pointer to the struct that `reference` (a ctypes.byref of it, or the struct) names,
    for a pointer field of another struct (fields take pointers, not byref references)."""
    return ctypes.pointer(getattr(reference, "_obj", reference))


def _cpu_fingerprint():
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


# The flags tried in turn: the first that builds and loads is used. The last builds anywhere
# (no AVX-512 or F16C: the scalar fallbacks in decode_kernels.c, tested against the first).
FLAG_SETS = (("-O3", "-march=native"), ("-O3",))


def compile_library(flag_sets=FLAG_SETS):
    """The kernels built with the first of flag_sets that builds and loads (a ctypes library, its
    signatures set; cached per source, compiler, flags and CPU). RuntimeError where none does."""
    compiler = _state["compiler"] or shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        raise RuntimeError("no C compiler (gcc/cc) found")
    with open(SOURCE_PATH) as f:
        source = f.read()
    folder = _state["cache_folder"] or os.path.join(
        tempfile.gettempdir(), f"dejavu_kernels_{os.getuid() if hasattr(os, 'getuid') else 'user'}")
    os.makedirs(folder, exist_ok=True)
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256("\0".join([source, compiler, *flags, platform.machine(),
                                        _cpu_fingerprint()]).encode()).hexdigest()[:16]
        target = os.path.join(folder, f"decode_{key}.so")
        if not os.path.isfile(target):
            # Unique temporary names, then an atomic rename: concurrent processes (pipeline
            # ranks) may compile at once and none sees a half-written library.
            stem = os.path.join(folder, f".decode_{key}_{os.getpid()}")
            with open(stem + ".c", "w") as f:
                f.write(source)
            try:
                result = subprocess.run([compiler, *flags, "-fPIC", "-shared", "-pthread", "-o", stem + ".so", stem + ".c",
                                         "-lm"],
                                        capture_output=True, text=True, timeout=120)
                if result.returncode != 0:
                    errors.append(f"{' '.join(flags)}: {result.stderr.strip()[-500:]}")
                    continue
                os.replace(stem + ".so", target)
            finally:
                for leftover in (stem + ".c", stem + ".so"):
                    if os.path.exists(leftover):
                        os.remove(leftover)
        try:
            lib = ctypes.CDLL(target)
        except OSError as error:
            errors.append(f"{target}: {error}")
            continue
        for name, (restype, argtypes) in ABI.functions.items():
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
        return lib
    raise RuntimeError("; ".join(errors))


def kernel_library():
    """The compiled kernels (a ctypes library), or None where they are off or cannot be built."""
    if not ENABLED:
        return None
    if not _state["tried"]:
        _state["tried"] = True
        try:
            lib = compile_library()
            threads = _state["threads"]
            if threads is None:
                import torch

                threads = min(torch.get_num_threads(), MAX_THREADS)
            lib.dejavu_set_threads(threads)
            _state["lib"] = lib
        except Exception as error:  # no compiler, sandbox, ...: torch ops give the same numbers
            _state["error"] = str(error)
            logger.warning("CPU decode kernels unavailable (%s); using torch ops (same numbers, slower)", error)
    return _state["lib"]


def set_num_threads(n):
    """Run the kernels on n threads (the calling thread and n - 1 workers of the library's pool),
    like torch.set_num_threads for torch's ops. Before the library is loaded, it applies once it is."""
    try:
        count = None if isinstance(n, bool) else operator.index(n)
    except TypeError:
        count = None
    if count is None or not 1 <= count <= MAX_THREADS:
        raise ValueError(f"CPU kernel threads must be an integer from 1 to {MAX_THREADS}, not {n!r}")
    n = count
    _state["threads"] = n
    if _state["lib"] is not None and _state["lib"].dejavu_set_threads(n):
        raise ValueError(f"the CPU kernels refused {n} threads")


def num_threads():
    """The threads the kernels run on (what set_num_threads set, else torch's count when loaded)."""
    if _state["lib"] is not None:
        return _state["lib"].dejavu_get_threads()
    if _state["threads"] is not None:
        return _state["threads"]
    import torch

    return torch.get_num_threads()


def set_min_chunk(floats):
    """For tests: the least work (weight floats) the kernels give one thread (1: split even a tiny
    product over the threads). Returns the previous value; None where the kernels are unavailable."""
    lib = kernel_library()
    return None if lib is None else lib.dejavu_set_min_chunk(int(floats))


def unavailable_reason():
    """Why kernel_library() is None ('' when it is not)."""
    if not ENABLED:
        return "turned off (DEJAVU_CPU_KERNELS=0)"
    kernel_library()
    return _state["error"] or ""

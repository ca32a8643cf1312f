"""The C kernels of CPU decoding (decode_kernels.c beside this file), loaded through ctypes.

They run one token at batch 1 in float32 on the CPU: one-row Linear products, the
gathered (sparse) MLP, DejaVu's predicted MLP in one call, and a whole Llama or OPT decoder
layer (Llama's also with the predicted MLP in place of the dense one). Their products split
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
import shutil
import subprocess
import tempfile

logger = logging.getLogger(__name__)

SOURCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_kernels.c")
ENABLED = os.environ.get("DEJAVU_CPU_KERNELS", "1") != "0"  # settable at run time
MAX_THREADS = 256  # decode_kernels.c's MAX_THREADS
_state = {"lib": None, "tried": False, "error": None, "threads": None}  # threads: set before the load

_pointer, _size, _float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class LlamaLayer(ctypes.Structure):
    """Mirror of decode_kernels.c's llama_layer: one decoder layer's weights (NULL: no bias)."""

    _fields_ = [(name, _pointer) for name in (
        "attn_norm", "q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias",
        "mlp_norm", "gate", "up", "down", "gate_bias", "up_bias", "down_bias")] + [
        (name, _size) for name in ("hidden", "heads", "kv_heads", "head_dim", "inner")] + [
        ("attn_eps", _float), ("mlp_eps", _float)]


_P, _N = _pointer, _size
class OptLayer(ctypes.Structure):
    """Mirror of decode_kernels.c's opt_layer: one OPT decoder layer's weights (NULL: no bias or affine)."""

    _fields_ = [(name, _pointer) for name in (
        "attn_norm", "attn_norm_bias", "q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias",
        "mlp_norm", "mlp_norm_bias", "fc1", "fc2", "fc1_bias", "fc2_bias")] + [
        (name, _size) for name in ("hidden", "heads", "head_dim", "inner", "norm_first")] + [
        ("attn_eps", _float), ("mlp_eps", _float)]


class MlpWeights(ctypes.Structure):
    """Mirror of decode_kernels.c's mlp_weights: a sparse MLP's rows as the gathered kernels read them."""

    _fields_ = [(name, _pointer) for name in ("A", "B", "a_bias", "b_bias", "T", "bias")] + [
        (name, _size) for name in ("lda", "ldb", "ldt", "rows", "d")]


class PredictorWeights(ctypes.Structure):
    """Mirror of decode_kernels.c's predictor_weights: P1 [rank, d] and P2 [rows, rank], tiled
    (eight rows at a time, column by column), float32, or float16 where `half` is 1."""

    _fields_ = [("p1", _pointer), ("p2", _pointer)] + [(name, _size) for name in ("rank", "d", "rows", "half")]


class TealWeights(ctypes.Structure):
    """Mirror of decode_kernels.c's teal_weights: TEAL's MLP with gate and up (fc1) read by input
    column (rows of in_t, up's at + up_offset; 0: none) and down (fc2) by neuron (rows of down_t)."""

    _fields_ = [(name, _pointer) for name in ("in_t", "gate_bias", "up_bias", "down_t", "down_bias")] + [
        (name, _size) for name in ("ld_in", "up_offset", "ld_down", "d", "inner")]


_SIGNATURES = {
    # A, lda, B, ldb, bias_a, bias_b, idx, K, rows, d, h, out_a, act
    "dejavu_gathered_dots": [_P, _N, _P, _N, _P, _P, _P, _N, _N, _N, _P, _P, _N],
    # weights, idx, K, h, out
    "dejavu_gathered_mlp": [ctypes.POINTER(MlpWeights), _P, _N, _P, _P],
    # A, lda, B, ldb, a_bias, b_bias, W, ldw, bias, inner, d, h, out, scratch
    "dejavu_dense_mlp": [_P, _N, _P, _N, _P, _P, _P, _N, _P, _N, _N, _P, _P, _P],
    # weights, predictor, xp, K, h, residual, out, neurons
    "dejavu_predicted_mlp": [ctypes.POINTER(MlpWeights), ctypes.POINTER(PredictorWeights), _P, _N, _P, _P, _P, _P],
    # layer, x, x_out, k_cache, v_cache, head_stride, t, cos, signed_sin, key_valid, scale, with_mlp, mlp_input
    "dejavu_llama_decode_layer": [ctypes.POINTER(LlamaLayer), _P, _P, _P, _P, _N, _N, _P, _P, _P, _float, _N, _P],
    # layer, mlp, predictor, K, predict_from_input, x, x_out, k_cache, v_cache, head_stride, t, cos, signed_sin,
    # key_valid, scale
    "dejavu_llama_predicted_decode_layer": [ctypes.POINTER(LlamaLayer), ctypes.POINTER(MlpWeights),
                                            ctypes.POINTER(PredictorWeights), _N, _N, _P, _P, _P, _P, _N, _N, _P,
                                            _P, _P, _float],
    # layer, TEAL's weights, t_in, t_down, kept [2], x, x_out, k_cache, v_cache, head_stride, t, cos, signed_sin,
    # key_valid, scale
    "dejavu_llama_teal_decode_layer": [ctypes.POINTER(LlamaLayer), ctypes.POINTER(TealWeights), _float, _float, _P,
                                       _P, _P, _P, _P, _N, _N, _P, _P, _P, _float],
    # layer, mlp, t_gate, kept [1], x, x_out, k_cache, v_cache, head_stride, t, cos, signed_sin, key_valid, scale
    "dejavu_llama_cats_decode_layer": [ctypes.POINTER(LlamaLayer), ctypes.POINTER(MlpWeights), _float, _P, _P, _P,
                                       _P, _P, _N, _N, _P, _P, _P, _float],
    # layer, x, x_out, k_cache, v_cache, head_stride, t, key_valid, scale
    "dejavu_opt_decode_layer": [ctypes.POINTER(OptLayer), _P, _P, _P, _P, _N, _N, _P, _float],
    # weights, threshold, h, out, kept [1]
    "dejavu_cats_mlp": [ctypes.POINTER(MlpWeights), _float, _P, _P, _P],
    # weights, t_in, t_down, h, out, kept [2]
    "dejavu_teal_mlp": [ctypes.POINTER(TealWeights), _float, _float, _P, _P, _P],
    # threads (the caller included)
    "dejavu_set_threads": [_N],
    "dejavu_get_threads": [],
}


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
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        raise RuntimeError("no C compiler (gcc/cc) found")
    with open(SOURCE_PATH) as f:
        source = f.read()
    folder = os.environ.get("DEJAVU_KERNEL_CACHE") or os.path.join(
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
        for name, argtypes in _SIGNATURES.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
        lib.dejavu_set_min_chunk.argtypes, lib.dejavu_set_min_chunk.restype = [_N], _N
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

"""Single-row products for decoding: gathered (sparse) MLP pieces that read only the kept
neurons' weight rows, and DecodeLinear, the dense Linear whose one-row products stream the
whole weight through the same kernel."""

import logging
import os

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------
# Gathered (sparse) MLP for decoding: only the kept neurons' weights are read.
#
# gathered_glu(h, neurons, gate, up, act_fn)    act_fn(gate(h)) * up(h) on the kept neurons (Llama)
# gathered_activation(h, neurons, fc1, act_fn)  act_fn(fc1(h)) on the kept neurons (OPT)
# gathered_dots(h, neurons, *linears)           the rows `neurons` of Linear(d, I)s applied to h
# gathered_output(linear, act, neurons)         a Linear(I, d) restricted to the input columns `neurons`
# DecodeLinear / linear_forward(linear, x)      a dense Linear; one input row goes through the kernel
#
# On CPU in float32 (no autograd) these run a small C kernel (compiled once with the system C
# compiler into a per-machine cache, called through ctypes; single-threaded) that reads the
# kept rows in place: nothing is materialised, several rows stream at once, gate and up are
# read in one pass and SiLU-gating / ReLU and biases are applied on the fly. Column gathers
# of down/fc2 read a contiguous transposed copy of its weight, made once per weight version
# and kept on the Linear (a plain attribute, not in the state dict: +1/3 of the MLP weights
# in memory). Anywhere else (no compiler, other dtypes or devices, autograd) torch ops give
# the same results. DEJAVU_GATHER_KERNEL=0 (or GATHER_KERNEL_ENABLED = False) turns the
# kernel off; DEJAVU_KERNEL_CACHE sets its cache folder (default: $TMPDIR/dejavu_kernels_<uid>).
# ---------------------------------------------------------------------------------------------

import ctypes
import hashlib
import platform
import shutil
import subprocess
import tempfile

import torch.nn.functional as F

logger = logging.getLogger(__name__)

_GATHER_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
typedef float v8 __attribute__((vector_size(32)));
static inline v8 ld(const float* p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float* p, v8 v) { memcpy(p, &v, sizeof v); }
static inline float hsum(v8 v) { float s = 0.f; for (int i = 0; i < 8; i++) s += v[i]; return s; }
#define PREFETCH(p) __builtin_prefetch((p), 0, 0)

static int bad_index(const int64_t* idx, int64_t K, int64_t rows) {
  if (!idx) return K > rows;
  for (int64_t k = 0; k < K; k++) if (idx[k] < 0 || idx[k] >= rows) return 1;
  return 0;
}

static float dot(const float* w, const float* h, int64_t d) {
  v8 s = {0}; int64_t j = 0; float t = 0.f;
  for (; j + 8 <= d; j += 8) s += ld(w + j) * ld(h + j);
  for (; j < d; j++) t += w[j] * h[j];
  return hsum(s) + t;
}

/* act 0: out_a[k] = A[i].h + bias_a[i], out_b[k] = B[i].h + bias_b[i]   (i = idx[k])
   act 1: out_a[k] = silu(A[i].h + bias_a[i]) * (B[i].h + bias_b[i])
   act 2: out_a[k] = relu(A[i].h + bias_a[i])
   A, B: [rows, d] row-major; B, biases may be NULL; pf: neurons ahead to prefetch (0: none).
   idx NULL: every row in order (i = k), the dense product DecodeLinear uses for one input row. */
#define ROW(k) (idx ? idx[(k)] : (k))
static inline void finish(int act, float a, float b, float* out_a, float* out_b, int64_t k) {
  if (act == 1) out_a[k] = a / (1.f + expf(-a)) * b;
  else if (act == 2) out_a[k] = a > 0.f ? a : 0.f;
  else { out_a[k] = a; if (out_b) out_b[k] = b; }
}

int dejavu_gathered_dots(const float* A, const float* B, const float* bias_a, const float* bias_b,
                         const int64_t* idx, int64_t K, int64_t rows, int64_t d, const float* h,
                         float* out_a, float* out_b, int64_t act, int64_t pf) {
  if (bad_index(idx, K, rows)) return 1;
  int64_t k = 0, d8 = d - d % 8;
#define BA(i) (bias_a ? bias_a[i] : 0.f)
#define BB(i) (bias_b ? bias_b[i] : 0.f)
  if (B) {
    for (; k + 2 <= K; k += 2) {
      int64_t i0 = ROW(k), i1 = ROW(k + 1);
      const float *a0 = A + i0 * d, *b0 = B + i0 * d, *a1 = A + i1 * d, *b1 = B + i1 * d;
      int64_t n = (pf > 0 && k + pf + 1 < K) ? k + pf : -1;
      const float *pa0 = n < 0 ? a0 : A + ROW(n) * d, *pb0 = n < 0 ? b0 : B + ROW(n) * d;
      const float *pa1 = n < 0 ? a1 : A + ROW(n + 1) * d, *pb1 = n < 0 ? b1 : B + ROW(n + 1) * d;
      v8 sa0 = {0}, sb0 = {0}, sa1 = {0}, sb1 = {0};
      int64_t j = 0;
      for (; j < d8; j += 8) {
        if (n >= 0 && (j & 15) == 0) { PREFETCH(pa0 + j); PREFETCH(pb0 + j); PREFETCH(pa1 + j); PREFETCH(pb1 + j); }
        v8 x = ld(h + j);
        sa0 += ld(a0 + j) * x; sb0 += ld(b0 + j) * x; sa1 += ld(a1 + j) * x; sb1 += ld(b1 + j) * x;
      }
      float ta0 = 0.f, tb0 = 0.f, ta1 = 0.f, tb1 = 0.f;
      for (; j < d; j++) { ta0 += a0[j] * h[j]; tb0 += b0[j] * h[j]; ta1 += a1[j] * h[j]; tb1 += b1[j] * h[j]; }
      finish(act, hsum(sa0) + ta0 + BA(i0), hsum(sb0) + tb0 + BB(i0), out_a, out_b, k);
      finish(act, hsum(sa1) + ta1 + BA(i1), hsum(sb1) + tb1 + BB(i1), out_a, out_b, k + 1);
    }
    for (; k < K; k++) {
      int64_t i = ROW(k);
      finish(act, dot(A + i * d, h, d) + BA(i), dot(B + i * d, h, d) + BB(i), out_a, out_b, k);
    }
    return 0;
  }
  for (; k + 4 <= K; k += 4) {
    int64_t i0 = ROW(k), i1 = ROW(k + 1), i2 = ROW(k + 2), i3 = ROW(k + 3);
    const float *r0 = A + i0 * d, *r1 = A + i1 * d, *r2 = A + i2 * d, *r3 = A + i3 * d;
    int64_t n = (pf > 0 && k + 2 * pf + 3 < K) ? k + 2 * pf : -1;
    const float *p0 = n < 0 ? r0 : A + ROW(n) * d, *p1 = n < 0 ? r1 : A + ROW(n + 1) * d;
    const float *p2 = n < 0 ? r2 : A + ROW(n + 2) * d, *p3 = n < 0 ? r3 : A + ROW(n + 3) * d;
    v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t j = 0;
    for (; j < d8; j += 8) {
      if (n >= 0 && (j & 15) == 0) { PREFETCH(p0 + j); PREFETCH(p1 + j); PREFETCH(p2 + j); PREFETCH(p3 + j); }
      v8 x = ld(h + j);
      s0 += ld(r0 + j) * x; s1 += ld(r1 + j) * x; s2 += ld(r2 + j) * x; s3 += ld(r3 + j) * x;
    }
    float t0 = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f;
    for (; j < d; j++) { t0 += r0[j] * h[j]; t1 += r1[j] * h[j]; t2 += r2[j] * h[j]; t3 += r3[j] * h[j]; }
    finish(act, hsum(s0) + t0 + BA(i0), 0.f, out_a, 0, k);
    finish(act, hsum(s1) + t1 + BA(i1), 0.f, out_a, 0, k + 1);
    finish(act, hsum(s2) + t2 + BA(i2), 0.f, out_a, 0, k + 2);
    finish(act, hsum(s3) + t3 + BA(i3), 0.f, out_a, 0, k + 3);
  }
  for (; k < K; k++) finish(act, dot(A + ROW(k) * d, h, d) + BA(ROW(k)), 0.f, out_a, 0, k);
  return 0;
}

/* out[:d] = bias + sum_k a[k] * T[idx[k]]   (T: [rows, d] row-major, the transposed down/fc2;
   bias may be NULL). */
int dejavu_gathered_rows_sum(const float* T, const float* bias, const int64_t* idx, int64_t K, int64_t rows,
                             int64_t d, const float* a, float* out, int64_t pf) {
  if (bad_index(idx, K, rows)) return 1;
  memset(out, 0, (size_t)d * sizeof(float));
  int64_t k = 0, d8 = d - d % 8;
  for (; k + 4 <= K; k += 4) {
    const float *r0 = T + idx[k] * d, *r1 = T + idx[k + 1] * d, *r2 = T + idx[k + 2] * d, *r3 = T + idx[k + 3] * d;
    int64_t n = (pf > 0 && k + 2 * pf + 3 < K) ? k + 2 * pf : -1;
    const float *p0 = n < 0 ? r0 : T + idx[n] * d, *p1 = n < 0 ? r1 : T + idx[n + 1] * d;
    const float *p2 = n < 0 ? r2 : T + idx[n + 2] * d, *p3 = n < 0 ? r3 : T + idx[n + 3] * d;
    float c0 = a[k], c1 = a[k + 1], c2 = a[k + 2], c3 = a[k + 3];
    v8 w0 = {0}, w1 = {0}, w2 = {0}, w3 = {0};
    w0 += c0; w1 += c1; w2 += c2; w3 += c3;
    int64_t j = 0;
    for (; j < d8; j += 8) {
      if (n >= 0 && (j & 15) == 0) { PREFETCH(p0 + j); PREFETCH(p1 + j); PREFETCH(p2 + j); PREFETCH(p3 + j); }
      st(out + j, ld(out + j) + w0 * ld(r0 + j) + w1 * ld(r1 + j) + w2 * ld(r2 + j) + w3 * ld(r3 + j));
    }
    for (; j < d; j++) out[j] += c0 * r0[j] + c1 * r1[j] + c2 * r2[j] + c3 * r3[j];
  }
  for (; k < K; k++) {
    const float* r = T + idx[k] * d; float c = a[k]; v8 w = {0}; w += c;
    int64_t j = 0;
    for (; j < d8; j += 8) st(out + j, ld(out + j) + w * ld(r + j));
    for (; j < d; j++) out[j] += c * r[j];
  }
  if (bias) for (int64_t j = 0; j < d; j++) out[j] += bias[j];
  return 0;
}
"""

GATHER_PREFETCH = 0  # neurons ahead to software-prefetch (0: rely on the hardware prefetchers)
GATHER_KERNEL_ENABLED = os.environ.get("DEJAVU_GATHER_KERNEL", "1") != "0"  # settable at run time
_kernel_state = {"lib": None, "tried": False, "error": None}


def _cpu_fingerprint():
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compile_kernel():
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        raise RuntimeError("no C compiler (gcc/cc) found")
    folder = os.environ.get("DEJAVU_KERNEL_CACHE") or os.path.join(
        tempfile.gettempdir(), f"dejavu_kernels_{os.getuid() if hasattr(os, 'getuid') else 'user'}")
    os.makedirs(folder, exist_ok=True)
    errors = []
    for flags in (["-O3", "-march=native"], ["-O3"]):
        key = hashlib.sha256("\0".join([_GATHER_SOURCE, compiler, *flags, platform.machine(),
                                        _cpu_fingerprint()]).encode()).hexdigest()[:16]
        target = os.path.join(folder, f"gather_{key}.so")
        if not os.path.isfile(target):
            # Unique temporary names, then an atomic rename: concurrent processes (pipeline
            # ranks) may compile at once and none sees a half-written library.
            stem = os.path.join(folder, f".gather_{key}_{os.getpid()}")
            with open(stem + ".c", "w") as f:
                f.write(_GATHER_SOURCE)
            try:
                result = subprocess.run([compiler, *flags, "-fPIC", "-shared", "-o", stem + ".so", stem + ".c", "-lm"],
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
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        lib.dejavu_gathered_dots.argtypes = [pointer, pointer, pointer, pointer, pointer, size, size, size,
                                             pointer, pointer, pointer, size, size]
        lib.dejavu_gathered_dots.restype = ctypes.c_int
        lib.dejavu_gathered_rows_sum.argtypes = [pointer, pointer, pointer, size, size, size, pointer, pointer,
                                                 size]
        lib.dejavu_gathered_rows_sum.restype = ctypes.c_int
        return lib
    raise RuntimeError("; ".join(errors))


def gather_kernel():
    """The compiled gather kernel (ctypes library), or None where it is off or cannot be built."""
    if not GATHER_KERNEL_ENABLED:
        return None
    if not _kernel_state["tried"]:
        _kernel_state["tried"] = True
        try:
            _kernel_state["lib"] = _compile_kernel()
        except Exception as error:  # no compiler, sandbox, ...: torch ops give the same numbers
            _kernel_state["error"] = str(error)
            logger.warning("CPU decode kernel unavailable (%s); using torch ops (same numbers, slower)", error)
    return _kernel_state["lib"]


def _kernel_plan(linear, transposed):
    """(table, pointer, rows, width, bias pointer) for the kernel -- the weight itself ([out, in])
    or, when `transposed`, a contiguous copy of its transpose ([in, out]) -- or None where the
    kernel does not apply (not float32 on CPU). Cached on the Linear per weight and bias (object,
    version, address), so an updated or replaced weight is picked up."""
    weight, bias = linear.weight, linear.bias
    # ids are safe in the key: the cache entry holds the objects, so their ids cannot be reused
    key = (id(weight), weight._version, weight.data_ptr(),
           id(bias), None if bias is None else bias._version, None if bias is None else bias.data_ptr())
    slot = "_gather_plan_t" if transposed else "_gather_plan"
    cached = linear.__dict__.get(slot)
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = None
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and (
            bias is None or (bias.device.type == "cpu" and bias.dtype == torch.float32)):
        with torch.no_grad():
            table = weight.detach().t().contiguous() if transposed else weight.detach().contiguous()
            bias_table = None if bias is None else bias.detach().contiguous()
        plan = (table, table.data_ptr(), table.shape[0], table.shape[1],
                None if bias_table is None else bias_table.data_ptr(), bias_table)
    linear.__dict__[slot] = (key, plan, weight, bias)
    return plan


def transposed_weight(linear):
    """A contiguous copy of `linear.weight.t()` ([in, out]), made once per weight version."""
    plan = _kernel_plan(linear, True)
    if plan is not None:
        return plan[0]
    weight = linear.weight
    key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, weight.device)
    cached = linear.__dict__.get("_gather_weight_t")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, weight.detach().t().contiguous())
        linear.__dict__["_gather_weight_t"] = cached
    return cached[1]


def _autograd(x, *linears):
    return torch.is_grad_enabled() and (x.requires_grad or any(
        p is not None and p.requires_grad for linear in linears for p in (linear.weight, linear.bias)))


def _kernel_input(x):
    """x as a contiguous float32 CPU tensor for the kernel, or None."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    return x if x.is_contiguous() else x.contiguous()


def _kernel_index(neurons):
    return neurons if neurons.dtype == torch.int64 and neurons.is_contiguous() \
        else neurons.to(torch.int64).contiguous()


_ACT_NONE, _ACT_SILU_GLU, _ACT_RELU = 0, 1, 2


def _is_silu(act_fn):
    return act_fn is F.silu or isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"


def _is_relu(act_fn):
    return act_fn is F.relu or act_fn is torch.relu or isinstance(act_fn, nn.ReLU)


def _kernel_dots(h, neurons, linears, act):
    """The kernel's gathered dot products (see dejavu_gathered_dots), or None where it does not apply:
    [count, B, 1, K] with count = 1 when `act` is fused, else len(linears)."""
    lib = gather_kernel()
    if lib is None or _autograd(h, *linears):
        return None
    plans = [_kernel_plan(linear, False) for linear in linears]
    hs = _kernel_input(h) if None not in plans else None
    if hs is None:
        return None
    batch, k = neurons.shape
    index = _kernel_index(neurons)
    count = 1 if act != _ACT_NONE else len(linears)
    out = torch.empty(count, batch, 1, k)
    (_, a, rows, d, bias_a, _), second = plans[0], plans[1] if len(plans) == 2 else None
    b, bias_b = (second[1], second[4]) if second is not None else (None, None)
    idx_ptr, h_ptr, out_ptr = index.data_ptr(), hs.data_ptr(), out.data_ptr()
    out_b = batch * k * 4 if count == 2 else None
    for row in range(batch):
        status = lib.dejavu_gathered_dots(a, b, bias_a, bias_b, idx_ptr + row * k * 8, k, rows, d, h_ptr + row * d * 4,
                                          out_ptr + row * k * 4, None if out_b is None else out_ptr + out_b + row * k * 4,
                                          act, GATHER_PREFETCH)
        if status:
            raise IndexError(f"gathered MLP: a neuron index is outside [0, {rows})")
    return out


def gathered_dots(h, neurons, *linears):
    """[linear_i restricted to output rows `neurons`](h) for each Linear(d, I): h [B, 1, d],
    neurons [B, K] -> one [B, 1, K] per linear (biases included). Rows of two linears are
    read together (Llama's gate and up in one pass)."""
    out = _kernel_dots(h, neurons, linears, _ACT_NONE) if len(linears) <= 2 else None
    if out is not None:
        return list(out.unbind(0))
    batch, k = neurons.shape
    outs = []
    for linear in linears:
        weight, bias = linear.weight, linear.bias
        if batch == 1:
            out = torch.mv(weight.index_select(0, neurons[0]), h.reshape(-1)).view(1, 1, k)
        else:
            out = torch.bmm(h, weight[neurons].transpose(1, 2))
        outs.append(out if bias is None else out + bias[neurons][:, None])
    return outs


def gathered_glu(h, neurons, gate, up, act_fn):
    """act_fn(gate(h)) * up(h) on the kept neurons only: [B, 1, K] (Llama's gated MLP)."""
    if _is_silu(act_fn):
        out = _kernel_dots(h, neurons, (gate, up), _ACT_SILU_GLU)
        if out is not None:
            return out[0]
    gate_out, up_out = gathered_dots(h, neurons, gate, up)
    return act_fn(gate_out) * up_out


def gathered_activation(h, neurons, linear, act_fn):
    """act_fn(linear(h)) on the kept neurons only: [B, 1, K] (OPT's fc1)."""
    if _is_relu(act_fn):
        out = _kernel_dots(h, neurons, (linear,), _ACT_RELU)
        if out is not None:
            return out[0]
    return act_fn(gathered_dots(h, neurons, linear)[0])


def gathered_output(linear, act, neurons):
    """Linear(I, d) restricted to the input columns `neurons`: act [B, 1, K] -> [B, 1, d]."""
    batch, k = neurons.shape
    lib = gather_kernel()
    if _autograd(act, linear):
        out = torch.bmm(act, linear.weight.t()[neurons])  # autograd reaches the weight itself
        return out if linear.bias is None else out + linear.bias
    plan = _kernel_plan(linear, True) if lib is not None else None
    weights = _kernel_input(act) if plan is not None else None
    if weights is None:
        # Reads only the K rows of the transposed copy, without materialising them.
        out = F.embedding_bag(neurons, transposed_weight(linear), per_sample_weights=act.reshape(batch, k),
                              mode="sum").view(batch, 1, -1)
        return out if linear.bias is None else out + linear.bias
    _, table_ptr, rows, d, bias_ptr, _ = plan
    index = _kernel_index(neurons)
    out = torch.empty(batch, 1, d)
    idx_ptr, w_ptr, out_ptr = index.data_ptr(), weights.data_ptr(), out.data_ptr()
    for row in range(batch):
        status = lib.dejavu_gathered_rows_sum(table_ptr, bias_ptr, idx_ptr + row * k * 8, k, rows, d,
                                              w_ptr + row * k * 4, out_ptr + row * d * 4, GATHER_PREFETCH)
        if status:
            raise IndexError(f"gathered MLP: a neuron index is outside [0, {rows})")
    return out


def _decode_plan(linear):
    """_kernel_plan(linear, False), looked up cheaply: this runs for every Linear of every token."""
    weight, bias = linear.weight, linear.bias
    cached = linear.__dict__.get("_decode_plan")
    if (cached is not None and cached[0] is weight and cached[1] == weight._version and cached[2] is bias
            and (bias is None or cached[3] == bias._version)):
        return cached[4]
    plan = _kernel_plan(linear, False)
    linear.__dict__["_decode_plan"] = (weight, weight._version, bias, None if bias is None else bias._version, plan)
    return plan


def linear_forward(linear, x):
    """linear(x); a single input row (decoding at batch 1) goes through the streaming kernel."""
    if x.numel() == linear.in_features and x.dim() > 0 and x.dtype == torch.float32 and x.device.type == "cpu":
        lib = gather_kernel()
        if lib is not None and not _autograd(x, linear):
            plan = _decode_plan(linear)
            hs = _kernel_input(x) if plan is not None else None
            if hs is not None:
                _, weight_ptr, rows, d, bias_ptr, _ = plan
                out = torch.empty(*x.shape[:-1], rows)
                lib.dejavu_gathered_dots(weight_ptr, None, bias_ptr, None, None, rows, rows, d, hs.data_ptr(),
                                         out.data_ptr(), None, _ACT_NONE, 0)
                return out
    return F.linear(x, linear.weight, linear.bias)


class DecodeLinear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose one-row products use the kernel."""

    def forward(self, x):
        return linear_forward(self, x)

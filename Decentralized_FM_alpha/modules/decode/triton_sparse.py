"""Triton kernels for DejaVu's sparse decode: the products that read only the kept rows.

At decode time (one token per row, B = 1..16 rows) every product is a GEMV: memory-bound, its
cost the bytes of weight read. DejaVu's gain is reading only the kept neurons' (or heads') rows,
so each kernel takes an index list `rows` [R] and streams those rows of a row-major weight once
for all B inputs, accumulating in float32.

Public functions (x, h: [B, d] activations; weights row-major with a contiguous last dimension):

    available(tensor=None)                                  can the kernels run on this tensor here?
    gather_rows_gemv(x, weight, rows, bias=None)            [B, R] = x @ weight[rows].T (+ bias[rows])
    gather_glu_gemv(x, gate, up, rows, activation, ...)     [B, R] = silu(x gate[rows].T) * (x up[rows].T),
                                                            or relu(x fc1[rows].T + b) (OPT)
    gather_columns_gemv(act, weight_t, rows, bias=None)     [B, d] = act @ weight_t[rows] (+ bias)
    sparse_mlp(h, neurons, gate, up, down_t, ...)           the MLP on the kept neurons
    kept_mask / union_of_rows / padded_union / padded_indices   the kept set of a batch (see "Batches")
    top_k_indices(scores, k)                                [B, k] each row's top k, ascending (one program a row)
    predict_neurons(x_pred, predictor_weights, k, ...)      DejaVu's predictor + top-k (+ union)
    predicted_sparse_mlp(h, x_pred, predictor_weights, k, gate, up, down_t, ...)
    head_rows / gather_head_rows / gather_head_columns      q rows and o columns of the kept heads

Layouts:
    gate, up, fc1, q_proj.weight   [N, d] as nn.Linear stores them (out, in). Any row stride: gate
                                   and up may be views of one buffer, packed [I, 2, d]
                                   (gate = w[:, 0], up = w[:, 1], stride 2d) or concatenated
                                   [2I, d] (gate = w[:I], up = w[I:]); the last dim must be
                                   contiguous.
    down_t, o_weight_t             down.weight.t().contiguous() [I, d] (o_proj likewise, [H*hd, d]):
                                   kept neuron j's column of down is row j here, so the down
                                   projection also streams contiguous rows.
    rows, neurons, heads           int32/int64, on the tensors' device; sorted and unique is best
                                   for memory locality, but any order works (outputs follow it).

Padding: an index outside [0, N) is a padding slot. The kernels mask its loads, so it reads
nothing and contributes 0 (its column of gather_rows_gemv is 0, bias included, and its act is 0).
That is what makes the fixed-size union below usable, and it means a bad index can never read
out of bounds; checking indices would need a device sync, which CUDA graphs forbid.

Batches (B > 1): upstream DejaVu computes one kept set for the whole batch, the UNION of every
row's top-K, so each weight row is read once for all B rows. Two forms:
    union_of_rows(indices [B, K]) -> sorted unique [R]: R depends on the data (torch.unique), so
        it cannot be captured in a CUDA graph (it syncs to size its output).
    padded_union(indices [B, K], width) -> [min(B*K, width)]: a kept mask [width] by scatter, then
        the sorted kept indices first and the sentinel `width` after them (a sort of
        where(mask, arange, width), no nonzero). Fixed size, graph-capturable; the padding slots
        cost a program that loads nothing.
    Batch 1 needs neither: its top-K is already fixed size K (sorted for locality).

Kernel shapes (picked from a short sweep on an H100, float16, d = 4096, I = 11008, 5-25% kept;
not tuned further). gather_rows_gemv / gather_glu_gemv: B = 1..2 give one kept row per program
and 2048 / B columns per step, reduced in float32 registers (many programs, long contiguous
reads); B = 3..16 pad the batch to 16 and use tl.dot on [16, 128] x [128, 32] steps (tensor cores
for float16/bfloat16; "ieee" precision for float32, so no TF32 rounding). Batches above 16 run as
chunks of 16 rows. gather_columns_gemv: blocks of 64 output columns, times a split of the kept
rows into slices until there are ~1024 programs (a 4096-wide output has only 64 column blocks);
each slice writes float32 partial sums that torch adds (deterministic, no atomics).

Interpreter: with TRITON_INTERPRET=1 set when this module is imported, the kernels are Triton's
interpreted functions and run on CPU tensors (the tests). Without it they are compiled for CUDA
and need CUDA tensors. `available` says which applies; callers use torch ops otherwise.
"""

from __future__ import annotations

import torch

try:  # triton is optional: callers fall back to torch ops where available() is False
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

# Whether the kernels below are built as interpreted functions: triton.jit decides when this
# module is imported, from TRITON_INTERPRET (read here the same way, through triton's knobs).
INTERPRET = triton is not None and bool(triton.knobs.runtime.interpret)


def _fix_interpreter_loop_bounds():
    """Let the interpreter run `for i in range(0, n, BLOCK)` with a runtime n under numpy >= 2.4.

    Triton 3.6's interpreter holds a scalar argument as a 1-element array and converts it with
    int(array) in tl.tensor.__index__ (patched in per launch by _patch_lang_tensor); numpy 2.4
    made that an error ("only 0-dimensional arrays can be converted to Python scalars"). This
    wraps _patch_lang_tensor so the per-launch __index__ uses .item() instead (same value; the
    patch is undone after each launch like triton's own). Interpreter only, idempotent."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_dejavu_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._dejavu_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRET:
    _fix_interpreter_loop_bounds()

ACTIVATIONS = {"none": 0, "relu": 1, "silu_glu": 2}
MAX_BATCH_TILE = 16  # rows of x one launch handles; larger batches run in chunks
_TARGET_PROGRAMS = 1024  # ~8 per H100 SM (132 SMs): how far gather_columns_gemv splits the rows


def available(tensor: torch.Tensor | None = None) -> bool:
    """True where the kernels can run on `tensor` (or on this machine, with no tensor): triton is
    importable and either the kernels are interpreted (TRITON_INTERPRET=1 at import; any device)
    or the tensor is a CUDA tensor (no tensor: a GPU is visible)."""
    if triton is None:
        return False
    if INTERPRET:
        return True
    if tensor is None:
        return torch.cuda.is_available()
    return tensor.is_cuda


if triton is not None:
    # The kernels use only triton.language builtins (tl.full, tl.reduce, tl.exp, ...), never its
    # @jit helpers (tl.zeros, tl.sum, tl.sigmoid): those are decorated when triton.language is
    # first imported, so they are interpreted only if TRITON_INTERPRET was set then. With
    # builtins only, the kernels run interpreted whenever TRITON_INTERPRET is set at the import
    # of this module, whenever triton itself was imported (what the tests rely on). Sums are
    # tl.reduce with tl.sum's own combine function: compiled, that is exactly tl.sum; the
    # interpreter recognises it and sums with numpy (any other combine runs element by element
    # in Python, ~10x slower). Triton 3.6 names it tl.standard._sum_combine (private, hence the
    # fallback).

    @triton.jit
    def _add(a, b):
        return a + b

    _SUM = getattr(tl.standard, "_sum_combine", _add)

    @triton.jit
    def _gather_rows_kernel(x_ptr, stride_xb, w_ptr, stride_w, u_ptr, stride_u, wb_ptr, ub_ptr, rows_ptr,
                            out_ptr, stride_ob, B, R, D, N,
                            ACT: tl.constexpr, HAS_UP: tl.constexpr, HAS_WB: tl.constexpr, HAS_UB: tl.constexpr,
                            USE_DOT: tl.constexpr, DOT_IEEE: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[b, r] = act(x[b] . w[rows[r]] (+ wb), x[b] . u[rows[r]] (+ ub)); one program per
        BLOCK_R kept rows, looping over d in BLOCK_D columns, all B rows of x at once."""
        pid = tl.program_id(0)
        offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        idx = tl.load(rows_ptr + offs_r, mask=r_ok, other=-1).to(tl.int64)
        row_ok = r_ok & (idx >= 0) & (idx < N)  # anything else is a padding slot: reads nothing
        idx = tl.where(row_ok, idx, 0)
        offs_b = tl.arange(0, BLOCK_B)
        b_ok = offs_b < B
        offs_d = tl.arange(0, BLOCK_D)
        x_rows = x_ptr + offs_b[:, None] * stride_xb
        w_rows = w_ptr + idx[:, None] * stride_w
        u_rows = u_ptr + idx[:, None] * stride_u
        acc_w = tl.full((BLOCK_B, BLOCK_R), 0.0, tl.float32)
        acc_u = tl.full((BLOCK_B, BLOCK_R), 0.0, tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            d_ok = cols < D
            xt = tl.load(x_rows + cols[None, :], mask=b_ok[:, None] & d_ok[None, :], other=0.0)
            wt = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if USE_DOT:
                if DOT_IEEE:
                    acc_w = tl.dot(xt, tl.trans(wt), acc_w, input_precision="ieee")
                else:
                    acc_w = tl.dot(xt, tl.trans(wt), acc_w)
            else:
                acc_w += tl.reduce(xt.to(tl.float32)[:, None, :] * wt.to(tl.float32)[None, :, :], 2, _SUM)
            if HAS_UP:
                ut = tl.load(u_rows + cols[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                if USE_DOT:
                    if DOT_IEEE:
                        acc_u = tl.dot(xt, tl.trans(ut), acc_u, input_precision="ieee")
                    else:
                        acc_u = tl.dot(xt, tl.trans(ut), acc_u)
                else:
                    acc_u += tl.reduce(xt.to(tl.float32)[:, None, :] * ut.to(tl.float32)[None, :, :], 2, _SUM)
        if HAS_WB:
            acc_w += tl.load(wb_ptr + idx, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_UB:
            acc_u += tl.load(ub_ptr + idx, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        if ACT == 1:
            res = tl.maximum(acc_w, 0.0)
        elif ACT == 2:
            res = acc_w / (1.0 + tl.exp(-acc_w)) * acc_u  # silu(g) * u
        else:
            res = acc_w
        out = out_ptr + offs_b[:, None] * stride_ob + offs_r[None, :]
        tl.store(out, res.to(out_ptr.dtype.element_ty), mask=b_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _gather_columns_kernel(a_ptr, stride_ab, w_ptr, stride_w, rows_ptr, bias_ptr, out_ptr, stride_os,
                               stride_ob, B, R, D, N, rows_per_split,
                               HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_IEEE: tl.constexpr,
                               BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[split, b, cols] = sum over this split's kept rows r of a[b, r] * w[rows[r], cols];
        program (column block, split), looping over its rows BLOCK_R at a time."""
        pid_d = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        offs_b = tl.arange(0, BLOCK_B)
        b_ok = offs_b < B
        offs_rr = tl.arange(0, BLOCK_R)
        acc = tl.full((BLOCK_B, BLOCK_D), 0.0, tl.float32)
        r_start = pid_s * rows_per_split
        r_end = tl.minimum(R, r_start + rows_per_split)
        for r0 in range(r_start, r_end, BLOCK_R):
            offs_r = r0 + offs_rr
            r_ok = offs_r < r_end
            idx = tl.load(rows_ptr + offs_r, mask=r_ok, other=-1).to(tl.int64)
            row_ok = r_ok & (idx >= 0) & (idx < N)
            idx = tl.where(row_ok, idx, 0)
            at = tl.load(a_ptr + offs_b[:, None] * stride_ab + offs_r[None, :], mask=b_ok[:, None] & row_ok[None, :],
                         other=0.0)
            wt = tl.load(w_ptr + idx[:, None] * stride_w + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                         other=0.0)
            if USE_DOT:
                if DOT_IEEE:
                    acc = tl.dot(at.to(wt.dtype), wt, acc, input_precision="ieee")
                else:
                    acc = tl.dot(at.to(wt.dtype), wt, acc)
            else:
                acc += tl.reduce(at.to(tl.float32)[:, :, None] * wt.to(tl.float32)[None, :, :], 1, _SUM)
        if HAS_BIAS:  # added once, by the first slice of the rows
            acc += tl.load(bias_ptr + offs_d, mask=d_ok & (pid_s == 0), other=0.0).to(tl.float32)[None, :]
        out = out_ptr + pid_s * stride_os + offs_b[:, None] * stride_ob + offs_d[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=b_ok[:, None] & d_ok[None, :])


    @triton.jit
    def _top_k_kernel(scores_ptr, stride_s, out_ptr, N, K, BLOCK: tl.constexpr):
        """out[row, :K] = the indices of the row's K highest scores, ascending; at the K-th value
        ties go to the lowest indices, NaN ranks above +inf and -0 ties with +0 (the CPU kernel's
        top_k_indices). One program per row, the whole row in registers: the K-th highest
        order-preserving key by bisection over its 32 bits (one count each), then the kept
        positions by two prefix sums."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        inside = offs < N
        s = tl.load(scores_ptr + row * stride_s + offs, mask=inside, other=0.0).to(tl.float32) + 0.0
        sign, ones = tl.full((BLOCK,), 0x80000000, tl.uint32), tl.full((BLOCK,), 0xFFFFFFFF, tl.uint32)
        u = s.to(tl.uint32, bitcast=True)
        key = u ^ tl.where((u & sign) != 0, ones, sign)  # negatives flipped, positives above them
        key = tl.where(s != s, ones, key)
        key = tl.where(inside, key, tl.full((BLOCK,), 0, tl.uint32))  # below every real key
        kth = tl.full((), 0, tl.uint32)
        for bit in tl.static_range(32):  # the largest t with at least K keys >= t
            trial = kth | tl.full((), 1 << (31 - bit), tl.uint32)
            at_least = tl.reduce((key >= trial).to(tl.int32), 0, _SUM)
            kth = tl.where(at_least >= K, trial, kth)
        above = key > kth
        need = K - tl.reduce(above.to(tl.int32), 0, _SUM)
        tie = key == kth
        tie_rank = tl.associative_scan(tie.to(tl.int32), 0, _SUM)  # 1 for the lowest-index tie
        take = above | (tie & (tie_rank <= need))
        position = tl.associative_scan(take.to(tl.int32), 0, _SUM) - 1
        tl.store(out_ptr + row * K + position, offs.to(tl.int64), mask=take)


# ---- host side -----------------------------------------------------------------------------------
def _require(tensor):
    if not available(tensor):
        raise RuntimeError("triton_sparse: Triton cannot run here (needs triton and a CUDA tensor, or "
                           "TRITON_INTERPRET=1 when this module is imported); use the torch path")


def _matrix(t, name, width=None):
    """A [rows, width] tensor whose last dimension is contiguous (any row stride)."""
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride {t.stride()})")
    if width is not None and t.shape[1] != width:
        raise ValueError(f"{name} has {t.shape[1]} columns, expected {width}")
    return t


def _vector(t, name, length):
    if t is None:
        return None
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    return t.contiguous()


def _index(rows, name="rows"):
    if rows.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(rows.shape)}")
    if rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {rows.dtype}")
    return rows.contiguous()


def _same_dtype(dtype, *named):
    for name, t in named:
        if t is not None and t.dtype != dtype:
            raise ValueError(f"{name} is {t.dtype}, expected {dtype} (the kernels read one dtype)")


def _batch_tile(batch):
    """(USE_DOT, BLOCK_B): small batches reduce in registers, larger ones pad to 16 for tl.dot."""
    if batch <= 2:
        return False, 1 if batch == 1 else 2
    return True, MAX_BATCH_TILE


def _chunks(batch):
    return [(start, min(batch, start + MAX_BATCH_TILE)) for start in range(0, batch, MAX_BATCH_TILE)]


def _launch_rows(x, w, u, w_bias, u_bias, rows, act_code, out):
    batch, width = x.shape
    n_rows, r = w.shape[0], rows.shape[0]
    use_dot, block_b = _batch_tile(batch)
    span = triton.next_power_of_2(width)
    if use_dot:  # [16, 128] x [128, 32] per step
        block_r, block_d = 32, min(128, max(16, span))
    else:  # one kept row per program, 2048 // B columns per step: many programs, long contiguous reads
        block_r, block_d = 1, min(2048 // block_b, span)
    dummy = x
    grid = (triton.cdiv(r, block_r),)
    _gather_rows_kernel[grid](
        x, x.stride(0), w, w.stride(0), u if u is not None else w, (u if u is not None else w).stride(0),
        w_bias if w_bias is not None else dummy, u_bias if u_bias is not None else dummy, rows,
        out, out.stride(0), batch, r, width, n_rows,
        ACT=act_code, HAS_UP=u is not None, HAS_WB=w_bias is not None, HAS_UB=u_bias is not None,
        USE_DOT=use_dot, DOT_IEEE=x.dtype == torch.float32,
        BLOCK_B=block_b, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)


def _gather_rows(x, w, u, w_bias, u_bias, rows, act_code):
    _require(x)
    _matrix(x, "x")
    width = x.shape[1]
    _matrix(w, "weight", width)
    if u is not None:
        _matrix(u, "up", width)
        if u.shape[0] != w.shape[0]:
            raise ValueError(f"gate has {w.shape[0]} rows and up {u.shape[0]}; they must match")
    rows = _index(rows)
    n_rows = w.shape[0]
    w_bias = _vector(w_bias, "bias", n_rows)
    u_bias = _vector(u_bias, "up_bias", n_rows)
    _same_dtype(x.dtype, ("weight", w), ("up", u), ("bias", w_bias), ("up_bias", u_bias))
    out = torch.empty(x.shape[0], rows.shape[0], dtype=x.dtype, device=x.device)
    if rows.shape[0] == 0 or x.shape[0] == 0:
        return out.zero_()
    for start, stop in _chunks(x.shape[0]):
        _launch_rows(x[start:stop], w, u, w_bias, u_bias, rows, act_code, out[start:stop])
    return out


def gather_rows_gemv(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, d], weight [N, d] (row-major, any row stride), rows [R] -> [B, R] in x.dtype:
    x @ weight[rows].T (+ bias[rows]), accumulated in float32. Each kept row is read once for all
    B rows of x. A padding index (outside [0, N)) gives a 0 column. Used for q_proj's kept heads
    (gather_head_rows) and any gathered Linear."""
    return _gather_rows(x, weight, None, bias, None, rows, ACTIVATIONS["none"])


def gather_glu_gemv(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None, rows: torch.Tensor,
                    activation: str = "silu_glu", gate_bias: torch.Tensor | None = None,
                    up_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kept neurons' activations, the first half of the MLP, in one pass: x [B, d], rows [R]
    -> act [B, R] in x.dtype.

    activation "silu_glu" (Llama): act = silu(x @ gate[rows].T) * (x @ up[rows].T); gate and up
        [I, d] may be strided views of one buffer (packed [I, 2, d] or concatenated [2I, d]); each
        kept neuron's gate and up rows are read once, SiLU and the product are applied in registers.
    activation "relu" (OPT): act = relu(x @ fc1[rows].T + fc1_bias[rows]); pass fc1 as `gate`,
        its bias as `gate_bias` and up=None.
    Biases are optional for both. Padding indices give act 0.
    """
    if activation not in ("silu_glu", "relu"):
        raise ValueError(f"activation must be 'silu_glu' or 'relu', got {activation!r}")
    if (activation == "silu_glu") != (up is not None):
        raise ValueError("'silu_glu' needs up; 'relu' takes up=None")
    if up is None and up_bias is not None:
        raise ValueError("up_bias given without up")
    return _gather_rows(x, gate, up, gate_bias, up_bias, rows, ACTIVATIONS[activation])


def gather_columns_gemv(act: torch.Tensor, weight_t: torch.Tensor, rows: torch.Tensor,
                        bias: torch.Tensor | None = None, split: int | None = None) -> torch.Tensor:
    """The down projection on the kept neurons: act [B, R], weight_t [I, d] (down.weight
    transposed and contiguous, so kept neuron j's column of down is the contiguous row j), rows [R]
    -> out [B, d] in act.dtype = act @ weight_t[rows] (+ bias [d]), accumulated in float32.

    Grid: blocks of 64 output columns times `split` slices of the kept rows (default: enough
    slices for ~1024 programs, ~8 per H100 SM, each slice at least one step of 32 rows). With one
    slice the kernel writes out directly; with more, each slice writes float32 partial sums into
    a [split, B, d] buffer that torch adds (deterministic, no atomics; the first slice adds the
    bias). The split depends only on shapes, so it is fixed inside a CUDA graph. Padding indices
    contribute nothing.
    """
    _require(act)
    _matrix(act, "act")
    _matrix(weight_t, "weight_t")
    rows = _index(rows)
    batch, r = act.shape
    if rows.shape[0] != r:
        raise ValueError(f"act has {r} columns but rows has {rows.shape[0]} entries")
    n_rows, width = weight_t.shape
    bias = _vector(bias, "bias", width)
    _same_dtype(act.dtype, ("weight_t", weight_t), ("bias", bias))
    out = torch.empty(batch, width, dtype=act.dtype, device=act.device)
    if batch == 0:
        return out
    if r == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(batch, width))
    block_d = 64
    n_blocks = triton.cdiv(width, block_d)
    for start, stop in _chunks(batch):
        a, o = act[start:stop], out[start:stop]
        use_dot, block_b = _batch_tile(stop - start)
        block_r = 32 if use_dot else 32 // block_b
        if split is None:
            chunk_split = max(1, min(triton.cdiv(_TARGET_PROGRAMS, n_blocks), triton.cdiv(r, block_r)))
        else:
            chunk_split = max(1, min(int(split), r))
        per_split = triton.cdiv(triton.cdiv(r, chunk_split), block_r) * block_r
        chunk_split = triton.cdiv(r, per_split)
        target = o if chunk_split == 1 else torch.empty(chunk_split, stop - start, width, dtype=torch.float32,
                                                        device=act.device)
        stride_s = 0 if chunk_split == 1 else target.stride(0)
        stride_b = target.stride(0) if chunk_split == 1 else target.stride(1)
        _gather_columns_kernel[(n_blocks, chunk_split)](
            a, a.stride(0), weight_t, weight_t.stride(0), rows, bias if bias is not None else a, target, stride_s,
            stride_b, stop - start, r, width, n_rows, per_split,
            HAS_BIAS=bias is not None, USE_DOT=use_dot, DOT_IEEE=act.dtype == torch.float32,
            BLOCK_B=block_b, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
        if chunk_split > 1:
            o.copy_(target.sum(0))
    return out


def sparse_mlp(h: torch.Tensor, neurons: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None,
               down_t: torch.Tensor, activation: str = "silu_glu", gate_bias: torch.Tensor | None = None,
               up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The MLP computed on the kept neurons only: h [B, d], neurons [R] -> out [B, d] in h.dtype.

    Equals the dense MLP with the activations of the dropped neurons set to 0:
    down(act(h) * keep) + down_bias. For B > 1 `neurons` is one set for all rows (DejaVu's union:
    union_of_rows or padded_union); for B = 1 a row's sorted top-K. Llama: gate, up [I, d]
    (views allowed), down_t = down.weight.t().contiguous() [I, d]. OPT: activation "relu",
    gate = fc1.weight, gate_bias = fc1.bias, up None, down_t = fc2.weight.t().contiguous(),
    down_bias = fc2.bias. The act [B, R] between the two kernels stays in h.dtype (B*R values).
    """
    act = gather_glu_gemv(h, gate, up, neurons, activation, gate_bias, up_bias)
    return gather_columns_gemv(act, down_t, neurons, down_bias)


# ---- kept sets ----------------------------------------------------------------------------------
def kept_mask(indices: torch.Tensor, width: int) -> torch.Tensor:
    """Bool [width]: True for every index in indices (any shape), by scatter (graph-capturable)."""
    mask = torch.zeros(width, dtype=torch.bool, device=indices.device)
    return mask.scatter_(0, indices.reshape(-1).long(), True)


def union_of_rows(indices: torch.Tensor) -> torch.Tensor:
    """indices [B, K] (each row's kept units) -> sorted unique [R], the union of the rows.

    R depends on the data, so this syncs with the device and cannot sit inside a CUDA graph; use
    padded_union there."""
    return torch.unique(indices.reshape(-1), sorted=True)


def padded_union(indices: torch.Tensor, width: int) -> torch.Tensor:
    """indices [B, K] -> [min(B*K, width)] int64: the union's indices sorted ascending, then the
    padding sentinel `width` in the remaining slots. Fixed size (graph-capturable, no nonzero):
    a kept mask by scatter, then a sort of where(mask, arange(width), width). The kernels skip
    the sentinel (an index outside [0, width) reads nothing and contributes 0)."""
    return padded_indices(kept_mask(indices, width), min(indices.numel(), width))


def padded_indices(mask: torch.Tensor, capacity: int) -> torch.Tensor:
    """Bool mask [width] -> [capacity] int64: the kept positions ascending, then the sentinel
    `width` in the remaining slots; a sort of where(mask, arange(width), width), no nonzero."""
    width = mask.shape[0]
    order = torch.arange(width, device=mask.device)
    keys = torch.where(mask, order, torch.full_like(order, width))
    return keys.sort().values[:capacity]


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, N] -> [B, k] int64: each row's k highest, in ascending index order (ties at the
    k-th value to the lowest indices, NaN above +inf): topk + sort in one program per row, for
    rows of up to 2^16 scores. Not yet in the decoding path: bench_gpu's parts time it against
    topk and sort."""
    _require(scores)
    if scores.dim() != 2 or scores.stride(1) != 1:
        raise ValueError(f"scores must be [B, N] with a contiguous last dimension, got {tuple(scores.shape)}")
    batch, width = scores.shape
    if not 1 <= k <= width or width > 1 << 16:
        raise ValueError(f"cannot keep {k} of {width} scores (1 to N, N up to 65536)")
    out = torch.empty(batch, k, dtype=torch.int64, device=scores.device)
    block = triton.next_power_of_2(width)
    _top_k_kernel[(batch,)](scores, scores.stride(0), out, width, k, BLOCK=block,
                            num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16)
    return out


# ---- DejaVu's predicted MLP ---------------------------------------------------------------------
def _predictor_pair(predictor_weights):
    """(W1 [D, d], W2 [I, D]) from a pair of tensors or sparse_predictor's Sequential(Linear, Linear)."""
    if isinstance(predictor_weights, torch.nn.Sequential):
        first, second = list(predictor_weights)
        if first.bias is not None or second.bias is not None:
            raise ValueError("the DejaVu predictor has no biases")
        return first.weight, second.weight
    w1, w2 = predictor_weights
    return w1, w2


def predict_neurons(x_pred: torch.Tensor, predictor_weights, k: int, fixed_size: bool = False) -> torch.Tensor:
    """DejaVu's predictor and top-k: x_pred [B, d] -> the kept neuron indices [R].

    The predictor is sparse_predictor.predictor.build_predictor: Linear(d, D) then Linear(D, I),
    no biases and no activation between them; `predictor_weights` is (W1 [D, d], W2 [I, D]) or
    that nn.Sequential. scores = (x_pred @ W1.T) @ W2.T in the predictor's dtype; each row keeps
    its top k. B = 1: those k, sorted (fixed size). B > 1: their union (union_of_rows), or with
    fixed_size=True the padded_union (capturable in a CUDA graph).

    The predictor's two products stay in torch (cuBLAS): they are dense (every score is needed
    for top-k), small (D is ~1000, so W1 and W2 are a few percent of the MLP's bytes), and
    cuBLAS's GEMV already streams them at memory bandwidth; a Triton version would gain nothing.
    """
    w1, w2 = _predictor_pair(predictor_weights)
    scores = torch.nn.functional.linear(torch.nn.functional.linear(x_pred.to(w1.dtype), w1), w2)
    # [B, k]; fixed k keeps it graph-capturable. Unsorted: only the set matters, and the indices
    # are sorted next (batch 1) or scattered into a mask (the union), so topk's value sort is waste.
    top = scores.topk(k, dim=-1, sorted=False).indices
    if top.shape[0] == 1:
        return top[0].sort().values
    return padded_union(top, w2.shape[0]) if fixed_size else union_of_rows(top)


def predicted_sparse_mlp(h: torch.Tensor, x_pred: torch.Tensor, predictor_weights, k: int, gate: torch.Tensor,
                         up: torch.Tensor | None, down_t: torch.Tensor, activation: str = "silu_glu",
                         gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None,
                         down_bias: torch.Tensor | None = None, fixed_size: bool = False) -> torch.Tensor:
    """DejaVu's predicted MLP: h [B, d] (the MLP input), x_pred [B, d'] (the predictor input)
    -> [B, d]. predict_neurons (top-k per row, union over rows for B > 1), then sparse_mlp on
    those neurons. Equals the dense MLP with act masked by the kept set (each row's top-k for
    B = 1, the union for B > 1). Callers that record the kept set call the two steps themselves."""
    neurons = predict_neurons(x_pred, predictor_weights, k, fixed_size)
    return sparse_mlp(h, neurons, gate, up, down_t, activation, gate_bias, up_bias, down_bias)


# ---- attention heads ----------------------------------------------------------------------------
def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Kept heads [Hk] -> their row indices [Hk * head_dim] (int64): head*hd .. head*hd + hd-1,
    in the heads' order. A padding head (>= the head count) maps to padding rows."""
    offsets = torch.arange(head_dim, device=heads.device)
    return (heads.long()[:, None] * head_dim + offsets).reshape(-1)


def gather_head_rows(x: torch.Tensor, q_weight: torch.Tensor, heads: torch.Tensor, head_dim: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """q of the kept heads only: x [B, d], q_proj.weight [H*hd, d], heads [Hk] -> [B, Hk*hd]
    (head-major, in heads' order) = x @ q_weight[head_rows].T (+ bias). k and v stay dense: the
    cache must hold every KV head's keys and values for later tokens."""
    return gather_rows_gemv(x, q_weight, head_rows(heads, head_dim), bias)


def gather_head_columns(attn: torch.Tensor, o_weight_t: torch.Tensor, heads: torch.Tensor, head_dim: int,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """o_proj on the kept heads' columns: attn [B, Hk*hd] (the kept heads' outputs, in heads'
    order), o_weight_t = o_proj.weight.t().contiguous() [H*hd, d] -> [B, d]. Equals
    o_proj(heads_out * mask) where the mask zeroes every dropped head's output."""
    return gather_columns_gemv(attn, o_weight_t, head_rows(heads, head_dim), bias)

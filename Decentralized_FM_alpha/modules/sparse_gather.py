"""Single-row products for decoding: gathered (sparse) MLP pieces that read only the kept
neurons' weight rows, and DecodeLinear, the dense Linear whose one-row products stream the
whole weight through the same kernel."""

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels

# ---------------------------------------------------------------------------------------------
# Gathered (sparse) MLP for decoding: only the kept neurons' weights are read.
#
# gathered_glu(h, neurons, gate, up, act_fn)    act_fn(gate(h)) * up(h) on the kept neurons (Llama)
# gathered_activation(h, neurons, fc1, act_fn)  act_fn(fc1(h)) on the kept neurons (OPT)
# gathered_dots(h, neurons, *linears)           the rows `neurons` of Linear(d, I)s applied to h
# gathered_output(linear, act, neurons)         a Linear(I, d) restricted to the input columns `neurons`
# DecodeLinear / linear_forward(linear, x)      a dense Linear; one input row goes through the kernel
#
# On CPU in float32 (no autograd) these run the C kernels of cpu_kernels.py that read the
# kept rows in place: nothing is materialised, several rows stream at once, gate and up are
# read in one pass and SiLU-gating / ReLU and biases are applied on the fly. Column gathers
# of down/fc2 read a contiguous transposed copy of its weight, made once per weight version
# and kept on the Linear (a plain attribute, not in the state dict: +1/3 of the MLP weights
# in memory). Anywhere else (no compiler, other dtypes or devices, autograd) torch ops give
# the same results.
# ---------------------------------------------------------------------------------------------

def gather_kernel():
    """The compiled CPU kernels (cpu_kernels.kernel_library()), or None."""
    return cpu_kernels.kernel_library()


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


def is_silu(act_fn):
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
                                          act, 0)
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
    if is_silu(act_fn):
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
                                              w_ptr + row * k * 4, out_ptr + row * d * 4, 0)
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


def _predictor_tables(predictor):
    """(first, second) kernel plans of a Sequential(Linear(d, D), Linear(D, I)) predictor without
    biases, or None for any other predictor."""
    if not (isinstance(predictor, nn.Sequential) and len(predictor) == 2
            and all(type(layer) in (nn.Linear, DecodeLinear) and layer.bias is None for layer in predictor)):
        return None
    plans = [_decode_plan(layer) for layer in predictor]
    return None if None in plans else plans


def predicted_gathered_mlp(h, x_pred, predictor, k, first, second, output, act_fn):
    """DejaVu's predicted MLP for one token per row in one kernel call per row: the predictor
    scores the I neurons from x_pred, the k best are kept (as topk + sort would), and
    output(act(first(h), second(h))) is computed on them alone. Llama: first = gate, second =
    up, SiLU-gated; OPT: first = fc1, second None, ReLU. h, x_pred [B, 1, d] -> [B, 1, d], or
    None where the kernel does not apply (the caller then runs the same steps in torch ops)."""
    lib = gather_kernel()
    if lib is None or not (is_silu(act_fn) if second is not None else _is_relu(act_fn)):
        return None
    linears = (first, output) if second is None else (first, second, output)
    if _autograd(h, *linears) or _autograd(x_pred, *predictor):
        return None
    tables = _predictor_tables(predictor)
    plans = [_kernel_plan(linear, False) for linear in (first, second) if linear is not None]
    down = _kernel_plan(output, True)
    hs, xs = _kernel_input(h), _kernel_input(x_pred)
    if tables is None or None in plans or down is None or hs is None or xs is None:
        return None
    (_, p1, rank, dp, _, _), (_, p2, inner, _, _, _) = tables
    (_, a, rows, d, a_bias, _), (b, b_bias) = plans[0], (plans[1][1], plans[1][4]) if second is not None else (None, None)
    _, table, _, width, bias, _ = down
    batch = h.shape[0]
    if h.shape[1] != 1 or x_pred.shape[:2] != (batch, 1) or x_pred.shape[-1] != dp or rows != inner or not 1 <= k <= inner:
        return None
    out = torch.empty(batch, 1, width)
    for row in range(batch):
        status = lib.dejavu_predicted_mlp(xs.data_ptr() + row * dp * 4, dp, p1, rank, p2, hs.data_ptr() + row * d * 4, d,
                                          a, b, a_bias, b_bias, table, bias, inner, k, out.data_ptr() + row * width * 4,
                                          None)
        if status:
            raise RuntimeError(f"predicted MLP kernel refused its input (status {status})")
    return out

"""The C decoder layers' views of a block's weights, as named structures (cpu.py runs them).

A view is built once per DecodePlan (plan.derived, under VIEW) at the block's first kernel step
and kept for the plan's life; a new set-up (replaced weights or modules, another sparse
configuration) is a new plan.

  LlamaLayerView   cpu_kernels.LlamaLayer (pointers to the layer's 16 tensors, its sizes and
                   norm epsilons), whether that struct holds the MLP too, and the prepared call
                   of DejaVu's predicted MLP where the block's MLP has a predictor
  OPTLayerView     cpu_kernels.OptLayer: the whole layer (ReLU MLP, pre-LN or post-LN)

Each family has a tensors function (the 16 tensors, in the struct's order) and a builder;
cpu.FAMILIES pairs them with the family's C calls.
"""

import ctypes
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .. import cpu_kernels
from .sparse_gather import PredictedCall, is_relu, is_silu, predicted_call

VIEW = "cpu_layer_view"  # what plan.derived keeps a block's view under


@dataclass(frozen=True)
class LlamaLayerView:
    layer: cpu_kernels.LlamaLayer
    ref: Any  # ctypes.byref(layer): what the kernels take
    has_mlp: bool  # the struct points at the MLP's weights too (False: packed per neuron, or not SiLU)
    predicted: Optional[PredictedCall]  # the MLP's predictor and weights as one C call; None: none it reads
    held: tuple = ()  # the tensors the struct points into: alive while the view is, whatever the block holds since


@dataclass(frozen=True)
class OPTLayerView:
    layer: cpu_kernels.OptLayer
    ref: Any
    has_mlp: bool = True  # there is no OPT view without the MLP
    predicted: Optional[PredictedCall] = None  # no OPT decoder layer with a predicted MLP
    held: tuple = ()


def kernel_readable(tensors):
    """Whether the decoder-layer kernels can read these (None, or contiguous float32 on CPU)."""
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())
               for t in tensors)


def shared_weight_type(matrices):
    """The kernels' weight_type of these weight matrices (None entries skipped): contiguous CPU
    tensors of one dtype the kernels read (float32, bfloat16, float16); None where they are not."""
    present = [m for m in matrices if m is not None]
    if not present or any(m.device.type != "cpu" or not m.is_contiguous() or m.dtype != present[0].dtype
                          for m in present):
        return None
    return cpu_kernels.weight_type(present[0].dtype)


def as_float32(tensors):
    """The norm weights and biases as the kernels read them: float32 CPU, contiguous (the tensor
    itself where it is; a copy, held by the view, where the model is in half precision)."""
    return [t if t is None or kernel_readable([t]) else t.detach().to("cpu", torch.float32).contiguous()
            for t in tensors]


def readable_layer(tensors, matrix_slots, required_slots):
    """(the tensors with the vectors (those not in matrix_slots) made float32, the weight_type of
    the matrices in required_slots), or (None, None) where those cannot be read."""
    weights = shared_weight_type([tensors[i] for i in required_slots])
    if weights is None:
        return None, None
    vectors = iter(as_float32([t for i, t in enumerate(tensors) if i not in matrix_slots]))
    return [t if i in matrix_slots else next(vectors) for i, t in enumerate(tensors)], weights


def addresses(tensors):
    return [None if t is None else t.data_ptr() for t in tensors]


def _linear_tensors(linears):
    return [tensor for linear in linears for tensor in (linear.weight, linear.bias)]


def llama_tensors(block):
    """The 16 tensors of cpu_kernels.LlamaLayer, in its order (None: no bias)."""
    modules = block._modules
    attention, mlp = modules["self_attn"]._modules, modules["mlp"]
    gate, up, down, _ = mlp.neuron_linears()
    norms = [modules[name].weight for name in ("input_layernorm", "post_attention_layernorm")]
    return norms + _linear_tensors([attention[name] for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
                                   + [gate, up, down])


# the weight matrices among llama_tensors (the others are norm weights and biases)
LLAMA_ATTENTION_MATRICES, LLAMA_MLP_MATRICES = (2, 4, 6, 8), (10, 12, 14)
OPT_MATRICES = (4, 6, 8, 10, 12, 14)


def build_llama_view(plan, block):
    # The attention half reads its weights as the checkpoint has them; the MLP half also needs the
    # MLP's (a predicted-mode block packs them per neuron, and its MLP then runs apart). The
    # matrices are read in their dtype (float32, bfloat16 or float16: one for the layer), the
    # norm weights and biases in float32.
    tensors, weights = readable_layer(llama_tensors(block), LLAMA_ATTENTION_MATRICES + LLAMA_MLP_MATRICES,
                                      LLAMA_ATTENTION_MATRICES)
    if tensors is None:
        return None
    mlp = block._modules["mlp"]
    gate, up, down, act_fn = mlp.neuron_linears()
    mlp_matrices = [tensors[i] for i in LLAMA_MLP_MATRICES]
    has_mlp = (is_silu(act_fn) and shared_weight_type(mlp_matrices) == weights
               and all(m is not None for m in mlp_matrices))
    pointers = addresses(tensors)
    if not has_mlp:
        pointers[10:] = [None] * 6
    (attn_norm, mlp_norm, q, q_bias, k, k_bias, v, v_bias, o, o_bias,
     gate_w, gate_bias, up_w, up_bias, down_w, down_bias) = pointers
    layer = cpu_kernels.LlamaLayer(
        attn_norm=attn_norm, q=q, k=k, v=v, o=o, q_bias=q_bias, k_bias=k_bias, v_bias=v_bias, o_bias=o_bias,
        mlp_norm=mlp_norm, gate=gate_w, up=up_w, down=down_w, gate_bias=gate_bias, up_bias=up_bias,
        down_bias=down_bias, hidden=block.config.hidden_size, heads=block.num_heads, kv_heads=block.num_kv_heads,
        head_dim=block.head_dim, inner=gate.out_features, attn_eps=block.input_layernorm.eps,
        mlp_eps=block.post_attention_layernorm.eps, weights=weights)
    predictor = getattr(mlp, "predictor", None)  # a sparse MLP's (sparse execution)
    predicted = None if predictor is None else predicted_call(plan, predictor, gate, up, down, act_fn,
                                                              getattr(mlp, "predictor_rounded", None))
    return LlamaLayerView(layer, ctypes.byref(layer), has_mlp, predicted, tuple(tensors))


def opt_tensors(block):
    """The 16 tensors of cpu_kernels.OptLayer, in its order (None: no bias or affine)."""
    modules = block._modules
    attention, mlp = modules["self_attn"]._modules, modules["mlp"]
    fc1, _, fc2, _ = mlp.neuron_linears()
    norms = [getattr(modules[norm], name) for norm in ("self_attn_layer_norm", "final_layer_norm")
             for name in ("weight", "bias")]
    return norms + _linear_tensors([attention[name] for name in ("q_proj", "k_proj", "v_proj", "out_proj")]
                                   + [fc1, fc2])


def build_opt_view(plan, block):
    tensors, weights = readable_layer(opt_tensors(block), OPT_MATRICES, OPT_MATRICES)
    fc1, _, _, act = block._modules["mlp"].neuron_linears()
    if tensors is None or not is_relu(act):
        return None
    (attn_norm, attn_norm_bias, mlp_norm, mlp_norm_bias, q, q_bias, k, k_bias, v, v_bias, o, o_bias,
     fc1_w, fc1_bias, fc2_w, fc2_bias) = addresses(tensors)
    layer = cpu_kernels.OptLayer(
        attn_norm=attn_norm, attn_norm_bias=attn_norm_bias, q=q, k=k, v=v, o=o, q_bias=q_bias, k_bias=k_bias,
        v_bias=v_bias, o_bias=o_bias, mlp_norm=mlp_norm, mlp_norm_bias=mlp_norm_bias, fc1=fc1_w, fc2=fc2_w,
        fc1_bias=fc1_bias, fc2_bias=fc2_bias, hidden=block.config.hidden_size, heads=block.num_heads,
        head_dim=block.head_dim, inner=fc1.out_features, norm_first=int(block.norm_first),
        attn_eps=block.self_attn_layer_norm.eps, mlp_eps=block.final_layer_norm.eps, weights=weights)
    return OPTLayerView(layer, ctypes.byref(layer), held=tuple(tensors))


def layer_view(plan, block, build):
    """The block's view (build(plan, block)), or None where the kernel cannot read its weights;
    once per plan."""
    return plan.derived(VIEW, block, lambda: build(plan, block))


def view_of(plan, block):
    """The view the plan built for the block (None: none yet, or one the kernel cannot read)."""
    return plan.built(VIEW, block)

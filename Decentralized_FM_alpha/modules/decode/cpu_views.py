"""The C decoder layers' views of a block's weights, as named structures (cpu.py runs them).

A view is built once and kept on the block (sparse_gather.cached_view, under VIEW_KEY) while
every slot its builder read still holds the same object, and each tensor the same version and
memory: the weights, the modules they hang on and, in a sparse block, the MLP's predictor. Each
decoded token checks that, then hands the view's struct to C.

  LlamaLayerView   cpu_kernels.LlamaLayer (pointers to the layer's 16 tensors, its sizes and
                   norm epsilons), whether that struct holds the MLP too, and the prepared call
                   of DejaVu's predicted MLP where the block's MLP has a predictor
  OPTLayerView     cpu_kernels.OptLayer: the whole layer (ReLU MLP, pre-LN or post-LN)

Each family has a slots function (what its view depends on: the 16 tensors first, in the
struct's order) and a builder; cpu.FAMILIES pairs them with the family's C calls.
"""

import ctypes
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .. import cpu_kernels
from .sparse_gather import PredictedCall, cached_view, is_relu, is_silu, linear_slots, predicted_call

VIEW_KEY = "cpu_layer_view"  # block.__dict__ key of the cached view


@dataclass(frozen=True)
class LlamaLayerView:
    layer: cpu_kernels.LlamaLayer
    ref: Any  # ctypes.byref(layer): what the kernels take
    has_mlp: bool  # the struct points at the MLP's weights too (False: packed per neuron, or not SiLU)
    predicted: Optional[PredictedCall]  # the MLP's predictor and weights as one C call; None: none it reads


@dataclass(frozen=True)
class OPTLayerView:
    layer: cpu_kernels.OptLayer
    ref: Any
    has_mlp: bool = True  # there is no OPT view without the MLP
    predicted: Optional[PredictedCall] = None  # no OPT decoder layer with a predicted MLP


def kernel_readable(tensors):
    """Whether the decoder-layer kernels can read these (None, or contiguous float32 on CPU)."""
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())
               for t in tensors)


def addresses(tensors):
    return [None if t is None else t.data_ptr() for t in tensors]


def mlp_slots(mlp):
    """The MLP's submodules, and a sparse MLP's predictor with its layers and their weights."""
    slots = [(mlp._modules, name) for name in mlp._modules] + [(mlp.__dict__, "predictor")]
    predictor = mlp.__dict__.get("predictor")
    if isinstance(predictor, nn.Module):
        layers = predictor._modules
        slots += [(layers, name) for name in layers]
        slots += linear_slots([layer for layer in layers.values() if isinstance(layer, nn.Linear)])
    return slots


def llama_slots(block):
    modules = block._modules
    attention, mlp = modules["self_attn"]._modules, modules["mlp"]
    gate, up, down, _ = mlp.neuron_linears()
    norms = [(modules[name]._parameters, "weight") for name in ("input_layernorm", "post_attention_layernorm")]
    linears = [attention[name] for name in ("q_proj", "k_proj", "v_proj", "o_proj")] + [gate, up, down]
    structure = [(modules, name) for name in ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp")]
    structure += [(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    return norms + linear_slots(linears) + structure + mlp_slots(mlp)


def build_llama_view(block, values):
    tensors = values[:16]
    # The attention half reads its weights as the checkpoint has them; the MLP half also needs the
    # MLP's (a predicted-mode block packs them per neuron, and its MLP then runs apart).
    if not kernel_readable(tensors[:10]):
        return None
    mlp = block._modules["mlp"]
    gate, up, down, act_fn = mlp.neuron_linears()
    has_mlp = kernel_readable(tensors[10:]) and is_silu(act_fn)
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
        mlp_eps=block.post_attention_layernorm.eps)
    predictor = mlp.__dict__.get("predictor")
    predicted = None if predictor is None else predicted_call(predictor, gate, up, down, act_fn)
    return LlamaLayerView(layer, ctypes.byref(layer), has_mlp, predicted)


def opt_slots(block):
    modules = block._modules
    attention, mlp = modules["self_attn"]._modules, modules["mlp"]
    fc1, _, fc2, _ = mlp.neuron_linears()
    norms = [(modules[norm]._parameters, name) for norm in ("self_attn_layer_norm", "final_layer_norm")
             for name in ("weight", "bias")]
    linears = [attention[name] for name in ("q_proj", "k_proj", "v_proj", "out_proj")] + [fc1, fc2]
    structure = [(modules, name) for name in ("self_attn", "self_attn_layer_norm", "final_layer_norm", "mlp")]
    structure += [(attention, name) for name in ("q_proj", "k_proj", "v_proj", "out_proj")]
    return norms + linear_slots(linears) + structure + mlp_slots(mlp)


def build_opt_view(block, values):
    tensors = values[:16]
    fc1, _, _, act = block._modules["mlp"].neuron_linears()
    if not (is_relu(act) and kernel_readable(tensors)):
        return None
    (attn_norm, attn_norm_bias, mlp_norm, mlp_norm_bias, q, q_bias, k, k_bias, v, v_bias, o, o_bias,
     fc1_w, fc1_bias, fc2_w, fc2_bias) = addresses(tensors)
    layer = cpu_kernels.OptLayer(
        attn_norm=attn_norm, attn_norm_bias=attn_norm_bias, q=q, k=k, v=v, o=o, q_bias=q_bias, k_bias=k_bias,
        v_bias=v_bias, o_bias=o_bias, mlp_norm=mlp_norm, mlp_norm_bias=mlp_norm_bias, fc1=fc1_w, fc2=fc2_w,
        fc1_bias=fc1_bias, fc2_bias=fc2_bias, hidden=block.config.hidden_size, heads=block.num_heads,
        head_dim=block.head_dim, inner=fc1.out_features, norm_first=int(block.norm_first),
        attn_eps=block.self_attn_layer_norm.eps, mlp_eps=block.final_layer_norm.eps)
    return OPTLayerView(layer, ctypes.byref(layer))


def layer_view(block, slots, build):
    """The block's view (built by build(block, values) from slots(block)), or None where the
    kernel cannot read its weights; kept while what it read is unchanged."""
    return cached_view(block, VIEW_KEY, (), lambda: slots(block), lambda values: build(block, values))


def view_of(block):
    """The view the block last built (None: none yet, or one the kernel cannot read)."""
    cached = block.__dict__.get(VIEW_KEY)
    return None if cached is None else cached[1]

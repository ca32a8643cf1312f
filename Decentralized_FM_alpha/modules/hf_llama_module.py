"""Llama family (Llama 2/3/3.1/3.2, SmolLM2, ...) as pipeline parts: embeddings, blocks, head.

Differences from OPT that matter here: RMSNorm without bias, RoPE applied to q/k inside
attention (no position embedding), grouped-query attention (the cache holds one entry per
KV head), and a gated SiLU MLP: down(silu(gate(x)) * up(x)).
"""

import ctypes
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from . import cpu_kernels
from .sparse_gather import DecodeLinear, addresses, cached_view, is_silu, kernel_readable, linear_slots
from .common import (
    TappedModule,
    build_from_checkpoint,
    cache_geometry,
    extend_cache,
    fusable_step,
    kernel_step,
    load_config,
    StepCache,
    step_geometry,
    tensor_key,
    token_mask_of,
)

_rope_cache = StepCache()  # one step's cos/sin tables, shared by all blocks with equal RoPE

# RoPE types whose frequencies depend on the running sequence length are not supported.
UNSUPPORTED_ROPE_TYPES = ("dynamic", "longrope")


def head_dim_of(config):
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters_of(config):
    """The RoPE settings as a dict, from `rope_parameters` or legacy `rope_theta`/`rope_scaling`."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_inverse_frequencies(config):
    """(inv_freq [head_dim/2], attention_scaling) using transformers' own RoPE init functions."""
    params = rope_parameters_of(config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        dim = head_dim_of(config)
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    if rope_type in UNSUPPORTED_ROPE_TYPES or rope_type not in ROPE_INIT_FUNCTIONS:
        known = ["default"] + [t for t in ROPE_INIT_FUNCTIONS if t not in UNSUPPORTED_ROPE_TYPES]
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(known)}")
    return ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # in float32, as transformers
        return self.weight * normed.to(x.dtype)


class LlamaEmbeddings(nn.Module):
    """Token embeddings only: Llama has no position embedding (RoPE lives in attention)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)

    @classmethod
    def from_pretrained(cls, model_path, config=None, dtype=None, device=None):
        config = config or load_config(model_path, LlamaConfig)
        path = os.path.join(model_path, "pytorch_embs.pt")
        return build_from_checkpoint(cls, path, dtype=dtype, device=device, config=config)

    def forward(self, input_ids, past_layer=None, mask=None):
        return self.embed_tokens(input_ids)


class LlamaAttentionWeights(nn.Module):
    """The four projections; the computation is in LlamaBlock so the taps sit in one place."""

    def __init__(self, config):
        super().__init__()
        d, hd = config.hidden_size, head_dim_of(config)
        bias = getattr(config, "attention_bias", False)
        self.q_proj = DecodeLinear(d, config.num_attention_heads * hd, bias=bias)
        self.k_proj = DecodeLinear(d, config.num_key_value_heads * hd, bias=bias)
        self.v_proj = DecodeLinear(d, config.num_key_value_heads * hd, bias=bias)
        self.o_proj = DecodeLinear(config.num_attention_heads * hd, d, bias=bias)


class LlamaBlock(TappedModule):
    """One decoder layer: x + attn(norm(x)), then + mlp(norm(.)); taps at the four points."""

    def __init__(self, config, layer_index=0):
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        d, inner = config.hidden_size, config.intermediate_size
        mlp_bias = getattr(config, "mlp_bias", False)
        self.input_layernorm = LlamaRMSNorm(d, config.rms_norm_eps)
        self.self_attn = LlamaAttentionWeights(config)
        self.post_attention_layernorm = LlamaRMSNorm(d, config.rms_norm_eps)
        self.gate_proj = DecodeLinear(d, inner, bias=mlp_bias)
        self.up_proj = DecodeLinear(d, inner, bias=mlp_bias)
        self.down_proj = DecodeLinear(inner, d, bias=mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]
        self.materialize_buffers()

    def materialize_buffers(self, device=None):
        with torch.device("cpu"):  # also when the block itself is being built on "meta"
            inv_freq, scaling = rope_inverse_frequencies(self.config)
        self.register_buffer("inv_freq", inv_freq.to(device or "cpu"), persistent=False)
        self.rope_scaling = scaling
        self.rope_key = (tuple(inv_freq.tolist()), scaling)  # blocks with equal RoPE share cos/sin

    @classmethod
    def from_pretrained(cls, model_path, config=None, layer_index=0, dtype=None, device=None):
        config = config or load_config(model_path, LlamaConfig)
        path = os.path.join(model_path, f"pytorch_{layer_index}.pt")
        return build_from_checkpoint(
            cls, path, dtype=dtype, device=device, config=config, layer_index=layer_index
        )

    def rope(self, positions, dtype):
        """cos, sin [B, 1, S, head_dim] for the given positions [B, S]."""
        return self.rope_tables(positions, dtype)[:2]

    def rope_tables(self, positions, dtype):
        """cos, sin and the sign-folded sin of `rotate`: x * cos + rotate(x, signed_sin) is RoPE."""
        # positions comes from step_geometry, one object per step: one computation for all layers
        key = (tensor_key(positions), self.rope_key, dtype, self.inv_freq.device)
        return _rope_cache.get(key, lambda: self._compute_rope_tables(positions, dtype), positions)

    def _compute_rope_tables(self, positions, dtype):
        freqs = positions[..., None].float() * self.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * self.rope_scaling).to(dtype)[:, None]
        sin = (angles.sin() * self.rope_scaling).to(dtype)[:, None]
        half = sin.shape[-1] // 2
        return cos, sin, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

    def attention(self, h, layer_past, mask, token_mask):
        batch, seq_len, _ = h.shape
        weights = self.self_attn
        q = weights.q_proj(h).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = weights.k_proj(h).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = weights.v_proj(h).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        positions, allowed = cache_geometry(layer_past, mask, seq_len, h.device)
        cos, _, signed_sin = self.rope_tables(positions, h.dtype)
        # rotate_half(x) * sin == roll(x, half) * signed_sin: one op instead of chunk, neg, cat
        half = self.head_dim // 2
        q = torch.addcmul(q * cos, q.roll(half, dims=-1), signed_sin)
        k = torch.addcmul(k * cos, k.roll(half, dims=-1), signed_sin)
        present, k, v = extend_cache(layer_past, k, v)
        heads = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=self.head_dim**-0.5,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # [B, H, S, hd]
        heads = self.tap("head_out", heads.transpose(1, 2), token_mask)  # [B, S, H, hd]
        return weights.o_proj(heads.reshape(batch, seq_len, -1)), present

    def mlp_activation(self, h):
        return self.act_fn(self.gate_proj(h)) * self.up_proj(h)

    def mlp(self, h, token_mask):
        return self.mlp_output(self.tap("mlp_act", self.mlp_activation(h), token_mask))

    def mlp_output(self, act):
        return self.down_proj(act)

    def neuron_linears(self):
        """(first, second, output, activation) of the MLP, as the gathered kernels take them."""
        modules = self._modules  # not through Module.__getattr__: this runs for every layer of every token
        act_fn = modules.get("act_fn") or self.act_fn  # a module, or a plain function
        return modules["gate_proj"], modules["up_proj"], modules["down_proj"], act_fn

    def fused_decode(self, x, layer_past, mask):
        """(x, present) for one token at batch 1 in one call of the C decoder layer, or None
        where it does not apply (not float32 on CPU, no KVCache yet, taps or autograd in use,
        kernels off): then the torch ops below run instead, with the same numbers."""
        if type(self).tap is not TappedModule.tap:  # the save and sparse variants see the torch ops
            return None
        return self.fused_step(x, layer_past, mask)

    def fused_step(self, x, layer_past, mask, with_mlp=True, predicted_k=None, predict_from_input=False):
        """The C decoder layer for one token at batch 1, taps not called: (x, present). With
        with_mlp False only its attention half, (x + attn, the MLP's normalised input, present),
        for a sparse MLP to follow. With predicted_k, DejaVu's predicted MLP keeping that many
        neurons runs in place of the dense one, in the same call, where the kernel view holds a
        predicted call (SparseBlockMixin); its predictor reads the layer's input with
        predict_from_input, else the MLP's residual input. Where it holds none, as with_mlp
        False. None where the kernel does not apply."""
        lib = cpu_kernels.kernel_library() if fusable_step(x, layer_past) else None
        layer = self.kernel_layer() if lib is not None else None
        if layer is None:
            return None
        call = layer[3] if predicted_k is not None and len(layer) > 3 else None
        if call is not None and not 1 <= predicted_k <= call.rows:
            raise ValueError(f"layer {self.layer_index}: cannot keep {predicted_k} of {call.rows} MLP neurons")
        if predicted_k is not None and call is None:
            with_mlp = False  # no predictor the kernel reads: the attention half, then the MLP in torch ops
        if with_mlp and call is None and not layer[2]:
            return None
        x, out, present, cache, valid = kernel_step(x, layer_past, mask)
        positions, _ = step_geometry(mask, layer_past.length, 1, x.device)
        cos, _, signed_sin = self.rope_tables(positions, torch.float32)
        geometry = (*cache, cos.data_ptr(), signed_sin.data_ptr(), valid, self.head_dim**-0.5)
        if call is not None:
            with_mlp = True
            status = lib.dejavu_llama_predicted_decode_layer(layer[1], call.mlp_ref, call.predictor_ref, predicted_k,
                                                             int(predict_from_input), x.data_ptr(), out.data_ptr(),
                                                             *geometry)
        else:
            mlp_input = None if with_mlp else torch.empty_like(x)
            status = lib.dejavu_llama_decode_layer(layer[1], x.data_ptr(), out.data_ptr(), *geometry, int(with_mlp),
                                                   None if with_mlp else mlp_input.data_ptr())
        if status:
            raise RuntimeError(f"layer {self.layer_index}: the C decoder layer refused its input (status {status})")
        return (out, present) if with_mlp else (out, mlp_input, present)

    def kernel_layer(self):
        """(cpu_kernels.LlamaLayer, a reference to it, whether it holds the MLP too) for this
        layer's weights, or None where the kernel cannot read them."""
        # the slots: the 16 tensors the struct points at, then the modules they hang on
        return cached_view(self, "_kernel_layer", (), self._kernel_slots, self._build_kernel_layer)

    def _kernel_slots(self):
        modules = self._modules
        attention = modules["self_attn"]._modules
        structure = [(modules, name) for name in ("self_attn", "input_layernorm", "post_attention_layernorm",
                                                  "gate_proj", "up_proj", "down_proj")]
        structure += [(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        norms = [(modules[name]._parameters, "weight") for name in ("input_layernorm", "post_attention_layernorm")]
        linears = [attention[name] for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [modules[name] for name in ("gate_proj", "up_proj", "down_proj")]
        return norms + linear_slots(linears) + structure

    def _build_kernel_layer(self, values):
        tensors = values[:16]
        # The attention half needs its weights as they are in the checkpoint; the MLP half also
        # the MLP's (a sparse block packs them per neuron, and then runs its own MLP).
        if not kernel_readable(tensors[:10]):
            return None
        mlp_ready = kernel_readable(tensors[10:]) and is_silu(self.act_fn)
        address = addresses(tensors)
        if not mlp_ready:
            address[10:] = [None] * 6
        (attn_norm, mlp_norm, q, q_bias, k, k_bias, v, v_bias, o, o_bias,
         gate, gate_bias, up, up_bias, down, down_bias) = address
        layer = cpu_kernels.LlamaLayer(
            attn_norm=attn_norm, q=q, k=k, v=v, o=o, q_bias=q_bias, k_bias=k_bias, v_bias=v_bias,
            o_bias=o_bias, mlp_norm=mlp_norm, gate=gate, up=up, down=down, gate_bias=gate_bias,
            up_bias=up_bias, down_bias=down_bias, hidden=self.config.hidden_size, heads=self.num_heads,
            kv_heads=self.num_kv_heads, head_dim=self.head_dim, inner=self.config.intermediate_size,
            attn_eps=self.input_layernorm.eps, mlp_eps=self.post_attention_layernorm.eps)
        return layer, ctypes.byref(layer), mlp_ready

    def forward(self, x, layer_past=None, mask=None):
        fused = self.fused_decode(x, layer_past, mask)
        if fused is not None:
            return fused
        token_mask = token_mask_of(mask, x.shape[1])
        x = self.tap("att_x", x, token_mask)
        attn_out, present = self.attention(self.input_layernorm(x), layer_past, mask, token_mask)
        x = self.tap("mlp_x", x + attn_out, token_mask)
        x = x + self.mlp(self.post_attention_layernorm(x), token_mask)
        return x, present


class LlamaLMHead(nn.Module):
    """Final RMSNorm and the output projection (a copy of the embedding when tied)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = DecodeLinear(config.hidden_size, config.vocab_size, bias=False)

    @classmethod
    def from_pretrained(cls, model_path, config=None, dtype=None, device=None):
        config = config or load_config(model_path, LlamaConfig)
        path = os.path.join(model_path, "pytorch_lm_head.pt")
        return build_from_checkpoint(cls, path, dtype=dtype, device=device, config=config)

    def forward(self, x, input_ids=None):
        return self.lm_head(self.norm(x))


# The pipeline engine imports every family under these names.
GPTEmbeddings = LlamaEmbeddings
GPTBlock = LlamaBlock
GPTLMHead = LlamaLMHead

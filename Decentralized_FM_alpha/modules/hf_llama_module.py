"""Llama family (Llama 2/3/3.1/3.2, SmolLM2, ...) as pipeline parts: embeddings, blocks, head.

Differences from OPT that matter here: RMSNorm without bias, RoPE applied to q/k inside
attention (no position embedding), grouped-query attention (the cache holds one entry per
KV head), and a gated SiLU MLP: down(silu(gate(x)) * up(x)).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from dejavu_common.mlp_activations import layer_activation

from .common import (
    CheckpointPart,
    DenseMLP,
    TappedModule,
    cache_geometry,
    extend_cache,
    StepCache,
    tensor_key,
    token_mask_of,
)

_rope_cache = StepCache()  # one step's cos/sin tables, shared by all blocks with equal RoPE

# RoPE types whose frequencies depend on the running sequence length are not supported.
UNSUPPORTED_ROPE_TYPES = ("dynamic", "longrope")


_ROPE_KEYS = {}  # (inverse frequencies, scaling) -> LlamaBlock.rope_key


def rotated(x, cos, signed_sin):
    """RoPE of x [..., head_dim] with LlamaBlock.rope_tables' cos and sign-folded sin:
    rotate_half(x) * sin == roll(x, half) * signed_sin, one op instead of chunk, neg, cat."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


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


class LlamaEmbeddings(CheckpointPart):
    """Token embeddings only: Llama has no position embedding (RoPE lives in attention)."""

    config_class, checkpoint_file = LlamaConfig, "pytorch_embs.pt"

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)

    def forward(self, input_ids, past_layer=None, mask=None):
        return self.embed_tokens(input_ids)


class LlamaAttentionWeights(nn.Module):
    """The four projections; the computation is in LlamaBlock so the taps sit in one place."""

    def __init__(self, config):
        super().__init__()
        d, hd = config.hidden_size, head_dim_of(config)
        bias = getattr(config, "attention_bias", False)
        self.q_proj = nn.Linear(d, config.num_attention_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, d, bias=bias)


class LlamaMLP(DenseMLP):
    """down(act(gate(h)) * up(h)), as transformers' LlamaMLP (block.mlp)."""

    def __init__(self, config, layer_index=None):
        super().__init__()
        d, inner, bias = config.hidden_size, config.intermediate_size, getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(d, inner, bias=bias)
        self.up_proj = nn.Linear(d, inner, bias=bias)
        self.down_proj = nn.Linear(inner, d, bias=bias)
        # config.json's dejavu_mlp_activations may set ReLU for this layer (dejavu_study/relu_control.py)
        self.act_fn = layer_activation(config, layer_index) or ACT2FN[config.hidden_act]

    def activation(self, h):
        return self.act_fn(self.gate_proj(h)) * self.up_proj(h)

    def output(self, act):
        return self.down_proj(act)

    def neuron_linears(self):
        """(gate, up, down, activation): row i of gate and up and column i of down make neuron i."""
        modules = self._modules  # not through Module.__getattr__: sparse decoding asks for every layer
        return modules["gate_proj"], modules["up_proj"], modules["down_proj"], modules.get("act_fn") or self.act_fn


class LlamaBlock(TappedModule):
    """One decoder layer: x + attn(norm(x)), then + mlp(norm(.)); taps at the four points."""

    config_class = LlamaConfig

    def __init__(self, config, layer_index=0):
        super().__init__(config)
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        d = config.hidden_size
        self.input_layernorm = LlamaRMSNorm(d, config.rms_norm_eps)
        self.self_attn = LlamaAttentionWeights(config)
        self.post_attention_layernorm = LlamaRMSNorm(d, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, layer_index)
        self.materialize_buffers()

    def materialize_buffers(self, device=None):
        with torch.device("cpu"):  # also when the block itself is being built on "meta"
            inv_freq, scaling = rope_inverse_frequencies(self.config)
        self.register_buffer("inv_freq", inv_freq.to(device or "cpu"), persistent=False)
        self.rope_scaling = scaling
        # blocks with equal RoPE share cos/sin; a small number, cheap to compare every layer of every step
        self.rope_key = _ROPE_KEYS.setdefault((tuple(inv_freq.tolist()), scaling), len(_ROPE_KEYS))

    def rope(self, positions, dtype):
        """cos, sin [B, 1, S, head_dim] for the given positions [B, S]."""
        return self.rope_tables(positions, dtype)[:2]

    def rope_tables(self, positions, dtype):
        """cos, sin and the sign-folded sin: x * cos + roll(x, head_dim / 2) * signed_sin is RoPE."""
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
        q, k = rotated(q, cos, signed_sin), rotated(k, cos, signed_sin)
        present, k, v = extend_cache(layer_past, k, v)
        heads = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=self.head_dim**-0.5,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # [B, H, S, hd]
        heads = self.tap("head_out", heads.transpose(1, 2), token_mask)  # [B, S, H, hd]
        return weights.o_proj(heads.reshape(batch, seq_len, -1)), present

    def forward(self, x, layer_past=None, mask=None):
        token_mask = token_mask_of(mask, x.shape[1])
        x = self.tap("att_x", x, token_mask)
        attn_out, present = self.attend(self.input_layernorm(x), layer_past, mask, token_mask)
        x = self.tap("mlp_x", x + attn_out, token_mask)
        x = x + self.feed_forward(self.post_attention_layernorm(x), token_mask)
        return x, present


class LlamaLMHead(CheckpointPart):
    """Final RMSNorm and the output projection (a copy of the embedding when tied)."""

    config_class, checkpoint_file = LlamaConfig, "pytorch_lm_head.pt"

    def __init__(self, config):
        super().__init__(config)
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def features(self, x):
        """What the vocabulary projection (lm_head) reads."""
        return self.norm(x)

    def forward(self, x, input_ids=None):
        return self.lm_head(self.features(x))


# The pipeline engine imports every family under these names.
GPTEmbeddings = LlamaEmbeddings
GPTBlock = LlamaBlock
GPTLMHead = LlamaLMHead

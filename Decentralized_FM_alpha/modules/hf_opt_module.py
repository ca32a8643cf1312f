"""OPT family as pipeline parts: embeddings, blocks, head.

Learned absolute positions (offset 2) added at the embedding, LayerNorm with bias, biased
projections, ReLU MLP. Pre-LN (125m, 1.3b, ...) and post-LN with project_in/project_out (350m).
"""

import ctypes
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import OPTConfig
from transformers.activations import ACT2FN

from . import cpu_kernels
from .sparse_gather import DecodeLinear, addresses, cached_view, is_relu, kernel_readable, linear_slots
from .common import (
    TappedModule,
    build_from_checkpoint,
    cache_geometry,
    extend_cache,
    fusable_step,
    kernel_step,
    load_config,
    past_length,
    token_mask_of,
)

POSITION_OFFSET = 2  # OPT reserves the first two rows of its position table


def has_final_layer_norm(config):
    return config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)


def projects_embeddings(config):
    return config.word_embed_proj_dim != config.hidden_size


class OPTEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.word_embed_proj_dim)
        self.embed_positions = nn.Embedding(
            config.max_position_embeddings + POSITION_OFFSET, config.hidden_size
        )
        if projects_embeddings(config):
            self.project_in = DecodeLinear(config.word_embed_proj_dim, config.hidden_size, bias=False)
        else:
            self.project_in = None

    @classmethod
    def from_pretrained(cls, model_path, config=None, dtype=None, device=None):
        config = config or load_config(model_path, OPTConfig)
        path = os.path.join(model_path, "pytorch_embs.pt")
        return build_from_checkpoint(cls, path, dtype=dtype, device=device, config=config)

    def forward(self, input_ids, past_layer=None, mask=None):
        past_len = past_length(past_layer)
        seq_len = input_ids.shape[1]
        if mask is None:
            positions = torch.arange(past_len, past_len + seq_len, device=input_ids.device)[None]
        else:
            # As transformers: padding gets position -1 (row 1 after the offset).
            mask = mask.long()
            positions = (mask.cumsum(-1) * mask - 1)[:, past_len : past_len + seq_len]
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        return x + self.embed_positions(positions + POSITION_OFFSET)


class OPTAttentionWeights(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, bias = config.hidden_size, getattr(config, "enable_bias", True)
        self.q_proj = DecodeLinear(d, d, bias=bias)
        self.k_proj = DecodeLinear(d, d, bias=bias)
        self.v_proj = DecodeLinear(d, d, bias=bias)
        self.out_proj = DecodeLinear(d, d, bias=bias)


class OPTBlock(TappedModule):
    """One decoder layer, pre-LN or post-LN as the config says; taps at the four points.

    `mlp_x` is the residual stream entering the MLP half: before final_layer_norm when
    pre-LN, after self_attn_layer_norm when post-LN (that normed sum is OPT-350m's residual).
    """

    def __init__(self, config, layer_index=0):
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.norm_first = config.do_layer_norm_before
        d, bias = config.hidden_size, getattr(config, "enable_bias", True)
        affine = getattr(config, "layer_norm_elementwise_affine", True)
        self.self_attn = OPTAttentionWeights(config)
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.fc1 = DecodeLinear(d, config.ffn_dim, bias=bias)
        self.fc2 = DecodeLinear(config.ffn_dim, d, bias=bias)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.act_fn = ACT2FN[config.activation_function]

    @classmethod
    def from_pretrained(cls, model_path, config=None, layer_index=0, dtype=None, device=None):
        config = config or load_config(model_path, OPTConfig)
        path = os.path.join(model_path, f"pytorch_{layer_index}.pt")
        return build_from_checkpoint(
            cls, path, dtype=dtype, device=device, config=config, layer_index=layer_index
        )

    def attention(self, h, layer_past, mask, token_mask):
        batch, seq_len, _ = h.shape
        weights = self.self_attn

        def split_heads(t):
            return t.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = split_heads(weights.q_proj(h)), split_heads(weights.k_proj(h)), split_heads(weights.v_proj(h))
        _, allowed = cache_geometry(layer_past, mask, seq_len, h.device)
        present, k, v = extend_cache(layer_past, k, v)
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.head_dim**-0.5)
        heads = self.tap("head_out", heads.transpose(1, 2), token_mask)  # [B, S, H, hd]
        return weights.out_proj(heads.reshape(batch, seq_len, -1)), present

    def mlp_activation(self, h):
        return self.act_fn(self.fc1(h))

    def mlp(self, h, token_mask):
        return self.mlp_output(self.tap("mlp_act", self.mlp_activation(h), token_mask))

    def mlp_output(self, act):
        return self.fc2(act)

    def neuron_linears(self):
        """(first, second, output, activation) of the MLP, as the gathered kernels take them."""
        modules = self._modules  # not through Module.__getattr__: this runs for every layer of every token
        act_fn = modules.get("act_fn") or self.act_fn  # a module, or a plain function
        return modules["fc1"], None, modules["fc2"], act_fn

    def fused_decode(self, x, layer_past, mask):
        """(x, present) for one token at batch 1 in one call of the C decoder layer, or None
        where it does not apply (not float32 on CPU, no KVCache yet, taps or autograd in use,
        not ReLU, kernels off): then the torch ops below run instead, with the same numbers."""
        if type(self).tap is not TappedModule.tap or not fusable_step(x, layer_past):
            return None
        lib = cpu_kernels.kernel_library()
        layer = self.kernel_layer() if lib is not None else None
        if layer is None:
            return None
        x, out, present, cache, valid = kernel_step(x, layer_past, mask)
        status = lib.dejavu_opt_decode_layer(layer[1], x.data_ptr(), out.data_ptr(), *cache, valid,
                                             self.head_dim**-0.5)
        if status:
            raise RuntimeError(f"layer {self.layer_index}: the C decoder layer refused its input (status {status})")
        return out, present

    def kernel_layer(self):
        """(cpu_kernels.OptLayer, a reference to it) for this layer's weights, or None where the
        kernel cannot read them."""
        # the slots: the 16 tensors the struct points at, then the modules they hang on
        return cached_view(self, "_kernel_layer", (), self._kernel_slots, self._build_kernel_layer)

    def _kernel_slots(self):
        modules = self._modules
        attention = modules["self_attn"]._modules
        structure = [(modules, name) for name in ("self_attn", "self_attn_layer_norm", "final_layer_norm", "fc1", "fc2")]
        structure += [(attention, name) for name in ("q_proj", "k_proj", "v_proj", "out_proj")]
        norms = [(modules[norm]._parameters, name) for norm in ("self_attn_layer_norm", "final_layer_norm")
                 for name in ("weight", "bias")]
        linears = [attention[name] for name in ("q_proj", "k_proj", "v_proj", "out_proj")]
        linears += [modules["fc1"], modules["fc2"]]
        return norms + linear_slots(linears) + structure

    def _build_kernel_layer(self, values):
        tensors = values[:16]
        if not (is_relu(self.act_fn) and kernel_readable(tensors)):
            return None
        (attn_norm, attn_norm_bias, mlp_norm, mlp_norm_bias, q, q_bias, k, k_bias, v, v_bias, o, o_bias,
         fc1, fc1_bias, fc2, fc2_bias) = addresses(tensors)
        layer = cpu_kernels.OptLayer(
            attn_norm=attn_norm, attn_norm_bias=attn_norm_bias, q=q, k=k, v=v, o=o, q_bias=q_bias,
            k_bias=k_bias, v_bias=v_bias, o_bias=o_bias, mlp_norm=mlp_norm, mlp_norm_bias=mlp_norm_bias,
            fc1=fc1, fc2=fc2, fc1_bias=fc1_bias, fc2_bias=fc2_bias, hidden=self.config.hidden_size,
            heads=self.num_heads, head_dim=self.head_dim, inner=self.config.ffn_dim,
            norm_first=int(self.norm_first), attn_eps=self.self_attn_layer_norm.eps, mlp_eps=self.final_layer_norm.eps)
        return layer, ctypes.byref(layer)

    def forward(self, x, layer_past=None, mask=None):
        fused = self.fused_decode(x, layer_past, mask)
        if fused is not None:
            return fused
        token_mask = token_mask_of(mask, x.shape[1])
        x = self.tap("att_x", x, token_mask)
        h = self.self_attn_layer_norm(x) if self.norm_first else x
        attn_out, present = self.attention(h, layer_past, mask, token_mask)
        x = x + attn_out
        if not self.norm_first:
            x = self.self_attn_layer_norm(x)
        x = self.tap("mlp_x", x, token_mask)
        h = self.final_layer_norm(x) if self.norm_first else x
        x = x + self.mlp(h, token_mask)
        if not self.norm_first:
            x = self.final_layer_norm(x)
        return x, present


class OPTLMHead(nn.Module):
    """Decoder's final LayerNorm (pre-LN only), project_out (if any), then the vocabulary."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        d = config.hidden_size
        affine = getattr(config, "layer_norm_elementwise_affine", True)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine) if has_final_layer_norm(config) else None
        if projects_embeddings(config):
            self.project_out = DecodeLinear(d, config.word_embed_proj_dim, bias=False)
        else:
            self.project_out = None
        self.lm_head = DecodeLinear(config.word_embed_proj_dim, config.vocab_size, bias=False)

    @classmethod
    def from_pretrained(cls, model_path, config=None, dtype=None, device=None):
        config = config or load_config(model_path, OPTConfig)
        path = os.path.join(model_path, "pytorch_lm_head.pt")
        return build_from_checkpoint(cls, path, dtype=dtype, device=device, config=config)

    def forward(self, x, input_ids=None):
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return self.lm_head(x)


GPTEmbeddings = OPTEmbeddings
GPTBlock = OPTBlock
GPTLMHead = OPTLMHead

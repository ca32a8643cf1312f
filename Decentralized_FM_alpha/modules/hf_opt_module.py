"""OPT family as pipeline parts: embeddings, blocks, head.

Learned absolute positions (offset 2) added at the embedding, LayerNorm with bias, biased
projections, ReLU MLP. Pre-LN (125m, 1.3b, ...) and post-LN with project_in/project_out (350m).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import OPTConfig
from transformers.activations import ACT2FN

from .common import (
    CheckpointPart,
    DenseMLP,
    TappedModule,
    cache_geometry,
    extend_cache,
    past_length,
    token_mask_of,
)

POSITION_OFFSET = 2  # OPT reserves the first two rows of its position table


def has_final_layer_norm(config):
    return config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)


def projects_embeddings(config):
    return config.word_embed_proj_dim != config.hidden_size


class OPTEmbeddings(CheckpointPart):
    config_class, checkpoint_file = OPTConfig, "pytorch_embs.pt"

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.word_embed_proj_dim)
        self.embed_positions = nn.Embedding(
            config.max_position_embeddings + POSITION_OFFSET, config.hidden_size
        )
        if projects_embeddings(config):
            self.project_in = nn.Linear(config.word_embed_proj_dim, config.hidden_size, bias=False)
        else:
            self.project_in = None

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
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.out_proj = nn.Linear(d, d, bias=bias)


class OPTMLP(DenseMLP):
    """fc2(act(fc1(h))) (block.mlp)."""

    def __init__(self, config):
        super().__init__()
        d, bias = config.hidden_size, getattr(config, "enable_bias", True)
        self.fc1 = nn.Linear(d, config.ffn_dim, bias=bias)
        self.fc2 = nn.Linear(config.ffn_dim, d, bias=bias)
        self.act = ACT2FN[config.activation_function]

    def activation(self, h):
        return self.act(self.fc1(h))

    def output(self, act):
        return self.fc2(act)

    def neuron_linears(self):
        """(fc1, None, fc2, activation): row i of fc1 and column i of fc2 make neuron i."""
        modules = self._modules  # not through Module.__getattr__: sparse decoding asks for every layer
        return modules["fc1"], None, modules["fc2"], modules.get("act") or self.act


class OPTBlock(TappedModule):
    """One decoder layer, pre-LN or post-LN as the config says; taps at the four points.

    `mlp_x` is the residual stream entering the MLP half: before final_layer_norm when
    pre-LN, after self_attn_layer_norm when post-LN (that normed sum is OPT-350m's residual).
    """

    config_class = OPTConfig

    def __init__(self, config, layer_index=0):
        super().__init__(config)
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.norm_first = config.do_layer_norm_before
        d = config.hidden_size
        affine = getattr(config, "layer_norm_elementwise_affine", True)
        self.self_attn = OPTAttentionWeights(config)
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.mlp = OPTMLP(config)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)

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

    def forward(self, x, layer_past=None, mask=None):
        token_mask = token_mask_of(mask, x.shape[1])
        x = self.tap("att_x", x, token_mask)
        h = self.self_attn_layer_norm(x) if self.norm_first else x
        attn_out, present = self.attend(h, layer_past, mask, token_mask)
        x = x + attn_out
        if not self.norm_first:
            x = self.self_attn_layer_norm(x)
        x = self.tap("mlp_x", x, token_mask)
        h = self.final_layer_norm(x) if self.norm_first else x
        x = x + self.feed_forward(h, token_mask)
        if not self.norm_first:
            x = self.final_layer_norm(x)
        return x, present


class OPTLMHead(CheckpointPart):
    """Decoder's final LayerNorm (pre-LN only), project_out (if any), then the vocabulary."""

    config_class, checkpoint_file = OPTConfig, "pytorch_lm_head.pt"

    def __init__(self, config):
        super().__init__(config)
        d = config.hidden_size
        affine = getattr(config, "layer_norm_elementwise_affine", True)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine) if has_final_layer_norm(config) else None
        if projects_embeddings(config):
            self.project_out = nn.Linear(d, config.word_embed_proj_dim, bias=False)
        else:
            self.project_out = None
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)

    def features(self, x):
        """What the vocabulary projection (lm_head) reads."""
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def forward(self, x, input_ids=None):
        return self.lm_head(self.features(x))


GPTEmbeddings = OPTEmbeddings
GPTBlock = OPTBlock
GPTLMHead = OPTLMHead

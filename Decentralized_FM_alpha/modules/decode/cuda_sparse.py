"""DejaVu's predicted MLP and sparse heads on CUDA through the Triton kernels (triton_sparse.py).

One decoding token per row: the predictor (cuBLAS), top-K per row, then the kept neurons' rows of
gate/up (fc1) and of down (fc2) transposed, read once for all rows. At batch > 1 the rows share
one kept set, the union of their top-K (upstream DejaVu's rule), in its fixed-size form
(triton_sparse.padded_union) so the step stays capturable as a CUDA graph; each row then also
gets the neurons the other rows kept, so batch > 1 is not the per-row masked MLP of the torch
path. The down (fc2) weight is laid out transposed once (lay_out_for_gather) so that a kept
neuron's column is one contiguous row; its values, shape and state-dict key stay those of the
Linear.

Sparse heads (Llama and OPT; the predicted mode's head kernel, through SparseTaps.attention_step): q of the kept
heads only (their rows of q_proj), k and v dense (the cache needs every KV head), attention, each
row's dropped heads zeroed, then the output projection (o_proj, OPT's out_proj) on the kept
heads' columns (its weight laid out transposed like down). At batch > 1 q and the output
projection read the union of the rows' kept heads (fixed size, as for the MLP), but each row's
output is exactly the masked torch path's: a row's dropped heads are zeroed before the output
projection. The families differ only in how q, k and v are made (_HEADS_FAMILIES): Llama rotates
q and k (RoPE) and may share KV heads (GQA); OPT has neither.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..common import cache_geometry, extend_cache
from ..hf_llama_module import rotated
from . import triton_sparse


def usable(h):
    """Whether the Triton path runs for h: CUDA, triton importable, no autograd."""
    return h.is_cuda and not torch.is_grad_enabled() and triton_sparse.available(h)


def lay_out_for_gather(output):
    """Store output.weight [d, I] as the transposed view of a contiguous [I, d] buffer (same
    values and key): output.weight.t() is then the row-major table the gather kernel reads.
    CUDA weights only; returns whether it did."""
    if not output.weight.is_cuda:
        return False
    store_transposed(output)
    return True


def store_transposed(linear):
    """linear.weight [out, in] re-stored as the transposed view of a contiguous [in, out] buffer,
    on any device (same values, shape and key); nothing to do where it already is."""
    weight = linear.weight
    if weight.t().is_contiguous():
        return
    with torch.no_grad():
        linear.weight = nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=weight.requires_grad)


def predicted_mlp(h, x_pred, predictor, k, first, second, output, act_fn, predictor_scores):
    """h, x_pred [B, 1, *] -> [B, 1, d] through the Triton kernels, or None where they do not
    apply (then the caller's torch path runs). `predictor_scores(predictor, x)` scores any
    predictor; a bias-free two-Linear one runs inside triton_sparse.predict_neurons."""
    if not usable(h) or not output.weight.t().is_contiguous():
        return None
    activation = "silu_glu" if second is not None else "relu"
    rows_in = x_pred[:, 0]
    if _two_linears(predictor):
        neurons = triton_sparse.predict_neurons(rows_in, predictor, k, fixed_size=True)
    else:
        top = predictor_scores(predictor, x_pred)[:, 0].topk(k, dim=-1, sorted=False).indices
        neurons = top[0].sort().values if top.shape[0] == 1 else triton_sparse.padded_union(top, first.out_features)
    out = triton_sparse.sparse_mlp(h[:, 0], neurons, first.weight, None if second is None else second.weight,
                                   output.weight.t(), activation, first.bias,
                                   None if second is None else second.bias, output.bias)
    return out[:, None]


def _two_linears(predictor):
    layers = list(predictor) if isinstance(predictor, nn.Sequential) else []
    return len(layers) == 2 and all(isinstance(layer, nn.Linear) and layer.bias is None for layer in layers)


# ---- DejaVu's sparse heads (Llama and OPT) ------------------------------------------------------
def heads_usable(block, h):
    """Whether sparse_heads_attention runs for a block's decoding input h [B, 1, d]: a Llama or OPT
    block, the Triton path usable, its output projection laid out transposed (lay_out_o_proj)."""
    output = output_projection(block)
    return h.shape[1] == 1 and output is not None and usable(h) and output.weight.t().is_contiguous()


def output_projection(block):
    """The Linear from the heads back to d: o_proj (Llama) or out_proj (OPT); None for neither."""
    family = _heads_family(block)
    return None if family is None else getattr(block.self_attn, family[0])


def lay_out_o_proj(block):
    """The output projection's weight [d, H*hd] (o_proj, OPT's out_proj) stored transposed
    (lay_out_for_gather) so that a kept head's columns are contiguous rows of weight.t() [H*hd, d].
    Blocks with neither are left as they are. Returns whether it did."""
    output = output_projection(block)
    return output is not None and lay_out_for_gather(output)


def padded_kept_heads(keep, k):
    """keep [B, H] bool (k heads per row) -> [min(B*k, H)] int64: the heads any row keeps, sorted,
    then the sentinel H in the slots left over (triton_sparse.padded_union's form). Fixed size,
    no sync: capturable in a CUDA graph. Batch 1: exactly that row's k heads."""
    return triton_sparse.padded_indices(keep.any(dim=0), min(keep.shape[0] * k, keep.shape[1]))


def sparse_heads_attention(block, h, layer_past, mask, keep, k):
    """A Llama or OPT block's attention for one decoding token per row, reading only the kept
    heads' rows of q_proj and columns of the output projection: h [B, 1, d], keep [B, 1, H] bool
    (each row's kept heads, k per row) -> (out [B, 1, d], present).

    Equals the block's attention with the heads a row did not keep zeroed before the output
    projection (the head_out tap of sparse execution). q is computed for the heads any row keeps
    (the padded union, padded_kept_heads); k and v stay dense, since the cache must hold every
    KV head. The attention runs over all H head slots with the other heads' q zero, so each KV
    head's cache is read once as in the dense step; each row's own dropped heads are then zeroed,
    and the output projection reads the kept heads' columns only."""
    family = _heads_family(block)
    if family is None:
        raise TypeError(f"{type(block).__name__}: sparse heads need a Llama (o_proj) or OPT (out_proj) block")
    output_name, queries_keys_values = family
    keep = keep[:, 0]
    heads = padded_kept_heads(keep, k)
    positions, allowed = cache_geometry(layer_past, mask, 1, h.device)
    q, k_new, v_new = queries_keys_values(block, h, heads, positions)  # [B, H, 1, hd], [B, KV, 1, hd] x2
    present, keys, values = extend_cache(layer_past, k_new, v_new)
    attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=block.head_dim**-0.5,
                                              enable_gqa=keys.shape[1] != q.shape[1])  # [B, H, 1, hd]
    kept = _kept_outputs(attended[:, :, 0], heads, keep)  # [B, R*hd]
    output = getattr(block.self_attn, output_name)
    out = triton_sparse.gather_head_columns(kept, output.weight.t(), heads, block.head_dim, output.bias)
    return out[:, None], present


def _llama_queries_keys_values(block, h, heads, positions):
    """As LlamaBlock.attention: the kept heads' q and the dense new k, v over num_kv_heads (GQA),
    q and k rotated (RoPE) at positions [B, 1]."""
    q, k_new, v_new = _kept_q_dense_kv(block.self_attn, h, heads, block.num_heads, block.num_kv_heads,
                                       block.head_dim)
    cos, _, signed_sin = block.rope_tables(positions, h.dtype)
    return rotated(q, cos, signed_sin), rotated(k_new, cos, signed_sin), v_new


def _opt_queries_keys_values(block, h, heads, positions):
    """As OPTBlock.attention: the kept heads' q and the dense new k, v, biases included; no RoPE
    (positions are added at the embedding) and no GQA. q is not scaled here: OPTBlock scales by
    head_dim^-0.5 inside the attention, as sparse_heads_attention does."""
    return _kept_q_dense_kv(block.self_attn, h, heads, block.num_heads, block.num_heads, block.head_dim)


# the output projection's name and the family's q, k, v step
_HEADS_FAMILIES = (("o_proj", _llama_queries_keys_values), ("out_proj", _opt_queries_keys_values))


def _heads_family(block):
    """(output projection name, q/k/v step) of a Llama or OPT block, else None."""
    weights = getattr(block, "self_attn", None)
    for output_name, queries_keys_values in _HEADS_FAMILIES:
        if isinstance(getattr(weights, output_name, None), nn.Linear):
            return output_name, queries_keys_values
    return None


def _kept_q_dense_kv(weights, h, heads, n_heads, n_kv_heads, head_dim):
    """h [B, 1, d] -> q [B, H, 1, hd] of the kept heads (zero elsewhere, _kept_queries) and the new
    k, v [B, KV, 1, hd], dense: the cache holds every KV head."""
    batch = h.shape[0]
    q = _kept_queries(h[:, 0], weights.q_proj, heads, n_heads, head_dim)
    k_new = weights.k_proj(h).view(batch, 1, n_kv_heads, head_dim).transpose(1, 2)
    v_new = weights.v_proj(h).view(batch, 1, n_kv_heads, head_dim).transpose(1, 2)
    return q, k_new, v_new


def _kept_queries(x, q_proj, heads, n_heads, head_dim):
    """x [B, d], heads [R] (sentinel n_heads pads) -> q [B, H, 1, hd]: the kept heads' rows of
    q_proj through the gather kernel, zero at every other head."""
    batch = x.shape[0]
    q_kept = triton_sparse.gather_head_rows(x, q_proj.weight, heads, head_dim, q_proj.bias)
    q = x.new_zeros(batch, n_heads + 1, head_dim)  # slot n_heads takes the padding heads
    q.index_copy_(1, heads, q_kept.view(batch, -1, head_dim))
    return q[:, :n_heads, None]


def _kept_outputs(attended, heads, keep):
    """attended [B, H, hd], heads [R], keep [B, H] -> [B, R*hd]: the heads' outputs in heads'
    order, zero where a row did not keep the head (and at padding slots)."""
    batch, n_heads, head_dim = attended.shape
    padded = torch.cat((attended, attended.new_zeros(batch, 1, head_dim)), dim=1)
    row_keep = torch.cat((keep, keep.new_zeros(batch, 1)), dim=1).index_select(1, heads)  # [B, R]
    kept = padded.index_select(1, heads) * row_keep[..., None].to(attended.dtype)
    return kept.reshape(batch, -1)

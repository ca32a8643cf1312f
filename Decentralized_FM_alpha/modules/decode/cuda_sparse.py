"""DejaVu's predicted MLP on CUDA through the Triton kernels (triton_sparse.py).

One decoding token per row: the predictor (cuBLAS), top-K per row, then the kept neurons' rows of
gate/up (fc1) and of down (fc2) transposed, read once for all rows. At batch > 1 the rows share
one kept set, the union of their top-K (upstream DejaVu's rule), in its fixed-size form
(triton_sparse.padded_union) so the step stays capturable as a CUDA graph; each row then also
gets the neurons the other rows kept, so batch > 1 is not the per-row masked MLP of the torch
path. The down (fc2) weight is laid out transposed once (lay_out_for_gather) so that a kept
neuron's column is one contiguous row; its values, shape and state-dict key stay those of the
Linear.
"""

import torch
from torch import nn

from . import triton_sparse


def usable(h):
    """Whether the Triton path runs for h: CUDA, triton importable, no autograd."""
    return h.is_cuda and not torch.is_grad_enabled() and triton_sparse.available(h)


def lay_out_for_gather(output):
    """Store output.weight [d, I] as the transposed view of a contiguous [I, d] buffer (same
    values and key): output.weight.t() is then the row-major table the gather kernel reads.
    CUDA weights only; returns whether it did."""
    weight = output.weight
    if not weight.is_cuda or weight.t().is_contiguous():
        return weight.is_cuda
    with torch.no_grad():
        output.weight = nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=weight.requires_grad)
    return True


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
        top = predictor_scores(predictor, x_pred)[:, 0].topk(k, dim=-1).indices
        neurons = top[0].sort().values if top.shape[0] == 1 else triton_sparse.padded_union(top, first.out_features)
    out = triton_sparse.sparse_mlp(h[:, 0], neurons, first.weight, None if second is None else second.weight,
                                   output.weight.t(), activation, first.bias,
                                   None if second is None else second.bias, output.bias)
    return out[:, None]


def _two_linears(predictor):
    layers = list(predictor) if isinstance(predictor, nn.Sequential) else []
    return len(layers) == 2 and all(isinstance(layer, nn.Linear) and layer.bias is None for layer in layers)

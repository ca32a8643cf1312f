"""Decode backends: the ways a stage runs its blocks, chosen in one place (choose_backend).

  torch  the reference: the model files' torch ops over a growing KV cache, C kernels off;
  cpu    the same, with the C decode kernels (float32, batch 1, CPU; ../cpu_kernels.py);
  cuda   a static KV cache of fixed capacity whose decoding step is captured once as a CUDA
         graph and replayed per token; DejaVu's sparse MLP and heads through Triton kernels
         (triton_sparse.py). Off CUDA it runs the same static-cache step eagerly (tests).

Every backend gives a stage object (stages.py) with prefill(x, mask) for the prompt and
decode(x, mask) for one token per row; the model files hold the maths only.
"""

from .stages import (BACKEND_CHOICES, BACKENDS, Backend, BackendError, DynamicCacheStage,  # noqa: F401
                     StagePool, StaticCacheStage, choose_backend)

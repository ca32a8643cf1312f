"""Decode backends: the ways a stage runs its blocks, chosen in one place (backends.choose_backend).

  torch  the reference: the model files' torch ops over a growing KV cache, C kernels off;
  cpu    the same, with the C decode kernels where a step is one float32 token at batch 1 on
         the CPU (cpu.py: a block's step; cpu_views.py: the kernels' views of its weights;
         sparse_gather.py: single-row products; huge_pages.py: where its weights live);
  cuda   a static KV cache of fixed capacity whose decoding step is captured once as a CUDA
         graph and replayed per token; DejaVu's sparse MLP through Triton kernels
         (cuda_sparse.py, triton_sparse.py). Off CUDA it runs the same static-cache step eagerly.

A backend prepares the modules it runs (Backend.prepare) and gives a stage object (stages.py)
with prefill(x, mask) for the prompt and decode(x, mask) for one token per row; the model
files hold the maths only.
"""

from .backends import BACKEND_CHOICES, BACKENDS, Backend, choose_backend  # noqa: F401
from .plan import DecodePlan, active_plan  # noqa: F401
from .stages import BackendError, DynamicCacheStage, StagePool, StaticCacheStage  # noqa: F401

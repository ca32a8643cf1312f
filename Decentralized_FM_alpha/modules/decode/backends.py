"""The decode backends, and the one place that chooses among them (choose_backend)."""

from dataclasses import dataclass
from typing import Callable

import torch

from .cpu import CpuPlan
from .stages import BackendError, CudaPlan, TorchPlan


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    plan_class: Callable  # DecodePlan(backend, blocks)
    static_cache: bool = False  # static KV caches, each decoding step one CUDA graph replay (cuda)

    def prepare(self, blocks):
        """A new DecodePlan of this backend for the blocks as they are set up now (plan.py)."""
        return self.plan_class(self, blocks)


BACKENDS = {
    "torch": Backend("torch", "the model files' torch ops over a growing KV cache (the reference)", TorchPlan),
    "cpu": Backend("cpu", "the C decode kernels where they apply (float32 batch-1 decoding on the CPU), "
                          "else torch ops", CpuPlan),
    "cuda": Backend("cuda", "a static KV cache, each decoding step one CUDA graph replay (eager off CUDA)",
                    CudaPlan, static_cache=True),
}
BACKEND_CHOICES = ("auto", *BACKENDS)


def choose_backend(name, device):
    """The Backend for --decode-backend `name` on `device`: auto is cuda on a CUDA device, else cpu."""
    device = torch.device(device)
    if name in (None, "auto"):
        name = "cuda" if device.type == "cuda" else "cpu"
    if name not in BACKENDS:
        raise BackendError(f"--decode-backend {name!r}: known backends are {', '.join(BACKEND_CHOICES)}")
    if name == "cpu" and device.type != "cpu":
        raise BackendError(f"--decode-backend cpu runs on the CPU, not on {device}")
    return BACKENDS[name]

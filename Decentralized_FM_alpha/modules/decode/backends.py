"""The decode backends, and the one place that chooses among them (choose_backend)."""

from dataclasses import dataclass

import torch

from . import cpu
from .stages import BackendError, DynamicCacheStage, StaticCacheStage


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    kernels: bool = False  # the C decode kernels run its decoding steps and one-row products (cpu)
    static_cache: bool = False  # static KV caches, each decoding step one CUDA graph replay (cuda)

    def prepare(self, *modules):
        """Ready the modules it runs (None skipped): the cpu backend copies their CPU weights into
        huge pages and gives their nn.Linears the one-row kernel; the others give back plain
        nn.Linears (cpu.prepare_modules / release_modules)."""
        parts = [module for module in modules if module is not None]
        (cpu.prepare_modules if self.kernels else cpu.release_modules)(*parts)

    def running(self):
        """The context its steps run in: the C kernels on (cpu) or off (the others)."""
        return cpu.kernels_enabled(self.kernels)

    def run_block(self, block, x, layer_past, mask):
        """(x, present) of one block over a growing KV cache: through the C kernels where they
        apply (cpu), else the block's forward."""
        if self.kernels:
            stepped = cpu.cpu_step(block, x, layer_past, mask)
            if stepped is not None:
                return stepped
        return block(x, layer_past=layer_past, mask=mask)

    def new_stage(self, blocks, batch, capacity, device):
        """A stage object for one batch of `batch` rows and at most `capacity` positions."""
        if self.static_cache:
            return StaticCacheStage(blocks, batch, capacity, device)
        return DynamicCacheStage(blocks, self)


BACKENDS = {
    "torch": Backend("torch", "the model files' torch ops over a growing KV cache (the reference)"),
    "cpu": Backend("cpu", "the C decode kernels where they apply (float32 batch-1 decoding on the CPU), "
                          "else torch ops", kernels=True),
    "cuda": Backend("cuda", "a static KV cache, each decoding step one CUDA graph replay (eager off CUDA)",
                    static_cache=True),
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

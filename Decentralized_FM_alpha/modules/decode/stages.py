"""A stage's blocks over their KV caches, as each decode backend runs them (see __init__.py).

DynamicCacheStage (torch, cpu): each block run by its plan (DecodePlan.run_block: the cpu
backend's C kernels where they apply, else the block's forward) over KV caches grown per token.
StaticCacheStage (cuda): static caches (common.StaticKVCache) sized for prompt + new tokens.
Its decoding step reads the token's position, cache slot and key mask from tensors
(common.StaticDecodeState), never from Python numbers, so on CUDA the step is captured once
as a CUDA graph and replayed: on an H100 the eager engine spent most of each token launching
kernels from Python (about 16% of the memory bound at Llama-3.2-1B dims, batch 1). Off CUDA the
same step runs eagerly, which is how tests compare it with the dynamic cache on the CPU.
"""

import logging

import torch

from ..common import StaticDecodeState, StaticKVCache, forget_step_caches
from .plan import DecodePlan

logger = logging.getLogger(__name__)


class BackendError(ValueError):
    pass


class DynamicCacheStage:
    """The plan's blocks, each run by the plan (DecodePlan.run_block), one KV cache per block grown
    per token (common.KVCache). With `decoding_steps` (the cpu backend's cpu.DecodingSteps), a
    sequence's decoding steps go through it: each block's kernel step is prepared at the first
    token after the prompt and reused; decoding_steps.run(x, caches, mask) runs one."""

    def __init__(self, plan, decoding_steps=None):
        self.plan, self.blocks = plan, plan.blocks
        self.caches = [None] * len(self.blocks)
        self.decoding_steps = decoding_steps
        self.decoding = False  # a sequence's decoding steps have begun

    @property
    def first_cache(self):
        """What the embeddings read as `past_layer` (OPT's positions count the cached tokens)."""
        return self.caches[0] if self.caches else None

    def _run(self, x, mask):
        run_block, shared = self.plan.run_block, {}
        with self.plan.running():
            for index, block in enumerate(self.blocks):
                x, self.caches[index] = run_block(block, x, self.caches[index], mask, shared)
        return x

    def prefill(self, x, mask):
        if self.decoding_steps is not None and self.decoding:
            self.decoding_steps.reset()  # a new sequence: its steps are prepared afresh
        self.decoding = False
        return self._run(x, mask)

    def decode(self, x, mask):
        if self.decoding_steps is None:
            return self._run(x, mask)
        self.decoding = True
        with self.plan.running():
            return self.decoding_steps.run(x, self.caches, mask)


class StaticCacheStage:
    """The blocks over static KV caches of `capacity` positions for `batch` rows; on CUDA each
    decoding step replays one CUDA graph (captured at the first token) unless use_graph is False.

    The graph holds the blocks' whole step, sparse selection included: the predictor, top-K and
    the gathered MLP have fixed shapes at a fixed K. Per-call statistics (--sparse-stats) are
    Python work a replay skips, so a stage that counts runs eagerly."""

    def __init__(self, plan, batch, capacity, device, use_graph=None):
        self.plan, self.blocks = plan, plan.blocks
        device = torch.device(device)
        self.state = StaticDecodeState(batch, capacity, device)
        self.caches = [StaticKVCache(self.state) for _ in self.blocks]
        counting = any(getattr(block.taps, "stats", None) is not None for block in self.blocks)
        if use_graph is None:
            use_graph = device.type == "cuda" and not counting
        if use_graph and counting:
            logger.info("--sparse-stats counts per call: the decoding step runs eagerly, not as a CUDA graph")
            use_graph = False
        self.use_graph = use_graph
        self.graph = self.static_x = self.static_out = None

    @property
    def first_cache(self):
        return self.caches[0] if self.caches else None

    def _run(self, x, mask=None):
        forget_step_caches()  # values shared between layers are computed (and captured) afresh
        with self.plan.running():
            for block, cache in zip(self.blocks, self.caches):
                x, _ = block(x, layer_past=cache, mask=mask)
        return x

    def reset(self):
        """Ready for the next batch of the same size: the caches and the graph are kept (the
        graph replays on the same buffers); the state says nothing is written."""
        self.state.reset()

    def prefill(self, x, mask):
        """The prompt [B, S] in eager torch ops, written to the caches' first S slots."""
        if self.state.decoding:
            raise BackendError("a static-cache stage takes one prompt; reset() it for the next batch")
        x = self._run(x, mask)
        self.state.prompt_done(mask, x.shape[1])
        return x

    def decode(self, x, mask=None):
        """One token per row, x [B, 1, d]; `mask` is not read (the state holds the key mask)."""
        self.state.begin_token()
        if not self.use_graph:
            out = self._run(x)
        else:
            if self.graph is None:
                self._capture(x)
            self.static_x.copy_(x)
            self.graph.replay()
            out = self.static_out.clone()  # the next replay overwrites static_out
        self.state.end_token()
        return out

    def _capture(self, x):
        """Warm up on a side stream (first-call allocations and autotuning stay out of the graph),
        then record one step. Writing this token's cache slot again with the same inputs writes
        the same values, so the warm-up and the capture leave the caches as one step would."""
        self.static_x = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(self.static_x)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self._run(self.static_x)


def configuration_of(blocks):
    """What a captured step has baked in besides its buffers: each block's sparse settings and
    predictors (a CUDA graph replays the K and the weights it was captured with): what the
    configuration() of its taps and MLP report (sparse execution), else None."""
    parts = []
    for block in blocks:
        for part in (block.taps, block.mlp):
            describe = getattr(part, "configuration", None)
            parts.append(None if describe is None else describe())
    return tuple(parts)


class StagePool:
    """The stages of one plan, reused across batches: a static-cache stage (and its CUDA graph:
    capturing one costs about three eager steps) serves every later batch with the same rows and
    capacity (rounded up to CAPACITY_STEP positions) while the blocks' configuration is
    unchanged. At most `size` are kept (their KV caches hold memory)."""

    CAPACITY_STEP = 128

    def __init__(self, plan, device, size=8):
        self.plan, self.blocks, self.device, self.size = plan, plan.blocks, torch.device(device), size
        self.stages = {}

    def stage(self, batch, capacity, slot=0):
        """A stage for `batch` rows and `capacity` positions; stages in use at once (the
        micro-batches of one batch) take distinct slots."""
        if not self.plan.backend.static_cache:
            return self.plan.new_stage(batch, capacity, self.device)
        capacity = -(-capacity // self.CAPACITY_STEP) * self.CAPACITY_STEP
        key = (slot, batch, capacity, configuration_of(self.blocks))
        stage = self.stages.pop(key, None)
        if stage is None:
            stage = self.plan.new_stage(batch, capacity, self.device)
        else:
            stage.reset()
        self.stages[key] = stage  # the most recently used last
        while len(self.stages) > self.size:
            self.stages.pop(next(iter(self.stages)))
        return stage


class TorchPlan(DecodePlan):
    """The torch backend's plan (the reference): every block's forward over a growing KV cache."""

    def run_block(self, block, x, layer_past, mask, shared=None):
        return block(x, layer_past=layer_past, mask=mask)

    def new_stage(self, batch, capacity, device):
        return DynamicCacheStage(self)

    def logits(self, head, x, input_ids=None):
        return head(x, input_ids=input_ids)


class CudaPlan(TorchPlan):
    """The cuda backend's plan: static KV caches, each decoding step one CUDA graph replay (eager
    off CUDA); DejaVu's sparse MLP and heads through the Triton kernels of its modes."""

    def new_stage(self, batch, capacity, device):
        return StaticCacheStage(self, batch, capacity, device)

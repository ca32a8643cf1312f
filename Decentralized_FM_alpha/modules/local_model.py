"""All parts of a converted checkpoint in one process: the reference for pipeline runs and tools."""

import torch
from torch import nn

from dejavu_llama.pipeline_parallel.model_registry import load_model_module

from .decode import StagePool, choose_backend, generation


class LocalModel(nn.Module):
    def __init__(self, embeddings, blocks, head):
        super().__init__()
        self.embeddings = embeddings
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.plans = {}  # backend name -> (the blocks' set-up it was made for, DecodePlan, StagePool)

    @classmethod
    def from_checkpoint(cls, model_path, model_type="llama", dtype=None, device=None, num_layers=None,
                        backend="auto"):
        """The checkpoint's parts, prepared for the decode `backend` (auto: cuda on a GPU, else cpu)."""
        parts = load_model_module(model_type)
        embeddings = parts.GPTEmbeddings.from_pretrained(model_path, dtype=dtype, device=device)
        config = embeddings.config
        count = config.num_hidden_layers if num_layers is None else num_layers
        blocks = [
            parts.GPTBlock.from_pretrained(model_path, config, layer_index=i, dtype=dtype, device=device)
            for i in range(count)
        ]
        head = parts.GPTLMHead.from_pretrained(model_path, config, dtype=dtype, device=device)
        model = cls(embeddings, blocks, head)
        model.plan(backend, device or "cpu")
        return model

    @property
    def config(self):
        return self.embeddings.config

    @property
    def device(self):
        return next(self.embeddings.parameters()).device

    def _setup(self):
        """What a plan is made for besides the weights: each block's MLP and taps objects."""
        return [(block._modules["mlp"], block.taps) for block in self.blocks]

    def plan(self, backend="auto", device=None):
        """The DecodePlan of the decode `backend` for `device` (auto: cuda on a GPU, else cpu), kept
        while the blocks' set-up (their MLP and taps: a sparse configuration) is the one it was
        made for. Weights replaced since need a new one: prepare()."""
        chosen = choose_backend(backend, device or self.device)
        kept = self.plans.get(chosen.name)
        setup = self._setup()
        if kept is None or len(kept[0]) != len(setup) or not all(
                a is c and b is d for (a, b), (c, d) in zip(kept[0], setup)):
            return self.prepare(chosen.name, device)
        return kept[1]

    def prepare(self, backend="auto", device=None):
        """A new DecodePlan of `backend` for the blocks as they are now (kept for later calls)."""
        device = torch.device(device or self.device)
        chosen = choose_backend(backend, device)
        plan = chosen.prepare(self.blocks)
        self.plans[chosen.name] = (self._setup(), plan, StagePool(plan, device))
        return plan

    @torch.inference_mode()
    def forward(self, input_ids, mask=None, past=None, last=None, backend="auto"):
        """(logits [B, S, V], presents): `past` is one (k, v) per layer or None; with `last`, the
        head runs on the last `last` positions only (the scored ones: the head is the widest matmul).
        Each block runs through the decode `backend`'s plan (the cpu backend's kernels at batch 1)."""
        plan = self.plan(backend, input_ids.device)
        past = past or [None] * len(self.blocks)
        shared = {}  # the step's position arguments, made once for its layers
        with plan.running():
            x = self.embeddings(input_ids, past_layer=past[0], mask=mask)
            presents = []
            for block, layer_past in zip(self.blocks, past):
                x, present = plan.run_block(block, x, layer_past, mask, shared)
                presents.append(present)
            if last is not None:
                x, input_ids = x[:, -last:], input_ids[:, -last:]
            return plan.logits(self.head, x, input_ids), presents

    def stage_pool(self, backend, device):
        """The StagePool of this backend's plan, kept so later calls reuse captured steps."""
        plan = self.plan(backend, device)
        return self.plans[plan.name][2]

    def logits(self, backend, device):
        """head(x) as the backend's plan runs it (the cpu plan: a single row through the kernel)."""
        plan = self.plan(backend, device)
        return lambda x: plan.logits(self.head, x)

    @torch.inference_mode()
    def generate_greedy(self, input_ids, max_new_tokens, mask=None, backend="auto", with_logprobs=False,
                        on_token=None):
        """Greedy tokens [B, max_new_tokens], one token per step through a stage of the decode
        `backend` (modules/decode: auto, torch, cpu, cuda) by the generation loop
        (decode/generation.py); with_logprobs also returns each
        chosen token's log-probability [B, max_new_tokens] (float32). on_token(): called once a
        step's tokens are chosen (the first after the prompt), e.g. to time the decoding steps."""
        batch, length = input_ids.shape
        stage = self.stage_pool(backend, input_ids.device).stage(batch, length + max_new_tokens)
        logprobs = []

        def choose(logits):
            tokens = generation.greedy(logits)
            if with_logprobs:
                logprobs.append(torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens))
            if on_token is not None:
                on_token()
            return tokens

        tokens, _ = generation.generate(stage, self.embeddings, self.logits(backend, input_ids.device), choose,
                                        input_ids, mask, max_new_tokens)
        if with_logprobs:
            return tokens, torch.cat(logprobs, dim=1) if logprobs else torch.zeros(batch, 0)
        return tokens

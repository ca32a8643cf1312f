"""All parts of a converted checkpoint in one process: the reference for pipeline runs and tools."""

import torch
from torch import nn

from dejavu_llama.pipeline_parallel.model_registry import load_model_module

from .decode import StagePool, choose_backend


class LocalModel(nn.Module):
    def __init__(self, embeddings, blocks, head):
        super().__init__()
        self.embeddings = embeddings
        self.blocks = nn.ModuleList(blocks)
        self.head = head

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
        model.use_backend(backend, device or "cpu")
        return model

    @property
    def config(self):
        return self.embeddings.config

    def use_backend(self, name, device):
        """The decode Backend `name` chosen for `device`, with the model's parts prepared for it."""
        backend = choose_backend(name, device)
        if self.__dict__.get("prepared_for") != backend.name:
            backend.prepare(self.embeddings, *self.blocks, self.head)
            self.__dict__["prepared_for"] = backend.name
        return backend

    @torch.inference_mode()
    def forward(self, input_ids, mask=None, past=None, last=None, backend="auto"):
        """(logits [B, S, V], presents): `past` is one (k, v) per layer or None; with `last`, the
        head runs on the last `last` positions only (the scored ones: the head is the widest matmul).
        Each block runs through the decode `backend` (the cpu backend's kernels at batch 1)."""
        chosen = self.use_backend(backend, input_ids.device)
        past = past or [None] * len(self.blocks)
        with chosen.running():
            x = self.embeddings(input_ids, past_layer=past[0], mask=mask)
            presents = []
            for block, layer_past in zip(self.blocks, past):
                x, present = chosen.run_block(block, x, layer_past, mask)
                presents.append(present)
            if last is not None:
                x, input_ids = x[:, -last:], input_ids[:, -last:]
            return self.head(x, input_ids=input_ids), presents

    def stage_pool(self, backend, device):
        """The StagePool of this backend and device, kept so later calls reuse captured steps."""
        chosen = self.use_backend(backend, device)
        pools = self.__dict__.setdefault("_stage_pools", {})
        key = (chosen.name, str(device))
        if key not in pools:
            pools[key] = StagePool(chosen, self.blocks, device)
        return pools[key]

    @torch.inference_mode()
    def generate_greedy(self, input_ids, max_new_tokens, mask=None, backend="auto", with_logprobs=False):
        """Greedy tokens [B, max_new_tokens], one token per step through a stage of the decode
        `backend` (modules/decode: auto, torch, cpu, cuda); with_logprobs also returns each
        chosen token's log-probability [B, max_new_tokens] (float32)."""
        batch, length = input_ids.shape
        device = input_ids.device
        stage = self.stage_pool(backend, device).stage(batch, length + max_new_tokens)
        x = stage.prefill(self.embeddings(input_ids, past_layer=None, mask=mask), mask)
        logits = self.head(x[:, -1:], input_ids=input_ids[:, -1:])
        tokens, logprobs = [], []
        for step in range(max_new_tokens):
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(next_token)
            if with_logprobs:
                logprobs.append(torch.log_softmax(logits[:, -1].float(), dim=-1).gather(-1, next_token))
            if step == max_new_tokens - 1:
                break
            if mask is not None:
                mask = torch.cat((mask, torch.ones_like(next_token, dtype=mask.dtype)), dim=1)
            x = self.embeddings(next_token, past_layer=stage.first_cache, mask=mask)
            logits = self.head(stage.decode(x, mask), input_ids=next_token)
        tokens = torch.cat(tokens, dim=1) if tokens else input_ids.new_zeros(batch, 0)
        if with_logprobs:
            return tokens, torch.cat(logprobs, dim=1) if logprobs else torch.zeros(batch, 0)
        return tokens

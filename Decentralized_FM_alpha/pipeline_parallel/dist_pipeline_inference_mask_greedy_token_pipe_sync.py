"""Pipeline-parallel inference with left-padding masks and a token ring (upstream's engine name).

One instance per rank. Stage 0 embeds, every stage runs its layers, the last stage runs the
head. For each batch:

1. Prompt phase: the batch's rows are cut into micro-batches (`micro_batch_size` rows, padded
   on the left to the longest prompt of the micro-batch). Each micro-batch flows 0 -> 1 -> ...
   -> last; every stage calls its blocks with `layer_past=None` and keeps the returned KV
   cache (one per micro-batch per layer). The last stage scores echoed prompt tokens and
   chooses each row's first new token.
2. Token phase: the last stage sends each micro-batch's new tokens to stage 0 (the ring);
   stage 0 embeds them, and they flow through the stages again with the KV caches, once per
   new token, up to the batch's largest max_tokens. Each stage's side of a step is the
   generation loop's (modules/decode/generation.py: decode_step), as is the left padding.

Every stage derives the same micro-batches, shapes and masks from the shared batch plan, so
messages carry no header. Sends are asynchronous (`isend`) and only receives block, so the
ring cannot deadlock; a lost peer surfaces as `CommError` (see comm/comm_utils.py).
"""

import json
import logging
import os
import time
from contextlib import contextmanager
from functools import partial

import torch

from dejavu_llama.modules.decode import StagePool, choose_backend, generation
from dejavu_llama.pipeline_parallel.generation_utils import TokenSampler

logger = logging.getLogger(__name__)

# Cap on one chunk of echoed-prompt logits (rows x positions x vocabulary floats).
ECHO_CHUNK_ELEMENTS = 1 << 26


class Profiler:
    """Chrome-trace events ("X" phases) of this stage's compute, send and receive."""

    def __init__(self, enabled, rank, device):
        self.enabled = enabled
        self.rank = rank
        self.sync = enabled and torch.device(device).type == "cuda"
        self.events = []
        self.origin = time.perf_counter()

    @contextmanager
    def span(self, name, category, **info):
        if not self.enabled:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            end = time.perf_counter()
            self.events.append({
                "name": name, "cat": category, "ph": "X", "pid": self.rank, "tid": category,
                "ts": (start - self.origin) * 1e6, "dur": (end - start) * 1e6, "args": info,
            })

    def write(self, path):
        if not self.enabled:
            return None
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as handle:
            json.dump({"traceEvents": self.events}, handle)
        return path


class ProfiledStage:
    """A stage whose prefill and decode are recorded as one compute span, `what`."""

    def __init__(self, stage, profiler, what):
        self.stage, self.profiler, self.what = stage, profiler, what

    @property
    def first_cache(self):
        return self.stage.first_cache

    def prefill(self, x, mask):
        with self.profiler.span(self.what, "compute"):
            return self.stage.prefill(x, mask)

    def decode(self, x, mask):
        with self.profiler.span(self.what, "compute"):
            return self.stage.decode(x, mask)


class DistInferenceMaskTokenPipeSync:
    def __init__(self, comm, stage, num_stages, embeddings, blocks, head, hidden_size, device,
                 dtype, micro_batch_size=1, seed=42, profiler=None, decode_backend="auto"):
        self.comm = comm
        self.stage = stage
        self.num_stages = num_stages
        self.is_first = stage == 0
        self.is_last = stage == num_stages - 1
        self.embeddings = embeddings
        self.blocks = list(blocks)
        self.head = head
        self.hidden_size = hidden_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.micro_batch_size = max(1, int(micro_batch_size))
        self.sampler = TokenSampler(seed) if self.is_last else None
        self.profiler = profiler or Profiler(False, stage, device)
        # how the blocks run (modules/decode): it prepares this stage's parts; its stages are kept
        # for later batches
        self.backend = choose_backend(decode_backend, self.device)
        self.prepare()
        if self.is_first and embeddings is None:
            raise ValueError("stage 0 needs the embeddings")
        if self.is_last and head is None:
            raise ValueError("the last stage needs the head")

    def prepare(self):
        """A new DecodePlan for the blocks as they are set up now (and a new pool of its stages):
        after the blocks' sparse set-up or weights changed."""
        self.use_plan(self.backend.prepare(self.blocks))

    def use_plan(self, plan):
        """Run with `plan` (one this engine's backend made for the blocks as they are set up now)."""
        if getattr(self, "plan", None) is not plan:
            self.plan = plan
            self.stage_pool = StagePool(plan, self.device)

    # -------------------------------------------------------------- transfers
    def _recv_hidden(self, rows, length, what):
        buffer = torch.empty((rows, length, self.hidden_size), dtype=self.dtype, device=self.device)
        with self.profiler.span(f"recv {what}", "recv"):
            self.comm.recv(buffer, self.stage - 1, what)
        return buffer

    def _send_hidden(self, hidden, what):
        # in the run's dtype, which the next stage receives into (the cpu backend's kernels
        # decode a half-precision model with float32 activations)
        hidden = hidden.to(self.dtype)
        with self.profiler.span(f"send {what}", "send"):
            self.comm.send(hidden, self.stage + 1, what)

    def _profiled(self, stage, what):
        """`stage`, its blocks' calls recorded as the compute span `what` when profiling."""
        return ProfiledStage(stage, self.profiler, what) if self.profiler.enabled else stage

    def _embed(self, tokens, past_layer, mask, what):
        with self.profiler.span(f"embed {what}", "compute"):
            return self.embeddings(tokens, past_layer=past_layer, mask=mask).to(self.dtype)

    # -------------------------------------------------------------- last stage
    def _head(self, hidden, input_ids=None):
        return self.plan.logits(self.head, hidden, input_ids).float()

    def _score_prompts(self, hidden, input_ids, mask, settings, outputs):
        """Log-probabilities (and top-k) of each echoed prompt token given its prefix."""
        wanted = [row for row, s in enumerate(settings) if s["echo"] and s["logprobs"] is not None]
        for row in range(len(settings)):
            outputs[row]["prompt_logprobs"], outputs[row]["prompt_top"] = [], []
        if not wanted:
            return
        top_k = max(settings[row]["logprobs"] for row in wanted)
        rows, length = mask.shape
        first_real = int((length - mask.sum(-1)).min())  # left padding of the longest row
        vocab = getattr(getattr(self.head, "config", None), "vocab_size", None) or 32000
        chunk = max(1, ECHO_CHUNK_ELEMENTS // (rows * vocab))
        start = first_real
        while start < length - 1:  # predict tokens first_real + 1 .. length - 1
            end = min(length - 1, start + chunk)
            logprobs = torch.log_softmax(self._head(hidden[:, start:end]), dim=-1)
            vocab = logprobs.shape[-1]
            targets = input_ids[:, start + 1:end + 1].to(logprobs.device)
            picked = logprobs.gather(-1, targets[..., None])[..., 0].tolist()
            top_values = top_ids = None
            if top_k > 0:
                top = torch.topk(logprobs, min(top_k, vocab), dim=-1)
                top_values, top_ids = top.values.tolist(), top.indices.tolist()
            for row in wanted:
                skip = max(0, length - int(mask[row].sum()) - start)  # padding inside this chunk
                k = settings[row]["logprobs"]
                outputs[row]["prompt_logprobs"] += picked[row][skip:]
                if k > 0:
                    outputs[row]["prompt_top"] += [
                        (ids[:k], values[:k]) for ids, values in zip(top_ids[row][skip:], top_values[row][skip:])
                    ]
                else:
                    outputs[row]["prompt_top"] += [None] * (end - start - skip)
            start = end

    def _choose(self, last_hidden, settings, outputs, input_ids=None):
        """Next token per row from the last position; record its logprob and top-k."""
        logits = self._head(last_hidden, input_ids)[:, -1]
        sampling = [(s["temperature"], s["top_p"], s["top_k"]) for s in settings]
        tokens = self.sampler.choose(logits, sampling)
        logprobs = torch.log_softmax(logits, dim=-1)
        picked = logprobs.gather(-1, tokens[:, None].to(logprobs.device))[:, 0].cpu()
        top_k = max((s["logprobs"] or 0) for s in settings)
        top = torch.topk(logprobs, min(top_k, logprobs.shape[-1]), dim=-1) if top_k > 0 else None
        for row, s in enumerate(settings):
            outputs[row]["generated"].append(int(tokens[row]))
            outputs[row]["generated_logprobs"].append(float(picked[row]))
            k = s["logprobs"] or 0
            outputs[row]["generated_top"].append(
                (top.indices[row, :k].tolist(), top.values[row, :k].float().tolist()) if k > 0 else None
            )
        return tokens[:, None].to(self.device)

    # -------------------------------------------------------------- one batch
    @torch.inference_mode()
    def inference_batch(self, prompts, max_new_tokens, row_settings=None):
        """Run one batch through this stage.

        `prompts`: token-id lists, one per row (every stage gets the same). `row_settings`
        (last stage): per row dict with temperature, top_p, top_k, logprobs, echo. Returns, on
        the last stage, one dict per row: generated, generated_logprobs, generated_top,
        prompt_logprobs, prompt_top; None elsewhere.
        """
        size = self.micro_batch_size
        micro = []
        for start in range(0, len(prompts), size):
            input_ids, mask = generation.left_pad(prompts[start:start + size], device=self.device, always_mask=True)
            micro.append((start, input_ids, mask))
        # each micro-batch's blocks with their KV caches, sized for its prompt and new tokens
        stages = [self.stage_pool.stage(ids.shape[0], ids.shape[1] + max_new_tokens, slot=m)
                  for m, (_, ids, _) in enumerate(micro)]
        outputs = None
        if self.is_last:
            outputs = [
                {"generated": [], "generated_logprobs": [], "generated_top": []} for _ in prompts
            ]
        pending_tokens = [None] * len(micro)  # one-stage pipeline: the ring is local

        # Prompt phase.
        for m, (start, input_ids, mask) in enumerate(micro):
            rows, length = input_ids.shape
            what = f"prompt micro-batch {m}"
            if self.is_first:
                x = self._embed(input_ids, None, mask, what)
            else:
                x = self._recv_hidden(rows, length, f"activations of {what}")
            x = self._profiled(stages[m], what).prefill(x, mask)
            if not self.is_last:
                self._send_hidden(x, f"activations of {what}")
                continue
            settings = row_settings[start:start + rows]
            row_outputs = outputs[start:start + rows]
            with self.profiler.span(f"head {what}", "compute"):
                self._score_prompts(x, input_ids, mask, settings, row_outputs)
                if max_new_tokens > 0:
                    tokens = self._choose(x[:, -1:], settings, row_outputs)
            if max_new_tokens > 1:
                self._pass_tokens(m, tokens, pending_tokens)

        # Token phase: new token t - 1 goes in, token t comes out.
        for step in range(1, max_new_tokens):
            for m, (start, input_ids, prompt_mask) in enumerate(micro):
                rows = input_ids.shape[0]
                mask = torch.cat(
                    (prompt_mask, torch.ones((rows, step), dtype=prompt_mask.dtype, device=self.device)), dim=1
                )
                what = f"token {step} of micro-batch {m}"
                embed = head = None
                if self.is_first:
                    inputs = self._take_tokens(m, rows, pending_tokens, what)
                    embed = partial(self._embed, what=what)
                else:
                    inputs = self._recv_hidden(rows, 1, f"activations of {what}")
                if self.is_last:
                    head = partial(self._head_and_choose, what=what, settings=row_settings[start:start + rows],
                                   outputs=outputs[start:start + rows])
                # this stage's side of the step: hidden states for the next stage, or the new tokens
                out = generation.decode_step(self._profiled(stages[m], what), inputs, mask, embed, head)
                if not self.is_last:
                    self._send_hidden(out, f"activations of {what}")
                elif step < max_new_tokens - 1:
                    self._pass_tokens(m, out, pending_tokens)
        self.comm.wait_sends()
        return outputs

    def _head_and_choose(self, hidden, what, settings, outputs):
        with self.profiler.span(f"head {what}", "compute"):
            return self._choose(hidden, settings, outputs)

    def _pass_tokens(self, m, tokens, pending_tokens):
        if self.is_first:  # one stage: keep them
            pending_tokens[m] = tokens
            return
        with self.profiler.span(f"send new tokens of micro-batch {m}", "send"):
            self.comm.send(tokens, 0, f"new tokens of micro-batch {m}")

    def _take_tokens(self, m, rows, pending_tokens, what):
        if self.is_last:
            tokens, pending_tokens[m] = pending_tokens[m], None
            return tokens
        tokens = torch.empty((rows, 1), dtype=torch.long, device=self.device)
        with self.profiler.span(f"recv {what}", "recv"):
            self.comm.recv(tokens, self.num_stages - 1, f"new tokens for {what}")
        return tokens

"""The engine as an lm-evaluation-harness model: `--model dejavu`, dense and every sparse mode.

    dejavu-lm-eval --model dejavu \
        --model_args checkpoint=PATH,model_type=llama-ml-att-sparse,sparse_mode=predicted,sparse_path=DIR,mlp_keep=0.5 \
        --tasks dejavu_facts_mc --include_path tests/lm_eval_tasks

lm-eval 0.4.x has no plugin discovery for models (its registry holds its own MODEL_MAPPING and
whatever an imported module registers), so the plain `lm_eval` command cannot find a model
defined outside the harness. `dejavu-lm-eval` (pyproject.toml's [project.scripts], or
`python -m dejavu_llama.modules.lm_eval_adapter`) imports this module, which registers "dejavu"
with `lm_eval.api.registry.register_model`, and then runs lm_eval's own command line unchanged:
every lm_eval flag and model works as with `lm_eval`. In Python, `import
dejavu_llama.modules.lm_eval_adapter` before `lm_eval.simple_evaluate(model="dejavu", ...)`, or
pass a `DejaVuLM` instance.

The model is built with the project's own modules: `LocalModel.from_checkpoint(checkpoint,
model_type)` (embeddings, blocks and head in one process) and, for a variant type (the sparse
`*-ml-att-sparse` ones, also the `*-save` ones), the variant's hooks from the model registry:
its `settings_from_values(model_args)` makes its settings (a SparseConfig for the sparse types,
sparse_config.py) from the model_args other than this adapter's own, and its
`prepare_stage(blocks, args, config)` sets the blocks up. So every flag of `dejavu-infer` for
that type is a model_arg (`sparse_mode`, `sparse_path`, `mlp_keep`, `att_keep`, `sparse_layers`,
`sparse_mlp`, `sparse_attention`, `no_gather`, `predictor_dtype`, `thresholds`, `sparse_stats`,
and `sparse_config=FILE`, a saved SparseConfig the others change) under its dest name, with the
runner's checks. Upstream's environment names ($SPARSE_MODE, $TOPK, ...) are the runner's only:
here the model_args say everything. A value holding commas is quoted: `sparse_layers='0-3,9'`.

The adapter's own model_args: checkpoint (required), model_type (default llama), device
(auto: cuda when torch sees a GPU, else cpu), dtype (float32, float16, bfloat16, or another name
of common.DTYPES), batch_size, max_length (default: the config's max_position_embeddings),
max_gen_toks (default 256), add_bos_token, prefix_token_id, seed (sampling), label (a run name
kept in the results, read by dejavu_study.downstream), decode_backend (auto, torch, cpu, cuda). The tokenizer is the checkpoint folder's.

Scoring follows the harness's `hf` model: `TemplateLM`'s context/continuation split, inputs
`(context + continuation)[-(max_length + 1):][:-1]`, log-softmax in float32. Rows are batched
longest first with left padding; the blocks take the padding mask (positions come from it), so
a padded row scores as it would alone. Only the positions that are scored go through the head.
Generation is greedy (or sampled with do_sample/temperature) by the generation loop
(decode/generation.py) over a stage of the decode backend (auto: on CUDA the static-cache stage,
each step a CUDA graph replay), one token per step for the whole batch; a row stops at the
end-of-text token, at any of the request's `until` strings or after max_gen_toks, and its text
is cut at the first stop string.
"""

import argparse
import atexit
import logging
import os
import sys

import torch
import torch.nn.functional as F

import lm_eval.models  # noqa: F401  (registers the harness's own models before ours; see get_model)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from dejavu_common.helpers import resolve_device
from dejavu_llama.modules.common import DTYPES, resolve_dtype
from dejavu_llama.modules.decode import generation
from dejavu_llama.modules.decode import choose_backend
from dejavu_llama.modules.decode.environment import apply_environment
from dejavu_llama.modules.local_model import LocalModel
from dejavu_llama.pipeline_parallel.model_registry import load_model_module, variant_hooks

logger = logging.getLogger(__name__)

MODEL_NAME = "dejavu"
DEFAULT_MAX_GEN_TOKS = 256
AUTO_BATCH_SIZE = 8  # batch_size=auto: no memory probing here, this many rows (or max_batch_size)


class ModelArgsError(ValueError):
    """A model_arg the adapter or the model type's flags do not take, or a bad value."""


def variant_settings(model_type, values):
    """(the type's settings made from its model_args {name: value}, or None; its prepare_stage hook
    or None): each variant parses its own model_args (settings_from_values)."""
    hooks = variant_hooks(model_type)
    values = {key.replace("-", "_"): value for key, value in values.items() if value is not None}
    if hooks.settings_from_values is None:
        if values:
            raise ModelArgsError(
                f"model_args: unknown key(s) {', '.join(sorted(values))} for model_type {model_type}; the adapter "
                f"takes {', '.join(sorted(OWN_ARGS))} (a sparse type, e.g. llama-ml-att-sparse, takes the sparse flags)")
        return None, hooks.prepare_stage
    try:
        return hooks.settings_from_values(values), hooks.prepare_stage
    except ValueError as error:
        raise ModelArgsError(f"{error} (model_type {model_type}; the adapter's own: {', '.join(sorted(OWN_ARGS))})") \
            from None
    except RuntimeError as error:  # the variant's own setup error
        raise ModelArgsError(str(error)) from None


OWN_ARGS = ("checkpoint", "model_type", "device", "dtype", "batch_size", "max_batch_size", "max_length",
            "max_gen_toks", "add_bos_token", "prefix_token_id", "seed", "label", "decode_backend")


RUNNER_SETTINGS = ("model_name", "model_type", "rank", "world_size")  # what hooks may read beside the flags


def _close_hook(state, ok=None):
    """End a variant hook once (close(ok): e.g. --sparse-stats written when no request failed). At
    exit it holds the hook and the failure flag only, so no model is kept alive for it."""
    hook = state.pop("hook", None)
    if hook is not None:
        hook.close(not state["failed"] if ok is None else ok)


@register_model(MODEL_NAME)
class DejaVuLM(TemplateLM):
    """A converted checkpoint run by the project's modules, dense or sparse (see the module doc)."""

    def __init__(self, checkpoint=None, model_type="llama", device="auto", dtype="float32", batch_size=1,
                 max_batch_size=None, max_length=None, max_gen_toks=DEFAULT_MAX_GEN_TOKS, add_bos_token=None,
                 prefix_token_id=None, seed=1234, label=None, decode_backend="auto", _harness_device=None, **flags):
        super().__init__()
        from transformers import AutoTokenizer

        if not checkpoint:
            raise ModelArgsError("model_args: checkpoint=PATH (a converted checkpoint folder) is required")
        load_model_module(model_type)  # an unknown type is an error naming the known ones
        settings, prepare_stage = variant_settings(model_type, flags)
        self.run_args = argparse.Namespace(variant_settings=settings)
        torch_dtype = self._pick_dtype(dtype)
        self._device = torch.device(self._pick_device(device, _harness_device))
        try:  # how the blocks run (modules/decode): auto is cuda on a GPU (static cache, CUDA graphs), else cpu
            self.decode_backend = choose_backend(decode_backend, self._device).name
        except ValueError as error:
            raise ModelArgsError(f"model_args: decode_backend: {error}") from None
        self.checkpoint, self.model_type, self.label = str(checkpoint), model_type, label
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint)
        except (OSError, ValueError) as error:
            raise ModelArgsError(f"checkpoint {self.checkpoint}: no tokenizer could be read from the folder "
                                 f"(converted checkpoints hold one): {error}") from error
        self.model = LocalModel.from_checkpoint(self.checkpoint, model_type, dtype=torch_dtype, device=self._device)
        self.model.eval()
        self._state = {"failed": False}
        if prepare_stage is not None:
            # the namespace the runner hands its hooks: its own settings plus the type's flags
            runner = dict(zip(RUNNER_SETTINGS, (self.checkpoint, model_type, 0, 1)))
            for name, value in runner.items():
                setattr(self.run_args, name, value)
            self._state["hook"] = prepare_stage(list(self.model.blocks), self.run_args, self.model.config)
            atexit.register(_close_hook, self._state)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        self._batch_size = self._pick_batch_size(batch_size, max_batch_size)
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self._warned = set()
        logger.info("dejavu: %s (%s) on %s, %s, batch size %d, max length %d%s", self.checkpoint, model_type,
                    self._device, dtype, self._batch_size, self.max_length,
                    f", settings {settings}" if settings is not None else "")

    # ---- construction from the harness ----------------------------------------------------------
    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """model_args win over the harness's generic settings (--batch_size, --device), which the
        harness always passes (its --device defaults to cuda:0) and would otherwise collide."""
        args = dict(arg_dict)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "device" in extra:
            args["_harness_device"] = extra.pop("device")
        for key, value in extra.items():
            args.setdefault(key, value)
        return cls(**args)

    @staticmethod
    def _pick_device(device, harness_device):
        """model_args device (auto, cpu, cuda, cuda:N), else the harness's --device, whose default
        cuda:0 on a machine without a GPU means the CPU (as for the harness's hf model)."""
        if device in (None, "auto") and harness_device is not None:
            harness_device = str(harness_device)
            if harness_device.startswith("cuda") and not torch.cuda.is_available():
                return "cpu"
            return harness_device
        kind, _, index = str(device or "auto").partition(":")
        kind = resolve_device(kind, "model_args device")
        return f"{kind}:{index}" if index else kind

    @staticmethod
    def _pick_dtype(dtype):
        """model_args dtype: a name of common.DTYPES (float32, float16, bfloat16, fp16, ...)."""
        if dtype is not None:
            try:
                return resolve_dtype(dtype)
            except ValueError:
                pass
        raise ModelArgsError(f"model_args: dtype {dtype!r}; choose one of {', '.join(DTYPES)}")

    @staticmethod
    def _pick_batch_size(batch_size, max_batch_size):
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            size = int(max_batch_size) if max_batch_size else AUTO_BATCH_SIZE
            logger.warning("dejavu: batch_size %s: no automatic sizing; using %d rows per batch", batch_size, size)
            return size
        size = int(batch_size)
        if size < 1:
            raise ModelArgsError(f"model_args: batch_size {batch_size!r} must be at least 1")
        return size

    def close(self, ok=None):
        """End the variant's hook (e.g. write --sparse-stats) now; else it ends at exit."""
        _close_hook(self._state, ok)

    # ---- what the harness reads -----------------------------------------------------------------
    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self):
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self):
        return self._max_length or int(self.model.config.max_position_embeddings)

    @property
    def max_gen_toks(self):
        return self._max_gen_toks

    @property
    def batch_size(self):
        return self._batch_size

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self):
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self):
        return {"dejavu_checkpoint": self.checkpoint, "dejavu_model_type": self.model_type,
                "dejavu_label": self.label, "dejavu_flags": {k: v for k, v in vars(self.run_args).items()
                                                             if k not in RUNNER_SETTINGS}}

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        """As the `hf` model: the tokenizer's own special tokens unless add_bos_token says otherwise,
        none when the string already starts with the BOS text."""
        options = {}
        if add_special_tokens is not None:
            options["add_special_tokens"] = add_special_tokens
        elif string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            options["add_special_tokens"] = False
        elif self.add_bos_token is not None:
            options["add_special_tokens"] = self.add_bos_token
        encoding = self.tokenizer.encode(string, **options)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens, skip_special_tokens=True):
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- the model ------------------------------------------------------------------------------
    def _batch(self, rows):
        """Left-padded input ids [B, L] and mask [B, L] (None when no row is padded)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return generation.left_pad(rows, pad, self._device)

    def _forward(self, input_ids, mask=None, last=None):
        """(logits of the last `last` positions (all when None), presents)."""
        return self.model(input_ids, mask=mask, last=last, backend=self.decode_backend)

    def _run(self, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except BaseException:
            self._state["failed"] = True
            raise

    # ---- loglikelihood --------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        return self._run(self._score, requests, disable_tqdm, override_bs)

    def _score(self, requests, disable_tqdm, override_bs):
        """(log-probability, greedy) of each request's continuation after its context.

        Requests that share a context (a multiple-choice item's choices) run the context once:
        its keys and values are then read by each continuation, which runs only its own tokens
        (the same numbers as running every row whole, for a fraction of the tokens). A request
        whose context and continuation exceed max_length is scored alone, left-truncated."""
        from tqdm import tqdm

        batch_size = override_bs or self.batch_size
        results = [None] * len(requests)
        shared, truncated = {}, []
        for index, (_, context_enc, continuation_enc) in enumerate(requests):
            if not context_enc or not continuation_enc:
                raise ValueError("dejavu: a loglikelihood request needs a context and a continuation token")
            if len(continuation_enc) > self.max_length:
                raise ValueError(f"dejavu: a continuation of {len(continuation_enc)} tokens exceeds "
                                 f"max_length {self.max_length}")
            if len(context_enc) + len(continuation_enc) <= self.max_length + 1:
                shared.setdefault(tuple(context_enc), []).append(index)
            else:
                truncated.append(index)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="dejavu loglikelihood")

        def done(index, answer):
            results[index] = answer
            if requests[index][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
            progress.update(1)

        # contexts longest first (a batch pads least), each with its requests, in batches of
        # about batch_size continuations
        groups = sorted(shared.items(), key=lambda item: (-len(item[0]), item[0]))
        batch = []
        for group in groups:
            batch.append(group)
            if sum(len(indices) for _, indices in batch) >= batch_size:
                self._score_shared(requests, batch, done)
                batch = []
        if batch:
            self._score_shared(requests, batch, done)
        for start in range(0, len(truncated), batch_size):
            self._score_rows(requests, truncated[start:start + batch_size], done)
        progress.close()
        return results

    @staticmethod
    def _answer(logprobs, continuation):
        """(sum of the continuation's log-probabilities, whether each token is the argmax) from
        the rows of logprobs [len(continuation), V] that predict it."""
        target = torch.tensor(continuation, dtype=torch.long, device=logprobs.device)
        greedy = bool((logprobs.argmax(-1) == target).all())
        return float(logprobs.gather(-1, target[:, None]).sum()), greedy

    def _score_shared(self, requests, groups, done):
        """Each context of `groups` ([(context tokens, request indices)]) once, then every
        request's continuation over that context's keys and values."""
        input_ids, mask = self._batch([list(context) for context, _ in groups])
        logits, presents = self._forward(input_ids, mask, last=1)
        first = F.log_softmax(logits[:, -1].float(), dim=-1)  # each context's next-token distribution
        rows = [(g, index) for g, (_, indices) in enumerate(groups) for index in indices]
        longest = max(len(requests[index][2]) for _, index in rows)
        rest = None
        if longest > 1:  # the continuations' own tokens but the last, right-padded, after their context
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            ids = torch.full((len(rows), longest - 1), pad, dtype=torch.long)
            own = torch.zeros((len(rows), longest - 1), dtype=torch.long)
            for r, (_, index) in enumerate(rows):
                tokens = requests[index][2][:-1]
                ids[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                own[r, : len(tokens)] = 1
            owner = torch.tensor([g for g, _ in rows], dtype=torch.long, device=self._device)
            context_mask = torch.ones_like(input_ids) if mask is None else mask
            full_mask = torch.cat([context_mask.index_select(0, owner), own.to(self._device)], dim=1)
            past = [(layer[0].index_select(0, owner), layer[1].index_select(0, owner)) for layer in presents]
            logits, _ = self.model(ids.to(self._device), mask=full_mask, past=past, backend=self.decode_backend)
            rest = F.log_softmax(logits.float(), dim=-1)
        for r, (g, index) in enumerate(rows):
            continuation = requests[index][2]
            picked = first[g : g + 1] if len(continuation) == 1 else torch.cat(
                [first[g : g + 1], rest[r, : len(continuation) - 1]])
            done(index, self._answer(picked, continuation))

    def _score_rows(self, requests, indices, done):
        """Each request as one row (context + continuation, left-truncated to max_length + 1)."""
        rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in indices]
        span = max(len(requests[i][2]) for i in indices)
        input_ids, mask = self._batch(rows)
        logits, _ = self._forward(input_ids, mask, last=span)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        for index, row_logprobs in zip(indices, logprobs):
            continuation = requests[index][2]
            done(index, self._answer(row_logprobs[span - len(continuation):], continuation))  # rows end at the right

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        windows, owners = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            for window in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None,) + window)
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation -----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm=False):
        return self._run(self._generate_until, requests, disable_tqdm)

    def _generate_until(self, requests, disable_tqdm):
        from tqdm import tqdm

        collator = Collator([request.args for request in requests],
                            sort_fn=lambda req: (-len(self.tok_encode(req[0])), req[0]),
                            group_by="gen_kwargs", group_fn=lambda req: req[1])
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results = []
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="dejavu generate_until")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            room = self.max_length - max_gen_toks
            if room <= 0:
                raise ValueError(f"dejavu: max_gen_toks {max_gen_toks} leaves no room for a prompt in "
                                 f"max_length {self.max_length}")
            prompts = [self.tok_encode(context, left_truncate_len=room) for context in contexts]
            generations = self.generate_tokens(prompts, max_gen_toks, until, **kwargs)
            for context, tokens in zip(contexts, generations):
                text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                progress.update(1)
        progress.close()
        return collator.get_original(results)

    def generate_tokens(self, prompts, max_new_tokens, until=(), do_sample=False, temperature=0.0, **ignored):
        """Token lists generated for a batch of prompts (token lists) with the KV cache: each row
        stops at the end-of-text token (not returned), once its text holds a stop string, or after
        max_new_tokens."""
        unused = tuple(sorted(k for k, v in ignored.items() if v is not None))
        if unused and unused not in self._warned:
            self._warned.add(unused)
            logger.warning("dejavu: generation settings %s are not supported and are ignored", list(unused))
        sampling = bool(do_sample) and float(temperature or 0) > 0
        choose = generation.sampler(temperature, self.generator) if sampling else generation.greedy
        stops = [stop for stop in until if stop]
        eot = self.eot_token_id

        def stop(row, tokens):
            if tokens[-1] == eot:
                return True
            return bool(stops) and any(s in self.tok_decode(tokens, skip_special_tokens=False) for s in stops)

        input_ids, mask = self._batch(prompts)
        stage = self.model.stage_pool(self.decode_backend, self._device).stage(
            len(prompts), input_ids.shape[1] + max_new_tokens)
        tokens, lengths = generation.generate(stage, self.model.embeddings,
                                              self.model.logits(self.decode_backend, self._device), choose,
                                              input_ids, mask, max_new_tokens, stop)
        generated = [row[:length] for row, length in zip(tokens.tolist(), lengths)]
        return [row[:-1] if row and row[-1] == eot else row for row in generated]  # end-of-text is not text


def main(argv=None):
    """dejavu-lm-eval: lm_eval's own command line, with the model "dejavu" registered."""
    from lm_eval.__main__ import cli_evaluate

    # the adapter's and the sparse set-up's messages beside the harness's (which logs under "lm_eval" only)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-8s [%(name)s] %(message)s", "%Y-%m-%d:%H:%M:%S"))
    package_logger = logging.getLogger("dejavu_llama")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    apply_environment(os.environ)
    cli_evaluate()


if __name__ == "__main__":
    main()

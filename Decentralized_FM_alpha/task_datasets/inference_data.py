"""Request files in, result files out (JSON lines, upstream's shape; docs/formats.md "Requests and results").

Request:  {"prompt": str, "max_tokens": int, "echo": bool, "logprobs": int|null,
           "temperature": float, "top_p": float, "top_k": int, "stop": str|list|null, "n": int,
           "best_of": int, "model": str, "request_type": "language-model-inference"}
Result:   {"request": {...}, "result": {"choices": [{"text", "index", "finish_reason",
           "logprobs": {"tokens", "token_logprobs", "top_logprobs", "text_offset"}}]}}

Conventions (documented here once):
* Blank lines are not requests. Every other line gets exactly one result line, in order.
* A bad line is an error naming its line number; with `skip_bad=True` it becomes
  {"request": <the parsed object or the raw line>, "error": "line N: ...", "line": N}
  in its place instead, so the alignment of the other results never shifts.
* Prompts are tokenized with the tokenizer's defaults (special tokens such as BOS added as the
  model expects). With `input_seq_length`, longer prompts keep their last tokens (upstream's
  left truncation) and a warning counts them.
* Generation stops at the first end-of-sequence token (not included; finish_reason "stop"),
  at a stop sequence (text cut before it; finish_reason "stop"), or at max_tokens ("length").
* Log-probabilities are those of the model's distribution (log-softmax of the raw logits,
  before temperature / top-p / top-k). `token_logprobs[0]` of an echoed prompt is null.
* `tokens` are the tokenizer's decoding of each token alone; `text_offset` is the running sum
  of their lengths, starting at 0 with echo and at len(prompt) without (OpenAI's convention).
* With best_of > n, best_of completions are generated and the n with the highest sum of
  token log-probabilities are returned.
"""

import json
import logging
import math
import os
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

REQUEST_TYPE = "language-model-inference"
DEFAULTS = {
    "max_tokens": 16,
    "echo": False,
    "logprobs": None,
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "stop": None,
    "n": 1,
    "best_of": None,
}


class RequestError(ValueError):
    """A request file or line that cannot be run; the message names the line."""


@dataclass
class Entry:
    """One request line: either runnable (prompt_ids set) or an error result."""

    index: int  # position among the non-blank lines = position in the result file
    line: int  # 1-based line number in the request file
    request: object  # the parsed object (or the raw text of a malformed line)
    error: str = None
    prompt_ids: list = field(default_factory=list)
    max_tokens: int = 0
    echo: bool = False
    logprobs: int = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list = field(default_factory=list)
    n: int = 1
    best_of: int = 1
    truncated: bool = False


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_request(request, line, default_max_tokens=None):
    """The request's settings, normalized; raises RequestError("line N: ...")."""

    def fail(message):
        raise RequestError(f"line {line}: {message}")

    if not isinstance(request, dict):
        fail(f"a request must be a JSON object, got {type(request).__name__}")
    request_type = request.get("request_type", REQUEST_TYPE)
    if request_type != REQUEST_TYPE:
        fail(f"request_type {request_type!r} is not supported (only {REQUEST_TYPE!r})")
    prompt = request.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        fail(f"'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt:
        fail("empty prompt")
    settings = {**DEFAULTS, **{k: v for k, v in request.items() if k in DEFAULTS and v is not None}}
    if "max_tokens" not in request and default_max_tokens is not None:
        settings["max_tokens"] = default_max_tokens
    max_tokens = settings["max_tokens"]
    if not _is_int(max_tokens):
        fail(f"max_tokens must be an integer, got {max_tokens!r}")
    if max_tokens < 0:
        fail(f"max_tokens must be >= 0, got {max_tokens}")
    if not isinstance(settings["echo"], bool):
        fail(f"echo must be true or false, got {settings['echo']!r}")
    logprobs = settings["logprobs"]
    if logprobs is not None and (not _is_int(logprobs) or logprobs < 0):
        fail(f"logprobs must be null or an integer >= 0, got {logprobs!r}")
    if not _is_number(settings["temperature"]) or settings["temperature"] < 0:
        fail(f"temperature must be a number >= 0, got {settings['temperature']!r}")
    if not _is_number(settings["top_p"]) or not 0 < settings["top_p"] <= 1:
        fail(f"top_p must be in (0, 1], got {settings['top_p']!r}")
    if not _is_int(settings["top_k"]) or settings["top_k"] < 0:
        fail(f"top_k must be an integer >= 0, got {settings['top_k']!r}")
    stop = settings["stop"]
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        fail(f"stop must be null, a non-empty string or a list of them, got {settings['stop']!r}")
    n = settings["n"]
    if not _is_int(n) or n < 1:
        fail(f"n must be an integer >= 1, got {n!r}")
    best_of = settings["best_of"] if settings["best_of"] is not None else n
    if not _is_int(best_of) or best_of < n:
        fail(f"best_of must be an integer >= n ({n}), got {best_of!r}")
    if max_tokens == 0 and not settings["echo"] and n > 1:
        pass  # allowed, just empty completions
    return dict(
        prompt=prompt, max_tokens=max_tokens, echo=settings["echo"], logprobs=logprobs,
        temperature=float(settings["temperature"]), top_p=float(settings["top_p"]),
        top_k=settings["top_k"], stop=stop, n=n, best_of=best_of,
    )


def load_requests(path, tokenizer, max_positions, skip_bad=False, input_seq_length=None,
                  default_max_tokens=None):
    """[Entry] for every non-blank line of `path`, validated and tokenized."""
    if not os.path.isfile(path):
        raise RequestError(f"request file not found: {path}")
    entries = []
    truncated = 0
    with open(path, encoding="utf-8") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            entry = Entry(index=len(entries), line=line_number, request=raw.rstrip("\n"))
            try:
                try:
                    entry.request = json.loads(raw)
                except json.JSONDecodeError as error:
                    raise RequestError(f"line {line_number}: malformed JSON ({error})") from None
                settings = validate_request(entry.request, line_number, default_max_tokens)
                ids = list(tokenizer(settings.pop("prompt"))["input_ids"])
                if not ids:
                    raise RequestError(f"line {line_number}: empty prompt (no tokens)")
                if input_seq_length and len(ids) > input_seq_length:
                    ids = ids[-input_seq_length:]
                    entry.truncated = True
                    truncated += 1
                if len(ids) > max_positions:
                    raise RequestError(
                        f"line {line_number}: prompt is {len(ids)} tokens, longer than the model's "
                        f"{max_positions} positions (max_position_embeddings)"
                    )
                if len(ids) + settings["max_tokens"] > max_positions:
                    raise RequestError(
                        f"line {line_number}: prompt ({len(ids)} tokens) + max_tokens "
                        f"({settings['max_tokens']}) exceeds the model's {max_positions} positions "
                        "(max_position_embeddings)"
                    )
                entry.prompt_ids = ids
                for key, value in settings.items():
                    setattr(entry, key, value)
            except RequestError as error:
                if not skip_bad:
                    raise RequestError(f"{path}: {error}") from None
                entry.error = str(error)
                logger.warning("skipping bad request: %s", error)
            entries.append(entry)
    if truncated:
        logger.warning("%d prompt(s) longer than --input-seq-length %d kept their last %d tokens",
                       truncated, input_seq_length, input_seq_length)
    if not entries:
        raise RequestError(f"{path}: no requests")
    return entries


@dataclass
class Row:
    """One generated sequence: a completion of one request."""

    entry: int  # index into the entry list
    choice: int


@dataclass
class BatchPlan:
    """Rows that run together; every stage derives the same tensors from it."""

    rows: list  # [Row]
    prompts: list  # [[token id]] per row
    max_new_tokens: int


def make_batches(entries, batch_size, budget=None):
    """Group the runnable entries' rows, in request order, into batches.

    A request with best_of > 1 contributes best_of rows, kept in one batch. `budget` (upstream's
    --budget) caps rows x (longest prompt + longest generation) per batch; a single request
    over the budget still runs, alone.
    """
    batches = []
    rows, prompts, longest, longest_new = [], [], 0, 0
    for entry in entries:
        if entry.error is not None:
            continue
        count = entry.best_of
        new_longest = max(longest, len(entry.prompt_ids))
        new_generate = max(longest_new, entry.max_tokens)
        too_many = rows and len(rows) + count > batch_size
        over_budget = rows and budget and (len(rows) + count) * (new_longest + new_generate) > budget
        if too_many or over_budget:
            batches.append(BatchPlan(rows, prompts, longest_new))
            rows, prompts = [], []
            new_longest, new_generate = len(entry.prompt_ids), entry.max_tokens
        for choice in range(count):
            rows.append(Row(entry.index, choice))
            prompts.append(entry.prompt_ids)
        longest, longest_new = new_longest, new_generate
    if rows:
        batches.append(BatchPlan(rows, prompts, longest_new))
    return batches


# ---------------------------------------------------------------------------- results


CONTEXT_TOKENS = 8


class TokenText:
    """Token strings via the tokenizer, cached per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache = {}

    def __call__(self, token_ids):
        missing = [t for t in set(token_ids) if t not in self.cache]
        if missing:
            for token, text in zip(missing, self.tokenizer.batch_decode([[t] for t in missing])):
                self.cache[token] = text
        return [self.cache[t] for t in token_ids]

    def decode(self, token_ids, context=()):
        """Text of `token_ids` as a continuation of `context` (the prompt's last tokens), so
        tokenizers that mark word starts (SentencePiece, word-level) get their spaces right."""
        if not token_ids:
            return ""
        context = list(context)[-CONTEXT_TOKENS:]
        if not context:
            return self.tokenizer.decode(token_ids)
        prefix = self.tokenizer.decode(context)
        full = self.tokenizer.decode(context + list(token_ids))
        if full.startswith(prefix):
            return full[len(prefix):]
        return self.tokenizer.decode(token_ids)


def _top_dict(token_text, top):
    if top is None:
        return None
    ids, values = top
    return dict(zip(token_text(list(ids)), (float(v) for v in values)))


def build_choice(entry, output, token_text, eos_ids, index):
    """One choice from a row's output (prompt/generated ids, logprobs, top-k)."""
    generated = list(output["generated"][: entry.max_tokens])
    gen_logprobs = list(output["generated_logprobs"][: len(generated)])
    gen_top = list(output["generated_top"][: len(generated)])
    finish_reason = "length"
    for position, token in enumerate(generated):
        if token in eos_ids:
            generated, gen_logprobs, gen_top = generated[:position], gen_logprobs[:position], gen_top[:position]
            finish_reason = "stop"
            break
    context = entry.prompt_ids
    text = token_text.decode(generated, context)
    if entry.stop:
        cuts = [text.find(s) for s in entry.stop if s in text]
        if cuts:
            cut = min(cuts)
            text = text[:cut]
            keep = len(generated)  # the tokens that lie entirely before the stop sequence
            while keep > 0 and len(token_text.decode(generated[:keep], context)) > cut:
                keep -= 1
            generated, gen_logprobs, gen_top = generated[:keep], gen_logprobs[:keep], gen_top[:keep]
            finish_reason = "stop"
    gen_strings = token_text(generated)
    prompt = entry.request["prompt"]
    prompt = prompt[0] if isinstance(prompt, list) else prompt
    choice = {"text": (prompt + text) if entry.echo else text, "index": index, "finish_reason": finish_reason}
    if entry.logprobs is None:
        choice["logprobs"] = None
        return choice, sum(gen_logprobs)
    tokens, token_logprobs, top_logprobs = [], [], []
    if entry.echo:
        prompt_ids = entry.prompt_ids
        tokens += token_text(prompt_ids)
        token_logprobs += [None] + [float(v) for v in output["prompt_logprobs"]]
        top_logprobs += [None] + [_top_dict(token_text, t) for t in output["prompt_top"]]
    tokens += gen_strings
    token_logprobs += [float(v) for v in gen_logprobs]
    top_logprobs += [_top_dict(token_text, t) for t in gen_top]
    offset = 0 if entry.echo else len(prompt)
    text_offset = []
    for piece in tokens:
        text_offset.append(offset)
        offset += len(piece)
    choice["logprobs"] = {
        "tokens": tokens, "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs if entry.logprobs > 0 else None, "text_offset": text_offset,
    }
    return choice, sum(gen_logprobs)


def build_result(entry, outputs, token_text, eos_ids):
    """The result line of one entry; `outputs` are its best_of row outputs in choice order."""
    if entry.error is not None:
        return {"request": entry.request, "error": entry.error, "line": entry.line}
    scored = [build_choice(entry, output, token_text, eos_ids, i) for i, output in enumerate(outputs)]
    if entry.best_of > entry.n:
        order = sorted(range(len(scored)), key=lambda i: -scored[i][1])[: entry.n]
        scored = [scored[i] for i in sorted(order)]
    choices = []
    for index, (choice, _) in enumerate(scored):
        choice["index"] = index
        choices.append(choice)
    return {"request": entry.request, "result": {"choices": choices}}


def default_output_path(infer_data):
    folder, name = os.path.split(os.path.abspath(infer_data))
    return os.path.join(folder, f"output_{name}")

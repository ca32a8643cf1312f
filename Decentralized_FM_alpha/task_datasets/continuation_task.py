"""A multiple-choice continuation task built offline from the corpus's validation documents.

Each item is a context of about CONTEXT_TOKENS tokens of a validation passage and four candidate
continuations of CONTINUATION_TOKENS tokens: the passage's own next tokens and three spans of other
passages of the same source, so style and register match and only content decides. Cuts are at
token boundaries of the checkpoint's tokenizer, at the start of a word (a single space before it),
and the text is the passage's own characters between those cuts. The training split's documents
are never used, so predictors trained on request files of the offline corpus never saw an item.

    python -m dejavu_llama.task_datasets.continuation_task --tokenizer CKPT --out DIR [--items 1200] [--seed 0]

writes into DIR (atomically, file by file):
    dejavu_continuation.jsonl   one item a line: context, choices, answer, source, document, ...
    dejavu_continuation.yaml    the lm-eval task (multiple_choice, acc and acc_norm)
    load_items.py               the task's loader: reads the JSONL beside the YAML from any directory
    task.json                   what was built: counts, lengths, seed, tokenizer, source documents

then `dejavu-lm-eval --model dejavu --model_args checkpoint=CKPT --tasks dejavu_continuation
--include_path DIR` runs it.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import logging
import os
import random
from dataclasses import dataclass

from dejavu_common.helpers import write_json_atomic, write_jsonl_atomic, write_text_atomic
from dejavu_llama.task_datasets.offline_text import CorpusMissing, Passage, offline_documents, set_cache_folder

logger = logging.getLogger("continuation_task")

TASK_NAME = "dejavu_continuation"
CONTEXT_TOKENS = 32
CONTINUATION_TOKENS = 12
CHOICES = 4
DISTRACTOR_TRIES = 200  # draws per item before giving up on finding distinct distractors


class CorpusTooSmall(ValueError):
    """The passages hold fewer non-overlapping windows (or distractor spans) than the items asked."""


@dataclass(frozen=True)
class TokenizedPassage:
    passage: Passage
    starts: tuple[int, ...]       # character offset of each token
    ends: tuple[int, ...]         # character offset after each token
    word_starts: tuple[int, ...]  # token indices where a word starts after a single space

    def char_of_word(self, token: int) -> int:
        """The first character of the word that starts at `token` (after its leading space)."""
        start = self.starts[token]
        return start + 1 if self.passage.text[start] == " " else start


def word_start_tokens(text: str, starts, ends) -> tuple[int, ...]:
    """Tokens that begin a word preceded by exactly one space (the space in the token, as byte-level
    BPE has it, or just before it): a cut there reads naturally and joins back with one space."""
    out = []
    for index in range(1, len(starts)):
        start = starts[index]
        if start >= len(text):
            continue
        if text[start] == " ":
            word, before = start + 1, start - 1
        elif text[start - 1] == " " and ends[index - 1] <= start:
            word, before = start, start - 2
        else:
            continue
        if word < len(text) and not text[word].isspace() and before >= 0 and not text[before].isspace():
            out.append(index)
    return tuple(out)


def tokenize_passages(passages: list[Passage], tokenizer) -> list[TokenizedPassage]:
    from tqdm import tqdm

    out = []
    for passage in tqdm(passages, desc="tokenizing passages", unit="passage", disable=len(passages) < 200):
        encoded = tokenizer(passage.text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        starts, ends = tuple(s for s, _ in offsets), tuple(e for _, e in offsets)
        out.append(TokenizedPassage(passage, starts, ends, word_start_tokens(passage.text, starts, ends)))
    return out


def passage_windows(tokenized: TokenizedPassage, context_tokens: int, continuation_tokens: int,
                    rng: random.Random) -> list[tuple[int, int]]:
    """Non-overlapping (context start, cut) token pairs: the cut at a word start with a continuation
    of `continuation_tokens` after it, the context from the first word start at or after
    cut - context_tokens (so a few tokens short at most). The first cut is shifted at random so
    items do not all sit at passage starts."""
    word_starts = tokenized.word_starts
    length, span = len(tokenized.starts), context_tokens + continuation_tokens
    windows, position, word_index = [], context_tokens + rng.randrange(span), 0
    while True:
        while word_index < len(word_starts) and word_starts[word_index] < position:
            word_index += 1
        if word_index == len(word_starts):
            return windows
        cut = word_starts[word_index]
        if cut + continuation_tokens > length:
            return windows
        context_start = word_starts[bisect.bisect_left(word_starts, cut - context_tokens)]
        if cut - context_start >= context_tokens // 2:
            windows.append((context_start, cut))
        position = cut + span


def span_text(tokenized: TokenizedPassage, first: int, stop: int) -> str:
    """The passage's characters from the word at token `first` to the end of token `stop - 1`."""
    return tokenized.passage.text[tokenized.char_of_word(first):tokenized.ends[stop - 1]].strip()


def context_text(tokenized: TokenizedPassage, context_start: int, cut: int) -> str:
    return tokenized.passage.text[tokenized.char_of_word(context_start):tokenized.starts[cut]].strip()


def pick_distractors(rng: random.Random, pool: list[TokenizedPassage], own: int, true_text: str,
                     continuation_tokens: int) -> list[tuple[int, str]]:
    """CHOICES - 1 (passage index in pool, text) spans of other passages of the pool, distinct from
    each other and from the true continuation."""
    seen, picked = {" ".join(true_text.split())}, []
    for _ in range(DISTRACTOR_TRIES):
        index = rng.randrange(len(pool))
        if index == own:
            continue
        candidates = [t for t in pool[index].word_starts if t + continuation_tokens <= len(pool[index].starts)]
        if not candidates:
            continue
        first = rng.choice(candidates)
        text = span_text(pool[index], first, first + continuation_tokens)
        key = " ".join(text.split())
        if text and "\ufffd" not in text and key not in seen:
            seen.add(key)
            picked.append((index, text))
            if len(picked) == CHOICES - 1:
                return picked
    raise CorpusTooSmall(f"source {pool[own].passage.source}: no {CHOICES - 1} distinct distractor spans "
                         f"in {DISTRACTOR_TRIES} draws ({len(pool)} passages)")


def build_items(passages: list[Passage], tokenizer, items: int, seed: int = 0,
                context_tokens: int = CONTEXT_TOKENS, continuation_tokens: int = CONTINUATION_TOKENS) -> list[dict]:
    """`items` multiple-choice items from `passages`, the same for the same seed: windows are taken
    from every source in turn, each passage's first window before any passage's second."""
    if items < 1:
        raise ValueError(f"--items must be >= 1 (got {items})")
    if context_tokens < 2 or continuation_tokens < 1:
        raise ValueError("--context-tokens must be >= 2 and --continuation-tokens >= 1")
    rng = random.Random(seed)
    by_source: dict[str, list[TokenizedPassage]] = {}
    for tokenized in tokenize_passages(passages, tokenizer):
        by_source.setdefault(tokenized.passage.source, []).append(tokenized)

    queues = []  # per source: (source, passage index in its pool, context start, cut), round by round
    for source in sorted(by_source):
        pool = by_source[source]
        windows = [passage_windows(t, context_tokens, continuation_tokens, rng) for t in pool]
        order = list(range(len(pool)))
        rng.shuffle(order)
        rounds = max((len(w) for w in windows), default=0)
        queues.append([(source, index, *windows[index][k]) for k in range(rounds) for index in order
                       if k < len(windows[index])])
    chosen = [w for row in itertools.zip_longest(*queues) for w in row if w is not None]
    if len(chosen) < items:
        counts = ", ".join(f"{s}: {len(q)}" for s, q in zip(sorted(by_source), queues))
        raise CorpusTooSmall(f"--items {items}: the {len(passages)} passage(s) hold only {len(chosen)} windows of "
                             f"{context_tokens}+{continuation_tokens} tokens ({counts or 'no sources'})")

    out = []
    for source, index, context_start, cut in chosen:
        if len(out) == items:
            break
        pool, tokenized = by_source[source], by_source[source][index]
        context = context_text(tokenized, context_start, cut)
        true_text = span_text(tokenized, cut, cut + continuation_tokens)
        if not context or not true_text or "\ufffd" in context + true_text:
            continue  # an undecodable byte in the corpus file (read with errors='replace')
        distractors = pick_distractors(rng, pool, index, true_text, continuation_tokens)
        answer = rng.randrange(CHOICES)
        choices = [text for _, text in distractors]
        choices.insert(answer, true_text)
        out.append({
            "id": len(out), "source": source, "document": tokenized.passage.document,
            "passage": tokenized.passage.index, "context": context, "choices": choices, "answer": answer,
            "context_tokens": cut - context_start,
            "distractors": [{"document": pool[i].passage.document, "passage": pool[i].passage.index}
                            for i, _ in distractors],
        })
    if len(out) < items:
        raise CorpusTooSmall(f"--items {items}: only {len(out)} usable windows in {len(passages)} passage(s)")
    return out


# ---- the lm-eval task ---------------------------------------------------------------------------
TASK_YAML = """\
# {items} continuation items from the offline corpus's validation documents, 4 choices each:
# the passage's own next {continuation_tokens} tokens and 3 spans of other passages of the same source.
# Written by python -m dejavu_llama.task_datasets.continuation_task (see task.json).
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
custom_dataset: !function load_items.load_local_json
output_type: multiple_choice
test_split: test
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

LOADER = '''\
"""Loader of this folder's task: `dataset_kwargs.data_files` relative to this folder, so the task runs
from any working directory (the harness hands relative data_files to `datasets` as they are)."""

import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _resolve(files):
    if isinstance(files, str):
        return files if os.path.isabs(files) else os.path.join(HERE, files)
    if isinstance(files, dict):
        return {split: _resolve(value) for split, value in files.items()}
    return [_resolve(value) for value in files]


def load_local_json(data_files=None, **_metadata):
    import datasets

    if not data_files:
        raise ValueError("dataset_kwargs.data_files is required (relative paths are read beside this file)")
    return datasets.load_dataset("json", data_files=_resolve(data_files))
'''


def task_summary(items: list[dict], task: str, seed: int, tokenizer_name: str, context_tokens: int,
                 continuation_tokens: int) -> dict:
    sources = {}
    for item in items:
        entry = sources.setdefault(item["source"], {"items": 0, "documents": set()})
        entry["items"] += 1
        entry["documents"].add(item["document"])
        entry["documents"].update(d["document"] for d in item["distractors"])
    return {
        "task": task, "items": len(items), "choices": CHOICES, "seed": seed, "tokenizer": tokenizer_name,
        "split": "validation", "context_tokens": context_tokens, "continuation_tokens": continuation_tokens,
        "context_tokens_mean": sum(i["context_tokens"] for i in items) / len(items),
        "answer_counts": [sum(i["answer"] == k for i in items) for k in range(CHOICES)],
        "sources": {name: {"items": entry["items"], "documents": sorted(entry["documents"])}
                    for name, entry in sorted(sources.items())},
    }


def write_task(out: str, items: list[dict], summary: dict, task: str = TASK_NAME) -> None:
    data_file = f"{task}.jsonl"
    write_jsonl_atomic(os.path.join(out, data_file), items)
    write_text_atomic(os.path.join(out, "load_items.py"), LOADER)
    write_json_atomic(os.path.join(out, "task.json"), summary)
    # the YAML last: a folder the harness can find holds the data it names
    write_text_atomic(os.path.join(out, f"{task}.yaml"), TASK_YAML.format(
        items=len(items), continuation_tokens=summary["continuation_tokens"], task=task, data_file=data_file))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="Build the multiple-choice continuation task from the offline "
                                                 "corpus's validation documents")
    parser.add_argument("--tokenizer", required=True, help="checkpoint folder (or tokenizer) that cuts the tokens")
    parser.add_argument("--out", required=True, help="folder for the JSONL, the task YAML and task.json")
    parser.add_argument("--items", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context-tokens", type=int, default=CONTEXT_TOKENS)
    parser.add_argument("--continuation-tokens", type=int, default=CONTINUATION_TOKENS)
    parser.add_argument("--task-name", default=TASK_NAME, help=f"lm-eval task name (default {TASK_NAME})")
    args = parser.parse_args(argv)
    set_cache_folder(os.environ.get("DEJAVU_CORPUS_CACHE"))
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        if not tokenizer.is_fast:
            raise ValueError(f"--tokenizer {args.tokenizer}: a fast tokenizer is needed (character offsets)")
        items = build_items(offline_documents("validation"), tokenizer, args.items, args.seed,
                            args.context_tokens, args.continuation_tokens)
        summary = task_summary(items, args.task_name, args.seed, args.tokenizer, args.context_tokens,
                               args.continuation_tokens)
        write_task(args.out, items, summary, args.task_name)
    except (ValueError, OSError, CorpusMissing) as error:
        logger.error("%s", error)
        return 1
    logger.info("wrote %d items (%s) to %s", len(items),
                ", ".join(f"{name}: {entry['items']}" for name, entry in summary["sources"].items()), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

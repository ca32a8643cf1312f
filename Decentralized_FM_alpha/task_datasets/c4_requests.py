"""Request files from C4 (or offline text), shared by c4_val/getdata.py and c4_train/getdata.py.

Sources, in order of preference:
  --text-dir DIR   every *.txt file under DIR (sorted) is one document
  --offline        the offline corpus (task_datasets.offline_text: the Python documentation and
                   the World English Bible from Debian packages), passages of its train or
                   validation documents, drawn from every source in turn
  default          the hub: `allenai/c4`, config "en", streaming, seeded shuffle; if the hub
                   cannot be reached the built-in offline source is used, with a warning

Each document becomes one perplexity request (upstream's shape):
  {"best_of": 1, "echo": true, "logprobs": 1, "max_tokens": 0, "model": ..., "n": 1,
   "prompt": text, "request_type": "language-model-inference", "stop": null,
   "temperature": 0, "top_p": 1}
plus "source" (and, offline, "document": the source's page or book) so a report can name where
its text came from; the runner ignores keys it does not use.
`--max-words N` keeps each document's first N words; `--max-tokens N --tokenizer PATH` keeps
its first N tokens (decoded back to text, so the runner's tokenization may differ by a token
at the cut).
"""

import argparse
import glob
import itertools
import logging
import os
import random
import sys

from dejavu_common.helpers import write_jsonl_atomic
from dejavu_llama.task_datasets.offline_text import offline_documents, set_cache_folder

logger = logging.getLogger("getdata")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def perplexity_request(text, model="c4", **origin):
    return {
        "best_of": 1, "echo": True, "logprobs": 1, "max_tokens": 0, "model": model, "n": 1,
        "prompt": text, "request_type": "language-model-inference", "stop": None,
        "temperature": 0, "top_p": 1, **origin,
    }


def hub_documents(split, seed, shuffle_buffer):
    """(text, origin) of C4 "en" `split`, streamed and shuffled with `seed` (a generator)."""
    from datasets import load_dataset

    dataset = load_dataset("allenai/c4", "en", split=split, streaming=True)
    if shuffle_buffer > 1:
        dataset = dataset.shuffle(buffer_size=shuffle_buffer, seed=seed)
    for document in dataset:
        yield document["text"], {"source": "allenai/c4"}


def text_dir_documents(folder):
    files = sorted(glob.glob(os.path.join(folder, "**", "*.txt"), recursive=True))
    if not files:
        raise FileNotFoundError(f"--text-dir {folder}: no *.txt files")
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as handle:
            yield handle.read(), {"source": os.path.relpath(path, folder)}


def shuffled(items, seed):
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def corpus_documents(split, seed):
    """(text, origin) of the offline corpus's `split`: each source's passages shuffled with `seed`,
    then taken from the sources in turn, so any number of documents draws on every source."""
    by_source = {}
    for passage in offline_documents(split=split):
        by_source.setdefault(passage.source, []).append(passage)
    queues = [shuffled(passages, seed) for _, passages in sorted(by_source.items())]
    for row in itertools.zip_longest(*queues):
        for passage in row:
            if passage is not None:
                yield passage.text, {"source": passage.source, "document": passage.document}


class Truncator:
    def __init__(self, max_words=None, max_tokens=None, tokenizer=None):
        self.max_words = max_words
        self.max_tokens = max_tokens
        self.tokenizer = None
        if max_tokens:
            if not tokenizer:
                raise ValueError("--max-tokens needs --tokenizer (a checkpoint folder or hub id)")
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)

    def __call__(self, text):
        text = text.strip()
        if self.max_words:
            words = text.split()
            if len(words) > self.max_words:
                text = " ".join(words[: self.max_words])
        if self.max_tokens:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > self.max_tokens:
                text = self.tokenizer.decode(ids[: self.max_tokens]).strip()
        return text


def collect(args, split):
    """[text] from the chosen source, at most --num-docs, each with >= --min-words words."""
    if args.text_dir:
        source, texts = f"text files under {args.text_dir}", shuffled(text_dir_documents(args.text_dir), args.seed)
    elif args.offline:
        source, texts = "the offline corpus", corpus_documents(split, args.seed)
    else:
        source, texts = f"allenai/c4 en {split} (streaming)", hub_documents(split, args.seed, args.shuffle_buffer)
    documents = []
    try:
        for text, origin in texts:
            if len(text.split()) < args.min_words:
                continue
            documents.append((text, origin))
            if len(documents) >= args.num_docs:
                break
    except Exception as error:  # the hub is unreachable (no network, no credentials, ...)
        if args.text_dir or args.offline:
            raise
        logger.warning("cannot read %s (%s: %s); falling back to the offline corpus",
                       source, type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        args.offline = True
        return collect(args, split)
    if len(documents) < args.num_docs:
        logger.warning("%s has only %d document(s) with >= %d words; asked for %d",
                       source, len(documents), args.min_words, args.num_docs)
    return source, documents


def build_parser(split, default_output, default_num_docs):
    parser = argparse.ArgumentParser(description=f"Write a perplexity request file from C4 {split} (or offline text)")
    parser.add_argument("--output", default=default_output, help=f"request file (default: {default_output})")
    parser.add_argument("--num-docs", type=int, default=default_num_docs)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--shuffle-buffer", type=int, default=10000, help="streaming shuffle buffer (hub only)")
    parser.add_argument("--min-words", type=int, default=1, help="skip documents with fewer words")
    parser.add_argument("--max-words", type=int, default=None, help="keep each document's first N words")
    parser.add_argument("--max-tokens", type=int, default=None, help="keep each document's first N tokens")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for --max-tokens (checkpoint folder)")
    parser.add_argument("--text-dir", default=None, help="use the *.txt files under this folder")
    parser.add_argument("--offline", action="store_true",
                        help="use the offline corpus (Python documentation, World English Bible)")
    parser.add_argument("--model", default="c4", help='value of the requests\' "model" field')
    return parser


def main(split, default_output, default_num_docs, argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser(split, default_output, default_num_docs).parse_args(argv)
    hub_offline = any(os.environ.get(name, "").lower() in ("1", "true", "yes")
                      for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if hub_offline and not (args.text_dir or args.offline):
        logger.warning("HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set: using the offline corpus")
        args.offline = True
    set_cache_folder(os.environ.get("DEJAVU_CORPUS_CACHE"))
    try:
        if args.num_docs < 1:
            raise ValueError("--num-docs must be >= 1")
        truncate = Truncator(args.max_words, args.max_tokens, args.tokenizer)
        source, documents = collect(args, split)
        requests = [perplexity_request(truncate(text), args.model, **origin) for text, origin in documents]
        requests = [r for r in requests if r["prompt"]]
        if not requests:
            raise ValueError(f"no documents from {source}")
        write_jsonl_atomic(args.output, requests)
    except Exception as error:
        logger.error("%s", error)
        return 1
    logger.info("wrote %d request(s) from %s to %s", len(requests), source, args.output)
    return 0


def script_main(split, default_name, default_num_docs):
    """Entry of the getdata.py scripts (run from anywhere)."""
    sys.exit(main(split, os.path.join(ROOT, "data", default_name), default_num_docs))

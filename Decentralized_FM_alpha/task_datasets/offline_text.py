"""The offline corpus: real English prose from Debian packages, for machines without the hub.

    source               Debian package   licence        what                                   ~tokens (SmolLM2)
    python-docs          python3-doc      PSF License    the Python documentation, prose only   1.5M
    world-english-bible  sword-text-web   public domain  the World English Bible, one book a doc 1.2M

scripts/setup.sh installs both. Documents are the packages' own units (a documentation page, a book),
cut into passages of about PASSAGE_WORDS words at paragraph breaks, so a request holds one passage.
The train/validation split is by document, before cutting: every DOCUMENT_SPLIT_EVERY-th document of
each source (sorted by name) is validation, so no document has passages on both sides and every source
is in both splits. Stdlib only; the files are read where the packages put them.

    python -m dejavu_llama.task_datasets.offline_text [--tokenizer CKPT]   # documents, words (tokens) per source
"""

from __future__ import annotations

import argparse
import functools
import glob
import html
import html.parser
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Callable

from dejavu_common.helpers import repo_root, write_json_atomic

PASSAGE_WORDS = 400
DOCUMENT_SPLIT_EVERY = 4  # every 4th document of a source is validation text
MIN_DOCUMENT_WORDS = 50


class CorpusMissing(RuntimeError):
    """A source's package is not installed (the message names it)."""


# ---- python-docs: Sphinx HTML pages -> prose paragraphs ------------------------------------------
PYTHON_DOCS_GLOB = "/usr/share/doc/python3*/html"
SKIPPED_PAGES = ("genindex", "py-modindex", "search", "_")
PROSE_TAGS = {"p", "li", "dd", "dt", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6"}
HIDDEN_TAGS = {"pre", "script", "style", "nav", "head", "footer", "form"}
HIDDEN_CLASSES = {"headerlink", "highlight", "sphinxsidebar", "related", "footer", "toctree-wrapper", "doctest",
                  "literal-block"}


class _ProseParser(html.parser.HTMLParser):
    """Text of prose elements, without code, navigation and sidebars."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs, self.current, self.stack, self.hidden = [], [], [], 0

    def flush(self):
        text = re.sub(r"\s+", " ", "".join(self.current)).strip()
        if text:
            self.paragraphs.append(text)
        self.current = []

    def handle_starttag(self, tag, attrs):
        if tag in ("br", "img", "hr", "meta", "link", "input", "wbr"):
            return
        classes = set((dict(attrs).get("class") or "").split())
        hides = tag in HIDDEN_TAGS or bool(classes & HIDDEN_CLASSES)
        self.stack.append((tag, hides))
        self.hidden += hides
        if tag in PROSE_TAGS and not self.hidden:
            self.flush()

    def handle_endtag(self, tag):
        for index in range(len(self.stack) - 1, -1, -1):  # tolerant of unclosed tags
            if self.stack[index][0] == tag:
                self.hidden -= sum(hides for _, hides in self.stack[index:])
                del self.stack[index:]
                break
        if tag in PROSE_TAGS and not self.hidden:
            self.flush()

    def handle_data(self, data):
        if not self.hidden:
            self.current.append(data)


def is_prose(paragraph: str) -> bool:
    """A sentence-like paragraph: 8+ words, mostly letters, ending like a sentence (drops code, tables, lists of names)."""
    if len(paragraph.split()) < 8:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in paragraph) / len(paragraph)
    return letters >= 0.8 and re.search(r"[.!?:;][\"')\u201d]*$", paragraph) is not None


def html_prose(page: str) -> str:
    parser = _ProseParser()
    parser.feed(page)
    parser.close()
    parser.flush()
    return "\n\n".join(p for p in parser.paragraphs if is_prose(p))


def python_docs() -> list[tuple[str, str]]:
    folders = sorted(glob.glob(PYTHON_DOCS_GLOB))
    if not folders:
        raise CorpusMissing(f"python-docs: no {PYTHON_DOCS_GLOB} (apt-get install python3-doc; scripts/setup.sh does)")
    base = folders[-1]
    documents = []
    for path in sorted(glob.glob(os.path.join(base, "**", "*.html"), recursive=True)):
        name = os.path.relpath(path, base)
        if name.startswith(SKIPPED_PAGES):
            continue
        with open(path, encoding="utf-8", errors="replace") as handle:
            documents.append((name, html_prose(handle.read())))
    return documents


# ---- world-english-bible: a SWORD zText module -> one document per book ---------------------------
BIBLE_MODULE = "/usr/share/sword/modules/texts/ztext/engWEB2015eb"


def sword_blocks(module: str) -> str:
    """The module's OSIS XML: .bzs holds (offset, size, uncompressed size) per block of .bzz (zlib)."""
    text = []
    for testament in ("ot", "nt"):
        with open(os.path.join(module, f"{testament}.bzs"), "rb") as index_file, \
                open(os.path.join(module, f"{testament}.bzz"), "rb") as data_file:
            index, data = index_file.read(), data_file.read()
        for entry in range(0, len(index), 12):
            offset, size, _ = struct.unpack("<III", index[entry:entry + 12])
            if size:
                text.append(zlib.decompress(data[offset:offset + size]).decode("utf-8", "replace"))
    return "".join(text)


def osis_text(xml: str) -> str:
    """Plain text: footnotes and headings dropped, paragraphs and poetry lines kept as breaks."""
    xml = re.sub(r"<note\b.*?</note>", " ", xml, flags=re.S)
    xml = re.sub(r"<title\b.*?</title>", "\x02", xml, flags=re.S)
    xml = re.sub(r"<(?:p|div|chapter|lg)\b[^>]*/?>|</(?:p|div|chapter|lg)>", "\x02", xml)
    xml = re.sub(r"<(?:l|lb)\b[^>]*/?>|</l>", "\x01", xml)
    text = html.unescape(re.sub(r"<[^>]+>", "", xml))
    text = re.sub(r"\s*[\x01\x02][\s\x01\x02]*", lambda m: "\n\n" if "\x02" in m.group(0) else "\n", text)
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r" +([,.;:!?\u2019\u201d)])", r"\1", text).strip()


def world_english_bible() -> list[tuple[str, str]]:
    if not os.path.isfile(os.path.join(BIBLE_MODULE, "ot.bzs")):
        raise CorpusMissing(f"world-english-bible: no {BIBLE_MODULE} "
                            "(apt-get install sword-text-web; scripts/setup.sh does)")
    parts = re.split(r'(<div[^>]*\btype="book"[^>]*>)', sword_blocks(BIBLE_MODULE))
    documents = []
    for number, (head, body) in enumerate(zip(parts[1::2], parts[2::2])):
        book = re.search(r'osisID="([^"]+)"', head)
        documents.append((f"{number:02d}-{book.group(1) if book else 'book'}", osis_text(body)))
    return documents


# ---- the corpus ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    name: str
    package: str
    licence: str
    read: Callable[[], list[tuple[str, str]]]
    files: str  # a glob of the package's files: their sizes and times key the cache


_settings = {"cache_folder": None}


def set_cache_folder(folder: str | None) -> None:
    """Where the parsed corpus is cached (None: .cache/corpus in the repository); a command's
    edge sets it from $DEJAVU_CORPUS_CACHE."""
    _settings["cache_folder"] = folder or None


def cache_folder() -> str:
    return _settings["cache_folder"] or os.path.join(repo_root(), ".cache", "corpus")


@functools.lru_cache(maxsize=None)
def load_source(name: str) -> tuple[tuple[str, str], ...]:
    """A source's (document, text) pairs, parsed once per installed package version: parsing the
    HTML pages takes about 15 s, so the result is kept in a JSON file keyed by the files' sizes and
    modification times (a reinstalled or upgraded package parses again)."""
    source = SOURCES[name]
    paths = sorted(glob.glob(source.files, recursive=True))
    if not paths:
        source.read()  # raises CorpusMissing, naming the package
    stats = [os.stat(path) for path in paths]
    key = f"{len(paths)}-{sum(s.st_size for s in stats)}-{max(int(s.st_mtime) for s in stats)}"
    cached = os.path.join(cache_folder(), f"{name}-{key}.json")
    if os.path.isfile(cached):
        with open(cached, encoding="utf-8") as handle:
            return tuple(tuple(pair) for pair in json.load(handle))
    documents = tuple(source.read())
    write_json_atomic(cached, [list(pair) for pair in documents])
    return documents


SOURCES = {source.name: source for source in (
    Source("python-docs", "python3-doc (Debian)", "PSF License Agreement (Python documentation)", python_docs,
           PYTHON_DOCS_GLOB + "/**/*.html"),
    Source("world-english-bible", "sword-text-web (Debian)", "public domain (World English Bible)",
           world_english_bible, BIBLE_MODULE + "/*.bz*"),
)}


@dataclass(frozen=True)
class Passage:
    source: str
    document: str   # the package's unit (page, book); the split is by document
    index: int      # passage number within the document
    text: str


def passages(text: str, words: int = PASSAGE_WORDS) -> list[str]:
    """Consecutive paragraphs joined up to about `words` words (a longer paragraph stands alone)."""
    out, current, count = [], [], 0
    for paragraph in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if not paragraph:
            continue
        size = len(paragraph.split())
        if current and count + size > words:
            out.append("\n\n".join(current))
            current, count = [], 0
        current.append(paragraph)
        count += size
    if current:
        out.append("\n\n".join(current))
    return out


def split_of(position: int) -> str:
    return "validation" if position % DOCUMENT_SPLIT_EVERY == 0 else "train"


def offline_documents(split: str | None = None, sources=None) -> list[Passage]:
    """Passages of the chosen sources (default all) in a fixed order; split 'train' or 'validation'
    gives disjoint documents, None gives both."""
    chosen = [SOURCES[name] for name in (sources or SOURCES)]
    out = []
    for source in chosen:
        documents = [(name, text) for name, text in load_source(source.name) if len(text.split()) >= MIN_DOCUMENT_WORDS]
        for position, (name, text) in enumerate(sorted(documents)):
            if split is None or split_of(position) == split:
                out.extend(Passage(source.name, name, i, p) for i, p in enumerate(passages(text)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Documents, passages, words (and tokens) per offline source and split")
    parser.add_argument("--tokenizer", default=None, help="a checkpoint folder: count tokens too")
    args = parser.parse_args(argv)
    set_cache_folder(os.environ.get("DEJAVU_CORPUS_CACHE"))
    count_tokens = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    print("| source | licence | split | documents | passages | words | tokens |\n|---|---|---|---|---|---|---|")
    for name, source in SOURCES.items():
        for split in ("train", "validation"):
            chosen = offline_documents(split, [name])
            words = sum(len(p.text.split()) for p in chosen)
            tokens = sum(count_tokens(p.text) for p in chosen) if count_tokens else None
            print(f"| {name} | {source.licence} | {split} | {len({p.document for p in chosen})} | {len(chosen)} | "
                  f"{words:,} | {'–' if tokens is None else f'{tokens:,}'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

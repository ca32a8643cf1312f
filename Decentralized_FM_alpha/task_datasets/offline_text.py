"""Real English text that every Python installation carries: the reference manual's topics.

`pydoc_data.topics` holds the Python language reference sections (about 80 documents, 65,000
words of prose with some code). It stands in for C4 on machines without the hub.
"""

import re

from pydoc_data.topics import topics

RULE_LINE = re.compile(r"^[*=\-~^]{3,}\s*$")


def clean(text):
    """Drop heading underlines and collapse runs of blank lines."""
    lines = [line.rstrip() for line in text.splitlines() if not RULE_LINE.match(line.strip())]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def offline_documents(min_words=0):
    """[(name, text)] in a fixed order, each with at least `min_words` words."""
    documents = []
    for name in sorted(topics):
        text = clean(topics[name])
        if len(text.split()) >= min_words:
            documents.append((name, text))
    return documents

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


VALIDATION_EVERY = 4  # every 4th topic (sorted by name) is validation text, the rest training


def offline_documents(min_words=0, split=None):
    """[(name, text)] in a fixed order, each with at least `min_words` words.

    split "train" or "validation" gives disjoint parts, so predictors never train on the
    documents whose perplexity is measured; None gives all.
    """
    documents = []
    for index, name in enumerate(sorted(topics)):
        is_validation = index % VALIDATION_EVERY == 0
        if split is not None and is_validation != (split == "validation"):
            continue
        text = clean(topics[name])
        if len(text.split()) >= min_words:
            documents.append((name, text))
    return documents

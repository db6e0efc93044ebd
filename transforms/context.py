"""Where a chunk sits in its document: the short context line embedded with it, and the
full context the lexical index reads.

Every chunk text is ``context line + "\\n\\n" + body`` (``transforms.chunking``). The line
tells the embedding model what a chunk deep in a page is about, and it is paid for in
model tokens on every chunk; the lexical (BM25) index pays nothing per term. So the two
indexes get different context:

* embedded (:func:`context_lines`): a short line, the document's name and the chunk's
  nearest heading (``"s3-bucket-policies > Granting read access"``);
* lexical (:func:`lexical_text`): the full title (a git file's whole path) and the full
  heading path, in place of the short line.

The lexical text is derived from what Chroma stores for a chunk (its text and its
``title``/``heading`` metadata), so the lexical index written during a sync and the
one rebuilt from Chroma are the same. This module imports nothing heavy: the lexical
index and the query path load it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

HEADING_SEPARATOR = " > "
#: Bump when :func:`lexical_text` or the context lines change what the lexical index
#: holds (it is part of the lexical index's version, so a stale index is rebuilt).
CONTEXT_VERSION = 2


def document_name(title: str) -> str:
    """A title shortened to a name: a path's last part without its extension
    (``"guide/doc_source/s3-bucket-policies.md"`` -> ``"s3-bucket-policies"``,
    ``"README.md"`` -> ``"README"``); any other title unchanged (a Confluence page or Jira
    issue title, ``"Release notes 2.1"``, is already a name)."""
    if "/" not in title and (any(ch.isspace() for ch in title) or not _EXTENSION.search(title)):
        return title
    last = title.rstrip("/").rsplit("/", 1)[-1]
    return _EXTENSION.sub("", last) or last or title


#: A file extension: a dot, a letter, up to 7 more letters or digits, at the end.
_EXTENSION = re.compile(r"(?<=[^./])\.[A-Za-z][A-Za-z0-9]{0,7}$")


def headings(heading: str) -> list[str]:
    """The non-empty parts of a heading path (``"A > B"`` -> ``["A", "B"]``)."""
    return [p for p in heading.split(HEADING_SEPARATOR) if p]


def context_lines(title: str, heading: str) -> list[str]:
    """The embedded context line of a chunk and its shorter fallbacks, in order.

    The line is ``"<document name> > <nearest heading>"`` (or the name alone before the
    first heading); the fallbacks are the heading alone, then the name alone.
    ``transforms.chunking`` keeps the first one that fits its token budget. Pure (no
    tokenizer), so :func:`lexical_text` can recognise whichever of them a stored chunk
    starts with.
    """
    name, nearest = document_name(title), (headings(heading) or [""])[-1]
    both = HEADING_SEPARATOR.join(p for p in (name, nearest) if p)
    return [line for line in dict.fromkeys((both, nearest, name)) if line]


def full_context(title: str, heading: str) -> str:
    """``"title > heading path"`` with nothing left out (the lexical index's context)."""
    return HEADING_SEPARATOR.join(p for p in [title, *headings(heading)] if p)


def without_context_line(text: str, title: str, heading: str) -> str:
    """``text`` without the embedded context line it starts with (one of
    :func:`context_lines`), or ``text`` unchanged when it starts with none."""
    for line in context_lines(title, heading):
        if text.startswith(line + "\n\n"):
            return text[len(line) + 2:]
    return text


def lexical_text(text: str, metadata: Mapping[str, Any]) -> str:
    """What the lexical index analyses for a chunk: its full context (``metadata``'s
    ``title`` and ``heading``, as ``flows.sync.chunk_metadata`` stores them), a blank
    line, and its body (``text`` without the embedded context line). Used by both
    lexical backends when rows are written, so a rebuild from Chroma's documents and
    metadatas gives the same rows as the sync did."""
    title = str(metadata.get("title") or "")
    heading = str(metadata.get("heading") or "")
    context = full_context(title, heading)
    body = without_context_line(text, title, heading)
    return f"{context}\n\n{body}" if context else body

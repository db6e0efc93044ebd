"""Text -> chunks, sized in the embedding model's tokens (langchain-text-splitters).

* Markdown is split by headers first (``ExperimentalMarkdownSyntaxTextSplitter``, which
  keeps whitespace and code-block indentation, unlike ``MarkdownHeaderTextSplitter``),
  then each section recursively with Markdown separators.
* Code is split with ``RecursiveCharacterTextSplitter.from_language`` for the language.
* Anything else is split recursively on paragraphs, lines, words.

Every chunk's text starts with a short context line (document name and nearest heading,
``transforms.context.context_lines``), so a chunk deep in a page still says what it is
about; that line counts against the token budget. The lexical index reads the full
title and heading path instead (``transforms.context.lexical_text``), which costs no
model tokens. Lengths are measured with the embedding model's tokenizer because the
model silently truncates at ``max_seq_length`` (256 word pieces for all-MiniLM-L6-v2):
a chunk measured in characters would lose its tail from the index.

A chunk's id is ``sha256(doc_id, chunk text + full context, occurrence)`` (DESIGN.md
step 4), the full context being the title and heading path the lexical index reads
(what either index holds of it): an unchanged chunk keeps its id when other parts of
its document change, so only the changed chunks are embedded again; a renamed title or
outer heading gives new ids, so neither index keeps a stale context.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache

from langchain_text_splitters import (
    ExperimentalMarkdownSyntaxTextSplitter,
    Language,
    RecursiveCharacterTextSplitter,
)

from transforms.context import HEADING_SEPARATOR, context_lines, full_context, headings

#: Counts tokens of a text (without the model's special tokens).
TokenCounter = Callable[[str], int]

HEADERS = [("#", "h1"), ("##", "h2"), ("###", "h3"), ("####", "h4")]
#: Bump when the chunking algorithm changes in a way that changes chunk texts or ids
#: (it is in every document hash, so an index cut by another version is re-chunked).
#: 2: short embedded context line (name > nearest heading), bodies cut as under the full
#: one; ids also hash the full context.
ALGORITHM_VERSION = 2


@dataclass(frozen=True)
class ChunkingConfig:
    """How documents are cut.

    Attributes:
        max_tokens: most tokens in one chunk's text, context line included. Set it to
            the model's ``max_seq_length`` minus its special tokens.
        overlap_tokens: tokens repeated between consecutive chunks of one section.
    """

    max_tokens: int = 254
    overlap_tokens: int = 32

    def __post_init__(self) -> None:
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens must be at least 16, got {self.max_tokens}")
        if not 0 <= self.overlap_tokens < self.max_tokens // 2:
            raise ValueError(
                f"overlap_tokens must be in [0, max_tokens/2), got {self.overlap_tokens}"
            )

    def fingerprint(self) -> str:
        """A string that changes whenever these settings or the algorithm change."""
        return json.dumps({"v": ALGORITHM_VERSION, **asdict(self)}, sort_keys=True)


@dataclass(frozen=True)
class Chunk:
    """One piece of a document, the unit that is embedded and retrieved.

    Attributes:
        id: ``sha256(doc_id, text + full context, occurrence)`` truncated to 32 hex
            characters (see :func:`chunk_document`).
        doc_id: id of the document it comes from.
        index: position in the document, from 0.
        text: the text embedded and stored: context line, blank line, body.
        heading: heading path inside the document (``"Install > From source"``) or ``""``.
    """

    id: str
    doc_id: str
    index: int
    text: str
    heading: str


def chunk_id(doc_id: str, text: str, occurrence: int = 0) -> str:
    """Stable chunk id from its document id and its own text.

    ``occurrence`` tells apart identical texts inside one document (the n-th copy).
    """
    digest = hashlib.sha256(f"{doc_id}\0{occurrence}\0{text}".encode()).hexdigest()
    return digest[:32]


def _markdown_sections(text: str) -> list[tuple[str, str]]:
    """Split Markdown by headers into ``(heading path, body)`` pairs, in order.

    Code blocks that the splitter returns on their own are merged back into their
    section so an example stays next to its explanation.
    """
    splitter = ExperimentalMarkdownSyntaxTextSplitter(headers_to_split_on=HEADERS,
                                                      strip_headers=True)
    sections: list[tuple[str, str]] = []
    for part in splitter.split_text(text):
        heading = HEADING_SEPARATOR.join(
            str(part.metadata[key]) for _, key in HEADERS if key in part.metadata
        )
        if sections and sections[-1][0] == heading:
            sections[-1] = (heading, sections[-1][1] + part.page_content)
        else:
            sections.append((heading, part.page_content))
    return [(h, body) for h, body in sections if body.strip()]


@lru_cache(maxsize=64)
def _splitter(kind: str, chunk_size: int, overlap: int,
              counter: TokenCounter) -> RecursiveCharacterTextSplitter:
    kwargs = {"chunk_size": chunk_size, "chunk_overlap": min(overlap, chunk_size // 2),
              "length_function": counter}
    if kind in {lang.value for lang in Language}:
        return RecursiveCharacterTextSplitter.from_language(Language(kind), **kwargs)
    return RecursiveCharacterTextSplitter(**kwargs)


def _context_line(title: str, heading: str, counter: TokenCounter, max_tokens: int) -> str:
    """The first of ``transforms.context.context_lines`` that takes at most a third of
    the token budget, or ``""``."""
    for line in context_lines(title, heading):
        if counter(line) <= max_tokens // 3:
            return line
    return ""


def _reserved_tokens(title: str, heading: str, counter: TokenCounter, max_tokens: int) -> int:
    """Tokens a section's bodies leave free: those of ``"title > heading path" + "\n\n"``
    (the full context line), shortened to at most a third of the budget by dropping the
    outermost heading first and the title last.

    Bodies are cut to the size they would have under the full line even though only the
    short line is embedded: larger bodies (the budget the short line leaves) rank worse
    in the lexical index (AWS dev set, 800 pages: lexical MRR 0.835 -> 0.826), while
    these keep it (0.834) and still embed 16% fewer tokens than the full line.
    """
    parts = [p for p in [title, *headings(heading)] if p]
    while parts:
        n = counter(HEADING_SEPARATOR.join(parts))
        if n <= max_tokens // 3:
            return counter(HEADING_SEPARATOR.join(parts) + "\n\n")
        parts = parts[:1] + parts[2:] if len(parts) > 2 else parts[1:]
    return 0


def split_text(text: str, *, fmt: str, language: str | None, config: ChunkingConfig,
               counter: TokenCounter, title: str = "") -> list[tuple[str, str]]:
    """Cut ``text`` into ``(heading path, chunk text)`` pairs that fit ``config.max_tokens``.

    Args:
        text: the normalized document text.
        fmt: ``"markdown"``, ``"code"`` or ``"text"``.
        language: programming language of code (``langchain_text_splitters.Language``
            values get language-aware separators).
        config: token budget and overlap.
        counter: counts the embedding model's tokens in a string.
        title: document title, written into each chunk's context line.

    Returns:
        Chunk texts with their heading paths; each chunk text is
        ``context line + "\\n\\n" + body`` and measures at most ``config.max_tokens``.
    """
    if fmt == "markdown":
        sections = _markdown_sections(text)
        kind = Language.MARKDOWN.value
    else:
        sections = [("", text)]
        kind = language if fmt == "code" and language else "text"

    out: list[tuple[str, str]] = []
    for heading, body in sections:
        context = _context_line(title, heading, counter, config.max_tokens)
        budget = config.max_tokens - max(
            _reserved_tokens(title, heading, counter, config.max_tokens),
            counter(context + "\n\n") if context else 0)
        pieces = _fit(body, kind, budget, config.overlap_tokens, counter)
        for piece in pieces:
            out.append((heading, f"{context}\n\n{piece}" if context else piece))
    return out


def _fit(body: str, kind: str, budget: int, overlap: int, counter: TokenCounter) -> list[str]:
    """Recursively split ``body`` until every piece counts at most ``budget`` tokens.

    The recursive splitter adds lengths of pieces, which for word pieces is a close but
    not exact estimate of the joined text; pieces that still overflow are split again
    with a smaller size.
    """
    out: list[str] = []
    for piece in _splitter(kind, budget, overlap, counter).split_text(body):
        if not piece.strip():
            continue
        if counter(piece) <= budget:
            out.append(piece)
        elif budget > 8:
            out.extend(_fit(piece, "text", budget * 3 // 4, overlap // 2, counter))
        else:  # a single unsplittable token run; keep it rather than lose text
            out.append(piece)
    return out


def chunk_document(doc_id: str, text: str, *, fmt: str = "text", language: str | None = None,
                   title: str = "", config: ChunkingConfig,
                   counter: TokenCounter) -> list[Chunk]:
    """Chunks of one document, with stable ids (see :func:`split_text` for the cutting).

    A chunk's id hashes its embedded text and its full context
    (``transforms.context.full_context``: the title and whole heading path, which the
    lexical index reads): a renamed outer heading or title leaves the short embedded line
    unchanged, and the new id makes the sync rewrite the chunk in both indexes instead of
    updating its metadata alone.

    Returns an empty list for a document with no text.
    """
    seen: dict[str, int] = {}
    chunks: list[Chunk] = []
    for heading, chunk_text in split_text(text, fmt=fmt, language=language, config=config,
                                          counter=counter, title=title):
        key = f"{chunk_text}\0{full_context(title, heading)}"
        occurrence = seen.get(key, 0)
        seen[key] = occurrence + 1
        chunks.append(Chunk(id=chunk_id(doc_id, key, occurrence), doc_id=doc_id,
                            index=len(chunks), text=chunk_text, heading=heading))
    return chunks

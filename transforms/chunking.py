"""Text -> chunks, sized in the embedding model's tokens (langchain-text-splitters).

* Markdown is split by headers first (``ExperimentalMarkdownSyntaxTextSplitter``, which
  keeps whitespace and code-block indentation, unlike ``MarkdownHeaderTextSplitter``),
  then each section recursively with Markdown separators.
* Code is split with ``RecursiveCharacterTextSplitter.from_language`` for the language.
* Anything else is split recursively on paragraphs, lines, words.

Whole blocks (paragraphs, lists, tables, fenced examples, functions) are packed into a
chunk with no overlap; only a block longer than the budget is cut inside, with
``overlap_tokens`` repeated across each cut (LangChain's splitter repeats its overlap
across every cut, even between two paragraphs). Markdown loses the markup that carries no
words before it is cut (:func:`drop_wordless_markup`: empty HTML anchors, backslash
escapes, ``{#id}`` heading ids; code untouched).

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
import re
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
#: 3: markup with no words is dropped (empty HTML anchors, backslash escapes, ``{#id}``
#: heading ids; code untouched); overlap only where a cut falls inside a block.
ALGORITHM_VERSION = 3


@dataclass(frozen=True)
class ChunkingConfig:
    """How documents are cut.

    Attributes:
        max_tokens: most tokens in one chunk's text, context line included. Set it to
            the model's ``max_seq_length`` minus its special tokens.
        overlap_tokens: tokens repeated across a cut inside one block (a paragraph, a
            list, a code block longer than a chunk); none across a cut between blocks.
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


#: An HTML anchor with no content (``<a name="x"></a>``, ``<a id='x'/>``): a link target
#: that renders as nothing (the AWS docs end every heading with one).
_EMPTY_ANCHOR = re.compile(
    r"""<a\s+(?:name|id)\s*=\s*(?:"[^"]*"|'[^']*')\s*(?:/>|>\s*</a>)""", re.IGNORECASE)
#: A backslash escape of ASCII punctuation (CommonMark 0.31.2, section 2.4
#: https://spec.commonmark.org/0.31.2/#backslash-escapes), except ``\|``: inside a table
#: cell it is what keeps the pipe from splitting the cell.
_ESCAPE = re.compile(r"\\([!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{}~])")
#: A heading's explicit id at its end (``## Install {#install}``: Pandoc, markdown-it-attrs,
#: Diplodoc/YFM).
_HEADING_ID = re.compile(r"\s*\{#[^}\s]*\}\s*$")
_HEADING_LINE = re.compile(r"^ {0,3}#{1,6}\s")
#: A code fence, at any indentation (fences inside list items are indented).
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
#: An inline code span (CommonMark 6.1: a backtick run closed by a run of equal length).
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)")
#: An indented line that is a list item (prose), not an indented code block.
_LIST_ITEM = re.compile(r"^\s*(?:[-+*]|\d{1,9}[.)])\s")


def _prose_without_markup(text: str) -> str:
    """``text`` (prose, no code) without empty anchors and backslash escapes."""
    return _ESCAPE.sub(r"\1", _EMPTY_ANCHOR.sub("", text))


def _line_without_markup(line: str) -> str:
    """A Markdown line outside code blocks without wordless markup; its inline code
    spans are kept as they are."""
    if _HEADING_LINE.match(line):
        content = line.rstrip("\r\n")
        line = _HEADING_ID.sub("", content) + line[len(content):]
    parts, pos = [], 0
    for span in _CODE_SPAN.finditer(line):
        parts += [_prose_without_markup(line[pos:span.start()]), span.group(0)]
        pos = span.end()
    parts.append(_prose_without_markup(line[pos:]))
    return "".join(parts)


def drop_wordless_markup(text: str) -> str:
    """Markdown ``text`` without the markup that carries no words, which the embedding
    model would otherwise be paid to read on every chunk.

    Dropped: empty HTML anchors (``<a name="x"></a>``), backslash escapes of punctuation
    (``DynamoDB\\.`` -> ``DynamoDB.``; ``\\|`` is kept) and a heading's ``{#id}``. Code is
    untouched: fenced blocks, inline code spans, and lines indented four or more spaces
    that are not list items (indented code blocks). On the 300 AWS pages of
    ``benchmarks/langchain_compare.py`` this markup is 17% of the model's tokens (787,316
    tokens in 4,873 chunks with it, 649,966 in 4,099 without).

    Args:
        text: Markdown.

    Returns:
        The text, line for line (no line is added or removed).
    """
    out: list[str] = []
    fence = ""
    for line in text.splitlines(keepends=True):
        opened = _FENCE.match(line)
        if fence:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence) \
                    and not line[opened.end():].strip():
                fence = ""
            out.append(line)
        elif opened:
            fence = opened.group(1)
            out.append(line)
        elif line.startswith(("    ", "\t")) and not _LIST_ITEM.match(line):
            out.append(line)
        else:
            out.append(_line_without_markup(line))
    return "".join(out)


def heading_text(heading: str) -> str:
    """A heading's words: without its ``{#id}``, empty anchors and backslash escapes."""
    return _line_without_markup(f"# {heading}")[2:].strip()


def _markdown_sections(text: str) -> list[tuple[str, str]]:
    """Split Markdown by headers into ``(heading path, body)`` pairs, in order.

    Code blocks that the splitter returns on their own are merged back into their
    section so an example stays next to its explanation. Headings and bodies are without
    wordless markup (:func:`drop_wordless_markup`, :func:`heading_text`).
    """
    splitter = ExperimentalMarkdownSyntaxTextSplitter(headers_to_split_on=HEADERS,
                                                      strip_headers=True)
    sections: list[tuple[str, str]] = []
    for part in splitter.split_text(text):
        heading = HEADING_SEPARATOR.join(
            heading_text(str(part.metadata[key])) for _, key in HEADERS if key in part.metadata
        )
        if sections and sections[-1][0] == heading:
            sections[-1] = (heading, sections[-1][1] + part.page_content)
        else:
            sections.append((heading, part.page_content))
    return [(h, drop_wordless_markup(body)) for h, body in sections if body.strip()]


#: The separators of text with no language: paragraphs, lines, words, characters.
_TEXT_SEPARATORS = ["\n\n", "\n", " ", ""]


def separators(kind: str) -> tuple[list[str], list[str], bool]:
    """``(block separators, separators inside a block, are regexes)`` for a kind of text.

    The separators are langchain's for the language
    (``RecursiveCharacterTextSplitter.get_separators_for_language``; headings, code
    fences and rules for Markdown, ``class``/``def`` for Python, ...), split after the
    blank line: a *block* is what lies between blank lines or larger boundaries (a
    paragraph, a list, a table, a fenced example, a function). A language langchain does
    not cut (``Language.PERL`` has no separators) and plain text get
    :data:`_TEXT_SEPARATORS`.
    """
    seps, regex = _TEXT_SEPARATORS, False
    if kind in {lang.value for lang in Language}:
        try:
            seps = RecursiveCharacterTextSplitter.get_separators_for_language(Language(kind))
            regex = True
        except ValueError:  # a Language member with no separators (langchain raises)
            pass
    blank = next((i for i, sep in enumerate(seps) if sep in ("\n\n", r"\n\n")), None)
    if blank is None:  # no blank-line level: everything above lines is a block boundary
        return ([sep for sep in seps if sep not in _TEXT_SEPARATORS[1:]],
                _TEXT_SEPARATORS[1:], regex)
    return list(seps[:blank + 1]), list(seps[blank + 1:]), regex


@lru_cache(maxsize=128)
def _splitter(kind: str, level: str, chunk_size: int, overlap: int,
              counter: TokenCounter) -> RecursiveCharacterTextSplitter:
    """A langchain recursive splitter on ``kind``'s block separators (``level="blocks"``)
    or on those inside a block (``level="inside"``)."""
    blocks, inside, regex = separators(kind)
    return RecursiveCharacterTextSplitter(
        separators=blocks if level == "blocks" else inside, is_separator_regex=regex,
        keep_separator=True, chunk_size=chunk_size,
        chunk_overlap=min(overlap, chunk_size // 2), length_function=counter)


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
    """Cut ``body`` into pieces of at most ``budget`` tokens.

    Whole blocks (see :func:`separators`) are packed into pieces with no overlap: a cut
    between two blocks splits no sentence, so repeating text across it would only cost
    tokens (LangChain's splitter repeats ``chunk_overlap`` across every cut). A block
    longer than the budget is cut by :func:`_cut_block`, with ``overlap`` tokens
    repeated across each cut inside it.
    """
    out: list[str] = []
    for piece in _splitter(kind, "blocks", budget, 0, counter).split_text(body):
        if not piece.strip():
            continue
        if counter(piece) <= budget:
            out.append(piece)
        else:
            out.extend(_cut_block(piece, kind, budget, overlap, counter))
    return out


def _cut_block(block: str, kind: str, budget: int, overlap: int,
               counter: TokenCounter) -> list[str]:
    """Cut one block longer than ``budget`` at lines, then words, with ``overlap`` tokens
    repeated across the cuts.

    The recursive splitter adds the lengths of pieces, which for word pieces is a close
    but not exact estimate of the joined text; pieces that still overflow are cut again
    with a smaller size.
    """
    out: list[str] = []
    for piece in _splitter(kind, "inside", budget, overlap, counter).split_text(block):
        if not piece.strip():
            continue
        if counter(piece) <= budget:
            out.append(piece)
        elif budget > 8:
            out.extend(_cut_block(piece, "text", budget * 3 // 4, overlap // 2, counter))
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

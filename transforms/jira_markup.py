"""Jira wiki markup and Atlassian Document Format (ADF) -> Markdown-like text. Pure.

Jira Server/Data Center (and Cloud's REST v2) return descriptions and comment bodies
as *wiki markup*; Cloud's REST v3 returns them as ADF JSON. Both become Markdown that
keeps what matters for chunking and for an LLM reading a chunk: headings, lists,
tables, code blocks (verbatim, with their language), quotes, links with their targets,
mentions and emphasis.

* :func:`wiki_to_markdown` — wiki markup (text formatting notation:
  https://jira.atlassian.com/secure/WikiRendererHelpAction.jspa?section=all).
  ``{code}``/``{noformat}`` bodies are copied byte for byte into fenced blocks;
  ``h1.``..``h6.``, ``*``/``#``/``-`` lists, ``||header||`` and ``|cell|`` tables,
  ``{quote}``/``bq.``, ``[text|url]``, ``[~user]``, ``[^attachment]``, ``!image!``,
  ``{{monospace}}``, ``*bold*``, ``\\\\`` line breaks and ``\\``-escapes are converted;
  ``{color}``, ``{panel}`` and ``{anchor}`` wrappers are dropped (their text stays).
  Everything else is left as written (``_italic_`` is already Markdown).
* :func:`adf_to_markdown` — an ADF document
  (https://developer.atlassian.com/cloud/jira/platform/apis/document/structure/);
  unknown node types keep their text.
* :func:`issue_markdown` — one issue as one Markdown document: a short facts line,
  ``## Description`` and ``## Comments`` with one ``### <author>, <date>`` section per
  comment, so a chunk of a comment carries who said it and when in its heading path.

The converter is a line-oriented pass with regular expressions (about 2 MB/s on the
Titanium archive); the PEG-based ``jira2markdown`` package measured 7 KB/s on the same
text, too slow to sit in front of the embedding model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

# ------------------------------------------------------------------ wiki markup

#: Private-use characters mark placeholders; they are removed from the input first.
_PRIVATE_USE = re.compile("[\ue000-\ue0ff]")
_BLOCK_START, _BLOCK_END = "\ue000", "\ue001"
_SPAN_START, _SPAN_END = "\ue002", "\ue003"
_BLOCK_REF = re.compile(f"^(?P<prefix>[> ]*){_BLOCK_START}(?P<n>\\d+){_BLOCK_END}\\s*$", re.M)
_SPAN_REF = re.compile(f"{_SPAN_START}(\\d+){_SPAN_END}")

_PREFORMATTED = re.compile(r"\{(code|noformat)(?::([^}\n]*))?\}(.*?)\{\1\}", re.S | re.I)
_ESCAPABLE = "*_{}[]|!+-^~?#"
_ESCAPE = re.compile(r"\\([" + re.escape(_ESCAPABLE) + r"])")
_ESCAPED_CHAR = {c: chr(0xE010 + i) for i, c in enumerate(_ESCAPABLE)}
_UNESCAPE = str.maketrans({v: k for k, v in _ESCAPED_CHAR.items()})

_MONOSPACE = re.compile(r"\{\{(.+?)\}\}")
_LINK = re.compile(r"\[([^\[\]\n]+)\]")
_IMAGE = re.compile(
    r"(?<![\w!])!((?:https?://[^\s!|]+)|(?:[^\s!|][^!\n|]*?\.(?:png|jpe?g|gif|svg|bmp|webp)))"
    r"(?:\|[^!\n]*)?!", re.I)
_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|mailto:|www\.)", re.I)
_ISSUE_KEY = re.compile(r"^[A-Z][A-Z0-9_]+-\d+$")
_DROPPED_MACROS = re.compile(r"\{(?:color|anchor)(?::[^}\n]*)?\}", re.I)
_WRAPPER_MACRO = re.compile(r"\{(quote|panel(?::[^}\n]*)?)\}", re.I)
_BOLD = re.compile(r"(?<![\w*])\*(?![\s*])([^*\n]+?)(?<!\s)\*(?![\w*])")
_HEADING = re.compile(r"^\s*h([1-6])\.\s*(.*)$")
_BLOCKQUOTE = re.compile(r"^\s*bq\.\s+(.*)$")
_LIST_ITEM = re.compile(r"^\s*([*#]+|-)\s+(.*)$")
_RULE = re.compile(r"^\s*-{4,}\s*$")
_CELL_SPLIT = re.compile(r"\|\|?")


def _fence(body: str, language: str = "") -> str:
    """A fenced code block around ``body``, longer than any backtick run inside it."""
    longest = max((len(m) for m in re.findall(r"`+", body)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{body}\n{fence}"


def _code_params(params: str | None) -> tuple[str, str]:
    """``(language, title)`` from ``{code:...}`` parameters (``java``, ``lang=js|title=a.js``)."""
    language = title = ""
    for part in (params or "").split("|"):
        part = part.strip()
        if not part:
            continue
        m = re.match(r"([^=:]+?)\s*[=:]\s*(.*)$", part)
        if m is None:
            language = language or part.lower()
        elif m.group(1).lower() in ("lang", "language"):
            language = m.group(2).strip().lower()
        elif m.group(1).lower() == "title":
            title = m.group(2).strip()
    if language in ("none", "text", "plain"):
        language = ""
    return re.sub(r"[^a-z0-9_+#.-]", "", language), title


def _inline_code(text: str) -> str:
    ticks = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _link(inner: str) -> str | None:
    """Markdown for the inside of a ``[...]`` link, or None when it is not a link."""
    inner = inner.strip()
    if inner.startswith("~"):  # [~username] or [~accountid:5b10...]
        return "@" + inner[1:].removeprefix("accountid:")
    if inner.startswith("^"):  # [^attachment.zip]
        return inner[1:]
    text, bar, target = inner.partition("|")
    text, target = text.strip(), target.partition("|")[0].strip()
    if not bar:
        if _URL.match(text):
            return f"<{text}>"
        if _ISSUE_KEY.match(text) or text.startswith("#"):
            return text.lstrip("#")
        return None
    if _URL.match(target):
        return f"[{text or target}]({target})"
    if target.startswith("~"):
        return text or "@" + target[1:]
    if target.startswith("^"):
        return f"{text} ({target[1:]})" if text else target[1:]
    return f"{text} ({target.lstrip('#')})" if text and target else text or target


def wiki_to_markdown(text: str | None, heading_offset: int = 0) -> str:
    """Convert Jira wiki markup to Markdown.

    Args:
        text: a description or comment body in wiki markup (``None`` -> ``""``).
        heading_offset: added to every heading level (``h1.`` with offset 2 -> ``###``),
            so a description's headings nest under the document's own sections; levels
            past 6 stay at 6.

    Returns:
        Markdown text with ``\\n`` line ends, no trailing whitespace, at most one blank
        line in a row outside code blocks. Never raises on odd input: markup it does not
        recognise is kept as written.
    """
    if not text:
        return ""
    text = _PRIVATE_USE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    blocks: list[str] = []
    spans: list[str] = []

    def block(match: re.Match[str]) -> str:
        language, title = _code_params(match.group(2))
        body = match.group(3).strip("\n").rstrip()
        body = re.sub(r"^[ \t]*\n", "", body)
        rendered = _fence(body, language)
        if title:
            rendered = f"{title}:\n{rendered}"
        blocks.append(rendered)
        return f"\n{_BLOCK_START}{len(blocks) - 1}{_BLOCK_END}\n"

    def span(rendered: str) -> str:
        spans.append(rendered)
        return f"{_SPAN_START}{len(spans) - 1}{_SPAN_END}"

    def link(match: re.Match[str]) -> str:
        rendered = _link(match.group(1))
        return match.group(0) if rendered is None else span(rendered)

    text = _PREFORMATTED.sub(block, text)
    text = text.replace("\\\\", "\n")
    text = _ESCAPE.sub(lambda m: _ESCAPED_CHAR[m.group(1)], text)
    text = _MONOSPACE.sub(lambda m: span(_inline_code(m.group(1).translate(_UNESCAPE))), text)
    text = _LINK.sub(link, text)
    text = _IMAGE.sub(lambda m: span(f"![]({m.group(1)})"), text)
    text = _DROPPED_MACROS.sub("", text)
    text = _WRAPPER_MACRO.sub(lambda m: "\n{" + m.group(1) + "}\n", text)

    out: list[str] = []
    in_quote = False
    in_table = False
    for line in text.split("\n"):
        stripped = line.strip()
        lowered = stripped.lower()
        if lowered == "{quote}" or lowered.startswith("{panel"):
            if lowered == "{quote}":
                in_quote = not in_quote
            else:
                title = re.search(r"title=([^|}]*)", stripped)
                if title and title.group(1).strip():
                    out.append(f"**{title.group(1).strip()}**")
            in_table = False
            continue
        prefix = "> " if in_quote else ""
        if stripped.startswith("|"):
            cells = [_BOLD.sub(r"**\1**", c.strip())
                     for c in _CELL_SPLIT.split(stripped.strip("|"))]
            if not in_table:
                if out and out[-1].strip(" >"):
                    out.append(prefix.rstrip())
                out.append(prefix + "| " + " | ".join(cells) + " |")
                out.append(prefix + "|" + "|".join(" --- " for _ in cells) + "|")
                in_table = True
            else:
                out.append(prefix + "| " + " | ".join(cells) + " |")
            continue
        if in_table and stripped:
            out.append(prefix.rstrip())
        in_table = False
        if stripped.startswith(_BLOCK_START):
            out.append(prefix + stripped)
            continue
        if m := _HEADING.match(line):
            level = min(6, int(m.group(1)) + heading_offset)
            converted = "#" * level + " " + _BOLD.sub(r"\1", m.group(2).strip())
        elif m := _BLOCKQUOTE.match(line):
            converted = "> " + _BOLD.sub(r"**\1**", m.group(1))
        elif m := _LIST_ITEM.match(line):
            markers = m.group(1)
            indent = "".join("   " if c == "#" else "  " for c in markers[:-1])
            bullet = "1. " if markers[-1] == "#" else "- "
            converted = indent + bullet + _BOLD.sub(r"**\1**", m.group(2))
        elif _RULE.match(line):
            converted = "---"
        else:
            converted = _BOLD.sub(r"**\1**", line.rstrip())
        out.append(prefix + converted if converted else prefix.rstrip())

    result = "\n".join(out)
    for _ in range(3):  # spans may hold spans (a link around monospace text)
        if _SPAN_START not in result:
            break
        result = _SPAN_REF.sub(lambda m: spans[int(m.group(1))], result)
    result = result.translate(_UNESCAPE)

    def restore_block(match: re.Match[str]) -> str:
        prefix = match.group("prefix")
        rendered = blocks[int(match.group("n"))]
        return "\n".join((prefix + ln).rstrip() if prefix else ln
                         for ln in rendered.split("\n"))

    result = _BLOCK_REF.sub(restore_block, result)
    return _tidy(result)


def _tidy(text: str) -> str:
    """Strip trailing spaces and collapse blank-line runs, leaving code fences intact."""
    out: list[str] = []
    fence: str | None = None
    blank = 0
    for line in text.split("\n"):
        bare = line.lstrip("> ")
        if fence is None:
            line = line.rstrip()
            if m := re.match(r"(`{3,})", bare):
                fence = m.group(1)
        elif bare.rstrip() == fence:
            fence = None
        if fence is None and not line.strip(" >"):
            blank += 1
            if blank > 1:
                continue
        else:
            blank = 0
        out.append(line)
    return "\n".join(out).strip("\n")


# -------------------------------------------------------------------------- ADF


def _adf_text(node: Mapping[str, Any]) -> str:
    """A text node with its marks as Markdown."""
    text = str(node.get("text", ""))
    marks = {m.get("type"): m.get("attrs") or {} for m in node.get("marks") or []
             if isinstance(m, Mapping)}
    if not text:
        return ""
    if "code" in marks:
        text = _inline_code(text)
    else:
        if "strong" in marks:
            text = f"**{text}**"
        if "em" in marks:
            text = f"*{text}*"
        if "strike" in marks:
            text = f"~~{text}~~"
    if "link" in marks and marks["link"].get("href"):
        text = f"[{text}]({marks['link']['href']})"
    return text


def _children(node: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    content = node.get("content")
    return [c for c in content if isinstance(c, Mapping)] if isinstance(content, list) else []


def _adf_inline(nodes: Iterable[Mapping[str, Any]]) -> str:
    parts: list[str] = []
    for node in nodes:
        kind, attrs = node.get("type"), node.get("attrs") or {}
        if kind == "text":
            parts.append(_adf_text(node))
        elif kind == "hardBreak":
            parts.append("\n")
        elif kind == "mention":
            parts.append("@" + str(attrs.get("text") or attrs.get("id") or "").lstrip("@"))
        elif kind == "emoji":
            parts.append(str(attrs.get("text") or attrs.get("shortName") or ""))
        elif kind == "inlineCard":
            parts.append(str(attrs.get("url") or ""))
        elif kind == "status":
            parts.append(f"[{attrs.get('text', '')}]")
        elif kind == "date":
            try:
                stamp = datetime.fromtimestamp(int(attrs.get("timestamp")) / 1000, UTC)
                parts.append(stamp.date().isoformat())
            except (TypeError, ValueError, OverflowError):
                pass
        elif _children(node):
            parts.append(_adf_inline(_children(node)))
        elif attrs.get("text"):
            parts.append(str(attrs["text"]))
    return "".join(parts)


def _indent(text: str, first: str, rest: str) -> str:
    lines = text.split("\n")
    return "\n".join([first + lines[0]] + [(rest + ln) if ln else ln for ln in lines[1:]])


def _adf_cell(cell: Mapping[str, Any], ctx: dict[str, int]) -> str:
    text = _adf_blocks(_children(cell), ctx)
    return " ".join(text.split("\n")).replace("|", "\\|").strip()


def _adf_block(node: Mapping[str, Any], ctx: dict[str, int]) -> str:
    kind, attrs = node.get("type"), node.get("attrs") or {}
    children = _children(node)
    if kind == "paragraph":
        return _adf_inline(children)
    if kind == "heading":
        try:
            level = int(attrs.get("level", 1))
        except (TypeError, ValueError):
            level = 1
        return "#" * min(6, max(1, level) + ctx["offset"]) + " " + _adf_inline(children)
    if kind in ("bulletList", "orderedList", "taskList", "decisionList"):
        items = []
        start = attrs.get("order", 1) if kind == "orderedList" else 1
        for i, item in enumerate(children):
            if kind == "orderedList":
                marker = f"{(start if isinstance(start, int) else 1) + i}. "
            elif kind == "taskList":
                done = (item.get("attrs") or {}).get("state") == "DONE"
                marker = "- [x] " if done else "- [ ] "
            else:
                marker = "- "
            if item.get("type") in ("taskItem", "decisionItem"):
                body = _adf_inline(_children(item))
            else:
                body = _adf_blocks(_children(item), ctx, separator="\n")
            items.append(_indent(body, marker, " " * len(marker)))
        return "\n".join(items)
    if kind == "codeBlock":
        body = "".join(str(c.get("text", "")) for c in children)
        language = re.sub(r"[^a-z0-9_+#.-]", "", str(attrs.get("language") or "").lower())
        return _fence(body.rstrip("\n"), language)
    if kind == "blockquote":
        return _indent(_adf_blocks(children, ctx), "> ", "> ").replace("\n\n", "\n>\n")
    if kind == "rule":
        return "---"
    if kind == "table":
        rows = [[_adf_cell(c, ctx) for c in _children(row)] for row in children]
        rows = [r for r in rows if r]
        if not rows:
            return ""
        lines = ["| " + " | ".join(rows[0]) + " |",
                 "|" + "|".join(" --- " for _ in rows[0]) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(lines)
    if kind in ("expand", "nestedExpand"):
        body = _adf_blocks(children, ctx)
        title = str(attrs.get("title") or "").strip()
        return f"**{title}**\n\n{body}" if title else body
    if kind in ("blockCard", "embedCard"):
        return str(attrs.get("url") or "")
    if kind in ("media", "mediaSingle", "mediaGroup", "mediaInline"):
        alts = [str((c.get("attrs") or {}).get("alt") or "") for c in [node, *children]]
        return " ".join(f"![]({a})" for a in alts if a)
    if kind in ("extension", "inlineExtension"):
        return ""
    if kind == "text" or kind in ("mention", "emoji", "inlineCard", "hardBreak", "status",
                                  "date"):
        return _adf_inline([node])
    if children:  # doc, panel, layoutSection, layoutColumn, bodiedExtension, unknown
        return _adf_blocks(children, ctx)
    return str(attrs.get("text") or node.get("text") or "")


def _adf_blocks(nodes: Sequence[Mapping[str, Any]], ctx: dict[str, int],
                separator: str = "\n\n") -> str:
    parts = [p for p in (_adf_block(n, ctx) for n in nodes) if p.strip()]
    return separator.join(parts)


def adf_to_markdown(doc: Mapping[str, Any] | None, heading_offset: int = 0) -> str:
    """Convert an Atlassian Document Format document to Markdown.

    Args:
        doc: the ADF JSON (``{"type": "doc", "version": 1, "content": [...]}``), or any
            ADF node; ``None`` -> ``""``.
        heading_offset: added to every heading level (capped at 6).

    Returns:
        Markdown text. Unknown node types keep the text of their children, so a new
        node kind loses its formatting, never its words.

    Raises:
        TypeError: ``doc`` is not a mapping (a body that is neither text nor ADF).
    """
    if doc is None:
        return ""
    if not isinstance(doc, Mapping):
        raise TypeError(f"ADF document must be a JSON object, not {type(doc).__name__}")
    return _tidy(_adf_block(doc, {"offset": heading_offset}))


def to_markdown(body: str | Mapping[str, Any] | None, heading_offset: int = 0) -> str:
    """Wiki markup (a string) or ADF (a JSON object) -> Markdown; ``None`` -> ``""``."""
    if body is None or isinstance(body, str):
        return wiki_to_markdown(body, heading_offset)
    return adf_to_markdown(body, heading_offset)


# ------------------------------------------------------------------------ issue


def jira_time(value: str | None) -> datetime | None:
    """Parse a Jira timestamp (``2017-10-17T22:54:17.000+0000``) to an aware UTC datetime."""
    if not value:
        return None
    return datetime.fromisoformat(value).astimezone(UTC)


def _when(value: str | None) -> str:
    stamp = jira_time(value)
    return stamp.strftime("%Y-%m-%d %H:%M UTC") if stamp else ""


def person(user: Mapping[str, Any] | None) -> str | None:
    """A user object's readable name (``displayName``, else ``name``/``accountId``)."""
    if not isinstance(user, Mapping):
        return None
    return user.get("displayName") or user.get("name") or user.get("accountId") or None


def comment_heading(comment: Mapping[str, Any]) -> str:
    """``"Ewan Harris, 2017-10-17 09:05 UTC"`` (plus ``(edited ...)`` when edited later)."""
    author = person(comment.get("author")) or "unknown"
    heading = f"{author}, {_when(comment.get('created'))}".rstrip(", ")
    created, updated = comment.get("created"), comment.get("updated")
    if updated and created and updated != created:
        heading += f" (edited {_when(updated)})"
    return heading


def issue_markdown(fields: Mapping[str, Any], comments: Sequence[Mapping[str, Any]],
                   facts: Sequence[tuple[str, str | None]] = ()) -> str:
    """One issue as Markdown: facts line, ``## Description``, ``## Comments``.

    Args:
        fields: the issue's ``fields`` (``description`` as wiki markup or ADF).
        comments: every comment (``author``, ``created``, ``updated``, ``body``), oldest
            first.
        facts: ``(label, value)`` pairs written as the first line
            (``Type: Bug · Status: Open``); empty values are left out.

    Returns:
        Markdown. Description headings start at ``###`` and comment headings at
        ``####``, below the document's own sections; an empty description leaves its
        section out.
    """
    parts: list[str] = []
    line = " · ".join(f"{label}: {value}" for label, value in facts if value)
    if line:
        parts.append(line)
    description = to_markdown(fields.get("description"), heading_offset=2)
    if description.strip():
        parts.append("## Description\n\n" + description)
    rendered = []
    for comment in comments:
        body = to_markdown(comment.get("body"), heading_offset=3)
        rendered.append(f"### {comment_heading(comment)}\n\n{body}".rstrip())
    if rendered:
        parts.append("## Comments\n\n" + "\n\n".join(rendered))
    return "\n\n".join(parts)

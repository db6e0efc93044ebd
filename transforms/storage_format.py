"""Confluence storage format (XHTML with ``ac:``/``ri:`` elements) -> Markdown-like text.

Pure: no I/O. The storage format is the XHTML Confluence keeps for a page body
(``body.storage.value``), documented at
https://confluence.atlassian.com/doc/confluence-storage-format-790796544.html.
It is parsed with BeautifulSoup's ``html.parser`` — the one bundled parser that keeps
``<![CDATA[...]]>`` sections (the bodies of code macros and link labels) verbatim; lxml's
HTML parser turns them into comments and its XML parser rejects the undeclared
``ac:``/``ri:`` prefixes and HTML entities.

What the text keeps, so chunks keep their structure and the LLM reads clean context:

* headings (``#`` .. ``######``), paragraphs, line breaks, bold/italic/strike/inline code;
* lists (nested, ordered with their start number) and task lists (``- [x]``/``- [ ]``);
* tables as Markdown tables (first row is the header; ``|`` escaped; line breaks
  inside a cell become ``<br>``; ``colspan`` padded);
* ``code`` and ``noformat`` macros and ``<pre>`` as fenced code blocks, with the
  macro's ``language`` and its ``title`` on the line before;
* the body of ``info``/``note``/``warning``/``tip``/``panel`` macros as a quoted block
  headed ``**Note:** title``; ``expand`` as its title in bold followed by its body;
  ``details`` (page properties) as its body;
* links: ``ac:link`` to a page or blog post as ``[[Title]]`` (``[[Title|label]]`` when
  the label differs), to an attachment as ``[[file.pdf]]``, to a URL as
  ``[label](url)``; ``<a href>`` as ``[label](href)``; user mentions as ``@Name``
  (names come from ``users``; see :func:`mentioned_users`); images as ``![alt](file)``;
* ``jira`` macros as their issue key, ``status`` macros as ``[STATUS]``, diagram
  macros (drawio, gliffy) as ``[diagram: name]``, ``<time>`` as its date.

What it drops without losing the text inside: ``toc`` and the other navigation and
report macros (:data:`DROPPED_MACROS`), layout wrappers (``ac:layout*``), emoticons,
inline-comment markers, editor placeholders. A macro it does not know keeps its body
(rich text, or plain text such as a ``markdown`` macro's) rather than vanishing; its
parameters are configuration, not text, and are never output.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bs4 import BeautifulSoup, CData, Comment, Doctype, MarkupResemblesLocatorWarning, Tag
from bs4.element import Declaration, NavigableString, ProcessingInstruction

#: Element nesting deeper than this is treated as a malformed body (a real page is
#: rarely deeper than 30; the renderer recurses once per level).
MAX_DEPTH = 150

#: Macros that render navigation, reports or embedded widgets: no knowledge of the page.
DROPPED_MACROS = frozenset({
    "toc", "toc-zone-marker", "children", "pagetree", "pagetreesearch", "recently-updated",
    "recently-updated-dashboard", "contentbylabel", "content-report-table",
    "detailssummary", "create-from-template", "attachments", "blog-posts", "livesearch",
    "search", "anchor", "include", "excerpt-include", "gallery", "profile",
    "profile-picture", "tasks-report-macro", "popular-labels", "listlabels", "related-labels",
    "space-details", "spaces", "favpages", "page-index", "navmap", "contributors",
    "contributors-summary", "change-history", "view-file", "viewpdf", "viewdoc", "viewxls",
    "viewppt", "multimedia", "widget", "gadget", "jirachart", "jira-chart", "roadmap",
    "index", "im", "userlister", "network", "calendar", "team-calendar", "lucidchart-macro",
})
#: Macros whose body is shown as a call-out: quoted, headed by their label.
ADMONITIONS = {"info": "Info", "note": "Note", "warning": "Warning", "tip": "Tip",
               "panel": "", "success": "Success", "error": "Error"}
CODE_MACROS = frozenset({"code", "noformat", "code-block"})
DIAGRAM_MACROS = frozenset({"drawio", "inc-drawio", "gliffy", "lucidchart", "plantuml-render"})

_HEADINGS = {f"h{i}": i for i in range(1, 7)}
#: Elements that start their own block(s) when they appear among inline content.
_BLOCK_TAGS = frozenset({
    "p", "div", "section", "article", "header", "footer", "aside", "nav", "main",
    "ul", "ol", "table", "pre", "blockquote", "hr", "dl", "center", "figure",
    "ac:layout", "ac:layout-section", "ac:layout-cell", "ac:task-list",
    "ac:rich-text-body", "ac:adf-extension", *_HEADINGS,
})
_DROPPED_TAGS = frozenset({
    "ac:emoticon", "ac:placeholder", "ac:parameter", "ac:task-id", "ac:task-status",
    "ac:task-uuid", "ac:task-assignee", "ac:task-duedate", "script", "style", "colgroup",
    "col", "head", "title", "meta", "link",
})
_WS = re.compile(r"[ \t\r\n\f\v\u00a0\u200b]+")
_USER_TAG = re.compile(r"<ri:user\b([^>]*)>", re.IGNORECASE)
_ATTR = re.compile(r'(ri:(?:userkey|account-id|username))\s*=\s*"([^"]*)"', re.IGNORECASE)


class StorageFormatError(ValueError):
    """A body that cannot be converted (not text, or nested beyond :data:`MAX_DEPTH`)."""


@dataclass(frozen=True)
class _Ctx:
    users: Mapping[str, str]


def mentioned_users(xhtml: str) -> set[tuple[str, str]]:
    """The users mentioned in a body (``ri:user``) as ``(kind, id)`` pairs, without
    parsing the whole body. ``kind`` is ``"userkey"`` (Server/DC), ``"account-id"``
    (Cloud) or ``"username"`` (old Server pages)."""
    found: set[tuple[str, str]] = set()
    for attrs in _USER_TAG.findall(xhtml if isinstance(xhtml, str) else ""):
        for attr, value in _ATTR.findall(attrs):
            if value:
                found.add((attr.lower().removeprefix("ri:"), value))
    return found


def storage_to_markdown(xhtml: str, *, users: Mapping[str, str] | None = None) -> str:
    """Convert a storage-format body to Markdown-like text (see the module docstring).

    Args:
        xhtml: ``body.storage.value`` of a page, blog post or comment.
        users: user id (key, account id or user name, as in :func:`mentioned_users`)
            -> display name, for ``@Name`` mentions. Unknown ids render as ``@user``.

    Returns:
        The text, blocks separated by one blank line, no trailing whitespace; ``""``
        for an empty body.

    Raises:
        StorageFormatError: ``xhtml`` is not a string, or its elements nest deeper than
            :data:`MAX_DEPTH`.
    """
    if not isinstance(xhtml, str):
        raise StorageFormatError(f"body is {type(xhtml).__name__}, not storage-format text")
    if not xhtml.strip():
        return ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MarkupResemblesLocatorWarning)
        soup = BeautifulSoup(xhtml, "html.parser")
    ctx = _Ctx(users=users or {})
    try:
        blocks = _container(soup, ctx, 0)
    except RecursionError:
        raise StorageFormatError("body nests too deeply to convert") from None
    text = "\n\n".join(b for b in blocks if b.strip())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ------------------------------------------------------------------------- blocks


def _check_depth(depth: int) -> None:
    if depth > MAX_DEPTH:
        raise StorageFormatError(f"elements nest deeper than {MAX_DEPTH} levels")


def _name(node: Tag) -> str:
    return (node.name or "").lower()


def _container(node: Tag, ctx: _Ctx, depth: int) -> list[str]:
    """Blocks of a container: runs of inline content become paragraphs, block children
    add their own blocks in order."""
    _check_depth(depth)
    blocks: list[str] = []
    inline: list[str] = []

    def flush() -> None:
        if inline:
            para = _paragraph("".join(inline))
            if para:
                blocks.append(para)
            inline.clear()

    for child in node.children:
        if isinstance(child, Tag):
            kind, rendered = _render(child, ctx, depth + 1)
            if kind == "block":
                flush()
                blocks.extend(rendered)
            else:
                inline.append(rendered)
        else:
            inline.append(_string(child))
    flush()
    return blocks


def _render(node: Tag, ctx: _Ctx, depth: int) -> tuple[str, list[str] | str]:
    """``("block", [blocks])`` or ``("inline", text)`` for one element."""
    name = _name(node)
    if name in _DROPPED_TAGS:
        return "inline", ""
    if name in ("ac:structured-macro", "ac:macro"):
        return _macro(node, ctx, depth)
    if name not in _BLOCK_TAGS:
        return "inline", _inline_tag(node, ctx, depth)
    if name in _HEADINGS:
        text = _one_line(_inline_children(node, ctx, depth))
        return "block", [f"{'#' * _HEADINGS[name]} {text}"] if text else []
    if name in ("ul", "ol"):
        return "block", _list(node, ctx, depth)
    if name == "ac:task-list":
        return "block", _task_list(node, ctx, depth)
    if name == "table":
        table = _table(node, ctx, depth)
        return "block", [table] if table else []
    if name == "pre":
        return "block", _fence(node.get_text(), "")
    if name == "blockquote":
        return "block", _quote(_container(node, ctx, depth))
    if name == "hr":
        return "block", ["---"]
    if name == "ac:adf-extension":
        fallback = node.find("ac:adf-fallback")
        return "block", _container(fallback or node, ctx, depth)
    return "block", _container(node, ctx, depth)


def _paragraph(text: str) -> str:
    lines = [line.strip() for line in text.split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return _WS.sub(" ", text).strip()


def _indent(blocks: list[str], marker: str) -> str:
    """One list item: the marker before the first line, later lines indented under it."""
    pad = " " * len(marker)
    lines = "\n".join(blocks).split("\n")
    out = [marker + lines[0]]
    out += [(pad + line) if line.strip() else "" for line in lines[1:]]
    return "\n".join(out)


def _list(node: Tag, ctx: _Ctx, depth: int) -> list[str]:
    ordered = _name(node) == "ol"
    try:
        number = int(node.get("start", 1))
    except (TypeError, ValueError):
        number = 1
    items: list[str] = []
    for child in node.children:
        if isinstance(child, Tag) and _name(child) == "li":
            blocks = _container(child, ctx, depth + 1)
        elif isinstance(child, Tag):  # stray element directly in a list
            kind, rendered = _render(child, ctx, depth + 1)
            blocks = rendered if kind == "block" else [_paragraph(rendered)]
        else:
            text = _paragraph(_string(child))
            if not text:
                continue
            blocks = [text]
        blocks = [b for b in blocks if b.strip()]
        if not blocks:
            continue
        marker = f"{number}. " if ordered else "- "
        number += 1
        items.append(_indent(blocks, marker))
    return ["\n".join(items)] if items else []


def _task_list(node: Tag, ctx: _Ctx, depth: int) -> list[str]:
    items: list[str] = []
    for task in node.find_all("ac:task", recursive=False):
        status = task.find("ac:task-status", recursive=False)
        done = status is not None and status.get_text(strip=True).lower() == "complete"
        body = task.find("ac:task-body", recursive=False)
        blocks = [b for b in (_container(body, ctx, depth + 2) if body else []) if b.strip()]
        items.append(_indent(blocks or [""], "- [x] " if done else "- [ ] "))
    return ["\n".join(items)] if items else []


def _rows(table: Tag) -> Iterable[tuple[Tag, bool]]:
    """``(tr, in_thead)`` for the rows of this table (not of tables nested in cells)."""
    for child in table.children:
        if not isinstance(child, Tag):
            continue
        name = _name(child)
        if name == "tr":
            yield child, False
        elif name in ("thead", "tbody", "tfoot"):
            for row in child.find_all("tr", recursive=False):
                yield row, name == "thead"


def _cell(cell: Tag, ctx: _Ctx, depth: int) -> str:
    blocks = [b for b in _container(cell, ctx, depth) if b.strip()]
    text = "<br>".join(b.replace("\n", "<br>") for b in blocks)
    return text.replace("|", "\\|")


def _table(node: Tag, ctx: _Ctx, depth: int) -> str:
    rows: list[list[str]] = []
    header_flags: list[bool] = []
    for row, in_thead in _rows(node):
        cells: list[str] = []
        all_th = True
        for cell in row.find_all(["td", "th"], recursive=False):
            all_th &= _name(cell) == "th"
            cells.append(_cell(cell, ctx, depth + 2))
            try:
                span = int(cell.get("colspan", 1))
            except (TypeError, ValueError):
                span = 1
            cells.extend([""] * max(0, min(span, 100) - 1))
        if cells:
            rows.append(cells)
            header_flags.append(in_thead or all_th)
    if not rows or not any(c.strip() for r in rows for c in r):
        return ""
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    out = [line(rows[0]), "| " + " | ".join(["---"] * width) + " |"]
    out += [line(r) for r in rows[1:]]
    return "\n".join(out)


def _fence(code: str, language: str) -> list[str]:
    code = code.replace("\u00a0", " ").strip("\n")
    if not code.strip():
        return []
    longest = max((len(m) for m in re.findall(r"`{3,}", code)), default=2)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{language}\n{code.rstrip()}\n{fence}"]


def _quote(blocks: list[str]) -> list[str]:
    text = "\n\n".join(b for b in blocks if b.strip())
    if not text:
        return []
    return ["\n".join(f"> {line}" if line.strip() else ">" for line in text.split("\n"))]


# ------------------------------------------------------------------------- macros


def _params(macro: Tag) -> dict[str, str]:
    return {str(p.get("ac:name", "")).lower(): p.get_text().strip()
            for p in macro.find_all("ac:parameter", recursive=False)}


def _macro(node: Tag, ctx: _Ctx, depth: int) -> tuple[str, list[str] | str]:
    name = str(node.get("ac:name", "")).lower()
    params = _params(node)
    rich = node.find("ac:rich-text-body", recursive=False)
    plain = node.find("ac:plain-text-body", recursive=False)
    if name in DROPPED_MACROS:
        return "inline", ""
    if name in CODE_MACROS:
        language = "" if name == "noformat" else re.sub(r"[^\w+#.-]", "", params.get("language", ""))
        blocks = [f"**{params['title']}**"] if params.get("title") else []
        blocks += _fence(plain.get_text() if plain else node.get_text(), language.lower())
        return "block", blocks if len(blocks) > 1 or not params.get("title") else []
    if name in ADMONITIONS:
        body = _container(rich, ctx, depth + 1) if rich else []
        label, title = ADMONITIONS[name], params.get("title", "")
        head = " ".join(p for p in (f"**{label}:**" if label else "",
                                    f"**{title}**" if title and not label else title) if p)
        if head and not title and body and not re.match(r"[#|`>\-*\d]", body[0]):
            body[0], head = f"{head} {body[0]}", ""  # "**Note:** first paragraph"
        return "block", _quote(([head] if head else []) + body)
    if name == "expand":
        body = _container(rich, ctx, depth + 1) if rich else []
        title = params.get("title", "")
        return "block", ([f"**{title}**"] if title and body else []) + body
    if name in ("jira", "jiraissues"):
        return "inline", params.get("key", "")
    if name == "status":
        title = params.get("title", "")
        return "inline", f"[{title}]" if title else ""
    if name in DIAGRAM_MACROS:
        diagram = params.get("diagramname") or params.get("name") or params.get("title", "")
        return "block", [f"[diagram: {diagram}]"] if diagram else []
    # details, excerpt, section, column, and every macro not known here: keep the body
    if rich is not None:
        return "block", _container(rich, ctx, depth + 1)
    if plain is not None:
        text = plain.get_text().strip("\n")
        return "block", [text.strip()] if text.strip() else []
    return "inline", ""


# ------------------------------------------------------------------------- inline


def _string(node: NavigableString) -> str:
    if isinstance(node, CData):
        return str(node)
    if isinstance(node, Comment | Doctype | Declaration | ProcessingInstruction):
        return ""
    return _WS.sub(" ", str(node))


def _inline_children(node: Tag, ctx: _Ctx, depth: int) -> str:
    _check_depth(depth)
    parts: list[str] = []
    for child in node.children:
        if isinstance(child, Tag):
            kind, rendered = _render(child, ctx, depth + 1)
            if kind == "block":
                parts.append(" " + " ".join(b.replace("\n", " ") for b in rendered) + " ")
            else:
                parts.append(rendered)
        else:
            parts.append(_string(child))
    return "".join(parts)


def _wrap(text: str, mark: str) -> str:
    """``**text**`` keeping surrounding spaces outside the markers (Markdown needs it)."""
    core = text.strip()
    if not core:
        return text
    lead = text[: len(text) - len(text.lstrip())]
    trail = text[len(text.rstrip()):]
    return f"{lead}{mark}{core}{mark}{trail}"


def _inline_tag(node: Tag, ctx: _Ctx, depth: int) -> str:
    name = _name(node)
    if name == "br":
        return "\n"
    if name == "ac:link":
        return _ac_link(node, ctx, depth)
    if name in ("ac:image", "img"):
        return _image(node)
    if name == "time":
        return str(node.get("datetime") or node.get_text())
    if name == "a":
        label = _one_line(_inline_children(node, ctx, depth))
        href = str(node.get("href") or "").strip()
        if not href or href.startswith("#") or href.lower().startswith("javascript:"):
            return label
        if not label or label == href:
            return f"<{href}>"
        return f"[{label}]({href.replace(' ', '%20').replace(')', '%29')})"
    text = _inline_children(node, ctx, depth)
    if name in ("strong", "b"):
        return _wrap(text, "**")
    if name in ("em", "i", "cite"):
        return _wrap(text, "*")
    if name in ("s", "del", "strike"):
        return _wrap(text, "~~")
    if name in ("code", "tt", "kbd", "samp"):
        core = _one_line(text)
        if not core:
            return text
        ticks = "``" if "`" in core else "`"
        return f"{ticks}{core}{ticks}"
    return text  # span, u, sub, sup, font, ac:inline-comment-marker, unknown ac:* ...


def _link_label(node: Tag, ctx: _Ctx, depth: int) -> str:
    plain = node.find("ac:plain-text-link-body", recursive=False)
    if plain is not None:
        return _one_line(plain.get_text())
    rich = node.find("ac:link-body", recursive=False)
    if rich is not None:
        return _one_line(_inline_children(rich, ctx, depth + 1))
    return ""


def _ac_link(node: Tag, ctx: _Ctx, depth: int) -> str:
    label = _link_label(node, ctx, depth)
    target = next((c for c in node.children if isinstance(c, Tag)
                   and _name(c).startswith("ri:")), None)
    kind = _name(target) if target is not None else ""
    if kind == "ri:user":
        uid = (target.get("ri:userkey") or target.get("ri:account-id")
               or target.get("ri:username") or "")
        name = ctx.users.get(str(uid)) or label.lstrip("@") or ""
        return f"@{name}" if name else "@user"
    if kind in ("ri:page", "ri:blog-post"):
        title = _one_line(str(target.get("ri:content-title") or ""))
        return _wiki_link(title, label)
    if kind == "ri:attachment":
        return _wiki_link(_one_line(str(target.get("ri:filename") or "")), label)
    if kind == "ri:url":
        url = str(target.get("ri:value") or "")
        return f"[{label}]({url})" if label and url else (label or (f"<{url}>" if url else ""))
    if kind == "ri:space":
        return label or str(target.get("ri:space-key") or "")
    return label


def _wiki_link(title: str, label: str) -> str:
    if not title:
        return label
    if label and label != title:
        return f"[[{title}|{label}]]"
    return f"[[{title}]]"


def _image(node: Tag) -> str:
    alt = _one_line(str(node.get("ac:alt") or node.get("alt") or node.get("ac:title")
                        or node.get("title") or ""))
    if _name(node) == "img":
        src = str(node.get("src") or "")
    else:
        target = next((c for c in node.children if isinstance(c, Tag)
                       and _name(c).startswith("ri:")), None)
        src = ""
        if target is not None:
            src = str(target.get("ri:filename") or target.get("ri:value") or "")
    if not src and not alt:
        return ""
    return f"![{alt}]({src.replace(' ', '%20')})"

"""GitLab issues, merge requests, discussions and wiki pages -> document text (pure).

Everything here works on the plain JSON dicts of the GitLab REST API v4 (what
python-gitlab's ``obj.asdict()`` returns) and does no I/O:

* an issue or merge request becomes one Markdown document: a title heading, a short
  facts block (state, author, labels, milestone, assignees; for merge requests also
  the branches and ``merged_at``), the description, then a ``## Discussion`` section
  with every discussion in order, each note with its author and date. ``updated_at`` is left out of the text (it is in
  the metadata): a new note then changes only the chunks at the end. *System notes* ("changed milestone to %2",
  "closed", "mentioned in commit ...") are dropped: they are GitLab's own activity log,
  not knowledge, and they change on every label edit.
* internal notes (``internal: true``, formerly ``confidential``) are dropped unless the
  caller allows confidential content.
* a wiki page becomes a document in its own markup (Markdown is chunked by headings).

API shapes relied on (docs.gitlab.com/api): issues
https://docs.gitlab.com/api/issues/ , merge requests
https://docs.gitlab.com/api/merge_requests/ , discussions (``[{id, individual_note,
notes: [{body, author, created_at, system, internal, resolved, position}]}]``)
https://docs.gitlab.com/api/discussions/ , wikis https://docs.gitlab.com/api/wikis/ .
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

#: Wiki ``format`` values that are Markdown (GitLab: markdown, rdoc, asciidoc, org).
MARKDOWN_WIKI_FORMATS = {"markdown"}
#: Metadata of an issue or merge request that changes with every edit or note
#: (``connectors.base.Document.version_fields``).
ITEM_VERSION_FIELDS = frozenset({"updated_at"})


def parse_time(value: str | None) -> datetime | None:
    """A GitLab timestamp (``"2019-11-28T08:43:35.459Z"``) as an aware UTC datetime.

    ``None`` or ``""`` give ``None``; a date without a time (``due_date``) is midnight
    UTC. Raises ``ValueError`` for anything else that is not ISO 8601.
    """
    if not value:
        return None
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def format_time(value: str | datetime | None) -> str:
    """``"2019-11-28 08:43 UTC"`` (minute precision), or ``""``."""
    dt = parse_time(value) if isinstance(value, str) or value is None else value
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if dt else ""


def api_time(dt: datetime) -> str:
    """An aware datetime as the ISO 8601 UTC string GitLab query parameters take
    (``updated_after=2024-05-01T10:00:00.000000Z``)."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def person(user: Mapping[str, Any] | None) -> str:
    """``"Lauris BH (@lafriks)"`` from a GitLab user object; ``"unknown"`` if missing."""
    if not user:
        return "unknown"
    name, username = user.get("name"), user.get("username")
    if name and username:
        return f"{name} (@{username})"
    return str(name or (f"@{username}" if username else "unknown"))


def usernames(users: Iterable[Mapping[str, Any]] | None) -> list[str]:
    """The ``username`` of each user object, in order."""
    return [u["username"] for u in users or [] if u and u.get("username")]


def label_names(labels: Iterable[Any] | None) -> list[str]:
    """Label names from ``labels`` (plain strings, or objects with ``with_labels_details``)."""
    out = []
    for label in labels or []:
        name = label.get("name") if isinstance(label, Mapping) else label
        if name:
            out.append(str(name))
    return out


def is_confidential(item: Mapping[str, Any]) -> bool:
    """Whether an issue is confidential (merge requests never are)."""
    return bool(item.get("confidential"))


def _note_is_hidden(note: Mapping[str, Any], include_confidential: bool) -> bool:
    if note.get("system"):
        return True
    internal = note.get("internal", note.get("confidential"))
    return bool(internal) and not include_confidential


def _position(note: Mapping[str, Any]) -> str:
    """`` on `path` line 12`` for a diff note, else ``""``."""
    position = note.get("position")
    if not isinstance(position, Mapping):
        return ""
    path = position.get("new_path") or position.get("old_path")
    line = position.get("new_line") or position.get("old_line")
    if not path:
        return ""
    return f" on `{path}`" + (f" line {line}" if line else "")


def render_discussions(discussions: Iterable[Mapping[str, Any]],
                       include_confidential: bool = False) -> str:
    """The discussions of an issue or merge request as Markdown, system notes dropped.

    Each note is a bold line with its author and date (for a diff note also the file
    and line; replies say "Reply by"), then its body. Notes are paragraphs, not
    headings: the Markdown chunker cuts at headings, and one chunk per short note would
    make many tiny chunks; as paragraphs they are packed into chunks of the model's
    size, and a new note at the end changes only the last chunk. A discussion left with
    no notes is omitted. Returns ``""`` when nothing remains.
    """
    blocks: list[str] = []
    for discussion in discussions:
        notes = [n for n in discussion.get("notes") or []
                 if not _note_is_hidden(n, include_confidential)]
        notes.sort(key=lambda n: n.get("created_at") or "")
        for i, note in enumerate(notes):
            body = (note.get("body") or "").strip()
            when = format_time(note.get("created_at"))
            if i == 0:
                resolved = " (resolved)" if note.get("resolvable") and note.get("resolved") else ""
                line = f"**{person(note.get('author'))}, {when}{_position(note)}{resolved}:**"
            else:
                line = f"**Reply by {person(note.get('author'))}, {when}:**"
            blocks.append(f"{line}\n{body}" if body else line)
    return "\n\n".join(blocks)


def _facts(lines: list[tuple[str, str]]) -> str:
    return "\n".join(f"- {key}: {value}" for key, value in lines if value)


def _body(title: str, facts: list[tuple[str, str]], description: str | None,
          discussions: str) -> str:
    parts = [f"# {title.strip()}", _facts(facts), (description or "").strip()]
    if discussions:
        parts.append(f"## Discussion\n\n{discussions}")
    return "\n\n".join(p for p in parts if p) + "\n"


def _common_facts(item: Mapping[str, Any], project: str, what: str) -> list[tuple[str, str]]:
    milestone = item.get("milestone") or {}
    return [
        (what, f"{project}{'!' if what == 'Merge request' else '#'}{item.get('iid')}"),
        ("State", str(item.get("state") or "")),
        ("Author", person(item.get("author"))),
        ("Created", format_time(item.get("created_at"))),
        ("Closed", format_time(item.get("closed_at"))),
        ("Labels", ", ".join(label_names(item.get("labels")))),
        ("Milestone", str(milestone.get("title") or "")),
        ("Assignees", ", ".join(person(u) for u in item.get("assignees") or [])),
    ]


def issue_text(issue: Mapping[str, Any], discussions: Iterable[Mapping[str, Any]],
               project: str, include_confidential: bool = False) -> str:
    """One issue with its discussions as a Markdown document (see the module docstring).

    Args:
        issue: a ``GET /projects/:id/issues`` item.
        discussions: its ``GET .../issues/:iid/discussions`` items (any order of notes).
        project: the project's ``path_with_namespace``.
        include_confidential: keep internal notes.
    """
    facts = _common_facts(issue, project, "Issue")
    if is_confidential(issue):
        facts.append(("Confidential", "yes"))
    return _body(str(issue.get("title") or ""), facts, issue.get("description"),
                 render_discussions(discussions, include_confidential))


def merge_request_text(mr: Mapping[str, Any], discussions: Iterable[Mapping[str, Any]],
                       project: str, include_confidential: bool = False) -> str:
    """One merge request with its discussions as a Markdown document.

    Adds the source and target branches, ``merged_at`` and who merged it to the facts
    of :func:`issue_text`.
    """
    facts = _common_facts(mr, project, "Merge request")
    merged_by = mr.get("merged_by") or mr.get("merge_user")
    facts += [
        ("Branches", f"{mr.get('source_branch')} -> {mr.get('target_branch')}"
         if mr.get("source_branch") else ""),
        ("Merged", format_time(mr.get("merged_at"))),
        ("Merged by", person(merged_by) if merged_by else ""),
        ("Draft", "yes" if mr.get("draft") or mr.get("work_in_progress") else ""),
    ]
    return _body(str(mr.get("title") or ""), facts, mr.get("description"),
                 render_discussions(discussions, include_confidential))


def item_metadata(item: Mapping[str, Any], project: str, kind: str,
                  include_confidential: bool = False) -> dict[str, Any]:
    """Flat metadata of an issue (``kind="issue"``) or merge request (``"merge_request"``).

    Keys: project, kind, iid, state, labels, milestone, author, assignees, web_url,
    created_at, updated_at, closed_at; merge requests add source_branch, target_branch,
    merged_at; a confidential issue (only ever passed when allowed) adds
    ``confidential=True``. Lists are left as lists (``Document`` flattens them).
    """
    milestone = item.get("milestone") or {}
    meta: dict[str, Any] = {
        "project": project,
        "kind": kind,
        "iid": item.get("iid"),
        "state": item.get("state"),
        "labels": label_names(item.get("labels")),
        "milestone": milestone.get("title"),
        "author": (item.get("author") or {}).get("username"),
        "assignees": usernames(item.get("assignees")),
        "web_url": item.get("web_url"),
        "created_at": parse_time(item.get("created_at")),
        "updated_at": parse_time(item.get("updated_at")),
        "closed_at": parse_time(item.get("closed_at")),
    }
    if kind == "merge_request":
        meta.update(source_branch=item.get("source_branch"),
                    target_branch=item.get("target_branch"),
                    merged_at=parse_time(item.get("merged_at")))
    if include_confidential and is_confidential(item):
        meta["confidential"] = True
    return {k: v for k, v in meta.items() if v not in (None, [], "")}


def wiki_format(page: Mapping[str, Any]) -> str:
    """``"markdown"`` for Markdown wiki pages, else ``"text"`` (rdoc, asciidoc, org)."""
    return "markdown" if (page.get("format") or "markdown") in MARKDOWN_WIKI_FORMATS else "text"


def wiki_text(page: Mapping[str, Any]) -> str:
    """The text of a wiki page listed ``with_content=1``; a Markdown page that does not
    start with a level-1 heading gets its title as one.

    Raises:
        ValueError: the page has no ``content`` (listed without ``with_content``).
    """
    content = page.get("content")
    if content is None:
        raise ValueError(f"wiki page {page.get('slug')!r} has no content")
    content = str(content).removeprefix("\ufeff")
    title = str(page.get("title") or page.get("slug") or "").strip()
    if wiki_format(page) == "markdown" and title and not content.lstrip().startswith("# "):
        return f"# {title}\n\n{content}"
    return content


def wiki_hash(page: Mapping[str, Any]) -> str:
    """A short content hash (16 hex) of a wiki page's title, format and content: what the
    wiki cursor remembers, since the API gives wiki pages no ``updated_at``."""
    payload = json.dumps([page.get("title"), page.get("format"), page.get("content")],
                         ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def wiki_metadata(page: Mapping[str, Any], project: str) -> dict[str, str]:
    """Flat metadata of a wiki page: project, kind, slug, wiki_format."""
    return {"project": project, "kind": "wiki", "slug": str(page.get("slug")),
            "wiki_format": str(page.get("format") or "markdown")}

"""The contract between kbsync and every source it reads.

A *source* is one configured instance of a system (a git repository, a Confluence
site, a Jira site, a GitLab group). Its connector turns the source's changes into
:class:`Document` values, page by page, and says where the next run should start.

The shape follows Onyx's checkpointed connectors (failures are values, not exceptions
that end the run) and dlt's incremental cursors (the cursor is a small value the
pipeline persists; the connector never stores state itself):

* :meth:`SourceConnector.fetch` yields :class:`Page` objects. Each page carries the
  documents that changed, the ids deleted at the source, the documents skipped or
  failed (with a reason), and a ``checkpoint``: an opaque JSON-able dict from which
  ``fetch`` can resume *after* that page. The last page also carries the new
  ``cursor``; the flow stores it only once every page before it is durable.
* :meth:`SourceConnector.list_ids` lists the ids that exist at the source now, for
  deletion reconciliation. A listing that could not be completed says so
  (``complete=False``) and must never cause a deletion.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, runtime_checkable

#: Metadata values Chroma accepts: flat scalars only (no lists, dicts or None).
MetadataValue = str | int | float | bool

#: How a document's text is written; decides how it is chunked.
TextFormat = Literal["markdown", "code", "text"]

#: A cursor or checkpoint: a small JSON-serialisable mapping owned by one connector.
Cursor = dict[str, Any]
Checkpoint = dict[str, Any]


class ConnectorError(Exception):
    """A source cannot be read at all (bad credentials, unreachable, bad query).

    Raised for failures that concern the whole source rather than one document; the
    message must be safe to show (never contains a secret). Not retried: retrying a
    bad token or a bad query only delays the clear error.
    """


class TransientSourceError(ConnectorError):
    """A source-wide failure worth retrying (timeout, 5xx after the client's own retries)."""


def utc(dt: datetime) -> datetime:
    """Return ``dt`` as an aware UTC datetime; naive datetimes are taken to be UTC."""
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def clean_metadata(metadata: Mapping[str, Any]) -> dict[str, MetadataValue]:
    """Flatten ``metadata`` into what Chroma stores: ``str | int | float | bool`` values.

    ``None`` values are dropped, datetimes become ISO 8601 UTC strings, lists and
    tuples become comma-separated strings (so a label list stays filterable with
    ``$contains`` on the document text side and readable in results), anything else
    becomes ``str(value)``.
    """
    out: dict[str, MetadataValue] = {}
    for key, value in metadata.items():
        if value is None:
            continue
        if isinstance(value, bool | int | float | str):
            out[key] = value
        elif isinstance(value, datetime):
            out[key] = utc(value).isoformat()
        elif isinstance(value, list | tuple | set | frozenset):
            items = sorted(value) if isinstance(value, set | frozenset) else value
            out[key] = ",".join(str(v) for v in items)
        else:
            out[key] = str(value)
    return out


@dataclass(frozen=True)
class Document:
    """One unit of knowledge from a source: a file, a page, an issue.

    Attributes:
        id: stable, globally unique id, ``"<source>:<id at the source>"`` (for git,
            the path: ``"docs:README.md"``). It never changes while the thing exists.
        source: the configured source name.
        source_type: ``"git"``, ``"confluence"``, ``"jira"``, ``"gitlab"``.
        title: human-readable title (file path, page title, ``KEY: summary``).
        text: normalized text (Markdown-like for wiki/tracker content).
        url: where a person opens it (web URL, or a ``file://`` URL for local git).
        updated_at: last modification at the source, aware UTC datetime.
        format: how ``text`` is written; picks the chunker (``markdown``, ``code``, ``text``).
        language: programming language for ``format="code"`` (``"python"``, ...), else ``None``.
        metadata: the source's own flat scalar fields (path, space, status, ...).
    """

    id: str
    source: str
    source_type: str
    title: str
    text: str
    url: str
    updated_at: datetime
    format: TextFormat = "text"
    language: str | None = None
    metadata: dict[str, MetadataValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "updated_at", utc(self.updated_at))
        object.__setattr__(self, "metadata", clean_metadata(self.metadata))

    def content_hash(self, salt: str = "") -> str:
        """SHA-256 (hex) over everything that ends up in the index for this document.

        Covers title, url, format, language, text and metadata, plus ``salt`` (the
        pipeline passes its chunking settings, so changing them re-chunks documents
        whose content did not change). Equal hashes mean nothing to do.
        """
        payload = json.dumps(
            [salt, self.title, self.url, self.format, self.language, self.text,
             sorted(self.metadata.items())],
            ensure_ascii=False,
            default=str,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class DocumentIssue:
    """A document that was not indexed, and why.

    ``kind="skipped"`` is permanent and expected (binary file, over the size limit,
    undecodable text): it is recorded and does not hold the cursor back.
    ``kind="failed"`` is an error that a later run should retry (a 5xx, a malformed
    response): the cursor never moves past it.
    """

    doc_id: str
    reason: str
    kind: Literal["skipped", "failed"] = "failed"
    title: str = ""


@dataclass
class Page:
    """One page of changes from :meth:`SourceConnector.fetch`.

    Attributes:
        documents: documents added or modified at the source.
        deletions: document ids deleted at the source (or moved out of scope).
        issues: documents skipped or failed on this page.
        checkpoint: resume point *after* this page (passed back to ``fetch``).
        cursor: on the last page, the cursor to persist once everything is durable;
            ``None`` on other pages.
    """

    documents: list[Document] = field(default_factory=list)
    deletions: list[str] = field(default_factory=list)
    issues: list[DocumentIssue] = field(default_factory=list)
    checkpoint: Checkpoint = field(default_factory=dict)
    cursor: Cursor | None = None


@dataclass(frozen=True)
class FetchRequest:
    """What a run asks a connector for.

    Attributes:
        cursor: the persisted cursor of the last successful run; ``None`` means a full
            read (first run, or ``--full``).
        since, until: a backfill window (aware UTC datetimes); when ``since`` is set the
            connector returns what changed in ``[since, until]`` and the flow does not
            move the cursor.
    """

    cursor: Cursor | None = None
    since: datetime | None = None
    until: datetime | None = None

    @property
    def is_backfill(self) -> bool:
        return self.since is not None

    def key(self) -> str:
        """A stable string identifying this request, so a checkpoint is only reused
        by a run that asks for the same thing."""
        return json.dumps(
            {
                "cursor": self.cursor,
                "since": self.since.isoformat() if self.since else None,
                "until": self.until.isoformat() if self.until else None,
            },
            sort_keys=True,
        )


@dataclass(frozen=True)
class Listing:
    """The ids that exist at a source now; ``complete=False`` forbids deleting anything."""

    ids: frozenset[str]
    complete: bool
    reason: str = ""


@runtime_checkable
class SourceConnector(Protocol):
    """What every source type implements (git, Confluence, Jira, GitLab)."""

    name: str
    source_type: str

    def fetch(self, request: FetchRequest, checkpoint: Checkpoint | None = None) -> Iterator[Page]:
        """Yield the changes asked for by ``request``, page by page.

        ``checkpoint`` (from an earlier page of the *same* request) resumes after that
        page. Per-document problems are reported in :attr:`Page.issues`; a problem with
        the whole source raises :class:`ConnectorError`.
        """
        ...

    def list_ids(self) -> Listing:
        """List the document ids that exist at the source now (ids only, cheap)."""
        ...


def now_utc() -> datetime:
    """The current time, aware UTC."""
    return datetime.now(UTC)


def redact(text: str, secrets: list[str | None] | tuple[str | None, ...] = ()) -> str:
    """Remove secrets from ``text`` before it is logged, raised or stored.

    Replaces every non-empty string in ``secrets`` with ``***`` and strips the
    ``user:password@`` part of any URL (``https://u:p@host`` -> ``https://***@host``).
    """
    import re

    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return re.sub(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@", r"\g<scheme>***@", text)

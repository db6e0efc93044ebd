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
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, SecretStr

log = logging.getLogger(__name__)

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


class EntityError(ConnectorError):
    """One entity of a source (a GitLab project or one of its parts, a space, a Jira
    project) cannot be read (403, 404, a missing branch) while the others can.

    Connectors that read several entities catch it, report the entity as a failed
    :class:`DocumentIssue` with ``scope="entity"``, keep that entity's cursor where it
    was and go on with the others.
    """


def utc(dt: datetime) -> datetime:
    """Return ``dt`` as an aware UTC datetime; naive datetimes are taken to be UTC."""
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


#: A lone UTF-16 surrogate (U+D800-U+DFFF): a ``str`` holding one cannot be encoded as
#: UTF-8. JSON may carry them as ``\\ud83d`` escapes (text cut in the middle of an emoji
#: by a UTF-16 client), and Python decodes undecodable file-name bytes to them
#: (``surrogateescape``, PEP 383).
_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(value: str) -> str:
    """``value`` with every lone surrogate replaced by U+FFFD (the replacement
    character), so that it encodes as UTF-8: the document hash, Chroma (a filter on such
    an id fails with "Invalid where clause"), PostgreSQL and SQLite need that.
    Text that encodes already is returned as it is."""
    return _SURROGATE.sub("\ufffd", value) if _SURROGATE.search(value) else value


def clean_metadata(metadata: Mapping[str, Any]) -> dict[str, MetadataValue]:
    """Flatten ``metadata`` into what Chroma stores: ``str | int | float | bool`` values.

    ``None`` values are dropped, datetimes become ISO 8601 UTC strings, lists and
    tuples become comma-separated strings (so a label list stays filterable with
    ``$contains`` on the document text side and readable in results), anything else
    becomes ``str(value)``; strings pass through :func:`valid_text`.
    """
    out: dict[str, MetadataValue] = {}
    for key, value in metadata.items():
        if value is None:
            continue
        if isinstance(value, bool | int | float):
            out[key] = value
        elif isinstance(value, datetime):
            out[key] = utc(value).isoformat()
        elif isinstance(value, list | tuple | set | frozenset):
            items = sorted(value) if isinstance(value, set | frozenset) else value
            out[key] = valid_text(",".join(str(v) for v in items))
        else:
            out[key] = valid_text(str(value))
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
        version_fields: names of ``metadata`` fields that change with every version of
            the document (a commit sha, a version number, a modification time, a size).
            Like kbsync's own document fields (``connectors.chroma.DOCUMENT_FIELDS``)
            they are kept current on the document's head chunk; a chunk an edit leaves
            unchanged keeps the values of the version that wrote it, so an edit rewrites
            the chunks it changes, not every chunk of the document.
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
    version_fields: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "updated_at", utc(self.updated_at))
        object.__setattr__(self, "metadata", clean_metadata(self.metadata))
        for name in ("id", "title", "text", "url"):  # see valid_text
            object.__setattr__(self, name, valid_text(getattr(self, name)))

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


#: How the title of an entity failure starts (``"entity: platform/deploy-tools:issues"``).
ENTITY_TITLE = "entity: "


@dataclass(frozen=True)
class DocumentIssue:
    """A document that was not indexed, and why.

    ``kind="skipped"`` is permanent and expected (binary file, over the size limit,
    undecodable text): it is recorded and does not hold the cursor back.
    ``kind="failed"`` is an error that a later run should retry (a 5xx, a malformed
    response): the cursor never moves past it.
    ``scope="entity"``: not one document but a whole entity (a project, a space) that
    could not be read; ``doc_id`` is ``"<source>:<entity>"`` and ``title`` starts with
    :data:`ENTITY_TITLE` (so a stored record is known as one). The connector's cursor
    keeps that entity where it was, so the rest of the cursor may move
    (see :func:`cursor_may_advance`).
    """

    doc_id: str
    reason: str
    kind: Literal["skipped", "failed"] = "failed"
    title: str = ""
    scope: Literal["document", "entity"] = "document"

    def __post_init__(self) -> None:
        for name in ("doc_id", "reason", "title"):  # stored in the state store
            object.__setattr__(self, name, valid_text(getattr(self, name)))


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


class SourceOptions(BaseModel):
    """The options of one source, as its connector reads them: a pydantic model.

    Each connector declares its options once, as a subclass (fields, defaults, bounds);
    the settings' source models (``flows.settings.*Source``) extend them with ``type``,
    ``schedule`` and cross-field checks, so nothing is declared twice. Unknown keys are
    errors; secrets are ``SecretStr`` (``**********`` in repr, logs and errors), read
    with :func:`reveal` where a request needs them.
    """

    model_config = ConfigDict(extra="forbid")

    name: str


def reveal(value: SecretStr | None) -> str | None:
    """The plain value of a secret option (``None`` stays ``None``)."""
    return value.get_secret_value() if value is not None else None


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


# ------------------------------------------------------------------ the watermark

#: Version of the JSON a :class:`Watermark` writes (cursors without it are older shapes).
WATERMARK_VERSION = 1
#: Most boundary keys a watermark remembers (the newest win; beyond it items are re-read).
MAX_SEEN = 5000


def parse_instant(value: Any) -> datetime | None:
    """An ISO 8601 string (``Z``, ``+00:00`` or ``+0000``), epoch milliseconds or a
    datetime -> aware UTC datetime; ``None`` for ``None``/empty/unreadable values."""
    if isinstance(value, datetime):
        return utc(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value / 1000, UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        return utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        return None


@dataclass
class Watermark:
    """The incremental cursor of a time-ordered source, one type for every connector.

    dlt's ``incremental`` with Onyx's typed checkpoint: the highest value read (an
    ``updated``/``lastmodified`` instant), read again with a *lag* (overlap) on the next
    run because source queries are imprecise at the edge (minute-precision CQL dates,
    clocks, commit delays); the keys read inside that window with their *version*, so the
    next run skips what it already read (boundary de-duplication); and a *hold-back*: the
    instant the cursor must not pass because something before it was not read (a failed
    item, a result set that shifted while it was paged, an entity that could not be read).

    A connector reads ``since`` for its query, asks :meth:`is_known` before reading an
    item, calls :meth:`advance` after reading one (or skipping it for good),
    :meth:`hold_at` when something at an instant was not read (or :meth:`hold_all` when
    the whole read must be done again), writes :meth:`to_json` into checkpoints and
    :meth:`result` ``.to_json()`` as the cursor. The cursor moves only as far as
    :meth:`result` says; with :func:`cursor_may_advance` (what the flow asks before it
    stores a cursor) that is the one place that decides it.

    Attributes:
        value: the highest instant read through (aware UTC), ``None`` before any read.
        lag: how far before ``value`` the next read starts.
        seen: ``key -> (version, instant)`` of the items read inside the lag window.
        hold: the instant the cursor must not pass (``held`` says whether one is set;
            ``hold=None`` with ``held`` means "not past where this read started").
        key: the JSON field name of ``value`` (``"when"``, ``"updated"``), so cursors
            keep the names their source uses.
        timespec: ``datetime.isoformat`` precision used when writing instants.
    """

    value: datetime | None = None
    lag: timedelta = timedelta(0)
    seen: dict[str, tuple[Any, datetime]] = field(default_factory=dict)
    hold: datetime | None = None
    held: bool = False
    key: str = "value"
    timespec: str = "auto"
    origin: datetime | None = None
    known: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------- reading

    @classmethod
    def read(cls, data: Any, *, key: str = "value", lag: timedelta = timedelta(0),
             timespec: str = "auto") -> Watermark:
        """The watermark stored in a cursor: this class's JSON (with ``version``), or an
        older shape — ``{key: instant, "seen": {id: [version, instant]}}`` (Confluence),
        ``{key: instant, "seen": {id: epoch_ms}}`` (Jira, the version is the instant),
        a bare instant string (GitLab issues/merge requests) — or ``None`` (no cursor).

        Raises:
            ValueError: a cursor of a newer, unknown watermark version.
        """
        wm = cls(lag=lag, key=key, timespec=timespec)
        if data is None:
            return wm
        if isinstance(data, str | int | float | datetime):
            wm.value = wm.origin = parse_instant(data)
        elif isinstance(data, Mapping):
            version = data.get("version", 0)
            if not isinstance(version, int) or version > WATERMARK_VERSION:
                raise ValueError(f"unknown cursor version {version!r} (this kbsync "
                                 f"writes version {WATERMARK_VERSION})")
            wm.value = parse_instant(data.get(key, data.get("value")))
            for item, entry in (data.get("seen") or {}).items():
                if isinstance(entry, list | tuple) and len(entry) == 2:
                    at = parse_instant(entry[1])
                    version_of = entry[0]
                else:  # Jira's {KEY: updated epoch ms}: the instant is the version
                    at, version_of = parse_instant(entry), entry
                if at is not None:
                    wm.seen[str(item)] = (version_of, at)
            if data.get("held"):
                wm.held, wm.hold = True, parse_instant(data.get("hold"))
            if "origin" in data:
                wm.origin = parse_instant(data.get("origin"))
            else:
                wm.origin = wm.value
        else:
            raise ValueError(f"not a watermark: {type(data).__name__}")
        wm.known = {k: v for k, (v, _) in wm.seen.items()}
        return wm

    def restore(self, state: Any) -> Watermark:
        """Continue a read from a checkpoint's :meth:`to_json` (keeps what :meth:`is_known`
        compares with: the keys of the cursor the read started from)."""
        resumed = Watermark.read(state, key=self.key, lag=self.lag, timespec=self.timespec)
        resumed.known = self.known
        return resumed

    # ------------------------------------------------------------- querying

    @property
    def since(self) -> datetime | None:
        """Where the next read starts: ``value - lag`` (``None``: from the beginning)."""
        return None if self.value is None else self.value - self.lag

    def is_known(self, item: str, version: Any) -> bool:
        """Whether ``item`` was already read at ``version``, by the run that wrote the
        cursor this read started from or earlier in this read (then :meth:`advance` it
        and do not read it again)."""
        if version is None:
            return False
        return self.known.get(str(item), _NOTHING) == version or \
            self.seen.get(str(item), (_NOTHING,))[0] == version

    # ------------------------------------------------------------- recording

    def advance(self, item: str, version: Any, at: datetime | None) -> None:
        """``item`` at ``version`` (last changed at ``at``) is read, or skipped for good."""
        if at is None or version is None:
            return
        at = utc(at)
        if self.value is None or at > self.value:
            self.value = at
        self.seen[str(item)] = (version, at)

    def hold_at(self, at: datetime | None) -> None:
        """The cursor must not pass ``at`` (``None``: not past where this read started).

        For a failed item pass its own instant (it is read again) or the instant read
        before it; for a result set that shifted, the page boundary it shifted across.
        Holds only ever lower: the lowest one wins.
        """
        at = self.origin if at is None else utc(at)
        if not self.held:
            self.hold, self.held = at, True
        elif self.hold is not None and (at is None or at < self.hold):
            self.hold = at

    def hold_all(self) -> None:
        """Nothing after where this read started counts: the cursor stays there."""
        self.hold_at(None)

    # --------------------------------------------------------------- writing

    @property
    def bound(self) -> datetime | None:
        """The value the cursor may take: ``value``, lowered to ``hold`` when held."""
        if not self.held:
            return self.value
        if self.hold is None or self.value is None:  # held at the very start / nothing read
            return self.hold
        return min(self.value, self.hold)

    def prune(self) -> None:
        """Forget keys before the lag window of :attr:`bound` (keep the newest MAX_SEEN)."""
        bound = self.bound
        if bound is not None:
            floor = bound - self.lag
            self.seen = {k: v for k, v in self.seen.items() if v[1] >= floor}
        if len(self.seen) > MAX_SEEN:
            self.seen = dict(sorted(self.seen.items(), key=lambda kv: kv[1][1])[-MAX_SEEN:])

    def result(self) -> Watermark:
        """The watermark to persist after a complete read: ``value`` lowered to the
        hold-back, and only the keys read inside the lag window at or before it (keys
        read after a hold-back are read again by the next run)."""
        bound = self.bound
        seen = {k: v for k, v in self.seen.items() if bound is not None and v[1] <= bound}
        out = Watermark(value=bound, lag=self.lag, seen=seen, key=self.key,
                        timespec=self.timespec)
        out.origin = bound
        out.prune()
        return out

    def _time(self, at: datetime | None) -> str | None:
        return None if at is None else at.isoformat(timespec=self.timespec)

    def to_json(self) -> dict[str, Any]:
        """``{"version": 1, <key>: instant, "seen": {key: [version, instant]}}`` plus,
        mid-read, ``held``/``hold``/``origin``. Instants are ISO 8601 UTC strings."""
        out: dict[str, Any] = {
            self.key: self._time(self.value),
            "seen": {k: [v, self._time(at)] for k, (v, at) in self.seen.items()},
            "version": WATERMARK_VERSION,
        }
        if self.held:
            out["held"], out["hold"] = True, self._time(self.hold)
        if self.origin != self.value:
            out["origin"] = self._time(self.origin)
        return out


_NOTHING = object()


def cursor_may_advance(cursor: Any, failures: list[DocumentIssue]) -> bool:
    """The one rule for whether a run may store the ``cursor`` its connector returned.

    Every failure must be held back *inside* the cursor: a failed entity is (the
    connector's watermark keeps that entity where it was, when the cursor is a versioned
    watermark cursor, see :func:`holds_fetch_failures`); a failed document is not counted
    on, because a failure while indexing a fetched document is never in the cursor. So:
    no cursor, no move; no failures or only entity failures under a watermark cursor,
    move; otherwise keep the previous cursor.
    """
    if cursor is None:
        return False
    return all(f.scope == "entity" and holds_fetch_failures(cursor) for f in failures)


def holds_fetch_failures(cursor: Any) -> bool:
    """Whether ``cursor`` was written by :class:`Watermark` code that already holds back
    at every item and entity the connector failed to read (``version`` present).

    Such a cursor may be stored after a run with fetch failures: its own hold-back makes
    the next run read them again. Older cursors (and git's commit cursor) do not, so a
    run with any failure keeps the previous cursor. A failure while *indexing* a fetched
    document is never in the cursor: such a run never moves it.
    """
    return isinstance(cursor, Mapping) and cursor.get("version") == WATERMARK_VERSION


def entity_failure(source: str, entity: str, reason: str) -> DocumentIssue:
    """The record of an entity (``"space:OPS"``, ``"project:AUTH"``) of ``source`` that
    could not be read: ``doc_id`` ``"<source>:<entity>"``, ``scope="entity"``."""
    return DocumentIssue(f"{source}:{entity}", reason, "failed", ENTITY_TITLE + entity,
                         scope="entity")


def read_entities(request: FetchRequest, checkpoint: Checkpoint | None, *,
                  keys: Sequence[str], kind: str, source: str,
                  cursor_of: Callable[[Cursor | None, str], Cursor | None],
                  read: Callable[[FetchRequest, Checkpoint | None, str], Iterator[Page]],
                  refused: Callable[[ConnectorError, str], bool],
                  fail: Callable[[str], Exception]) -> Iterator[Page]:
    """Read several entities of a source (Confluence spaces, Jira projects) one search
    each, in the order of ``keys``, so that one that cannot be read fails alone.

    The cursor is ``{"<kind>s": {<key>: <that entity's cursor>}, "version": 1}``: each
    entity moves on its own. An entity whose read raises :class:`EntityError`, or a
    :class:`ConnectorError` that ``refused(exc, key)`` accepts, is a failed entity (a
    page with :func:`entity_failure` ``"<kind>:<key>"`` and the reason); its cursor
    stays where it was (one never read has none, so it is read from the beginning once
    it can be) and the others are read. When no entity can be read, ``fail(message)``
    is raised.

    The checkpoint is ``{"<kind>": <key being read>, "inner": <its read's checkpoint, or
    None once done>, "done": {<key>: <new cursor>}, "entities": [[<key>, <reason>]]}``.
    The last page (possibly empty) carries the cursor and, again, the entity failures of
    runs before the checkpoint, so the run that finishes the read knows them. A
    checkpoint in which every entity failed (its run failed as a whole) is not resumed:
    the read starts over, so an entity whose access is restored is read instead of its
    old failure replayed.

    Args:
        request: the run's request; each entity reads it with its own cursor.
        keys: the configured entities.
        kind: ``"space"``, ``"project"``: names the checkpoint and cursor keys.
        source: the source's name (failure records, logs).
        cursor_of: ``(request cursor, key) -> that entity's cursor`` (old single-search
            cursors included).
        read: ``(request, inner checkpoint, key) -> pages`` of one entity; its last page
            carries that entity's cursor.
        refused: whether a connector error means the entity cannot be read.
        fail: builds the error raised when no entity can be read.
    """
    old = request.cursor if not request.is_backfill else None
    resume = checkpoint if checkpoint and kind in checkpoint else None
    if resume and {e[0] for e in resume.get("entities") or []} >= set(keys):
        resume = None
    done: dict[str, Any] = dict((resume or {}).get("done") or {})
    carried = [tuple(e) for e in (resume or {}).get("entities") or []]
    entities: list[tuple[str, str]] = list(carried)
    failed_keys = {key for key, _ in carried}
    at, inner = (resume or {}).get(kind), (resume or {}).get("inner")

    def position(key: str, inner_checkpoint: Checkpoint | None) -> Checkpoint:
        return {kind: key, "inner": inner_checkpoint, "done": dict(done),
                "entities": [list(e) for e in entities]}

    last: Checkpoint = position(at or "", None)
    for key in keys:
        if key in done or key in failed_keys:
            continue
        sub = replace(request, cursor=cursor_of(old, key))
        try:
            for page in read(sub, inner if key == at else None, key):
                if page.cursor is not None:
                    done[key] = page.cursor
                    page.cursor = None
                    last = position(key, None)
                else:
                    last = position(key, page.checkpoint)
                page.checkpoint = last
                yield page
        except EntityError as exc:
            reason = str(exc)
        except ConnectorError as exc:
            if not refused(exc, key):
                raise
            reason = str(exc)
        else:
            continue
        entities.append((key, reason))
        last = position(key, None)
        log.warning("source %r: %s", source, reason)
        yield Page(issues=[entity_failure(source, f"{kind}:{key}", reason)], checkpoint=last)
    if entities and {key for key, _ in entities} >= set(keys):
        raise fail("; ".join(reason for _, reason in entities))
    cursor: dict[str, Any] = {}
    for key in keys:
        if key in done:
            cursor[key] = done[key]
        elif (start := cursor_of(old, key)) is not None:
            cursor[key] = start  # a failed entity holds where it was
    yield Page(issues=[entity_failure(source, f"{kind}:{key}", reason) for key, reason in carried],
               checkpoint=last, cursor={f"{kind}s": cursor, "version": WATERMARK_VERSION})

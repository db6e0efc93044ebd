"""What kbsync remembers that is not content: cursors, checkpoints, document issues.

SQLite under the data dir by default; any SQLAlchemy URL in ``KBSYNC_STATE_URL``
(``postgresql+psycopg://...``) when several workers share it. Chroma is the source of
truth for what is indexed; losing this database costs a re-listing, never a
re-embedding (every document is re-read, found unchanged by its hash and skipped).

Tables:
    ``sources``  one row per source: cursor (JSON), checkpoint (JSON, with the request
                 it belongs to), last run and last success times, last run summary.
    ``document_issues``  one row per (source, document) that was skipped or failed,
                 with the reason and how many runs saw it; removed when the document
                 is indexed or deleted.
    ``source_counts``  one row per source: its documents and chunks in the index
                 (counted in Chroma once, then moved by every durable batch in the
                 transaction that saves its checkpoint; recounted by reconciliation and
                 after an interrupted batch), so ``kbsync status`` never walks the index.
    ``source_chunking``  one row per source: the chunking identity (model, chunking
                 settings, chunking algorithm version: ``flows.sync.Pipeline.hash_salt``)
                 its last complete read was indexed with; when it differs from the
                 running one, the next sync reads everything again so every document
                 is re-chunked (the rows of another identity are rewritten, not left).
    ``source_locks``  one row per source being synced: a lease (owner, since, expiry) so
                 that two runs of one source never interleave, whichever way they were
                 started (a deployment, the nightly ``sync-all``, a backfill, the CLI).
                 The owner names the run's Prefect flow run, host and process
                 (:func:`lease_owner`); a holder that is provably gone (its process is
                 dead on this host, or its flow run is in a final state) is taken over
                 at once, any other after its short TTL, which a live run's
                 :class:`LeaseHeartbeat` keeps renewing.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    DateTime,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

log = logging.getLogger(__name__)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class SourceRow(Base):
    __tablename__ = "sources"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    cursor: Mapped[str | None] = mapped_column(Text, nullable=True)
    checkpoint: Mapped[str | None] = mapped_column(Text, nullable=True)
    checkpoint_request: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_success_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_status: Mapped[str | None] = mapped_column(String(40), nullable=True)
    last_summary: Mapped[str | None] = mapped_column(Text, nullable=True)
    syncs_since_reconcile: Mapped[int] = mapped_column(Integer, default=0)
    last_reconciled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class IssueRow(Base):
    __tablename__ = "document_issues"

    source: Mapped[str] = mapped_column(String(200), primary_key=True)
    doc_id: Mapped[str] = mapped_column(String(1000), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(Text)
    title: Mapped[str] = mapped_column(Text, default="")
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=1)


class CountRow(Base):
    __tablename__ = "source_counts"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    documents: Mapped[int] = mapped_column(Integer, default=0)
    chunks: Mapped[int] = mapped_column(Integer, default=0)
    writing: Mapped[int] = mapped_column(Integer, default=0)
    counted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ChunkingRow(Base):
    __tablename__ = "source_chunking"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    identity: Mapped[str] = mapped_column(Text)


class LockRow(Base):
    __tablename__ = "source_locks"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


@dataclass(frozen=True)
class SourceLock:
    """Who holds a source's lease, since when and until when (aware UTC).

    ``owner`` is ``"<run>@<host>:<pid>"`` (see :func:`lease_owner`), where ``<run>`` is
    the Prefect flow run id (a UUID) or ``local-<hex>`` for a run outside any flow run.
    Owners written by older versions (``<hex>@<host>:<pid>``) parse the same way.
    """

    name: str
    owner: str
    acquired_at: datetime
    expires_at: datetime

    def _parts(self) -> tuple[str, str | None, int | None]:
        match = re.fullmatch(r"(?P<run>[^@]*)@(?P<host>.*):(?P<pid>\d+)", self.owner)
        if match is None:
            return self.owner, None, None
        return match["run"], match["host"], int(match["pid"])

    @property
    def host(self) -> str | None:
        """The holder's host name, or None for an owner in another format."""
        return self._parts()[1]

    @property
    def pid(self) -> int | None:
        """The holder's process id on :attr:`host`."""
        return self._parts()[2]

    @property
    def flow_run_id(self) -> str | None:
        """The holder's Prefect flow run id, or None when it ran outside a flow run."""
        run = self._parts()[0]
        try:
            return str(uuid.UUID(run)) if "-" in run else None
        except ValueError:
            return None

    def describe(self) -> str:
        """``flow run <id> on <host> (pid <pid>) since <time> UTC, lease until <time> UTC``."""
        who = f"flow run {self.flow_run_id}" if self.flow_run_id else "a run"
        where = f" on {self.host} (pid {self.pid})" if self.host else f" ({self.owner})"
        return (f"{who}{where} since {self.acquired_at:%Y-%m-%d %H:%M:%S} UTC, lease until "
                f"{self.expires_at:%Y-%m-%d %H:%M:%S} UTC")


@dataclass(frozen=True)
class SourceState:
    """A source's persisted state, as read."""

    name: str
    cursor: dict[str, Any] | None
    checkpoint: dict[str, Any] | None
    checkpoint_request: str | None
    last_run_at: datetime | None
    last_success_at: datetime | None
    last_status: str | None
    last_summary: dict[str, Any] | None
    syncs_since_reconcile: int
    last_reconciled_at: datetime | None


@dataclass(frozen=True)
class IndexCounts:
    """A source's documents and chunks in the index, as the state store keeps them.

    Attributes:
        documents, chunks: counted in Chroma at ``counted_at`` (the first sync, an
            interrupted run's next sync, every reconciliation), then moved by each
            durable batch's changes.
        writing: a batch was being written and its changes not yet recorded; if its run
            died the counts may be off until the next sync recounts them.
        counted_at: when they were last counted in Chroma (aware UTC).
    """

    documents: int
    chunks: int
    writing: bool
    counted_at: datetime | None


@dataclass(frozen=True)
class IssueRecord:
    source: str
    doc_id: str
    kind: str
    reason: str
    title: str
    first_seen: datetime
    last_seen: datetime
    attempts: int


def _now() -> datetime:
    return datetime.now(UTC)


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _loads(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def default_state_url(data_dir: Path) -> str:
    """``sqlite:///<data_dir>/state.db``."""
    return f"sqlite:///{Path(data_dir).resolve() / 'state.db'}"


class StateStore:
    """Cursors, checkpoints and per-document issues in a SQL database.

    Args:
        url: a SQLAlchemy URL (``sqlite:///...``, ``postgresql+psycopg://...``).

    Tables are created on first use (``CREATE TABLE IF NOT EXISTS``).
    """

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.url = url
        self.engine: Engine = create_engine(url, pool_pre_ping=True, future=True)
        Base.metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ sources

    def _row(self, session: Session, name: str) -> SourceRow:
        row = session.get(SourceRow, name)
        if row is None:
            row = SourceRow(name=name, syncs_since_reconcile=0)
            session.add(row)
        return row

    def get(self, name: str) -> SourceState:
        """The state of ``name`` (all empty for a source never synced)."""
        with Session(self.engine) as session:
            row = session.get(SourceRow, name)
            if row is None:
                return SourceState(name, None, None, None, None, None, None, None, 0, None)
            return SourceState(
                name=row.name,
                cursor=_loads(row.cursor),
                checkpoint=_loads(row.checkpoint),
                checkpoint_request=row.checkpoint_request,
                last_run_at=row.last_run_at,
                last_success_at=row.last_success_at,
                last_status=row.last_status,
                last_summary=_loads(row.last_summary),
                syncs_since_reconcile=row.syncs_since_reconcile or 0,
                last_reconciled_at=row.last_reconciled_at,
            )

    def names(self) -> list[str]:
        with Session(self.engine) as session:
            return list(session.scalars(select(SourceRow.name).order_by(SourceRow.name)))

    def save_checkpoint(self, name: str, request_key: str, checkpoint: dict[str, Any], *,
                        counts_delta: tuple[int, int] | None = None) -> None:
        """Remember that everything up to ``checkpoint`` of ``request_key`` is durable.

        ``counts_delta`` (documents, chunks) is what the durable batch changed in the
        index; it moves the kept :class:`IndexCounts` in the same transaction and clears
        their ``writing`` mark (nothing is kept when they were never counted)."""
        with Session(self.engine) as session, session.begin():
            row = self._row(session, name)
            row.checkpoint = _dumps(checkpoint)
            row.checkpoint_request = request_key
            if counts_delta is not None:
                counts = session.get(CountRow, name)
                if counts is not None:
                    counts.documents += counts_delta[0]
                    counts.chunks += counts_delta[1]
                    counts.writing = 0

    # ------------------------------------------------------------------- counts

    def counts(self, name: str) -> IndexCounts | None:
        """The kept document and chunk counts of ``name``, or None when never counted.
        One row read: ``kbsync status`` costs the same at any index size."""
        with Session(self.engine) as session:
            row = session.get(CountRow, name)
            if row is None:
                return None
            return IndexCounts(row.documents, row.chunks, bool(row.writing), row.counted_at)

    def set_counts(self, name: str, documents: int, chunks: int) -> None:
        """Record counts just counted in the index (clears the ``writing`` mark)."""
        with Session(self.engine) as session, session.begin():
            row = session.get(CountRow, name)
            if row is None:
                row = CountRow(name=name)
                session.add(row)
            row.documents, row.chunks, row.writing = documents, chunks, 0
            row.counted_at = _now()

    def mark_writing(self, name: str) -> None:
        """Mark the counts of ``name`` as about to change (a batch is being written);
        :meth:`save_checkpoint` with its ``counts_delta`` clears the mark."""
        with Session(self.engine) as session, session.begin():
            session.execute(update(CountRow).where(CountRow.name == name).values(writing=1))

    def clear_checkpoint(self, name: str) -> None:
        with Session(self.engine) as session, session.begin():
            row = self._row(session, name)
            row.checkpoint = None
            row.checkpoint_request = None

    def checkpoint_for(self, name: str, request_key: str) -> dict[str, Any] | None:
        """The saved checkpoint if it belongs to the same request, else ``None``."""
        state = self.get(name)
        if state.checkpoint is not None and state.checkpoint_request == request_key:
            return state.checkpoint
        return None

    def finish_run(self, name: str, *, status: str, summary: dict[str, Any],
                   cursor: dict[str, Any] | None = None, advance_cursor: bool = False,
                   reconciled: bool = False) -> None:
        """Record the end of a run; moves the cursor and clears the checkpoint only when
        ``advance_cursor`` (everything up to ``cursor`` is durable)."""
        now = _now()
        with Session(self.engine) as session, session.begin():
            row = self._row(session, name)
            row.last_run_at = now
            row.last_status = status
            row.last_summary = _dumps(summary)
            if advance_cursor:
                row.cursor = _dumps(cursor)
                row.checkpoint = None
                row.checkpoint_request = None
            if status == "completed":
                row.last_success_at = now
                row.syncs_since_reconcile = (row.syncs_since_reconcile or 0) + 1
            if reconciled:
                row.syncs_since_reconcile = 0
                row.last_reconciled_at = now

    def reset(self, name: str) -> None:
        """Forget a source's cursor, checkpoint, issues and kept counts (the index is
        untouched; the next sync counts it again)."""
        with Session(self.engine) as session, session.begin():
            session.execute(delete(SourceRow).where(SourceRow.name == name))
            session.execute(delete(CountRow).where(CountRow.name == name))
            session.execute(delete(ChunkingRow).where(ChunkingRow.name == name))
            session.execute(delete(IssueRow).where(IssueRow.source == name))

    # ----------------------------------------------------------------- chunking

    def chunking(self, name: str) -> str | None:
        """The chunking identity ``name`` was last read in full with, or None when never
        recorded (a source never synced, or a state written before this was kept)."""
        with Session(self.engine) as session:
            row = session.get(ChunkingRow, name)
            return row.identity if row is not None else None

    def set_chunking(self, name: str, identity: str) -> None:
        """Record that a complete read of ``name`` indexed every document with ``identity``."""
        with Session(self.engine) as session, session.begin():
            row = session.get(ChunkingRow, name)
            if row is None:
                session.add(ChunkingRow(name=name, identity=identity))
            else:
                row.identity = identity

    # ------------------------------------------------------------------- issues

    def record_issues(self, source: str, issues: Iterable[tuple[str, str, str, str]]) -> None:
        """Upsert ``(doc_id, kind, reason, title)`` issues for ``source``."""
        now = _now()
        with Session(self.engine) as session, session.begin():
            for doc_id, kind, reason, title in issues:
                row = session.get(IssueRow, (source, doc_id))
                if row is None:
                    session.add(IssueRow(source=source, doc_id=doc_id, kind=kind, reason=reason,
                                         title=title, first_seen=now, last_seen=now, attempts=1))
                else:
                    row.kind, row.reason, row.title = kind, reason, title
                    row.last_seen = now
                    row.attempts = (row.attempts or 0) + 1

    def clear_issues(self, source: str, doc_ids: Iterable[str]) -> None:
        """Forget issues of documents that are now indexed or deleted."""
        doc_ids = list(doc_ids)
        with Session(self.engine) as session, session.begin():
            for start in range(0, len(doc_ids), 500):
                session.execute(delete(IssueRow).where(
                    IssueRow.source == source, IssueRow.doc_id.in_(doc_ids[start:start + 500])))

    def issues(self, source: str | None = None, kind: str | None = None) -> list[IssueRecord]:
        with Session(self.engine) as session:
            stmt = select(IssueRow).order_by(IssueRow.source, IssueRow.doc_id)
            if source:
                stmt = stmt.where(IssueRow.source == source)
            if kind:
                stmt = stmt.where(IssueRow.kind == kind)
            return [IssueRecord(r.source, r.doc_id, r.kind, r.reason, r.title, r.first_seen,
                                r.last_seen, r.attempts) for r in session.scalars(stmt)]

    def issue_counts(self) -> dict[tuple[str, str], int]:
        """``(source, kind) -> count``."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(IssueRow.source, IssueRow.kind, func.count()).group_by(
                    IssueRow.source, IssueRow.kind))
            return {(s, k): n for s, k, n in rows}

    # -------------------------------------------------------------------- locks

    def acquire_lock(self, name: str, owner: str, ttl_seconds: float,
                     holder_gone: Callable[[SourceLock], str | None] | None = None,
                     ) -> SourceLock | None:
        """Take the lease on source ``name`` for ``ttl_seconds``.

        Succeeds when nobody holds it, when the holder's lease expired, when ``owner``
        already holds it, or when ``holder_gone(holder)`` returns a reason (the holder
        is provably dead: see :func:`lease_holder_gone`). Atomic on SQLite and
        PostgreSQL: a conditional ``UPDATE``, else an ``INSERT`` that a concurrent
        winner makes fail on the primary key; a takeover is an ``UPDATE`` conditioned on
        the dead holder's owner and ``acquired_at``, so two runs never both win it.

        Returns:
            ``None`` when the lease is now ``owner``'s; otherwise the current holder's
            :class:`SourceLock` (nothing is changed).
        """
        now = _now()
        until = now + timedelta(seconds=ttl_seconds)
        with self.engine.begin() as conn:
            taken = conn.execute(
                update(LockRow)
                .where(LockRow.name == name,
                       or_(LockRow.expires_at < now, LockRow.owner == owner))
                .values(owner=owner, acquired_at=now, expires_at=until))
            if taken.rowcount == 1:
                return None
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(LockRow).values(name=name, owner=owner, acquired_at=now,
                                                    expires_at=until))
            return None
        except IntegrityError:
            holder = self.lock(name)
            if holder is None:  # released between our two statements: try once more
                return self.acquire_lock(name, owner, ttl_seconds, holder_gone)
        reason = holder_gone(holder) if holder_gone is not None else None
        if reason is None:
            return holder
        with self.engine.begin() as conn:
            taken = conn.execute(
                update(LockRow)
                .where(LockRow.name == name, LockRow.owner == holder.owner,
                       LockRow.acquired_at == holder.acquired_at)
                .values(owner=owner, acquired_at=now, expires_at=until))
        if taken.rowcount == 1:
            log.warning("took over the lease on %r from %s: %s", name, holder.describe(), reason)
            return None
        return self.lock(name) or self.acquire_lock(name, owner, ttl_seconds, holder_gone)

    def renew_lock(self, name: str, owner: str, ttl_seconds: float) -> bool:
        """Extend ``owner``'s lease to ``ttl_seconds`` from now; False if it is not
        ``owner``'s any more (it expired and another run took it)."""
        until = _now() + timedelta(seconds=ttl_seconds)
        with self.engine.begin() as conn:
            res = conn.execute(update(LockRow).where(LockRow.name == name,
                                                     LockRow.owner == owner)
                               .values(expires_at=until))
            return res.rowcount == 1

    def release_lock(self, name: str, owner: str | None = None) -> SourceLock | None:
        """Give the lease back: only ``owner``'s (another holder's is left alone), or
        whoever holds it when ``owner`` is None (``kbsync unlock``). Returns the lease
        that was released, or None when there was none to release."""
        with self.engine.begin() as conn:
            row = conn.execute(select(LockRow).where(LockRow.name == name)).first()
            if row is None or (owner is not None and row.owner != owner):
                return None
            gone = conn.execute(delete(LockRow).where(LockRow.name == name,
                                                      LockRow.owner == row.owner))
            if gone.rowcount != 1:
                return None
            return SourceLock(row.name, row.owner, row.acquired_at, row.expires_at)

    def lock(self, name: str) -> SourceLock | None:
        """The current lease on ``name``, expired or not; None when there is none."""
        with Session(self.engine) as session:
            row = session.get(LockRow, name)
            if row is None:
                return None
            return SourceLock(row.name, row.owner, row.acquired_at, row.expires_at)

    def locks(self) -> dict[str, SourceLock]:
        """Every lease held now (expired ones included), by source name."""
        with Session(self.engine) as session:
            return {r.name: SourceLock(r.name, r.owner, r.acquired_at, r.expires_at)
                    for r in session.scalars(select(LockRow))}


# ---------------------------------------------------------------------------- leases


def lease_owner(flow_run_id: str | None = None) -> str:
    """The owner string of a run in this process: ``"<run>@<host>:<pid>"``, where
    ``<run>`` is ``flow_run_id`` (a Prefect flow run UUID) or ``local-<hex>``."""
    run = flow_run_id or f"local-{uuid.uuid4().hex}"
    return f"{run}@{socket.gethostname()}:{os.getpid()}"[:200]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OSError:
        return True
    return True


def _flow_run_final(flow_run_id: str, timeout: float) -> str | None:
    """The final state name of the Prefect flow run, or None (not final, not found,
    or the API did not answer within ``timeout`` seconds).

    Reads ``GET /flow_runs/{id}`` through Prefect's client
    (https://docs.prefect.io/v3/api-ref/rest-api/server/flow-runs/read-flow-run); only
    when a Prefect API is configured or a flow run context exists, so it never starts
    an ephemeral server nor blocks a run for longer than ``timeout``.
    """
    result: dict[str, str | None] = {}

    def query() -> None:
        try:
            from prefect.client.orchestration import get_client
            from prefect.context import FlowRunContext
            from prefect.settings import PREFECT_API_URL

            if not PREFECT_API_URL.value() and FlowRunContext.get() is None:
                return
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(uuid.UUID(flow_run_id))
            if run.state is not None and run.state.is_final():
                result["state"] = run.state.name
        except Exception as exc:  # noqa: BLE001 - unknown means "not provably gone"
            log.debug("could not read flow run %s: %s", flow_run_id, exc)

    # the caller's context (its flow run, a temporary server's API URL) goes along
    worker = threading.Thread(target=contextvars.copy_context().run, args=(query,),
                              daemon=True, name="kbsync-lease-check")
    worker.start()
    worker.join(timeout)
    return result.get("state")


def lease_holder_gone(holder: SourceLock, *, prefect_timeout: float = 5.0) -> str | None:
    """Why ``holder`` is provably gone, or None when it may still be running.

    Gone means: it runs on this host and its process is not alive; or its Prefect
    flow run is in a final state (Completed, Failed, Crashed, Cancelled). Anything
    uncertain (another host, no API, an unknown run) is not gone: the TTL decides.
    """
    if holder.host == socket.gethostname() and holder.pid is not None:
        if holder.pid != os.getpid() and not _pid_alive(holder.pid):
            return f"its process {holder.pid} on {holder.host} is not running"
    if holder.flow_run_id:
        final = _flow_run_final(holder.flow_run_id, prefect_timeout)
        if final is not None:
            return f"its flow run {holder.flow_run_id} is {final}"
    return None


class LeaseLost(Exception):
    """The run's lease expired (its heartbeat could not renew it in time) and another
    run took it; the run stops so that two runs never interleave."""


class LeaseHeartbeat:
    """Keeps a run's lease alive from a daemon thread: renews it every ``ttl/3``
    seconds while the run lives, so a live run never loses it, however long one page
    takes, and a dead one frees its source after ``ttl`` at most.

    Args:
        state: the state store holding the lease.
        name: the source.
        owner: the lease's owner (:func:`lease_owner`).
        ttl_seconds: the lease's TTL.

    Use as a context manager; :meth:`check` raises :class:`LeaseLost` once a renewal
    found the lease taken by another run.
    """

    def __init__(self, state: StateStore, name: str, owner: str, ttl_seconds: float) -> None:
        self.state, self.name, self.owner, self.ttl = state, name, owner, ttl_seconds
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"kbsync-lease-{name}")

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.state.renew_lock(self.name, self.owner, self.ttl):
                    self.lost = True
                    log.error("the lease on %r was taken by another run", self.name)
                    return
            except Exception as exc:  # noqa: BLE001 - a database hiccup: try next beat
                log.warning("could not renew the lease on %r: %s", self.name, exc)

    def check(self) -> None:
        """Raise :class:`LeaseLost` when the lease is not this run's any more."""
        if self.lost:
            raise LeaseLost(f"the lease on {self.name!r} expired during this run and another "
                            "run took it; stopping (the state database was unreachable for "
                            "longer than sync.lease_ttl_seconds?)")

    def __enter__(self) -> LeaseHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

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
    ``source_locks``  one row per source being synced: a lease (owner, expiry) so that
                 two runs of one source never interleave, whichever way they were
                 started (a deployment, the nightly ``sync-all``, a backfill, the CLI).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
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


class LockRow(Base):
    __tablename__ = "source_locks"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


@dataclass(frozen=True)
class SourceLock:
    """Who holds a source's lease, and until when (aware UTC)."""

    name: str
    owner: str
    acquired_at: datetime
    expires_at: datetime


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

    def save_checkpoint(self, name: str, request_key: str, checkpoint: dict[str, Any]) -> None:
        """Remember that everything up to ``checkpoint`` of ``request_key`` is durable."""
        with Session(self.engine) as session, session.begin():
            row = self._row(session, name)
            row.checkpoint = _dumps(checkpoint)
            row.checkpoint_request = request_key

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
        """Forget a source's cursor, checkpoint and issues (the index is untouched)."""
        with Session(self.engine) as session, session.begin():
            session.execute(delete(SourceRow).where(SourceRow.name == name))
            session.execute(delete(IssueRow).where(IssueRow.source == name))

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

    def acquire_lock(self, name: str, owner: str, ttl_seconds: float) -> SourceLock | None:
        """Take the lease on source ``name`` for ``ttl_seconds``.

        Succeeds when nobody holds it, when the holder's lease expired (a run that died
        without releasing it), or when ``owner`` already holds it. Atomic on SQLite and
        PostgreSQL: a conditional ``UPDATE``, else an ``INSERT`` that a concurrent
        winner makes fail on the primary key.

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
                return self.acquire_lock(name, owner, ttl_seconds)
            return holder

    def renew_lock(self, name: str, owner: str, ttl_seconds: float) -> bool:
        """Extend ``owner``'s lease to ``ttl_seconds`` from now; False if it is not
        ``owner``'s any more (it expired and another run took it)."""
        until = _now() + timedelta(seconds=ttl_seconds)
        with self.engine.begin() as conn:
            res = conn.execute(update(LockRow).where(LockRow.name == name,
                                                     LockRow.owner == owner)
                               .values(expires_at=until))
            return res.rowcount == 1

    def release_lock(self, name: str, owner: str) -> None:
        """Give the lease back (only ``owner``'s; another holder's is left alone)."""
        with self.engine.begin() as conn:
            conn.execute(delete(LockRow).where(LockRow.name == name, LockRow.owner == owner))

    def lock(self, name: str) -> SourceLock | None:
        """The current lease on ``name``, expired or not; None when there is none."""
        with Session(self.engine) as session:
            row = session.get(LockRow, name)
            if row is None:
                return None
            return SourceLock(row.name, row.owner, row.acquired_at, row.expires_at)

"""The lexical (BM25) index kept in step with Chroma, for hybrid search.

SQLite FTS5 over pre-analysed text (``transforms.analysis.analyze``: Russian and English
Snowball stems, identifiers split, stop words dropped), one row per chunk under the
same chunk id as in Chroma. The text analysed is the chunk's body under its full title
and heading path (``transforms.context.lexical_text``), where the embedded text has a
short context line. Chosen by measurement against tantivy and bm25s (see
``benchmarks/lexical_engines.py`` and the README): equal hit@k (same analysis, same
BM25), the cheapest incremental writes, transactional (a page is durable or absent,
like the rest of a sync), several processes may write at once (WAL + busy timeout; a
tantivy index admits one writer), and no dependency beyond the standard library.
Ranking is FTS5's built-in ``bm25()`` (k1=1.2, b=0.75;
https://www.sqlite.org/fts5.html#the_bm25_function), negated so higher is better.

Write order (see ``flows.embed.apply_batch``): the lexical index is written *before*
Chroma. Chroma is the source of truth for what is indexed, so a crash between the two
writes leaves the document incomplete in Chroma, and the next sync rewrites it in both.
Rows whose chunk id is not in Chroma are dropped at query time.

Two backends with the same methods (:class:`LexicalBackend`): this SQLite file (one
machine) and :class:`connectors.lexical_postgres.PostgresLexicalIndex` (one index shared
by every worker and query); :func:`open_index` picks one from ``lexical.url``.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from transforms.analysis import ANALYZER_VERSION, analyze
from transforms.context import CONTEXT_VERSION, lexical_text

SCHEMA_VERSION = 1
#: What an index's rows depend on (both backends): table layout, analyzer, and the rule
#: that turns a chunk into the text analysed (``transforms.context.lexical_text``). An
#: index stamped with another value is rebuilt from Chroma (``flows.embed.open_lexical``).
INDEX_VERSION = f"schema={SCHEMA_VERSION};analyzer={ANALYZER_VERSION};context={CONTEXT_VERSION}"
_FTS = ("CREATE VIRTUAL TABLE IF NOT EXISTS terms USING fts5(body, "
        "tokenize=\"unicode61 remove_diacritics 0 tokenchars '_'\", detail=column)")


class LexicalIndexError(Exception):
    """The lexical index cannot be opened or is out of date (rebuild it)."""


@dataclass(frozen=True)
class LexicalHit:
    """A chunk id and its BM25 score (higher is better)."""

    chunk_id: str
    score: float


class LexicalBackend(Protocol):
    """What a lexical index offers the flows (SQLite :class:`LexicalIndex`, or
    :class:`connectors.lexical_postgres.PostgresLexicalIndex`)."""

    version: str
    path: Any  #: where it lives, for messages (a file, or the URL without password)

    @property
    def current(self) -> bool: ...
    def count(self) -> int: ...
    def empty(self) -> bool: ...
    def ids(self) -> set[str]: ...
    def add(self, ids: Sequence[str], texts: Sequence[str],
            metadatas: Sequence[dict[str, Any]]) -> None: ...
    def delete(self, ids: Iterable[str]) -> None: ...
    def delete_documents(self, doc_ids: Iterable[str]) -> None: ...
    def clear(self) -> None: ...
    def search(self, text: str, k: int = 50, source: str | None = None) -> list[LexicalHit]: ...
    def close(self) -> None: ...


def is_database_url(location: str | Path | None) -> bool:
    """True for a PostgreSQL URL (``postgresql://``, ``postgresql+psycopg://``)."""
    return isinstance(location, str) and location.startswith(("postgresql:", "postgresql+",
                                                               "postgres:"))


def open_index(location: str | Path) -> LexicalBackend:
    """The lexical index at ``location``: a PostgreSQL URL
    (``postgresql+psycopg://user@host:5432/db``) or a SQLite file path.

    Raises:
        LexicalIndexError: it cannot be opened.
    """
    if is_database_url(location):
        from connectors.lexical_postgres import PostgresLexicalIndex

        url = str(location)
        if url.startswith("postgres:"):
            url = "postgresql:" + url[len("postgres:"):]
        if url.startswith("postgresql://"):  # SQLAlchemy would pick psycopg2
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        return PostgresLexicalIndex(url)
    return LexicalIndex(location)


class LexicalIndex:
    """BM25 over chunks in one SQLite file.

    Args:
        path: the database file (``<data_dir>/lexical.db`` by default).

    Thread-safe for one process (one connection behind a lock); several processes may
    share the file.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self.db = sqlite3.connect(self.path, timeout=60, check_same_thread=False,
                                      isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            with self._tx():
                self.db.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT)")
                self.db.execute("CREATE TABLE IF NOT EXISTS chunks(rowid INTEGER PRIMARY KEY, "
                                "chunk_id TEXT UNIQUE NOT NULL, doc_id TEXT NOT NULL, "
                                "source TEXT NOT NULL)")
                self.db.execute("CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id)")
                self.db.execute(_FTS)
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('version', ?)", (self.version,))
        except sqlite3.Error as exc:
            raise LexicalIndexError(f"cannot open the lexical index {self.path}: {exc}") from None

    #: What the stored rows depend on: a different value means the index must be rebuilt.
    version = INDEX_VERSION

    @contextmanager
    def _tx(self) -> Iterator[None]:
        """One write transaction (``BEGIN IMMEDIATE`` takes the write lock up front)."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    # ----------------------------------------------------------------- status

    def stored_version(self) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key='version'").fetchone()
        return row[0] if row else None

    @property
    def current(self) -> bool:
        """False when the rows were written by another analyzer or schema version."""
        return self.stored_version() == self.version

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]

    def empty(self) -> bool:
        """True when the index holds no chunk (one row looked up, not counted)."""
        return self.db.execute("SELECT 1 FROM chunks LIMIT 1").fetchone() is None

    def ids(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT chunk_id FROM chunks")}

    # ----------------------------------------------------------------- writing

    def _delete_rowids(self, rowids: list[int]) -> None:
        self.db.executemany("DELETE FROM terms WHERE rowid = ?", [(r,) for r in rowids])
        self.db.executemany("DELETE FROM chunks WHERE rowid = ?", [(r,) for r in rowids])

    def _rowids(self, column: str, values: Sequence[str]) -> list[int]:
        out: list[int] = []
        for start in range(0, len(values), 500):
            part = list(values[start:start + 500])
            marks = ",".join("?" * len(part))
            out += [r[0] for r in self.db.execute(
                f"SELECT rowid FROM chunks WHERE {column} IN ({marks})", part)]
        return out

    def add(self, ids: Sequence[str], texts: Sequence[str],
            metadatas: Sequence[dict[str, Any]]) -> None:
        """Insert (or replace) chunks: ``texts`` are chunk texts as Chroma stores them,
        ``metadatas`` their Chroma metadata (``doc_id``, ``source``, and the ``title`` and
        ``heading`` that :func:`transforms.context.lexical_text` adds). One transaction."""
        rows = [(cid, meta.get("doc_id", ""), meta.get("source", ""),
                 " ".join(analyze(lexical_text(text, meta))))
                for cid, text, meta in zip(ids, texts, metadatas, strict=True)]
        with self._tx():
            self._delete_rowids(self._rowids("chunk_id", list(ids)))
            for cid, doc_id, source, body in rows:
                cur = self.db.execute(
                    "INSERT INTO chunks(chunk_id, doc_id, source) VALUES (?, ?, ?)",
                    (cid, doc_id, source))
                self.db.execute("INSERT INTO terms(rowid, body) VALUES (?, ?)",
                                (cur.lastrowid, body))

    def delete(self, ids: Iterable[str]) -> None:
        """Delete chunks by id (absent ids are ignored)."""
        ids = list(ids)
        if ids:
            with self._tx():
                self._delete_rowids(self._rowids("chunk_id", ids))

    def delete_documents(self, doc_ids: Iterable[str]) -> None:
        """Delete every chunk of these documents, including rows Chroma never got."""
        doc_ids = list(doc_ids)
        if doc_ids:
            with self._tx():
                self._delete_rowids(self._rowids("doc_id", doc_ids))

    def clear(self) -> None:
        """Delete everything and stamp the current version (before a rebuild)."""
        with self._tx():
            self.db.execute("DELETE FROM terms")
            self.db.execute("DELETE FROM chunks")
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (self.version,))

    # ----------------------------------------------------------------- reading

    def search(self, text: str, k: int = 50, source: str | None = None) -> list[LexicalHit]:
        """The ``k`` best chunks for ``text`` by BM25 (any query term may match)."""
        terms = list(dict.fromkeys(analyze(text)))
        if not terms:
            return []
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        sql = ("SELECT c.chunk_id, bm25(terms) FROM terms JOIN chunks c ON c.rowid = terms.rowid "
               "WHERE terms MATCH ?")
        params: list[Any] = [match]
        if source:
            sql += " AND c.source = ?"
            params.append(source)
        sql += " ORDER BY bm25(terms) LIMIT ?"
        params.append(k)
        return [LexicalHit(cid, -score) for cid, score in self.db.execute(sql, params)]

    def close(self) -> None:
        self.db.close()

"""The lexical (BM25) index on PostgreSQL: one index every worker and every query shares.

Same contract as :class:`connectors.lexical.LexicalIndex` (SQLite FTS5), chosen by
``lexical.url: postgresql+psycopg://user@host:5432/db`` (see
:func:`connectors.lexical.open_index`). Where the SQLite file lives on one machine's
disk, this index is written by whichever process applies a batch (a CPU sync, the GPU
``embed`` flow) and read by every query, on any machine.

Storage: one row per chunk in ``lexical_chunks`` (chunk id, document id, source, the
number of terms, and the terms as a ``tsvector``) with a GIN index on the terms. The
terms are our analyzer's (``transforms.analysis.analyze``: Russian/English Snowball
stems, identifiers split, stop words dropped) of ``transforms.context.lexical_text``
(the chunk body under its full title and heading path); the ``tsvector`` is built from them
directly as ``'term':pos,pos ...`` (the ``tsvector`` input syntax,
https://www.postgresql.org/docs/current/datatype-textsearch.html), so no Postgres
text-search configuration re-parses or re-stems them — our analyzer decides, exactly
as in the SQLite index (Postgres' parser would split ``max_file_bytes`` at the
underscores, which FTS5's ``tokenchars '_'`` keeps whole).

Ranking: Okapi BM25 computed in SQL with FTS5's constants and formula (k1=1.2, b=0.75,
idf = ln((N - df + 0.5) / (df + 0.5)) floored at 1e-6;
https://www.sqlite.org/fts5.html#the_bm25_function): the GIN index finds the chunks
holding any query term; in each, ``setweight(terms, 'A', query terms)`` marks the query's
terms and ``ts_filter(..., '{a}')`` keeps only them
(https://www.postgresql.org/docs/current/textsearch-features.html), so ``unnest`` gives
each query term's frequency (its number of positions) without expanding the whole
``tsvector``; ``df`` is counted over those matches and ``N``/average length over the
table. A common word matches a large share of the index (half of 93k chunks for "IAM
role trust policy for EC2"), so the query is planned as costly and Postgres would
JIT-compile it: over a second of compiling for a query that runs in a few hundred
milliseconds, so the search turns JIT off for its own transaction (``SET LOCAL jit``).
``ts_rank_cd`` (cover density, no idf) is available as ``ranking="ts_rank_cd"`` for
comparison; ``benchmarks/retrieval.py --lexical both`` measures both against FTS5.

Every write is one transaction (``engine.begin()``): a page is durable or absent, like
the rest of a sync. Concurrent writers are safe: rows are upserted by chunk id.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from connectors.lexical import INDEX_VERSION, LexicalHit, LexicalIndexError
from transforms.analysis import analyze
from transforms.context import lexical_text

#: tsvector positions are 1..16383 (larger ones are clamped by Postgres); a term keeps
#: at most 255 positions (https://www.postgresql.org/docs/current/textsearch-limitations.html).
_MAX_POS = 16383
_MAX_POSITIONS = 255

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS lexical_meta (key text PRIMARY KEY, value text NOT NULL)",
    "CREATE TABLE IF NOT EXISTS lexical_chunks (chunk_id text PRIMARY KEY, doc_id text NOT NULL, "
    "source text NOT NULL, length integer NOT NULL, terms tsvector NOT NULL)",
    "CREATE INDEX IF NOT EXISTS lexical_chunks_terms ON lexical_chunks USING gin (terms)",
    "CREATE INDEX IF NOT EXISTS lexical_chunks_doc ON lexical_chunks (doc_id)",
]

_BM25 = """
WITH stats AS (
    SELECT count(*)::float8 AS n, greatest(coalesce(avg(length), 0), 1)::float8 AS avgdl
    FROM lexical_chunks),
tf AS (
    SELECT c.chunk_id, c.source, c.length, u.lexeme,
           coalesce(array_length(u.positions, 1), 1)::float8 AS tf
    FROM lexical_chunks c,
         unnest(ts_filter(setweight(c.terms, 'A', CAST(:terms AS text[])), '{a}')) AS u
    WHERE c.terms @@ CAST(:query AS tsquery)),
df AS (SELECT lexeme, count(*)::float8 AS df FROM tf GROUP BY lexeme)
SELECT tf.chunk_id,
       sum(greatest(ln((s.n - df.df + 0.5) / (df.df + 0.5)), 1e-6)
           * tf.tf * 2.2 / (tf.tf + 1.2 * (0.25 + 0.75 * tf.length / s.avgdl))) AS score
FROM tf JOIN df USING (lexeme) CROSS JOIN stats s
WHERE (CAST(:source AS text) IS NULL OR tf.source = CAST(:source AS text))
GROUP BY tf.chunk_id
ORDER BY score DESC, tf.chunk_id
LIMIT :k
"""

_TS_RANK_CD = """
SELECT chunk_id, ts_rank_cd(terms, CAST(:query AS tsquery)) AS score FROM lexical_chunks
WHERE terms @@ CAST(:query AS tsquery)
  AND (CAST(:source AS text) IS NULL OR source = CAST(:source AS text))
ORDER BY score DESC, chunk_id LIMIT :k
"""


#: One engine (connection pool) per URL per process, and the URLs whose tables exist.
_ENGINES: dict[str, Engine] = {}
_READY: set[str] = set()
_ENGINES_LOCK = threading.Lock()


def _engine(url: str) -> Engine:
    with _ENGINES_LOCK:
        if url not in _ENGINES:
            _ENGINES[url] = create_engine(url, pool_pre_ping=True, future=True)
        return _ENGINES[url]


def _quote(term: str) -> str:
    """A lexeme in ``tsvector``/``tsquery`` input syntax (quotes and backslashes escaped)."""
    return "'" + term.replace("\\", "\\\\").replace("'", "''") + "'"


def to_tsvector_literal(terms: Sequence[str]) -> str:
    """``tsvector`` input for analysed ``terms`` in order: each distinct term with its
    positions (1-based), so a term's frequency is its number of positions (exact up to
    255 occurrences and position 16383, Postgres' limits; a chunk is far shorter)."""
    positions: dict[str, list[int]] = {}
    for pos, term in enumerate(terms, start=1):
        at = positions.setdefault(term, [])
        if len(at) < _MAX_POSITIONS and pos <= _MAX_POS:
            at.append(pos)
        elif not at:  # first seen past the last position Postgres stores
            at.append(_MAX_POS)
    return " ".join(_quote(t) + ":" + ",".join(map(str, at)) for t, at in positions.items())


def to_tsquery_literal(terms: Iterable[str]) -> str:
    """``tsquery`` input matching any of ``terms`` (OR)."""
    return " | ".join(_quote(t) for t in terms)


class PostgresLexicalIndex:
    """BM25 over chunks in PostgreSQL (same methods as ``connectors.lexical.LexicalIndex``).

    Args:
        url: a SQLAlchemy URL, ``postgresql+psycopg://user:password@host:5432/db``.
        ranking: ``"bm25"`` (default, FTS5's formula in SQL) or ``"ts_rank_cd"``.

    Raises:
        LexicalIndexError: the database cannot be reached or the tables created (the
            message names the host and database, never the password).

    Safe for threads and processes: each call takes a pooled connection and commits
    one transaction.
    """

    version = INDEX_VERSION

    def __init__(self, url: str, ranking: Literal["bm25", "ts_rank_cd"] = "bm25") -> None:
        self.url = url
        self.ranking = ranking
        try:
            self.engine: Engine = _engine(url)
        except Exception as exc:  # bad URL, missing driver
            raise LexicalIndexError(f"bad lexical.url: {type(exc).__name__}") from None
        self.path = self.engine.url.render_as_string(hide_password=True)
        if url in _READY:
            return
        try:
            with self.engine.begin() as conn:
                # two processes creating the tables at once would race on the catalog
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('kbsync_lexical'))"))
                for stmt in _SCHEMA:
                    conn.execute(text(stmt))
                conn.execute(text("INSERT INTO lexical_meta VALUES ('version', :v) "
                                  "ON CONFLICT (key) DO NOTHING"), {"v": self.version})
            _READY.add(url)
        except SQLAlchemyError as exc:
            _ENGINES.pop(url, None)
            self.engine.dispose()
            raise LexicalIndexError(
                f"cannot open the lexical index {self.path}: {type(exc.orig or exc).__name__}: "
                f"{str(exc.orig or exc).splitlines()[0] if str(exc.orig or exc) else ''}") from None

    def __repr__(self) -> str:
        return f"PostgresLexicalIndex({self.path!r})"

    # ----------------------------------------------------------------- status

    def stored_version(self) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(text("SELECT value FROM lexical_meta WHERE key='version'")
                                ).scalar_one_or_none()

    @property
    def current(self) -> bool:
        """False when the rows were written by another analyzer or schema version."""
        return self.stored_version() == self.version

    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM lexical_chunks")).scalar_one()

    def empty(self) -> bool:
        """True when the index holds no chunk (one row looked up: ``count(*)`` scans the
        table, ~15 ms at 93k chunks)."""
        with self.engine.connect() as conn:
            return conn.execute(text("SELECT 1 FROM lexical_chunks LIMIT 1")).first() is None

    def ids(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(text("SELECT chunk_id FROM lexical_chunks")).scalars())

    # ----------------------------------------------------------------- writing

    def add(self, ids: Sequence[str], texts: Sequence[str],
            metadatas: Sequence[dict[str, Any]]) -> None:
        """Insert (or replace) chunks: ``texts`` are chunk texts as Chroma stores them,
        ``metadatas`` their Chroma metadata (``doc_id``, ``source``, and the ``title`` and
        ``heading`` that :func:`transforms.context.lexical_text` adds). One transaction."""
        rows = []
        for cid, body, meta in zip(ids, texts, metadatas, strict=True):
            terms = analyze(lexical_text(body, meta))
            rows.append({"id": cid, "doc": meta.get("doc_id", ""), "src": meta.get("source", ""),
                         "n": len(terms), "terms": to_tsvector_literal(terms)})
        if not rows:
            return
        # one order for every writer, so two writers of overlapping ids cannot deadlock
        rows.sort(key=lambda r: r["id"])
        with self.engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO lexical_chunks (chunk_id, doc_id, source, length, terms) "
                "VALUES (:id, :doc, :src, :n, CAST(:terms AS tsvector)) "
                "ON CONFLICT (chunk_id) DO UPDATE SET doc_id = EXCLUDED.doc_id, "
                "source = EXCLUDED.source, length = EXCLUDED.length, terms = EXCLUDED.terms"),
                rows)

    def delete(self, ids: Iterable[str]) -> None:
        """Delete chunks by id (absent ids are ignored)."""
        self._delete_where("chunk_id", ids)

    def delete_documents(self, doc_ids: Iterable[str]) -> None:
        """Delete every chunk of these documents, including rows Chroma never got."""
        self._delete_where("doc_id", doc_ids)

    def _delete_where(self, column: str, values: Iterable[str]) -> None:
        values = sorted(set(values))
        if values:
            with self.engine.begin() as conn:
                conn.execute(text(f"DELETE FROM lexical_chunks WHERE {column} = ANY(:ids)"),
                             {"ids": values})

    def clear(self) -> None:
        """Delete everything and stamp the current version (before a rebuild)."""
        with self.engine.begin() as conn:
            conn.execute(text("DELETE FROM lexical_chunks"))
            conn.execute(text("INSERT INTO lexical_meta VALUES ('version', :v) "
                              "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"),
                         {"v": self.version})

    # ----------------------------------------------------------------- reading

    def search(self, text_: str, k: int = 50, source: str | None = None) -> list[LexicalHit]:
        """The ``k`` best chunks for ``text_`` (any query term may match), best first."""
        terms = list(dict.fromkeys(analyze(text_)))
        if not terms:
            return []
        sql = _BM25 if self.ranking == "bm25" else _TS_RANK_CD
        params: dict[str, Any] = {"query": to_tsquery_literal(terms), "source": source, "k": k}
        if self.ranking == "bm25":
            params["terms"] = terms
        with self.engine.connect() as conn:
            conn.execute(text("SET LOCAL jit = off"))  # see the module's docstring
            return [LexicalHit(cid, float(score)) for cid, score in conn.execute(text(sql), params)]

    def close(self) -> None:
        """Nothing to release: every call returns its connection to the pool, and the
        pool is shared by this process's next opens of the same URL (a query that opens
        the index must not pay a new connection)."""

"""A throwaway database on a real PostgreSQL server, for tests and benchmarks."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def temporary_database(server: str, prefix: str = "kbsync_test") -> Iterator[str]:
    """Create ``<prefix>_<random hex>`` on the PostgreSQL ``server`` URL (SQLAlchemy form,
    no database part, e.g. ``postgresql+psycopg://postgres@127.0.0.1:5432``), yield its URL,
    and drop it afterwards (``WITH (FORCE)``: open connections do not keep it).

    Raises:
        sqlalchemy.exc.OperationalError: the server does not answer.
    """
    from sqlalchemy import create_engine, text

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{server}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

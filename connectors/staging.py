"""Staged batch files: Parquet files on a local path or any fsspec URL.

With ``embedding.mode: remote`` a sync writes each page's
:class:`~transforms.batches.ChunkBatch` here and the ``embed`` deployment (on another
machine, perhaps) reads it back. The location is a directory path or an fsspec URL
(``file:///srv/kbsync/staging``, ``s3://bucket/kbsync``, ``gcs://...``, ``memory://``
within one process); a protocol other than local files needs its fsspec package
(s3fs, gcsfs, ...) on both sides. See https://filesystem-spec.readthedocs.io/.

Files are named ``<location>/<source>/<UTC time>-<random>.parquet`` and compressed with
zstd.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


class StagingError(Exception):
    """A staged batch cannot be written, read or removed; names the URL."""


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise StagingError(f"cannot use staging location {url!r}: {exc}") from None


class BatchStaging:
    """Writes batch tables under one staging location.

    Args:
        location: a directory path or an fsspec URL.
    """

    def __init__(self, location: str) -> None:
        self.location = str(location)
        self.fs, self.root = _fs(self.location)

    def write(self, table: pa.Table, source: str) -> str:
        """Write ``table`` as a new Parquet file; returns the file's URL (with protocol).

        Raises:
            StagingError: the file cannot be written.
        """
        folder = re.sub(r"[^A-Za-z0-9_.-]+", "-", source).strip("-.") or "batch"
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        path = f"{self.root.rstrip('/')}/{folder}/{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        try:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with self.fs.open(path, "wb") as handle:
                pq.write_table(table, handle, compression="zstd")
        except Exception as exc:  # noqa: BLE001 - every storage backend raises its own
            raise StagingError(f"cannot write staged batch {path}: "
                               f"{type(exc).__name__}: {exc}") from None
        return self.fs.unstrip_protocol(path)


def read_batch_table(url: str) -> pa.Table:
    """The Arrow table of the staged file at ``url``.

    Raises:
        StagingError: the file is missing or not Parquet.
    """
    fs, path = _fs(url)
    try:
        with fs.open(path, "rb") as handle:
            return pq.read_table(handle)
    except Exception as exc:  # noqa: BLE001 - every storage backend raises its own
        raise StagingError(f"cannot read staged batch {url}: {type(exc).__name__}: {exc}") \
            from None


def remove_batch(url: str) -> None:
    """Delete the staged file at ``url`` (a missing file is not an error).

    Raises:
        StagingError: the file exists and cannot be deleted.
    """
    fs, path = _fs(url)
    try:
        if fs.exists(path):
            fs.rm(path)
    except Exception as exc:  # noqa: BLE001 - every storage backend raises its own
        raise StagingError(f"cannot remove staged batch {url}: "
                           f"{type(exc).__name__}: {exc}") from None

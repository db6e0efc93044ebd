"""The vector store (chromadb): one collection holding every source's chunks.

* Embedded ``chromadb.PersistentClient`` under the data dir by default; a
  ``chromadb.HttpClient`` when a Chroma server URL is set.
* One collection (default ``kbsync``) in the cosine space, created without an
  embedding function: kbsync always passes its own vectors.
* The embedding model's identity and dimension are written into the collection's
  metadata when it is created and checked on every open; mixing vectors of two models
  raises :class:`EmbeddingModelMismatch` before anything is written.
* Writes go in batches of at most ``client.get_max_batch_size()`` records.
* Chunks are *added*, never re-upserted: re-writing an existing id costs ~4x an insert
  and changes nothing, so the sync adds only ids its document's records do not hold
  (:meth:`ChromaStore.indexed_documents`; a chunk id hashes its ``doc_id``).

Every chunk carries ``doc_id``, ``doc_hash``, ``chunk_count``, ``source``,
``source_type``, ``title``, ``url``, ``updated_at``, ``chunk_index`` and the
source's own fields. The document-wide fields (:data:`DOCUMENT_FIELDS`: ``doc_hash``,
``chunk_count``, ``updated_at``, ``updated_ts``) are current on a document's *head*, its
``chunk_index`` 0 record; on its other chunks they are those of the version that last
wrote the chunk (an unchanged chunk of an edited document is not rewritten for them,
so an edit costs the chunks it changes, not the document's length). See
https://docs.trychroma.com/reference/python/collection.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

log = logging.getLogger(__name__)

MODEL_KEY = "embedding_model"
DIMENSION_KEY = "embedding_dimension"
#: Chroma caps the size of ``$in`` lists in practice by request size; keep lookups modest.
LOOKUP_BATCH = 500


class EmbeddingModelMismatch(Exception):
    """The collection was built with another embedding model or dimension."""


class StoreError(Exception):
    """The vector store cannot be reached or refused a request."""


#: Metadata fields that describe a chunk's whole document. They are kept current on the
#: document's head (its ``chunk_index`` 0 record) only; a stored chunk whose other
#: fields are unchanged is not rewritten when only these change (see
#: :meth:`IndexedDocument.needs_update`).
DOCUMENT_FIELDS = frozenset({"doc_hash", "chunk_count", "updated_at", "updated_ts"})


@dataclass(frozen=True)
class IndexedDocument:
    """What the index holds for one document.

    Attributes:
        doc_id: the document's id.
        chunk_ids: ids of every chunk stored with this ``doc_id``.
        heads: ``(doc_hash, chunk_count)`` of each stored record with ``chunk_index`` 0
            (one when the document's last write completed).
        metadatas: stored metadata by chunk id.
    """

    doc_id: str
    chunk_ids: frozenset[str]
    heads: frozenset[tuple[str, int | None]]
    metadatas: Mapping[str, Mapping[str, Any]]

    @property
    def complete_hash(self) -> str | None:
        """The ``doc_hash`` of the document's last write when that write completed:
        exactly one head, and as many chunks as it counts; else ``None``.

        ``flows.embed.write_batch`` writes a batch's new chunks, then replaces metadata
        (a kept head gets the new ``doc_hash`` and ``chunk_count`` there), then deletes
        stale chunks. A crash before the end leaves a head with the old hash, two heads
        (a new head added, the old one not yet deleted), or more or fewer chunks than
        the head counts; each reads as not current, and the next sync rewrites it.
        """
        if len(self.heads) != 1:
            return None
        doc_hash, count = next(iter(self.heads))
        return doc_hash if count == len(self.chunk_ids) else None

    def is_current(self, doc_hash: str) -> bool:
        """True when the last write of this document completed and was of ``doc_hash``
        (see :attr:`complete_hash`)."""
        return self.complete_hash == doc_hash

    def needs_update(self, chunk_id: str, metadata: Mapping[str, Any],
                     version_fields: Iterable[str] = ()) -> bool:
        """Whether the stored chunk ``chunk_id`` must get ``metadata``: always for a head
        (``chunk_index`` 0) or a chunk not held here, otherwise when a field differs
        other than :data:`DOCUMENT_FIELDS` and the source's ``version_fields``
        (``connectors.base.Document.version_fields``): its position, heading, labels,
        status... Chroma does not store ``None`` values, so those count as absent."""
        stored = self.metadatas.get(chunk_id)
        if stored is None or metadata.get("chunk_index") == 0:
            return True
        skip = DOCUMENT_FIELDS | frozenset(version_fields)
        return _chunk_fields(stored, skip) != _chunk_fields(metadata, skip)


def _chunk_fields(metadata: Mapping[str, Any], skip: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if k not in skip and v is not None}


@dataclass(frozen=True)
class Hit:
    """One query result: chunk id, its text and metadata, and cosine similarity."""

    id: str
    text: str
    metadata: dict[str, Any]
    score: float


def _batches(seq: Sequence[Any], size: int) -> Iterator[slice]:
    for start in range(0, len(seq), size):
        yield slice(start, start + size)


class ChromaStore:
    """The kbsync collection.

    Args:
        path: directory of the embedded store (used when ``url`` is ``None``).
        url: ``http(s)://host:port`` of a Chroma server.
        collection: collection name (3-512 chars of ``[a-zA-Z0-9._-]``).
        model: embedding model identity; ``None`` opens read-only without checking.
        dimension: embedding dimension that goes with ``model``.
        client: an open chromadb client to use instead of ``path``/``url`` (e.g.
            ``chromadb.EphemeralClient()``, in memory).

    Raises:
        EmbeddingModelMismatch: the collection exists and was built with another model.
        StoreError: the server cannot be reached.
    """

    def __init__(self, *, path: Path | str | None = None, url: str | None = None,
                 collection: str = "kbsync", model: str | None = None,
                 dimension: int | None = None, client: Any = None) -> None:
        import chromadb
        from chromadb.config import Settings

        settings = Settings(anonymized_telemetry=False)
        try:
            if client is not None:
                self.client = client
            elif url:
                parsed = urlparse(url)
                self.client = chromadb.HttpClient(
                    host=parsed.hostname or "localhost",
                    port=parsed.port or (443 if parsed.scheme == "https" else 8000),
                    ssl=parsed.scheme == "https",
                    settings=settings,
                )
            else:
                Path(path or ".kbsync/chroma").mkdir(parents=True, exist_ok=True)
                self.client = chromadb.PersistentClient(path=str(path or ".kbsync/chroma"),
                                                        settings=settings)
            self.max_batch = int(self.client.get_max_batch_size())
        except Exception as exc:  # noqa: BLE001 - connection failures vary by client
            where = url or str(path)
            raise StoreError(f"cannot open Chroma at {where}: {type(exc).__name__}: {exc}") from None
        self.name = collection
        self.model = model
        self.dimension = dimension
        self._collection = None

    # -------------------------------------------------------------------- opening

    def collection(self, create: bool = True):
        """The chroma ``Collection``; created (cosine space, model recorded) on first
        use when ``create`` is true, else ``None`` if it does not exist."""
        if self._collection is not None:
            return self._collection
        try:
            col = self.client.get_collection(self.name, embedding_function=None)
        except Exception:  # noqa: BLE001 - chromadb raises NotFoundError/ValueError by version
            if not create:
                return None
            if self.model is None or self.dimension is None:
                raise StoreError("cannot create a collection without a model and dimension") from None
            col = self.client.get_or_create_collection(
                self.name,
                embedding_function=None,
                metadata={MODEL_KEY: self.model, DIMENSION_KEY: int(self.dimension)},
                configuration={"hnsw": {"space": "cosine"}},
            )
        self._check_model(col)
        self._collection = col
        return col

    def _check_model(self, col) -> None:
        if self.model is None:
            return
        meta = col.metadata or {}
        stored_model, stored_dim = meta.get(MODEL_KEY), meta.get(DIMENSION_KEY)
        if stored_model is None and col.count() == 0:
            col.modify(metadata={**meta, MODEL_KEY: self.model, DIMENSION_KEY: int(self.dimension)})
            return
        if stored_model != self.model or (stored_dim is not None and int(stored_dim) != self.dimension):
            raise EmbeddingModelMismatch(
                f"collection {self.name!r} was built with embedding model {stored_model!r} "
                f"({stored_dim} dimensions), but this run uses {self.model!r} "
                f"({self.dimension} dimensions). Use another collection name, or rebuild "
                f"the index with `kbsync sync --full` after deleting the collection."
            )

    def stored_model(self) -> tuple[str | None, int | None]:
        """``(model, dimension)`` recorded in the collection, ``(None, None)`` if absent."""
        try:
            col = self.client.get_collection(self.name, embedding_function=None)
        except Exception:  # noqa: BLE001 - not found (error type varies by chromadb version)
            return None, None
        meta = col.metadata or {}
        dim = meta.get(DIMENSION_KEY)
        return meta.get(MODEL_KEY), int(dim) if dim is not None else None

    # -------------------------------------------------------------------- reading

    def indexed_documents(self, doc_ids: Iterable[str]) -> dict[str, IndexedDocument]:
        """What the index holds for each of ``doc_ids`` (absent ids are left out): every
        chunk's metadata, read ``LOOKUP_BATCH`` documents per request."""
        doc_ids = list(dict.fromkeys(doc_ids))
        acc: dict[str, tuple[dict[str, dict[str, Any]], set[tuple[str, int | None]]]] = {}
        col = self.collection()
        for part in _batches(doc_ids, LOOKUP_BATCH):
            res = col.get(where={"doc_id": {"$in": doc_ids[part]}}, include=["metadatas"])
            for cid, meta in zip(res["ids"], res["metadatas"], strict=True):
                metas, heads = acc.setdefault(meta["doc_id"], ({}, set()))
                metas[cid] = meta
                if meta.get("chunk_index") == 0:
                    count = meta.get("chunk_count")
                    heads.add((str(meta.get("doc_hash")), None if count is None else int(count)))
        return {d: IndexedDocument(d, frozenset(metas), frozenset(heads), metas)
                for d, (metas, heads) in acc.items()}

    def iter_metadata(self, where: Mapping[str, Any] | None = None,
                      page: int = 5000) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every ``(chunk id, metadata)`` matching ``where``, paged."""
        col = self.collection(create=False)
        if col is None:
            return
        offset = 0
        while True:
            res = col.get(where=dict(where) if where else None, include=["metadatas"],
                          limit=page, offset=offset)
            yield from zip(res["ids"], res["metadatas"], strict=True)
            if len(res["ids"]) < page:
                return
            offset += page

    def _count(self, col, where: Mapping[str, Any]) -> int:
        """Rows matching ``where``, read as ids only, ``get_max_batch_size()`` at a time."""
        total, offset = 0, 0
        while True:
            n = len(col.get(where=dict(where), include=[], limit=self.max_batch,
                            offset=offset)["ids"])
            total += n
            if n < self.max_batch:
                return total
            offset += n

    def source_counts(self, source: str) -> tuple[int, int]:
        """``(documents, chunks)`` the index holds for ``source``: ids only (no metadata
        or documents leave Chroma); a document is counted by its chunk 0."""
        col = self.collection(create=False)
        if col is None:
            return 0, 0
        chunks = self._count(col, {"source": source})
        docs = self._count(col, {"$and": [{"source": source}, {"chunk_index": 0}]}) if chunks else 0
        return docs, chunks

    def doc_ids(self, source: str) -> set[str]:
        """Ids of the documents the index holds for ``source``."""
        return set(self.document_chunk_counts(source))

    def document_chunk_counts(self, source: str) -> dict[str, int]:
        """``{document id: chunks held}`` of every document the index holds for
        ``source`` (reads every chunk's metadata: reconciliation's listing)."""
        out: dict[str, int] = {}
        for _, meta in self.iter_metadata({"source": source}):
            out[meta["doc_id"]] = out.get(meta["doc_id"], 0) + 1
        return out

    def count(self) -> int:
        col = self.collection(create=False)
        return 0 if col is None else col.count()

    def query(self, embedding: np.ndarray, k: int = 5,
              where: Mapping[str, Any] | None = None) -> list[Hit]:
        """The ``k`` nearest chunks to ``embedding``; ``score`` = cosine similarity."""
        col = self.collection(create=False)
        if col is None or col.count() == 0:
            return []
        res = col.query(
            query_embeddings=[np.asarray(embedding, dtype=np.float32).tolist()],
            n_results=k,
            where=dict(where) if where else None,
            include=["documents", "metadatas", "distances"],
        )
        return [
            Hit(id=i, text=t or "", metadata=m or {}, score=1.0 - float(d))
            for i, t, m, d in zip(res["ids"][0], res["documents"][0], res["metadatas"][0],
                                  res["distances"][0], strict=True)
        ]

    # -------------------------------------------------------------------- writing

    def add(self, ids: Sequence[str], embeddings: np.ndarray, documents: Sequence[str],
            metadatas: Sequence[Mapping[str, Any]]) -> None:
        """Insert new chunks, at most ``max_batch`` per request."""
        col = self.collection()
        for part in _batches(ids, self.max_batch):
            col.add(ids=list(ids[part]), embeddings=embeddings[part],
                    documents=list(documents[part]), metadatas=[dict(m) for m in metadatas[part]])

    def update_metadata(self, ids: Sequence[str], metadatas: Sequence[Mapping[str, Any]]) -> None:
        """Replace the metadata of stored chunks without touching their vectors."""
        col = self.collection()
        for part in _batches(ids, self.max_batch):
            col.update(ids=list(ids[part]), metadatas=[dict(m) for m in metadatas[part]])

    def delete(self, ids: Iterable[str]) -> int:
        """Delete chunks by id; returns how many ids were asked for."""
        ids = list(dict.fromkeys(ids))
        col = self.collection()
        for part in _batches(ids, self.max_batch):
            col.delete(ids=ids[part])
        return len(ids)

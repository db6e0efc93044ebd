"""Retrieval over the index: ``retrieve(text, k, source=...)`` -> ranked chunks.

One function serves ``kbsync query`` and the Python API; the query is embedded with the
same model as the collection (the collection's recorded model is checked first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from connectors.chroma import ChromaStore, EmbeddingModelMismatch
from flows.settings import Settings
from transforms.embedding import load_embedder, resolve_model


@dataclass(frozen=True)
class RetrievedChunk:
    """One result: rank from 1, cosine similarity, chunk text and metadata."""

    rank: int
    score: float
    chunk_id: str
    text: str
    metadata: dict[str, Any]

    @property
    def title(self) -> str:
        return str(self.metadata.get("title", ""))

    @property
    def url(self) -> str:
        return str(self.metadata.get("url", ""))

    @property
    def doc_id(self) -> str:
        return str(self.metadata.get("doc_id", ""))


def open_store(settings: Settings) -> ChromaStore:
    """The collection, read-only (no model check, nothing created)."""
    return ChromaStore(path=settings.chroma_path, url=settings.chroma.url,
                       collection=settings.chroma.collection)


def retrieve(settings: Settings, text: str, k: int = 5, *, source: str | None = None,
             filters: dict[str, Any] | None = None) -> list[RetrievedChunk]:
    """The ``k`` chunks nearest to ``text``.

    Args:
        settings: loaded settings (store location and embedding model).
        text: the question.
        k: how many chunks to return.
        source: only chunks of this source.
        filters: extra Chroma ``where`` conditions on metadata (``{"language": "python"}``).

    Raises:
        EmbeddingModelMismatch: the collection was built with another model.
    """
    store = open_store(settings)
    stored_model, _ = store.stored_model()
    if stored_model is None:
        return []
    configured, _ = resolve_model(settings.embedding.model)
    if stored_model != configured:
        raise EmbeddingModelMismatch(
            f"collection {store.name!r} holds {stored_model!r} vectors; settings say {configured!r}")
    conditions = [{"source": source}] if source else []
    conditions += [{key: value} for key, value in (filters or {}).items()]
    where = conditions[0] if len(conditions) == 1 else {"$and": conditions} if conditions else None
    embedder = load_embedder(settings.embedding.spec())
    vector = embedder.encode([text])[0]
    hits = store.query(vector, k=k, where=where)
    return [RetrievedChunk(rank=i, score=h.score, chunk_id=h.id, text=h.text, metadata=h.metadata)
            for i, h in enumerate(hits, start=1)]

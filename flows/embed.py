"""Embed and write a :class:`~transforms.batches.ChunkBatch` into the index.

``apply_batch`` is the one place where vectors are computed and the index is written,
in this order: add new chunks, replace metadata of kept chunks, delete stale chunks. A
crash between the steps leaves each document either complete or detectably incomplete
(mixed ``doc_hash``es or fewer chunks than ``chunk_count``), which the next sync repairs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from connectors.chroma import ChromaStore
from transforms.batches import ChunkBatch
from transforms.embedding import Embedder


def apply_batch(batch: ChunkBatch, store: ChromaStore, embedder: Callable[[], Embedder],
                progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Embed ``batch.add_texts`` and apply the batch to ``store``.

    Args:
        batch: the changes.
        store: the opened collection.
        embedder: returns the loaded model (called only when there is text to embed).
        progress: called with the number of chunks embedded so far.

    Returns:
        Seconds spent per stage: ``{"embed": s, "write": s}``.
    """
    seconds = {"embed": 0.0, "write": 0.0}
    if batch.add_ids:
        start = time.perf_counter()
        vectors = embedder().encode(batch.add_texts, progress=progress)
        seconds["embed"] = time.perf_counter() - start
    start = time.perf_counter()
    if batch.add_ids:
        store.add(batch.add_ids, vectors, batch.add_texts, batch.add_metadatas)
    if batch.update_ids:
        store.update_metadata(batch.update_ids, batch.update_metadatas)
    if batch.delete_ids:
        store.delete(batch.delete_ids)
    seconds["write"] = time.perf_counter() - start
    return seconds

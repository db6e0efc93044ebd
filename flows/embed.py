"""Embed and write a :class:`~transforms.batches.ChunkBatch` into the index.

``apply_batch`` is the one place where vectors are computed and the index is written,
in this order: embed (no writes), the lexical index (add, delete), then Chroma (add new
chunks, replace metadata of kept chunks, delete stale chunks). Chroma is the source of
truth and is written last, so a crash between any two steps leaves each document either
complete or detectably incomplete in Chroma (mixed ``doc_hash``es, or fewer chunks than
``chunk_count``), and the next sync rewrites it in both indexes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from connectors.chroma import ChromaStore
from connectors.lexical import LexicalIndex
from transforms.batches import ChunkBatch
from transforms.embedding import Embedder


def apply_batch(batch: ChunkBatch, store: ChromaStore, embedder: Callable[[], Embedder],
                progress: Callable[[int], None] | None = None,
                lexical: LexicalIndex | None = None) -> dict[str, float]:
    """Embed ``batch.add_texts`` and apply the batch to ``lexical`` and ``store``.

    Args:
        batch: the changes.
        store: the opened collection.
        embedder: returns the loaded model (called only when there is text to embed).
        progress: called with the number of chunks embedded so far.
        lexical: the lexical index kept in step, if enabled.

    Returns:
        Seconds spent per stage: ``{"embed": s, "write": s}``.
    """
    seconds = {"embed": 0.0, "write": 0.0}
    if batch.add_ids:
        start = time.perf_counter()
        vectors = embedder().encode(batch.add_texts, progress=progress)
        seconds["embed"] = time.perf_counter() - start
    start = time.perf_counter()
    if lexical is not None:
        if batch.add_ids:
            lexical.add(batch.add_ids, batch.add_texts, batch.add_metadatas)
        lexical.delete(batch.delete_ids)
        lexical.delete_documents(batch.delete_doc_ids)
    if batch.add_ids:
        store.add(batch.add_ids, vectors, batch.add_texts, batch.add_metadatas)
    if batch.update_ids:
        store.update_metadata(batch.update_ids, batch.update_metadatas)
    doomed = list(batch.delete_ids)
    if batch.delete_doc_ids:
        held = store.indexed_documents(batch.delete_doc_ids)
        doomed += [cid for doc in held.values() for cid in doc.chunk_ids]
    if doomed:
        store.delete(doomed)
    seconds["write"] = time.perf_counter() - start
    return seconds


def rebuild_lexical(store: ChromaStore, lexical: LexicalIndex, page: int = 2000) -> int:
    """Rebuild the lexical index from the chunks Chroma holds; returns the chunk count.

    Used by ``kbsync reindex --lexical`` and automatically when the lexical index is
    missing, empty while Chroma is not, or written by another analyzer version.
    """
    lexical.clear()
    col = store.collection(create=False)
    if col is None:
        return 0
    done, offset = 0, 0
    while True:
        res = col.get(include=["documents", "metadatas"], limit=page, offset=offset)
        if res["ids"]:
            lexical.add(res["ids"], [t or "" for t in res["documents"]], res["metadatas"])
            done += len(res["ids"])
        if len(res["ids"]) < page:
            return done
        offset += page

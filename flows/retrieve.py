"""Retrieval over the index: ``retrieve(settings, text, k, mode=..., source=..., filters=...)``.

One function serves ``kbsync query``, the validation flow and Python callers.

Modes:
    ``dense``   nearest chunks by cosine similarity in Chroma (the collection's model).
    ``lexical`` BM25 over the lexical index (Russian/English stems; see
                ``connectors.lexical``).
    ``hybrid``  (default) reciprocal-rank fusion of both rankings (Cormack, Clarke &
                Buettcher, SIGIR 2009): ``score = w_d / (rrf_k + rank_d) + w_l / (rrf_k +
                rank_l)``, a side that did not return the chunk contributing nothing. Each
                side returns ``retrieval.candidates`` chunks (default 50), so a chunk found
                by only one side still ranks.

The all-MiniLM-L6-v2 default understands English only (Cyrillic becomes single
characters). Fusing its near-random ranking for a Russian question with a good BM25
ranking makes hybrid *worse* than BM25 alone (measured: hit@1 0.43 vs 0.77 on our
Russian dev set), so hybrid scales the dense weight per query by the model's tokenizer
fertility (tokens per word, :meth:`Embedder.fertility`): full weight up to
``retrieval.fertility_full`` (3.0), none from ``retrieval.fertility_zero`` (3.8), linear
in between (``retrieval.adaptive_dense_weight``). With a multilingual model (e5, bge-m3)
Russian fertility is ~1.5-2.5, so its dense side keeps full weight without any
language rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from connectors.chroma import ChromaStore, EmbeddingModelMismatch
from connectors.lexical import is_database_url, open_index
from flows.settings import Settings
from transforms.embedding import fertility_weight, load_tokenizer, resolve_model

Mode = Literal["dense", "lexical", "hybrid"]
MODES: tuple[str, ...] = ("dense", "lexical", "hybrid")


@dataclass(frozen=True)
class RetrievedChunk:
    """One result.

    Attributes:
        rank: from 1.
        score: cosine similarity (dense), BM25 (lexical) or the fused RRF score (hybrid).
        chunk_id, text, metadata: the chunk as stored.
        ranks: the chunk's rank on each side that returned it (``{"dense": 3}``).
    """

    rank: int
    score: float
    chunk_id: str
    text: str
    metadata: dict[str, Any]
    ranks: dict[str, int] = field(default_factory=dict)

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


def _where(source: str | None, filters: dict[str, Any] | None) -> dict[str, Any] | None:
    conditions = [{"source": source}] if source else []
    conditions += [{key: value} for key, value in (filters or {}).items()]
    if not conditions:
        return None
    return conditions[0] if len(conditions) == 1 else {"$and": conditions}


def query_encoder(settings: Settings) -> Any:
    """The embedder for questions: with the in-process backend and
    ``embedding.onnx_queries`` (default), the model's ONNX export (in
    ``embedding.onnx_dir()``) run by onnxruntime (no torch import; see
    :mod:`transforms.onnx_embedding`); otherwise ``settings.embedding.encoder()``."""
    e = settings.embedding
    if e.backend != "sentence-transformers" or not e.onnx_queries:
        return e.encoder(settings.http)
    from transforms.onnx_embedding import load_query_encoder

    return load_query_encoder(e.spec(), e.onnx_dir())


def _dense(settings: Settings, store: ChromaStore, text: str, n: int,
           where: dict[str, Any] | None) -> list[tuple[str, float, str, dict[str, Any]]]:
    stored_model, _ = store.stored_model()
    configured, _ = resolve_model(settings.embedding.model)
    if stored_model != configured:
        raise EmbeddingModelMismatch(
            f"collection {store.name!r} holds {stored_model!r} vectors; settings say {configured!r}")
    embedder = query_encoder(settings)
    vector = embedder.encode([text], kind="query")[0]
    return [(h.id, h.score, h.text, h.metadata) for h in store.query(vector, k=n, where=where)]


def _lexical(settings: Settings, store: ChromaStore, text: str, n: int, source: str | None,
             where: dict[str, Any] | None) -> list[tuple[str, float, str, dict[str, Any]]]:
    location = settings.lexical_location
    if not settings.lexical.enabled or (not is_database_url(location)
                                        and not settings.lexical_path.exists()):
        return []
    index = open_index(location)
    try:
        hits = index.search(text, k=n, source=source)
    finally:
        index.close()
    if not hits:
        return []
    col = store.collection(create=False)
    res = col.get(ids=[h.chunk_id for h in hits], where=where, include=["documents", "metadatas"])
    found = {cid: (doc or "", meta or {}) for cid, doc, meta in
             zip(res["ids"], res["documents"], res["metadatas"], strict=True)}
    # rows Chroma does not hold (a crash between the two writes) are dropped
    return [(h.chunk_id, h.score, *found[h.chunk_id]) for h in hits if h.chunk_id in found]


def hybrid_weights(settings: Settings, text: str) -> tuple[float, float]:
    """``(dense weight, lexical weight)`` for fusing the rankings of ``text``.

    ``retrieval.dense_weight`` times :func:`transforms.embedding.fertility_weight` of the
    query's tokenizer fertility under the configured model (unless
    ``retrieval.adaptive_dense_weight`` is off), and ``retrieval.lexical_weight``.
    """
    r = settings.retrieval
    dense = r.dense_weight
    if r.adaptive_dense_weight and dense > 0:
        tokenizer = load_tokenizer(settings.embedding.model, settings.embedding.offline)
        dense *= fertility_weight(tokenizer.fertility(text), r.fertility_full, r.fertility_zero)
    return dense, r.lexical_weight


def retrieve(settings: Settings, text: str, k: int = 5, *, mode: Mode | None = None,
             source: str | None = None,
             filters: dict[str, Any] | None = None) -> list[RetrievedChunk]:
    """The ``k`` best chunks for ``text``.

    Args:
        settings: loaded settings (store, lexical index, model, ``retrieval.*``).
        text: the question.
        k: how many chunks to return.
        mode: ``dense``, ``lexical`` or ``hybrid``; default ``retrieval.mode``.
        source: only chunks of this source.
        filters: extra Chroma ``where`` equality conditions on metadata
            (``{"language": "python"}``).

    Raises:
        EmbeddingModelMismatch: dense/hybrid on a collection built with another model.
        ValueError: unknown mode.
    """
    mode = mode or settings.retrieval.mode
    if mode not in MODES:
        raise ValueError(f"unknown retrieval mode {mode!r} (one of {', '.join(MODES)})")
    store = open_store(settings)
    if store.stored_model()[0] is None:
        return []
    where = _where(source, filters)
    r = settings.retrieval
    if mode == "dense":
        rows = _dense(settings, store, text, k, where)
        return [RetrievedChunk(i, s, cid, t, m, {"dense": i})
                for i, (cid, s, t, m) in enumerate(rows, 1)]
    if mode == "lexical":
        rows = _lexical(settings, store, text, k, source, where)
        return [RetrievedChunk(i, s, cid, t, m, {"lexical": i})
                for i, (cid, s, t, m) in enumerate(rows, 1)]

    n = max(k, r.candidates)
    dense_weight, lexical_weight = hybrid_weights(settings, text)
    sides = []
    if dense_weight > 0:
        sides.append(("dense", dense_weight, _dense(settings, store, text, n, where)))
    lexical_rows = _lexical(settings, store, text, n, source, where) if lexical_weight > 0 else []
    if lexical_rows:
        sides.append(("lexical", lexical_weight, lexical_rows))
    elif dense_weight == 0:  # nothing lexical to lean on: the dense ranking is all there is
        sides.append(("dense", 1.0, _dense(settings, store, text, n, where)))
    fused: dict[str, dict[str, Any]] = {}
    for side, weight, rows in sides:
        for rank, (cid, _score, chunk_text, meta) in enumerate(rows, 1):
            entry = fused.setdefault(cid, {"score": 0.0, "text": chunk_text, "meta": meta,
                                           "ranks": {}})
            entry["score"] += weight / (r.rrf_k + rank)
            entry["ranks"][side] = rank
    best = sorted(fused.items(), key=lambda kv: -kv[1]["score"])[:k]
    return [RetrievedChunk(i, e["score"], cid, e["text"], e["meta"], e["ranks"])
            for i, (cid, e) in enumerate(best, 1)]

"""Sync one source into the index: fetch changes -> chunk -> embed -> upsert -> cursor.

``sync_source`` follows DESIGN.md's data flow, page by page:

1. fetch a page of changes since the cursor (a Prefect task with retries; a retry
   resumes from the last durable checkpoint);
2. documents whose ``content_hash`` equals what every one of their indexed chunks
   carries are *unchanged* and cost nothing more;
3. changed documents are chunked; only chunk ids not already in Chroma are embedded
   (an edited paragraph costs its own chunks);
4. new chunks are added, kept chunks get fresh metadata, chunks no longer produced
   and deleted documents are removed;
5. the page's checkpoint is saved; after the last page the cursor moves, but only
   when no document failed and the run is not a backfill. A crash anywhere means the
   next run redoes some work and loses none.

Deletions at the source are also found by *reconciliation*: the ids the source lists
now against the ids the index holds. It runs on ``--full`` and every
``sync.reconcile_every`` syncs, and an incomplete listing deletes nothing.

Each run returns a :class:`SyncSummary` (also published as a Prefect table artifact).
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from connectors.base import (
    ENTITY_TITLE,
    Checkpoint,
    ConnectorError,
    Document,
    DocumentIssue,
    FetchRequest,
    Page,
    SourceConnector,
    TransientSourceError,
    cursor_may_advance,
    utc,
)
from connectors.chroma import ChromaStore, IndexedDocument
from connectors.lexical import LexicalBackend
from flows.embed import apply_batch, embed_remote, open_collection, open_lexical, write_batch
from flows.settings import Settings, load_settings
from flows.state import LeaseHeartbeat, StateStore, lease_holder_gone, lease_owner
from transforms.batches import ChunkBatch
from transforms.chunking import ALGORITHM_VERSION, Chunk, ChunkingConfig, chunk_document
from transforms.embedding import Embedder, ModelTokenizer, load_tokenizer, resolve_model

log = logging.getLogger(__name__)

#: ``(stage, done, total)`` progress events for the CLI's progress bars.
ProgressCallback = Callable[[str, int, int | None], None]
progress_callback: contextvars.ContextVar[ProgressCallback | None] = contextvars.ContextVar(
    "kbsync_progress", default=None
)


def _report(stage: str, done: int, total: int | None = None) -> None:
    callback = progress_callback.get()
    if callback is not None:
        callback(stage, done, total)


@dataclass
class SyncSummary:
    """What one run did. Document counts are per document, chunk counts per chunk;
    ``seconds`` maps stage (fetch, chunk, embed, write, reconcile, total) to wall time;
    ``wait`` is the time the sync waited for the embedder (embedding overlaps fetching and
    chunking, so ``embed`` minus ``wait`` is the time it hid); ``embed_batches`` counts
    the batches handed to the embedder; ``tokens_embedded`` counts the model's tokens in
    the embedded chunk texts (without special tokens or a passage prefix)."""

    source: str
    mode: str = "incremental"
    status: str = "running"
    documents_added: int = 0
    documents_updated: int = 0
    documents_unchanged: int = 0
    documents_deleted: int = 0
    documents_skipped: int = 0
    documents_failed: int = 0
    chunks_embedded: int = 0
    tokens_embedded: int = 0
    chunks_reused: int = 0
    chunks_deleted: int = 0
    pages: int = 0
    embed_batches: int = 0
    cursor: dict[str, Any] | None = None
    cursor_advanced: bool = False
    reconciled: bool = False
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - start, 4)

    def table(self) -> list[dict[str, Any]]:
        """Rows for the Prefect table artifact and the CLI."""
        rows = [{"measure": k.replace("_", " "), "value": v} for k, v in self.to_dict().items()
                if k.startswith(("documents_", "chunks_"))
                or k in ("status", "mode", "pages", "embed_batches")]
        rows += [{"measure": f"seconds {k}", "value": v} for k, v in self.seconds.items()]
        if self.error:
            rows.append({"measure": "error", "value": self.error})
        return rows


class Pipeline:
    """The resources of a run: settings, state, vector store, and a lazily loaded model.

    Chunks are measured with the model's tokenizer alone (no torch). The model itself is
    loaded at the first chunk to embed, and only with ``embedding.backend:
    sentence-transformers`` in ``mode: local``; with ``backend: openai`` the vectors come
    from the embeddings server and this process never imports torch.

    Args:
        settings: loaded settings.
        embed_parameters: extra parameters of remote ``embed`` runs (the sync flow passes
            its ``config_path`` and ``overrides``, so both sides read the same settings).
        store: an unopened :class:`ChromaStore` to use instead of the one the settings
            name (a test passes one on ``chromadb.EphemeralClient()``); its model identity
            is checked and recorded as for the configured one.
        embedder: an already loaded embedder of ``embedding.model`` (one per test
            session instead of one per run).
    """

    def __init__(self, settings: Settings,
                 embed_parameters: dict[str, Any] | None = None, *,
                 store: ChromaStore | None = None, embedder: Any = None) -> None:
        self.settings = settings
        self.embed_parameters = embed_parameters or {}
        #: the run's lease on its source, kept alive by its heartbeat thread
        self.lease: LeaseHeartbeat | None = None
        self.state = StateStore(settings.resolved_state_url)
        self.model_name, _ = resolve_model(settings.embedding.model)
        self._embedder: Any = embedder
        self._given_store = store
        self._store: ChromaStore | None = None
        self._chunking: ChunkingConfig | None = None
        self._lexical: LexicalBackend | None = None
        #: Goes into every document hash: a change of model, chunking settings or chunking
        #: algorithm (``ALGORITHM_VERSION``: chunk texts or ids cut differently) re-chunks
        #: every document at the next sync, and its old chunk ids are deleted.
        self.hash_salt = (f"{self.model_name}|{settings.chunking.model_dump_json()}"
                          f"|chunking={ALGORITHM_VERSION}")

    @property
    def embedder(self) -> Any:
        """The embedder of ``embedding.backend`` (see ``connectors.embeddings``)."""
        if self._embedder is None:
            self._embedder = self.settings.embedding.encoder(self.settings.http)
        return self._embedder

    @property
    def tokenizer(self) -> ModelTokenizer:
        """The model's tokenizer, loaded alone (chunk sizes are in its tokens)."""
        return load_tokenizer(self.settings.embedding.model, self.settings.embedding.offline)

    @property
    def store(self) -> ChromaStore:
        """The collection, opened with the model's identity (checked against the
        collection's) — without loading the model when the collection already exists."""
        if self._store is None:
            self._store = open_collection(self.settings, self.model_name,
                                          lambda: self.embedder, store=self._given_store)
        return self._store

    @property
    def lexical(self) -> LexicalBackend | None:
        """The lexical index, or None when disabled. Rebuilt from Chroma first when it is
        missing or stale (another index version: analyzer or context rule; or empty while
        Chroma is not)."""
        if self._lexical is None:
            self._lexical = open_lexical(self.settings, lambda: self.store)
        return self._lexical

    def apply(self, batch: ChunkBatch,
              progress: Callable[[int], None] | None = None) -> dict[str, float]:
        """Embed and write ``batch``: in-process (``embedding.mode: local``), or through
        the ``embed`` deployment (``remote``; see :func:`flows.embed.embed_remote`, which
        raises ``RemoteEmbedError`` when that run does not complete). Returns seconds
        per stage."""
        if self.settings.embedding.mode == "remote":
            batch.model = self.model_name
            return embed_remote(batch, self.settings, parameters=self.embed_parameters,
                                progress=progress)
        return apply_batch(batch, self.store, lambda: self.embedder, progress=progress,
                           lexical=self.lexical)

    @property
    def chunking(self) -> ChunkingConfig:
        if self._chunking is None:
            cfg = self.settings.chunking
            limit = self.tokenizer.max_text_tokens
            self._chunking = ChunkingConfig(
                max_tokens=min(cfg.max_tokens or limit, limit), overlap_tokens=cfg.overlap_tokens)
        return self._chunking

    def close(self) -> None:
        """Release the state store and lexical index. When this run loaded the model in
        process, also make its ONNX export for queries if missing (once per model: later
        ``kbsync query`` runs then skip torch; see :mod:`transforms.onnx_embedding`)."""
        self.state.close()
        if self._lexical is not None:
            self._lexical.close()
        e = self.settings.embedding
        if isinstance(self._embedder, Embedder) and e.onnx_queries:
            from transforms.onnx_embedding import ensure_export

            ensure_export(e.spec(), e.onnx_dir())


# ---------------------------------------------------------------------------- pages


class PageReader:
    """Reads a connector's pages; after an error the next read restarts from the last
    durable checkpoint (which is what makes a retried fetch task resume correctly)."""

    def __init__(self, connector: SourceConnector, request: FetchRequest,
                 checkpoint: Checkpoint | None) -> None:
        self.connector, self.request, self.checkpoint = connector, request, checkpoint
        self._pages: Iterator[Page] | None = None

    def next_page(self) -> Page | None:
        if self._pages is None:
            self._pages = iter(self.connector.fetch(self.request, self.checkpoint))
        try:
            return next(self._pages)
        except StopIteration:
            return None
        except BaseException:
            self._pages = None
            raise


def _retry_fetch(task, task_run, state) -> bool:
    """Retry transient errors; a ConnectorError (bad token, bad query) fails at once."""
    try:
        state.result()
    except TransientSourceError:
        return True
    except ConnectorError:
        return False
    except Exception:  # noqa: BLE001 - network errors of any client library
        return True
    return False


def read_page(reader: PageReader) -> Page | None:
    """The next page of changes, or ``None`` when the source has no more (the plain
    fetch step of :func:`index_source`)."""
    return reader.next_page()


@task(name="fetch-page", cache_policy=NO_CACHE, retry_condition_fn=_retry_fetch)
def fetch_page(reader: PageReader) -> Page | None:
    """:func:`read_page` as a Prefect task: retried on transient errors, and each retry
    resumes from the reader's last durable checkpoint."""
    return read_page(reader)


def chunk_metadata(doc: Document, doc_hash: str, chunk: Chunk, chunk_count: int) -> dict[str, Any]:
    """The metadata stored with a chunk: the document's own fields plus kbsync's.

    The document-wide ones (``connectors.chroma.DOCUMENT_FIELDS``: ``doc_hash``,
    ``chunk_count``, ``updated_at``, ``updated_ts``) stay current on the document's head
    (chunk 0); a kept chunk elsewhere in the document keeps those of the version that
    last wrote it (:func:`plan_page` rewrites it only when its own fields change)."""
    return {
        **doc.metadata,
        "doc_id": doc.id,
        "doc_hash": doc_hash,
        "chunk_count": chunk_count,
        "chunk_index": chunk.index,
        "heading": chunk.heading,
        "source": doc.source,
        "source_type": doc.source_type,
        "title": doc.title,
        "url": doc.url,
        "format": doc.format,
        "updated_at": doc.updated_at.isoformat(),
        "updated_ts": int(doc.updated_at.timestamp()),
    }


#: The reason recorded for a document that chunks to nothing.
NO_TEXT_REASON = "no text after conversion"


def nothing_to_index(doc: Document, chunks: list[Chunk]) -> DocumentIssue | None:
    """The ``skipped`` issue of a document with nothing to index, else None.

    One rule for every source: a document whose text chunks to nothing (a Confluence
    page of headings over macros, an empty file, an issue with no description) is
    recorded as skipped with :data:`NO_TEXT_REASON`, counted as skipped, and removed from
    the index if an earlier version was in it — not indexed by its title alone (the
    title is in every chunk's metadata and a title-only chunk matches queries about the
    title's words without holding an answer), and never counted as added.
    """
    if chunks:
        return None
    return DocumentIssue(doc.id, NO_TEXT_REASON, "skipped", doc.title)


@dataclass
class PagePlan:
    """What one page changes in the index, before anything is embedded or written.

    Attributes:
        page: the page as fetched.
        batch: its chunks to embed and add, chunks whose metadata changes, deletions.
        failures: documents that failed (at the source, or in chunking).
        skipped: documents skipped at the source (they leave the index).
        doc_ids: every document the page touches (a later page touching one of them
            waits until this page is written).
        counts_delta: (documents, chunks) the page adds to its source's count in the
            index once written (negative when it removes more).
        reused: chunks of changed documents that the index already holds (kept, not
            embedded; ``batch.update_ids`` lists those whose metadata is rewritten).
    """

    page: Page
    batch: ChunkBatch
    failures: list[DocumentIssue]
    skipped: list[DocumentIssue]
    doc_ids: set[str]
    counts_delta: tuple[int, int] = (0, 0)
    reused: int = 0


def _chunk(pipeline: Pipeline, doc: Document) -> list[Chunk] | Exception:
    """``doc``'s chunks, or the exception chunking raised (one bad document must not
    stop the run: :func:`plan_page` records it as failed)."""
    try:
        return chunk_document(doc.id, doc.text, fmt=doc.format, language=doc.language,
                              title=doc.title, config=pipeline.chunking,
                              counter=pipeline.tokenizer.count_tokens)
    except Exception as exc:  # noqa: BLE001 - recorded per document by the caller
        return exc


def plan_page(pipeline: Pipeline, page: Page, summary: SyncSummary) -> PagePlan:
    """Decide what ``page`` changes: unchanged documents (same hash) cost nothing, changed
    ones are chunked, and only chunk ids the collection does not hold are to be embedded.
    Reads the index, writes nothing.

    The index read (:meth:`~connectors.chroma.ChromaStore.indexed_documents`, a request
    to a Chroma server) runs in a thread while this one chunks the page's documents in
    order; chunking stops when the read returns, and a document the read shows current
    drops its chunks. So an incremental page (mostly changed documents) chunks while it
    waits for the index, and a page of unchanged documents chunks only for as long as
    the read would have kept it idle.

    Raises:
        connectors.chroma.EmbeddingModelMismatch: the collection holds another model.
        connectors.chroma.StoreError: the index cannot be read.
    """
    failures = [i for i in page.issues if i.kind == "failed"]
    documents = list({doc.id: doc for doc in page.documents}.values())
    skipped = [i for i in page.issues if i.kind == "skipped"]
    # skipped documents (became binary, too large, empty) leave the index too
    gone_ids = list(dict.fromkeys(page.deletions + [i.doc_id for i in skipped]))
    batch = ChunkBatch(source=summary.source, model=pipeline.model_name)
    if not documents and not gone_ids:  # nothing changed (a no-op sync): no index read
        return PagePlan(page, batch, failures, skipped, {i.doc_id for i in page.issues})
    store = pipeline.store  # opened here: its errors are raised by this thread

    early: dict[str, list[Chunk] | Exception] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="kbsync-index-read") as pool:
        reading = pool.submit(store.indexed_documents, [d.id for d in documents] + gone_ids)
        with summary.timed("chunk"):
            for doc in documents:
                if reading.done():
                    break
                early[doc.id] = _chunk(pipeline, doc)
        with summary.timed("write"):
            indexed = reading.result()

    planned: list[tuple[Document, str, list[Chunk], IndexedDocument | None]] = []
    with summary.timed("chunk"):
        for doc in documents:
            doc_hash = doc.content_hash(pipeline.hash_salt)
            before = indexed.get(doc.id)
            if before is not None and before.is_current(doc_hash):
                summary.documents_unchanged += 1
                continue
            chunks = early.pop(doc.id) if doc.id in early else _chunk(pipeline, doc)
            if isinstance(chunks, Exception):
                failures.append(DocumentIssue(
                    doc.id, f"chunking failed: {type(chunks).__name__}: {chunks}", "failed",
                    doc.title))
                continue
            if (empty := nothing_to_index(doc, chunks)) is not None:
                skipped.append(empty)
                gone_ids.append(doc.id)
                continue
            planned.append((doc, doc_hash, chunks, before))

    reused = 0
    for doc, doc_hash, chunks, before in planned:
        # a chunk id hashes its doc_id (transforms.chunking.chunk_id), so the index can
        # hold it only among this document's own records, which ``indexed`` lists
        held = before.chunk_ids if before is not None else frozenset()
        for chunk in chunks:
            meta = chunk_metadata(doc, doc_hash, chunk, len(chunks))
            if chunk.id not in held:
                batch.add(chunk.id, chunk.text, meta)
                continue
            reused += 1
            # a kept chunk is rewritten only when more than its document's fields changed
            # (the head always is: it is the document's record, connectors.chroma)
            if before is None or before.needs_update(chunk.id, meta, doc.version_fields):
                batch.update(chunk.id, meta)
        if before is not None:
            batch.delete_ids.extend(before.chunk_ids - {c.id for c in chunks})
            summary.documents_updated += 1
        else:
            summary.documents_added += 1
    batch.delete_doc_ids.extend(gone_ids)
    for doc_id in gone_ids:
        before = indexed.get(doc_id)
        if before is not None:
            summary.documents_deleted += 1
            summary.chunks_deleted += len(before.chunk_ids)
    return PagePlan(page, batch, failures, skipped,
                    {d.id for d in documents} | set(gone_ids) | {i.doc_id for i in page.issues},
                    _counts_delta(planned, set(gone_ids), indexed), reused)


def _counts_delta(planned: list[tuple[Document, str, list[Chunk], IndexedDocument | None]],
                  gone: set[str], indexed: dict[str, IndexedDocument]) -> tuple[int, int]:
    """(documents, chunks) a planned page changes in its source's index: a planned
    document ends with its new chunks, a gone one with none (deletions apply last)."""
    documents = chunks = 0
    for doc, _, new, before in planned:
        if doc.id not in gone:
            documents += before is None
            chunks += len({c.id for c in new}) - (len(before.chunk_ids) if before else 0)
    for doc_id in gone:
        if (before := indexed.get(doc_id)) is not None:
            documents -= 1
            chunks -= len(before.chunk_ids)
    return documents, chunks


class BatchWriter:
    """Embeds planned pages in batches sized for the embedder, one batch in flight while
    the sync fetches and chunks what follows, and makes each batch durable in order.

    Pages are gathered until they hold ``embedding.batch_chunks`` chunks to embed; that
    batch is handed to a single background thread (``concurrent.futures``), so at most one
    batch is being embedded while the next one is planned. When the next batch is ready
    before the previous one is embedded, the sync waits (back-pressure). The main thread
    writes a finished batch (the lexical index, then Chroma), records its pages' document
    issues, and only then saves the checkpoint of its last page. A page touching a
    document that a pending page also touches first drains everything before it, so two
    versions of one document are never planned against the same index state.

    With ``embedding.mode: remote`` the background thread runs the ``embed`` deployment
    instead, which embeds and writes the batch itself.

    The source's document and chunk counts (``flows.state.IndexCounts``, what ``kbsync
    status`` shows) move with each batch, in the transaction that saves its checkpoint;
    a batch handed over to be embedded and written marks them (before it leaves the main
    thread: in remote mode the embed deployment writes it), and a writer that finds them
    never counted or still marked (the run that wrote them died) counts them in the index
    first.

    Raises (from :meth:`put`, :meth:`drain`): what the embedder raised for a batch
    (``connectors.embeddings.EmbeddingServerError``, ``flows.embed.RemoteEmbedError``, ...)
    naming the batch; nothing of that batch or later ones was written and no later
    checkpoint saved.
    """

    def __init__(self, pipeline: Pipeline, summary: SyncSummary, request_key: str) -> None:
        self.pipeline, self.summary, self.request_key = pipeline, summary, request_key
        self.limit = pipeline.settings.embedding.batch_chunks
        self.pending: list[PagePlan] = []
        self.failed: list[DocumentIssue] = []
        self.batches = 0
        self._inflight: tuple[Any, list[PagePlan], ChunkBatch] | None = None
        counts = pipeline.state.counts(summary.source)
        if counts is None or counts.writing:
            pipeline.state.set_counts(summary.source,
                                      *pipeline.store.source_counts(summary.source))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kbsync-embed")

    def put(self, plan: PagePlan) -> None:
        """Queue a planned page; hands a batch over once enough chunks are gathered."""
        if any(plan.doc_ids & p.doc_ids for p in self._unwritten()):
            self.drain()
        self.pending.append(plan)
        if sum(len(p.batch.add_ids) for p in self.pending) >= self.limit:
            self._submit()

    def drain(self) -> None:
        """Embed and write everything queued, then return."""
        self._submit()
        if self._inflight is not None:
            self._collect()

    def salvage(self) -> None:
        """:meth:`drain` after the fetch failed: the pages read before the error become
        durable (and checkpointed); an embedding error here is logged, not raised, so the
        fetch error is what the run reports."""
        try:
            self.drain()
        except Exception as exc:  # noqa: BLE001 - the caller re-raises the fetch error
            log.warning("could not write the pages read before the error: %s", exc)

    def close(self) -> None:
        """Stop the background thread (waits for a batch in flight; its result is
        dropped when it was not collected)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _unwritten(self) -> list[PagePlan]:
        return self.pending + (self._inflight[1] if self._inflight else [])

    def _submit(self) -> None:
        if self._inflight is not None:
            self._collect()
        if not self.pending:
            return
        group, self.pending = self.pending, []
        batch = ChunkBatch(source=self.summary.source, model=self.pipeline.model_name)
        for plan in group:
            batch.extend(plan.batch)
        self.batches += 1
        label = (f"batch {self.batches} ({len(batch.add_ids)} chunks, pages "
                 f"{self.summary.pages - len(group) + 1}-{self.summary.pages})")
        if self.pipeline.settings.embedding.mode != "remote" and batch.add_ids:
            self.pipeline.embedder  # noqa: B018 - loaded here, not in the thread
        # the counts are marked before the batch leaves this thread: in remote mode the
        # embed deployment writes it, and a run killed after that write but before the
        # checkpoint must leave the mark (the next sync recounts instead of drifting)
        if any(p.counts_delta != (0, 0) for p in group):
            self.pipeline.state.mark_writing(self.summary.source)
        future = self._pool.submit(contextvars.copy_context().run, self._embed, batch, label)
        self._inflight = (future, group, batch)

    def _embed(self, batch: ChunkBatch, label: str) -> tuple[Any, dict[str, float]]:
        """In the background thread: the vectors of ``batch`` (or, remote mode, the
        whole batch applied by the embed deployment)."""
        done = self.summary.chunks_embedded
        progress = lambda n: _report("embed", done + n, None)  # noqa: E731
        if self.pipeline.settings.embedding.mode == "remote":
            return None, self.pipeline.apply(batch, progress=progress)
        if not batch.add_ids:
            return None, {}
        start = time.perf_counter()
        vectors = self.pipeline.embedder.encode(batch.add_texts, progress=progress, label=label)
        return vectors, {"embed": time.perf_counter() - start}

    def _collect(self) -> None:
        future, group, batch = self._inflight
        self._inflight = None
        summary, state = self.summary, self.pipeline.state
        with summary.timed("wait"):
            vectors, seconds = future.result()
        for stage, value in seconds.items():
            summary.seconds[stage] = round(summary.seconds.get(stage, 0.0) + value, 4)
        delta = (sum(p.counts_delta[0] for p in group), sum(p.counts_delta[1] for p in group))
        with summary.timed("write"):
            if self.pipeline.settings.embedding.mode != "remote" and not batch.empty:
                write_batch(batch, vectors, self.pipeline.store, self.pipeline.lexical)
            for plan in group:
                # every document read cleanly on the page (changed or not) clears an older
                # failure record; then the page's own skips and failures are recorded
                state.clear_issues(summary.source, [d.id for d in plan.page.documents]
                                   + list(plan.page.deletions))
                issues = plan.skipped + plan.failures
                state.record_issues(summary.source,
                                    [(i.doc_id, i.kind, i.reason, i.title) for i in issues])
                self.failed.extend(plan.failures)
                summary.documents_skipped += len(plan.skipped)
            state.save_checkpoint(summary.source, self.request_key, group[-1].page.checkpoint,
                                  counts_delta=delta)
        summary.chunks_embedded += len(batch.add_ids)
        summary.tokens_embedded += sum(map(self.pipeline.tokenizer.count_tokens, batch.add_texts))
        summary.chunks_reused += sum(p.reused for p in group)
        summary.chunks_deleted += len(batch.delete_ids)


def reconcile_deletions(pipeline: Pipeline, connector: SourceConnector,
                        summary: SyncSummary) -> bool:
    """Delete documents the index holds but the source no longer lists.

    Returns False (and deletes nothing) when the listing was incomplete.
    """
    with summary.timed("reconcile"):
        listing = connector.list_ids()
        if not listing.complete:
            _logger().warning("reconciliation skipped: incomplete listing (%s)",
                              listing.reason)
            return False
        indexed = pipeline.store.document_chunk_counts(summary.source)
        gone = sorted(set(indexed) - listing.ids)
        if gone:
            pipeline.state.mark_writing(summary.source)  # set_counts below clears it
            pipeline.apply(ChunkBatch(source=summary.source, delete_doc_ids=gone))
            pipeline.state.clear_issues(summary.source, gone)
            summary.documents_deleted += len(gone)
            summary.chunks_deleted += sum(indexed[d] for d in gone)
        # the listing read every chunk of the source: its counts, exact, come for free
        pipeline.state.set_counts(summary.source, len(indexed) - len(gone),
                                  sum(indexed.values()) - sum(indexed[d] for d in gone))
        return True


#: :func:`reconcile_deletions` as a Prefect task (a run of its own in the UI).
reconcile_task = task(reconcile_deletions, name="reconcile", cache_policy=NO_CACHE)


def _artifact_key(source: str) -> str:
    return "sync-" + (re.sub(r"[^a-z0-9-]+", "-", source.lower()).strip("-") or "source")


def _parse_time(value: str | datetime | None) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return utc(value) if value else None
    return utc(datetime.fromisoformat(value))


class SourceBusy(Exception):
    """Another run of the same source holds its lease (``flows.state`` ``source_locks``);
    this run did nothing. Not a failure of the source: try again when that run ends."""


def _lock_owner() -> str:
    """Who a run is: its Prefect flow run id when there is one, plus host and process."""
    ctx = FlowRunContext.get()
    run = str(ctx.flow_run.id) if ctx is not None and ctx.flow_run is not None else None
    return lease_owner(run)


class IndexBusy(Exception):
    """Another process holds the embedded index (``<data_dir>/chroma``) and did not
    release it within ``sync.index_lock_timeout_seconds``; this run did nothing."""


@contextmanager
def index_lock(settings: Settings) -> Iterator[None]:
    """Hold the embedded index's data-dir lock (``<data_dir>/chroma.lock``, an OS file
    lock via ``filelock``, released by the OS when the process dies) while a run
    writes. Chroma's ``PersistentClient`` is not process-safe
    (https://github.com/chroma-core/chroma/issues/421): two processes writing one
    directory can corrupt it, so runs of different sources serialize here. A Chroma
    server (``chroma.url``) needs no lock: nothing is taken then.

    Raises:
        IndexBusy: not released by the other process within the timeout.
    """
    if settings.chroma.url:
        yield
        return
    from filelock import FileLock, Timeout

    path = settings.chroma_path.with_name(settings.chroma_path.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    timeout = settings.sync.index_lock_timeout_seconds
    try:
        lock.acquire(timeout=timeout, poll_interval=0.25)
    except Timeout:
        raise IndexBusy(
            f"the embedded index at {settings.chroma_path} is in use by another process's "
            f"run (waited {timeout:g} s, sync.index_lock_timeout_seconds); the embedded store "
            "takes one writing process at a time: to sync several sources at once in several "
            "processes, run a Chroma server and set chroma.url; nothing was done") from None
    try:
        yield
    finally:
        lock.release()


def run_sync(settings: Settings, source: str, *, full: bool = False,
             since: str | datetime | None = None, until: str | datetime | None = None,
             connector: SourceConnector | None = None,
             pipeline: Pipeline | None = None, reconcile: bool = False,
             embed_parameters: dict[str, Any] | None = None) -> SyncSummary:
    """Sync ``source`` (the body of the ``sync_source`` flow; must run inside a flow).

    Args:
        settings: loaded settings.
        source: a configured source name.
        full: ignore the cursor, re-read everything (unchanged documents are skipped by
            hash) and reconcile deletions.
        since, until: backfill window (ISO 8601 or datetime; naive = UTC): re-ingest what
            changed in it without moving the cursor.
        connector: use this connector instead of building one from settings.
        pipeline: use these opened resources instead of opening them from settings.
        reconcile: reconcile deletions in this run even when not due (the nightly
            ``sync-all`` deployment sets it); ignored for backfills.
        embed_parameters: extra parameters of remote ``embed`` runs (see :class:`Pipeline`).

    Raises:
        flows.settings.ConfigError: unknown source.
        ConnectorError: the source cannot be read at all.
        connectors.chroma.EmbeddingModelMismatch: the collection holds another model.
        SourceBusy: another run of ``source`` holds its lease and is not provably gone;
            nothing was done.
        IndexBusy: (embedded index) another process's run held the index longer than
            ``sync.index_lock_timeout_seconds``; nothing was done.
        flows.state.LeaseLost: the lease was lost mid-run (the heartbeat could not renew
            it); the run stopped after its last durable page.
        flows.embed.RemoteEmbedError: (remote mode) an embed run did not complete; the
            cursor stays and the staged batch is kept.
    """
    source_settings = settings.source(source)
    connector = connector or source_settings.build(settings)
    pipeline = pipeline or Pipeline(settings, embed_parameters=embed_parameters)
    owner = _lock_owner()
    ttl = settings.sync.lease_ttl_seconds
    holder = pipeline.state.acquire_lock(source, owner, ttl, holder_gone=lease_holder_gone)
    if holder is not None:
        pipeline.close()
        _close(connector)
        raise SourceBusy(f"source {source!r} is being synced by another run "
                         f"({holder.describe()}); nothing was done (`kbsync unlock {source}` "
                         "releases it if that run is known to be gone)")
    since_dt, until_dt = _parse_time(since), _parse_time(until)
    summary = SyncSummary(source=source,
                          mode="backfill" if since_dt else "full" if full else "incremental")
    try:
        with LeaseHeartbeat(pipeline.state, source, owner, ttl) as lease, \
                index_lock(settings):
            pipeline.lease = lease
            with summary.timed("total"):
                index_source(pipeline, connector, summary, full=full, since=since_dt,
                             until=until_dt, force_reconcile=reconcile,
                             fetch=fetch_page.with_options(
                                 retries=settings.sync.fetch_retries,
                                 retry_delay_seconds=settings.sync.fetch_retry_delay_seconds),
                             reconcile=reconcile_task)
    except BaseException as exc:
        summary.status = "failed"
        summary.error = f"{type(exc).__name__}: {exc}"
        pipeline.state.finish_run(source, status="failed", summary=summary.to_dict())
        raise
    finally:
        _publish(summary)
        _log_summary(summary)
        pipeline.state.release_lock(source, owner)
        pipeline.close()
        _close(connector)
    return summary


def _close(connector: SourceConnector) -> None:
    close = getattr(connector, "close", None)
    if callable(close):
        close()


#: The fetch step of :func:`index_source`: the next page of a reader, or ``None``.
FetchStep = Callable[[PageReader], Page | None]
#: The reconcile step of :func:`index_source` (see :func:`reconcile_deletions`).
ReconcileStep = Callable[[Pipeline, SourceConnector, SyncSummary], bool]


def index_source(pipeline: Pipeline, connector: SourceConnector, summary: SyncSummary, *,
                 full: bool = False, since: datetime | None = None,
                 until: datetime | None = None, force_reconcile: bool = False,
                 fetch: FetchStep = read_page,
                 reconcile: ReconcileStep = reconcile_deletions) -> SyncSummary:
    """The whole sync of one source, top to bottom, with no Prefect in it: fetch pages
    from the cursor (or the resumed checkpoint) -> :func:`plan_page` -> embed and write
    through :class:`BatchWriter` (each batch's checkpoint saved once it is durable) ->
    reconcile deletions when due -> move the cursor when
    :func:`connectors.base.cursor_may_advance` says so. Fills and returns ``summary``.

    Args:
        pipeline: the run's resources (state store, Chroma, embedder, lexical index).
        connector: the source.
        summary: the run's summary, filled in place.
        full: read everything (no cursor) and reconcile deletions. Also done when the
            source's last complete read was indexed under another chunking identity
            (``pipeline.hash_salt``, recorded in the state store), so an upgrade that
            cuts chunks differently re-chunks every document by itself.
        since/until: a backfill window (UTC); the cursor never moves.
        force_reconcile: reconcile even when not due (ignored for backfills).
        fetch: the fetch step; :func:`run_sync` passes the ``fetch-page`` Prefect task
            (retries from the checkpoint), a test the plain :func:`read_page`.
        reconcile: the reconcile step; :func:`run_sync` passes the ``reconcile`` task.

    Raises:
        what ``fetch`` raised once its retries were spent (pages read before it are
        written and checkpointed first); what the embedder raised for a batch (nothing
        of that batch was written); ``flows.state.LeaseLost``. The cursor does not move
        in any of these cases.
    """
    settings, state = pipeline.settings, pipeline.state
    before = state.get(summary.source)
    if not full and not since and before.cursor is not None \
            and state.chunking(summary.source) != pipeline.hash_salt:
        # documents indexed under another chunking (an upgrade that cuts chunks
        # differently, changed chunking settings) are re-chunked only when read
        _logger().warning("%s was indexed with another chunking version or settings: "
                          "reading every document again to re-chunk it", summary.source)
        full = True
        summary.mode = "full"  # what the run did, in its summary, log line and artifact
    request = FetchRequest(cursor=None if full or since else before.cursor, since=since,
                           until=until)
    checkpoint = state.checkpoint_for(summary.source, request.key())
    if checkpoint:
        _logger().info("resuming %s from checkpoint %s", summary.source, checkpoint)
    reader = PageReader(connector, request, checkpoint)
    final_cursor: dict[str, Any] | None = None
    docs_seen = 0
    page_log = PageLog(summary, since=since, until=until)
    writer = BatchWriter(pipeline, summary, request.key())
    try:
        while True:
            try:
                with summary.timed("fetch"):
                    page = fetch(reader)
            except BaseException:
                writer.salvage()  # what was read before the error still becomes durable
                raise
            if page is None:
                break
            summary.pages += 1
            docs_seen += len(page.documents) + len(page.deletions) + len(page.issues)
            _report("fetch", docs_seen, None)
            plan = plan_page(pipeline, page, summary)
            writer.put(plan)
            reader.checkpoint = page.checkpoint  # a retried fetch resumes after this page
            page_log.page(page, failed=len(plan.failures), to_embed=len(plan.batch.add_ids))
            if pipeline.lease is not None:  # renewed by its heartbeat thread
                pipeline.lease.check()
            if page.cursor is not None:  # the last page: the source has nothing more
                final_cursor = page.cursor
                break
        writer.drain()
    finally:
        writer.close()
    pipeline.lexical  # noqa: B018 - a lost or stale lexical index is rebuilt even by a no-op
    failed = writer.failed
    summary.embed_batches = writer.batches
    summary.documents_failed = len(failed)

    every = settings.sync.reconcile_every
    due = bool(every) and before.syncs_since_reconcile + 1 >= every
    reconciled = not since and (full or due or force_reconcile) and \
        reconcile(pipeline, connector, summary)
    summary.reconciled = bool(reconciled)

    advance = not since and cursor_may_advance(final_cursor, failed)  # the one rule
    summary.cursor = final_cursor if advance else before.cursor
    summary.cursor_advanced = advance and final_cursor != before.cursor
    summary.status = "completed" if not failed else "completed_with_failures"
    if failed:
        _logger().warning("%d document(s) or entities failed; the cursor %s", len(failed),
                          "holds them back" if advance else f"stays at {before.cursor}")
    state.finish_run(summary.source, status=summary.status, summary=summary.to_dict(),
                     cursor=final_cursor, advance_cursor=advance,
                     reconciled=summary.reconciled)
    if final_cursor is not None:
        _clear_recovered_entities(state, summary.source, failed)
        if request.cursor is None and not since:  # a complete read: all re-chunked
            state.set_chunking(summary.source, pipeline.hash_salt)
    page_log.finish()
    if final_cursor is not None or (since and not failed):
        # The read reached its end: nothing is left to resume. Keeping the end checkpoint
        # after a failure would make the next run (same cursor, same request) resume
        # *after* the failed document and never retry it.
        state.clear_checkpoint(summary.source)
    return summary


def _clear_recovered_entities(state, source: str, failed: list[DocumentIssue]) -> None:
    """After a complete read, forget entity failures (a project, a space) that this run
    did not report again: the entity was read."""
    now = {f.doc_id for f in failed}
    state.clear_issues(source, [i.doc_id for i in state.issues(source, "failed")
                                if i.title.startswith(ENTITY_TITLE) and i.doc_id not in now])


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class PageLog:
    """One plain-words log line per page and a Prefect progress artifact
    (``sync-<source>-progress``) updated per page, for the Prefect UI.

    The progress is the share of the run's time window read so far when it has one (a
    backfill: from ``since`` to ``until`` or now, by the newest ``updated_at`` seen);
    otherwise the size of what is left is unknown, so it stays at 0 until the run ends
    and the description counts pages and documents. Never fails the run.
    """

    def __init__(self, summary: SyncSummary, *, since: datetime | None = None,
                 until: datetime | None = None) -> None:
        self.summary = summary
        self.since, self.until = since, until
        self.started = self._last = time.perf_counter()
        self.counts = self._counts()
        self.documents = 0
        self.newest: datetime | None = None
        self.progress = 0.0
        self.artifact_id: Any = None
        self._update_artifact("starting")

    def _counts(self) -> dict[str, int]:
        s = self.summary
        return {"added": s.documents_added, "updated": s.documents_updated,
                "unchanged": s.documents_unchanged, "deleted": s.documents_deleted,
                "skipped": s.documents_skipped, "embedded": s.chunks_embedded}

    def _window_share(self) -> float | None:
        if self.since is None or self.newest is None:
            return None
        end = self.until or datetime.now(self.since.tzinfo)
        span = (end - self.since).total_seconds()
        if span <= 0:
            return None
        return max(0.0, min(1.0, (self.newest - self.since).total_seconds() / span))

    def page(self, page: Page, failed: int = 0, to_embed: int = 0) -> None:
        """Log what the page just planned (its new chunks are embedded in the next batch,
        while later pages are fetched) and update the progress artifact."""
        now = time.perf_counter()
        counts = self._counts()
        d = {k: counts[k] - self.counts.get(k, 0) for k in counts}
        self.counts = counts
        read = len(page.documents) + len(page.deletions) + len(page.issues)
        self.documents += read
        times = [doc.updated_at for doc in page.documents if doc.updated_at is not None]
        if times:
            self.newest = max([*times, *([self.newest] if self.newest else [])])
        n = self.summary.pages
        line = (f"page {n}: {_plural(read, 'document')} read: {d['added']} added, "
                f"{d['updated']} updated, {d['deleted']} deleted, {failed} failed, "
                f"{d['unchanged']} unchanged, {d['skipped']} skipped; "
                f"{_plural(to_embed, 'new chunk')} to embed ({now - self._last:.1f} s)")
        self._last = now
        _logger().info("%s", line)
        share = self._window_share()
        if share is not None:
            self.progress = max(self.progress, round(100 * share, 1))
        self._update_artifact(f"{self.summary.source}: {_plural(n, 'page')}, "
                              f"{_plural(self.documents, 'document')} read, "
                              f"{_plural(counts['embedded'], 'chunk')} embedded")

    def finish(self) -> None:
        """Mark the run's progress done (100) with its outcome."""
        self.progress = 100.0
        self._update_artifact(f"{self.summary.source}: {self.summary.status}, "
                              f"{_plural(self.summary.pages, 'page')}, "
                              f"{_plural(self.documents, 'document')} read")

    def _update_artifact(self, description: str) -> None:
        if FlowRunContext.get() is None:
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(
                    self.progress, key=f"{_artifact_key(self.summary.source)}-progress",
                    description=description)
            else:
                update_progress_artifact(self.artifact_id, self.progress,
                                         description=description)
        except Exception as exc:  # noqa: BLE001 - a UI artifact must not fail the sync
            log.warning("could not update the sync progress artifact: %s", exc)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow run (MissingContextError)
        return log


def summary_line(summary: SyncSummary) -> str:
    """What a run did, in one line of plain words (the flow run's last log line)."""
    s = summary
    line = (f"{s.mode} sync of {s.source} {s.status.replace('_', ' ')} in "
            f"{s.seconds.get('total', 0.0):.1f} s: documents {s.documents_added} added, "
            f"{s.documents_updated} updated, {s.documents_deleted} deleted, "
            f"{s.documents_failed} failed ({s.documents_unchanged} unchanged, "
            f"{s.documents_skipped} skipped); chunks {s.chunks_embedded} embedded, "
            f"{s.chunks_reused} reused, {s.chunks_deleted} deleted; "
            f"{_plural(s.pages, 'page')}")
    if s.cursor_advanced:
        line += "; cursor advanced"
    if s.error:
        line += f"; error: {s.error}"
    return line


def _log_summary(summary: SyncSummary) -> None:
    _logger().log(logging.ERROR if summary.status == "failed" else logging.INFO, "%s",
                  summary_line(summary))


def _publish(summary: SyncSummary) -> None:
    if FlowRunContext.get() is None:
        return
    try:
        create_table_artifact(table=summary.table(), key=_artifact_key(summary.source),
                              description=f"kbsync {summary.mode} sync of {summary.source}: "
                                          f"{summary.status}")
    except Exception as exc:  # noqa: BLE001 - a UI artifact must not fail the sync
        log.warning("could not publish the sync artifact: %s", exc)


def _sync_run_name() -> str:
    """``sync-<source>-<mode>`` (mode: incremental, full or backfill) for the UI."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    mode = "backfill" if p.get("since") else "full" if p.get("full") else "incremental"
    return f"sync-{p.get('source', 'source')}-{mode}"


def _sync_all_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"sync-all-{'full' if p.get('full') else 'incremental'}"


@flow(name="sync-source", log_prints=True, flow_run_name=_sync_run_name)
def sync_source(source: str, full: bool = False, since: str | None = None,
                until: str | None = None, config_path: str | None = None,
                overrides: dict[str, Any] | None = None,
                reconcile: bool = False) -> dict[str, Any]:
    """Sync one configured source; returns the :class:`SyncSummary` as a dict.

    Parameters are plain values so the flow can be deployed and scheduled: the flow
    loads settings from ``config_path`` (or ``KBSYNC_CONFIG`` / ``./kbsync.yaml``) and
    the environment, with ``overrides`` applied on top. ``reconcile`` forces a
    reconciliation of deletions (see :func:`run_sync`).
    """
    settings = load_settings(config_path, **(overrides or {}))
    return run_sync(settings, source, full=full, since=since, until=until, reconcile=reconcile,
                    embed_parameters={"config_path": config_path,
                                      "overrides": overrides}).to_dict()


class SyncAllFailed(Exception):
    """One or more sources failed in ``sync_all``; the others were synced."""


@flow(name="sync-all", log_prints=True, flow_run_name=_sync_all_run_name)
def sync_all(full: bool = False, sources: list[str] | None = None,
             config_path: str | None = None,
             overrides: dict[str, Any] | None = None,
             reconcile: bool = False,
             validation: bool | None = None) -> dict[str, dict[str, Any]]:
    """Sync every configured source (or those named), each as a ``sync-source`` subflow,
    then run the ``validate`` subflow when ``validation`` (default
    ``validation.after_sync``) is true.

    A failing source does not stop the others; the flow fails at the end, naming them.
    A failed validation does not fail this flow: its own run is Failed in the UI.
    ``reconcile`` reconciles deletions of every source (the nightly deployment sets it).
    """
    settings = load_settings(config_path, **(overrides or {}))
    names = sources or [s.name for s in settings.sources]
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        state = sync_source(name, full=full, config_path=config_path, overrides=overrides,
                            reconcile=reconcile, return_state=True)
        if state.is_completed():
            results[name] = state.result()
        else:
            try:
                state.result()
            except SourceBusy as exc:  # another run is syncing it right now: not a failure
                get_run_logger().warning("%s", exc)
                results[name] = {"source": name, "status": "busy", "error": str(exc)}
            except BaseException as exc:  # noqa: BLE001 - reported below
                results[name] = {"source": name, "status": "failed",
                                 "error": f"{type(exc).__name__}: {exc}"}
    if settings.validation.after_sync if validation is None else validation:
        _validate_after_sync(config_path, overrides)
    bad = [n for n, r in results.items() if r.get("status") == "failed"]
    if bad:
        raise SyncAllFailed(f"sources failed: {', '.join(bad)}; " + "; ".join(
            f"{n}: {results[n].get('error')}" for n in bad))
    return results


def _validate_after_sync(config_path: str | None, overrides: dict[str, Any] | None) -> None:
    """Run the ``validate`` subflow; its outcome is logged, never raised."""
    from flows.validate import validate

    state = validate(config_path=config_path, overrides=overrides, return_state=True)
    get_run_logger().log(logging.INFO if state.is_completed() and state.name == "Completed"
                         else logging.WARNING, "validation %s: %s", state.name, state.message)

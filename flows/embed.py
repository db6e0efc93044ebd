"""Embed and write a :class:`~transforms.batches.ChunkBatch` into the index, here or on the
GPU work pool.

``apply_batch`` is the one place where vectors are computed and the index is written,
in this order: embed (no writes), the lexical index (add, delete), then Chroma (add new
chunks, replace metadata of kept chunks, delete stale chunks). Chroma is the source of
truth and is written last, so a crash between any two steps leaves each document either
complete or detectably incomplete in Chroma (its head, the ``chunk_index`` 0 record,
with the old ``doc_hash``, two heads, or another number of chunks than the head's
``chunk_count``: ``connectors.chroma.IndexedDocument.complete_hash``), and the next sync
rewrites it in both indexes.

Where it runs is ``embedding.mode``:

* ``local`` (default): the sync calls ``apply_batch`` in its own process.
* ``remote``: the sync calls :func:`embed_remote`, which writes the batch as a Parquet
  file (``transforms.batches.BATCH_SCHEMA``) under ``embedding.staging`` (a path or any
  fsspec URL), runs the ``embed`` deployment (work pool ``gpu``) with the file's URL and
  waits for it (``prefect.deployments.run_deployment``,
  https://docs.prefect.io/v3/deploy/index). The :func:`embed` flow there reads the file,
  embeds on CUDA in fp16 when the machine has a GPU, and applies the batch to the Chroma
  server and the lexical index. The staged file is removed after the run completed and
  kept (its URL in the error) when it did not; the sync then fails and its cursor stays.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.exceptions import MissingContextError

from connectors.chroma import ChromaStore, EmbeddingModelMismatch
from connectors.lexical import LexicalBackend, open_index
from connectors.staging import BatchStaging, read_batch_table, remove_batch
from flows.settings import Settings, load_settings
from transforms.batches import ChunkBatch, batch_to_table, table_to_batch
from transforms.embedding import load_embedder, resolve_model

log = logging.getLogger(__name__)


class RemoteEmbedError(Exception):
    """The ``embed`` deployment's run did not complete; the staged batch was kept.

    Attributes:
        batch_url: where the staged batch lies (for inspection or a manual re-run:
            ``prefect deployment run embed/embed --param batch_url=...``).
        flow_run_id: the embed run, when one was created.
    """

    def __init__(self, message: str, batch_url: str, flow_run_id: Any = None) -> None:
        super().__init__(message)
        self.batch_url = batch_url
        self.flow_run_id = flow_run_id


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return log


def apply_batch(batch: ChunkBatch, store: ChromaStore, embedder: Callable[[], Any],
                progress: Callable[[int], None] | None = None,
                lexical: LexicalBackend | None = None) -> dict[str, float]:
    """Embed ``batch.add_texts`` and apply the batch to ``lexical`` and ``store``.

    Args:
        batch: the changes.
        store: the opened collection.
        embedder: returns the embedder (called only when there is text to embed): an
            :class:`~transforms.embedding.Embedder` or a
            :class:`~connectors.embeddings.RemoteEmbedder`.
        progress: called with the number of chunks embedded so far.
        lexical: the lexical index kept in step, if enabled.

    Returns:
        Seconds spent per stage: ``{"embed": s, "write": s}``.
    """
    seconds = {"embed": 0.0, "write": 0.0}
    vectors = None
    if batch.add_ids:
        start = time.perf_counter()
        vectors = embedder().encode(batch.add_texts, progress=progress)
        seconds["embed"] = time.perf_counter() - start
    seconds["write"] = write_batch(batch, vectors, store, lexical)
    return seconds


def write_batch(batch: ChunkBatch, vectors: Any, store: ChromaStore,
                lexical: LexicalBackend | None = None) -> float:
    """Apply an embedded ``batch`` (``vectors``: ``(len(batch.add_ids), dimension)``, or
    None when it adds nothing): the lexical index first (add, delete), then Chroma (add,
    replace metadata, delete). Returns the seconds spent."""
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
    return time.perf_counter() - start


def rebuild_lexical(store: ChromaStore, lexical: LexicalBackend, page: int = 2000) -> int:
    """Rebuild the lexical index from the chunks Chroma holds; returns the chunk count.

    Used by ``kbsync reindex --lexical`` and automatically when the lexical index is
    missing, empty while Chroma is not, or written by another index version
    (``connectors.lexical.INDEX_VERSION``: analyzer, or the chunk's lexical text rule).
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


def open_collection(settings: Settings, model_name: str,
                    embedder: Callable[[], Any], store: ChromaStore | None = None) -> ChromaStore:
    """The collection for ``model_name``, created on first use; the model is loaded (for its
    dimension) only when the collection does not record one yet. ``store``: use this
    store (its client and collection name) instead of the one the settings name.

    Raises:
        connectors.chroma.EmbeddingModelMismatch: the collection holds another model.
        connectors.chroma.StoreError: Chroma cannot be reached.
    """
    store = store or ChromaStore(path=settings.chroma_path, url=settings.chroma.url,
                                 collection=settings.chroma.collection)
    stored_model, stored_dim = store.stored_model()
    if stored_model == model_name and stored_dim is not None:
        store.model, store.dimension = model_name, stored_dim
    else:
        store.model, store.dimension = model_name, embedder().dimension
    store.collection()
    return store


def open_lexical(settings: Settings,
                 store: Callable[[], ChromaStore]) -> LexicalBackend | None:
    """The lexical index (``lexical.url``'s PostgreSQL, else the SQLite file), or None
    when disabled. Rebuilt from Chroma first when it is missing or stale (another
    index version, ``connectors.lexical.INDEX_VERSION``, or empty while Chroma is not).
    ``store`` opens the collection; it is called only when the index is stale or empty,
    so a healthy index is opened without importing chromadb."""
    if not settings.lexical.enabled:
        return None
    lexical = open_index(settings.lexical_location)
    if not lexical.current or lexical.empty():
        chroma = store()
        if not lexical.current or chroma.count() > 0:
            log.warning("rebuilding the lexical index %s from Chroma", lexical.path)
            rebuild_lexical(chroma, lexical)
    return lexical


def embed_remote(batch: ChunkBatch, settings: Settings, *,
                 parameters: dict[str, Any] | None = None,
                 progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Apply ``batch`` through the ``embed`` deployment and wait for it.

    Writes the batch under ``settings.staging_location``, runs
    ``settings.embedding.deployment`` with ``batch_url`` (plus ``parameters``, e.g. the
    sync's ``config_path`` and ``overrides``) as a subflow of the calling run, polls it
    every ``embedding.remote_poll_seconds`` for at most ``embedding.remote_timeout_seconds``
    and removes the staged file once the run completed. An empty batch runs nothing.

    Returns:
        Seconds per stage: ``{"stage": writing the file, "embed": the remote run}``.

    Raises:
        RemoteEmbedError: the deployment is missing, the server cannot be reached, or
            the run did not complete in time; the staged file is kept and named.
        connectors.staging.StagingError: the batch cannot be written.
    """
    if batch.empty:
        return {}
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    logger = _logger()
    name = settings.embedding.deployment
    start = time.perf_counter()
    url = BatchStaging(settings.staging_location).write(batch_to_table(batch), batch.source)
    seconds = {"stage": time.perf_counter() - start}
    logger.info("staged %d chunk(s) to embed, %d update(s), %d deletion(s) at %s; running %s",
                len(batch.add_ids), len(batch.update_ids),
                len(batch.delete_ids) + len(batch.delete_doc_ids), url, name)
    start = time.perf_counter()
    try:
        run = run_deployment(name, parameters={"batch_url": url, **(parameters or {})},
                             timeout=settings.embedding.remote_timeout_seconds,
                             poll_interval=settings.embedding.remote_poll_seconds)
    except ObjectNotFound:
        server = PREFECT_API_URL.value() or "the ephemeral Prefect server"
        raise RemoteEmbedError(
            f"embedding.mode is remote but deployment {name!r} does not exist on {server}: "
            f"register the deployments (see README, Deployments) or set embedding.mode: "
            f"local; the staged batch is kept at {url}", url) from None
    except Exception as exc:  # noqa: BLE001 - server unreachable, bad response, ...
        raise RemoteEmbedError(f"cannot run deployment {name!r}: {type(exc).__name__}: "
                               f"{exc}; the staged batch is kept at {url}", url) from exc
    seconds["embed"] = time.perf_counter() - start
    state = run.state
    if state is None or not state.is_completed():
        if state is not None and not state.is_final():
            what = (f"did not finish within {settings.embedding.remote_timeout_seconds:g} s "
                    f"(state {state.name}; cancelled)")
            _cancel(run, state)
        else:
            what = f"ended {state.name if state else 'without a state'}"
            if state is not None and state.message:
                what += f": {state.message}"
        message = f"embed run {run.name} ({run.id}) {what}; the staged batch is kept at {url}"
        logger.error(message)
        raise RemoteEmbedError(message, url, run.id)
    remove_batch(url)
    if progress is not None and batch.add_ids:
        progress(len(batch.add_ids))
    return seconds


def _cancel(run: Any, state: Any) -> None:
    """Cancel an embed run we stopped waiting for, so it does not apply the batch later
    (the sync redoes the page on its next run)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    message = "kbsync stopped waiting for this embed run (embedding.remote_timeout_seconds)"
    try:
        with get_client(sync_client=True) as client:
            waiting = state.is_scheduled() or state.is_paused()
            client.set_flow_run_state(run.id, (Cancelled if waiting else Cancelling)(
                message=message), force=True)
    except Exception as exc:  # noqa: BLE001 - reported; the sync fails anyway
        _logger().warning("could not cancel embed run %s: %s", run.id, exc)


def _artifact_key(source: str) -> str:
    return "embed-" + (re.sub(r"[^a-z0-9-]+", "-", source.lower()).strip("-") or "batch")


def _embed_run_name() -> str:
    """``embed-<source>`` for the UI (staged files lie in ``<staging>/<source>/``, see
    :meth:`connectors.staging.BatchStaging.write`)."""
    from prefect.runtime import flow_run

    parts = str(flow_run.parameters.get("batch_url", "")).rstrip("/").rsplit("/", 2)
    return f"embed-{parts[-2] if len(parts) == 3 and parts[-2] else 'batch'}"


@flow(name="embed", log_prints=True, flow_run_name=_embed_run_name)
def embed(batch_url: str, config_path: str | None = None,
          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply one staged batch: embed its new chunks (CUDA fp16 when present) and write them
    to Chroma and the lexical index; delete its stale chunks and documents.

    The ``embed`` deployment on the ``gpu`` work pool runs this for syncs in
    ``embedding.mode: remote``; settings come from ``config_path`` (else
    ``KBSYNC_CONFIG`` / ``./kbsync.yaml``) and the worker's environment, with
    ``overrides`` on top. The staged file is left in place (the sync removes it).

    Returns:
        ``{"source", "model", "device", "chunks_embedded", "chunks_updated",
        "chunks_deleted", "documents_deleted", "chunks_per_second", "seconds"}``.

    Raises:
        connectors.staging.StagingError: the batch cannot be read.
        transforms.batches.BatchFormatError: the file is not a batch of this version.
        connectors.chroma.EmbeddingModelMismatch: the batch, the worker's
            ``embedding.model`` or the collection disagree on the model.
    """
    settings = load_settings(config_path, **(overrides or {}))
    logger = get_run_logger()
    batch = table_to_batch(read_batch_table(batch_url))
    model_name, _ = resolve_model(settings.embedding.model)
    if batch.model and batch.model != model_name:
        raise EmbeddingModelMismatch(
            f"the batch was chunked for embedding model {batch.model!r}, but this worker's "
            f"embedding.model is {model_name!r}: give both workers the same settings")
    spec = settings.embedding.spec(settings.http)
    store = open_collection(settings, model_name, lambda: load_embedder(spec))
    lexical = open_lexical(settings, lambda: store)
    try:
        seconds = apply_batch(batch, store, lambda: load_embedder(spec), lexical=lexical)
    finally:
        if lexical is not None:
            lexical.close()
    device = load_embedder(spec).device if batch.add_ids else None
    rate = len(batch.add_ids) / seconds["embed"] if seconds["embed"] > 0 else None
    result = {
        "source": batch.source,
        "model": model_name,
        "device": device,
        "chunks_embedded": len(batch.add_ids),
        "chunks_updated": len(batch.update_ids),
        "chunks_deleted": len(batch.delete_ids),
        "documents_deleted": len(batch.delete_doc_ids),
        "chunks_per_second": round(rate, 1) if rate else None,
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
    }
    logger.info("embedded %d chunk(s) on %s (%s chunks/s), updated %d, deleted %d chunk(s) "
                "and %d document(s)", len(batch.add_ids), device or "-",
                result["chunks_per_second"] or "-", len(batch.update_ids),
                len(batch.delete_ids), len(batch.delete_doc_ids))
    try:
        create_table_artifact(
            table=[{"measure": k.replace("_", " "), "value": v} for k, v in result.items()
                   if k != "seconds"]
            + [{"measure": f"seconds {k}", "value": v} for k, v in result["seconds"].items()],
            key=_artifact_key(batch.source),
            description=f"kbsync embed of a {batch.source or 'batch'} batch")
    except Exception as exc:  # noqa: BLE001 - a UI artifact must not fail the run
        logger.warning("could not publish the embed artifact: %s", exc)
    return result

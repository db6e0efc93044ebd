"""flows/sync.py end to end: real git repos -> real Prefect flow runs -> real Chroma."""

from __future__ import annotations

from collections import Counter

import chromadb
import pytest
import yaml

from connectors.base import DocumentIssue, FetchRequest
from connectors.chroma import ChromaStore, EmbeddingModelMismatch
from flows.state import StateStore
from flows.sync import SourceBusy, run_sync, sync_all, sync_source
from tests.conftest import long_markdown
from transforms.chunking import ChunkingConfig, chunk_document


def sync(settings, source="src0", **kwargs):
    """Run the real ``sync-source`` flow with these settings."""
    from prefect import flow

    @flow(name="test-sync")
    def _flow():
        return run_sync(settings, source, **kwargs).to_dict()

    return _flow()


def collection(settings):
    client = chromadb.PersistentClient(path=str(settings.chroma_path))
    return client.get_collection(settings.chroma.collection)


def chunks_by_doc(settings) -> dict[str, set[str]]:
    res = collection(settings).get(include=["metadatas"])
    out: dict[str, set[str]] = {}
    for cid, meta in zip(res["ids"], res["metadatas"], strict=True):
        out.setdefault(meta["doc_id"], set()).add(cid)
    return out


def assert_counts_kept(settings, source="src0"):
    """The state store's kept counts of ``source`` equal what Chroma holds."""
    held = collection(settings).get(where={"source": source}, include=["metadatas"])
    kept = StateStore(settings.resolved_state_url).counts(source)
    assert kept is not None and not kept.writing
    assert (kept.documents, kept.chunks) == (len({m["doc_id"] for m in held["metadatas"]}),
                                             len(held["ids"]))


def expected_chunk_ids(settings, embedder, doc_id, text, fmt, title):
    config = ChunkingConfig(max_tokens=embedder.max_text_tokens,
                            overlap_tokens=settings.chunking.overlap_tokens)
    return {c.id for c in chunk_document(doc_id, text, fmt=fmt, title=title, config=config,
                                         counter=embedder.count_tokens)}


def test_first_sync_indexes_every_eligible_file_then_noop(make_repo, make_settings, embedder):
    repo = make_repo({
        "README.md": "# Project\n\nThis project syncs knowledge.\n",
        "src/app.py": "def main():\n    \"\"\"Entry point.\"\"\"\n    return 42\n",
        "docs/guide.md": long_markdown(sections=4),
        "image.png": b"\x89PNG\x00\x00binary",
    })
    settings = make_settings(repo)
    first = sync(settings)

    assert first["status"] == "completed"
    assert first["documents_added"] == 3 and first["documents_skipped"] == 1
    held = chunks_by_doc(settings)
    assert set(held) == {"src0:README.md", "src0:src/app.py", "src0:docs/guide.md"}
    assert first["chunks_embedded"] == sum(len(v) for v in held.values())
    texts = collection(settings).get(include=["documents"])["documents"]
    assert first["tokens_embedded"] == sum(map(embedder.count_tokens, texts)) > 0
    for path, fmt in [("README.md", "markdown"), ("docs/guide.md", "markdown"),
                      ("src/app.py", "code")]:
        text = (repo.path / path).read_text()
        assert held[f"src0:{path}"] == expected_chunk_ids(settings, embedder, f"src0:{path}",
                                                          text, fmt, path)

    meta = collection(settings).get(ids=[next(iter(held["src0:src/app.py"]))],
                                    include=["metadatas"])["metadatas"][0]
    for key in ("doc_id", "doc_hash", "source", "source_type", "title", "url", "updated_at",
                "chunk_index", "path", "language", "last_commit"):
        assert key in meta, key
    assert meta["source_type"] == "git" and meta["language"] == "python"

    state = StateStore(settings.resolved_state_url).get("src0")
    assert state.cursor == {"commit": repo.head} and state.last_success_at is not None

    second = sync(settings)
    assert second["chunks_embedded"] == 0
    assert second["documents_added"] == second["documents_updated"] == 0
    assert chunks_by_doc(settings) == held


def test_editing_one_paragraph_embeds_only_changed_chunks(make_repo, make_settings, embedder):
    text = long_markdown(sections=12, paragraphs=6)
    repo = make_repo({"handbook.md": text})
    settings = make_settings(repo)
    sync(settings)
    before = chunks_by_doc(settings)["src0:handbook.md"]
    assert len(before) >= 15

    edited = text.replace("Paragraph 2 about sharding in section 4.",
                          "Paragraph 2 about sharding in section 4 (revised for the new cluster).")
    repo.commit({"handbook.md": edited})
    result = sync(settings)

    after = chunks_by_doc(settings)["src0:handbook.md"]
    expected = expected_chunk_ids(settings, embedder, "src0:handbook.md", edited, "markdown",
                                  "handbook.md")
    assert after == expected
    assert result["documents_updated"] == 1
    assert result["chunks_embedded"] == len(after - before)
    assert 1 <= result["chunks_embedded"] <= 2
    assert result["chunks_reused"] == len(after & before)
    assert result["chunks_deleted"] == len(before - after)


def test_delete_rename_and_becoming_ineligible(make_repo, make_settings):
    repo = make_repo({"a.md": "alpha document\n", "b.md": "beta document\n",
                      "c.md": "gamma document\n", "d.txt": "delta document\n",
                      "e.txt": "epsilon document\n", "f.md": "zeta document\n"})
    settings = make_settings(repo, source={"max_file_bytes": 2000})
    sync(settings)
    assert len(chunks_by_doc(settings)) == 6

    repo.commit({"d.txt": b"\x00\x01binary now", "e.txt": "y" * 3000,
                 "f.md": "caf\xe9".encode("latin-1")},
                remove=["a.md"], move={"b.md": "docs/b.md"})
    result = sync(settings)

    held = chunks_by_doc(settings)
    assert set(held) == {"src0:c.md", "src0:docs/b.md"}
    assert result["documents_deleted"] == 5  # a, old b, and d/e/f which became ineligible
    assert result["documents_added"] == 1 and result["documents_skipped"] == 3
    issues = {i.doc_id: i.reason for i in StateStore(settings.resolved_state_url).issues("src0")}
    assert issues["src0:d.txt"] == "binary file"
    assert "over the size limit" in issues["src0:e.txt"]
    assert "not valid UTF-8" in issues["src0:f.md"]

    # the renamed file's chunks are new ids (the doc id is part of them): nothing stale left
    assert collection(settings).count() == sum(len(v) for v in held.values())
    assert_counts_kept(settings)


class CrashBeforeCursor:
    """A source whose process dies right after its last page was indexed: the pages are
    handed over without their final cursor, then the next read raises. The flow has
    upserted everything and not yet moved the cursor, as in a crash at that point."""

    def __init__(self, inner):
        self.inner, self.name, self.source_type = inner, inner.name, inner.source_type

    def fetch(self, request: FetchRequest, checkpoint=None):
        for page in self.inner.fetch(request, checkpoint):
            page.cursor = None
            yield page
        raise RuntimeError("simulated crash after the upsert, before the cursor moves")

    def list_ids(self):
        return self.inner.list_ids()


@pytest.mark.parametrize("checkpoint_written", [True, False])
def test_crash_after_upsert_before_cursor_converges(make_repo, make_settings, checkpoint_written):
    repo = make_repo({"a.md": long_markdown(sections=3), "b.py": "x = 1\n"})
    settings = make_settings(repo, sync={"fetch_retries": 0})
    sync(settings)
    first_commit = repo.head
    repo.commit({"a.md": long_markdown(sections=5), "c.md": "# New\n\nnew page\n"},
                remove=["b.py"])

    connector = CrashBeforeCursor(settings.source("src0").build(settings))
    with pytest.raises(RuntimeError, match="simulated crash"):
        sync(settings, connector=connector)
    state = StateStore(settings.resolved_state_url)
    assert state.get("src0").cursor == {"commit": first_commit}  # not moved
    assert state.get("src0").last_status == "failed"
    assert set(chunks_by_doc(settings)) == {"src0:a.md", "src0:c.md"}  # the upsert happened

    if not checkpoint_written:  # the crash came before the last page's checkpoint too
        state.clear_checkpoint("src0")

    result = sync(settings)
    assert result["status"] == "completed"
    assert result["chunks_embedded"] == 0  # everything was durable already
    assert result["documents_added"] == result["documents_updated"] == 0
    # resumed after the last page, or re-read from the old cursor and found unchanged
    assert result["documents_unchanged"] == (0 if checkpoint_written else 2)
    assert state.get("src0").cursor == {"commit": repo.head}
    ids = collection(settings).get()["ids"]
    assert len(ids) == len(set(ids))
    assert set(chunks_by_doc(settings)) == {"src0:a.md", "src0:c.md"}
    assert_counts_kept(settings)


class FailOneDocument:
    """A source that cannot read one document this time (say its API answered 500): the
    document comes as a ``failed`` issue on the last page instead of as a document."""

    def __init__(self, inner, doc_id: str):
        self.inner, self.doc_id = inner, doc_id
        self.name, self.source_type = inner.name, inner.source_type

    def fetch(self, request: FetchRequest, checkpoint=None):
        for page in self.inner.fetch(request, checkpoint):
            if any(d.id == self.doc_id for d in page.documents):
                page.documents = [d for d in page.documents if d.id != self.doc_id]
                page.issues.append(DocumentIssue(self.doc_id, "HTTP 500 from the source"))
            yield page

    def list_ids(self):
        return self.inner.list_ids()


def test_failed_document_is_retried_by_the_next_run(make_repo, make_settings):
    """The end checkpoint of a run with a failure must not let the next run resume past
    the failed document (same cursor, same request): it re-reads and indexes it."""
    repo = make_repo({"a.md": "# A\n\nalpha text\n"})
    settings = make_settings(repo)
    sync(settings)
    old_cursor = StateStore(settings.resolved_state_url).get("src0").cursor
    repo.commit({"b.md": "# B\n\nbravo text\n", "c.md": "# C\n\ncharlie text\n"})

    flaky = FailOneDocument(settings.source("src0").build(settings), "src0:b.md")
    first = sync(settings, connector=flaky)
    state = StateStore(settings.resolved_state_url)
    assert first["status"] == "completed_with_failures" and first["documents_failed"] == 1
    assert state.get("src0").cursor == old_cursor
    assert [i.doc_id for i in state.issues("src0", kind="failed")] == ["src0:b.md"]
    assert set(chunks_by_doc(settings)) == {"src0:a.md", "src0:c.md"}

    second = sync(settings)
    assert second["status"] == "completed"
    assert set(chunks_by_doc(settings)) == {"src0:a.md", "src0:b.md", "src0:c.md"}
    assert state.get("src0").cursor == {"commit": repo.head}
    assert state.issues("src0") == []  # the failure record is gone with the failure


def test_partially_written_document_is_repaired(make_repo, make_settings):
    """A crash in the middle of writing one document's chunks leaves fewer chunks than
    ``chunk_count``; the next full sync notices and writes the missing ones."""
    repo = make_repo({"a.md": long_markdown(sections=6)})
    settings = make_settings(repo)
    sync(settings)
    col = collection(settings)
    all_ids = sorted(col.get()["ids"])
    col.delete(ids=all_ids[: len(all_ids) // 2])

    result = sync(settings, full=True)
    assert result["documents_updated"] == 1
    assert result["chunks_embedded"] == len(all_ids) // 2
    assert sorted(collection(settings).get()["ids"]) == all_ids


def test_another_models_collection_is_refused_and_nothing_written(make_repo, make_settings):
    repo = make_repo({"a.md": "hello\n"})
    settings = make_settings(repo)
    client = chromadb.PersistentClient(path=str(settings.chroma_path))
    client.create_collection("kbsync", embedding_function=None,
                             metadata={"embedding_model": "intfloat/multilingual-e5-base",
                                       "embedding_dimension": 768})
    with pytest.raises(EmbeddingModelMismatch, match="multilingual-e5-base"):
        sync(settings)
    assert collection(settings).count() == 0
    assert StateStore(settings.resolved_state_url).get("src0").cursor is None


def test_full_refresh_reconciles_files_excluded_later(make_repo, make_settings):
    repo = make_repo({"keep.md": "keep me\n", "drafts/x.md": "draft\n"})
    settings = make_settings(repo)
    sync(settings)
    narrowed = make_settings(repo, source={"exclude": ["drafts/"]})
    incremental = sync(narrowed)
    assert "src0:drafts/x.md" in chunks_by_doc(narrowed)  # no diff, nothing to notice
    assert not incremental["reconciled"]

    full = sync(narrowed, full=True)
    assert full["reconciled"] and full["documents_deleted"] == 1
    assert set(chunks_by_doc(narrowed)) == {"src0:keep.md"}
    assert full["chunks_embedded"] == 0
    assert_counts_kept(narrowed)


def test_backfill_does_not_move_the_cursor(make_repo, make_settings):
    from datetime import UTC, datetime

    repo = make_repo()
    repo.commit({"old.md": "old text\n"}, when=datetime(2020, 5, 1, tzinfo=UTC))
    settings = make_settings(repo)
    sync(settings)
    col = collection(settings)
    col.delete(ids=col.get()["ids"])  # e.g. a collection restored from an old backup
    cursor = StateStore(settings.resolved_state_url).get("src0").cursor

    result = sync(settings, since="2020-01-01", until="2020-12-31")
    assert result["mode"] == "backfill" and result["documents_added"] == 1
    assert StateStore(settings.resolved_state_url).get("src0").cursor == cursor


def test_two_sources_share_one_collection(make_repo, make_settings):
    a = make_repo({"x.md": "from repository a\n"}, name="a")
    b = make_repo({"x.md": "from repository b\n"}, name="b")
    settings = make_settings(a, b, names=["alpha", "beta"])
    sync(settings, "alpha")
    sync(settings, "beta")
    held = chunks_by_doc(settings)
    assert set(held) == {"alpha:x.md", "beta:x.md"}
    sources = Counter(m["source"] for m in collection(settings).get(include=["metadatas"])["metadatas"])
    assert sources == {"alpha": 1, "beta": 1}
    assert_counts_kept(settings, "alpha")
    assert_counts_kept(settings, "beta")


def test_sync_source_flow_loads_config_file(make_repo, tmp_path):
    repo = make_repo({"a.md": "configured by file\n"})
    config = tmp_path / "kbsync.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'filedata'}\n"
        f"sources:\n  - type: git\n    name: docs\n    url: {repo.path}\n"
    )
    summary = sync_source("docs", config_path=str(config))
    assert summary["documents_added"] == 1
    store = ChromaStore(path=tmp_path / "filedata" / "chroma")
    assert store.count() == 1


def test_a_source_synced_by_another_run_is_left_alone(make_repo, make_settings, tmp_path):
    """Two runs of one source never interleave, however they were started: a run that
    finds the source's lease held does nothing; sync-all syncs the others and says so."""
    busy_repo, free_repo = make_repo({"a.md": "# A\n\nalpha\n"}), make_repo({"b.md": "# B\n\nb\n"})
    settings = make_settings(busy_repo, free_repo, names=["busy", "free"])
    state = StateStore(settings.resolved_state_url)
    assert state.acquire_lock("busy", "another-run@elsewhere", 600) is None

    with pytest.raises(SourceBusy, match="another run"):
        sync(settings, "busy")
    assert state.get("busy").last_status is None  # not marked failed: it was not run
    assert state.lock("busy").owner == "another-run@elsewhere"  # and the lease is untouched

    config = tmp_path / "kbsync.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
    results = sync_all(config_path=str(config), validation=False)
    assert results["busy"]["status"] == "busy"
    assert results["free"]["status"] == "completed"
    assert set(chunks_by_doc(settings)) == {"free:b.md"}
    assert state.lock("free") is None  # released after the run

    state.release_lock("busy", "another-run@elsewhere")
    assert sync(settings, "busy")["status"] == "completed"
    assert state.lock("busy") is None


def test_counts_are_marked_before_a_batch_leaves_for_its_writer(make_repo, make_settings,
                                                                embedder):
    """A batch's counts are marked while it is being embedded, before anything of it is
    written: in remote mode the embed deployment writes it from another process, so a run
    killed after that write and before the checkpoint must still leave the mark (and the
    next sync recounts). Seen from inside the embedder: the mark is set on every batch
    it gets (one here), and the finished run leaves it cleared with the counts exact."""
    from prefect import flow

    from flows.sync import Pipeline

    class MarkProbe:
        """The real embedder, noting the counts' ``writing`` mark on every encode."""

        def __init__(self, real, state):
            self.real, self.state, self.marks = real, state, []

        def __getattr__(self, name):
            return getattr(self.real, name)

        def encode(self, texts, **kwargs):
            self.marks.append(self.state.counts("src0").writing)
            return self.real.encode(texts, **kwargs)

    repo = make_repo({"a.md": long_markdown(sections=2), "b.md": "# B\n\nbravo text\n"})
    settings = make_settings(repo)
    sync(settings)
    repo.commit({"a.md": long_markdown(sections=3), "c.md": long_markdown(sections=8),
                 "d.md": long_markdown(sections=6)})
    pipeline = Pipeline(settings)
    probe = MarkProbe(embedder, pipeline.state)
    pipeline._embedder = probe

    @flow(name="test-sync")
    def _flow():
        return run_sync(settings, "src0", pipeline=pipeline).to_dict()

    try:
        summary = _flow()
    finally:
        pipeline.close()
    assert summary["chunks_embedded"] > 4 and probe.marks
    assert all(probe.marks), probe.marks
    assert_counts_kept(settings)


@pytest.mark.parametrize("state", ["sqlite", "postgres"])
def test_kept_counts_follow_every_change_and_recover(make_repo, make_settings, state, request):
    """The per-source counts ``kbsync status`` shows are kept in the state store (SQLite
    or PostgreSQL): they follow growing, shrinking, deleted and new documents batch by
    batch; counts never kept (an older version's state) or left marked by a run that died
    while writing are counted again in Chroma by the next sync, and reconciliation
    recounts them."""
    overrides = {"state_url": request.getfixturevalue("postgres_url")} if state == "postgres" else {}
    repo = make_repo({"a.md": long_markdown(sections=2), "b.md": "# B\n\nbravo text\n",
                      "c.md": long_markdown(sections=5)})
    settings = make_settings(repo, **overrides)
    sync(settings)
    assert_counts_kept(settings)
    store = StateStore(settings.resolved_state_url)
    assert store.counts("src0").documents == 3

    repo.commit({"a.md": long_markdown(sections=6), "c.md": long_markdown(sections=1),
                 "d.md": "# D\n\ndelta text\n"}, remove=["b.md"])
    sync(settings)
    assert_counts_kept(settings)

    # a run died between writing a batch and recording it: the mark stays, and the
    # counts are wrong; the next sync counts them again before writing anything
    store.mark_writing("src0")
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE source_counts SET chunks = chunks + 7")
    repo.commit({"e.md": "# E\n\necho text\n"})
    sync(settings)
    assert_counts_kept(settings)

    # state written before counts were kept: none, so the next sync counts them
    store.reset("src0")
    assert store.counts("src0") is None
    repo.commit({"e.md": "# E\n\necho text, edited\n"})
    sync(settings)
    assert_counts_kept(settings)

    # drift (say a chunk removed by hand) is repaired by reconciliation's listing
    col = collection(settings)
    col.delete(ids=col.get(where={"doc_id": "src0:d.md"})["ids"])
    sync(settings, reconcile=True)
    assert_counts_kept(settings)
    store.close()

"""The sync algorithm without Prefect: :func:`flows.sync.index_source` against a real git
repository, Chroma's in-memory ``EphemeralClient`` and a SQLite state store in a temp
dir, with the plain fetch and reconcile steps (no flow, no task, no Prefect server).

The flow-level behaviour (retries, leases, artifacts, the CLI) is in test_sync.py.
"""

from __future__ import annotations

import uuid

import chromadb
import pytest
from sqlalchemy import text

from connectors.base import FetchRequest
from connectors.chroma import ChromaStore
from connectors.lexical import LexicalIndex
from flows.sync import Pipeline, SyncSummary, index_source, read_page
from tests.conftest import LATIN1_NAME, long_markdown
from tests.test_sync import FailOneDocument
from transforms.chunking import chunk_id
from transforms.context import lexical_text


@pytest.fixture(scope="session")
def prefect_server():
    """No Prefect server for this module (overrides the conftest's session fixture)."""
    yield


@pytest.fixture(scope="module")
def chroma_client():
    return chromadb.EphemeralClient()


@pytest.fixture
def index(make_settings, embedder, chroma_client):
    """``index(repo, connector=None, **kwargs)`` -> the summary of one plain sync of
    ``repo`` as source ``src0``; ``index.store`` is the in-memory collection (one per
    test) and ``index.state`` the state store."""
    collection = f"t-{uuid.uuid4().hex[:12]}"  # EphemeralClients share one system
    opened: list[Pipeline] = []

    def run(repo, connector=None, **kwargs) -> SyncSummary:
        settings = make_settings(repo, sync={"reconcile_every": 0})
        pipeline = Pipeline(settings, embedder=embedder, store=ChromaStore(
            client=chroma_client, collection=collection))
        opened.append(pipeline)
        run.store, run.state = pipeline.store, pipeline.state
        connector = connector or settings.source("src0").build(settings)
        kwargs.setdefault("fetch", read_page)
        return index_source(pipeline, connector, SyncSummary(source="src0"), **kwargs)

    yield run
    for pipeline in opened:
        pipeline.close()


def chunks_by_doc(store: ChromaStore) -> dict[str, set[str]]:
    res = store.collection().get(include=["metadatas"])
    out: dict[str, set[str]] = {}
    for cid, meta in zip(res["ids"], res["metadatas"], strict=True):
        out.setdefault(meta["doc_id"], set()).add(cid)
    return out


def test_full_sync_indexes_every_document_then_a_noop_embeds_nothing(make_repo, index):
    repo = make_repo({"guide.md": long_markdown(sections=2), "app.py": "def main():\n"
                      "    return 42\n", "notes.txt": "plain notes about backups\n"})
    first = index(repo)
    held = chunks_by_doc(index.store)
    assert set(held) == {"src0:guide.md", "src0:app.py", "src0:notes.txt"}
    assert first.status == "completed" and first.documents_added == 3
    assert first.chunks_embedded == sum(len(ids) for ids in held.values())
    assert first.cursor_advanced and index.state.get("src0").cursor == {"commit": repo.head}

    again = index(repo, full=True)  # re-reads everything: every document is unchanged
    assert again.documents_unchanged == 3 and again.chunks_embedded == 0
    assert again.documents_added == again.documents_updated == again.documents_deleted == 0
    assert chunks_by_doc(index.store) == held


def test_an_edit_re_embeds_only_the_changed_chunks(make_repo, index):
    repo = make_repo({"guide.md": long_markdown(sections=4)})
    index(repo)
    before = chunks_by_doc(index.store)["src0:guide.md"]
    edited = long_markdown(sections=4).replace("Paragraph 1 about caching in section 3.",
                                               "Paragraph 1 about caching, rewritten.")
    repo.commit({"guide.md": edited})

    result = index(repo)
    after = chunks_by_doc(index.store)["src0:guide.md"]
    assert result.documents_updated == 1
    assert 0 < result.chunks_embedded == len(after - before) < len(after)
    assert result.chunks_deleted == len(before - after)
    assert result.chunks_reused == len(after & before)


def test_an_edit_rewrites_only_the_chunks_it_changes(make_repo, index):
    """Appending a paragraph adds a chunk and rewrites the head (the document's record:
    its new ``doc_hash`` and ``chunk_count``); the kept chunks are not rewritten for the
    document's new hash, and the document reads as current afterwards."""
    text = long_markdown(sections=4)
    repo = make_repo({"guide.md": text})
    index(repo)
    col = index.store.collection()
    old = {cid: m for cid, m in zip(*(lambda r: (r["ids"], r["metadatas"]))(
        col.get(include=["metadatas"])), strict=True)}
    old_hash = next(m["doc_hash"] for m in old.values() if m["chunk_index"] == 0)
    repo.commit({"guide.md": text + "\nA closing paragraph about the new on-call rota.\n"})

    result = index(repo)
    res = col.get(include=["metadatas"])
    new = dict(zip(res["ids"], res["metadatas"], strict=True))
    head = next(m for m in new.values() if m["chunk_index"] == 0)
    assert head["doc_hash"] != old_hash and head["chunk_count"] == len(new)
    kept = set(old) & set(new)
    assert result.chunks_reused == len(kept) and result.chunks_embedded == len(new) - len(kept)
    rewritten = {cid for cid in kept if new[cid]["doc_hash"] != old_hash}
    assert rewritten == {cid for cid in kept if new[cid]["chunk_index"] == 0}
    assert sorted(m["chunk_index"] for m in new.values()) == list(range(len(new)))

    again = index(repo, full=True)
    assert again.documents_unchanged == 1 and again.chunks_embedded == 0


def test_an_insertion_rewrites_the_chunks_it_moves(make_repo, index):
    """Text inserted at the top moves every later chunk: each kept chunk gets its new
    position (the index never holds two chunks at one position of a document)."""
    text = long_markdown(sections=3)
    repo = make_repo({"guide.md": text})
    index(repo)
    repo.commit({"guide.md": "Read this first: the handbook moved to the new wiki space.\n\n"
                 + text})

    result = index(repo)
    metas = index.store.collection().get(include=["metadatas"])["metadatas"]
    assert sorted(m["chunk_index"] for m in metas) == list(range(len(metas)))
    assert result.chunks_reused >= 1
    assert index(repo, full=True).documents_unchanged == 1


@pytest.mark.parametrize("crash", ["head not rewritten", "old head not deleted",
                                   "stale chunk not deleted"])
def test_an_edit_cut_short_in_chroma_reads_as_not_current(make_repo, index, crash):
    """The index as a crash inside ``flows.embed.write_batch`` leaves it (new chunks are
    added first, then the kept head's metadata is replaced, then stale chunks deleted):
    the next sync rewrites the document, and then it is current."""
    text = long_markdown(sections=3)
    repo = make_repo({"guide.md": text})
    index(repo)
    col = index.store.collection()
    old = col.get(include=["metadatas", "documents", "embeddings"])
    if crash == "old head not deleted":  # the first chunk changes: a new head is added
        edited = text.replace("Paragraph 0 about replication in section 0.",
                              "Paragraph 0 about replication in section 0, revised.")
    else:  # an appended paragraph: the head is kept, the last chunk replaced
        edited = text + "\nA closing paragraph about the new on-call rota.\n"
    repo.commit({"guide.md": edited})
    index(repo)
    new_ids = set(col.get()["ids"])
    new_head = col.get(where={"chunk_index": 0})["ids"]
    old_head = old["ids"][[m["chunk_index"] for m in old["metadatas"]].index(0)]
    gone = [i for i, cid in enumerate(old["ids"]) if cid not in new_ids]

    if crash == "head not rewritten":
        assert new_head == [old_head]
        col.update(ids=[old_head], metadatas=[old["metadatas"][old["ids"].index(old_head)]])
    else:
        want_head = crash == "old head not deleted"
        i = next(i for i in gone if (old["ids"][i] == old_head) == want_head)
        col.add(ids=[old["ids"][i]], embeddings=[old["embeddings"][i]],
                documents=[old["documents"][i]], metadatas=[old["metadatas"][i]])

    repaired = index(repo, full=True)
    assert repaired.documents_updated == 1 and repaired.chunks_embedded == 0
    assert set(col.get()["ids"]) == new_ids
    assert index(repo, full=True).documents_unchanged == 1


def test_a_deleted_document_leaves_the_index(make_repo, index):
    repo = make_repo({"a.md": "# A\n\nalpha text\n", "b.md": "# B\n\nbravo text\n"})
    index(repo)
    repo.commit(remove=["b.md"])

    result = index(repo)
    assert result.documents_deleted == 1 and result.chunks_deleted >= 1
    assert set(chunks_by_doc(index.store)) == {"src0:a.md"}
    assert index.state.get("src0").cursor == {"commit": repo.head}


def test_a_failing_document_holds_the_cursor(make_repo, make_settings, index):
    repo = make_repo({"a.md": "# A\n\nalpha text\n"})
    index(repo)
    old_cursor = index.state.get("src0").cursor
    repo.commit({"b.md": "# B\n\nbravo text\n", "c.md": "# C\n\ncharlie text\n"})

    settings = make_settings(repo)
    flaky = FailOneDocument(settings.source("src0").build(settings), "src0:b.md")
    held = index(repo, connector=flaky)
    assert held.status == "completed_with_failures" and held.documents_failed == 1
    assert not held.cursor_advanced and index.state.get("src0").cursor == old_cursor
    assert set(chunks_by_doc(index.store)) == {"src0:a.md", "src0:c.md"}

    healed = index(repo)  # the same request again: b.md is read, nothing else re-embedded
    assert healed.status == "completed" and healed.documents_added == 1
    assert set(chunks_by_doc(index.store)) == {"src0:a.md", "src0:b.md", "src0:c.md"}
    assert index.state.get("src0").cursor == {"commit": repo.head}
    assert index.state.issues("src0") == []


def test_a_fetch_step_that_fails_writes_what_was_read_and_keeps_the_cursor(make_repo, index):
    repo = make_repo({"a.md": "# A\n\nalpha text\n"})
    index(repo)
    old_cursor = index.state.get("src0").cursor
    repo.commit({"b.md": "# B\n\nbravo text\n"})
    calls = []

    def fetch_once(reader):
        calls.append(1)
        if len(calls) > 1:
            raise ConnectionError("the source went away")
        page = read_page(reader)
        page.cursor = None  # more pages would follow
        return page

    with pytest.raises(ConnectionError):
        index(repo, fetch=fetch_once)
    assert set(chunks_by_doc(index.store)) == {"src0:a.md", "src0:b.md"}  # salvaged
    assert index.state.get("src0").cursor == old_cursor


def test_an_index_cut_by_the_previous_chunking_is_re_chunked_by_the_next_sync(
        make_repo, make_settings, index, embedder):
    repo = make_repo({"guide.md": long_markdown(sections=3), "notes.txt": "backup notes\n"})
    index(repo)
    current = chunks_by_doc(index.store)
    settings = make_settings(repo, sync={"reconcile_every": 0})

    # Turn the index into what chunking version 1 wrote: every chunk text was
    # "title > heading path" + body (today's lexical text), ids hashed those texts,
    # document hashes had no chunking version in their salt, the lexical index had the
    # version of its time, and the state kept no chunking identity.
    col = index.store.collection()
    held = col.get(include=["documents", "metadatas"])
    docs = {d.id: d for page in settings.source("src0").build(settings).fetch(FetchRequest(), None)
            for d in page.documents}
    old_salt = f"{index.store.model}|{settings.chunking.model_dump_json()}"
    old_texts = [lexical_text(t, m) for t, m in zip(held["documents"], held["metadatas"],
                                                     strict=True)]
    old_ids = [chunk_id(m["doc_id"], t) for t, m in zip(old_texts, held["metadatas"],
                                                         strict=True)]
    old_metas = [{**m, "doc_hash": docs[m["doc_id"]].content_hash(old_salt)}
                 for m in held["metadatas"]]
    col.delete(ids=held["ids"])
    col.add(ids=old_ids, documents=old_texts, metadatas=old_metas,
            embeddings=embedder.encode(old_texts))
    lexical = LexicalIndex(settings.lexical_path)
    lexical.clear()
    lexical.add(old_ids, old_texts, old_metas)
    lexical.db.execute("UPDATE meta SET value = 'schema=1;analyzer=1' WHERE key = 'version'")
    lexical.close()
    with index.state.engine.begin() as conn:
        conn.execute(text("DELETE FROM source_chunking"))
    assert not set(old_ids) & {cid for ids in current.values() for cid in ids}

    again = index(repo)  # an ordinary sync; nothing changed at the source
    assert again.documents_updated == 2 and again.documents_unchanged == 0
    assert again.mode == "full"  # reported as what it was: a full read
    assert chunks_by_doc(index.store) == current  # today's chunks; the old ids are gone
    lexical = LexicalIndex(settings.lexical_path)
    assert lexical.current and lexical.ids() == {c for ids in current.values() for c in ids}
    lexical.close()

    after = index(repo)  # re-chunked once: the next sync is incremental again (a full read
    assert after.documents_unchanged == after.documents_updated == 0  # counts 2 unchanged)
    assert after.mode == "incremental"


def test_a_file_name_that_is_not_utf8_is_indexed_updated_and_deleted(make_repo, index):
    """A Latin-1 file name used to fail every sync of its source ("Invalid where clause":
    Chroma cannot filter on a string that is not UTF-8), so nothing else was indexed."""
    repo = make_repo({"ok.md": "# ok\n\nfine\n"})
    odd = repo.path / LATIN1_NAME
    odd.write_text("# Café\n\nfirst version\n", encoding="utf-8")
    repo.commit_all("a Latin-1 file name")
    first = index(repo)
    assert first.status == "completed" and first.documents_added == 2
    assert set(chunks_by_doc(index.store)) == {"src0:ok.md", "src0:caf\\xe9.md"}

    odd.write_text("# Café\n\nsecond version\n", encoding="utf-8")
    repo.commit_all("edit it")
    assert index(repo).documents_updated == 1
    held = index.store.collection().get(where={"doc_id": "src0:caf\\xe9.md"},
                                        include=["documents"])
    assert any("second version" in text for text in held["documents"])

    odd.unlink()
    repo.commit_all("remove it")
    assert index(repo).documents_deleted == 1
    assert set(chunks_by_doc(index.store)) == {"src0:ok.md"}

"""The lexical index beside Chroma, analysis, and the three retrieval modes."""

from __future__ import annotations

import chromadb
import pytest
from typer.testing import CliRunner

from connectors.lexical import LexicalIndex
from flows.cli import app
from flows.retrieve import hybrid_weights, retrieve
from flows.sync import Pipeline
from tests.test_sync import chunks_by_doc, collection, sync
from transforms.analysis import analyze, detect_language, split_identifier
from transforms.embedding import fertility_weight

RU_DOCS = {
    "docs/build.md": "# Сборка документации\n\nЧтобы собрать проект, запустите сборщик с "
                     "параметром выходной папки. Сборка создаёт статические HTML-страницы.\n",
    "docs/search.md": "# Поиск\n\nЛокальный поиск строится при сборке на основе индекса "
                      "lunr и работает без сервера.\n",
    "docs/deploy.md": "# Publishing\n\nUpload the generated site to an S3 bucket with the "
                      "publish command and an access key.\n",
    "src/config.py": "def load_max_file_bytes(settings):\n    return settings.maxFileBytes\n",
}


# ----------------------------------------------------------------------- analysis

def test_russian_word_forms_share_a_stem():
    forms = ["документация", "документации", "документацию", "документацией"]
    stems = {analyze(form)[0] for form in forms}
    assert len(stems) == 1
    assert analyze("сборки")[0] == analyze("сборка")[0] == analyze("сборку")[0]


def test_english_stems_identifiers_and_stop_words():
    assert analyze("the indexing of indexes")[:1] == analyze("indexed")[:1]
    assert "the" not in analyze("the index") and "и" not in analyze("поиск и сборка")
    assert split_identifier("getUserName") == ["get", "User", "Name"]
    assert split_identifier("HTTPServer") == ["HTTP", "Server"]
    terms = analyze("maxFileBytes")
    assert {"max", "file", "byte"} <= set(terms)  # parts are searchable, stemmed
    assert analyze("ёлка") == analyze("елка")


def test_language_detection():
    assert detect_language("Настройка сборки YAML-файлов") == "ru"
    assert detect_language("Configure the build of YAML files") == "en"


# ----------------------------------------------------------------- the index alone

def test_lexical_index_add_search_replace_delete(tmp_path):
    index = LexicalIndex(tmp_path / "lex.db")
    assert index.empty()
    meta = [{"doc_id": "a:1", "source": "a"}, {"doc_id": "a:2", "source": "a"},
            {"doc_id": "b:1", "source": "b"}]
    index.add(["c1", "c2", "c3"], ["сборка документации", "поиск lunr", "сборка S3"], meta)
    assert not index.empty()
    assert [h.chunk_id for h in index.search("сборку документацией", k=5)] == ["c1", "c3"]
    assert [h.chunk_id for h in index.search("сборку", source="b")] == ["c3"]

    index.add(["c1"], ["совсем другой текст"], [meta[0]])  # same id: replaced, not doubled
    assert index.count() == 3
    assert [h.chunk_id for h in index.search("документации")] == []

    index.delete(["c2"])
    index.delete_documents(["b:1"])
    assert index.ids() == {"c1"}
    assert index.current
    index.close()


# ----------------------------------------------------- kept in step with Chroma

def lexical_ids(settings) -> set[str]:
    index = LexicalIndex(settings.lexical_path)
    try:
        return index.ids()
    finally:
        index.close()


def chroma_ids(settings) -> set[str]:
    return set(collection(settings).get(include=[])["ids"])


def test_sync_keeps_lexical_and_chroma_in_step(make_repo, make_settings):
    repo = make_repo(RU_DOCS)
    settings = make_settings(repo)
    sync(settings)
    assert lexical_ids(settings) == chroma_ids(settings) != set()

    repo.commit({"docs/build.md": RU_DOCS["docs/build.md"] + "\nДобавлен раздел про кэш.\n"},
                remove=["docs/deploy.md"])
    result = sync(settings)
    assert result["documents_updated"] == 1 and result["documents_deleted"] == 1
    assert lexical_ids(settings) == chroma_ids(settings)
    assert "src0:docs/deploy.md" not in chunks_by_doc(settings)

    hits = retrieve(settings, "кэш", k=3, mode="lexical")
    assert hits and hits[0].doc_id == "src0:docs/build.md"


class FailingAdd:
    """The real chromadb collection, except that its next ``add`` fails, as if the
    Chroma server went away between the lexical write and the Chroma write."""

    def __init__(self, real):
        self._real = real
        self.armed = True

    def add(self, **kwargs):
        if self.armed:
            self.armed = False
            raise ConnectionError("simulated: Chroma unreachable during add")
        return self._real.add(**kwargs)

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_crash_between_lexical_and_chroma_writes_converges(make_repo, make_settings):
    repo = make_repo({"a.md": "# Первый\n\nТекст первого документа про репликацию.\n"})
    settings = make_settings(repo)
    sync(settings)
    repo.commit({"b.md": "# Второй\n\nНовый документ про резервное копирование.\n"})

    pipeline = Pipeline(settings)
    pipeline.store.collection()  # open it, then make its next add fail
    pipeline.store._collection = FailingAdd(pipeline.store._collection)
    with pytest.raises(ConnectionError):
        sync(settings, pipeline=pipeline)
    assert lexical_ids(settings) - chroma_ids(settings)  # written to one side only

    result = sync(settings)
    assert result["documents_added"] == 1
    assert lexical_ids(settings) == chroma_ids(settings)
    hits = retrieve(settings, "резервного копирования", k=2, mode="lexical")
    assert hits[0].doc_id == "src0:b.md"


def test_lost_lexical_index_is_rebuilt(make_repo, make_settings):
    repo = make_repo(RU_DOCS)
    settings = make_settings(repo)
    sync(settings)
    expected = chroma_ids(settings)
    for suffix in ("", "-wal", "-shm"):
        settings.lexical_path.with_name(settings.lexical_path.name + suffix).unlink(missing_ok=True)

    result = sync(settings)  # nothing changed at the source; the index comes back anyway
    assert result["chunks_embedded"] == 0
    assert lexical_ids(settings) == expected

    LexicalIndex(settings.lexical_path).clear()
    runner = CliRunner()
    out = runner.invoke(app, ["--data-dir", str(settings.data_dir), "reindex", "--lexical"])
    assert out.exit_code == 0, out.output
    assert f"{len(expected)} chunks" in out.output
    assert lexical_ids(settings) == expected


def test_reindex_takes_the_data_dir_lock_a_sync_takes(make_repo, make_settings, monkeypatch):
    """``reindex --lexical`` writes: against the embedded store it waits for the lock of
    a run in another process and is refused (nothing done) when it is not released."""
    import subprocess
    import sys

    repo = make_repo(RU_DOCS)
    settings = make_settings(repo)
    sync(settings)
    expected = lexical_ids(settings)
    LexicalIndex(settings.lexical_path).clear()
    lock = settings.chroma_path.with_name(settings.chroma_path.name + ".lock")
    holder = subprocess.Popen(  # another process's run, holding the data-dir lock
        [sys.executable, "-c", "import sys, time\nfrom filelock import FileLock\n"
         f"held = FileLock({str(lock)!r})\nheld.acquire()\nprint('held', flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("KBSYNC_SYNC__INDEX_LOCK_TIMEOUT_SECONDS", "1")
        out = CliRunner().invoke(app, ["--data-dir", str(settings.data_dir), "reindex",
                                       "--lexical"])
        assert out.exit_code != 0
        assert "in use by another process" in out.output and "chroma.url" in out.output
        assert lexical_ids(settings) == set()  # nothing was done
    finally:
        holder.kill()
        holder.wait()
    out = CliRunner().invoke(app, ["--data-dir", str(settings.data_dir), "reindex", "--lexical"])
    assert out.exit_code == 0, out.output
    assert lexical_ids(settings) == expected


# ------------------------------------------------------------- modes via the CLI

def test_each_mode_through_the_cli(make_repo, tmp_path):
    repo = make_repo(RU_DOCS)
    data = tmp_path / "cli-data"
    runner = CliRunner()
    assert runner.invoke(app, ["--data-dir", str(data), "sync", "--repo", str(repo.path),
                               "--name", "docs"]).exit_code == 0

    def top(question: str, mode: str) -> str:
        out = runner.invoke(app, ["--data-dir", str(data), "query", question, "--mode", mode,
                                  "-k", "2"])
        assert out.exit_code == 0, out.output
        return out.output.split("\n1.", 1)[1].splitlines()[0]

    # another word form of "сборка"/"документация" than the page uses
    assert "docs/build.md" in top("как собрать документацию", "lexical")
    assert "docs/build.md" in top("как собрать документацию", "hybrid")
    assert "docs/deploy.md" in top("upload the site to an S3 bucket", "dense")
    assert "docs/deploy.md" in top("upload the site to an S3 bucket", "hybrid")
    assert "lexical #" in top("локальный поиск без сервера", "hybrid")

    bad = runner.invoke(app, ["--data-dir", str(data), "query", "x", "--mode", "fuzzy"])
    assert bad.exit_code == 2 and "--mode must be one of" in bad.output


def test_lexical_rows_without_chroma_chunks_are_not_returned(make_repo, make_settings):
    repo = make_repo({"a.md": "# Alpha\n\nunique-word zebrafish appears here.\n"})
    settings = make_settings(repo)
    sync(settings)
    client = chromadb.PersistentClient(path=str(settings.chroma_path))
    col = client.get_collection("kbsync")
    col.delete(ids=col.get()["ids"])  # Chroma lost the chunks; the lexical rows remain
    assert retrieve(settings, "zebrafish", k=3, mode="lexical") == []


# ------------------------------------------------- query-adaptive dense weight

def test_fertility_weight_is_full_then_linear_then_zero():
    assert fertility_weight(1.3, 3.0, 3.8) == 1.0
    assert fertility_weight(3.0, 3.0, 3.8) == 1.0
    assert fertility_weight(3.4, 3.0, 3.8) == pytest.approx(0.5)
    assert fertility_weight(5.5, 3.0, 3.8) == 0.0
    assert fertility_weight(3.1, 3.0, 3.0) == 0.0  # a step when the bounds meet


def test_packaged_model_shreds_russian_but_not_english(embedder):
    en = embedder.fertility("How do I upload the site to an S3 bucket?")
    ru = embedder.fertility("Как загрузить сайт в бакет объектного хранилища?")
    assert en < 2.0 < 3.8 < ru
    assert embedder.fertility("") == 0.0


def test_hybrid_leans_on_lexical_for_queries_the_model_cannot_read(make_repo, make_settings):
    repo = make_repo(RU_DOCS)
    settings = make_settings(repo)
    sync(settings)
    question = "как собрать документацию"
    dense_w, lexical_w = hybrid_weights(settings, question)
    assert dense_w == 0.0 and lexical_w == 1.0
    hybrid = retrieve(settings, question, k=3, mode="hybrid")
    lexical = retrieve(settings, question, k=3, mode="lexical")
    assert [h.chunk_id for h in hybrid] == [h.chunk_id for h in lexical]
    assert all(set(h.ranks) == {"lexical"} for h in hybrid)

    english = "upload the site to an S3 bucket"
    assert hybrid_weights(settings, english) == (1.0, 1.0)
    fixed = settings.model_copy(update={"retrieval": settings.retrieval.model_copy(
        update={"adaptive_dense_weight": False})})
    assert hybrid_weights(fixed, question) == (1.0, 1.0)
    assert any("dense" in h.ranks for h in retrieve(fixed, question, k=3, mode="hybrid"))


# ------------------------------------------- full context for the lexical index only

RUNBOOK = {"ops/runbooks/failover.md": "# Кластер PostgreSQL\n\nОбзор кластера.\n\n"
                                       "## Переключение\n\nЗапустите команду switchover на "
                                       "реплике и дождитесь её повышения до ведущей.\n"}


def lexical_rows(settings) -> dict[str, str]:
    """chunk id -> the analysed terms the SQLite index holds for it."""
    index = LexicalIndex(settings.lexical_path)
    try:
        return dict(index.db.execute(
            "SELECT c.chunk_id, t.body FROM terms t JOIN chunks c ON c.rowid = t.rowid"))
    finally:
        index.close()


def test_lexical_index_reads_the_full_path_and_headings_and_a_rebuild_agrees(make_repo,
                                                                             make_settings):
    repo = make_repo(RUNBOOK)
    settings = make_settings(repo)
    sync(settings)
    res = collection(settings).get(include=["documents", "metadatas"])
    deep = {cid: text for cid, text, meta in zip(res["ids"], res["documents"], res["metadatas"],
                                                  strict=True)
            if meta["heading"] == "Кластер PostgreSQL > Переключение"}
    [text] = deep.values()
    # embedded: the short line (file name, nearest heading); no directory, no outer heading
    assert text.startswith("failover > Переключение\n\n")
    assert "runbooks" not in text and "Кластер" not in text
    # lexical: the whole path and heading path are searchable
    for query in ("runbooks переключение", "кластер switchover"):
        assert retrieve(settings, query, k=1, mode="lexical")[0].chunk_id in deep

    written = lexical_rows(settings)
    for suffix in ("", "-wal", "-shm"):  # lose the index: the next sync rebuilds it
        settings.lexical_path.with_name(settings.lexical_path.name + suffix).unlink(missing_ok=True)
    sync(settings)
    assert lexical_rows(settings) == written  # from Chroma's texts and metadata, the same


def test_a_lexical_index_of_another_version_is_rebuilt(make_repo, make_settings):
    repo = make_repo(RUNBOOK)
    settings = make_settings(repo)
    sync(settings)
    written = lexical_rows(settings)
    index = LexicalIndex(settings.lexical_path)
    index.clear()  # as if an older kbsync had written other rows under its own version
    index.db.execute("UPDATE meta SET value = 'schema=1;analyzer=1' WHERE key = 'version'")
    index.close()

    sync(settings)  # nothing changed at the source
    assert lexical_rows(settings) == written
    assert LexicalIndex(settings.lexical_path).current

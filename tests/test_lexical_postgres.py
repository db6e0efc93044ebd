"""The lexical index on PostgreSQL (``lexical.url``), on the real server at 127.0.0.1:5432:
each test gets its own database (``postgres_url`` fixture)."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from connectors.lexical import LexicalIndex, LexicalIndexError, open_index
from connectors.lexical_postgres import (
    PostgresLexicalIndex,
    to_tsquery_literal,
    to_tsvector_literal,
)
from flows.cli import app
from flows.retrieve import retrieve
from tests.test_lexical import RU_DOCS, chroma_ids
from tests.test_sync import sync
from transforms.analysis import analyze

META = [{"doc_id": "a:1", "source": "a"}, {"doc_id": "a:2", "source": "a"},
        {"doc_id": "b:1", "source": "b"}]
TEXTS = ["сборка документации", "поиск lunr", "сборка S3"]


def test_tsvector_literal_keeps_our_terms_and_frequencies():
    assert to_tsvector_literal(["max_file_bytes", "max", "max"]) == "'max_file_bytes':1 'max':2,3"
    assert to_tsvector_literal(["o'neil"]) == "'o''neil':1"
    assert to_tsquery_literal(["a", "b"]) == "'a' | 'b'"


def test_add_search_replace_delete_like_sqlite(postgres_url, tmp_path):
    index = open_index(postgres_url)
    assert isinstance(index, PostgresLexicalIndex) and "postgresql" in index.path
    assert index.empty()
    index.add(["c1", "c2", "c3"], TEXTS, META)
    assert not index.empty()
    assert [h.chunk_id for h in index.search("сборку документацией", k=5)] == ["c1", "c3"]
    assert [h.chunk_id for h in index.search("сборку", source="b")] == ["c3"]
    assert index.search("the and") == []  # only stop words: nothing to search

    index.add(["c1"], ["совсем другой текст"], [META[0]])  # same id: replaced, not doubled
    assert index.count() == 3
    assert [h.chunk_id for h in index.search("документации")] == []

    index.delete(["c2"])
    index.delete_documents(["b:1"])
    assert index.ids() == {"c1"} and index.current
    index.clear()
    assert index.count() == 0 and index.empty()
    index.close()


def test_identifiers_stay_whole_as_in_fts5(postgres_url):
    index = open_index(postgres_url)
    index.add(["x"], ["def load(settings): return settings.max_file_bytes"],
              [{"doc_id": "d", "source": "s"}])
    assert [h.chunk_id for h in index.search("max_file_bytes")] == ["x"]
    assert [h.chunk_id for h in index.search("file")] == ["x"]  # parts too
    index.close()


def test_bm25_scores_match_sqlite_fts5(postgres_url, tmp_path):
    """Same analysis, same formula: the ranking and the scores equal FTS5's."""
    texts = ["репликация базы данных и резервное копирование базы",
             "резервное копирование файлов на диск",
             "репликация репликация репликация кластера",
             "мониторинг кластера и алерты",
             "база данных PostgreSQL: репликация логическая и физическая, слоты репликации"]
    ids = [f"c{i}" for i in range(len(texts))]
    meta = [{"doc_id": i, "source": "s"} for i in ids]
    pg, lite = open_index(postgres_url), LexicalIndex(tmp_path / "lex.db")
    for index in (pg, lite):
        index.add(ids, texts, meta)
    for query in ("репликация базы", "резервное копирование кластера", "мониторинг"):
        a, b = pg.search(query), lite.search(query)
        assert [h.chunk_id for h in a] == [h.chunk_id for h in b], query
        assert [h.score for h in a] == pytest.approx([h.score for h in b], rel=1e-6), query
    pg.close()
    lite.close()


def test_ts_rank_cd_ranking_is_available(postgres_url):
    index = PostgresLexicalIndex(postgres_url, ranking="ts_rank_cd")
    index.add(["c1", "c2", "c3"], TEXTS, META)
    assert {h.chunk_id for h in index.search("сборка")} == {"c1", "c3"}
    index.close()


def test_one_page_is_one_transaction(postgres_url):
    index = open_index(postgres_url)
    index.add(["c1"], ["первый"], [META[0]])
    with pytest.raises(ValueError):  # the third row is malformed: nothing of the page lands
        index.add(["c2", "c3", "c4"], ["второй", "третий"], META)
    assert index.ids() == {"c1"}
    index.close()


def test_unreachable_server_is_a_clear_error_without_the_password():
    with pytest.raises(LexicalIndexError) as err:
        open_index("postgresql+psycopg://kb:s3cret@127.0.0.1:1/nowhere")
    assert "s3cret" not in str(err.value) and "127.0.0.1" in str(err.value)


def test_sync_query_and_reindex_with_lexical_url(make_repo, make_settings, postgres_url):
    repo = make_repo(RU_DOCS)
    settings = make_settings(repo, lexical={"url": postgres_url})
    sync(settings)
    assert not settings.lexical_path.exists()  # nothing written to the SQLite file
    pg = open_index(postgres_url)
    assert pg.ids() == chroma_ids(settings) != set()

    repo.commit({"docs/build.md": RU_DOCS["docs/build.md"] + "\nДобавлен раздел про кэш.\n"},
                remove=["docs/deploy.md"])
    sync(settings)
    assert pg.ids() == chroma_ids(settings)
    hits = retrieve(settings, "кэш", k=3, mode="lexical")
    assert hits and hits[0].doc_id == "src0:docs/build.md"
    assert retrieve(settings, "как собрать документацию", k=3, mode="hybrid")[0].doc_id == \
        "src0:docs/build.md"

    # lost rows come back: at the next sync (empty index) and by `kbsync reindex --lexical`
    pg.clear()
    sync(settings)
    assert pg.ids() == chroma_ids(settings)
    with create_engine(postgres_url).begin() as conn:
        conn.execute(text("DELETE FROM lexical_chunks"))
    config = settings.data_dir.parent / "kbsync.yaml"
    config.write_text(f"data_dir: {settings.data_dir}\nlexical:\n  url: {postgres_url}\n")
    out = CliRunner().invoke(app, ["--config", str(config), "reindex", "--lexical"])
    assert out.exit_code == 0, out.output
    assert pg.ids() == chroma_ids(settings) and "postgresql" in out.output
    pg.close()


def test_rows_hold_the_full_title_and_heading_path_like_sqlite(postgres_url, tmp_path):
    # the chunk text starts with the short embedded line; title and heading come from
    # the chunk's metadata (transforms.context.lexical_text), in both backends
    chunk_text = "failover > Переключение\n\nЗапустите switchover на реплике."
    meta = [{"doc_id": "s:ops/runbooks/failover.md", "source": "s",
             "title": "ops/runbooks/failover.md", "heading": "Кластер > Переключение"}]
    sqlite = LexicalIndex(tmp_path / "lex.db")
    pg = open_index(postgres_url)
    for index in (sqlite, pg):
        index.add(["c1"], [chunk_text], meta)
        assert [h.chunk_id for h in index.search("runbooks кластера")] == ["c1"]
        assert [h.chunk_id for h in index.search("failover")] == ["c1"]  # the path's name
    expected = analyze("ops/runbooks/failover.md > Кластер > Переключение\n\n"
                       "Запустите switchover на реплике.")  # the short line replaced
    [[body]] = sqlite.db.execute("SELECT body FROM terms").fetchall()
    assert body.split() == expected
    with create_engine(postgres_url).connect() as conn:
        assert conn.execute(text("SELECT length FROM lexical_chunks")).scalar_one() == \
            len(expected)
    sqlite.close()
    pg.close()

"""connectors/git.py against real repositories (no flow, no index)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import git
import pytest

from connectors.base import ConnectorError, FetchRequest
from connectors.git import GitConnector, GitSourceOptions, classify_path
from tests.conftest import LATIN1_NAME


def connector(path, tmp_path, **options) -> GitConnector:
    return GitConnector(GitSourceOptions(name="code", url=str(path), **options),
                        data_dir=tmp_path / "data")


def read_all(conn, request=FetchRequest(), checkpoint=None):
    pages = list(conn.fetch(request, checkpoint))
    docs = {d.id: d for p in pages for d in p.documents}
    deletions = [x for p in pages for x in p.deletions]
    issues = {i.doc_id: i for p in pages for i in p.issues}
    return pages, docs, deletions, issues


def test_first_read_returns_every_eligible_file_at_head(make_repo, tmp_path):
    repo = make_repo({
        "README.md": "# Hello\n\nSome text.\n",
        "src/app.py": "def main():\n    return 1\n",
        "notes.txt": "plain notes\n",
        "vendor/lib.js": "var x = 1;\n",
    })
    conn = connector(repo.path, tmp_path, exclude=["vendor/**"])
    pages, docs, deletions, issues = read_all(conn)

    assert set(docs) == {"code:README.md", "code:src/app.py", "code:notes.txt"}
    assert deletions == [] and issues == {}
    assert pages[-1].cursor == {"commit": repo.head}
    app = docs["code:src/app.py"]
    assert app.format == "code" and app.language == "python"
    assert app.metadata["path"] == "src/app.py"
    assert app.metadata["last_commit"] == repo.head
    assert app.updated_at.tzinfo is not None
    assert app.url == (repo.path / "src/app.py").resolve().as_uri()
    assert docs["code:README.md"].format == "markdown"


def test_uncommitted_changes_are_not_read(make_repo, tmp_path):
    repo = make_repo({"a.md": "committed\n"})
    (repo.path / "a.md").write_text("dirty working tree\n")
    (repo.path / "untracked.md").write_text("untracked\n")
    _, docs, _, _ = read_all(connector(repo.path, tmp_path))
    assert set(docs) == {"code:a.md"}
    assert docs["code:a.md"].text == "committed\n"


def test_skips_binary_oversized_invalid_utf8_and_empty_with_reasons(make_repo, tmp_path):
    repo = make_repo({
        "ok.md": "fine\n",
        "logo.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64),
        "big.txt": "x" * 5000,
        "latin1.txt": "caf\xe9 au lait".encode("latin-1"),
        "empty.py": "",
    })
    _, docs, _, issues = read_all(connector(repo.path, tmp_path, max_file_bytes=4096))
    assert set(docs) == {"code:ok.md"}
    assert issues["code:logo.png"].reason == "binary file"
    assert "over the size limit (5000 bytes > 4096)" in issues["code:big.txt"].reason
    assert "not valid UTF-8" in issues["code:latin1.txt"].reason
    assert issues["code:empty.py"].reason == "empty file"
    assert {i.kind for i in issues.values()} == {"skipped"}


def test_a_file_name_that_is_not_utf8_is_read_changed_and_deleted(make_repo, tmp_path):
    """An old repository's Latin-1 file name (git keeps a name's bytes as they are): the
    file is indexed under an id that writes the undecodable byte as ``\\xe9``, and its
    change and its deletion reach that same id. GitPython's own diff drops the whole
    diff on such a name, the edit of ``ok.md`` beside it included."""
    repo = make_repo({"ok.md": "# ok\n\nfine\n"})
    odd = repo.path / LATIN1_NAME
    odd.write_text("# Café\n\nfirst version\n", encoding="utf-8")
    repo.commit_all("a Latin-1 file name")
    conn = connector(repo.path, tmp_path)
    pages, docs, _, issues = read_all(conn)
    assert set(docs) == {"code:ok.md", "code:caf\\xe9.md"} and issues == {}
    doc = docs["code:caf\\xe9.md"]
    assert doc.title == doc.metadata["path"] == "caf\\xe9.md"
    assert doc.url.endswith("/caf%E9.md")
    assert conn.list_ids().ids == set(docs)

    odd.write_text("# Café\n\nsecond version\n", encoding="utf-8")
    (repo.path / "ok.md").write_text("# ok\n\nstill fine\n", encoding="utf-8")
    repo.commit_all("edit both")
    later, docs, deletions, _ = read_all(conn, FetchRequest(cursor=pages[-1].cursor))
    assert set(docs) == {"code:ok.md", "code:caf\\xe9.md"} and deletions == []
    assert "second version" in docs["code:caf\\xe9.md"].text

    odd.unlink()
    repo.commit_all("remove it")
    _, docs, deletions, _ = read_all(conn, FetchRequest(cursor=later[-1].cursor))
    assert deletions == ["code:caf\\xe9.md"] and docs == {}
    assert conn.list_ids().ids == {"code:ok.md"}


def test_incremental_diff_modified_added_deleted_renamed(make_repo, tmp_path):
    repo = make_repo({"keep.md": "keep\n", "edit.md": "v1\n", "gone.md": "bye\n",
                      "old/name.md": "moving file\n"})
    first = repo.head
    repo.commit({"edit.md": "v2\n", "new.md": "new\n"}, remove=["gone.md"],
                move={"old/name.md": "new/name.md"})
    conn = connector(repo.path, tmp_path)
    pages, docs, deletions, _ = read_all(conn, FetchRequest(cursor={"commit": first}))

    assert set(docs) == {"code:edit.md", "code:new.md", "code:new/name.md"}
    assert docs["code:edit.md"].text == "v2\n"
    assert sorted(deletions) == ["code:gone.md", "code:old/name.md"]
    assert pages[-1].cursor == {"commit": repo.head}


def test_no_new_commits_yields_one_empty_page_with_the_cursor(make_repo, tmp_path):
    repo = make_repo({"a.md": "a\n"})
    pages, docs, deletions, _ = read_all(connector(repo.path, tmp_path),
                                         FetchRequest(cursor={"commit": repo.head}))
    assert len(pages) == 1 and not docs and not deletions
    assert pages[0].cursor == {"commit": repo.head}


def test_pages_and_resume_from_checkpoint(make_repo, tmp_path):
    repo = make_repo({f"doc{i:02d}.md": f"document {i}\n" for i in range(7)})
    conn = connector(repo.path, tmp_path, page_size=3)
    pages, docs, _, _ = read_all(conn)
    assert [len(p.documents) for p in pages] == [3, 3, 1]
    assert [p.cursor for p in pages[:-1]] == [None, None]

    # a new commit after the first page: the resumed run still finishes the old target
    repo.commit({"late.md": "late\n"})
    resumed, rdocs, _, _ = read_all(conn, checkpoint=pages[0].checkpoint)
    assert set(rdocs) == {f"code:doc{i:02d}.md" for i in range(3, 7)}
    assert resumed[-1].cursor == pages[-1].cursor

    # resuming after the last page still hands back the cursor
    end, _, _, _ = read_all(conn, checkpoint=pages[-1].checkpoint)
    assert end[-1].cursor == pages[-1].cursor


def test_last_commit_date_is_per_file(make_repo, tmp_path):
    repo = make_repo()
    old = datetime(2021, 3, 4, 5, 6, 7, tzinfo=UTC)
    repo.commit({"old.md": "old\n"}, when=old)
    repo.commit({"new.md": "new\n"})
    _, docs, _, _ = read_all(connector(repo.path, tmp_path))
    assert docs["code:old.md"].updated_at == old
    assert docs["code:new.md"].updated_at > old + timedelta(days=365)


def test_lost_cursor_commit_falls_back_to_full_read(make_repo, tmp_path):
    repo = make_repo({"a.md": "a\n", "b.md": "b\n"})
    _, docs, _, _ = read_all(connector(repo.path, tmp_path),
                             FetchRequest(cursor={"commit": "0" * 40}))
    assert set(docs) == {"code:a.md", "code:b.md"}


def test_backfill_window_reads_files_touched_in_it(make_repo, tmp_path):
    repo = make_repo()
    for when, files in [(datetime(2020, 1, 1, tzinfo=UTC), {"a.md": "a\n"}),
                        (datetime(2022, 6, 1, tzinfo=UTC), {"b.md": "b\n"}),
                        (datetime(2024, 1, 1, tzinfo=UTC), {"c.md": "c\n"})]:
        repo.commit(files, when=when)
    request = FetchRequest(since=datetime(2022, 1, 1, tzinfo=UTC),
                           until=datetime(2023, 1, 1, tzinfo=UTC))
    _, docs, _, _ = read_all(connector(repo.path, tmp_path), request)
    assert set(docs) == {"code:b.md"}


def test_clone_url_is_cloned_then_fetched(make_repo, tmp_path):
    origin = make_repo({"a.md": "one\n"})
    bare = tmp_path / "origin.git"
    git.Repo.clone_from(origin.path, bare, bare=True)
    conn = connector(f"file://{bare}", tmp_path)
    _, docs, _, _ = read_all(conn)
    assert set(docs) == {"code:a.md"}
    assert (tmp_path / "data" / "git" / "code.git" / "HEAD").exists()

    origin.commit({"b.md": "two\n"})
    origin.repo.git.push(str(bare), "main")
    conn2 = connector(f"file://{bare}", tmp_path)
    _, docs2, _, _ = read_all(conn2, FetchRequest(cursor={"commit": docs["code:a.md"].metadata["last_commit"]}))
    assert set(docs2) == {"code:b.md"}


def test_token_never_appears_in_errors(tmp_path):
    token = "glpat-SECRET-token-123"
    conn = connector("https://127.0.0.1:9/group/project.git", tmp_path, token=token)
    with pytest.raises(ConnectorError) as err:
        conn.head()
    message = str(err.value)
    basic = base64.b64encode(f"oauth2:{token}".encode()).decode()
    assert token not in message and basic not in message
    assert "cannot clone or fetch https://127.0.0.1:9/group/project.git" in message


def test_credentials_in_url_are_redacted_in_errors(tmp_path):
    conn = connector("https://user:hunter2@127.0.0.1:9/p.git", tmp_path)
    with pytest.raises(ConnectorError) as err:
        conn.head()
    assert "hunter2" not in str(err.value)


def test_not_a_repository_and_missing_branch(tmp_path, make_repo):
    with pytest.raises(ConnectorError, match="not a git repository"):
        connector(tmp_path / "nowhere", tmp_path).head()
    repo = make_repo({"a.md": "a\n"})
    with pytest.raises(ConnectorError, match="branch 'nope' not found"):
        connector(repo.path, tmp_path, branch="nope").head()


def test_named_branch_is_synced(make_repo, tmp_path):
    repo = make_repo({"a.md": "main\n"})
    repo.repo.git.checkout("-b", "docs")
    repo.commit({"b.md": "docs only\n"})
    repo.repo.git.checkout("main")
    _, docs, _, _ = read_all(connector(repo.path, tmp_path, branch="docs"))
    assert set(docs) == {"code:a.md", "code:b.md"}


def test_list_ids_and_web_url_template(make_repo, tmp_path):
    repo = make_repo({"a.md": "a\n", "skip/b.md": "b\n"})
    conn = connector(repo.path, tmp_path, exclude=["skip/"],
                     web_url="https://gitlab.example.com/g/p/-/blob/{commit}/{path}")
    listing = conn.list_ids()
    assert listing.complete and listing.ids == {"code:a.md"}
    _, docs, _, _ = read_all(conn)
    assert docs["code:a.md"].url == f"https://gitlab.example.com/g/p/-/blob/{repo.head}/a.md"


@pytest.mark.parametrize("path,expected", [
    ("docs/guide.md", ("markdown", "markdown")),
    ("x/y.py", ("code", "python")),
    ("Dockerfile", ("text", "dockerfile")),
    ("config.yaml", ("text", "yaml")),
    ("LICENSE", ("text", None)),
])
def test_classify_path(path, expected):
    assert classify_path(path) == expected


@pytest.mark.parametrize("incremental", [False, True], ids=["first read", "diff"])
def test_symlinks_and_submodules_are_skipped_and_files_in_folders_read(
        make_repo, tmp_path, incremental):
    """A symbolic link and a submodule (gitlink) are skipped with a reason, on a first
    read (tree lookups) and on an incremental one (the diff's own blobs); files in
    nested folders are read whole either way."""
    repo = make_repo({"README.md": "# Hello\n\nSome text.\n"})
    conn = connector(repo.path, tmp_path)
    cursor = read_all(conn)[0][-1].cursor if incremental else None
    repo.commit({"docs/a/one.md": "one\n", "docs/a/two.md": "two\n", "docs/b/three.md": "3\n"})
    g = git.Repo(repo.path)
    (repo.path / "link.md").symlink_to("README.md")
    g.git.add("link.md")
    g.git.update_index("--add", "--cacheinfo", f"160000,{g.head.commit.hexsha},vendored")
    g.index.write()
    g.git.commit("-m", "link and submodule")

    request = FetchRequest(cursor=cursor) if incremental else FetchRequest()
    pages, docs, deletions, issues = read_all(connector(repo.path, tmp_path), request)
    assert {d: docs[d].text for d in docs if d.startswith("code:docs/")} == {
        "code:docs/a/one.md": "one\n", "code:docs/a/two.md": "two\n",
        "code:docs/b/three.md": "3\n"}
    assert issues["code:link.md"].kind == "skipped" and "link" in issues["code:link.md"].reason
    assert "code:vendored" not in docs
    assert pages[-1].cursor == {"commit": g.head.commit.hexsha}

"""flows/settings.py and flows/state.py (SQLite and a real Postgres)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from flows.settings import ConfigError, load_settings
from flows.state import StateStore

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_is_valid(monkeypatch):
    settings = load_settings(ROOT / "kbsync.example.yaml")
    assert [s.name for s in settings.sources] == ["kbsync"]
    assert settings.embedding.model == "sentence-transformers/all-MiniLM-L6-v2"


def test_environment_overrides_file_and_interpolates(tmp_path, monkeypatch):
    config = tmp_path / "k.yaml"
    config.write_text("chroma: {collection: from-file}\n"
                      "sources:\n  - {type: git, name: a, url: '${REPO_DIR:-/srv/repo}', "
                      "token: '${GIT_TOKEN}'}\n")
    monkeypatch.setenv("GIT_TOKEN", "s3cret")
    monkeypatch.setenv("KBSYNC_CHROMA__COLLECTION", "from-env")
    monkeypatch.setenv("KBSYNC_STATE_URL", "sqlite:////tmp/x.db")
    settings = load_settings(config)
    assert settings.chroma.collection == "from-env"
    assert settings.resolved_state_url == "sqlite:////tmp/x.db"
    source = settings.sources[0]
    assert source.url == "/srv/repo"
    assert source.token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "b.yaml"
    bad.write_text("sources:\n  - {name: x, url: .}\n  - {type: git, name: x, url: .}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(bad)
    assert "sources[0] (x): missing 'type'" in str(err.value)

    dup = tmp_path / "d.yaml"
    dup.write_text("sources:\n  - {type: git, name: x, url: .}\n  - {type: git, name: x, url: .}\n")
    with pytest.raises(ConfigError, match="source name 'x' is used twice"):
        load_settings(dup)

    yaml_error = tmp_path / "y.yaml"
    yaml_error.write_text("sources: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(yaml_error)

    with pytest.raises(ConfigError, match="unknown source 'nope'"):
        load_settings().source("nope")


def _exercise(store: StateStore, name: str) -> None:
    assert store.get(name).cursor is None
    store.save_checkpoint(name, "req-1", {"offset": 100})
    assert store.checkpoint_for(name, "req-1") == {"offset": 100}
    assert store.checkpoint_for(name, "req-2") is None  # another request never resumes it
    store.record_issues(name, [("d1", "failed", "HTTP 503", "Doc 1"),
                               ("d2", "skipped", "binary file", "")])
    store.record_issues(name, [("d1", "failed", "HTTP 502", "Doc 1")])
    issues = {i.doc_id: i for i in store.issues(name)}
    assert issues["d1"].attempts == 2 and issues["d1"].reason == "HTTP 502"
    assert store.issue_counts()[(name, "failed")] == 1

    store.finish_run(name, status="completed_with_failures", summary={"n": 1},
                     cursor={"commit": "abc"}, advance_cursor=False)
    state = store.get(name)
    assert state.cursor is None and state.checkpoint == {"offset": 100}
    assert state.last_success_at is None

    store.clear_issues(name, ["d1"])
    store.finish_run(name, status="completed", summary={"n": 2}, cursor={"commit": "abc"},
                     advance_cursor=True)
    state = store.get(name)
    assert state.cursor == {"commit": "abc"} and state.checkpoint is None
    assert state.last_success_at is not None and state.last_success_at.tzinfo is not None
    assert state.syncs_since_reconcile == 1
    assert [i.doc_id for i in store.issues(name)] == ["d2"]
    assert name in store.names()


def _exercise_lock(store: StateStore, name: str) -> None:
    assert store.acquire_lock(name, "run-a", 600) is None
    assert store.acquire_lock(name, "run-a", 600) is None  # the holder may take it again
    held = store.acquire_lock(name, "run-b", 600)
    assert held is not None and held.owner == "run-a" and held.expires_at.tzinfo is not None
    assert store.renew_lock(name, "run-a", 600) and not store.renew_lock(name, "run-b", 600)
    store.release_lock(name, "run-b")  # not b's: nothing happens
    assert store.lock(name).owner == "run-a"
    store.release_lock(name, "run-a")
    assert store.lock(name) is None
    assert store.acquire_lock(name, "run-b", -1) is None  # a lease that has already run out
    assert store.acquire_lock(name, "run-c", 600) is None  # ... is taken over
    assert not store.renew_lock(name, "run-b", 600)  # and b learns it lost it
    store.release_lock(name, "run-c")
    assert store.lock(name) is None


def test_sqlite_state_store(tmp_path):
    store = StateStore(f"sqlite:///{tmp_path / 'nested' / 'state.db'}")
    _exercise(store, "src")
    _exercise_lock(store, "src")
    # a second process sees the same state
    assert StateStore(store.url).get("src").cursor == {"commit": "abc"}


def test_postgres_state_store():
    url = os.environ.get("KBSYNC_TEST_POSTGRES_URL",
                         "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    try:
        store = StateStore(url)
        store.names()
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("KBSYNC_REQUIRE_POSTGRES") == "1":
            raise
        pytest.skip(f"no Postgres at {url}: {type(exc).__name__}")
    name = f"pg-{uuid.uuid4().hex[:8]}"
    try:
        _exercise(store, name)
        _exercise_lock(store, name)
    finally:
        store.release_lock(name, "run-a")
        store.reset(name)
        store.close()

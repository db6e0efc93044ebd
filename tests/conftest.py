"""Shared fixtures: a real Prefect test server, real git repositories, real Chroma.

Everything here is real: ``prefect_test_harness`` runs a temporary Prefect server
(SQLite) for the whole session, repositories are built with GitPython in temp dirs,
Chroma is an embedded ``PersistentClient`` under each test's data dir, and the
embedding model is the packaged all-MiniLM-L6-v2 (loaded once per session).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="kbsync-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
# the ONNX query exports (embedding.onnx_cache default): one per session, not the user's
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="kbsync-cache-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
for _var in ("KBSYNC_CONFIG", "KBSYNC_STATE_URL", "KBSYNC_DATA_DIR", "KBSYNC_SOURCES"):
    os.environ.pop(_var, None)

import git  # noqa: E402

import flows  # noqa: E402,F401 - telemetry-off defaults before prefect is imported
from flows.settings import Settings  # noqa: E402

REALDATA = Path(os.environ.get("KBSYNC_REALDATA", Path(__file__).resolve().parents[2] / "shared"
                               / "realdata"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``realdata`` are skipped, not failed, where the shared real data is
    absent (a fresh checkout without ``../shared/realdata``, ``KBSYNC_REALDATA`` unset).
    Where it is present they run, and a file missing from it fails the test."""
    if REALDATA.is_dir():
        return
    skip = pytest.mark.skip(reason=f"no shared real data at {REALDATA} (set KBSYNC_REALDATA)")
    for item in items:
        if item.get_closest_marker("realdata"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """One temporary Prefect server (real API, SQLite) for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Each test runs in its own directory, so no stray ./kbsync.yaml is picked up."""
    monkeypatch.chdir(tmp_path)


#: ``café.md`` with its name in Latin-1, as an old repository holds it: git keeps a file
#: name's bytes as they are, and Python decodes the byte that is not UTF-8 to a lone
#: surrogate (``surrogateescape``).
LATIN1_NAME = os.fsdecode(b"caf\xe9.md")


class Repo:
    """A real git repository in a temp dir, with helpers to commit files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.repo = git.Repo.init(path, initial_branch="main")
        with self.repo.config_writer() as cfg:
            cfg.set_value("user", "name", "Test Author")
            cfg.set_value("user", "email", "author@example.com")

    def write(self, files: dict[str, str | bytes]) -> None:
        for rel, content in files.items():
            target = self.path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")

    def commit(self, files: dict[str, str | bytes] | None = None, message: str = "change",
               remove: list[str] | None = None, move: dict[str, str] | None = None,
               when: datetime | None = None) -> str:
        if files:
            self.write(files)
            self.repo.index.add(list(files))
        for old, new in (move or {}).items():
            (self.path / new).parent.mkdir(parents=True, exist_ok=True)
            self.repo.git.mv(old, new)
        if remove:
            self.repo.index.remove(remove, working_tree=True)
        dates = {}
        if when is not None:
            stamp = f"{int(when.timestamp())} +0000"
            dates = {"author_date": stamp, "commit_date": stamp}
        return self.repo.index.commit(message, **dates).hexsha

    def commit_all(self, message: str = "change") -> str:
        """``git add -A`` and commit with git itself: for files GitPython's index cannot
        name (a file name that is not UTF-8, :data:`LATIN1_NAME`)."""
        self.repo.git.add("-A")
        self.repo.git.commit("-q", "-m", message)
        return self.head

    @property
    def head(self) -> str:
        return self.repo.head.commit.hexsha


@pytest.fixture
def make_repo(tmp_path) -> Callable[..., Repo]:
    counter = {"n": 0}

    def factory(files: dict[str, str | bytes] | None = None, name: str | None = None) -> Repo:
        counter["n"] += 1
        repo = Repo(tmp_path / (name or f"repo{counter['n']}"))
        if files:
            repo.commit(files, "initial")
        return repo

    return factory


@pytest.fixture
def make_settings(tmp_path) -> Callable[..., Settings]:
    """Settings with a git source per repository, everything under ``tmp_path/data``."""

    def factory(*repos: Repo | str, names: list[str] | None = None,
                source: dict[str, Any] | None = None, **overrides: Any) -> Settings:
        sources = []
        for i, repo in enumerate(repos):
            url = str(repo.path) if isinstance(repo, Repo) else repo
            sources.append({"type": "git", "name": names[i] if names else f"src{i}",
                            "url": url, **(source or {})})
        data = {"data_dir": tmp_path / "data", "sources": sources,
                "sync": {"fetch_retry_delay_seconds": 0, "fetch_retries": 1}}
        data.update(overrides)
        return Settings(**data)

    return factory


@pytest.fixture(scope="session")
def embedder():
    from transforms.embedding import EmbedderSpec, load_embedder

    return load_embedder(EmbedderSpec())


def long_markdown(sections: int = 12, paragraphs: int = 3) -> str:
    """A long Markdown document with distinct paragraphs (several chunks per section)."""
    topics = ["replication", "backups", "indexing", "caching", "sharding", "monitoring",
              "alerting", "deployment", "rollbacks", "migrations", "quotas", "auditing",
              "encryption", "tokens", "retention", "compaction"]
    out = ["# Operations handbook", ""]
    for s in range(sections):
        topic = topics[s % len(topics)]
        out += [f"## {topic.title()} ({s})", ""]
        for p in range(paragraphs):
            out.append(
                f"Paragraph {p} about {topic} in section {s}. The {topic} procedure requires "
                f"the on-call engineer to verify step {p} before continuing, record the "
                f"outcome in the run book, and notify the owning team of section {s} when "
                f"the {topic} job finishes. Unexpected results in {topic} must be escalated "
                f"within {15 + p} minutes, with logs attached and the ticket linked."
            )
            out.append("")
    return "\n".join(out)


@pytest.fixture(scope="session")
def llm_server(tmp_path_factory):
    """One real llama-cpp-python server on the packaged SmolLM2-135M-Instruct model for
    the whole session (``--n_ctx 2048 --n_threads 2 --n_threads_batch 2``).

    Skips when llama-cpp-python is not installed, unless ``KBSYNC_REQUIRE_LLM=1`` (set
    by ``.ci/run``), where a missing server fails the tests.
    """
    from importlib.util import find_spec

    from connectors.llm_server import StandinServer

    if find_spec("llama_cpp") is None:
        if os.environ.get("KBSYNC_REQUIRE_LLM") == "1":
            pytest.fail("llama-cpp-python is not installed (KBSYNC_REQUIRE_LLM=1)")
        pytest.skip("llama-cpp-python is not installed (`make install` builds it)")
    server = StandinServer(threads=2, log_path=tmp_path_factory.mktemp("llm") / "server.log",
                           alias="smollm2-test")
    server.start()
    yield server
    server.stop()


#: The shared PostgreSQL server the tests use (``KBSYNC_TEST_POSTGRES`` overrides).
TEST_POSTGRES = os.environ.get("KBSYNC_TEST_POSTGRES",
                               "postgresql+psycopg://postgres@127.0.0.1:5432")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database with a random name on the real PostgreSQL server, dropped after
    the test; yields its SQLAlchemy URL."""
    from fakes.postgres import temporary_database

    with temporary_database(TEST_POSTGRES) as url:
        yield url

"""Leases that die with their run (issue 13): a holder that is provably gone is taken
over at once, a live one keeps its lease by a heartbeat, ``kbsync unlock`` releases one,
and the embedded index serializes runs of different processes.

Real parts only: SQLite and a database of its own on the real PostgreSQL, real
processes killed with SIGKILL, the session's real Prefect server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.state import (
    LeaseHeartbeat,
    LeaseLost,
    SourceLock,
    StateStore,
    lease_holder_gone,
    lease_owner,
)
from flows.sync import IndexBusy, SourceBusy, index_lock, sync_source
from tests.test_sync import chunks_by_doc

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("KBSYNC_TEST_POSTGRES_URL",
                          "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(params=["sqlite", "postgres"])
def state_url(request, tmp_path):
    """A state database of this test's own: SQLite under tmp_path, or a fresh PostgreSQL
    database (created and dropped here) on the shared server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    from sqlalchemy import create_engine, text

    try:
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        admin.connect().close()
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("KBSYNC_REQUIRE_POSTGRES") == "1":
            raise
        pytest.skip(f"no Postgres at {PG_ADMIN}: {type(exc).__name__}")
    name = f"kbsync_lease_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _holder_process(state_url: str, source: str) -> subprocess.Popen:
    """A real process that takes ``source``'s lease with a one-hour TTL and then
    sleeps, as a run would between two pages; it prints ``held`` once it has it."""
    code = textwrap.dedent(f"""
        import sys, time
        from flows.state import StateStore, lease_owner
        store = StateStore({state_url!r})
        assert store.acquire_lock({source!r}, lease_owner(), 3600) is None
        print("held", flush=True)
        time.sleep(600)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_owner_names_flow_run_host_and_process():
    run = str(uuid.uuid4())
    now = datetime.now(UTC)
    lock = SourceLock("s", lease_owner(run), now, now + timedelta(minutes=2))
    assert (lock.flow_run_id, lock.host, lock.pid) == (run, socket.gethostname(), os.getpid())
    local = SourceLock("s", lease_owner(), now, now)
    assert local.flow_run_id is None and local.pid == os.getpid()
    old = SourceLock("s", "d585a81bd585a81bd585a81bd585a81b@vm:2463", now, now)  # older format
    assert (old.flow_run_id, old.host, old.pid) == (None, "vm", 2463)
    text = lock.describe()
    assert run in text and f"pid {os.getpid()}" in text and "since" in text


def test_a_killed_holder_is_taken_over_at_once(state_url):
    """SIGKILL a real process holding a one-hour lease: the next taker gets it at once;
    a live holder keeps it."""
    store = StateStore(state_url)
    try:
        proc = _holder_process(state_url, "src")
        try:
            held = store.acquire_lock("src", lease_owner(), 120, holder_gone=lease_holder_gone)
            assert held is not None and held.pid == proc.pid  # alive: it keeps its lease
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        me = lease_owner()
        assert store.acquire_lock("src", me, 120, holder_gone=lease_holder_gone) is None
        assert store.lock("src").owner == me
        # a holder on another host is not provably gone: its TTL decides
        other = "local-abc@some-other-host:1"
        store.release_lock("src", me)
        assert store.acquire_lock("src", other, 3600) is None
        assert store.acquire_lock("src", me, 120, holder_gone=lease_holder_gone).owner == other
    finally:
        store.close()


def test_a_finished_flow_run_frees_its_lease(state_url):
    """A lease whose Prefect flow run is in a final state is taken over, whatever host it
    names; one whose flow run is still running is not."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    @flow
    def finished() -> str:
        from prefect.runtime import flow_run

        return flow_run.id

    done_id = finished()
    with get_client(sync_client=True) as client:
        running = client.create_flow_run(finished, state=Running())
    store = StateStore(state_url)
    now = datetime.now(UTC)
    try:
        gone = SourceLock("a", f"{done_id}@elsewhere:1", now, now + timedelta(hours=1))
        assert "Completed" in lease_holder_gone(gone)
        alive = SourceLock("a", f"{running.id}@elsewhere:1", now, now + timedelta(hours=1))
        assert lease_holder_gone(alive) is None
        unknown = SourceLock("a", f"{uuid.uuid4()}@elsewhere:1", now, now + timedelta(hours=1))
        assert lease_holder_gone(unknown) is None  # not found: not provably gone

        assert store.acquire_lock("a", gone.owner, 3600) is None
        assert store.acquire_lock("a", "me@here:2", 120, holder_gone=lease_holder_gone) is None
        store.release_lock("a")
        assert store.acquire_lock("a", alive.owner, 3600) is None
        assert store.acquire_lock("a", "me@here:2", 120,
                                  holder_gone=lease_holder_gone).owner == alive.owner
    finally:
        store.close()


def test_heartbeat_keeps_a_live_lease_and_notices_a_lost_one(state_url):
    store = StateStore(state_url)
    try:
        owner = lease_owner()
        assert store.acquire_lock("hb", owner, 1.5) is None
        with LeaseHeartbeat(store, "hb", owner, 1.5) as lease:
            time.sleep(3.5)  # more than twice the TTL: only the heartbeat keeps it
            assert store.acquire_lock("hb", "other@x:1", 1.5) is not None
            lease.check()
            # the lease is taken from under it (as after a long outage of the database)
            store.release_lock("hb", owner)
            assert store.acquire_lock("hb", "other@x:1", 60) is None
            time.sleep(1.2)
            with pytest.raises(LeaseLost):
                lease.check()
        assert store.lock("hb").owner == "other@x:1"
    finally:
        store.close()


def _write_config(settings, path: Path) -> Path:
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
    return path


def test_sync_takes_over_from_a_killed_run_and_status_unlock_show_it(make_repo, make_settings,
                                                                      tmp_path):
    from flows.cli import app

    repo = make_repo({"a.md": "# A\n\nThe alpha runbook.\n"})
    settings = make_settings(repo, names=["docs"])
    config = _write_config(settings, tmp_path / "kbsync.yaml")
    url = settings.resolved_state_url
    proc = _holder_process(url, "docs")
    runner = CliRunner()
    try:
        status = runner.invoke(app, ["--config", str(config), "status"])
        assert status.exit_code == 0, status.output
        assert f"lease: held by a run on {socket.gethostname()} (pid {proc.pid}) since" in \
            " ".join(status.output.split())
        with pytest.raises(SourceBusy, match=f"pid {proc.pid}"):
            sync_source("docs", config_path=str(config))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    started = time.monotonic()
    assert sync_source("docs", config_path=str(config))["status"] == "completed"
    assert time.monotonic() - started < 60
    assert set(chunks_by_doc(settings)) == {"docs:a.md"}
    store = StateStore(url)
    assert store.lock("docs") is None  # released at the end of the run

    assert store.acquire_lock("docs", "stuck-run@other-host:7", 3600) is None
    out = runner.invoke(app, ["--config", str(config), "unlock", "docs"])
    assert out.exit_code == 0, out.output
    assert "released the lease on docs, held by a run on other-host (pid 7)" in \
        " ".join(out.output.split())
    assert store.lock("docs") is None
    out = runner.invoke(app, ["--config", str(config), "unlock", "docs"])
    assert out.exit_code == 0 and "no lease" in out.output
    store.close()


def test_old_lock_ttl_key_is_still_read(make_settings):
    settings = make_settings(sync={"lock_ttl_seconds": 300})
    assert settings.sync.lease_ttl_seconds == 300


# ------------------------------------------------------------------ one index, many processes


def _cli(config: Path, *args: str) -> subprocess.Popen:
    from prefect.settings import PREFECT_API_URL

    # the session's Prefect test server, so both processes report to one real API
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "--config", str(config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def test_two_processes_sync_two_sources_into_one_embedded_index(make_repo, make_settings,
                                                                 tmp_path):
    """Two real ``kbsync sync`` processes of different sources started at the same moment
    against one embedded index: they serialize on the data-dir lock, both complete, and
    the index holds exactly both sources' chunks."""
    one = make_repo({f"one{i}.md": f"# One {i}\n\nFirst repository, note {i}.\n"
                     for i in range(6)})
    two = make_repo({f"two{i}.md": f"# Two {i}\n\nSecond repository, note {i}.\n"
                     for i in range(6)})
    settings = make_settings(one, two, names=["one", "two"])
    config = _write_config(settings, tmp_path / "kbsync.yaml")
    procs = [_cli(config, "sync", "one"), _cli(config, "sync", "two")]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    docs = chunks_by_doc(settings)
    assert set(docs) == {f"one:one{i}.md" for i in range(6)} | {f"two:two{i}.md" for i in range(6)}

    from flows.retrieve import open_store

    store = open_store(settings)
    ids = [meta["doc_id"] for _, meta in store.iter_metadata()]
    assert len(ids) == store.count() == sum(len(v) for v in docs.values())


def test_a_held_index_refuses_with_a_pointer_to_chroma_url(make_repo, make_settings, tmp_path):
    repo = make_repo({"a.md": "# A\n\nalpha\n"})
    settings = make_settings(repo, names=["a"], sync={"index_lock_timeout_seconds": 0.5})
    config = _write_config(settings, tmp_path / "kbsync.yaml")
    code = textwrap.dedent(f"""
        import time
        from flows.settings import load_settings
        from flows.sync import index_lock
        with index_lock(load_settings({str(config)!r})):
            print("held", flush=True)
            time.sleep(600)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(IndexBusy, match="chroma.url"):
            sync_source("a", config_path=str(config))
        with pytest.raises(IndexBusy):
            with index_lock(settings):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with index_lock(settings):  # released by the OS with the killed process
        pass
    assert sync_source("a", config_path=str(config))["status"] == "completed"
    assert StateStore(settings.resolved_state_url).lock("a") is None

"""What the Prefect UI shows of a run, read back through the Prefect client API from the
test session's real Prefect server: run names, one log line per page, a summary line,
and the progress artifact."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime, timedelta

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.sorting import LogSort
from prefect.logging.handlers import APILogHandler

from connectors.llm import free_port
from flows.sync import sync_source
from flows.validate import validate


def run_record(state):
    """(flow run, its log messages in order, its artifacts by key)."""
    APILogHandler().flush()
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[run_id])), sort=LogSort.TIMESTAMP_ASC)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return run, [entry.message for entry in logs], {a.key: a for a in artifacts}


@pytest.fixture(autouse=True)
def run_logs_at_info():
    """The test session logs Prefect at WARNING; these tests read INFO run logs."""
    logger = logging.getLogger("prefect.flow_runs")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


def config_for(settings, tmp_path):
    path = tmp_path / "kbsync.yaml"
    path.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    return str(path)


def test_sync_run_is_named_logs_each_page_and_a_summary_and_shows_progress(
        make_repo, make_settings, tmp_path):
    files = {f"docs/page{i}.md": f"# Page {i}\n\nFact number {i}: the value is {i * 7}.\n"
             for i in range(5)}
    repo = make_repo(files)
    settings = make_settings(repo, names=["handbook"], source={"page_size": 2})
    config = config_for(settings, tmp_path)

    state = sync_source("handbook", config_path=config, return_state=True)
    assert state.is_completed()
    run, logs, artifacts = run_record(state)

    assert run.name == "sync-handbook-incremental"
    pages = [m for m in logs if m.startswith("page ")]
    assert len(pages) == 3  # 5 files, 2 per page
    assert pages[0].startswith("page 1: 2 documents read: 2 added, 0 updated, 0 deleted, "
                               "0 failed, 0 unchanged, 0 skipped; ")
    assert re.search(r"; [1-9]\d* new chunks? to embed \(", pages[0]), pages[0]
    assert pages[0].endswith(" s)")
    assert pages[2].startswith("page 3: 1 document read: 1 added")
    [summary] = [m for m in logs if m.startswith("incremental sync of handbook")]
    assert summary.startswith("incremental sync of handbook completed in ")
    assert ": documents 5 added, 0 updated, 0 deleted, 0 failed (0 unchanged, 0 skipped); " \
           "chunks " in summary and summary.endswith("3 pages; cursor advanced")
    assert logs.index(summary) > logs.index(pages[-1])

    progress = artifacts["sync-handbook-progress"]
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert progress.description == "handbook: completed, 3 pages, 5 documents read"
    assert artifacts["sync-handbook"].type == "table"  # the summary table stays

    # a backfill is named as one; its progress is the share of its window read
    since = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    state = sync_source("handbook", since=since, config_path=config, return_state=True)
    run, logs, artifacts = run_record(state)
    assert run.name == "sync-handbook-backfill"
    assert any(m.startswith("backfill sync of handbook completed") for m in logs)
    assert float(artifacts["sync-handbook-progress"].data) == 100.0

    state = sync_source("handbook", full=True, config_path=config, return_state=True)
    assert run_record(state)[0].name == "sync-handbook-full"


def test_validate_run_is_named_after_its_sample(make_settings, tmp_path):
    settings = make_settings(llm={"base_url": f"http://127.0.0.1:{free_port()}/v1",
                                  "connect_timeout_seconds": 1, "retries": 0})
    state = validate(sample_size=4, config_path=config_for(settings, tmp_path),
                     return_state=True)
    assert run_record(state)[0].name == "validate-4"
    state = validate(config_path=config_for(settings, tmp_path), return_state=True)
    assert run_record(state)[0].name == f"validate-{settings.validation.sample_size}"


@pytest.mark.slow
def test_kbsync_server_start_keeps_a_server_that_cli_runs_use(make_repo, tmp_path):
    """`kbsync server start` runs a real Prefect server under the data dir; a later CLI
    sync (a fresh process, no PREFECT_API_URL) runs against it; `stop` ends it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    from flows import server

    repo = make_repo({"notes.md": "# Notes\n\nThe release checklist lives in the wiki.\n"})
    data = tmp_path / "data"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    env.pop("PREFECT_API_URL", None)

    def kbsync(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", "--data-dir", str(data),
                               *args], env=env, capture_output=True, text=True, timeout=600)

    started = kbsync("server", "start")
    assert started.returncode == 0, started.stderr
    try:
        record = server.running(data)
        assert record is not None and record["api_url"] in started.stdout
        assert Path(record["home"]).parent == data.resolve()
        synced = kbsync("sync", "--repo", str(repo.path), "--name", "notes")
        assert synced.returncode == 0, synced.stderr
        assert "Starting temporary server" not in synced.stderr
        runs = httpx.post(f"{record['api_url']}/flow_runs/filter", json={}).json()
        assert [r["name"] for r in runs] == ["sync-notes-incremental"]
        assert runs[0]["state_type"] == "COMPLETED"
    finally:
        stopped = kbsync("server", "stop")
    assert stopped.returncode == 0 and server.running(data) is None
    assert kbsync("server", "stop").returncode == 1  # nothing left to stop

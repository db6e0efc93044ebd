"""The ``kbsync`` CLI through typer's test runner (real flows, real index)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result


def summary_rows(output: str) -> dict[str, str]:
    """``measure -> value`` from the one-source sync summary table."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│") if c.strip()]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows


@pytest.fixture
def project(make_repo, tmp_path):
    repo = make_repo({
        "README.md": "# Payments service\n\nThe payments service settles card transactions "
                     "every night at 02:00 UTC and retries failed settlements three times.\n",
        "docs/oncall.md": "# On-call\n\nPage the database team when replication lag exceeds "
                          "thirty seconds.\n",
        "src/settle.py": "def settle(batch):\n    \"\"\"Settle a batch of card transactions.\"\"\"\n"
                         "    return [t for t in batch if t.ok]\n",
    })
    config = tmp_path / "kbsync.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'data'}\n"
        "sync:\n  fetch_retries: 0\n"
        f"sources:\n  - type: git\n    name: payments\n    url: {repo.path}\n"
    )
    return repo, config


def test_sync_status_query_and_noop(project):
    repo, config = project
    result = invoke("--config", str(config), "sync")
    assert result.exit_code == 0, result.output
    rows = summary_rows(result.output)
    assert rows["status"] == "completed" and rows["documents added"] == "3"
    assert "payments" in result.output

    status = invoke("--config", str(config), "status")
    assert status.exit_code == 0, status.output
    block = status.output.split("payments (git)", 1)[1]
    assert f"cursor: commit={repo.head}" in block
    assert "last run: completed" in block
    assert "documents: 3;" in block and "failed: 0;" in block

    answer = invoke("--config", str(config), "query", "when are card transactions settled?", "-k", "2")
    assert answer.exit_code == 0, answer.output
    first = answer.output.split("\n1.", 1)[1].splitlines()[0]
    assert "README.md" in first or "src/settle.py" in first
    assert "2." in answer.output and "3." not in answer.output

    only = invoke("--config", str(config), "query", "replication lag", "--source", "nope")
    assert only.exit_code == 1 and "nothing matched" in only.output

    again = invoke("--config", str(config), "sync", "payments")
    assert again.exit_code == 0
    rows = summary_rows(again.output)
    assert rows["documents added"] == rows["documents updated"] == "0"
    assert rows["chunks embedded"] == "0"  # the diff is empty


def test_sync_repo_option_without_config(make_repo, tmp_path):
    repo = make_repo({"notes.md": "# Notes\n\nKeep the release checklist up to date.\n",
                      "drafts/old.md": "# Old\n\nThe release checklist draft.\n"},
                     name="team-notes")
    result = invoke("--data-dir", str(tmp_path / "d"), "sync", "--repo", str(repo.path),
                    "--exclude", "drafts/**")
    assert result.exit_code == 0, result.output
    assert "team-notes" in result.output
    answer = invoke("--data-dir", str(tmp_path / "d"), "query", "release checklist")
    assert "notes.md" in answer.output and "drafts/old.md" not in answer.output
    lone = invoke("--data-dir", str(tmp_path / "d"), "sync", "--exclude", "drafts/**")
    assert lone.exit_code == 2 and "--exclude goes with --repo" in lone.output


def test_backfill_command(project):
    _, config = project
    assert invoke("--config", str(config), "sync").exit_code == 0
    result = invoke("--config", str(config), "backfill", "payments", "--since", "2000-01-01")
    assert result.exit_code == 0, result.output
    bad = invoke("--config", str(config), "backfill", "payments", "--since", "yesterday-ish")
    assert bad.exit_code == 2 and "not an ISO 8601" in bad.output


def test_bad_config_names_the_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("sources:\n  - type: git\n    name: docs\n    url: .\n    max_file_bytes: big\n")
    result = invoke("--config", str(config), "sync")
    assert result.exit_code == 2
    assert "sources[0] (docs).max_file_bytes" in result.output


def test_unknown_key_and_missing_variable_and_missing_file(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("sources:\n  - {type: git, name: docs, url: ., brnach: main}\n")
    result = invoke("--config", str(typo), "status")
    assert result.exit_code == 2 and "sources[0] (docs).brnach" in result.output

    secret = tmp_path / "secret.yaml"
    secret.write_text("sources:\n  - {type: git, name: docs, url: ., token: '${KBSYNC_TEST_UNSET}'}\n")
    result = invoke("--config", str(secret), "status")
    assert result.exit_code == 2 and "KBSYNC_TEST_UNSET is not set" in result.output

    result = invoke("--config", str(tmp_path / "missing.yaml"), "status")
    assert result.exit_code == 2 and "config file not found" in result.output


def test_unknown_source_and_no_sources(project, tmp_path, monkeypatch):
    _, config = project
    result = invoke("--config", str(config), "sync", "wiki")
    assert result.exit_code == 2 and "unknown source 'wiki'" in result.output
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no ./kbsync.yaml here
    empty = invoke("--data-dir", str(tmp_path / "e"), "sync")
    assert empty.exit_code == 2 and "no sources configured" in empty.output


def test_unreachable_source_fails_with_one_line_and_no_secret(tmp_path):
    config = tmp_path / "k.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'data'}\nsync: {{fetch_retries: 0}}\n"
        "sources:\n  - {type: git, name: remote, url: 'https://127.0.0.1:9/x.git', "
        "token: '${KBSYNC_TEST_TOKEN}'}\n"
    )
    import os

    os.environ["KBSYNC_TEST_TOKEN"] = "tok-VERY-secret"
    try:
        result = invoke("--config", str(config), "sync")
    finally:
        del os.environ["KBSYNC_TEST_TOKEN"]
    assert result.exit_code == 1
    assert "cannot clone or fetch" in result.output
    assert "tok-VERY-secret" not in result.output


def test_query_on_empty_index(tmp_path):
    result = invoke("--data-dir", str(tmp_path / "nothing"), "query", "anything")
    assert result.exit_code == 1 and "run `kbsync sync` first" in result.output

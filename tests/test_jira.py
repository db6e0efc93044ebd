"""connectors/jira.py against a local Jira (pytest-httpserver answering the REST paths the
``jira`` library calls), and the Jira source through the real sync flow."""

from __future__ import annotations

import base64
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import chromadb
import pytest

from connectors.base import ConnectorError, Document, FetchRequest, TransientSourceError
from connectors.jira import JiraConnector, JiraSourceOptions, epoch_ms, strip_order_by
from fakes.jira_server import FakeJira, load_archive
from flows.settings import ConfigError, Settings, load_settings
from flows.state import StateStore
from flows.sync import run_sync
from tests.conftest import REALDATA
from tests.test_sync import chunks_by_doc

FIXTURES = Path(__file__).parent / "fixtures" / "jira"
TOKEN = "s3cr3t-pat-0123456789"


def server_issues() -> list[dict]:
    return json.loads((FIXTURES / "server_issues.json").read_text())


def cloud_issues() -> list[dict]:
    return json.loads((FIXTURES / "cloud_issues_adf.json").read_text())


def make_connector(fake: FakeJira, **options) -> JiraConnector:
    defaults = {"name": "jira", "base_url": fake.url, "jql": "project = PLAT",
                "backoff_seconds": 0.01, "max_retry_delay_seconds": 0.05, "max_retries": 2}
    return JiraConnector(JiraSourceOptions(**{**defaults, **options}))


def drain(connector: JiraConnector, request: FetchRequest | None = None, checkpoint=None):
    return list(connector.fetch(request or FetchRequest(), checkpoint))


def documents(pages) -> dict[str, Document]:
    return {d.id: d for p in pages for d in p.documents}


def sent_jql(fake: FakeJira) -> list[str]:
    return [c.arg("jql") for c in fake.kinds("search")]


# ----------------------------------------------------------------- connector


def test_first_fetch_one_document_per_issue_with_metadata(httpserver):
    fake = FakeJira(httpserver, server_issues())
    pages = drain(make_connector(fake))
    docs = documents(pages)
    assert set(docs) == {"jira:PLAT-1", "jira:PLAT-2", "jira:PLAT-3"}
    assert [p.cursor is not None for p in pages] == [True]

    doc = docs["jira:PLAT-1"]
    assert doc.title == "PLAT-1: Token refresh fails after the gateway restarts"
    assert doc.url == f"{fake.url}/browse/PLAT-1"
    assert doc.format == "markdown" and doc.source_type == "jira"
    assert doc.updated_at == datetime(2024, 4, 10, 16, 45, 12, 345000, tzinfo=UTC)
    assert doc.metadata == {
        "project": "PLAT", "issue_key": "PLAT-1", "issue_type": "Bug", "status": "Resolved",
        "status_category": "Done", "priority": "Critical", "resolution": "Fixed",
        "labels": "auth,gateway", "components": "auth-gateway", "fix_versions": "2.4.0",
        "assignee": "Alex Kim", "reporter": "Maria Lopez",
        "created": "2024-04-02T08:15:00+00:00", "updated": "2024-04-10T16:45:12.345000+00:00",
        "resolved": "2024-04-10T16:45:12.345000+00:00", "parent": "PLAT-0", "epic": "PLAT-0",
        "linked_issues": "AUTH-7,PLAT-3", "comment_count": 2,
    }
    assert doc.text.startswith("Type: Bug · Status: Resolved · Priority: Critical · "
                               "Resolution: Fixed · Assignee: Alex Kim · Reporter: Maria Lopez")
    assert "Links: blocks AUTH-7; relates to PLAT-3" in doc.text
    assert "```java\nTokenStore store" in doc.text and "| 2.4.0 | works |" in doc.text
    assert "### Alex Kim, 2024-04-03 09:00 UTC\n\nThe in-memory token store" in doc.text
    # Server/DC "Epic Link" custom field (found through /field)
    assert docs["jira:PLAT-3"].metadata["epic"] == "PLAT-0"
    assert [c.kind for c in fake.calls][:2] == ["serverInfo", "field"]


def test_issue_with_empty_description(httpserver):
    fake = FakeJira(httpserver, server_issues())
    doc = documents(drain(make_connector(fake)))["jira:PLAT-2"]
    assert "## Description" not in doc.text
    assert "### Jun Chen, 2024-04-12 10:00 UTC\n\nLimits: 100 requests per minute" in doc.text
    assert "assignee" not in doc.metadata and doc.metadata["status_category"] == "To Do"


def test_a_lone_surrogate_in_an_issue_is_replaced_and_the_sync_completes(httpserver, tmp_path):
    """JSON may carry half of a UTF-16 pair (``\\ud83d``: text cut inside an emoji by a
    UTF-16 client); Python decodes it to a string that cannot be encoded as UTF-8, and
    hashing or writing it failed the whole run. It becomes U+FFFD."""
    issues = server_issues()
    issues[0]["fields"]["summary"] += " \ud83d"
    issues[0]["fields"]["description"] += "\n\nDeploy went fine \ud83d"
    fake = FakeJira(httpserver, issues)
    settings = jira_settings(tmp_path, fake)
    summary = sync(settings)
    assert summary["status"] == "completed" and summary["documents_added"] == 3
    client = chromadb.PersistentClient(path=str(settings.chroma_path))
    got = client.get_collection(settings.chroma.collection).get(
        where={"issue_key": "PLAT-1"}, include=["documents", "metadatas"])
    assert any("Deploy went fine \ufffd" in text for text in got["documents"])
    assert all(m["title"].endswith(" \ufffd") for m in got["metadatas"])


def test_jql_bound_is_epoch_ms_of_cursor_minus_overlap(httpserver):
    fake = FakeJira(httpserver, server_issues())
    connector = make_connector(fake, jql='project = PLAT AND summary ~ "order by" ORDER BY '
                                         'created DESC', overlap_minutes=10)
    drain(connector)
    cursor = {"updated": "2024-04-12T10:05:00.000+00:00", "seen": {}}
    drain(connector, FetchRequest(cursor=cursor))
    since, until = datetime(2024, 4, 1, tzinfo=UTC), datetime(2024, 4, 11, tzinfo=UTC)
    drain(connector, FetchRequest(since=since, until=until))
    bound = epoch_ms(datetime(2024, 4, 12, 9, 55, tzinfo=UTC))
    assert bound == 1712915700000
    assert sent_jql(fake) == [
        '(project = PLAT AND summary ~ "order by") ORDER BY updated ASC, key ASC',
        f'(project = PLAT AND summary ~ "order by") AND updated >= {bound} '
        "ORDER BY updated ASC, key ASC",
        '(project = PLAT AND summary ~ "order by") AND updated >= 1711929600000 AND '
        "updated <= 1712793600000 ORDER BY updated ASC, key ASC",
    ]
    assert strip_order_by("") == "" and strip_order_by("ORDER BY key") == ""


def test_incremental_reads_only_changes_and_skips_seen_issues_cheaply(httpserver):
    fake = FakeJira(httpserver, server_issues(), inline_comments=1)
    connector = make_connector(fake, overlap_minutes=60 * 24 * 7)  # PLAT-1..3 all overlap
    first = drain(connector)
    cursor = first[-1].cursor
    assert cursor["updated"] == "2024-04-14T09:20:00.000+00:00"
    assert set(cursor["seen"]) == {"PLAT-1", "PLAT-2", "PLAT-3"}

    fake.calls.clear()
    assert documents(drain(connector, FetchRequest(cursor=cursor))) == {}
    assert not fake.kinds("comment")  # seen issues cost no comment reads

    fake.add_comment("PLAT-1", "Backported to 2.3.2 as well.", "Jun Chen",
                     datetime(2024, 4, 20, 8, 0, tzinfo=UTC))
    pages = drain(connector, FetchRequest(cursor=cursor))
    docs = documents(pages)
    assert set(docs) == {"jira:PLAT-1"}
    assert "### Jun Chen, 2024-04-20 08:00 UTC\n\nBackported to 2.3.2" in docs["jira:PLAT-1"].text
    assert pages[-1].cursor["updated"] == "2024-04-20T08:00:00.000+00:00"


def test_every_comment_page_is_read(httpserver):
    issue = server_issues()[2]
    fake = FakeJira(httpserver, [issue], inline_comments=50)
    for n in range(120):
        fake.add_comment("PLAT-3", f"Comment number {n} about the ingress.", f"User {n % 7}",
                         datetime(2024, 4, 15, 0, n // 60, n % 60, tzinfo=UTC))
    doc = documents(drain(make_connector(fake, comment_page_size=30)))["jira:PLAT-3"]
    assert doc.metadata["comment_count"] == 120
    for n in range(120):
        assert f"Comment number {n} about" in doc.text
    assert doc.text.index("Comment number 49 ") < doc.text.index("Comment number 50 ")
    assert [c.arg("startAt") for c in fake.kinds("comment")] == ["50", "80", "110"]


def test_pages_carry_checkpoints_and_resume(httpserver):
    fake = FakeJira(httpserver, server_issues())
    connector = make_connector(fake, page_size=2)
    pages = drain(connector)
    assert [len(p.documents) for p in pages] == [2, 1]
    assert [p.checkpoint["start_at"] for p in pages] == [2, 3]
    assert pages[0].cursor is None and pages[1].cursor is not None
    fake.calls.clear()
    resumed = drain(connector, checkpoint=pages[0].checkpoint)
    assert [d.id for p in resumed for d in p.documents] == ["jira:PLAT-3"]
    assert [c.arg("startAt") for c in fake.kinds("search")] == ["2"]
    assert resumed[-1].cursor == pages[-1].cursor


def test_cloud_uses_next_page_token_and_converts_adf(httpserver):
    issues = cloud_issues()
    second = json.loads(json.dumps(issues[0]))
    second.update(key="DATA-10", id="20002")
    second["fields"]["updated"] = "2025-01-22T09:00:00.000+0000"
    fake = FakeJira(httpserver, [*issues, second], cloud=True)
    connector = make_connector(fake, jql="project = DATA", email="me@example.com",
                               api_token=TOKEN, api_version=3, page_size=1)
    pages = drain(connector)
    assert [c.path for c in fake.kinds("search")] == ["/rest/api/3/search/jql"] * 2
    assert fake.kinds("search")[0].arg("nextPageToken") is None
    assert fake.kinds("search")[1].arg("nextPageToken") == pages[0].checkpoint["token"]
    expected = "Basic " + base64.b64encode(f"me@example.com:{TOKEN}".encode()).decode()
    assert {c.headers.get("Authorization") for c in fake.calls} == {expected}
    doc = documents(pages)["jira:DATA-9"]
    assert "```python\nclient.upload_file(path, bucket, key)" in doc.text
    assert "[the S3 limits](https://docs.example.com/s3-limits)" in doc.text
    assert "| 6 GB | EntityTooLarge |" in doc.text
    assert "### Maria Lopez, 2025-01-21 11:30 UTC\n\nMultipart works, `upload_fileobj` too." \
        in doc.text
    assert doc.metadata["epic"] == "DATA-1" and doc.metadata["assignee"] == "Maria Lopez"
    assert pages[-1].cursor["updated"] == "2025-01-22T09:00:00.000+00:00"


def test_expired_cloud_page_token_restarts_the_read_from_the_watermark(httpserver):
    """A checkpoint's nextPageToken that Jira Cloud refuses (HTTP 400, Jira's error
    shape) restarts the search at the watermark saved with it: the issue read before
    the checkpoint is not read again, the ones after it are all read."""
    base = cloud_issues()[0]
    issues = []
    for n, day in ((1, 20), (2, 21), (3, 22)):
        issue = json.loads(json.dumps(base))
        issue.update(key=f"DATA-{n}", id=str(30000 + n))
        issue["fields"]["updated"] = f"2025-01-{day}T09:00:00.000+0000"
        issues.append(issue)
    fake = FakeJira(httpserver, issues, cloud=True)
    connector = make_connector(fake, jql="project = DATA", email="me@example.com",
                               api_token=TOKEN, api_version=3, page_size=1, overlap_minutes=10)
    first = next(iter(connector.fetch(FetchRequest())))
    assert [d.id for d in first.documents] == ["jira:DATA-1"]
    assert first.checkpoint["token"]
    fake.calls.clear()
    fake.fail("search", 400, body={"errorMessages": [
        "The provided next page token is invalid or expired."], "errors": {}})
    resumed = drain(connector, checkpoint=first.checkpoint)
    assert [d.id for p in resumed for d in p.documents] == ["jira:DATA-2", "jira:DATA-3"]
    searches = fake.kinds("search")
    assert searches[0].arg("nextPageToken") == first.checkpoint["token"]  # refused
    restarted = searches[1]
    assert restarted.arg("nextPageToken") is None
    since = epoch_ms(datetime(2025, 1, 20, 8, 50, tzinfo=UTC))  # DATA-1 - 10 min overlap
    assert f"updated >= {since}" in restarted.arg("jql")
    assert resumed[-1].cursor["updated"] == "2025-01-22T09:00:00.000+00:00"
    assert TOKEN not in json.dumps(resumed[-1].checkpoint)


# ------------------------------------------------------------- faults, secrets


def test_429_waits_for_retry_after(httpserver):
    fake = FakeJira(httpserver, server_issues())
    fake.fail("search", 429, headers={"Retry-After": "1"})
    connector = make_connector(fake, max_retry_delay_seconds=10)
    connector.client  # noqa: B018 - connect before timing
    start = time.monotonic()
    docs = documents(drain(connector))
    assert time.monotonic() - start >= 1.0  # Retry-After honoured (the session waits 1-2 s)
    assert len(docs) == 3 and len(fake.kinds("search")) == 2


def test_5xx_backoff_then_success(httpserver):
    fake = FakeJira(httpserver, server_issues())
    fake.fail("search", 500, times=1)
    fake.fail("search", 502, times=1)
    docs = documents(drain(make_connector(fake, max_retries=2)))
    assert len(docs) == 3 and len(fake.kinds("search")) == 3


def test_5xx_that_outlives_retries_is_transient(httpserver):
    fake = FakeJira(httpserver, server_issues())
    fake.fail("search", 504, times=10)
    with pytest.raises(TransientSourceError, match="HTTP 504"):
        drain(make_connector(fake, max_retries=2))
    assert len(fake.kinds("search")) == 3


def test_503_with_retry_after_is_retried_once_not_twice(httpserver):
    """ResilientSession retries a 503 that has Retry-After; the connector must not retry
    the same 503 again on top (3 retries would become 3 x 4 requests)."""
    fake = FakeJira(httpserver, server_issues())
    fake.fail("search", 503, times=10, headers={"Retry-After": "1"})
    with pytest.raises(TransientSourceError, match="HTTP 503"):
        drain(make_connector(fake, max_retries=1, max_retry_delay_seconds=0.05))
    assert len(fake.kinds("search")) == 2


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failure_is_fast_and_never_shows_the_token(httpserver, caplog, status):
    fake = FakeJira(httpserver, server_issues(), auth="Bearer the-right-token")
    fake.fail("serverInfo", status,
              body={"errorMessages": [f"Token {TOKEN} is not valid for this site"]})
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConnectorError) as info:
        drain(make_connector(fake, token=TOKEN))
    assert not isinstance(info.value, TransientSourceError)
    message = str(info.value)
    assert f"HTTP {status}" in message and "access denied" in message
    assert TOKEN not in message and "***" in message
    assert TOKEN not in caplog.text
    assert len(fake.kinds("serverInfo")) == 1  # not retried
    assert fake.kinds("serverInfo")[0].headers["Authorization"] == f"Bearer {TOKEN}"


def test_bad_jql_fails_fast_with_jira_message(httpserver):
    fake = FakeJira(httpserver, server_issues())
    fake.fail("search", 400, body={"errorMessages": [
        "Error in the JQL Query: Expecting either a value, list or function but got 'AND'."],
        "errors": {}})
    with pytest.raises(ConnectorError) as info:
        drain(make_connector(fake, jql="project = AND"))
    assert not isinstance(info.value, TransientSourceError)
    assert "Expecting either a value, list or function but got 'AND'" in str(info.value)
    assert "(project = AND) ORDER BY updated ASC" in str(info.value)
    assert len(fake.kinds("search")) == 1


def test_failed_issue_is_recorded_and_the_cursor_stays_before_it(httpserver):
    fake = FakeJira(httpserver, server_issues(), inline_comments=0)
    fake.fail("comment", 500, times=3)  # PLAT-1's comment page, with both retries
    pages = drain(make_connector(fake, max_retries=2))
    assert set(documents(pages)) == {"jira:PLAT-2", "jira:PLAT-3"}  # the run goes on
    issues = [i for p in pages for i in p.issues]
    assert [(i.doc_id, i.kind) for i in issues] == [("jira:PLAT-1", "failed")]
    assert "HTTP 500" in issues[0].reason
    # PLAT-1 is the oldest issue: nothing before it, so the cursor does not move at all
    assert pages[-1].cursor["updated"] is None and pages[-1].cursor["seen"] == {}


def test_failure_in_the_middle_holds_the_cursor_at_the_issue_before(httpserver):
    issues = server_issues()
    fake = FakeJira(httpserver, issues, inline_comments=0)
    fake.issues["PLAT-1"]["fields"]["comment"]["comments"] = []
    fake.issues["PLAT-1"]["fields"]["comment"]["total"] = 0
    fake.fail("comment", 500, times=3)  # PLAT-2's (PLAT-1 has none now)
    pages = drain(make_connector(fake, max_retries=2))
    assert [(i.doc_id, i.kind) for p in pages for i in p.issues] == [("jira:PLAT-2", "failed")]
    assert set(documents(pages)) == {"jira:PLAT-1", "jira:PLAT-3"}
    assert pages[-1].cursor["updated"] == "2024-04-10T16:45:12.345+00:00"  # PLAT-1's
    assert set(pages[-1].cursor["seen"]) == {"PLAT-1"}


def test_issue_deleted_while_reading_its_comments_is_skipped(httpserver):
    fake = FakeJira(httpserver, server_issues(), inline_comments=0)
    fake.fail("comment", 404, body={"errorMessages": ["Issue does not exist"]})
    pages = drain(make_connector(fake))
    assert [(i.doc_id, i.kind) for p in pages for i in p.issues] == [("jira:PLAT-1", "skipped")]
    assert pages[-1].cursor["updated"] == "2024-04-14T09:20:00.000+00:00"


def test_result_set_shifting_under_offset_paging_holds_the_cursor_back(httpserver):
    """PLAT-1 is updated while page 2 is read: the offsets shift by one and PLAT-3 (now at
    offset 1) is never returned. The cursor must stay at the page boundary so the next
    run reads PLAT-3."""
    fake = FakeJira(httpserver, server_issues())

    def update_plat1(jira: FakeJira, start: int) -> None:
        if start == 2 and jira.issues["PLAT-1"]["fields"]["updated"].startswith("2024-04-10"):
            jira.add_comment("PLAT-1", "late edit", "Alex Kim",
                             datetime(2024, 4, 16, tzinfo=UTC))

    fake.on_search = update_plat1
    connector = make_connector(fake, page_size=2, overlap_minutes=0)
    pages = drain(connector)
    assert [d.id for p in pages for d in p.documents] == ["jira:PLAT-1", "jira:PLAT-2",
                                                          "jira:PLAT-1"]
    cursor = pages[-1].cursor
    assert cursor["updated"] == "2024-04-12T10:00:00.000+00:00"  # PLAT-2, the boundary
    fake.on_search = None
    again = documents(drain(connector, FetchRequest(cursor=cursor)))
    assert "jira:PLAT-3" in again


def test_list_ids_lists_keys_only(httpserver):
    fake = FakeJira(httpserver, server_issues(), max_results_cap=2)
    listing = make_connector(fake).list_ids()
    assert listing.complete
    assert listing.ids == {"jira:PLAT-1", "jira:PLAT-2", "jira:PLAT-3"}
    searches = fake.kinds("search")
    assert [c.arg("startAt") for c in searches] == ["0", "2"]
    assert {tuple(c.args["fields"]) for c in searches} == {("issuekey",)}
    assert searches[0].arg("jql") == "(project = PLAT) ORDER BY key ASC"


def test_list_ids_incomplete_on_error_or_shifting_results(httpserver):
    fake = FakeJira(httpserver, server_issues(), max_results_cap=2)
    fake.fail("search", 500, times=10)
    listing = make_connector(fake, max_retries=1).list_ids()
    assert not listing.complete and listing.ids == frozenset()
    assert "HTTP 500" in listing.reason

    fake.faults.clear()
    fake.on_search = lambda jira, start: jira.issues.pop("PLAT-1", None) if start == 2 else None
    listing = make_connector(fake).list_ids()
    assert not listing.complete and "changed while listing" in listing.reason


def test_settings_from_yaml_with_secrets_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("JIRA_TOKEN", TOKEN)
    config = tmp_path / "kbsync.yaml"
    config.write_text(
        "sources:\n  - type: jira\n    name: tickets\n    base_url: https://jira.example.com/\n"
        "    jql: project in (PLAT, AUTH)\n    token: ${JIRA_TOKEN}\n    overlap_minutes: 5\n"
        "    api_version: 2\n")
    settings = load_settings(config)
    source = settings.source("tickets")
    assert TOKEN not in repr(settings) and TOKEN not in str(source)
    connector = source.build(settings)
    assert connector.options.token.get_secret_value() == TOKEN
    assert connector.options.overlap_minutes == 5
    assert TOKEN not in repr(connector.options)
    assert connector.base_url == "https://jira.example.com"

    config.write_text("sources:\n  - type: jira\n    name: tickets\n"
                      "    base_url: https://x.atlassian.net\n    email: me@example.com\n")
    with pytest.raises(ConfigError, match=r"sources\[0\] \(tickets\).*email and api_token"):
        load_settings(config)


# ---------------------------------------------------------------- sync flow


def jira_settings(tmp_path, fake: FakeJira, **source) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        sources=[{"type": "jira", "name": "jira", "base_url": fake.url, "jql": "project = PLAT",
                  "backoff_seconds": 0.01, "max_retry_delay_seconds": 0.05, "max_retries": 1,
                  **source}],
        sync={"fetch_retry_delay_seconds": 0, "fetch_retries": 1})


def sync(settings: Settings, **kwargs) -> dict:
    from prefect import flow

    @flow(name="test-jira-sync")
    def _flow():
        return run_sync(settings, "jira", **kwargs).to_dict()

    return _flow()



def test_sync_then_new_comment_embeds_only_the_changed_chunks(httpserver, tmp_path):
    fake = FakeJira(httpserver, server_issues())
    settings = jira_settings(tmp_path, fake)
    first = sync(settings)
    assert first["status"] == "completed" and first["documents_added"] == 3
    before = chunks_by_doc(settings)
    assert set(before) == {"jira:PLAT-1", "jira:PLAT-2", "jira:PLAT-3"}
    state = StateStore(settings.resolved_state_url).get("jira")
    assert state.cursor["updated"] == "2024-04-14T09:20:00.000+00:00"

    fake.add_comment("PLAT-1", "Root cause: the token store lived in process memory. "
                     "Fixed by moving it to Redis with a 24 h TTL.", "Jun Chen",
                     datetime(2024, 4, 20, 8, 0, tzinfo=UTC))
    fake.calls.clear()
    second = sync(settings)
    after = chunks_by_doc(settings)
    assert second["documents_updated"] == 1 and second["documents_added"] == 0
    assert after["jira:PLAT-2"] == before["jira:PLAT-2"]
    assert after["jira:PLAT-3"] == before["jira:PLAT-3"]
    new_ids = after["jira:PLAT-1"] - before["jira:PLAT-1"]
    assert second["chunks_embedded"] == len(new_ids) >= 1
    assert second["chunks_reused"] >= len(before["jira:PLAT-1"] & after["jira:PLAT-1"]) >= 1
    bound = epoch_ms(datetime(2024, 4, 14, 9, 10, tzinfo=UTC))
    assert sent_jql(fake) == [f"(project = PLAT) AND updated >= {bound} "
                              "ORDER BY updated ASC, key ASC"]
    client = chromadb.PersistentClient(path=str(settings.chroma_path))
    got = client.get_collection(settings.chroma.collection).get(
        ids=sorted(new_ids), include=["metadatas", "documents"])
    assert any("Jun Chen, 2024-04-20 08:00 UTC" in text for text in got["documents"])
    assert {m["issue_key"] for m in got["metadatas"]} == {"PLAT-1"}
    assert {m["comment_count"] for m in got["metadatas"]} == {3}
    assert StateStore(settings.resolved_state_url).get("jira").cursor["updated"] == \
        "2024-04-20T08:00:00.000+00:00"


def test_a_relabelled_issue_gets_its_labels_on_every_chunk(httpserver, tmp_path):
    """Labels are filtered on, so every chunk of an issue carries the current ones; its
    ``updated`` (a version field, ``connectors.jira.VERSION_FIELDS``) is current on its
    head."""
    issues = server_issues()
    plat1 = next(i for i in issues if i["key"] == "PLAT-1")
    plat1["fields"]["description"] = "\n\n".join(
        f"Step {n}: the gateway rejects refresh tokens issued by the old auth node {n}; "
        f"restart sequence {n} must drain sessions before the token store is flushed."
        for n in range(60))
    fake = FakeJira(httpserver, issues)
    settings = jira_settings(tmp_path, fake)
    sync(settings)
    plat1["fields"]["labels"] = ["auth", "gateway", "incident"]
    plat1["fields"]["updated"] = "2024-04-21T10:00:00.000+0000"
    fake.put(plat1)

    second = sync(settings)
    assert second["documents_updated"] == 1
    client = chromadb.PersistentClient(path=str(settings.chroma_path))
    metas = client.get_collection(settings.chroma.collection).get(
        where={"issue_key": "PLAT-1"}, include=["metadatas"])["metadatas"]
    assert len(metas) >= 3
    assert {m["labels"] for m in metas} == {"auth,gateway,incident"}
    head = next(m for m in metas if m["chunk_index"] == 0)
    assert head["updated"].startswith("2024-04-21T10:00") and head["chunk_count"] == len(metas)


def test_deleted_issue_is_removed_by_reconciliation(httpserver, tmp_path):
    fake = FakeJira(httpserver, server_issues())
    settings = jira_settings(tmp_path, fake)
    sync(settings)
    fake.delete("PLAT-2")
    result = sync(settings, full=True)
    assert result["reconciled"] and result["documents_deleted"] == 1
    assert set(chunks_by_doc(settings)) == {"jira:PLAT-1", "jira:PLAT-3"}


def test_failed_issue_keeps_the_cursor_until_it_is_read(httpserver, tmp_path):
    fake = FakeJira(httpserver, server_issues(), inline_comments=0)
    settings = jira_settings(tmp_path, fake)
    sync(settings)
    state = StateStore(settings.resolved_state_url)
    cursor = state.get("jira").cursor
    fake.add_comment("PLAT-1", "Reopened: fails again on 2.4.1.", "Maria Lopez",
                     datetime(2024, 4, 21, tzinfo=UTC))
    fake.add_comment("PLAT-3", "Certificates renewed.", "Jun Chen",
                     datetime(2024, 4, 22, tzinfo=UTC))
    fake.fail("comment", 503, times=2)  # PLAT-1's comments, with its one retry
    failed = sync(settings)
    assert failed["status"] == "completed_with_failures" and failed["documents_failed"] == 1
    assert failed["documents_updated"] == 1  # PLAT-3
    assert state.get("jira").cursor == cursor
    assert {i.doc_id for i in state.issues("jira")} == {"jira:PLAT-1"}

    again = sync(settings)
    assert again["status"] == "completed" and again["documents_updated"] >= 1
    assert state.get("jira").cursor["updated"] == "2024-04-22T00:00:00.000+00:00"
    assert not [i for i in state.issues("jira") if i.kind == "failed"]


# ------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_real_archive_through_search_pages(httpserver):
    """DAEMON and MOD (684 Titanium issues, 1,918 comments) served as search pages with
    only 3 comments inline, so most issues page through their comments."""
    issues = load_archive(REALDATA, ["DAEMON", "MOD"])
    comments = {i["key"]: len(i["fields"]["comment"]["comments"]) for i in issues}
    fake = FakeJira(httpserver, issues, inline_comments=3)
    connector = make_connector(fake, jql="project in (DAEMON, MOD)", page_size=100)
    pages = drain(connector)
    docs = documents(pages)
    assert not [i for p in pages for i in p.issues]
    assert len(docs) == len(issues) == 684
    assert sum(comments.values()) == 1918
    for key, count in comments.items():
        doc = docs[f"jira:{key}"]
        assert doc.metadata["comment_count"] == count
        assert doc.text.count("\n### ") >= count
    assert len(fake.kinds("comment")) == sum(1 for c in comments.values() if c > 3)
    assert len(pages) == 7 and all(p.checkpoint for p in pages)
    # a second run from the cursor reads nothing again
    fake.calls.clear()
    assert documents(drain(connector, FetchRequest(cursor=pages[-1].cursor))) == {}
    assert not fake.kinds("comment")
    listing = connector.list_ids()
    assert listing.complete and len(listing.ids) == 684


@pytest.mark.realdata
@pytest.mark.parametrize("envelope, issues, with_comments", [
    ("jenkins_search_szzunleashed_res0.json", 50, 0),
    ("apache_lucene_search_with_comments.json", 50, 298),
])
def test_real_search_envelopes(httpserver, envelope, issues, with_comments):
    """Real ``/rest/api/2/search`` responses (Jenkins, Apache Lucene) as the first page."""
    from werkzeug import Response

    data = (REALDATA / "jira" / "search_responses" / envelope).read_text()
    empty = (REALDATA / "jira" / "perceval_fixtures" / "jira_issues_page_empty.json").read_text()
    fields = (REALDATA / "jira" / "perceval_fixtures" / "jira_fields.json").read_text()

    def handler(request):
        if request.path.endswith("/serverInfo"):
            body = json.dumps({"versionNumbers": [8, 20, 0], "deploymentType": "Server"})
        elif request.path.endswith("/field"):
            body = fields
        else:
            body = data if request.args.get("startAt", "0") == "0" else empty
        return Response(body, content_type="application/json")

    httpserver.expect_request("/rest/api/2/serverInfo").respond_with_handler(handler)
    httpserver.expect_request("/rest/api/2/field").respond_with_handler(handler)
    httpserver.expect_request("/rest/api/2/search").respond_with_handler(handler)
    connector = JiraConnector(JiraSourceOptions(name="real", base_url=httpserver.url_for("/")))
    docs = documents(drain(connector))
    raw = json.loads(data)["issues"]
    assert len(docs) == issues
    assert sum(d.metadata["comment_count"] for d in docs.values()) == with_comments
    for issue in raw:
        doc = docs[f"real:{issue['key']}"]
        assert doc.title == f"{issue['key']}: {issue['fields']['summary'].strip()}"
        assert doc.url.endswith(f"/browse/{issue['key']}") and doc.text.strip()


@pytest.mark.realdata
def test_real_issues_through_the_sync_flow(httpserver, tmp_path):
    """12 ALOY issues (from the archive's tarball) through the real flow into Chroma."""
    issues = load_archive(REALDATA, ["ALOY"], limit=12)
    fake = FakeJira(httpserver, issues, inline_comments=2)
    settings = jira_settings(tmp_path, fake, jql="project = ALOY")
    result = sync(settings)
    assert result["status"] == "completed" and result["documents_added"] == 12
    client = chromadb.PersistentClient(path=str(settings.chroma_path))
    got = client.get_collection(settings.chroma.collection).get(include=["metadatas"])
    assert {m["issue_key"] for m in got["metadatas"]} == {i["key"] for i in issues}
    assert {m["project"] for m in got["metadatas"]} == {"ALOY"}
    assert all(m["url"].startswith(fake.url + "/browse/ALOY-") for m in got["metadatas"])
    assert sync(settings)["chunks_embedded"] == 0


# ------------------------------------------------ one project fails alone (issue 13)


def two_projects() -> list[dict]:
    """The PLAT fixture issues and two AUTH issues made from them."""
    issues = server_issues()
    for n, source in ((1, issues[0]), (2, issues[1])):
        issue = json.loads(json.dumps(source))
        issue.update(key=f"AUTH-{n}", id=str(40000 + n))
        issue["fields"]["project"] = {**(issue["fields"].get("project") or {}), "key": "AUTH",
                                      "name": "Auth"}
        issue["fields"]["summary"] = f"Auth issue {n}: session cookies expire early"
        issue["fields"]["updated"] = f"2024-04-1{n}T12:00:00.000+0000"
        issues.append(issue)
    return issues


def test_projects_are_read_one_search_each_with_a_watermark_each(httpserver):
    fake = FakeJira(httpserver, two_projects())
    connector = make_connector(fake, jql="", projects=["PLAT", "AUTH"], page_size=2)
    pages = drain(connector)
    assert set(documents(pages)) == {"jira:PLAT-1", "jira:PLAT-2", "jira:PLAT-3",
                                     "jira:AUTH-1", "jira:AUTH-2"}
    jqls = sent_jql(fake)
    assert jqls[0] == 'project = "PLAT" ORDER BY updated ASC, key ASC'
    assert jqls[-1] == 'project = "AUTH" ORDER BY updated ASC, key ASC'
    cursor = pages[-1].cursor
    assert cursor["version"] == 1
    assert cursor["projects"]["PLAT"]["updated"] == "2024-04-14T09:20:00.000+00:00"
    assert cursor["projects"]["AUTH"]["updated"] == "2024-04-12T12:00:00.000+00:00"
    resumed = drain(make_connector(fake, jql="", projects=["PLAT", "AUTH"], page_size=2),
                    checkpoint=pages[0].checkpoint)
    assert resumed[-1].cursor == cursor

    fake.add_comment("AUTH-1", "Fixed in 2.5.", "Jun Chen", datetime(2024, 4, 20, tzinfo=UTC))
    fake.calls.clear()
    again = drain(connector, FetchRequest(cursor=cursor))
    assert set(documents(again)) == {"jira:AUTH-1"}
    assert all("updated >= " in jql for jql in sent_jql(fake))

    # a single-watermark cursor (from a jql-only source) is where every project starts
    single = drain(make_connector(fake, jql="project in (PLAT, AUTH)"))[-1].cursor
    fake.calls.clear()
    drain(connector, FetchRequest(cursor=single))
    bound = epoch_ms(datetime(2024, 4, 19, 23, 50, tzinfo=UTC))
    assert sent_jql(fake) == [f'project = "{p}" AND updated >= {bound} ORDER BY updated ASC, '
                              "key ASC" for p in ("PLAT", "AUTH")]


def test_a_project_that_cannot_be_read_fails_alone(httpserver):
    fake = FakeJira(httpserver, two_projects())
    fake.hidden_projects.add("AUTH")
    opts = {"jql": "", "projects": ["AUTH", "PLAT"], "page_size": 2}
    pages = drain(make_connector(fake, **opts))
    assert set(documents(pages)) == {"jira:PLAT-1", "jira:PLAT-2", "jira:PLAT-3"}
    failed = [i for p in pages for i in p.issues]
    assert [(i.doc_id, i.scope, i.kind) for i in failed] == [("jira:project:AUTH", "entity",
                                                              "failed")]
    assert "The value 'AUTH' does not exist for the field 'project'." in failed[0].reason
    assert set(pages[-1].cursor["projects"]) == {"PLAT"}
    # a resumed read reports the failure again, on its last page
    resumed = drain(make_connector(fake, **opts), checkpoint=pages[1].checkpoint)
    assert [i.doc_id for i in resumed[-1].issues] == ["jira:project:AUTH"]
    assert not make_connector(fake, **opts).list_ids().complete  # deletes nothing

    fake.hidden_projects.add("PLAT")
    with pytest.raises(ConnectorError, match="no configured project can be read"):
        drain(make_connector(fake, **opts))
    fake.hidden_projects.clear()
    fake.fail("search", 401, body={"errorMessages": ["You are not authenticated."]})
    with pytest.raises(ConnectorError, match="401"):  # the source's own failure
        drain(make_connector(fake, **opts))


def test_flow_a_project_that_cannot_be_read_fails_alone_and_its_cursor_holds(
        httpserver, tmp_path):
    """Issue 13 item 3: of two projects, one Jira refuses (400 "does not exist", later
    403). The other is synced and its cursor moves; the refused one is a failed entity
    with Jira's message, its cursor holds, and the next run with access picks it up."""
    fake = FakeJira(httpserver, two_projects())
    fake.hidden_projects.add("AUTH")
    settings = jira_settings(tmp_path, fake, jql="", projects=["PLAT", "AUTH"])
    store = StateStore(settings.resolved_state_url)

    first = sync(settings)
    assert first["status"] == "completed_with_failures" and first["documents_added"] == 3
    assert set(chunks_by_doc(settings)) == {"jira:PLAT-1", "jira:PLAT-2", "jira:PLAT-3"}
    failures = {i.doc_id: i.reason for i in store.issues("jira", kind="failed")}
    assert list(failures) == ["jira:project:AUTH"]
    assert "The value 'AUTH' does not exist for the field 'project'." in \
        failures["jira:project:AUTH"]
    cursor = store.get("jira").cursor
    assert set(cursor["projects"]) == {"PLAT"}
    assert cursor["projects"]["PLAT"]["updated"] == "2024-04-14T09:20:00.000+00:00"

    fake.hidden_projects.clear()  # access granted
    second = sync(settings)
    assert second["status"] == "completed" and second["documents_added"] == 2
    assert {"jira:AUTH-1", "jira:AUTH-2"} <= set(chunks_by_doc(settings))
    assert store.issues("jira", kind="failed") == []
    held = store.get("jira").cursor["projects"]["AUTH"]

    fake.add_comment("PLAT-2", "Raised to 200 per minute.", "Jun Chen",
                     datetime(2024, 4, 21, tzinfo=UTC))
    fake.add_comment("AUTH-2", "Cookies now last 12 hours.", "Jun Chen",
                     datetime(2024, 4, 21, tzinfo=UTC))
    fake.fail("search", 403, times=5, match=lambda c: 'project = "AUTH"' in c.arg("jql"),
              body={"errorMessages": ["You do not have permission to browse AUTH."],
                    "errors": {}})
    third = sync(settings)
    assert third["status"] == "completed_with_failures" and third["documents_updated"] == 1
    failures = {i.doc_id: i.reason for i in store.issues("jira", kind="failed")}
    assert list(failures) == ["jira:project:AUTH"] and "403" in failures["jira:project:AUTH"]
    cursor = store.get("jira").cursor["projects"]
    assert cursor["AUTH"] == held  # held where it was ...
    assert cursor["PLAT"]["updated"] == "2024-04-21T00:00:00.000+00:00"  # ... PLAT moved

    fake.faults.clear()
    fourth = sync(settings)
    assert fourth["status"] == "completed" and fourth["documents_updated"] == 1
    client = chromadb.PersistentClient(path=str(settings.chroma_path))
    got = client.get_collection(settings.chroma.collection).get(where={"doc_id": "jira:AUTH-2"})
    assert any("Cookies now last 12 hours." in text for text in got["documents"])
    assert store.issues("jira", kind="failed") == []


def test_flow_one_project_that_cannot_be_read_is_a_failed_entity_and_recovers(
        httpserver, tmp_path):
    """One project in ``projects``: while Jira refuses it (400 "does not exist", then
    403) the run reports the failed entity with Jira's message and fails, the cursor
    holds and nothing is deleted; with access restored the next run reads what changed
    meanwhile (the failed run's checkpoint is not replayed)."""
    fake = FakeJira(httpserver, server_issues())
    settings = jira_settings(tmp_path, fake, jql="", projects=["PLAT"])
    store = StateStore(settings.resolved_state_url)
    first = sync(settings)
    assert first["status"] == "completed" and first["documents_added"] == 3
    cursor = store.get("jira").cursor
    indexed = chunks_by_doc(settings)

    fake.add_comment("PLAT-2", "Raised to 200 per minute.", "Jun Chen",
                     datetime(2024, 4, 21, tzinfo=UTC))
    fake.hidden_projects.add("PLAT")
    with pytest.raises(ConnectorError, match="no configured project can be read") as info:
        sync(settings, full=True)  # a full run would reconcile deletions
    assert "The value 'PLAT' does not exist for the field 'project'." in str(info.value)
    state = store.get("jira")
    assert state.last_status == "failed"
    failures = {i.doc_id: i.reason for i in store.issues("jira", kind="failed")}
    assert list(failures) == ["jira:project:PLAT"]
    assert "The value 'PLAT' does not exist for the field 'project'." in \
        failures["jira:project:PLAT"]
    assert state.cursor == cursor and chunks_by_doc(settings) == indexed

    fake.hidden_projects.clear()
    fake.fail("search", 403, times=5,
              body={"errorMessages": ["You do not have permission to browse PLAT."],
                    "errors": {}})
    with pytest.raises(ConnectorError, match="no configured project can be read"):
        sync(settings)
    failures = {i.doc_id: i.reason for i in store.issues("jira", kind="failed")}
    assert list(failures) == ["jira:project:PLAT"] and "403" in failures["jira:project:PLAT"]
    assert store.get("jira").cursor == cursor and chunks_by_doc(settings) == indexed

    fake.faults.clear()  # access restored
    restored = sync(settings)
    assert restored["status"] == "completed" and restored["documents_updated"] == 1
    client = chromadb.PersistentClient(path=str(settings.chroma_path))
    got = client.get_collection(settings.chroma.collection).get(where={"doc_id": "jira:PLAT-2"})
    assert any("Raised to 200 per minute." in text for text in got["documents"])
    assert store.issues("jira", kind="failed") == []
    assert store.get("jira").cursor["projects"]["PLAT"]["updated"] == \
        "2024-04-21T00:00:00.000+00:00"

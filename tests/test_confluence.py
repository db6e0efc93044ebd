"""connectors/confluence.py against a local Confluence REST stand-in (pytest-httpserver),
and the sync flow end to end with a Confluence source (real Prefect, Chroma, model)."""

from __future__ import annotations

import base64
import json
import logging
import re
from datetime import UTC, datetime, timedelta

import chromadb
import pytest
from werkzeug import Response

from connectors.base import ConnectorError, FetchRequest, TransientSourceError
from connectors.confluence import (
    ConfluenceConnector,
    ConfluenceSourceOptions,
    cql_date,
    retry_after_seconds,
)
from fakes.confluence_server import EPOCH, FakeConfluence, iso, tiny_pdf
from flows.settings import ConfigError, Settings, load_settings
from flows.state import StateStore
from tests.conftest import REALDATA
from tests.test_sync import chunks_by_doc
from transforms.chunking import ChunkingConfig, chunk_document
from transforms.storage_format import storage_to_markdown

PERCEVAL = REALDATA / "confluence" / "perceval_fixtures"
TOPICS = ["replication", "backups", "indexing", "caching", "sharding", "monitoring",
          "alerting", "deployment", "rollbacks", "migrations", "quotas", "auditing"]


def storage_handbook(sections: int = 10, paragraphs: int = 5, edit: str | None = None) -> str:
    """A long storage-format page: headings, paragraphs, a code macro per section."""
    out = []
    for s in range(sections):
        topic = TOPICS[s % len(TOPICS)]
        out.append(f"<h2>{topic.title()} ({s})</h2>")
        for p in range(paragraphs):
            text = (f"Paragraph {p} about {topic} in section {s}. The {topic} procedure "
                    f"requires the on-call engineer to verify step {p} before continuing, "
                    f"record the outcome in the run book, and notify the owning team of "
                    f"section {s} when the {topic} job finishes. Unexpected results in {topic} "
                    f"must be escalated within {15 + p} minutes, with logs attached.")
            if edit and s == 4 and p == 2:
                text += " " + edit
            out.append(f"<p>{text}</p>")
        out.append('<ac:structured-macro ac:name="code"><ac:parameter ac:name="language">bash'
                   f'</ac:parameter><ac:plain-text-body><![CDATA[run-{topic} --section {s}]]>'
                   '</ac:plain-text-body></ac:structured-macro>')
    return "".join(out)


def options(fake: FakeConfluence, **kwargs) -> ConfluenceSourceOptions:
    defaults = dict(name="wiki", base_url=fake.url, spaces=["ENG"], page_size=10,
                    max_retries=3, backoff_initial_seconds=0.01, backoff_max_seconds=0.05,
                    retry_after_max_seconds=0.2)
    defaults.update(kwargs)
    return ConfluenceSourceOptions(**defaults)


def read(connector: ConfluenceConnector, request: FetchRequest | None = None, checkpoint=None):
    return list(connector.fetch(request or FetchRequest(), checkpoint))


def docs(pages) -> dict:
    return {d.id: d for p in pages for d in p.documents}


def add_pages(fake: FakeConfluence, n: int, space: str = "ENG", start: int = 100,
              step: timedelta = timedelta(hours=1)) -> list[str]:
    ids = []
    for i in range(n):
        fake.add(str(start + i), f"Page {i}", space=space,
                 body=f"<h1>Topic {i}</h1><p>Body of page {i} in {space}.</p>",
                 when=EPOCH + step * i)
        ids.append(str(start + i))
    return ids


@pytest.fixture
def fake(httpserver) -> FakeConfluence:
    return FakeConfluence(httpserver)


# ----------------------------------------------------------------- connector


def test_pagination_across_several_pages_with_a_checkpoint_each(fake):
    ids = add_pages(fake, 7)
    connector = ConfluenceConnector(options(fake, page_size=3))
    pages = read(connector)

    assert [[d.id.split(":")[1] for d in p.documents] for p in pages] == \
        [ids[:3], ids[3:5], ids[5:7]]
    assert [p.cursor is not None for p in pages] == [False, False, True]
    assert all(p.checkpoint for p in pages) and pages[-1].checkpoint["params"] is None
    # each page after the first starts one result early to check nothing moved
    assert [int(s["start"]) for s in fake.searches()] == [0, 2, 4]
    assert connector.stats["pagination_drift"] == 0
    assert pages[-1].cursor["when"] == (EPOCH + timedelta(hours=6)).isoformat()

    # a resumed run continues after the checkpointed page
    resumed = read(ConfluenceConnector(options(fake, page_size=3)), checkpoint=pages[0].checkpoint)
    assert [d.id.split(":")[1] for p in resumed for d in p.documents] == ids[3:]
    assert resumed[-1].cursor == pages[-1].cursor


def test_backfill_window_and_resuming_after_the_last_page(fake):
    add_pages(fake, 5)  # 00:00 .. 04:00
    connector = ConfluenceConnector(options(fake, overlap_minutes=0))
    request = FetchRequest(since=EPOCH + timedelta(hours=1), until=EPOCH + timedelta(hours=3))
    pages = read(connector, request)
    assert sorted(docs(pages)) == ["wiki:101", "wiki:102", "wiki:103"]
    cql = fake.searches()[-1]["cql"]
    assert 'lastmodified >= "2024-01-01 01:00"' in cql
    assert 'lastmodified <= "2024-01-01 03:01"' in cql  # until's own minute included

    searches = len(fake.searches())
    resumed = read(connector, request, checkpoint=pages[-1].checkpoint)
    assert docs(resumed) == {} and resumed[-1].cursor == pages[-1].cursor
    assert len(fake.searches()) == searches  # nothing left to ask for


def test_data_center_silent_limit_cap_does_not_skip_results(httpserver):
    fake = FakeConfluence(httpserver, max_limit=2)  # serves 2, links advance by 5
    ids = add_pages(fake, 7)
    pages = read(ConfluenceConnector(options(fake, page_size=5)))
    assert sorted(docs(pages)) == sorted(f"wiki:{i}" for i in ids)


def test_cloud_cursor_links_and_email_api_token(httpserver):
    fake = FakeConfluence(httpserver, context="/wiki", cloud=True,
                          auth=("basic", "ada@example.com", "cloud-api-token"))
    ids = add_pages(fake, 5)
    base = httpserver.url_for("/")  # the site URL without /wiki: the connector adds it
    connector = ConfluenceConnector(options(fake, base_url=base, cloud=True, page_size=2,
                                            email="ada@example.com", api_token="cloud-api-token"))
    pages = read(connector)
    assert sorted(docs(pages)) == sorted(f"wiki:{i}" for i in ids)
    searches = fake.searches()
    assert all(path.startswith("/wiki/rest/api/") for path, _ in fake.requests)
    assert "cursor" not in searches[0] and all("cursor" in s for s in searches[1:])
    doc = docs(pages)["wiki:100"]
    assert doc.url == f"{fake.url}/display/ENG/Page+0"
    assert doc.metadata["author"] == "Ada Author"  # Cloud user objects: publicName/displayName


@pytest.mark.parametrize("auth,kwargs", [
    (("bearer", "pat-4711"), {"token": "pat-4711"}),
    (("basic", "svc-kb", "pw-4711"), {"username": "svc-kb", "password": "pw-4711"}),
])
def test_server_auth_styles(httpserver, auth, kwargs):
    fake = FakeConfluence(httpserver, context="/confluence", auth=auth)
    add_pages(fake, 2)
    assert len(docs(read(ConfluenceConnector(options(fake, **kwargs))))) == 2
    assert len(fake.searches()) == 1

    wrong = {k: (v + "-wrong" if k in ("token", "password") else v) for k, v in kwargs.items()}
    before = len(fake.requests)
    with pytest.raises(ConnectorError, match="authentication failed") as info:
        read(ConfluenceConnector(options(fake, **wrong)))
    assert "4711" not in str(info.value)
    # the 401 was not retried: the run stopped at its first request, whichever it was
    assert len(fake.requests) - before == 1


def test_429_waits_for_retry_after_capped(fake):
    add_pages(fake, 3)
    fake.fail(429, headers={"Retry-After": "30"})
    fake.fail(429, headers={"Retry-After": "0.05"})
    connector = ConfluenceConnector(options(fake, retry_after_max_seconds=0.2))
    assert len(docs(read(connector))) == 3
    assert connector.stats["throttled"] == 2
    assert connector.stats["waited_seconds"] == pytest.approx(0.25)  # 30 s capped to 0.2

    fake.fail(429, times=10, headers={"Retry-After": "0"})
    with pytest.raises(TransientSourceError, match="rate limited"):
        read(ConfluenceConnector(options(fake, max_retries=2)))


def test_retry_after_header_forms():
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("12") == 12.0
    assert retry_after_seconds("Wed, 01 May 2024 12:00:30 GMT", now=now) == 30.0
    assert retry_after_seconds("Wed, 01 May 2024 11:00:00 GMT", now=now) == 0.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_server_403_rate_limit_is_throttling_other_403_fails_fast(fake):
    add_pages(fake, 2)
    fake.fail(403, body={"statusCode": 403, "message": "Rate limit exceeded. Try later."})
    connector = ConfluenceConnector(options(fake))
    assert len(docs(read(connector))) == 2
    assert connector.stats["throttled"] == 1

    before = len(fake.searches())
    fake.fail(403, times=5, body={"statusCode": 403, "message": "Not permitted to use "
                                  "confluence"})
    with pytest.raises(ConnectorError, match="permission denied") as info:
        read(ConfluenceConnector(options(fake)))
    assert not isinstance(info.value, TransientSourceError)
    assert len(fake.searches()) - before == 1


def test_bad_cql_fails_fast_naming_the_query(fake):
    add_pages(fake, 1)
    connector = ConfluenceConnector(options(fake, spaces=[], cql="weird ~ thing"))
    with pytest.raises(ConnectorError, match=r"check `cql`.*weird ~ thing"):
        read(connector)


def test_500_burst_retries_then_smaller_pages(fake):
    ids = add_pages(fake, 6)
    fake.fail(500, times=2)  # a short burst: retried with backoff
    connector = ConfluenceConnector(options(fake, page_size=4))
    assert sorted(docs(read(connector))) == sorted(f"wiki:{i}" for i in ids)
    assert connector.stats["retries"] == 2 and connector.stats["page_size_reductions"] == 0

    # results pages of more than 2 keep failing (a body too large to render): the page
    # size is halved until requests succeed
    fake.fail(502, times=100, match=lambda args: int(args["limit"]) > 2)
    connector = ConfluenceConnector(options(fake, page_size=8, min_page_size=2, max_retries=1))
    assert sorted(docs(read(connector))) == sorted(f"wiki:{i}" for i in ids)
    assert connector.stats["page_size_reductions"] == 2  # 8 -> 4 -> 2
    assert {int(s["limit"]) for s in fake.searches()[-3:]} == {2}

    fake.faults.clear()
    fake.fail(503, times=100)
    with pytest.raises(TransientSourceError, match="after retries"):
        read(ConfluenceConnector(options(fake, page_size=4, min_page_size=2, max_retries=1)))


def test_malformed_bodies_fail_only_their_page(fake):
    fake.add("1", "Good", body="<p>fine</p>")
    fake.add("2", "Null body", body=None, when=EPOCH + timedelta(minutes=1))
    fake.add("3", "Body never returned", omit_body=True, when=EPOCH + timedelta(minutes=2))
    fake.add("4", "Too deep", body="<div>" * 400 + "x" + "</div>" * 400,
             when=EPOCH + timedelta(minutes=3))
    fake.add("5", "Only macros", body='<ac:structured-macro ac:name="children" />',
             when=EPOCH + timedelta(minutes=4))
    pages = read(ConfluenceConnector(options(fake)))
    assert list(docs(pages)) == ["wiki:1"]
    issues = {i.doc_id: i for p in pages for i in p.issues}
    assert {k: v.kind for k, v in issues.items()} == {
        "wiki:2": "failed", "wiki:3": "failed", "wiki:4": "failed", "wiki:5": "skipped"}
    assert "malformed body of page 'Null body' (id 2)" in issues["wiki:2"].reason
    assert "'Body never returned' (id 3)" in issues["wiki:3"].reason
    assert "nest deeper" in issues["wiki:4"].reason
    # the page without a body in the search was asked for once more, by id
    assert any(path == "/rest/api/content/3" for path, _ in fake.requests)


def test_single_page_request_4xx_fails_that_page_naming_it(fake):
    fake.add("1", "Good", body="<p>fine</p>")
    fake.add("7", "Restricted", omit_body=True, when=EPOCH + timedelta(minutes=1))
    fake.fail(403, path="/rest/api/content/7",
              body={"statusCode": 403, "message": "user not permitted to view"})
    pages = read(ConfluenceConnector(options(fake)))
    assert list(docs(pages)) == ["wiki:1"]
    issue = pages[0].issues[0]
    assert issue.kind == "failed" and "'Restricted' (id 7) refused: HTTP 403" in issue.reason


def test_incremental_overlap_skips_known_versions_and_finds_edits(fake):
    ids = add_pages(fake, 4, step=timedelta(minutes=10))
    connector = ConfluenceConnector(options(fake))
    cursor = read(connector)[-1].cursor
    assert cursor["when"] == (EPOCH + timedelta(minutes=30)).isoformat()
    assert set(cursor["seen"]) == set(ids)  # all four are within 30 minutes of the last

    again = read(connector, FetchRequest(cursor=cursor))
    assert docs(again) == {} and connector.stats["skipped_seen"] == 4
    assert 'lastmodified >= "2024-01-01 00:00"' in fake.searches()[-1]["cql"]  # 00:30 - 30 min

    fake.edit(ids[1], body="<p>edited</p>", when=EPOCH + timedelta(minutes=45))
    changed = read(connector, FetchRequest(cursor=again[-1].cursor))
    assert list(docs(changed)) == [f"wiki:{ids[1]}"]
    assert docs(changed)[f"wiki:{ids[1]}"].metadata["version"] == 2
    assert docs(changed)[f"wiki:{ids[1]}"].metadata["last_modifier"] == "Eddie Editor"
    assert changed[-1].cursor["when"] == (EPOCH + timedelta(minutes=45)).isoformat()


def test_cql_dates_are_written_in_the_accounts_time_zone(httpserver):
    fake = FakeConfluence(httpserver, user_zone="America/New_York")  # UTC-5 in January
    add_pages(fake, 2, step=timedelta(hours=3))
    connector = ConfluenceConnector(options(fake, timezone="America/New_York"))
    cursor = read(connector)[-1].cursor
    fake.edit("100", body="<p>late edit</p>", when=EPOCH + timedelta(hours=3, minutes=10))
    changed = read(connector, FetchRequest(cursor=cursor))
    assert list(docs(changed)) == ["wiki:100"]
    # 03:00 UTC - 30 min = 02:30 UTC = 21:30 the day before in New York
    assert 'lastmodified >= "2023-12-31 21:30"' in fake.searches()[-1]["cql"]
    assert cql_date(datetime(2024, 7, 1, 12, 0, 59, tzinfo=UTC), "Europe/Berlin") == \
        "2024-07-01 14:00"


def test_results_moving_while_paged_hold_the_cursor_back(fake):
    ids = add_pages(fake, 6)  # one hour apart

    def edit_first_two(number: int) -> None:
        if number == 2:  # between the first and the second results page
            fake.edit(ids[0], body="<p>p0 edited</p>", when=EPOCH + timedelta(hours=9))
            fake.edit(ids[1], body="<p>p1 edited</p>", when=EPOCH + timedelta(hours=10))

    fake.on_search = edit_first_two
    connector = ConfluenceConnector(options(fake, page_size=3))
    first = read(connector)
    fake.on_search = None
    seen_first = set(docs(first))
    assert f"wiki:{ids[3]}" not in seen_first  # shifted past the offset: missed this time
    assert connector.stats["pagination_drift"] == 1
    cursor = first[-1].cursor
    assert cursor["when"] == (EPOCH + timedelta(hours=2)).isoformat()  # held at the anchor

    second = read(connector, FetchRequest(cursor=cursor))
    assert f"wiki:{ids[3]}" in docs(second)


def test_list_ids_and_incomplete_listings(fake):
    ids = add_pages(fake, 5)
    fake.add("900", "Blog", type="blogpost", body="<p>news</p>")
    add_pages(fake, 2, space="OPS", start=500)
    connector = ConfluenceConnector(options(fake, list_page_size=2))
    listing = connector.list_ids()
    assert listing.complete
    assert listing.ids == {f"wiki:{i}" for i in [*ids, "900"]}
    assert "order by created asc" in fake.searches()[-1]["cql"]
    assert "expand" not in fake.searches()[-1]  # ids only

    fake.fail(500, times=50)
    broken = ConfluenceConnector(options(fake, list_page_size=2, max_retries=1)).list_ids()
    assert not broken.complete and broken.ids == frozenset() and "after retries" in broken.reason

    fake.faults.clear()

    def delete_one(number: int) -> None:
        if number == 2:
            fake.delete(ids[0])

    fake.on_search = delete_one
    fake._searches = 0
    moved = ConfluenceConnector(options(fake, list_page_size=2)).list_ids()
    assert not moved.complete and "moved" in moved.reason


def test_mentions_resolved_once_per_user(fake):
    for i in range(3):
        fake.add(str(i), f"P{i}", body='<p>ask <ac:link><ri:user ri:userkey="u-editor" />'
                 '</ac:link> or <ac:link><ri:user ri:userkey="u-gone" /></ac:link></p>',
                 when=EPOCH + timedelta(minutes=i))
    found = docs(read(ConfluenceConnector(options(fake, page_size=2))))
    assert found["wiki:0"].text == "ask @Eddie Editor or @user"
    lookups = [args for path, args in fake.requests if path == "/rest/api/user"]
    assert sorted(a["key"] for a in lookups) == ["u-editor", "u-gone"]


def test_attachments_become_documents_when_enabled(fake):
    fake.add("10", "Runbook", body="<p>see attachments</p>", ancestors=[("1", "Home")])
    fake.add("11", "notes.txt", type="attachment", container="10", data=b"rotate keys monthly",
             media_type="text/plain", when=EPOCH + timedelta(minutes=1))
    fake.add("12", "design.pdf", type="attachment", container="10",
             data=tiny_pdf("Quorum needs three brokers"), media_type="application/pdf",
             when=EPOCH + timedelta(minutes=2))
    fake.add("13", "diagram.png", type="attachment", container="10", data=b"\x89PNG....",
             media_type="image/png", when=EPOCH + timedelta(minutes=3))
    fake.add("14", "huge.csv", type="attachment", container="10", data=b"a,b\n" * 300,
             media_type="text/csv", when=EPOCH + timedelta(minutes=4))

    off = read(ConfluenceConnector(options(fake)))
    assert list(docs(off)) == ["wiki:10"]
    assert "attachment" not in fake.searches()[-1]["cql"]

    pages = read(ConfluenceConnector(options(fake, attachments=True, attachment_max_bytes=1000)))
    found = docs(pages)
    assert set(found) == {"wiki:10", "wiki:11", "wiki:12"}
    assert found["wiki:11"].text == "rotate keys monthly"
    assert found["wiki:11"].title == "Runbook / notes.txt"
    assert found["wiki:11"].metadata["page_id"] == "10"
    assert found["wiki:12"].text.strip() == "Quorum needs three brokers"
    issues = {i.doc_id: i for p in pages for i in p.issues}
    assert issues["wiki:14"].kind == "skipped" and "over the size limit" in issues["wiki:14"].reason
    assert "wiki:13" not in issues  # images are not text: ignored, not recorded


def test_secrets_never_reach_errors_or_logs(fake, caplog):
    fake.auth = ("basic", "svc", "s3cr3t-Password")

    def echo_auth(request):
        # a misbehaving proxy that echoes the request headers in its error page
        return Response(f"upstream error; headers were {dict(request.headers)}", status=500)

    def echo_searches(request):
        # the space lookup reaches the site; the searches meet the proxy's error page
        if request.path.startswith("/rest/api/space/"):
            return fake.handle(request)
        return echo_auth(request)

    fake.server.clear()
    fake.server.expect_request(re.compile(r"^/")).respond_with_handler(echo_searches)
    secret_b64 = base64.b64encode(b"svc:s3cr3t-Password").decode()
    connector = ConfluenceConnector(options(fake, username="svc", password="s3cr3t-Password",
                                            page_size=2, min_page_size=2, max_retries=1))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TransientSourceError) as info:
        read(connector)
    listing = connector.list_ids()
    for text in (str(info.value), listing.reason, caplog.text):
        assert "s3cr3t-Password" not in text and secret_b64 not in text
    assert "***" in str(info.value)
    assert "search failed" in str(info.value) and "search" in listing.reason

    # the proxy echoes the headers on every request, the space lookup's too
    fake.server.clear()
    fake.server.expect_request(re.compile(r"^/")).respond_with_handler(echo_auth)
    connector = ConfluenceConnector(options(fake, username="svc", password="s3cr3t-Password",
                                            page_size=2, min_page_size=2, max_retries=1))
    with pytest.raises(TransientSourceError) as info:
        read(connector)
    listing = connector.list_ids()
    for text in (str(info.value), listing.reason, caplog.text):
        assert "s3cr3t-Password" not in text and secret_b64 not in text
    assert "***" in str(info.value) and "reading space 'ENG'" in str(info.value)
    assert "reading space 'ENG'" in listing.reason


# ------------------------------------------------------------- real envelopes


@pytest.mark.realdata
def test_real_search_envelopes_and_content_bodies(httpserver):
    """The real REST shapes (perceval's OPNFV fixtures): a search page with ``_links.next``
    whose results carry no body, so each page is fetched by id; the next page holds an
    attachment (ignored with attachments off)."""
    def load(name):
        return json.loads((PERCEVAL / name).read_text(encoding="utf-8"))

    def search(request):
        start = int(request.args.get("start", 0))
        body = load("confluence_contents.json") if start == 0 else load(
            "confluence_contents_next.json")
        return Response(json.dumps(body), content_type="application/json")

    httpserver.expect_request("/rest/api/content/search").respond_with_handler(search)
    httpserver.expect_request("/rest/api/content/1").respond_with_json(
        load("confluence_content_1_v2.json"))
    httpserver.expect_request("/rest/api/content/2").respond_with_json(
        load("confluence_content_2_v1.json"))
    httpserver.expect_request("/rest/api/user").respond_with_json(
        {"statusCode": 404, "message": "No user found"}, status=404)
    connector = ConfluenceConnector(ConfluenceSourceOptions(
        name="opnfv", base_url=httpserver.url_for("/").rstrip("/"), cql="type = page",
        page_size=2, max_retries=0))
    pages = read(connector)
    found = docs(pages)
    assert set(found) == {"opnfv:1", "opnfv:2"}
    page = found["opnfv:1"]
    assert page.title == "Steady State Project - 2016-06-17 Goals"
    assert page.url == "http://example.com/display/meetings/TSC"  # _links.base + webui
    assert page.metadata["version"] == 2 and page.metadata["last_modifier"] == "John Smith"
    assert page.metadata["author"] == "John Doe"
    assert page.metadata["breadcrumb"] == "Title 2 > Title 3"  # the untitled ancestor skipped
    assert page.updated_at == datetime(2016, 6, 16, 19, 58, 30, tzinfo=UTC)
    assert "- [x] Get Linux Foundation ID" in page.text
    assert "[[Demo 2016-06-17]]" in page.text
    assert "# Project: Service Function Chaining" in found["opnfv:2"].text
    assert pages[-1].cursor["when"] is not None


@pytest.mark.realdata
def test_fake_server_speaks_the_real_shapes(fake):
    """Every key of the real envelopes is in the stand-in's answers too."""
    real_page = json.loads((PERCEVAL / "confluence_content_1_v2.json").read_text())
    real_search = json.loads((PERCEVAL / "confluence_contents.json").read_text())
    content = fake.add("1", "T", labels=["x"])
    ours = fake.content_json(content, {"body.storage", "version", "history", "space"})
    assert set(real_page) <= set(ours)
    assert set(real_page["version"]) <= set(ours["version"])
    assert set(real_page["history"]) <= set(ours["history"])
    assert set(real_page["body"]["storage"]) <= set(ours["body"]["storage"])
    add_pages(fake, 3)
    envelope = ConfluenceConnector(options(fake, page_size=2))._get(
        "rest/api/content/search", {"cql": 'space in ("ENG") and type in (page)', "limit": 2})
    assert set(real_search) - {"ancestors"} <= set(envelope)
    assert set(real_search["_links"]) <= set(envelope["_links"])


# ------------------------------------------------------------------ settings


def test_settings_validation_and_secrets_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CONFLUENCE_TOKEN", "tok-from-env")
    config = tmp_path / "kbsync.yaml"
    config.write_text(
        "sources:\n"
        "  - type: confluence\n"
        "    name: wiki\n"
        "    base_url: https://acme.atlassian.net\n"
        "    spaces: [ENG, OPS]\n"
        "    email: kb@acme.test\n"
        "    api_token: ${CONFLUENCE_TOKEN}\n"
        "    attachments: true\n")
    settings = load_settings(config)
    source = settings.source("wiki")
    assert source.api_token.get_secret_value() == "tok-from-env"
    assert "tok-from-env" not in repr(settings) and "tok-from-env" not in str(source)
    connector = source.build(settings)
    assert connector.options.api_url == "https://acme.atlassian.net/wiki"
    assert connector.options.is_cloud and connector.options.overlap_minutes == 30
    assert connector.scope_cql() == 'space in ("ENG","OPS") and type in (page,blogpost,attachment)'

    base = {"type": "confluence", "name": "w", "base_url": "https://wiki.acme.test"}
    bad = [
        ({}, "give spaces, cql or both"),
        ({"spaces": ["ENG"], "email": "a@b"}, "email and api_token go together"),
        ({"spaces": ["ENG"], "token": "t", "username": "u", "password": "p"},
         "one auth style"),
        ({"spaces": ["ENG"], "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"cql": "label = x order by title"}, "ORDER BY"),
        ({"spaces": ["ENG\" or 1=1"]}, "String should match pattern"),
    ]
    for extra, message in bad:
        with pytest.raises((ConfigError, ValueError), match=message):
            Settings(sources=[{**base, **extra}])


# ----------------------------------------------------------------- the flow


def sync(settings, source="wiki", **kwargs):
    from prefect import flow

    from flows.sync import run_sync

    @flow(name="test-confluence-sync")
    def _flow():
        return run_sync(settings, source, **kwargs).to_dict()

    return _flow()


def flow_settings(tmp_path, fake, **source) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        sources=[{"type": "confluence", "name": "wiki", "base_url": fake.url, "spaces": ["ENG"],
                  "backoff_initial_seconds": 0.01, "backoff_max_seconds": 0.05,
                  "max_retries": 2, **source}],
        sync={"fetch_retry_delay_seconds": 0, "fetch_retries": 1, "reconcile_every": 0})



def chunk_meta(settings, doc_id) -> dict:
    client = chromadb.PersistentClient(path=str(settings.chroma_path))
    res = client.get_collection(settings.chroma.collection).get(
        where={"doc_id": doc_id}, include=["metadatas"])
    return res["metadatas"][0]


def test_first_sync_then_an_edit_embeds_only_changed_chunks(tmp_path, fake, embedder):
    fake.add("10", "Handbook", body=storage_handbook(), ancestors=[("1", "Home"), ("5", "Ops")],
             labels=["runbook", "oncall"], created=EPOCH - timedelta(days=30), author="u-author",
             modifier="u-editor", version=7, when=EPOCH)
    fake.add("11", "Short page", body="<p>The broker listens on port 9092.</p>",
             when=EPOCH + timedelta(minutes=5))
    fake.add("12", "Release news", type="blogpost", body="<p>Version 3.7 is out.</p>",
             when=EPOCH + timedelta(minutes=10))
    fake.add("20", "Other space", space="OPS", body="<p>not in scope</p>")
    settings = flow_settings(tmp_path, fake)

    first = sync(settings)
    assert first["status"] == "completed" and first["documents_added"] == 3
    held = chunks_by_doc(settings)
    assert set(held) == {"wiki:10", "wiki:11", "wiki:12"}
    meta = chunk_meta(settings, "wiki:10")
    assert {k: meta[k] for k in ("source_type", "space_key", "space_name", "page_id", "title",
                                 "breadcrumb", "labels", "author", "last_modifier", "version",
                                 "created", "updated", "url")} == {
        "source_type": "confluence", "space_key": "ENG", "space_name": "Engineering",
        "page_id": "10", "title": "Handbook", "breadcrumb": "Home > Ops",
        "labels": "oncall,runbook", "author": "Ada Author", "last_modifier": "Eddie Editor",
        "version": 7, "created": (EPOCH - timedelta(days=30)).isoformat(),
        "updated": EPOCH.isoformat(), "url": f"{fake.url}/display/ENG/Handbook"}
    assert chunk_meta(settings, "wiki:12")["content_type"] == "blogpost"
    state = StateStore(settings.resolved_state_url).get("wiki")
    assert state.cursor["when"] == (EPOCH + timedelta(minutes=10)).isoformat()

    before = held["wiki:10"]
    new_body = storage_handbook(edit="(Revised for the new cluster.)")
    fake.edit("10", body=new_body, when=EPOCH + timedelta(hours=2))
    second = sync(settings)

    assert 'lastmodified >= "2023-12-31 23:40"' in fake.searches()[-1]["cql"]  # 00:10 - 30
    assert second["documents_updated"] == 1 and second["documents_added"] == 0
    after = chunks_by_doc(settings)["wiki:10"]
    config = ChunkingConfig(max_tokens=embedder.max_text_tokens,
                            overlap_tokens=settings.chunking.overlap_tokens)
    expected = {c.id for c in chunk_document("wiki:10", storage_to_markdown(new_body),
                                             fmt="markdown", title="Handbook", config=config,
                                             counter=embedder.count_tokens)}
    assert after == expected and len(before) >= 10
    assert second["chunks_embedded"] == len(after - before)
    assert 1 <= second["chunks_embedded"] <= 2
    assert StateStore(settings.resolved_state_url).get("wiki").cursor["when"] == \
        (EPOCH + timedelta(hours=2)).isoformat()


def test_reconciliation_removes_deleted_pages_and_a_failed_listing_deletes_nothing(
        tmp_path, fake):
    for i in range(4):
        fake.add(str(i), f"Page {i}", body=f"<p>Page number {i} text.</p>",
                 when=EPOCH + timedelta(minutes=i))
    settings = flow_settings(tmp_path, fake)
    sync(settings)
    assert set(chunks_by_doc(settings)) == {f"wiki:{i}" for i in range(4)}

    fake.delete("1")
    fake.contents["2"].space = "OPS"  # moved out of the configured space
    listing = lambda args: "order by created" in args.get("cql", "")  # noqa: E731
    fake.fail(403, times=1, match=listing, body={"statusCode": 403, "message": "denied"})
    failed = sync(settings, full=True)
    assert failed["reconciled"] is False and failed["documents_deleted"] == 0
    assert set(chunks_by_doc(settings)) == {f"wiki:{i}" for i in range(4)}

    done = sync(settings, full=True)
    assert done["reconciled"] is True and done["documents_deleted"] == 2
    assert set(chunks_by_doc(settings)) == {"wiki:0", "wiki:3"}


def test_malformed_body_holds_the_cursor_until_fixed(tmp_path, fake):
    fake.add("1", "Good", body="<p>Healthy page text.</p>")
    fake.add("2", "Broken", body=None, when=EPOCH + timedelta(minutes=5))
    settings = flow_settings(tmp_path, fake)
    result = sync(settings)
    assert result["status"] == "completed_with_failures"
    assert result["documents_failed"] == 1 and result["documents_added"] == 1
    store = StateStore(settings.resolved_state_url)
    assert store.get("wiki").cursor is None  # never moves past a failed page
    assert [i.doc_id for i in store.issues("wiki")] == ["wiki:2"]

    fake.edit("2", body="<p>Repaired page text.</p>", when=EPOCH + timedelta(minutes=6))
    fixed = sync(settings)
    assert fixed["status"] == "completed" and fixed["documents_added"] == 1
    assert store.get("wiki").cursor["when"] == (EPOCH + timedelta(minutes=6)).isoformat()
    assert store.issues("wiki") == []


def test_iso_matches_confluence_format():
    assert iso(datetime(2016, 6, 16, 19, 58, 30, tzinfo=UTC)) == "2016-06-16T19:58:30.000Z"


# ------------------------------------------------- one space fails alone (issue 13)


def test_several_spaces_are_read_one_search_each_with_a_watermark_each(fake):
    eng = add_pages(fake, 3, "ENG", start=100)
    ops = add_pages(fake, 2, "OPS", start=200, step=timedelta(hours=2))
    connector = ConfluenceConnector(options(fake, spaces=["ENG", "OPS"], page_size=2))
    pages = read(connector)
    assert set(docs(pages)) == {f"wiki:{i}" for i in eng + ops}
    cqls = [s["cql"] for s in fake.searches()]
    assert all('space = "ENG"' in c for c in cqls[:2]) and 'space = "OPS"' in cqls[-1]
    cursor = pages[-1].cursor
    assert [p.cursor is not None for p in pages] == [False] * (len(pages) - 1) + [True]
    assert cursor["version"] == 1 and set(cursor["spaces"]) == {"ENG", "OPS"}
    assert cursor["spaces"]["ENG"]["when"] == (EPOCH + timedelta(hours=2)).isoformat()
    assert cursor["spaces"]["OPS"]["when"] == (EPOCH + timedelta(hours=2)).isoformat()

    # a resumed read (after the first ENG page) ends with the same cursor
    resumed = read(ConfluenceConnector(options(fake, spaces=["ENG", "OPS"], page_size=2)),
                   checkpoint=pages[0].checkpoint)
    assert resumed[-1].cursor == cursor
    assert set(docs(resumed)) == {f"wiki:{i}" for i in eng[2:] + ops}

    # the next run reads each space from its own watermark
    fake.edit(ops[0], body="<p>Edited in OPS.</p>", when=EPOCH + timedelta(hours=5))
    again = read(connector, FetchRequest(cursor=cursor))
    assert set(docs(again)) == {f"wiki:{ops[0]}"}


def test_an_older_single_watermark_cursor_is_read_per_space(fake):
    add_pages(fake, 2, "ENG", start=100)
    add_pages(fake, 2, "OPS", start=200)
    single = read(ConfluenceConnector(options(fake, spaces=["ENG"])))[-1].cursor
    assert single["scope"] == ["ENG"] and single["when"] == (EPOCH + timedelta(hours=1)).isoformat()
    fake.requests.clear()
    connector = ConfluenceConnector(options(fake, spaces=["ENG", "OPS"]))
    pages = read(connector, FetchRequest(cursor=single))
    # ENG goes on from its watermark; OPS, added to the configuration, is read in full
    assert set(docs(pages)) == {"wiki:200", "wiki:201"}
    eng_cql, ops_cql = (s["cql"] for s in fake.searches())
    assert "lastmodified >=" in eng_cql and "lastmodified >=" not in ops_cql
    # a cursor written before the scope was recorded covers every configured space
    legacy = {k: v for k, v in single.items() if k != "scope"}
    fake.requests.clear()
    read(connector, FetchRequest(cursor=legacy))
    assert all("lastmodified >=" in s["cql"] for s in fake.searches())


def test_a_space_the_account_cannot_view_fails_alone(fake):
    add_pages(fake, 2, "ENG", start=100)
    add_pages(fake, 2, "OPS", start=200)
    fake.hidden_spaces.add("OPS")
    connector = ConfluenceConnector(options(fake, spaces=["ENG", "OPS"]))
    pages = read(connector)
    assert set(docs(pages)) == {"wiki:100", "wiki:101"}
    failed = [i for p in pages for i in p.issues]
    assert [(i.doc_id, i.scope, i.kind) for i in failed] == [("wiki:space:OPS", "entity",
                                                              "failed")]
    assert "No space with key : OPS" in failed[0].reason
    assert set(pages[-1].cursor["spaces"]) == {"ENG"}  # OPS has no watermark yet
    listing = connector.list_ids()  # CQL would silently leave OPS out: delete nothing
    assert not listing.complete and "OPS" in listing.reason

    fake.hidden_spaces.add("ENG")  # nothing readable: the source fails
    with pytest.raises(ConnectorError, match="no configured space can be read"):
        read(ConfluenceConnector(options(fake, spaces=["ENG", "OPS"])))


def test_an_entity_failure_is_reported_again_after_a_resume(fake):
    add_pages(fake, 4, "OPS", start=200)
    fake.hidden_spaces.add("ENG")
    opts = options(fake, spaces=["ENG", "OPS"], page_size=2)
    pages = read(ConfluenceConnector(opts))
    assert pages[0].issues[0].doc_id == "wiki:space:ENG" and len(pages) > 2
    resumed = read(ConfluenceConnector(opts), checkpoint=pages[1].checkpoint)
    assert [i.doc_id for i in resumed[-1].issues] == ["wiki:space:ENG"]
    assert set(resumed[-1].cursor["spaces"]) == {"OPS"}


def test_one_space_that_cannot_be_read_is_reported_not_read_as_empty(fake):
    """One configured space the account may not view: CQL would leave its content out
    and the read would look empty; the lookup makes it a failed entity with its reason,
    and the source fails (no configured space can be read)."""
    add_pages(fake, 2, "ENG", start=100)
    fake.hidden_spaces.add("ENG")
    connector = ConfluenceConnector(options(fake))
    pages = []
    with pytest.raises(ConnectorError, match="no configured space can be read") as info:
        for page in connector.fetch(FetchRequest()):
            pages.append(page)
    assert not isinstance(info.value, TransientSourceError)
    assert "No space with key : ENG" in str(info.value)
    assert "base_url" in str(info.value)  # a wrong site URL answers 404 too
    assert [[(i.doc_id, i.scope, i.kind) for i in p.issues] for p in pages] == \
        [[("wiki:space:ENG", "entity", "failed")]]
    assert "No space with key : ENG" in pages[0].issues[0].reason
    assert pages[0].cursor is None and pages[0].checkpoint is None and not pages[0].documents
    assert fake.searches() == []  # nothing was searched
    listing = connector.list_ids()
    assert not listing.complete and "ENG" in listing.reason

    # the space is readable but its search is refused (403): the same failed entity
    fake.hidden_spaces.clear()
    fake.fail(403, times=5, body={"statusCode": 403, "message": "Not permitted to search ENG"})
    pages = []
    with pytest.raises(ConnectorError, match="no configured space can be read"):
        for page in ConfluenceConnector(options(fake)).fetch(FetchRequest()):
            pages.append(page)
    assert [i.doc_id for p in pages for i in p.issues] == ["wiki:space:ENG"]
    assert "403" in pages[-1].issues[0].reason and "permission denied" in \
        pages[-1].issues[0].reason


def test_one_space_is_looked_up_once_per_run(fake):
    add_pages(fake, 5, "ENG", start=100)

    def lookups() -> int:
        return sum(path == "/rest/api/space/ENG" for path, _ in fake.requests)

    connector = ConfluenceConnector(options(fake, page_size=2))
    pages = read(connector)
    assert lookups() == 1 and len(pages) > 2
    # a fetch retried from a checkpoint in the same run does not look the space up again
    read(connector, checkpoint=pages[0].checkpoint)
    assert lookups() == 1
    connector.close()  # the run ends; the next one looks it up again
    read(connector, FetchRequest(cursor=pages[-1].cursor))
    assert lookups() == 2
    # a new run resuming a checkpoint looks it up: access may have changed meanwhile
    fake.hidden_spaces.add("ENG")
    with pytest.raises(ConnectorError, match="no configured space can be read"):
        read(ConfluenceConnector(options(fake, page_size=2)), checkpoint=pages[0].checkpoint)
    assert lookups() == 3


def test_a_checkpoint_in_which_every_space_failed_is_not_replayed(fake):
    """A run that found no space readable failed as a whole; once access is restored,
    the next run reads the spaces instead of resuming the failures it saved."""
    add_pages(fake, 2, "ENG", start=100)
    add_pages(fake, 2, "OPS", start=200)
    fake.hidden_spaces.update({"ENG", "OPS"})
    opts = options(fake, spaces=["ENG", "OPS"])
    pages = []
    with pytest.raises(ConnectorError, match="no configured space can be read"):
        for page in ConfluenceConnector(opts).fetch(FetchRequest()):
            pages.append(page)
    assert [i.doc_id for p in pages for i in p.issues] == ["wiki:space:ENG", "wiki:space:OPS"]
    saved = pages[-1].checkpoint  # what the flow keeps of the failed run

    fake.hidden_spaces.clear()
    again = read(ConfluenceConnector(opts), checkpoint=saved)
    assert set(docs(again)) == {"wiki:100", "wiki:101", "wiki:200", "wiki:201"}
    assert [i for p in again for i in p.issues] == []
    assert set(again[-1].cursor["spaces"]) == {"ENG", "OPS"}


def test_flow_one_space_that_cannot_be_read_is_a_failed_entity_and_nothing_moves(
        tmp_path, fake):
    """One configured space: while the space answers 403 (and later, while it is hidden,
    404 with its content left out of CQL) the run reports the failed entity with its
    reason and fails, the cursor holds and nothing is deleted; with access restored the
    next run indexes what changed meanwhile."""
    fake.add("10", "Runbook", body="<p>Restart the broker before rotating the keys.</p>")
    settings = flow_settings(tmp_path, fake)
    store = StateStore(settings.resolved_state_url)
    first = sync(settings)
    assert first["status"] == "completed" and set(chunks_by_doc(settings)) == {"wiki:10"}
    cursor = store.get("wiki").cursor
    indexed = chunks_by_doc(settings)

    fake.edit("10", body="<p>Restart the broker twice before rotating the keys.</p>",
              when=EPOCH + timedelta(hours=2))
    fake.add("11", "Checklist", body="<p>Rotate the keys every week.</p>",
             when=EPOCH + timedelta(hours=3))
    fake.fail(403, times=100, path="/rest/api/space/ENG",
              body={"statusCode": 403, "message": "User is not permitted to view space ENG"})
    with pytest.raises(ConnectorError, match="no configured space can be read") as info:
        sync(settings)
    assert "not permitted to view space ENG" in str(info.value)
    state = store.get("wiki")
    assert state.last_status == "failed" and "ENG" in state.last_summary["error"]
    failures = {i.doc_id: i for i in store.issues("wiki", kind="failed")}
    assert list(failures) == ["wiki:space:ENG"]
    assert "403" in failures["wiki:space:ENG"].reason
    assert "not permitted to view space ENG" in failures["wiki:space:ENG"].reason
    assert state.cursor == cursor  # the cursor holds ...
    assert chunks_by_doc(settings) == indexed  # ... and nothing changed in the index

    fake.faults.clear()
    fake.hidden_spaces.add("ENG")  # now hidden: 404, and CQL leaves its pages out
    with pytest.raises(ConnectorError, match="no configured space can be read"):
        sync(settings, full=True)  # a full run would reconcile deletions
    failures = {i.doc_id: i for i in store.issues("wiki", kind="failed")}
    assert list(failures) == ["wiki:space:ENG"]
    assert "No space with key : ENG" in failures["wiki:space:ENG"].reason
    assert store.get("wiki").cursor == cursor
    assert chunks_by_doc(settings) == indexed  # nothing deleted

    fake.hidden_spaces.clear()  # access restored
    restored = sync(settings)
    assert restored["status"] == "completed"
    assert restored["documents_added"] == 1 and restored["documents_updated"] == 1
    assert set(chunks_by_doc(settings)) == {"wiki:10", "wiki:11"}
    assert "twice" in chunk_text(settings, "wiki:10")
    assert store.issues("wiki", kind="failed") == []
    assert store.get("wiki").cursor["when"] == (EPOCH + timedelta(hours=3)).isoformat()


def test_flow_a_space_that_cannot_be_read_fails_alone_and_its_cursor_holds(tmp_path, fake):
    """Issue 13 item 3: of two spaces, one the account cannot view (404 on the space,
    its content left out of CQL) and later one whose search is refused (403). The other
    space is synced and its cursor moves; the failed one is a failed entity with its
    reason, its cursor holds, and the next run with access restored picks it up."""
    for i in range(2):
        fake.add(f"1{i}", f"Eng page {i}", space="ENG",
                 body=f"<p>Engineering runbook {i}: restart the broker.</p>",
                 when=EPOCH + timedelta(minutes=i))
        fake.add(f"2{i}", f"Ops page {i}", space="OPS",
                 body=f"<p>Operations checklist {i}: rotate the keys.</p>",
                 when=EPOCH + timedelta(minutes=i))
    fake.hidden_spaces.add("OPS")
    settings = flow_settings(tmp_path, fake, spaces=["ENG", "OPS"])
    store = StateStore(settings.resolved_state_url)

    first = sync(settings)
    assert first["status"] == "completed_with_failures" and first["documents_added"] == 2
    assert set(chunks_by_doc(settings)) == {"wiki:10", "wiki:11"}
    failures = {i.doc_id: i.reason for i in store.issues("wiki", kind="failed")}
    assert list(failures) == ["wiki:space:OPS"] and "No space with key : OPS" in \
        failures["wiki:space:OPS"]
    cursor = store.get("wiki").cursor
    assert set(cursor["spaces"]) == {"ENG"}
    assert cursor["spaces"]["ENG"]["when"] == (EPOCH + timedelta(minutes=1)).isoformat()

    fake.hidden_spaces.clear()  # access restored
    second = sync(settings)
    assert second["status"] == "completed" and second["documents_added"] == 2
    assert set(chunks_by_doc(settings)) == {"wiki:10", "wiki:11", "wiki:20", "wiki:21"}
    assert store.issues("wiki", kind="failed") == []
    held = store.get("wiki").cursor["spaces"]["OPS"]

    # edits in both spaces; the OPS search is refused with 403
    fake.edit("11", body="<p>Engineering runbook 1: restart the broker twice.</p>",
              when=EPOCH + timedelta(hours=3))
    fake.edit("21", body="<p>Operations checklist 1: rotate the keys weekly.</p>",
              when=EPOCH + timedelta(hours=3))
    ops_search = lambda args: 'space = "OPS"' in args.get("cql", "")  # noqa: E731
    fake.fail(403, times=10, match=ops_search,
              body={"statusCode": 403, "message": "You are not permitted to search OPS"})
    third = sync(settings)
    assert third["status"] == "completed_with_failures" and third["documents_updated"] == 1
    failures = {i.doc_id: i.reason for i in store.issues("wiki", kind="failed")}
    assert list(failures) == ["wiki:space:OPS"] and "403" in failures["wiki:space:OPS"]
    cursor = store.get("wiki").cursor["spaces"]
    assert cursor["OPS"] == held  # held where it was ...
    assert cursor["ENG"]["when"] == (EPOCH + timedelta(hours=3)).isoformat()  # ... ENG moved

    fake.faults.clear()
    fourth = sync(settings)
    assert fourth["status"] == "completed" and fourth["documents_updated"] == 1
    assert "weekly" in chunk_text(settings, "wiki:21")
    assert store.issues("wiki", kind="failed") == []


def chunk_text(settings, doc_id) -> str:
    client = chromadb.PersistentClient(path=str(settings.chroma_path))
    res = client.get_collection(settings.chroma.collection).get(where={"doc_id": doc_id})
    return " ".join(res["documents"])

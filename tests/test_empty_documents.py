"""Documents with nothing to index (issue 13): recorded as ``skipped`` ("no text after
conversion"), counted as skipped, removed from the index if an earlier version was in
it, and never counted as added — for every source, through the real flow."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from flows.settings import Settings
from flows.state import StateStore
from flows.sync import NO_TEXT_REASON
from tests.confluence_server import EPOCH, FakeConfluence
from tests.conftest import REALDATA
from tests.test_sync import chunks_by_doc, sync

APACHE = REALDATA / "confluence" / "apache_cwiki_storage_pages" / "airflow_pages.json"


def _skipped(settings) -> dict[str, str]:
    state = StateStore(settings.resolved_state_url)
    try:
        return {i.doc_id: i.reason for i in state.issues(kind="skipped")}
    finally:
        state.close()


@pytest.fixture
def fake(httpserver) -> FakeConfluence:
    return FakeConfluence(httpserver)


@pytest.mark.realdata
@pytest.mark.skipif(not APACHE.is_file(), reason=f"shared real data not found at {APACHE}")
def test_real_confluence_page_of_headings_over_macros_is_skipped(tmp_path, fake):
    """Apache's page 132321764 "Meeting notes" is two headings over blueprint macros: it
    converts to headings only and chunks to nothing."""
    page = next(p for p in json.loads(APACHE.read_text(encoding="utf-8"))
                if str(p["id"]) == "132321764")
    fake.add("132321764", page["title"], body=page["body_html"], when=EPOCH)
    fake.add("11", "Short page", body="<p>The broker listens on port 9092.</p>",
             when=EPOCH + timedelta(minutes=5))
    settings = Settings(
        data_dir=tmp_path / "data",
        sources=[{"type": "confluence", "name": "wiki", "base_url": fake.url, "spaces": ["ENG"],
                  "backoff_initial_seconds": 0.01, "backoff_max_seconds": 0.05,
                  "max_retries": 2}],
        sync={"fetch_retry_delay_seconds": 0, "fetch_retries": 1, "reconcile_every": 0})

    first = sync(settings, "wiki")
    assert first["status"] == "completed"
    assert (first["documents_added"], first["documents_skipped"]) == (1, 1)
    assert set(chunks_by_doc(settings)) == {"wiki:11"}
    assert _skipped(settings) == {"wiki:132321764": NO_TEXT_REASON}

    again = sync(settings, "wiki", full=True)  # a --full re-read does not count it as added
    assert (again["documents_added"], again["documents_unchanged"],
            again["documents_skipped"]) == (0, 1, 1)
    assert _skipped(settings) == {"wiki:132321764": NO_TEXT_REASON}

    # the page gets text: it is indexed and its skipped record goes
    fake.edit("132321764", body=page["body_html"] + "<p>Meetings moved to the dev list.</p>")
    third = sync(settings, "wiki")
    assert third["documents_added"] == 1 and third["documents_skipped"] == 0
    assert set(chunks_by_doc(settings)) == {"wiki:11", "wiki:132321764"}
    assert _skipped(settings) == {}


def test_git_file_that_chunks_to_nothing_leaves_the_index(make_repo, make_settings):
    repo = make_repo({"guide.md": "# Guide\n\nRotate the signing keys every 90 days.\n",
                      "empty-toc.md": "# Contents\n\n## Part one\n\n## Part two\n"})
    settings = make_settings(repo)
    first = sync(settings)
    assert (first["documents_added"], first["documents_skipped"]) == (1, 1)
    assert set(chunks_by_doc(settings)) == {"src0:guide.md"}
    assert _skipped(settings) == {"src0:empty-toc.md": NO_TEXT_REASON}

    # an indexed file loses its text: removed from the index, recorded as skipped
    repo.commit({"guide.md": "# Guide\n"}, "strip")
    second = sync(settings)
    assert second["documents_skipped"] == 1 and second["documents_added"] == 0
    assert second["documents_deleted"] == 1
    assert chunks_by_doc(settings) == {}
    assert _skipped(settings) == {"src0:empty-toc.md": NO_TEXT_REASON,
                                  "src0:guide.md": NO_TEXT_REASON}
    assert sync(settings)["chunks_embedded"] == 0  # a no-op stays a no-op

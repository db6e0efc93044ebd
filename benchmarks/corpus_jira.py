"""The Jira corpus for ``ingest.py --corpus jira``: the Titanium archive of
``realdata/jira/tidev_jira_archive`` served on localhost by the Jira REST stand-in the
tests use (``fakes/jira_server.py``), so the sync goes through the real connector.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import ROOT

sys.path.insert(0, str(ROOT))

from fakes.jira_server import ARCHIVE_PROJECTS, FakeJira, load_archive  # noqa: E402


class BenchCorpus:
    """The Titanium issues served locally as a Jira source, for ``benchmarks/ingest.py``.

    ``issues`` issues (all when None) from every project of the archive, picked evenly;
    :meth:`edit` adds one comment to each of ``n`` issues (a small, realistic change).
    """

    name = "titanium"

    def __init__(self, realdata: Path, issues: int | None = None) -> None:
        from pytest_httpserver import HTTPServer

        every = load_archive(realdata)
        if issues is not None and issues < len(every):
            step = len(every) / issues
            every = [every[int(i * step)] for i in range(issues)]
        self.server = HTTPServer(host="127.0.0.1", port=0)
        self.server.start()
        self.fake = FakeJira(self.server, every, projects=ARCHIVE_PROJECTS)
        self.count = len(every)

    @property
    def source(self) -> dict[str, Any]:
        """The ``sources:`` entry of the settings."""
        return {"type": "jira", "name": self.name, "base_url": self.fake.url,
                "jql": "project in (DAEMON, MOD, ALOY, TIMOB)", "page_size": 100}

    def edit(self, n: int) -> list[str]:
        """Add a comment to ``n`` issues spread over the corpus; returns their keys."""
        keys = sorted(self.fake.issues)[:: max(1, self.count // max(1, n))][:n]
        now = datetime.now(UTC)
        for key in keys:
            self.fake.add_comment(key, "Benchmark follow-up: verified again on the latest "
                                  "SDK, the behaviour is unchanged.", "Bench User", now)
        return keys

    def close(self) -> None:
        self.server.stop()

"""The Confluence corpus for ``ingest.py --corpus confluence``: the 450 Apache wiki pages of
``realdata/confluence/apache_cwiki_storage_pages`` (KAFKA, FLINK, AIRFLOW; real storage
format) served on localhost by the same Confluence REST stand-in the tests use
(``fakes/confluence_server.py`` on a ``pytest_httpserver.HTTPServer``), so the sync goes
through the real connector: CQL search pages with bodies expanded, ``_links.next``,
checkpoints, user look-ups for mentions.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from common import ROOT

sys.path.insert(0, str(ROOT))

from fakes.confluence_server import FakeConfluence  # noqa: E402

CWIKI = Path("confluence") / "apache_cwiki_storage_pages"
EDIT_SENTENCE = " This sentence was added by the benchmark edit."


def _ancestors(path: str) -> list[tuple[str, str]]:
    titles = [t.strip() for t in path.split(" > ") if t.strip()]
    return [(str(int(hashlib.sha1(t.encode()).hexdigest()[:8], 16)), t) for t in titles]


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


class ConfluenceCorpus:
    """The pages on a local server. Args: ``realdata`` root, ``n`` pages (seeded sample;
    ``None`` = all 450)."""

    source = "cwiki"

    def __init__(self, realdata: Path, n: int | None = None, seed: int = 7) -> None:
        from pytest_httpserver import HTTPServer

        folder = realdata / CWIKI
        if not folder.is_dir():
            sys.exit(f"real data not found: {folder} (set --realdata or KBSYNC_REALDATA)")
        pages: list[dict[str, Any]] = []
        for name in ("kafka", "flink", "airflow"):
            pages += json.loads((folder / f"{name}_pages.json").read_text(encoding="utf-8"))
        if n is not None and n < len(pages):
            pages = sorted(random.Random(seed).sample(pages, n), key=lambda p: p["id"])
        self.pages = pages
        self.server = HTTPServer()
        self.server.start()
        spaces = {p["space_key"]: p["space_name"] for p in pages}
        self.fake = FakeConfluence(self.server, context="/confluence", spaces=spaces)
        for page in pages:
            self.fake.users[page["author"]] = page["author"]
            self.fake.add(page["id"], page["title"], space=page["space_key"],
                          body=page["body_html"], when=_when(page["last_modified"]),
                          author=page["author"], modifier=page["author"],
                          ancestors=_ancestors(page["ancestor_path"]), labels=page["labels"])

    def __len__(self) -> int:
        return len(self.pages)

    def settings(self, data_dir: Path, **extra: Any):
        from flows.settings import Settings

        return Settings(data_dir=data_dir, sources=[{
            "type": "confluence", "name": self.source, "base_url": self.fake.url,
            "spaces": sorted(self.fake.spaces), "page_size": 50}], **extra)

    def edit(self, count: int) -> list[str]:
        """Edit ``count`` pages (spread over the corpus): one sentence added to the middle
        paragraph, a new version one minute after the newest page. Returns their ids."""
        ids = sorted(self.fake.contents)
        chosen = ids[:: max(1, len(ids) // count)][:count]
        newest = max(c.when for c in self.fake.contents.values())
        for cid in chosen:
            body = self.fake.contents[cid].body
            ends = [m.start() for m in re.finditer("</p>", body)]
            if ends:
                cut = ends[len(ends) // 2]
                body = body[:cut] + EDIT_SENTENCE + body[cut:]
            else:
                body += f"<p>{EDIT_SENTENCE.strip()}</p>"
            self.fake.edit(cid, body=body, when=newest + timedelta(minutes=1))
        return chosen

    def stop(self) -> None:
        self.server.stop()

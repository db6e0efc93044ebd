"""GitLab source: what a full and an incremental read cost, in HTTP requests and seconds.

Serves a project with ``--issues`` issues and ``--mrs`` merge requests (each with
``--notes`` user notes plus one system note) and ``--wiki`` wiki pages from the GitLab
API fake of the tests (``fakes/gitlab_server.py``, real HTTP on localhost, GitLab's
pagination headers), and measures the connector alone (no embedding):

* full read: seconds, documents/s, requests;
* incremental read after new notes on 1% of the issues (old ones): seconds, documents
  read again (the changed ones plus the overlap window), requests;
* incremental read with nothing changed: seconds, requests.

With ``--flow`` it also runs the real sync flow into an embedded Chroma (full, no-op,
1% notes) and reports chunks embedded.

    .venv/bin/python benchmarks/gitlab_fetch.py --issues 500 --mrs 200 --wiki 50
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common import ROOT, print_table, run_flow, warm_up_prefect, write_json

WORDS = ("deploy registry token runner cache artifact upload retry timeout rollback "
         "database migration credentials pipeline stage review branch release backup "
         "monitoring alert latency quota replica index schema job").split()


def sentence(rng: random.Random, n: int = 14) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def build(fake, project: dict, args, rng: random.Random) -> None:
    pid = project["id"]
    fake.items[(pid, "issues")].clear()
    fake.items[(pid, "merge_requests")].clear()
    fake.wikis[pid].clear()
    fake.discussions.clear()
    start = datetime(2023, 1, 1, tzinfo=UTC)
    for part, count in (("issues", args.issues), ("merge_requests", args.mrs)):
        for iid in range(1, count + 1):
            when = start + timedelta(hours=iid)
            fake.add_item(pid, part, iid, sentence(rng, 8), when=when,
                          description="\n\n".join(sentence(rng) for _ in range(4)))
            for k in range(args.notes):
                fake.add_note(pid, part, iid, sentence(rng, 20), when=when + timedelta(minutes=k))
            fake.add_note(pid, part, iid, "changed the description", system=True,
                          when=when + timedelta(minutes=args.notes))
    for i in range(args.wiki):
        slug = f"page-{i}"
        fake.wikis[pid][slug] = {"format": "markdown", "slug": slug, "title": slug,
                                 "encoding": "UTF-8",
                                 "content": "\n\n".join(sentence(rng) for _ in range(6))}


def timed_read(conn, request):
    start = time.perf_counter()
    pages = list(conn.fetch(request))
    seconds = time.perf_counter() - start
    docs = sum(len(p.documents) for p in pages)
    return pages, docs, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--issues", type=int, default=500)
    parser.add_argument("--mrs", type=int, default=200)
    parser.add_argument("--notes", type=int, default=3, help="user notes per issue/MR")
    parser.add_argument("--wiki", type=int, default=50)
    parser.add_argument("--flow", action="store_true", help="also run the real sync flow")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from pytest_httpserver import HTTPServer

    from connectors.base import FetchRequest
    from connectors.gitlab import GitLabConnector, GitLabSourceOptions
    from fakes.gitlab_server import GitLabFake, gitlab_time

    rng = random.Random(7)
    server = HTTPServer()
    server.start()
    try:
        fake = GitLabFake(server)
        project = fake.load_fixtures()
        build(fake, project, args, rng)
        path = project["path_with_namespace"]
        parts = ["issues", "merge_requests", "wiki"]
        with tempfile.TemporaryDirectory(prefix="kbsync-bench-gitlab-") as tmp:
            conn = GitLabConnector(GitLabSourceOptions(
                name="bench", base_url=fake.base_url, token=fake.token, projects=[path],
                parts=parts), data_dir=Path(tmp))
            rows: list[tuple[str, object]] = []
            result: dict[str, object] = {"issues": args.issues, "merge_requests": args.mrs,
                                         "notes_per_item": args.notes, "wiki_pages": args.wiki}

            fake.requests.clear()
            pages, docs, seconds = timed_read(conn, FetchRequest())
            cursor = pages[-1].cursor
            result["full"] = {"seconds": seconds, "documents": docs,
                              "documents_per_second": docs / seconds,
                              "requests": len(fake.requests), "pages": len(pages)}
            rows += [("full read: documents", docs), ("full read: seconds", seconds),
                     ("full read: documents/s", docs / seconds),
                     ("full read: HTTP requests", len(fake.requests))]

            changed = max(1, args.issues // 100)
            now = datetime.now(UTC)
            for iid in rng.sample(range(1, args.issues + 1), changed):
                fake.add_note(project["id"], "issues", iid, sentence(rng, 20), when=now)
            fake.requests.clear()
            pages, docs, seconds = timed_read(conn, FetchRequest(cursor=cursor))
            result["incremental_1pct"] = {"seconds": seconds, "documents": docs,
                                          "changed": changed, "requests": len(fake.requests)}
            rows += [(f"incremental, {changed} issues with a new note: documents", docs),
                     ("incremental: seconds", seconds),
                     ("incremental: HTTP requests", len(fake.requests))]

            fake.requests.clear()
            _, docs, seconds = timed_read(conn, FetchRequest(cursor=pages[-1].cursor))
            result["incremental_nothing_changed"] = {"seconds": seconds, "documents": docs,
                                                     "requests": len(fake.requests)}
            rows += [("no change: documents", docs), ("no change: seconds", seconds),
                     ("no change: HTTP requests", len(fake.requests))]
            conn.close()

            if args.flow:
                from flows.settings import Settings

                build(fake, project, args, random.Random(7))
                settings = Settings(
                    data_dir=Path(tmp) / "data",
                    sources=[{"type": "gitlab", "name": "bench", "base_url": fake.base_url,
                              "token": fake.token, "projects": [path], "parts": parts}],
                    sync={"reconcile_every": 0})
                warm_up_prefect()
                from transforms.embedding import load_embedder

                load_embedder(settings.embedding.spec())
                flow_rows = {}
                for label in ("full", "no-op", "1% notes"):
                    if label == "1% notes":
                        when = datetime.now(UTC)
                        for iid in random.Random(8).sample(range(1, args.issues + 1), changed):
                            fake.add_note(project["id"], "issues", iid, sentence(rng, 20),
                                          when=when)
                    summary, seconds = run_flow(settings, "bench")
                    flow_rows[label] = {"seconds": seconds,
                                        "chunks_embedded": summary["chunks_embedded"],
                                        "documents_updated": summary["documents_updated"],
                                        "documents_unchanged": summary["documents_unchanged"]}
                    rows += [(f"flow {label}: seconds", seconds),
                             (f"flow {label}: chunks embedded", summary["chunks_embedded"]),
                             (f"flow {label}: documents updated", summary["documents_updated"])]
                result["flow"] = flow_rows
            result["measured_at"] = gitlab_time(datetime.now(UTC))
    finally:
        server.clear()
        if server.is_running():
            server.stop()

    print_table("GitLab source (API fake on localhost)", rows)
    out = write_json("gitlab_fetch", result, args.out)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()

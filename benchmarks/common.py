"""Shared pieces of the benchmarks: the real data, a temp git repo, running the flow,
printing a table and writing JSON."""

from __future__ import annotations

import csv
import json
import os
import random
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flows  # noqa: E402,F401 - telemetry off before prefect is imported

DEFAULT_REALDATA = Path(os.environ.get("KBSYNC_REALDATA", ROOT.parent / "shared" / "realdata"))
AWS = Path("docs_qa") / "aws_documentation_qa"


def aws_corpus(realdata: Path, into: Path) -> Path:
    """Unpack the AWS documentation tarball once under ``into``; returns ``documents/``."""
    docs = into / "documents"
    if not docs.is_dir():
        tarball = realdata / AWS / "aws_docs_14_guides_doc_source.tar.gz"
        if not tarball.is_file():
            sys.exit(f"real data not found: {tarball} (set --realdata or KBSYNC_REALDATA)")
        with tarfile.open(tarball) as tar:
            tar.extractall(into, filter="data")
    return docs


def aws_questions(realdata: Path) -> list[dict[str, str]]:
    """The 100 hand-written questions with their gold document (``guide/file.md``)."""
    with open(realdata / AWS / "QA_true.csv", encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["Document_True"] = row["Document_True"].strip()
    return rows


def corpus_files(docs: Path) -> dict[str, Path]:
    """``"<guide>/<file>.md" -> path`` for every Markdown page of the corpus."""
    return {f"{p.parent.parent.name}/{p.name}": p
            for p in sorted(docs.glob("*/doc_source/*.md"))}


def pick(files: dict[str, Path], n: int | None, must: set[str] = frozenset(),
         seed: int = 7) -> dict[str, Path]:
    """``must`` plus a seeded random sample up to ``n`` files (all when ``n`` is None)."""
    if n is None or n >= len(files):
        return dict(files)
    rest = sorted(set(files) - set(must))
    chosen = set(must) | set(random.Random(seed).sample(rest, max(0, n - len(must))))
    return {k: files[k] for k in sorted(chosen)}


def commit_repo(files: dict[str, Path], path: Path):
    """A real git repository at ``path`` holding ``files`` (one commit)."""
    import git

    repo = git.Repo.init(path, initial_branch="main")
    with repo.config_writer() as cfg:
        cfg.set_value("user", "name", "bench")
        cfg.set_value("user", "email", "bench@example.com")
    for rel, src in files.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes())
    repo.git.add("-A")
    repo.index.commit("corpus")
    return repo


def settings_for(repo_path: Path, data_dir: Path, name: str = "aws", **extra: Any):
    from flows.settings import Settings

    return Settings(data_dir=data_dir,
                    sources=[{"type": "git", "name": name, "url": str(repo_path)}], **extra)


def run_flow(settings, source: str, **kwargs) -> tuple[dict[str, Any], float]:
    """Run the real sync flow as ``kbsync sync`` runs it (without Prefect's flow-run
    heartbeats, ``flows.cli.without_flow_heartbeats``: with them, a run's wall time ends
    on a whole second of the heartbeat thread's clock); returns (summary, wall seconds
    of the flow run)."""
    from prefect import flow

    from flows.cli import without_flow_heartbeats
    from flows.sync import run_sync

    @flow(name="benchmark-sync")
    def _bench():
        return run_sync(settings, source, **kwargs).to_dict()

    with without_flow_heartbeats():
        start = time.perf_counter()
        summary = _bench()
        return summary, time.perf_counter() - start


def warm_up_prefect() -> float:
    """Start the ephemeral Prefect server with a trivial flow; returns its seconds."""
    from prefect import flow

    @flow(name="benchmark-warm-up")
    def _noop():
        return 1

    start = time.perf_counter()
    _noop()
    return time.perf_counter() - start


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    Console().print(table)


def write_json(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    out = out or ROOT / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str))
    return out

"""Chaos: real ``kbsync sync`` processes killed with SIGKILL at seeded random points,
then resumed; the index must end equal to a clean build.

Each round starts ``python -m flows.cli sync <source>`` on a real git repository of AWS
documentation pages (``docs_qa/aws_documentation_qa``), kills its whole process group
with SIGKILL at a seeded random point of its work (after it took its lease), and
immediately starts the next run. A run that
completes before its kill point gets a new commit (edits, additions, deletions) so the
next one has work. After the last kill the source is synced to the end, a clean build of
the final commit is made in a fresh data dir, and the two indexes are compared.

Measured per kill: whether the next run could start at once or was refused because the
dead run's lease was held (then the seconds until that lease runs out are read from the
state database — the wait a cron-driven source would see — and the lease row is deleted
by hand, the only recovery the old code offered, so the chaos can go on).

Figures: kills survived (the final index equals the clean build), lost chunks (in the
clean build, not in the index), extra chunks (in the index, not in the clean build —
duplicates or stale versions), documents incomplete, lexical index = Chroma, seconds
until the source syncs again after a kill (max and median), chunks embedded by a no-op.

Runs against any checkout: ``--code DIR`` is put first on the subprocesses' PYTHONPATH,
so ``--code /work/main`` measures main and the default measures this tree.

    python benchmarks/chaos.py --kills 8 --docs 40 --seed 13 [--full-kills 4] [--code /work/main]

Prints a table and writes JSON (``--out``, default ``benchmarks/results/chaos.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import DEFAULT_REALDATA, aws_corpus, corpus_files  # noqa: E402

SOURCE = "aws"
BUSY_MARK = "being synced by another run"


@dataclass
class KillRecord:
    """One SIGKILL: when (seconds into the run), and how long until the source could be
    synced again (``computed`` when read from the lease's expiry instead of observed)."""

    round: int
    delay_s: float
    killed: bool
    phase: str = "full"
    resume_wait_s: float = 0.0
    refused: bool = False
    computed: bool = False


@dataclass
class ChaosResult:
    code: str
    docs: int
    seed: int
    kills_attempted: int = 0
    kills: int = 0
    kills_full: int = 0
    kills_incremental: int = 0
    kills_survived: int = 0
    runs_completed_before_kill: int = 0
    refused_runs: int = 0
    resume_wait_max_s: float = 0.0
    resume_wait_median_s: float = 0.0
    lost_chunks: int = 0
    extra_chunks: int = 0
    incomplete_documents: int = 0
    lexical_equals_chroma: bool = False
    index_equals_clean_build: bool = False
    noop_chunks_embedded: int | None = None
    chunks: int = 0
    seconds_total: float = 0.0
    records: list[KillRecord] = field(default_factory=list)

    def rows(self) -> list[tuple[str, Any]]:
        return [(k, v) for k, v in asdict(self).items() if k != "records"]


# ----------------------------------------------------------------------------- setup


class ChaosRepo:
    """A real git repository of AWS pages that changes between rounds."""

    def __init__(self, path: Path, files: dict[str, Path], docs: int, rng: random.Random):
        import git

        self.path, self.rng = path, rng
        self.pool = sorted(files)
        self.files = files
        self.repo = git.Repo.init(path, initial_branch="main")
        with self.repo.config_writer() as cfg:
            cfg.set_value("user", "name", "chaos")
            cfg.set_value("user", "email", "chaos@example.com")
        first = rng.sample(self.pool, docs)
        self.present: set[str] = set()
        self._write({rel: files[rel].read_text(encoding="utf-8") for rel in first})
        self.repo.index.commit("initial corpus")

    def _write(self, contents: dict[str, str]) -> None:
        for rel, text in contents.items():
            target = self.path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            self.present.add(rel)
        self.repo.index.add(list(contents))

    def change(self, n: int) -> None:
        """One commit with ~n edits, ~n/2 additions and ~n/2 deletions."""
        present = sorted(self.present)
        edits = self.rng.sample(present, min(n, len(present)))
        rest = [p for p in present if p not in edits]
        deletes = self.rng.sample(rest, min(max(1, n // 2), max(0, len(rest) - 2)))
        absent = [p for p in self.pool if p not in self.present]
        adds = self.rng.sample(absent, min(max(1, n // 2), len(absent)))
        contents = {}
        for rel in edits:
            text = (self.path / rel).read_text(encoding="utf-8")
            lines = text.splitlines()
            at = self.rng.randrange(len(lines) + 1)
            lines.insert(at, f"\nRevision note {self.rng.randrange(10**6)}: this procedure was "
                             "reviewed and the steps above still apply.\n")
            contents[rel] = "\n".join(lines) + "\n"
        contents.update({rel: self.files[rel].read_text(encoding="utf-8") for rel in adds})
        self._write(contents)
        if deletes:
            self.repo.index.remove(deletes, working_tree=True)
            self.present -= set(deletes)
        self.repo.index.commit("edits, additions, deletions")


def write_config(data_dir: Path, repo: Path, config: Path) -> Path:
    import yaml

    config.write_text(yaml.safe_dump({
        "data_dir": str(data_dir),
        "sources": [{"type": "git", "name": SOURCE, "url": str(repo)}],
        "sync": {"fetch_retries": 0},
    }))
    return config


def cli_env(code: Path, api_url: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    for var in ("KBSYNC_CONFIG", "KBSYNC_STATE_URL", "KBSYNC_DATA_DIR", "KBSYNC_SOURCES"):
        env.pop(var, None)
    return env


def start_sync(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``kbsync sync aws`` as its own process group (so SIGKILL takes all of it)."""
    out = open(log, "a", encoding="utf-8")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "--config", str(config), "sync",
                             SOURCE], stdout=out, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, cwd=config.parent)


def run_sync_cli(config: Path, env: dict[str, str], log: Path, timeout: float = 900
                 ) -> tuple[int, str]:
    before = log.stat().st_size if log.exists() else 0
    proc = start_sync(config, env, log)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with open(log, encoding="utf-8", errors="replace") as fh:
        fh.seek(before)
        return proc.returncode, fh.read()


# ------------------------------------------------------------------------- inspection


def _state_db(data_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(data_dir / "state.db")


def lease_expiry(data_dir: Path) -> datetime | None:
    with _state_db(data_dir) as db:
        row = db.execute("select expires_at from source_locks where name = ?",
                         (SOURCE,)).fetchone()
    if row is None:
        return None
    when = datetime.fromisoformat(str(row[0]))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def delete_lease(data_dir: Path) -> None:
    with _state_db(data_dir) as db:
        db.execute("delete from source_locks where name = ?", (SOURCE,))


def last_summary(data_dir: Path) -> dict[str, Any]:
    with _state_db(data_dir) as db:
        row = db.execute("select last_summary from sources where name = ?", (SOURCE,)).fetchone()
    return json.loads(row[0]) if row and row[0] else {}


def index_snapshot(data_dir: Path) -> dict[str, Any]:
    """Chunk ids per document, document hashes, completeness and the lexical ids."""
    from connectors.chroma import ChromaStore

    store = ChromaStore(path=data_dir / "chroma")
    res = store.collection(create=False).get(include=["metadatas"])
    held = store.indexed_documents({meta["doc_id"] for meta in res["metadatas"]})
    docs = {d: set(doc.chunk_ids) for d, doc in held.items()}
    # the sync's own rule of a completed write (its head's hash and count)
    incomplete = sorted(d for d, doc in held.items() if doc.complete_hash is None)
    lexical_ids: set[str] | None = None
    lexical = data_dir / "lexical.db"
    if lexical.exists():
        from connectors.lexical import LexicalIndex

        index = LexicalIndex(lexical)
        lexical_ids = index.ids()
        index.close()
    return {"ids": set(res["ids"]), "docs": docs, "incomplete": incomplete,
            "hashes": {d: next(iter(doc.heads))[0] for d, doc in held.items()},
            "lexical": lexical_ids}


# ------------------------------------------------------------------------------ chaos


def _holder_pid(data_dir: Path) -> int | None:
    """The pid in the source's lease owner (``...@host:pid``), or None."""
    try:
        with _state_db(data_dir) as db:
            row = db.execute("select owner from source_locks where name = ?",
                             (SOURCE,)).fetchone()
    except sqlite3.Error:
        return None
    if row is None or ":" not in row[0]:
        return None
    tail = row[0].rsplit(":", 1)[1]
    return int(tail) if tail.isdigit() else None


def _output(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""


def _wait_for_lease(proc: subprocess.Popen, data_dir: Path, timeout: float = 600) -> float:
    """Wait until ``proc`` holds the source's lease (or exits); returns the monotonic
    clock at that moment."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and _holder_pid(data_dir) != proc.pid:
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {proc.pid} did not take the lease in {timeout:g} s")
        time.sleep(0.1)
    return time.monotonic()


def run_chaos(*, work: Path, code: Path, docs: int, kills: int, seed: int,
              api_url: str | None, realdata: Path = DEFAULT_REALDATA, change_size: int = 4,
              max_file_bytes: int | None = None, span: float | None = None,
              full_kills: int | None = None, log=print) -> ChaosResult:
    """Run the chaos rounds and compare with a clean build; see the module docstring.

    An uninterrupted calibration run (a clean build of the initial commit, in a data dir
    of its own) measures how long a run works once it holds its lease. Then the initial
    (full) sync starts; each run is killed at a point drawn uniformly in 5-100 % of that
    span after it took the lease (so kills land in fetching, chunking, embedding and
    writing, not in the process start), and the next run starts at once; its wait is
    measured from the kill until it holds the lease (read from the state database). A
    run that completes before its kill point gets a new commit; if it started on a new
    commit (not a resume after a kill) its time is the span for the next ones. After
    ``kills`` kills, the last run goes to the end.

    Args:
        work: an empty directory for the repository, data dirs, logs.
        code: the checkout whose ``flows.cli`` runs (first on PYTHONPATH).
        docs: pages in the initial commit.
        kills: SIGKILLs to deliver (a run that completes first does not count).
        seed: seeds the corpus sample, the changes and the kill points.
        api_url: the Prefect API the runs report to (None: each starts its own).
        max_file_bytes: sample only pages up to this size (small, fast rounds).
        span: seconds a run works once it holds its lease, instead of calibrating it
            (saves the calibration run in the fast test).
        full_kills: the most kills delivered to the first (full) sync; after them it
            runs to its end, one uninterrupted incremental round measures the span of
            an incremental run, and the remaining kills hit incremental rounds (edits,
            additions, deletions). ``None``: kills fall wherever the seeded points put
            them (a long full sync can take all of them).
    """
    started = time.monotonic()
    rng = random.Random(seed)
    files = corpus_files(aws_corpus(realdata, work / "corpus"))
    if max_file_bytes:
        files = {k: p for k, p in files.items() if p.stat().st_size <= max_file_bytes}
    repo = ChaosRepo(work / "repo", files, docs, rng)
    data = work / "data"
    config = write_config(data, repo.path, work / "kbsync.yaml")
    env = cli_env(code, api_url)
    logs = work / "runs"
    logs.mkdir()
    result = ChaosResult(code=str(code), docs=docs, seed=seed)
    runs = 0

    def start(cfg: Path = config) -> subprocess.Popen:
        nonlocal runs
        runs += 1
        return start_sync(cfg, env, logs / f"{runs:02d}.log")

    def output() -> str:
        return _output(logs / f"{runs:02d}.log")

    if span is None:
        calibration = start(write_config(work / "calibration", repo.path, work / "calib.yaml"))
        held = _wait_for_lease(calibration, work / "calibration")
        if calibration.wait(timeout=1800) != 0:
            raise RuntimeError(f"the calibration run failed:\n{output()[-3000:]}")
        span = time.monotonic() - held
        log(f"calibration: a full sync works {span:.1f} s once it holds the lease")

    proc = start()
    held = _wait_for_lease(proc, data)
    completed = False  # whether the first (full) sync finished: later kills hit increments
    fresh = True  # whether the running run started a read (not a resume after a kill)
    while result.kills < kills and result.kills_attempted < kills * 3:
        if not completed and full_kills is not None and result.kills >= full_kills:
            # the full sync had its kills: let it end, then time an incremental round
            if proc.wait(timeout=1800) != 0:
                raise RuntimeError(f"a run failed (rc {proc.returncode}):\n{output()[-3000:]}")
            completed = True
            repo.change(change_size)
            proc = start()
            held = _wait_for_lease(proc, data)
            if proc.wait(timeout=1800) != 0:
                raise RuntimeError(f"a run failed (rc {proc.returncode}):\n{output()[-3000:]}")
            span = time.monotonic() - held
            log(f"run {runs}: an uninterrupted incremental round works {span:.1f} s")
            repo.change(change_size)
            proc, fresh = start(), True
            held = _wait_for_lease(proc, data)
            continue
        result.kills_attempted += 1
        delay = rng.uniform(0.05, 1.0) * span
        try:
            proc.wait(timeout=max(0.0, delay - (time.monotonic() - held)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        else:
            if proc.returncode != 0:
                raise RuntimeError(f"a run failed (rc {proc.returncode}):\n{output()[-3000:]}")
            result.runs_completed_before_kill += 1
            completed = True
            worked = time.monotonic() - held
            if fresh:  # a resumed run's rest of the work is no measure of a whole run
                span = worked
            log(f"run {runs}: completed ({worked:.1f} s) before its kill point ({delay:.1f} s)")
            repo.change(change_size)
            proc, fresh = start(), True
            held = _wait_for_lease(proc, data)
            continue
        killed_at, kill_clock = datetime.now(UTC), time.monotonic()
        result.kills += 1
        phase = "incremental" if completed else "full"
        if completed:
            result.kills_incremental += 1
        else:
            result.kills_full += 1
        record = KillRecord(runs, round(delay, 2), True, phase)
        proc, fresh = start(), False
        held = _wait_for_lease(proc, data)
        if proc.returncode not in (None, 0) and BUSY_MARK in output():
            record.refused = record.computed = True
            result.refused_runs += 1
            expiry = lease_expiry(data)
            record.resume_wait_s = round(max(0.0, (expiry - killed_at).total_seconds())
                                         if expiry else 0.0, 1)
            delete_lease(data)  # the old code's only recovery: by hand
            log(f"run {runs}: refused after the kill at {delay:.1f} s; the dead run's lease "
                f"would free the source after {record.resume_wait_s:.0f} s")
            proc = start()
            held = _wait_for_lease(proc, data)
        elif proc.returncode not in (None, 0):
            raise RuntimeError(f"the run after a kill failed (rc {proc.returncode}):\n"
                               f"{output()[-3000:]}")
        else:
            record.resume_wait_s = round(held - kill_clock, 1)
            log(f"run {runs - 1} ({phase}): killed {delay:.1f} s into its work; run {runs} "
                f"held the lease {record.resume_wait_s:.1f} s after the kill")
        if proc.returncode == 0:
            completed = True  # it already finished: give the next round work
            repo.change(change_size)
            proc, fresh = start(), True
            held = _wait_for_lease(proc, data)
        result.records.append(record)

    proc.wait(timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"the final sync failed (rc {proc.returncode}):\n"
                           f"{output()[-3000:]}")
    # then a no-op
    rc, out = run_sync_cli(config, env, logs / "noop.log")
    result.noop_chunks_embedded = last_summary(data).get("chunks_embedded") if rc == 0 else None

    # a clean build of the final commit
    clean = work / "clean"
    clean_config = write_config(clean, repo.path, work / "clean.yaml")
    rc, out = run_sync_cli(clean_config, env, work / "clean.log")
    if rc != 0:
        raise RuntimeError(f"the clean build failed (rc {rc}):\n{out[-3000:]}")

    got, want = index_snapshot(data), index_snapshot(clean)
    result.chunks = len(want["ids"])
    result.lost_chunks = len(want["ids"] - got["ids"])
    result.extra_chunks = len(got["ids"] - want["ids"])
    result.incomplete_documents = len(got["incomplete"]) + sum(
        1 for d, h in want["hashes"].items() if got["hashes"].get(d) != h)
    result.lexical_equals_chroma = got["lexical"] is None or got["lexical"] == got["ids"]
    result.index_equals_clean_build = (got["docs"] == want["docs"] and not got["incomplete"]
                                       and result.lexical_equals_chroma)
    result.kills_survived = result.kills if result.index_equals_clean_build else 0
    waits = [r.resume_wait_s for r in result.records] or [0.0]
    result.resume_wait_max_s = max(waits)
    result.resume_wait_median_s = statistics.median(waits)
    result.seconds_total = round(time.monotonic() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--docs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--change-size", type=int, default=4)
    parser.add_argument("--full-kills", type=int, default=None,
                        help="most kills in the first full sync (default: half of --kills)")
    parser.add_argument("--code", type=Path, default=ROOT,
                        help="checkout whose kbsync runs (default: this one)")
    parser.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA)
    parser.add_argument("--max-file-bytes", type=int, default=12000)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default benchmarks/results/chaos.json)")
    args = parser.parse_args()

    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with tempfile.TemporaryDirectory(prefix="kbsync-chaos-") as tmp, \
            prefect_test_harness(server_startup_timeout=120):
        result = run_chaos(work=Path(tmp), code=args.code.resolve(), docs=args.docs,
                           kills=args.kills, seed=args.seed, api_url=PREFECT_API_URL.value(),
                           realdata=args.realdata, change_size=args.change_size,
                           max_file_bytes=args.max_file_bytes,
                           full_kills=args.kills // 2 if args.full_kills is None
                           else args.full_kills)
    from benchmarks.common import print_table, write_json

    print_table(f"chaos: {args.kills} x SIGKILL, {args.docs} AWS pages, seed {args.seed}, "
                f"code {args.code}", result.rows())
    print(f"wrote {write_json('chaos', asdict(result), args.out)}")


if __name__ == "__main__":
    main()

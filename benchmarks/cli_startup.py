"""CLI start-up: wall time of `kbsync query` and of a `kbsync sync` with nothing to do,
each run as a fresh process (as a user runs them), against the 3 s target.

A small git repository is synced once (not measured); then each command runs ``--runs``
times under ``/usr/bin/time`` (wall, user, sys seconds, peak RSS). The no-op sync is
measured twice: with Prefect's temporary server (nothing started; the default) and
against a real local server kept by ``kbsync server start``. With ``--infinity`` (the
default when ``.venv-infinity`` exists) ``kbsync query`` is also timed with
``embedding.backend: openai`` against a real Infinity server on this machine (issue 11's
1.5 s target); the local query uses the model's ONNX export (made by the initial sync). ``python -X importtime``
of one ``kbsync query`` says where its import time goes. The machine's load average is
recorded: on a shared machine the figures move with it.

    .venv/bin/python benchmarks/cli_startup.py [--runs 5] [--target 3]

Prints a table and writes benchmarks/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, print_table, write_json

TIME = "/usr/bin/time"
QUESTION = "when are card transactions settled?"


def kbsync(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def env() -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p), "HF_HUB_OFFLINE": "1"}
    out.pop("PREFECT_API_URL", None)
    return out


def timed(cmd: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> dict[str, float]:
    """One run under /usr/bin/time: wall, user, sys seconds and peak RSS (MiB)."""
    fmt = "KBSYNC_TIME %e %U %S %M"
    start = time.perf_counter()
    proc = subprocess.run([TIME, "-f", fmt, *cmd], cwd=cwd, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    match = re.search(r"KBSYNC_TIME ([\d.]+) ([\d.]+) ([\d.]+) (\d+)", proc.stderr)
    assert match, proc.stderr[-500:]
    e, u, s, m = match.groups()
    return {"wall": float(e), "user": float(u), "sys": float(s), "rss_mib": int(m) / 1024,
            "wall_measured": round(wall, 3)}


def series(label: str, cmd: list[str], cwd: Path, runs: int,
           extra_env: dict[str, str] | None = None) -> dict[str, object]:
    results = [timed(cmd, cwd, extra_env) for _ in range(runs)]
    walls = [r["wall"] for r in results]
    out = {"command": " ".join(cmd[2:]), "runs": results, "wall_median": statistics.median(walls),
           "wall_max": max(walls), "cpu_median": statistics.median(
               r["user"] + r["sys"] for r in results)}
    print(f"{label}: wall {', '.join(f'{w:.2f}' for w in walls)} s", flush=True)
    return out


def import_profile(cmd: list[str], cwd: Path, top: int = 12) -> list[tuple[str, float]]:
    """The ``top`` top-level imports of one run by cumulative seconds (-X importtime)."""
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], cwd=cwd, env=env(),
                          capture_output=True, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)", line)
        if m and len(m.group(2)) <= 1:  # top-level imports only
            rows.append((m.group(3), int(m.group(1)) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--target", type=float, default=3.0, help="seconds of wall time")
    parser.add_argument("--remote-target", type=float, default=1.5,
                        help="seconds of wall time of a query with a remote embedder")
    parser.add_argument("--infinity", default=os.environ.get(
        "KBSYNC_INFINITY", str(ROOT / ".venv-infinity" / "bin" / "infinity_emb")),
        help="infinity_emb binary for the remote-embedder query ('' to skip)")
    args = parser.parse_args()
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="kbsync-cli-bench-") as tmp:
        work = Path(tmp)
        repo = work / "repo"
        repo.mkdir()
        (repo / "README.md").write_text("# Payments\n\nThe payments service settles card "
                                        "transactions every night at 02:00 UTC.\n")
        (repo / "settle.py").write_text("def settle(batch):\n    return [t for t in batch]\n")
        for git in (["init", "-q", "-b", "main"], ["add", "-A"],
                    ["-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "init"]):
            subprocess.run(["git", *git], cwd=repo, check=True)
        (work / "kbsync.yaml").write_text(
            f"data_dir: {work / 'data'}\nsources:\n  - type: git\n    name: payments\n"
            f"    url: {repo}\n")
        timed(kbsync("sync"), work)  # the initial sync: not measured

        query = series("query", kbsync("query", QUESTION, "-k", "2"), work, args.runs)
        remote = None
        if args.infinity and Path(args.infinity).exists():
            from remote_embed import start_infinity

            from connectors.llm_server import free_port

            port = free_port()
            proc, _ = start_infinity(args.infinity, port, "cpu", work / "infinity.log", 32)
            try:
                remote = series("query, remote embedder (Infinity)",
                                kbsync("query", QUESTION, "-k", "2"), work, args.runs,
                                {"KBSYNC_EMBEDDING__BACKEND": "openai",
                                 "KBSYNC_EMBEDDING__BASE_URL": f"http://127.0.0.1:{port}"})
            finally:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=30)
        noop = series("no-op sync (temporary Prefect server)", kbsync("sync"), work, args.runs)
        subprocess.run(kbsync("server", "start"), cwd=work, env=env(), check=True,
                       capture_output=True)
        try:
            noop_server = series("no-op sync (kbsync server start)", kbsync("sync"), work,
                                 args.runs)
        finally:
            subprocess.run(kbsync("server", "stop"), cwd=work, env=env(), capture_output=True)
        profile = import_profile(kbsync("query", QUESTION, "-k", "2"), work)

    load_after = os.getloadavg()
    rows: list[tuple[str, object]] = [("runs per command", args.runs),
                                      ("target wall seconds", args.target),
                                      ("target wall seconds, remote-embedder query",
                                       args.remote_target)]
    measured = {"query": query, "noop_sync_temporary_server": noop,
                "noop_sync_local_server": noop_server}
    if remote is not None:
        measured["query_remote_embedder"] = remote
    for key, m in measured.items():
        target = args.remote_target if key == "query_remote_embedder" else args.target
        verdict = "met" if m["wall_max"] <= target else "MISSED"
        rows += [(f"{key}: wall median / max (s)",
                  f"{m['wall_median']:.2f} / {m['wall_max']:.2f} ({verdict})"),
                 (f"{key}: CPU median (s)", f"{m['cpu_median']:.2f}")]
    rows += [(f"query import: {name} (s)", f"{sec:.2f}") for name, sec in profile[:8]]
    rows += [("load average before (1/5/15 min)", " / ".join(f"{x:.1f}" for x in load_before)),
             ("load average after", " / ".join(f"{x:.1f}" for x in load_after)),
             ("CPU cores", os.cpu_count())]
    print_table("kbsync CLI start-up (fresh process per run)", rows)
    path = write_json("cli_startup", {
        "target_seconds": args.target, "remote_target_seconds": args.remote_target,
        "runs": args.runs, **measured,
        "query_imports_seconds": dict(profile), "load_before": load_before,
        "load_after": load_after, "cpu_count": os.cpu_count()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

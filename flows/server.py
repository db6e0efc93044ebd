"""A local Prefect server kept under the data dir (``kbsync server start|stop``).

Without ``PREFECT_API_URL`` every CLI command that runs a flow starts Prefect's
temporary server first (seconds of start-up, and its runs vanish with it). A real
``prefect server start`` kept running under ``<data_dir>/prefect`` (its own
``PREFECT_HOME``: SQLite database, logs) makes CLI runs start at once and keeps them in a
persistent local UI. The CLI uses it when it answers and ``PREFECT_API_URL`` is not set.

The server's address and process id are in ``<data_dir>/prefect-server.json``.
See https://docs.prefect.io/v3/concepts/server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

STATE_FILE = "prefect-server.json"


def state_file(data_dir: Path) -> Path:
    return Path(data_dir) / STATE_FILE


def _healthy(api_url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def running(data_dir: Path) -> dict[str, Any] | None:
    """The record of the server under ``data_dir`` (``pid``, ``api_url``, ``ui_url``,
    ``log``) when it answers its health check, else ``None``."""
    path = state_file(data_dir)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if _healthy(str(record.get("api_url", ""))) else None


def start(data_dir: Path, *, port: int | None = None, timeout: float = 180.0) -> dict[str, Any]:
    """Start ``prefect server start`` on 127.0.0.1 in its own session (it outlives this
    process), wait until it answers, and record it. A server already running there is
    returned as it is.

    Raises:
        RuntimeError: it exited or did not answer within ``timeout`` seconds (the message
            carries the end of its log).
    """
    from connectors.llm_server import free_port

    current = running(data_dir)
    if current is not None:
        return current
    data_dir = Path(data_dir).resolve()
    home = data_dir / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = data_dir / "prefect-server.log"
    prefect = Path(sys.executable).parent / "prefect"
    cmd = [str(prefect) if prefect.exists() else "prefect", "server", "start",
           "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, cwd=str(data_dir))
    api_url = f"http://127.0.0.1:{port}/api"
    record = {"pid": process.pid, "api_url": api_url, "ui_url": f"http://127.0.0.1:{port}",
              "log": str(log_path), "home": str(home)}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {process.returncode}: "
                               f"{_tail(log_path)}")
        if _healthy(api_url, timeout=2):
            state_file(data_dir).write_text(json.dumps(record), encoding="utf-8")
            return record
        time.sleep(0.5)
    _kill(process.pid)
    raise RuntimeError(f"the Prefect server did not answer within {timeout:g} s: "
                       f"{_tail(log_path)}")


def stop(data_dir: Path, timeout: float = 30.0) -> bool:
    """Stop the server recorded under ``data_dir``; ``False`` when none was recorded."""
    path = state_file(data_dir)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    _kill(int(record["pid"]), timeout)
    path.unlink(missing_ok=True)
    return True


def _kill(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM the server's process group (the server and its workers), then SIGKILL."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        try:  # reap it when it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_bytes()[-chars:].decode("utf-8", "replace").strip()
    except OSError:
        return ""

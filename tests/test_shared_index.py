"""Two machines, one index: two sync processes with their own data dirs (their own state
store, as on two workers) write one Chroma server (``chroma run``) and one lexical index
on PostgreSQL; a third process queries both sources' chunks in dense and lexical modes.

Everything is a real process: the Chroma server, each ``kbsync sync`` (its own Prefect
home, so each runs its own ephemeral Prefect API) and ``kbsync query``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import chromadb
import pytest
import yaml

from connectors.lexical import open_index
from tests.conftest import Repo
from tests.test_deploy import ROOT, free_port, wait_for

BIN = Path(sys.executable).parent

ALPHA = {"docs/build.md": "# Сборка документации\n\nЧтобы собрать проект, запустите сборщик. "
                         "Сборка пишет журнал zebrafish в папку логов.\n",
         "docs/search.md": "# Поиск\n\nЛокальный поиск строится при сборке на основе индекса "
                           "lunr и работает без сервера.\n"}
BETA = {"guide/upload.md": "# Publishing\n\nUpload the generated site to an S3 bucket with the "
                          "publish command; the zebrafish uploader retries each file.\n",
        "guide/keys.md": "# Access keys\n\nRotate the access key every ninety days.\n"}


def kbsync(config: Path, home: Path, *args: str, background: bool = False):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "KBSYNC_"))}
    env.update({"PREFECT_HOME": str(home), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"})
    cmd = [sys.executable, "-m", "flows.cli", "--config", str(config), *args]
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_sync_processes_share_one_chroma_server_and_one_postgres_lexical_index(
        tmp_path, postgres_url):
    port = free_port()
    log = open(tmp_path / "chroma.log", "wb")  # noqa: SIM115 - closed below
    chroma = subprocess.Popen([str(BIN / "chroma"), "run", "--path", str(tmp_path / "chroma"),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: chromadb.HttpClient(host="127.0.0.1", port=port).heartbeat(), 60,
                 "the Chroma server", [chroma])
        configs = {}
        for name, files in (("alpha", ALPHA), ("beta", BETA)):
            repo = Repo(tmp_path / f"repo-{name}")
            repo.commit(files, "initial")
            configs[name] = tmp_path / f"{name}.yaml"
            configs[name].write_text(yaml.safe_dump({
                "data_dir": str(tmp_path / f"machine-{name}"),  # its own state store
                "chroma": {"url": f"http://127.0.0.1:{port}", "collection": "shared"},
                "lexical": {"url": postgres_url},
                "sources": [{"type": "git", "name": name, "url": str(repo.path)}],
            }))
        syncs = [kbsync(configs[n], tmp_path / f"prefect-{n}", "sync", background=True)
                 for n in configs]  # at the same time
        for proc in syncs:
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, out

        # a third machine: no data dir of its own beyond the settings, same servers
        reader = tmp_path / "reader.yaml"
        reader.write_text(yaml.safe_dump({
            "data_dir": str(tmp_path / "machine-reader"),
            "chroma": {"url": f"http://127.0.0.1:{port}", "collection": "shared"},
            "lexical": {"url": postgres_url}}))
        home = tmp_path / "prefect-reader"
        for mode in ("lexical", "dense"):
            result = kbsync(reader, home, "query", "zebrafish", "--mode", mode, "-k", "4")
            assert result.returncode == 0, result.stdout + result.stderr
            sources = set(re.findall(r"\((alpha|beta);", result.stdout))
            assert sources == {"alpha", "beta"}, (mode, result.stdout)
        lexical = kbsync(reader, home, "query", "zebrafish", "--mode", "lexical", "-k", "10")
        assert lexical.stdout.count("lexical #") == 2  # only the two chunks holding the word

        index = open_index(postgres_url)
        client = chromadb.HttpClient(host="127.0.0.1", port=port)
        assert index.ids() == set(client.get_collection("shared").get(include=[])["ids"])
        assert len(index.ids()) == 4
        index.close()
    finally:
        os.killpg(chroma.pid, signal.SIGTERM)  # the server we started, its own session
        chroma.wait(timeout=30)
        log.close()

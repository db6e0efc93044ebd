"""Deployments, remote embedding on the ``gpu`` work pool, ``kbsync serve``, docker-compose.

The live tests start real parts on 127.0.0.1: ``prefect server start`` (own
PREFECT_HOME, SQLite, on a free port), a Chroma server (``chroma run``), and process
workers on the ``cpu`` and ``gpu`` work pools. They register ``deployments/prefect.yaml``
(the committed file) with ``prefect deploy``; the workers read a kbsync.yaml whose git
source is called ``kbsync`` like the example's, so the committed deployments apply.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import chromadb
import pytest
import yaml

from connectors.llm_server import free_port
from flows.deployments import deployment_specs, prefect_yaml
from flows.settings import ConfigError, Settings, load_settings
from flows.state import StateStore
from transforms.batches import BatchFormatError, ChunkBatch, batch_to_table, table_to_batch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ----------------------------------------------------------------- no servers needed


def test_committed_prefect_yaml_is_written_from_the_example_settings():
    """deployments/prefect.yaml is what `kbsync deployments` writes for kbsync.example.yaml
    (rewrite it with `kbsync --config kbsync.example.yaml deployments -o deployments/prefect.yaml`)."""
    settings = load_settings(ROOT / "kbsync.example.yaml")
    expected = prefect_yaml(settings, origin="kbsync.example.yaml")
    assert (ROOT / "deployments" / "prefect.yaml").read_text(encoding="utf-8") == expected


def test_deployment_specs_follow_settings():
    settings = Settings(sources=[
        {"type": "git", "name": "docs", "url": "/srv/docs"},
        {"type": "git", "name": "code", "url": "/srv/code", "schedule": "*/15 * * * *"},
    ], deployments={"sync_all_schedule": "0 3 * * *", "timezone": "Europe/Berlin",
                    "gpu_pool": "a100"})
    specs = {s.name: s for s in deployment_specs(settings)}
    assert list(specs) == ["sync-docs", "sync-code", "sync-all", "backfill", "validate", "embed"]
    assert specs["sync-docs"].cron == "0 * * * *"          # default: hourly
    assert specs["sync-code"].cron == "*/15 * * * *"       # the source's own schedule
    assert specs["sync-code"].parameters == {"source": "code"}
    assert specs["sync-all"].cron == "0 3 * * *"
    assert specs["sync-all"].parameters == {"reconcile": True}
    assert all(specs[n].timezone == "Europe/Berlin" for n in ("sync-docs", "sync-all"))
    assert [n for n, s in specs.items() if s.one_at_a_time] == ["sync-docs", "sync-code",
                                                                 "sync-all"]
    assert specs["backfill"].cron is None and specs["backfill"].parameters == {}
    assert specs["validate"].entrypoint == "flows/validate.py:validate"
    assert (specs["embed"].entrypoint, specs["embed"].work_pool) == ("flows/embed.py:embed",
                                                                     "a100")
    assert {s.work_pool for n, s in specs.items() if n != "embed"} == {"cpu"}

    document = yaml.safe_load(prefect_yaml(settings))
    entry = next(d for d in document["deployments"] if d["name"] == "sync-code")
    assert entry["schedules"] == [{"cron": "*/15 * * * *", "timezone": "Europe/Berlin",
                                   "active": True}]
    assert entry["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert document["pull"] == [{"prefect.deployments.steps.set_working_directory": {
        "directory": "{{ $KBSYNC_PROJECT_DIR }}"}}]


def test_invalid_cron_names_the_key():
    settings = Settings(sources=[{"type": "git", "name": "docs", "url": "/srv/docs",
                                  "schedule": "every hour"}])
    with pytest.raises(ConfigError, match=r"sources\[0\] \(docs\)\.schedule.*every hour"):
        deployment_specs(settings)
    with pytest.raises(ConfigError, match="deployments.sync_all_schedule"):
        deployment_specs(Settings(deployments={"sync_all_schedule": "61 * * * *"}))


def test_batch_round_trips_through_arrow():
    batch = ChunkBatch(source="docs", model="m")
    batch.add("c1", "Привет, world", {"doc_id": "docs:a", "n": 1, "x": 1.5, "ok": True})
    batch.update("c2", {"doc_id": "docs:b", "title": "B"})
    batch.delete_ids.append("c3")
    batch.delete_doc_ids.append("docs:gone")
    table = batch_to_table(batch)
    assert table.column_names == ["op", "id", "text", "metadata"]
    assert table.column("op").to_pylist() == ["add", "update", "delete", "delete_doc"]
    assert table_to_batch(table) == batch

    wrong = table.replace_schema_metadata({b"kbsync.batch.version": b"99"})
    with pytest.raises(BatchFormatError, match="version 99"):
        table_to_batch(wrong)


def test_cli_deployments_serve_and_backfill_errors(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    config = tmp_path / "kbsync.yaml"
    config.write_text("sources:\n  - type: git\n    name: handbook\n    url: /srv/handbook\n"
                      "    schedule: '5 * * * *'\n")
    runner = CliRunner()
    printed = runner.invoke(app, ["--config", str(config), "deployments"])
    assert printed.exit_code == 0, printed.output
    document = yaml.safe_load(printed.output)
    assert [d["name"] for d in document["deployments"]][0] == "sync-handbook"
    assert document["deployments"][0]["schedules"][0]["cron"] == "5 * * * *"
    written = runner.invoke(app, ["--config", str(config), "deployments", "-o",
                                  str(tmp_path / "out" / "prefect.yaml")])
    assert written.exit_code == 0
    assert (tmp_path / "out" / "prefect.yaml").read_text() == printed.output

    unknown = runner.invoke(app, ["--config", str(config), "serve", "sync-nothing"])
    assert unknown.exit_code == 2 and "unknown deployment(s) sync-nothing" in unknown.output

    # the session's Prefect server has no backfill deployment registered
    missing = runner.invoke(app, ["--config", str(config), "backfill", "handbook", "--since",
                                  "2024-01-01", "--deployment"])
    assert missing.exit_code == 1
    assert "deployment sync-source/backfill not found" in missing.output
    bad_source = runner.invoke(app, ["--config", str(config), "backfill", "nope", "--since",
                                     "2024-01-01", "--deployment"])
    assert bad_source.exit_code == 2 and "unknown source 'nope'" in bad_source.output


# ----------------------------------------------------------------- embed flow in-process


def in_flow(fn, *args, **kwargs):
    from prefect import flow

    @flow(name="test-remote")
    def _flow():
        return fn(*args, **kwargs)

    return _flow()


def test_embed_flow_applies_a_staged_batch(tmp_path, embedder):
    from connectors.lexical import LexicalIndex
    from connectors.staging import BatchStaging
    from flows.embed import embed

    overrides = {"data_dir": str(tmp_path / "data")}
    staging = BatchStaging(str(tmp_path / "staging"))
    batch = ChunkBatch(source="docs", model=embedder.name)
    for i, text in enumerate(["Rotate the signing keys every ninety days.",
                              "Backups are restored monthly in a drill."]):
        batch.add(f"docs:a#{i}", text, {"doc_id": "docs:a", "doc_hash": "h", "chunk_count": 2,
                                        "chunk_index": i, "source": "docs", "title": "A"})
    first = embed(staging.write(batch_to_table(batch), "docs"), overrides=overrides)
    assert first["chunks_embedded"] == 2 and first["device"] == "cpu"
    col = chromadb.PersistentClient(path=str(tmp_path / "data" / "chroma")).get_collection(
        "kbsync")
    got = col.get(ids=["docs:a#0"], include=["embeddings", "documents"])
    assert got["documents"] == ["Rotate the signing keys every ninety days."]
    expected = embedder.encode(["Rotate the signing keys every ninety days."])[0]
    assert abs(float(got["embeddings"][0] @ expected) - 1.0) < 1e-4
    lexical = LexicalIndex(tmp_path / "data" / "lexical.db")
    assert [h.chunk_id for h in lexical.search("signing keys", k=5)] == ["docs:a#0"]
    lexical.close()

    gone = ChunkBatch(source="docs", model=embedder.name, delete_doc_ids=["docs:a"])
    second = embed(staging.write(batch_to_table(gone), "docs"), overrides=overrides)
    assert second["documents_deleted"] == 1 and second["device"] is None  # no model loaded
    assert col.count() == 0


def test_embed_flow_refuses_a_batch_for_another_model(tmp_path):
    from connectors.chroma import EmbeddingModelMismatch
    from connectors.staging import BatchStaging
    from flows.embed import embed

    batch = ChunkBatch(source="docs", model="intfloat/multilingual-e5-base")
    batch.add("docs:a#0", "text", {"doc_id": "docs:a"})
    url = BatchStaging(str(tmp_path / "staging")).write(batch_to_table(batch), "docs")
    with pytest.raises(EmbeddingModelMismatch, match="multilingual-e5-base"):
        embed(url, overrides={"data_dir": str(tmp_path / "data")})
    assert not (tmp_path / "data" / "chroma").exists() or chromadb.PersistentClient(
        path=str(tmp_path / "data" / "chroma")).list_collections() == []


def test_remote_mode_without_the_embed_deployment_keeps_the_batch_and_cursor(
        make_repo, make_settings, tmp_path, embedder):
    from connectors.staging import read_batch_table
    from flows.embed import RemoteEmbedError
    from flows.sync import run_sync

    repo = make_repo({"a.md": "# Alpha\n\nThe alpha service owns invoices.\n"})
    staging = tmp_path / "staging"
    settings = make_settings(repo, embedding={"mode": "remote", "staging": str(staging),
                                              "deployment": "embed/not-registered"})
    with pytest.raises(RemoteEmbedError, match="embed/not-registered.*does not exist") as err:
        in_flow(run_sync, settings, "src0")
    kept = list(staging.rglob("*.parquet"))
    assert len(kept) == 1 and str(kept[0]) in str(err.value)
    staged = table_to_batch(read_batch_table(str(kept[0])))
    assert staged.model == embedder.name and staged.source == "src0"
    assert {m["doc_id"] for m in staged.add_metadatas} == {"src0:a.md"}
    state = StateStore(settings.resolved_state_url).get("src0")
    assert state.cursor is None and state.last_status == "failed"


def test_reconcile_parameter_reconciles_when_not_due(make_repo, make_settings, embedder):
    """What the nightly sync-all deployment asks for (``reconcile: true``)."""
    from flows.sync import run_sync

    repo = make_repo({"keep.md": "keep me\n", "drafts/x.md": "draft\n"})
    never = {"reconcile_every": 0, "fetch_retries": 0}
    in_flow(run_sync, make_settings(repo, sync=never), "src0")
    narrowed = make_settings(repo, source={"exclude": ["drafts/"]}, sync=never)
    plain = in_flow(run_sync, narrowed, "src0")
    assert not plain.reconciled and plain.documents_deleted == 0
    forced = in_flow(run_sync, narrowed, "src0", reconcile=True)
    assert forced.reconciled and forced.documents_deleted == 1
    assert forced.mode == "incremental"


# ----------------------------------------------------------------- docker-compose

COMPOSE = ROOT / "docker-compose.yml"
ONE_SHOT = {"ollama-pull", "deploy"}


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def test_compose_services_healthchecks_and_start_order():
    doc = compose()
    services = doc["services"]
    assert set(services) == {"postgres", "prefect-server", "chroma", "ollama", "ollama-pull",
                             "embedder", "deploy", "worker-cpu", "worker-gpu"}
    for name, svc in services.items():
        if name not in ONE_SHOT:
            test = svc["healthcheck"]["test"]
            assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
            assert svc.get("restart") == "unless-stopped", name
        else:
            assert svc.get("restart") == "no", name
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            wanted = ("service_completed_successfully" if dep in ONE_SHOT
                      else "service_healthy")
            assert cond == {"condition": wanted}, (name, dep, cond)
    for worker in ("worker-cpu", "worker-gpu"):
        deps = services[worker]["depends_on"]
        assert {"postgres", "prefect-server", "chroma", "deploy"} <= set(deps), worker
    assert services["ollama-pull"]["depends_on"] == {"ollama": {"condition": "service_healthy"}}
    assert "deepseek" in " ".join(services["ollama-pull"]["entrypoint"])
    assert services["prefect-server"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"}}
    assert services["worker-cpu"]["depends_on"]["embedder"] == {"condition": "service_healthy"}


def test_compose_embedder_serves_the_model_warm_on_the_gpu():
    services = compose()["services"]
    embedder = services["embedder"]
    assert embedder["image"].startswith("michaelf34/infinity:")
    command = embedder["command"]
    assert command[0] == "v2" and "--served-model-name" in command and "--model-id" in command
    assert command[command.index("--port") + 1] == "7997"
    assert "/health" in " ".join(embedder["healthcheck"]["test"])
    devices = embedder["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    env = services["worker-cpu"]["environment"]
    assert env["KBSYNC_EMBEDDING__BACKEND"] == "${KBSYNC_EMBEDDING_BACKEND:-openai}"
    assert env["KBSYNC_EMBEDDING__BASE_URL"] == "http://embedder:7997"
    assert env["KBSYNC_EMBEDDING__MODE"] == "${KBSYNC_EMBEDDING_MODE:-local}"


def test_compose_prefect_chroma_workers_and_volumes():
    doc = compose()
    services = doc["services"]
    server = services["prefect-server"]
    env = server["environment"]
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/" in env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert server["ports"] == ["${PREFECT_PORT:-4200}:4200"]
    assert services["chroma"]["volumes"] == ["chroma:/data"]
    assert "ollama:/root/.ollama" in services["ollama"]["volumes"]
    assert {"postgres", "chroma", "ollama", "kbsync-data", "kbsync-staging"} <= set(doc["volumes"])

    cpu, gpu = services["worker-cpu"], services["worker-gpu"]
    assert cpu["build"]["dockerfile"] == "deployments/Dockerfile"
    assert gpu["build"]["dockerfile"] == "deployments/Dockerfile.gpu"
    assert cpu["command"][:5] == ["prefect", "worker", "start", "--pool", "cpu"]
    assert gpu["command"][:5] == ["prefect", "worker", "start", "--pool", "gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for worker in (cpu, gpu):
        wenv = worker["environment"]
        assert wenv["KBSYNC_STATE_URL"].startswith("postgresql+psycopg://")
        assert wenv["KBSYNC_CHROMA__URL"] == "http://chroma:8000"
        assert wenv["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert wenv["KBSYNC_EMBEDDING__STAGING"] == "/staging"
        assert "kbsync-staging:/staging" in worker["volumes"]  # the hand-over is shared
        assert wenv["KBSYNC_LLM__BASE_URL"] == "http://ollama:11434/v1"
    # both Dockerfiles copy every package the distribution declares
    packages = yaml.safe_load("[" + re.search(r'packages = \[(.*?)\]', (
        ROOT / "pyproject.toml").read_text()).group(1) + "]")
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        text = (ROOT / "deployments" / dockerfile).read_text()
        assert all(f"COPY {p} ./{p}" in text for p in packages), dockerfile
        assert "KBSYNC_PROJECT_DIR=/opt/kbsync" in text and "WORKDIR /opt/kbsync" in text


def test_env_example_documents_every_compose_variable():
    text = re.sub(r"(^|\s)#.*$", "", COMPOSE.read_text(), flags=re.MULTILINE)  # comments
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(),
                                re.MULTILINE))
    assert used - documented == set()
    assert documented - used == set()


def _compose_client() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True)
        if probe.returncode == 0 and "v2" in probe.stdout + probe.stderr:
            return cmd
    return None


def test_docker_compose_config_passes(tmp_path):
    cmd = _compose_client()
    if cmd is None:
        pytest.skip("no Docker Compose v2 client here (docker compose / docker-compose)")
    (tmp_path / "kbsync.yaml").write_text((ROOT / "kbsync.example.yaml").read_text())
    result = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "--env-file", str(ROOT / ".env.example"), "config",
         "--quiet"], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "KBSYNC_CONFIG_FILE": str(tmp_path / "kbsync.yaml")})
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------- the live stack


def wait_for(check, timeout: float, what: str, procs: list[subprocess.Popen] = ()) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: process {proc.args[:3]} exited {proc.returncode}")
        try:
            value = check()
        except Exception:  # noqa: BLE001 - not ready yet
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Stack:
    """Prefect server, Chroma server and workers as real processes, logs under ``logs``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.logs = base / "logs"
        self.logs.mkdir(parents=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self._client = None
        self.api_port, self.chroma_port = free_port(), free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}/api"
        self.chroma_url = f"http://127.0.0.1:{self.chroma_port}"
        self.config = base / "kbsync.yaml"
        self.staging = base / "staging"
        self.data = base / "data"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PREFECT_", "KBSYNC_"))}
        env.update({
            "PREFECT_HOME": str(base / "prefect-home"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(self.api_port),
            "PREFECT_API_DATABASE_CONNECTION_URL":
                f"sqlite+aiosqlite:///{base / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
            # the deployments carry cron schedules; no scheduled run may start mid-test
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "5",
            "HF_HUB_OFFLINE": "1",
            "KBSYNC_CONFIG": str(self.config),
            "KBSYNC_PROJECT_DIR": str(ROOT),
            "PYTHONPATH": str(ROOT),
        })
        self.env = env

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            list(args), cwd=ROOT, env={**self.env, **(env or {})}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def prefect(self, *args: str, timeout: float = 180) -> str:
        result = subprocess.run([str(BIN / "prefect"), *args], cwd=ROOT, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def kbsync(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", "--config", str(self.config),
                               *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def start_worker(self, pool: str) -> None:
        self.start(f"worker-{pool}", str(BIN / "prefect"), "worker", "start", "--pool", pool,
                   "--type", "process", "--name", f"test-{pool}")
        wait_for(lambda: any(w.name == f"test-{pool}" and w.status == "ONLINE"
                             for w in self.client().read_workers_for_work_pool(pool)),
                 120, f"the {pool} worker", [self.procs[f"worker-{pool}"]])

    def client(self):
        """A client of this stack's server (whatever server the test session uses)."""
        if self._client is None:
            from prefect.client.orchestration import SyncPrefectClient

            self._client = SyncPrefectClient(self.api_url)
            self._client.__enter__()
        return self._client

    def close(self) -> None:
        running = [p for p in self.procs.values() if p.poll() is None]
        for proc in running:  # all at once: each takes a few seconds to shut down
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in running:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()
        if self._client is not None:
            self._client.__exit__(None, None, None)

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:]
                         for p in sorted(self.logs.glob("*.log")))


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    import git

    base = tmp_path_factory.mktemp("stack")
    st = Stack(base)
    repo_dir = base / "repo"
    repo = git.Repo.init(repo_dir, initial_branch="main")
    with repo.config_writer() as cfg:
        cfg.set_value("user", "name", "Test Author")
        cfg.set_value("user", "email", "author@example.com")
    st.repo = repo
    commit(st, {"README.md": "# Billing\n\nInvoices are issued on the first working day of "
                             "each month and paid within thirty days.\n",
                "docs/refunds.md": "# Refunds\n\nRefunds above 500 EUR need a second "
                                   "approver from the finance team.\n"})
    st.config.write_text(yaml.safe_dump({
        "data_dir": str(st.data),
        "chroma": {"url": st.chroma_url, "collection": "deploytest"},
        "embedding": {"mode": "remote", "staging": str(st.staging),
                      "remote_poll_seconds": 0.5, "remote_timeout_seconds": 300},
        "sync": {"fetch_retries": 0},
        "sources": [{"type": "git", "name": "kbsync", "url": str(repo_dir)}],
    }))
    try:
        st.start("chroma", str(BIN / "chroma"), "run", "--path", str(base / "chroma"),
                 "--host", "127.0.0.1", "--port", str(st.chroma_port))
        st.start("server", str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                 "--port", str(st.api_port))
        wait_for(lambda: chromadb.HttpClient(host="127.0.0.1", port=st.chroma_port)
                 .heartbeat(), 60, "the Chroma server", [st.procs["chroma"]])
        wait_for(lambda: st.client().api_healthcheck() is None, 180, "the Prefect server",
                 [st.procs["server"]])
        st.prefect("work-pool", "create", "cpu", "--type", "process")
        st.prefect("work-pool", "create", "gpu", "--type", "process")
        # the committed file; validate's flow is deployed with --all once flows/validate.py
        # exists, here the deployments these tests run are named
        st.prefect("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                   "--name", "sync-kbsync", "--name", "sync-all", "--name", "backfill",
                   "--name", "embed")
        st.start_worker("cpu")
        st.start_worker("gpu")
        yield st
    except BaseException:
        print(st.tail())
        raise
    finally:
        st.close()


def commit(st: Stack, files: dict[str, str]) -> str:
    for rel, text in files.items():
        path = Path(st.repo.working_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    st.repo.index.add(list(files))
    return st.repo.index.commit("change").hexsha


def deployment(st: Stack, name: str):
    return st.client().read_deployment_by_name(name)


def run_deployment_now(st: Stack, name: str, **parameters: Any):
    return st.client().create_flow_run_from_deployment(deployment(st, name).id,
                                                       parameters=parameters)


def wait_final(st: Stack, run_id: UUID, timeout: float = 240):
    client = st.client()
    try:
        return wait_for(lambda: (r := client.read_flow_run(run_id)).state.is_final() and r,
                        timeout, f"flow run {run_id}")
    except AssertionError:
        print(st.tail())
        raise


def runs_of(st: Stack, name: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    dep = deployment(st, name)
    return st.client().read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))


def chroma_docs(st: Stack) -> dict[str, int]:
    col = chromadb.HttpClient(host="127.0.0.1", port=st.chroma_port).get_collection("deploytest")
    counts: dict[str, int] = {}
    for meta in col.get(include=["metadatas"])["metadatas"]:
        counts[meta["doc_id"]] = counts.get(meta["doc_id"], 0) + 1
    return counts


def state_store(st: Stack) -> StateStore:
    return StateStore(f"sqlite:///{st.data / 'state.db'}")


def test_deployments_carry_schedules_limits_and_pools(stack):
    sync = deployment(stack, "sync-source/sync-kbsync")
    assert [s.schedule.cron for s in sync.schedules] == ["0 * * * *"]
    assert sync.schedules[0].schedule.timezone == "UTC" and sync.schedules[0].active
    assert sync.global_concurrency_limit.limit == 1
    assert sync.concurrency_options.collision_strategy == "CANCEL_NEW"
    assert sync.parameters == {"source": "kbsync"} and sync.work_pool_name == "cpu"
    assert sync.entrypoint == "flows/sync.py:sync_source"

    nightly = deployment(stack, "sync-all/sync-all")
    assert [s.schedule.cron for s in nightly.schedules] == ["30 2 * * *"]
    assert nightly.parameters == {"reconcile": True}
    assert nightly.concurrency_options.collision_strategy == "CANCEL_NEW"

    backfill = deployment(stack, "sync-source/backfill")
    assert backfill.schedules == [] and backfill.global_concurrency_limit is None
    assert set(backfill.parameter_openapi_schema["properties"]) >= {"source", "since", "until",
                                                                   "full"}
    embed = deployment(stack, "embed/embed")
    assert embed.work_pool_name == "gpu" and embed.schedules == []


def test_sync_embeds_on_the_gpu_pool_and_moves_the_cursor(stack):
    run = run_deployment_now(stack, "sync-source/sync-kbsync")
    done = wait_final(stack, run.id)
    assert done.state.is_completed(), (done.state, stack.tail())
    assert done.work_pool_name == "cpu"

    embeds = runs_of(stack, "embed/embed")
    assert embeds, "the sync ran no embed deployment"
    assert all(r.state.is_completed() and r.work_pool_name == "gpu" for r in embeds)
    parent = stack.client().read_task_run(embeds[0].parent_task_run_id)
    assert parent.flow_run_id == run.id  # shown as a subflow of the sync in the UI
    assert embeds[0].parameters["batch_url"].startswith(f"file://{stack.staging}")

    assert set(chroma_docs(stack)) == {"kbsync:README.md", "kbsync:docs/refunds.md"}
    assert not list(stack.staging.rglob("*.parquet")), "staged batches must be removed"
    state = state_store(stack).get("kbsync")
    assert state.cursor == {"commit": stack.repo.head.commit.hexsha}


def test_second_concurrent_sync_of_a_source_is_cancelled(stack):
    commit(stack, {"docs/travel.md": "# Travel\n\nBook trains for trips under 600 km; flights "
                                     "need the manager's approval.\n"})
    first = run_deployment_now(stack, "sync-source/sync-kbsync")
    second = run_deployment_now(stack, "sync-source/sync-kbsync")
    finals = [wait_final(stack, first.id), wait_final(stack, second.id)]
    states = sorted(r.state.type.value for r in finals)
    assert states == ["CANCELLED", "COMPLETED"], [(r.state, r.state.message) for r in finals]
    cancelled = next(r for r in finals if r.state.is_cancelled())
    assert "concurrency limit" in (cancelled.state.message or "").lower()
    assert "kbsync:docs/travel.md" in chroma_docs(stack)


def test_backfill_deployment_from_the_cli(stack):
    result = stack.kbsync("backfill", "kbsync", "--since", "2020-01-01", "--deployment")
    assert result.returncode == 0, result.stdout + result.stderr
    ui = f"http://127.0.0.1:{stack.api_port}/runs/flow-run/"
    match = re.search(re.escape(ui) + r"([0-9a-f-]{36})", result.stdout)
    assert match, result.stdout
    done = wait_final(stack, UUID(match.group(1)))
    assert done.state.is_completed(), done.state
    assert done.deployment_id == deployment(stack, "sync-source/backfill").id
    assert done.parameters == {"source": "kbsync", "since": "2020-01-01", "until": None}
    assert done.work_pool_name == "cpu"
    # a backfill never moves the cursor; everything it read was indexed already
    assert state_store(stack).get("kbsync").cursor == {"commit": stack.repo.head.commit.hexsha}


@pytest.mark.slow
def test_failed_embed_run_keeps_the_batch_and_the_cursor(stack):
    """With no gpu worker the embed run never starts: the sync gives up after
    remote_timeout_seconds, cancels it, keeps the staged file and does not move the
    cursor; the next sync (worker back) indexes the change."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    before = state_store(stack).get("kbsync").cursor
    commit(stack, {"docs/expenses.md": "# Expenses\n\nReceipts older than ninety days are not "
                                       "reimbursed.\n"})
    stack.stop("worker-gpu")
    run = run_deployment_now(stack, "sync-source/sync-kbsync",
                             overrides={"embedding": {"remote_timeout_seconds": 8}})
    done = wait_final(stack, run.id)
    assert done.state.is_failed(), done.state
    kept = list(stack.staging.rglob("*.parquet"))
    assert len(kept) == 1
    assert state_store(stack).get("kbsync").cursor == before
    assert "kbsync:docs/expenses.md" not in chroma_docs(stack)
    logs = stack.client().read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    assert any(str(kept[0]) in log.message and "kept" in log.message for log in logs)
    abandoned = [r for r in runs_of(stack, "embed/embed") if r.parameters["batch_url"]
                 .endswith(kept[0].name)]
    assert [r.state.type.value for r in abandoned] == ["CANCELLED"]

    stack.start_worker("gpu")
    again = wait_final(stack, run_deployment_now(stack, "sync-source/sync-kbsync").id)
    assert again.state.is_completed(), again.state
    assert "kbsync:docs/expenses.md" in chroma_docs(stack)
    assert list(stack.staging.rglob("*.parquet")) == kept  # the failed one stays for inspection
    assert state_store(stack).get("kbsync").cursor == {"commit": stack.repo.head.commit.hexsha}
    shutil.rmtree(stack.staging)


@pytest.mark.slow
def test_serve_registers_schedules_and_runs_flows(make_repo, tmp_path):
    """`kbsync serve` against the session's Prefect server: deployments with their cron
    schedules and limits appear, and a run of a served sync completes in-process."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    repo = make_repo({"guide.md": "# Guide\n\nRotate the signing keys every ninety days.\n"})
    config = tmp_path / "kbsync.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "sources": [{"type": "git", "name": "served", "url": str(repo.path),
                     "schedule": "0 0 1 1 *"}],
        "deployments": {"sync_all_schedule": "15 0 1 1 *"},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "KBSYNC_"))}
    env.update({"PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT),
                "PREFECT_HOME": str(tmp_path / "prefect-home"), "HF_HUB_OFFLINE": "1",
                "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "--config", str(config), "serve", "sync-served",
             "sync-all", "backfill", "embed"], cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with get_client(sync_client=True) as client:
            dep = wait_for(lambda: client.read_deployment_by_name("sync-source/sync-served"),
                           120, "the served deployment", [proc])
            assert [s.schedule.cron for s in dep.schedules] == ["0 0 1 1 *"]
            assert dep.concurrency_options.collision_strategy == "CANCEL_NEW"
            assert dep.global_concurrency_limit.limit == 1
            assert dep.entrypoint == "flows.sync.sync_source"
            assert dep.parameters == {"source": "served", "config_path": str(config)}
            # served deployments are registered one after the other
            nightly = wait_for(lambda: client.read_deployment_by_name("sync-all/sync-all"),
                               60, "the served sync-all", [proc])
            assert [s.schedule.cron for s in nightly.schedules] == ["15 0 1 1 *"]

            run = client.create_flow_run_from_deployment(dep.id)
            done = wait_for(lambda: (r := client.read_flow_run(run.id)).state.is_final() and r,
                            240, "the served run", [proc])
            assert done.state.is_completed(), (done.state, log.read_text()[-3000:])
        col = chromadb.PersistentClient(path=str(tmp_path / "data" / "chroma")) \
            .get_collection("kbsync")
        assert {m["doc_id"] for m in col.get(include=["metadatas"])["metadatas"]} == {
            "served:guide.md"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

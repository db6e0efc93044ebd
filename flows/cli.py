"""``kbsync`` — the command line (typer + rich).

Commands:
    kbsync sync [SOURCE...] [--full] [--repo PATH_OR_URL [--name NAME]]
    kbsync backfill SOURCE --since DATE [--until DATE] [--deployment]
    kbsync status
    kbsync query TEXT [-k N] [--source S]
    kbsync ask TEXT [-k N] [--source S] [--json] [--standin]
    kbsync deployments [--output PATH]      prefect.yaml for `prefect deploy`
    kbsync serve [DEPLOYMENT...]            serve the deployments with their schedules
    kbsync validate [--sample N] [--seed S] [--standin] | kbsync validate --history
    kbsync llm serve [--port P]
    kbsync server start [--port P] | kbsync server stop

Global options (before the command): ``--config PATH`` (else ``$KBSYNC_CONFIG``, else
``./kbsync.yaml``) and ``--data-dir PATH``.

Exit codes: 0 success; 1 the run failed or some documents failed (for ``validate``: a
threshold was missed); 2 bad usage or configuration; 3 ``validate`` could not check
answer quality (no LLM answered) or had nothing to measure, or ``ask`` found no LLM to
answer (the sources are printed). Every failure ends with a
one-line reason on stderr.
"""

from __future__ import annotations

import functools
import re
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

import flows  # noqa: F401 - sets telemetry-off defaults before prefect is imported
from flows.settings import ConfigError, Settings, load_settings

# Start-up time: a command imports what it needs inside its body (Prefect for flows,
# chromadb for the index, torch only where a text is encoded), not at module level.

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Keep a team's knowledge indexed in Chroma for a local LLM.")
console = Console()
err_console = Console(stderr=True)


class _Options:
    config: Path | None = None
    data_dir: Path | None = None


OPTIONS = _Options()


def _overrides(**extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if OPTIONS.data_dir is not None:
        out["data_dir"] = str(OPTIONS.data_dir)
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def _settings(**extra: Any) -> Settings:
    return load_settings(OPTIONS.config, **_overrides(**extra))


def _fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if "\n" not in text or isinstance(exc, ConfigError) else text.splitlines()[0]


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story (no type name needed)."""
    from connectors.base import ConnectorError
    from connectors.chroma import EmbeddingModelMismatch, StoreError
    from connectors.llm import LLMError
    from transforms.embedding import EmbeddingModelError

    return (ConnectorError, EmbeddingModelMismatch, StoreError, EmbeddingModelError, LLMError)


def handle_errors(fn):
    """Turn known failures into a one-line reason and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except ConfigError as exc:
            raise _fail(str(exc), 2) from None
        except KeyboardInterrupt:
            raise _fail("interrupted", 130) from None
        except Exception as exc:  # noqa: BLE001 - last resort: still one line, non-zero
            if isinstance(exc, _known_errors()):
                raise _fail(_one_line(exc)) from None
            raise _fail(f"{type(exc).__name__}: {_one_line(exc)}") from None

    return wrapper


@app.callback()
def main_options(
    config: Annotated[Path | None, typer.Option("--config", "-c",
                                                help="kbsync.yaml to use")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir",
                                                  help="where the embedded index lives")] = None,
) -> None:
    """kbsync: incremental sync of git, Confluence, Jira and GitLab into Chroma."""
    OPTIONS.config = config
    OPTIONS.data_dir = data_dir
    _use_local_prefect_server()


def _data_dir() -> Path | None:
    if OPTIONS.data_dir is not None:
        return OPTIONS.data_dir
    try:
        return _settings().data_dir
    except Exception:  # noqa: BLE001 - the command itself reports bad settings
        return None


def _use_local_prefect_server() -> None:
    """Point Prefect at the server `kbsync server start` keeps under the data dir when
    it answers and PREFECT_API_URL is not set (before Prefect is imported)."""
    import os

    if os.environ.get("PREFECT_API_URL"):
        return
    data_dir = _data_dir()
    if data_dir is None:
        return
    from flows.server import running

    record = running(data_dir)
    if record is not None:
        os.environ["PREFECT_API_URL"] = record["api_url"]


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed:>6.0f}"), TimeElapsedColumn(),
                    console=err_console, transient=True)


def without_flow_heartbeats() -> AbstractContextManager[Any]:
    """A context in which a flow run in this process sends no Prefect flow-run
    heartbeats, unless ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is set in the environment.

    Prefect sends them by default (``heartbeat_frequency`` 180 s since March 2026,
    https://github.com/PrefectHQ/prefect/pull/21058); its heartbeat thread sleeps in 1 s
    steps and the run's exit joins it (``prefect.flow_engine._send_heartbeats``,
    https://github.com/PrefectHQ/prefect/pull/19641), so with heartbeats a run's
    wall time ends on the next whole second of the thread's clock: 0-1 s added to every
    command (``benchmarks/cli_startup.py``), and to every benchmark's timed run. The
    heartbeats serve Prefect's zombie-run automations; a run in this terminal ends with
    the command, and a source's lease has its own heartbeat (``sync.lease_ttl_seconds``).
    Runs on workers (deployments) keep Prefect's default. Used by every CLI command that
    runs a flow and by ``benchmarks/common.run_flow``.
    """
    import os
    from contextlib import nullcontext

    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" in os.environ:
        return nullcontext()
    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def _run_with_progress(fn, *args, **kwargs):
    """Run a flow with rich progress bars fed by the sync's progress events, without
    Prefect's flow-run heartbeats (:func:`without_flow_heartbeats`)."""
    from prefect.settings import PREFECT_API_URL

    from flows.sync import progress_callback

    if not PREFECT_API_URL.value():  # env, profile and `kbsync server start` all unset
        err_console.print("[dim]no Prefect server is running: this run starts a temporary "
                          "one (~10 s). `kbsync server start` keeps one (and its UI) for "
                          "every later command.[/dim]")

    with _progress() as progress:
        bars: dict[str, Any] = {}

        def on_event(stage: str, done: int, total: int | None) -> None:
            if stage not in bars:
                label = {"fetch": "fetching documents", "embed": "embedding chunks"}.get(stage, stage)
                bars[stage] = progress.add_task(label, total=total)
            progress.update(bars[stage], completed=done, total=total)

        token = progress_callback.set(on_event)
        try:
            with without_flow_heartbeats():
                return fn(*args, **kwargs)
        finally:
            progress_callback.reset(token)


SUMMARY_ROWS = [("status", "status"), ("documents added", "documents_added"),
                ("documents updated", "documents_updated"),
                ("documents unchanged", "documents_unchanged"),
                ("documents deleted", "documents_deleted"),
                ("documents skipped", "documents_skipped"),
                ("documents failed", "documents_failed"),
                ("chunks embedded", "chunks_embedded"), ("chunks reused", "chunks_reused"),
                ("chunks deleted", "chunks_deleted")]


def _summary_table(summaries: list[dict[str, Any]]) -> Table:
    """One column per source, one row per measure (readable in a narrow terminal)."""
    table = Table(title="sync summary")
    table.add_column("")
    for s in summaries:
        table.add_column(s["source"], justify="right")
    for label, key in SUMMARY_ROWS:
        table.add_row(label, *[str(s.get(key, "")) for s in summaries])
    table.add_row("seconds", *[f"{s.get('seconds', {}).get('total', 0):.1f}" for s in summaries])
    return table


def _exit_for(summaries: list[dict[str, Any]]) -> None:
    busy = [s["source"] for s in summaries if s.get("status") == "busy"]
    if busy:
        raise _fail(f"not synced, another run holds them: {', '.join(busy)}")
    failed_docs = sum(s.get("documents_failed", 0) for s in summaries)
    if failed_docs:
        raise _fail(f"{failed_docs} document(s) failed and will be retried; see `kbsync status`")


def _repo_source_name(repo: str) -> str:
    base = repo.rstrip("/").removesuffix(".git")
    base = Path(base).resolve().name if "://" not in base and ":" not in base else base
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", base.rsplit("/", 1)[-1].rsplit(":", 1)[-1])
    return name.strip("-.") or "repo"


@app.command()
@handle_errors
def sync(
    sources: Annotated[list[str] | None, typer.Argument(help="source names (default: all)")] = None,
    full: Annotated[bool, typer.Option("--full", help="re-read everything and reconcile deletions")] = False,
    repo: Annotated[str | None, typer.Option("--repo", help="sync this git repository (path or "
                                             "clone URL) instead of the configured sources")] = None,
    name: Annotated[str | None, typer.Option("--name", help="source name for --repo")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        "--exclude", help="with --repo: leave out paths matching this glob (gitignore "
                          "style, repeatable: --exclude 'tests/**')")] = None,
    validate: Annotated[bool, typer.Option(
        "--validate", help="run the validation flow after syncing several sources "
                           "(scheduled sync-all runs do when validation.after_sync)")] = False,
) -> None:
    """Incremental sync of the configured sources (or the ones named)."""
    extra: dict[str, Any] = {}
    if repo:
        extra["sources"] = [{"type": "git", "name": name or _repo_source_name(repo), "url": repo,
                             "exclude": list(exclude or [])}]
    elif exclude:
        raise _fail("--exclude goes with --repo (configured sources have their own exclude)", 2)
    settings = _settings(**extra)
    names = list(sources or []) or [s.name for s in settings.sources]
    if not names:
        raise _fail("no sources configured: add some to kbsync.yaml (see kbsync.example.yaml) "
                    "or pass --repo PATH_OR_URL", 2)
    for n in names:
        settings.source(n)  # unknown names fail before any flow starts
    from flows.sync import SyncAllFailed, sync_all, sync_source

    config = str(OPTIONS.config) if OPTIONS.config else None
    overrides = _overrides(**extra)
    if len(names) == 1:
        summaries = [_run_with_progress(sync_source, names[0], full=full, config_path=config,
                                        overrides=overrides)]
    else:
        try:
            results = _run_with_progress(sync_all, full=full, sources=names, config_path=config,
                                         overrides=overrides, validation=validate)
        except SyncAllFailed as exc:
            raise _fail(str(exc)) from None
        summaries = list(results.values())
    console.print(_summary_table(summaries))
    _exit_for(summaries)


@app.command()
@handle_errors
def backfill(
    source: Annotated[str, typer.Argument(help="source name")],
    since: Annotated[str, typer.Option("--since", help="start of the window (ISO date/time, UTC)")],
    until: Annotated[str | None, typer.Option("--until", help="end of the window")] = None,
    deployment: Annotated[bool, typer.Option(
        "--deployment", help="run it as the `backfill` deployment on the Prefect server "
                             "(PREFECT_API_URL): shown in the UI, run by a worker; prints "
                             "the run's URL and returns without waiting")] = False,
) -> None:
    """Re-ingest what changed in a time window, without moving the cursor."""
    from datetime import datetime

    for label, value in (("--since", since), ("--until", until)):
        if value is not None:
            try:
                datetime.fromisoformat(value)
            except ValueError:
                raise _fail(f"{label} {value!r} is not an ISO 8601 date or time", 2) from None
    settings = _settings()
    if deployment:
        if settings.sources:  # the workers' settings decide; check here when we have some
            settings.source(source)
        _run_backfill_deployment(source, since, until)
        return
    settings.source(source)
    from flows.sync import sync_source

    summary = _run_with_progress(
        sync_source, source, since=since, until=until,
        config_path=str(OPTIONS.config) if OPTIONS.config else None, overrides=_overrides())
    console.print(_summary_table([summary]))
    _exit_for([summary])


def _run_backfill_deployment(source: str, since: str, until: str | None) -> None:
    """Create a run of the ``backfill`` deployment and print its URL (no waiting)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL
    from prefect.utilities.urls import url_for

    from flows.deployments import BACKFILL_DEPLOYMENT

    if not PREFECT_API_URL.value():
        raise _fail("--deployment needs a Prefect server: set PREFECT_API_URL "
                    "(e.g. http://127.0.0.1:4200/api)", 2)
    try:
        run = run_deployment(BACKFILL_DEPLOYMENT, timeout=0, as_subflow=False,
                             parameters={"source": source, "since": since, "until": until})
    except ObjectNotFound:
        raise _fail(f"deployment {BACKFILL_DEPLOYMENT} not found on {PREFECT_API_URL.value()}: "
                    "register the deployments first (prefect deploy --prefect-file "
                    "deployments/prefect.yaml --all)") from None
    console.print(f"backfill of {source} scheduled: flow run {run.name} ({run.id})",
                  highlight=False)
    console.print(url_for(run) or f"flow run id {run.id}", highlight=False, soft_wrap=True)


@app.command()
@handle_errors
def deployments(
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="write the prefect.yaml here (default: print it)")] = None,
) -> None:
    """The Prefect deployments of the configured sources, as a prefect.yaml for
    `prefect deploy --prefect-file PATH --all`."""
    from flows.deployments import prefect_yaml
    from flows.settings import config_path

    settings = _settings()
    origin = config_path(OPTIONS.config)
    text = prefect_yaml(settings, origin=origin.name if origin else "the environment")
    if output is None:
        typer.echo(text, nl=False)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    err_console.print(f"wrote {output}: register with `prefect deploy --prefect-file "
                      f"{output} --all`", highlight=False, soft_wrap=True)


@app.command()
@handle_errors
def serve(
    names: Annotated[list[str] | None, typer.Argument(
        help="deployments to serve (default: all)")] = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="most runs at once (default: no limit)")] = None,
) -> None:
    """Serve the deployments with their cron schedules from this process (runs show in
    the Prefect UI of PREFECT_API_URL); stop with Ctrl-C."""
    from prefect import serve as prefect_serve

    from flows.deployments import served_deployments

    settings = _settings()
    overrides = {"data_dir": str(OPTIONS.data_dir.resolve())} if OPTIONS.data_dir else None
    served = served_deployments(settings, names, config_path=OPTIONS.config,
                                overrides=overrides)
    prefect_serve(*served, limit=limit)


@app.command()
@handle_errors
def status() -> None:
    """Per source: cursor, last success, documents and chunks indexed, issues."""
    from flows.state import StateStore

    settings = _settings()
    state = StateStore(settings.resolved_state_url)
    counts = state.issue_counts()
    leases = state.locks()
    names = list(dict.fromkeys([s.name for s in settings.sources] + state.names()))
    # counts kept in the state store (one row per source, benchmarks/scale.py); a source
    # never counted there (synced by an older version) is counted in Chroma, ids only
    kept = {n: state.counts(n) for n in names}
    indexed = {n: (c.documents, c.chunks) for n, c in kept.items() if c is not None}
    if len(indexed) < len(kept):  # Chroma is opened only then
        from flows.retrieve import open_store

        store = open_store(settings)
        indexed.update({n: store.source_counts(n) for n in kept if n not in indexed})
    console.print(f"[bold]kbsync status[/] — index {settings.chroma.url or settings.chroma_path}, "
                  f"collection {settings.chroma.collection}", highlight=False)
    if not names:
        console.print("no sources configured or synced yet")
    configured = {s.name: s.type for s in settings.sources}
    for n in names:
        st = state.get(n)
        cursor = ", ".join(  # collections (Confluence's versions seen) as their size
            f"{k}={v}" if not isinstance(v, dict | list) else f"{k}=<{len(v)} entries>"
            for k, v in (st.cursor or {}).items()) or "none"
        success = (st.last_success_at.strftime("%Y-%m-%d %H:%M:%S UTC")
                   if st.last_success_at else "never")
        console.print(f"\n[bold cyan]{n}[/] ({configured.get(n, 'not configured')})",
                      highlight=False)
        console.print(f"  cursor: {cursor}", highlight=False, markup=False)
        console.print(f"  last success: {success}; last run: {st.last_status or 'none'}",
                      highlight=False, markup=False)
        console.print(f"  documents: {indexed[n][0]}; chunks: {indexed[n][1]}; "
                      f"failed: {counts.get((n, 'failed'), 0)}; "
                      f"skipped: {counts.get((n, 'skipped'), 0)}", highlight=False, markup=False)
        if kept[n] is not None and kept[n].writing and n not in leases:
            console.print("  counts: a run stopped while writing; the next sync counts them "
                          "again", highlight=False, markup=False)
        if n in leases:
            console.print(f"  lease: held by {leases[n].describe()}", highlight=False,
                          markup=False)
    failed = state.issues(kind="failed")
    if failed:
        issues = Table(title="failed documents")
        for column in ("source", "document", "reason", "attempts"):
            issues.add_column(column)
        for issue in failed[:50]:
            issues.add_row(issue.source, issue.doc_id, issue.reason, str(issue.attempts))
        console.print(issues)
    state.close()


@app.command()
@handle_errors
def unlock(
    source: Annotated[str, typer.Argument(help="the source whose lease to release")],
) -> None:
    """Release a source's lease (after saying whose it was), e.g. after a run died on
    another host. A run that is provably gone is taken over without this; releasing
    the lease of a run that still lives lets a second run interleave with it."""
    from flows.state import StateStore

    settings = _settings()
    state = StateStore(settings.resolved_state_url)
    try:
        released = state.release_lock(source)
    finally:
        state.close()
    if released is None:
        console.print(f"source {source} has no lease: nothing to release", highlight=False,
                      markup=False)
        return
    console.print(f"released the lease on {source}, held by {released.describe()}",
                  highlight=False, markup=False)


@app.command()
@handle_errors
def query(
    text: Annotated[str, typer.Argument(help="the question")],
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, max=100, help="results")] = 5,
    source: Annotated[str | None, typer.Option("--source", help="only this source")] = None,
    mode: Annotated[str | None, typer.Option(
        "--mode", help="dense, lexical or hybrid (default: retrieval.mode, hybrid)")] = None,
) -> None:
    """Search the index and print the best chunks."""
    from flows.retrieve import MODES, retrieve

    if mode is not None and mode not in MODES:
        raise _fail(f"--mode must be one of {', '.join(MODES)}, not {mode!r}", 2)
    settings = _settings()
    hits = retrieve(settings, text, k=k, source=source, mode=mode)
    if not hits:
        raise _fail("the index is empty or nothing matched: run `kbsync sync` first")
    console.print(f"[bold]{text}[/]", highlight=False)
    for hit in hits:
        body = hit.text.split("\n\n", 1)[-1] if "\n\n" in hit.text else hit.text
        snippet = " ".join(body.split())
        snippet = snippet[:300] + ("…" if len(snippet) > 300 else "")
        ranks = ", ".join(f"{side} #{r}" for side, r in hit.ranks.items())
        console.print(f"\n[bold cyan]{hit.rank}.[/] [green]{hit.score:.3f}[/]  [bold]{hit.title}[/]"
                      f"  [dim]({hit.metadata.get('source', '?')}; {ranks})[/]", highlight=False)
        console.print(f"   {hit.url}", style="blue", highlight=False, overflow="fold")
        console.print(f"   {snippet}", highlight=False, markup=False)


def _start_standin_if_needed(settings: Settings) -> tuple[Any, dict[str, Any]]:
    """``(server, settings overrides)``: the packaged stand-in started when no configured
    LLM endpoint answers, else ``(None, {})``."""
    from connectors.llm import LLMClient, LLMUnavailable, StandinServer

    probe = LLMClient(settings.llm_config())
    try:
        endpoint = probe.probe()
        err_console.print(f"using the configured LLM: {endpoint.label}", highlight=False)
        return None, {}
    except LLMUnavailable as exc:
        err_console.print(f"{exc}\nstarting the packaged stand-in model (SmolLM2-135M; "
                          "small and often wrong: it checks the pipeline, not the facts)",
                          highlight=False, markup=False)
        server = StandinServer(log_path=settings.data_dir / "llm-standin.log")
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return server, _standin_overrides(server.start())
    finally:
        probe.close()


def _print_sources(answer: Any) -> None:
    console.print("\n[bold]sources[/]", highlight=False)
    for i, hit in enumerate(answer.hits, 1):
        notes = [str(hit.metadata.get("source", "?"))]
        if i in answer.cited:
            notes.append("cited")
        elif answer.text is not None and i > answer.used:
            notes.append("did not fit the context window")
        console.print(f"[bold cyan][{i}][/] [bold]{hit.title}[/]  [dim]({'; '.join(notes)})[/]",
                      highlight=False)
        console.print(f"    {hit.url}", style="blue", highlight=False, overflow="fold")


@app.command()
@handle_errors
def ask(
    text: Annotated[str, typer.Argument(help="the question (Russian or English)")],
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, max=50,
                                   help="chunks to retrieve and give the model")] = 5,
    source: Annotated[str | None, typer.Option("--source", help="only this source")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object (no "
                                                         "streaming)")] = False,
    standin: Annotated[bool, typer.Option(
        "--standin", help="when no configured LLM endpoint answers, start the packaged "
                          "SmolLM2-135M stand-in for this question")] = False,
) -> None:
    """Answer a question from the index with the LLM, citing its sources [1], [2]
    (exit 3 when no LLM answers: the sources are still printed)."""
    import json
    import sys

    from flows.ask import START_AN_LLM
    from flows.ask import ask as ask_index

    settings = _settings()
    server = None
    if standin:
        server, extra = _start_standin_if_needed(settings)
        if extra:
            settings = _settings(**extra)
    streamed: list[str] = []

    def show(piece: str) -> None:
        if not streamed:
            console.print(f"[bold]{text}[/]\n", highlight=False)
        streamed.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        answer = ask_index(settings, text, k=k, source=source,
                           on_text=None if as_json else show)
    finally:
        if server is not None:
            server.stop()
    if as_json:
        typer.echo(json.dumps(answer.to_dict(), ensure_ascii=False, indent=2))
    if not answer.hits:
        raise _fail("the index is empty or nothing matched: run `kbsync sync` first")
    if not as_json:
        if streamed:
            sys.stdout.write("\n")
        elif answer.text is not None:
            console.print(f"[bold]{text}[/]\n", highlight=False)
            console.print(answer.text or "(the model gave no answer)", highlight=False,
                          markup=False)
        else:
            console.print(f"[bold]{text}[/]", highlight=False)
        _print_sources(answer)
        if answer.model:
            console.print(f"[dim]answered by {answer.model} in {answer.seconds['llm']:.1f} s"
                          "[/]", highlight=False)
    if answer.text is None:
        raise _fail(f"no answer: {answer.llm_error}; {START_AN_LLM}", 3)


@app.command()
@handle_errors
def reindex(
    lexical: Annotated[bool, typer.Option("--lexical", help="rebuild the lexical (BM25) index "
                                          "from the chunks Chroma holds")] = False,
) -> None:
    """Rebuild a derived index from Chroma (the source of truth).

    It writes, so against the embedded store it holds the data-dir lock a sync holds
    (:func:`flows.sync.index_lock`): it waits for a running sync, up to
    ``sync.index_lock_timeout_seconds``, then fails with ``IndexBusy`` and does nothing.
    """
    if not lexical:
        raise _fail("say what to rebuild: --lexical", 2)
    from connectors.lexical import open_index
    from flows.embed import rebuild_lexical
    from flows.retrieve import open_store
    from flows.sync import index_lock

    settings = _settings()
    with index_lock(settings):
        index = open_index(settings.lexical_location)
        try:
            n = rebuild_lexical(open_store(settings), index)
        finally:
            index.close()
    console.print(f"lexical index rebuilt: {n} chunks in {index.path}")


STATUS_STYLE = {"passed": "bold green", "failed": "bold red", "unchecked": "bold yellow"}
STATUS_EXIT = {"passed": 0, "failed": 1, "unchecked": 3}


def _print_report(report: dict[str, Any]) -> None:
    from transforms.evaluation import Metrics, result_cells, result_columns

    k = report["run"]["top_k"]
    style = STATUS_STYLE[report["status"]]
    console.print(f"[{style}]validation {report['status'].upper()}[/]: {report['reason']}",
                  highlight=False, soft_wrap=True)
    for note in report["notes"]:
        console.print(f"  note: {note}", highlight=False, markup=False, soft_wrap=True)
    table = Table(title=f"validation (hit rates and MRR at k={k}; faithfulness 0-1, "
                        "correctness 1-5)", box=None, pad_edge=False)
    table.add_column("set", no_wrap=True)
    for heading, _ in result_columns(k, short=True):
        table.add_column(heading, justify="right")
    rows = [(label, m) for label, m in report["metrics"].items() if m]
    rows += [(f"  {source}", m) for source, m in report["by_source"].items()]
    for label, m in rows:
        table.add_row(label, *result_cells(Metrics(**m), k))
    console.print(table)
    llm = report["llm"]
    calls = llm["calls"]
    used = ", ".join(llm["models_used"]) or "none"
    line = f"model: {llm['primary']}; answered and judged by: {used}"
    if calls.get("calls"):
        line += (f"; {calls['calls']} LLM calls, mean {calls['latency_mean_seconds']:.1f} s, "
                 f"p95 {calls['latency_p95_seconds']:.1f} s, {calls['prompt_tokens']} prompt + "
                 f"{calls['completion_tokens']} completion tokens")
    console.print(line, highlight=False, markup=False, soft_wrap=True)
    console.print(f"seconds: {report['run']['seconds'].get('total', 0):.1f}; seed "
                  f"{report['run']['seed']}; report: {report.get('report_path', '')}",
                  highlight=False, markup=False, soft_wrap=True)


def _print_history(settings: Settings) -> None:
    from flows.validate import read_history
    from transforms.evaluation import fmt

    entries = read_history(settings, last=30)
    if not entries:
        console.print(f"no validation runs yet under {settings.validation_dir}")
        return
    k = entries[-1].get("top_k", 5)
    console.print(f"validation history ({settings.validation_dir}): document hit rate and MRR "
                  f"at k={k}; golden = the golden set's document hit rate; ↑/↓ against the "
                  "run before", highlight=False, soft_wrap=True)
    table = Table(box=None, pad_edge=False)
    for column in ("UTC", "status", "n", "chunk hit", "doc hit", "MRR", "faith", "corr",
                   "golden", "model"):
        table.add_column(column, no_wrap=column != "model", overflow="fold",
                         min_width=12 if column == "model" else None)
    previous: dict[str, Any] = {}
    for entry in entries:
        sample = entry.get("sample") or {}
        golden = entry.get("golden") or {}

        def cell(value: Any, key: str) -> str:
            text = fmt(value)
            before = previous.get(key)
            if isinstance(value, int | float) and isinstance(before, int | float):
                text += " ↑" if value > before + 1e-9 else " ↓" if value < before - 1e-9 else ""
            if value is not None:
                previous[key] = value
            return text

        status = entry.get("status", "?")
        table.add_row(
            str(entry.get("started_at", ""))[5:16].replace("T", " "),
            f"[{STATUS_STYLE.get(status, '')}]{status}[/]",
            str(sample.get("questions", "–")),
            cell(sample.get("chunk_hit_rate"), "chunk"), cell(sample.get("doc_hit_rate"), "doc"),
            cell(sample.get("doc_mrr"), "mrr"), cell(sample.get("faithfulness"), "faith"),
            cell(sample.get("correctness"), "correct"), cell(golden.get("doc_hit_rate"), "golden"),
            ", ".join(m.split(" @ ")[0] for m in entry.get("models", [])),
        )
    console.print(table)


def _standin_overrides(endpoint: Any) -> dict[str, Any]:
    from connectors.llm import PACKAGED_MODEL_CONTEXT

    return {"llm": {"base_url": endpoint.base_url, "model": endpoint.model, "fallbacks": [],
                    "max_context_tokens": PACKAGED_MODEL_CONTEXT, "max_reply_tokens": 256,
                    "standin": True}}


@app.command("validate")
@handle_errors
def validate_cmd(
    sample: Annotated[int | None, typer.Option("--sample", "-n", min=1, max=1000,
                                               help="chunks to sample (default "
                                                    "validation.sample_size)")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="repeat a sample")] = None,
    history: Annotated[bool, typer.Option("--history", help="print the trend of past runs "
                                                            "and exit")] = False,
    standin: Annotated[bool, typer.Option(
        "--standin", help="when no configured LLM endpoint answers, start the packaged "
                          "SmolLM2-135M stand-in (llama-cpp-python) for this run")] = False,
    golden: Annotated[Path | None, typer.Option(
        "--golden", help="a golden set (YAML) to use instead of validation.golden_set")] = None,
) -> None:
    """Spot-check retrieval and answer quality with the LLM (exit 1 failed, 3 unchecked)."""
    settings = _settings()
    if golden is not None:
        if not golden.is_file():
            raise _fail(f"--golden {golden}: no such file", 2)
        golden = golden.resolve()
    if history:
        _print_history(settings)
        return
    from flows.validate import report_of, validate

    extra: dict[str, Any] = {}
    server = None
    if standin:
        server, extra = _start_standin_if_needed(settings)
    if golden is not None:
        extra["validation"] = {"golden_set": str(golden)}
    try:
        with _progress() as progress:
            progress.add_task("validating (LLM calls take a while)", total=None)
            state = validate(sample_size=sample, seed=seed,
                             config_path=str(OPTIONS.config) if OPTIONS.config else None,
                             overrides=_overrides(**extra), return_state=True)
    finally:
        if server is not None:
            server.stop()
    report = report_of(state)
    _print_report(report)
    code = STATUS_EXIT[report["status"]]
    if code:
        raise _fail(f"validation {report['status']}: {report['reason']}", code)


server_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="A local Prefect server under the data dir (persistent UI, "
                              "no temporary server per command).")
app.add_typer(server_app, name="server")


@server_app.command("start")
@handle_errors
def server_start(
    port: Annotated[int | None, typer.Option("--port", min=1, max=65535,
                                             help="default: a free port")] = None,
) -> None:
    """Start a real Prefect server kept under <data_dir>/prefect; later kbsync commands
    run their flows against it (unless PREFECT_API_URL is set)."""
    from flows import server

    data_dir = _settings().data_dir
    record = server.start(data_dir, port=port)
    console.print(f"Prefect server running (pid {record['pid']}): UI {record['ui_url']}\n"
                  f"kbsync commands with --data-dir {data_dir} use it; other Prefect "
                  f"clients: export PREFECT_API_URL={record['api_url']}\n"
                  f"log: {record['log']}; stop it with `kbsync server stop`",
                  highlight=False, soft_wrap=True)


@server_app.command("stop")
@handle_errors
def server_stop() -> None:
    """Stop the Prefect server started by `kbsync server start`."""
    from flows import server

    if not server.stop(_settings().data_dir):
        raise _fail("no Prefect server was started under this data dir")
    console.print("Prefect server stopped")


llm_app = typer.Typer(add_completion=False, no_args_is_help=True,
                      help="The local model server.")
app.add_typer(llm_app, name="llm")


@llm_app.command("serve")
@handle_errors
def llm_serve(
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8080,
    model: Annotated[Path | None, typer.Option(
        "--model", help="a GGUF file (default: the packaged SmolLM2-135M-Instruct)")] = None,
    alias: Annotated[str | None, typer.Option("--alias", help="the model name clients use")] = None,
    n_ctx: Annotated[int, typer.Option("--n-ctx", min=256, help="context window, tokens")] = 2048,
    threads: Annotated[int | None, typer.Option("--threads", min=1)] = None,
) -> None:
    """Serve a local GGUF model (default: the packaged stand-in) on an OpenAI-compatible
    API with llama-cpp-python, for machines without Ollama. Runs until Ctrl-C."""
    import os
    import sys
    from importlib.util import find_spec

    from connectors.llm import PACKAGED_MODEL_ALIAS, packaged_model_path, server_command

    if find_spec("llama_cpp") is None:
        raise _fail("llama-cpp-python is not installed: `make install` builds it, or "
                    "CMAKE_ARGS='-DLLAVA_BUILD=OFF' pip install 'llama-cpp-python[server]'")
    path = model or packaged_model_path()
    name = alias or (PACKAGED_MODEL_ALIAS if model is None else path.stem)
    cmd = server_command(path, host=host, port=port, alias=name, n_ctx=n_ctx, threads=threads)
    err_console.print(
        f"serving {path.name} as {name!r} on http://{host}:{port}/v1 — point kbsync at it:\n"
        f"  export KBSYNC_LLM__BASE_URL=http://{host}:{port}/v1 KBSYNC_LLM__MODEL={name} "
        f"KBSYNC_LLM__MAX_CONTEXT_TOKENS={n_ctx} KBSYNC_LLM__MAX_REPLY_TOKENS="
        f"{min(256, n_ctx // 4)}" + (" KBSYNC_LLM__STANDIN=true" if model is None else ""),
        highlight=False, markup=False, soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)  # the server replaces this process: Ctrl-C and signals reach it


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()

"""The Prefect deployments of kbsync, derived from settings.

One list of :class:`DeploymentSpec` serves both ways of running on a schedule:

* ``kbsync deployments --output deployments/prefect.yaml`` writes it as a
  ``prefect.yaml`` for ``prefect deploy --prefect-file deployments/prefect.yaml --all``
  (workers on the ``cpu`` and ``gpu`` work pools run the flows;
  https://docs.prefect.io/v3/deploy/infrastructure-concepts/prefect-yaml);
* ``kbsync serve`` serves all of them from one process (``prefect.serve``,
  https://docs.prefect.io/v3/how-to-guides/deployments/run-flows-in-local-processes).

The deployments:

=============== =========================== ======== ============================================
name            flow (entrypoint)           pool     schedule
=============== =========================== ======== ============================================
sync-<source>   flows/sync.py:sync_source   cpu      the source's ``schedule``, else
                                                     ``deployments.sync_schedule`` (hourly)
sync-all        flows/sync.py:sync_all      cpu      ``deployments.sync_all_schedule`` (nightly),
                                                     with ``reconcile: true``
backfill        flows/sync.py:sync_source   cpu      none; parameters source, since, until, full
validate        flows/validate.py:validate  cpu      ``deployments.validate_schedule`` (none)
embed           flows/embed.py:embed        gpu      none; run by syncs in remote mode
=============== =========================== ======== ============================================

``sync-<source>`` and ``sync-all`` run one at a time: a deployment concurrency limit of 1
with the ``CANCEL_NEW`` collision strategy, so a run that comes due while the previous
one still runs is cancelled instead of stacking up
(https://docs.prefect.io/v3/how-to-guides/deployments/deployment-concurrency).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flows.settings import ConfigError, Settings

SYNC_ENTRYPOINT = "flows/sync.py:sync_source"
SYNC_ALL_ENTRYPOINT = "flows/sync.py:sync_all"
VALIDATE_ENTRYPOINT = "flows/validate.py:validate"
EMBED_ENTRYPOINT = "flows/embed.py:embed"
#: ``flow-name/deployment-name`` of the backfill deployment (``kbsync backfill --deployment``).
BACKFILL_DEPLOYMENT = "sync-source/backfill"
#: The environment variable naming the project directory on a worker (the pull step
#: changes into it, so the file entrypoints resolve).
PROJECT_DIR_VARIABLE = "KBSYNC_PROJECT_DIR"


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment.

    Attributes:
        name: deployment name (``sync-docs``, ``embed``, ...).
        entrypoint: ``path/to/file.py:flow_function`` relative to the project root.
        work_pool: work pool whose workers run it (``prefect.yaml`` only; served
            deployments run in the serving process).
        description: shown in the UI.
        parameters: default parameters of its runs.
        cron: cron schedule (5 fields) or None for none.
        timezone: time zone of ``cron``.
        one_at_a_time: concurrency limit 1 with collision strategy CANCEL_NEW.
        tags: UI tags.
    """

    name: str
    entrypoint: str
    work_pool: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)
    cron: str | None = None
    timezone: str = "UTC"
    one_at_a_time: bool = False
    tags: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        """The entrypoint as a module name (``flows/sync.py`` -> ``flows.sync``)."""
        return self.entrypoint.split(":", 1)[0].removesuffix(".py").replace("/", ".")

    @property
    def function(self) -> str:
        return self.entrypoint.split(":", 1)[1]

    def to_prefect_yaml(self) -> dict[str, Any]:
        """This deployment as an entry of ``prefect.yaml``'s ``deployments`` list."""
        entry: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "entrypoint": self.entrypoint,
            "tags": list(self.tags),
            "parameters": dict(self.parameters),
            "work_pool": {"name": self.work_pool, "job_variables": {}},
            "schedules": ([{"cron": self.cron, "timezone": self.timezone, "active": True}]
                          if self.cron else []),
        }
        if self.one_at_a_time:
            entry["concurrency_limit"] = {"limit": 1, "collision_strategy": "CANCEL_NEW"}
        return entry


def _check_cron(cron: str | None, timezone: str, key: str) -> str | None:
    if cron is None:
        return None
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValueError as exc:
        reason = str(exc).splitlines()[-1].strip() if str(exc) else type(exc).__name__
        raise ConfigError(f"{key}: invalid cron schedule {cron!r} in time zone "
                          f"{timezone!r}: {reason}") from None
    return cron


def deployment_specs(settings: Settings) -> list[DeploymentSpec]:
    """The deployments for ``settings``: ``sync-<source>`` per source, then ``sync-all``,
    ``backfill``, ``validate`` and ``embed``.

    Raises:
        ConfigError: a cron schedule or time zone is invalid (names the key).
    """
    dep = settings.deployments
    tz = dep.timezone
    specs = []
    for i, source in enumerate(settings.sources):
        own = getattr(source, "schedule", None)
        key = f"sources[{i}] ({source.name}).schedule" if own else "deployments.sync_schedule"
        specs.append(DeploymentSpec(
            name=f"sync-{source.name}", entrypoint=SYNC_ENTRYPOINT, work_pool=dep.cpu_pool,
            description=f"Incremental sync of the {source.type} source {source.name!r}.",
            parameters={"source": source.name},
            cron=_check_cron(own or dep.sync_schedule, tz, key), timezone=tz,
            one_at_a_time=True, tags=("kbsync", "sync", source.type)))
    specs += [
        DeploymentSpec(
            name="sync-all", entrypoint=SYNC_ALL_ENTRYPOINT, work_pool=dep.cpu_pool,
            description="Sync every configured source and reconcile deletions.",
            parameters={"reconcile": True},
            cron=_check_cron(dep.sync_all_schedule, tz, "deployments.sync_all_schedule"),
            timezone=tz, one_at_a_time=True, tags=("kbsync", "sync")),
        DeploymentSpec(
            name="backfill", entrypoint=SYNC_ENTRYPOINT, work_pool=dep.cpu_pool,
            description="Re-ingest what changed in a time window (parameters source, since, "
                        "until, full) without moving the cursor.",
            tags=("kbsync", "backfill")),
        DeploymentSpec(
            name="validate", entrypoint=VALIDATE_ENTRYPOINT, work_pool=dep.cpu_pool,
            description="Spot-check retrieval and answers with the local LLM.",
            cron=_check_cron(dep.validate_schedule, tz, "deployments.validate_schedule"),
            timezone=tz, tags=("kbsync", "validate")),
        DeploymentSpec(
            name="embed", entrypoint=EMBED_ENTRYPOINT, work_pool=dep.gpu_pool,
            description="Embed a staged batch (CUDA fp16 when present) and write it to "
                        "Chroma and the lexical index; run by syncs in remote mode.",
            tags=("kbsync", "embed")),
    ]
    return specs


HEADER = """\
# kbsync deployments for `prefect deploy`, written by `kbsync deployments` from {origin}.
# Rewrite it after changing sources or schedules:
#     kbsync deployments --output deployments/prefect.yaml
# Register every deployment (from the project root, PREFECT_API_URL set to the server):
#     prefect deploy --prefect-file deployments/prefect.yaml --all
# Workers: `prefect worker start --pool {cpu} --type process`, and
# `prefect worker start --pool {gpu} --type process` on the GPU machine; each with
# {var} set to the project directory (the pull step changes into it)
# and the same kbsync settings (KBSYNC_CONFIG, KBSYNC_* variables).
"""


def prefect_yaml(settings: Settings, origin: str = "kbsync settings") -> str:
    """``prefect.yaml`` text for ``settings`` (``origin`` names the settings in the header).

    Raises:
        ConfigError: a cron schedule is invalid.
    """
    document = {
        "name": "kbsync",
        "prefect-version": "3.8.8",
        "build": None,
        "push": None,
        "pull": [{"prefect.deployments.steps.set_working_directory": {
            "directory": "{{ $" + PROJECT_DIR_VARIABLE + " }}"}}],
        "deployments": [spec.to_prefect_yaml() for spec in deployment_specs(settings)],
    }
    header = HEADER.format(origin=origin, cpu=settings.deployments.cpu_pool,
                           gpu=settings.deployments.gpu_pool, var=PROJECT_DIR_VARIABLE)
    return header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)


def load_flow(spec: DeploymentSpec):
    """The Prefect flow object of ``spec``'s entrypoint (imported as a module).

    Raises:
        ConfigError: the module or the flow cannot be imported.
    """
    try:
        module = importlib.import_module(spec.module)
        return getattr(module, spec.function)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"deployment {spec.name}: cannot load {spec.entrypoint}: "
                          f"{type(exc).__name__}: {exc}") from None


def served_deployments(settings: Settings, names: list[str] | None = None, *,
                       config_path: str | Path | None = None,
                       overrides: dict[str, Any] | None = None) -> list[Any]:
    """``RunnerDeployment``s for ``prefect.serve``: every spec (or those named), with its
    cron schedule and concurrency limit, entrypoints as module paths (the serving
    process's ``sys.path`` resolves them, whatever the working directory).

    ``config_path`` and ``overrides`` become default parameters of the flows that take
    them, so served runs read the settings ``kbsync serve`` was started with.

    Raises:
        ConfigError: an unknown name, an invalid cron, or a flow that cannot be loaded.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    specs = deployment_specs(settings)
    if names:
        known = {s.name for s in specs}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"unknown deployment(s) {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(known))})")
        specs = [s for s in specs if s.name in names]
    out = []
    for spec in specs:
        flow = load_flow(spec)
        accepted = inspect.signature(flow.fn).parameters
        parameters = dict(spec.parameters)
        if config_path is not None and "config_path" in accepted:
            parameters["config_path"] = str(Path(config_path).resolve())
        if overrides and "overrides" in accepted:
            parameters["overrides"] = overrides
        out.append(flow.to_deployment(
            name=spec.name,
            description=spec.description,
            tags=list(spec.tags),
            parameters=parameters,
            schedules=[Cron(spec.cron, timezone=spec.timezone)] if spec.cron else None,
            concurrency_limit=(ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
                if spec.one_at_a_time else None),
            entrypoint_type=EntrypointType.MODULE_PATH,
        ))
    return out

"""kbsync.yaml + environment -> validated settings (pydantic-settings).

Where settings come from, strongest first:

1. keyword overrides given by the CLI (``--data-dir``),
2. environment variables ``KBSYNC_<FIELD>``, nested with ``__``
   (``KBSYNC_STATE_URL``, ``KBSYNC_CHROMA__URL``, ``KBSYNC_EMBEDDING__DEVICE``),
3. the YAML file: ``--config PATH``, else ``$KBSYNC_CONFIG``, else ``./kbsync.yaml``
   when it exists. ``${VAR}`` and ``${VAR:-default}`` in YAML string values are
   replaced from the environment, so secrets stay out of the file.

Unknown keys are errors (a typo must not silently fall back to a default), and every
error names the key: ``sources[0] (docs).max_file_bytes: Input should be a valid
integer``. Secrets are ``SecretStr``: they print as ``**********``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from connectors.base import SourceOptions
from connectors.confluence import ConfluenceConnector, ConfluenceSourceOptions
from connectors.git import GitConnector, GitSourceOptions
from connectors.gitlab import GitLabConnector, GitLabSourceOptions
from connectors.http import RetryPolicy, fold_legacy_keys
from connectors.jira import JiraConnector, JiraSourceOptions
from connectors.llm import (
    DEFAULT_API_KEY,
    DEFAULT_BASE_URL,
    DEFAULT_PRESETS,
    Endpoint,
    LLMConfig,
    Sampling,
)
from connectors.llm import (
    DEFAULT_MODEL as DEFAULT_LLM_MODEL,
)
from transforms.embedding import DEFAULT_MODEL, EmbedderSpec

DEFAULT_CONFIG_FILE = "kbsync.yaml"
SOURCE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
Options = TypeVar("Options", bound=SourceOptions)


class ConfigError(Exception):
    """The configuration is missing, unreadable or invalid; the message names the key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChromaSettings(_Model):
    """Vector store: embedded under ``<data_dir>/chroma`` unless ``url`` is set."""

    url: str | None = Field(None, description="Chroma server, e.g. http://chroma:8000")
    collection: str = Field("kbsync", pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]$")
    path: Path | None = Field(None, description="embedded store directory")


class EmbeddingSettings(_Model):
    """The sentence-transformers model that turns chunks into vectors, and where it runs.

    ``mode: local`` (default) embeds in the sync's own process. ``mode: remote`` hands
    each page's batch to the ``embed`` deployment (the ``gpu`` work pool) as a Parquet
    file under ``staging`` and waits for that run; see ``flows.embed``.
    """

    model: str = DEFAULT_MODEL
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    batch_size: int = Field(64, ge=1, le=4096)
    offline: bool = Field(True, description="never reach the Hugging Face hub")
    mode: Literal["local", "remote"] = Field(
        "local", description="local: embed in-process; remote: run the embed deployment")
    staging: str | None = Field(
        None, description="remote mode: where batches are staged, a path or any fsspec URL "
                          "(s3://bucket/kbsync, ...); default <data_dir>/staging")
    deployment: str = Field("embed/embed", description="remote mode: the embed deployment, "
                                                       "as flow-name/deployment-name")
    remote_timeout_seconds: float | None = Field(
        3600.0, gt=0, description="remote mode: how long to wait for one embed run")
    remote_poll_seconds: float = Field(
        2.0, gt=0, description="remote mode: how often to ask the server for the run's state")
    backend: Literal["sentence-transformers", "openai"] = Field(
        "sentence-transformers",
        description="sentence-transformers: the model in this process; openai: a warm "
                    "OpenAI-compatible embeddings server at base_url (Infinity on the GPU "
                    "machine); this side then loads the tokenizer only, never torch")
    base_url: str | None = Field(None, description="backend openai: the embeddings server, "
                                                   "e.g. http://gpu-host:7997")
    api_key: SecretStr | None = Field(None, description="backend openai: bearer token "
                                                        "(KBSYNC_EMBEDDING__API_KEY)")
    request_timeout_seconds: float = Field(
        120.0, gt=0, description="backend openai: read timeout of one batch (an encode, not "
                                 "a REST call: not http.timeout_seconds)")
    http: RetryPolicy = Field(default_factory=RetryPolicy,
                              description="backend openai: retries of a failed request "
                                          "(max_retries; the openai client's own waits); "
                                          "keys set here replace the top-level http: ones")
    batch_chunks: int = Field(256, ge=1, le=100_000,
                              description="chunks handed to the embedder at once, gathered "
                                          "across pages")
    onnx_queries: bool = Field(
        True, description="backend sentence-transformers: embed questions with an ONNX export "
                          "of the model (onnxruntime, no torch import; made once per model, by "
                          "the first sync that loads it or the first query); false: torch")
    onnx_cache: Path | None = Field(
        None, description="where the ONNX exports live; default "
                          "$XDG_CACHE_HOME/kbsync/onnx (~/.cache/kbsync/onnx)")

    @model_validator(mode="before")
    @classmethod
    def _legacy_retry_keys(cls, data: Any) -> Any:
        # deprecated: embedding.request_retries
        return fold_legacy_keys(data, {"request_retries": "max_retries"})

    @model_validator(mode="after")
    def _base_url_for_openai(self) -> EmbeddingSettings:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("embedding.backend openai needs embedding.base_url")
        return self

    def spec(self, http: RetryPolicy | None = None) -> EmbedderSpec:
        """The embedder's spec; ``http`` is the top-level ``http:`` section that
        ``embedding.http`` is put over (pass ``settings.http``)."""
        policy = self.http.over(http or RetryPolicy())
        return EmbedderSpec(model=self.model, device=self.device, batch_size=self.batch_size,
                            offline=self.offline, backend=self.backend, base_url=self.base_url,
                            timeout_seconds=self.request_timeout_seconds,
                            retries=policy.max_retries)

    def onnx_dir(self) -> Path:
        """The folder of the ONNX exports (``onnx_cache``, else the user's cache)."""
        if self.onnx_cache is not None:
            return self.onnx_cache.expanduser()
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(cache) / "kbsync" / "onnx"

    def encoder(self, http: RetryPolicy | None = None) -> Any:
        """The embedder for these settings (see :func:`connectors.embeddings.load_encoder`);
        ``http`` as in :meth:`spec`."""
        from connectors.embeddings import load_encoder

        key = self.api_key.get_secret_value() if self.api_key else None
        return load_encoder(self.spec(http), key)


class ChunkingSettings(_Model):
    """Chunk size in the embedding model's tokens; ``None`` = what the model reads."""

    max_tokens: int | None = Field(None, ge=16)
    overlap_tokens: int = Field(32, ge=0)


class LexicalSettings(_Model):
    """The BM25 index kept in step with Chroma: SQLite FTS5 under the data dir, or one
    PostgreSQL database every worker shares (``url``)."""

    enabled: bool = True
    path: Path | None = Field(None, description="default <data_dir>/lexical.db")
    url: str | None = Field(None, description="postgresql+psycopg://user@host:5432/db: the "
                                              "lexical index in PostgreSQL (then path is unused)")


class RetrievalSettings(_Model):
    """How ``kbsync query``, the validation flow and ``retrieve()`` rank chunks."""

    mode: Literal["dense", "lexical", "hybrid"] = "hybrid"
    candidates: int = Field(50, ge=1, le=1000,
                            description="chunks taken from each side before fusion")
    rrf_k: int = Field(60, ge=1, description="reciprocal-rank fusion constant")
    dense_weight: float = Field(1.0, ge=0)
    lexical_weight: float = Field(1.0, ge=0)
    adaptive_dense_weight: bool = Field(
        True, description="scale dense_weight down for queries the model's tokenizer "
                          "shreds (tokens per word above fertility_full)")
    fertility_full: float = Field(3.0, gt=0, description="tokens/word up to which dense "
                                                         "counts fully")
    fertility_zero: float = Field(3.8, gt=0, description="tokens/word from which dense "
                                                         "counts nothing")


class SyncSettings(_Model):
    """How runs behave."""

    fetch_retries: int = Field(3, ge=0, description="retries of a failed page fetch")
    fetch_retry_delay_seconds: float = Field(5.0, ge=0)
    reconcile_every: int = Field(
        24, ge=0, description="reconcile deletions every N syncs of a source (0 = only --full)")
    lease_ttl_seconds: float = Field(
        120, ge=10, validation_alias=AliasChoices("lease_ttl_seconds", "lock_ttl_seconds"),
        description="a run's lease on its source, renewed by a heartbeat every ttl/3 while "
                    "the run lives; a run that died where it cannot be proven dead (another "
                    "host, no Prefect API) frees the source after this long "
                    "(old name: lock_ttl_seconds)")
    index_lock_timeout_seconds: float = Field(
        600, ge=0, description="embedded index only (no chroma.url): how long a run waits "
                               "for another process's run to release the index before it "
                               "is refused")


class DeploymentSettings(_Model):
    """Prefect deployments written by ``kbsync deployments`` and served by ``kbsync serve``.

    Cron strings are Prefect cron schedules (5 fields, evaluated in ``timezone``).
    """

    cpu_pool: str = Field("cpu", description="work pool for fetching and chunking")
    gpu_pool: str = Field("gpu", description="work pool of the embed deployment")
    sync_schedule: str = Field("0 * * * *", description="cron of sync-<source> deployments "
                                                         "whose source sets no schedule")
    sync_all_schedule: str | None = Field(
        "30 2 * * *", description="cron of the nightly sync-all with reconciliation")
    validate_schedule: str | None = Field(None, description="cron of the validate deployment")
    timezone: str = Field("UTC", description="time zone the cron schedules are read in")


class SamplingPreset(_Model):
    """Sampling of one kind of LLM call."""

    temperature: float = Field(ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)


class LLMFallback(_Model):
    """Another model to use when the ones before it cannot be reached or time out;
    ``base_url`` and ``api_key`` default to the primary's."""

    model: str = Field(min_length=1)
    base_url: str | None = None
    api_key: SecretStr | None = None
    timeout_seconds: float | None = Field(None, gt=0, description="default llm.timeout_seconds")


def _default_presets() -> dict[str, SamplingPreset]:
    return {name: SamplingPreset(temperature=p.temperature, top_p=p.top_p)
            for name, p in DEFAULT_PRESETS.items()}


class LLMSettings(_Model):
    """The model server the validation flow asks (any OpenAI-compatible chat API)."""

    base_url: str = Field(DEFAULT_BASE_URL, description="OpenAI-compatible API root (Ollama /v1)")
    model: str = Field(DEFAULT_LLM_MODEL, min_length=1)
    api_key: SecretStr = Field(SecretStr(DEFAULT_API_KEY), description="local servers ignore it")
    timeout_seconds: float = Field(300.0, gt=0, description="read timeout of one request "
                                   "(a generation, not a REST call: not http.timeout_seconds)")
    connect_timeout_seconds: float = Field(5.0, gt=0)
    http: RetryPolicy = Field(default_factory=RetryPolicy,
                              description="retries of connection errors, timeouts, 429, 5xx; "
                                          "keys set here replace the top-level http: ones")
    max_context_tokens: int = Field(8192, ge=256,
                                    description="the server's context window (Ollama num_ctx)")
    max_reply_tokens: int = Field(2048, ge=16, description="reasoning included")
    presets: dict[str, SamplingPreset] = Field(default_factory=_default_presets)
    fallbacks: list[LLMFallback] = Field(default_factory=list)
    standin: bool = Field(False, description="the model is a stand-in (e.g. the packaged "
                                             "SmolLM2): validation reports its answer "
                                             "quality but does not judge by it")

    @model_validator(mode="before")
    @classmethod
    def _legacy_retry_keys(cls, data: Any) -> Any:
        # deprecated: llm.retries, llm.retry_backoff_seconds
        return fold_legacy_keys(data, {"retries": "max_retries",
                                       "retry_backoff_seconds": "backoff_seconds"})

    @field_validator("presets")
    @classmethod
    def _factual_preset(cls, presets: dict[str, SamplingPreset]) -> dict[str, SamplingPreset]:
        merged = {**_default_presets(), **presets}
        if merged["factual"].temperature > 0.3:
            raise ValueError("the 'factual' preset (used for judging) needs temperature <= 0.3")
        return merged

    @model_validator(mode="after")
    def _reply_fits(self) -> LLMSettings:
        if self.max_reply_tokens >= self.max_context_tokens:
            raise ValueError("max_reply_tokens must be smaller than max_context_tokens")
        return self

    def config(self, http: RetryPolicy | None = None) -> LLMConfig:
        """The connector's configuration: the primary endpoint, then the fallbacks;
        ``http`` is the top-level ``http:`` section that ``llm.http`` is put over (pass
        ``settings.http``; :meth:`Settings.llm_config` does)."""
        key = self.api_key.get_secret_value()
        endpoints = [Endpoint(self.base_url, self.model, key)] + [
            Endpoint(f.base_url or self.base_url, f.model,
                     f.api_key.get_secret_value() if f.api_key else key, f.timeout_seconds)
            for f in self.fallbacks]
        return LLMConfig(
            endpoints=tuple(endpoints), timeout_seconds=self.timeout_seconds,
            connect_timeout_seconds=self.connect_timeout_seconds,
            http=self.http.over(http or RetryPolicy()),
            max_context_tokens=self.max_context_tokens, max_reply_tokens=self.max_reply_tokens,
            presets={n: Sampling(p.temperature, p.top_p) for n, p in self.presets.items()})


class ValidationThresholds(_Model):
    """What a validation run must reach; ``null`` turns a check off. Hit rates and MRR
    are 0..1 at ``validation.top_k``; faithfulness is 0..1; correctness is 1..5."""

    min_doc_hit_rate: float | None = Field(0.8, ge=0, le=1)
    min_chunk_hit_rate: float | None = Field(None, ge=0, le=1)
    min_doc_mrr: float | None = Field(None, ge=0, le=1)
    min_faithfulness: float | None = Field(0.8, ge=0, le=1)
    min_correctness: float | None = Field(3.0, ge=1, le=5)
    max_judge_failure_rate: float | None = Field(0.25, ge=0, le=1)


class ValidationSettings(_Model):
    """The validation flow: sampled chunks -> questions -> retrieval -> answers -> judge."""

    after_sync: bool = Field(True, description="run after each sync-all (scheduled syncs)")
    sample_size: int = Field(20, ge=1, le=1000)
    seed: int | None = Field(None, description="fixed sample; default a new one per run")
    top_k: int = Field(5, ge=1, le=100)
    check_answers: bool = Field(True, description="answer and judge (else questions and "
                                                  "retrieval only)")
    min_chunk_chars: int = Field(200, ge=0, description="shorter chunks are not sampled")
    recency_half_life_days: float = Field(30.0, gt=0)
    recency_boost: float = Field(3.0, ge=0, description="a just-changed document is "
                                                         "1 + boost times as likely")
    golden_set: Path | None = Field(None, description="YAML: question, expected, reference")
    history_keep: int = Field(200, ge=1, description="JSON reports kept under the data dir")
    thresholds: ValidationThresholds = Field(default_factory=ValidationThresholds)
    golden_thresholds: ValidationThresholds | None = Field(
        None, description="for the golden set; default the same as thresholds")
    golden_modes: list[Literal["dense", "lexical", "hybrid"]] = Field(
        default_factory=list, description="also measure the golden set's retrieval in "
        "these modes, each against golden_thresholds (a hybrid ranking can hide a broken "
        "dense side)")


def _options(source: SourceOptions, options: type[Options], settings: Settings) -> Options:
    """The connector's own options out of a source's settings (``type`` and ``schedule``
    left behind; the source's ``http:`` put over the top-level one); secrets stay
    ``SecretStr``."""
    values = {key: getattr(source, key) for key in options.model_fields}
    if "http" in values:
        values["http"] = values["http"].over(settings.http)
    return options.model_validate(values)


class _Source(SourceOptions):
    """What every source's settings add to its connector's options: a checked name and
    a schedule (each ``*Source`` names its ``type``)."""

    name: str = Field(pattern=SOURCE_NAME)
    schedule: str | None = Field(None, description="cron for scheduled syncs")


class GitSource(_Source, GitSourceOptions):
    """A git repository: a local path or a clone URL (``type: git``)."""

    type: Literal["git"] = "git"

    def build(self, settings: Settings) -> GitConnector:
        """The connector for this source."""
        return GitConnector(_options(self, GitSourceOptions, settings), data_dir=settings.data_dir)


class ConfluenceSource(_Source, ConfluenceSourceOptions):
    """Confluence Cloud or Server/Data Center (``type: confluence``).

    Scope: ``spaces`` and/or a ``cql`` filter (both given: both must match). Auth, one of:
    ``email`` + ``api_token`` (Cloud), ``token`` (Server/DC personal access token),
    ``username`` + ``password`` (Server/DC), or none for a public site.
    """

    type: Literal["confluence"] = "confluence"

    @model_validator(mode="after")
    def _scope_and_auth(self) -> ConfluenceSource:
        if not self.spaces and not self.cql:
            raise ValueError("give spaces, cql or both")
        if bool(self.email) != bool(self.api_token):
            raise ValueError("email and api_token go together (Cloud)")
        if bool(self.username) != bool(self.password):
            raise ValueError("username and password go together (Server/Data Center)")
        styles = sum([bool(self.email), bool(self.token), bool(self.username)])
        if styles > 1:
            raise ValueError("give one auth style: email + api_token, token, or "
                             "username + password")
        return self

    def options(self, settings: Settings) -> ConfluenceSourceOptions:
        """The connector's options (secrets stay ``SecretStr``)."""
        return _options(self, ConfluenceSourceOptions, settings)

    def build(self, settings: Settings) -> ConfluenceConnector:
        """The connector for this source."""
        return ConfluenceConnector(self.options(settings))


class GitLabSource(_Source, GitLabSourceOptions):
    """GitLab projects: repository files, issues, merge requests, wiki (``type: gitlab``)."""

    type: Literal["gitlab"] = "gitlab"

    @model_validator(mode="after")
    def _needs_projects(self) -> GitLabSource:
        if not self.projects and not self.group:
            raise ValueError("set projects, group, or both")
        return self

    def build(self, settings: Settings) -> GitLabConnector:
        """The connector for this source."""
        return GitLabConnector(_options(self, GitLabSourceOptions, settings),
                               data_dir=settings.data_dir)


class JiraSource(_Source, JiraSourceOptions):
    """Jira Cloud or Server/Data Center issues matching a JQL filter (``type: jira``).

    Cloud: ``email`` + ``api_token``; Server/DC: ``token`` (a personal access token);
    neither: anonymous. Cloud or Server is read from ``/rest/api/2/serverInfo``.
    """

    type: Literal["jira"] = "jira"

    @model_validator(mode="after")
    def _one_auth(self) -> JiraSource:
        if bool(self.email) != bool(self.api_token):
            raise ValueError("email and api_token go together (Jira Cloud)")
        if self.token and self.api_token:
            raise ValueError("give either email + api_token (Cloud) or token (Server/DC)")
        return self

    def build(self, settings: Settings) -> JiraConnector:
        """The connector for this source."""
        return JiraConnector(_options(self, JiraSourceOptions, settings))


#: Every source type; later source types join this union.
SourceSettings = Annotated[GitSource | GitLabSource | ConfluenceSource | JiraSource,
                           Field(discriminator="type")]


class Settings(BaseSettings):
    """All of kbsync's settings (see ``kbsync.example.yaml``)."""

    model_config = SettingsConfigDict(env_prefix="KBSYNC_", env_nested_delimiter="__",
                                      extra="forbid")

    data_dir: Path = Field(Path(".kbsync"), description="where embedded state lives")
    state_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir")
    chroma: ChromaSettings = Field(default_factory=ChromaSettings)
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    chunking: ChunkingSettings = Field(default_factory=ChunkingSettings)
    sync: SyncSettings = Field(default_factory=SyncSettings)
    http: RetryPolicy = Field(default_factory=RetryPolicy,
                              description="retries and timeouts of every HTTP client: "
                                          "Confluence, Jira, GitLab, the LLM; a source's "
                                          "own http: (or llm.http) replaces single keys")
    lexical: LexicalSettings = Field(default_factory=LexicalSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    deployments: DeploymentSettings = Field(default_factory=DeploymentSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    sources: list[SourceSettings] = Field(default_factory=list)

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[Any]) -> list[Any]:
        seen: set[str] = set()
        for source in sources:
            if source.name in seen:
                raise ValueError(f"source name {source.name!r} is used twice")
            seen.add(source.name)
        return sources

    # -------------------------------------------------------------- derived values

    @property
    def resolved_state_url(self) -> str:
        from flows.state import default_state_url

        return self.state_url or default_state_url(self.data_dir)

    @property
    def chroma_path(self) -> Path:
        return self.chroma.path or self.data_dir / "chroma"

    @property
    def lexical_path(self) -> Path:
        return self.lexical.path or self.data_dir / "lexical.db"

    @property
    def lexical_location(self) -> str | Path:
        """``lexical.url`` when set (PostgreSQL), else the SQLite file."""
        return self.lexical.url or self.lexical_path

    @property
    def staging_location(self) -> str:
        """Where remote-mode batches are staged: ``embedding.staging`` or
        ``<data_dir>/staging``."""
        return self.embedding.staging or str(self.data_dir / "staging")

    @property
    def validation_dir(self) -> Path:
        """Where validation reports and their history are written."""
        return self.data_dir / "validation"

    def llm_config(self) -> LLMConfig:
        """The LLM client's configuration, ``llm.http`` put over ``http``."""
        return self.llm.config(self.http)

    def source(self, name: str) -> Any:
        """The settings of source ``name``; raises :class:`ConfigError` if unknown."""
        for source in self.sources:
            if source.name == name:
                return source
        known = ", ".join(s.name for s in self.sources) or "none"
        raise ConfigError(f"unknown source {name!r} (configured: {known})")


def interpolate(value: Any, where: str = "") -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a YAML tree.

    Raises:
        ConfigError: a variable is not set and has no default (names key and variable).
    """
    if isinstance(value, dict):
        return {k: interpolate(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        def repl(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{where}: environment variable {name} is not set")

        return _VAR.sub(repl, value)
    return value


def config_path(explicit: str | Path | None = None) -> Path | None:
    """The YAML file to read: ``explicit``, ``$KBSYNC_CONFIG``, ``./kbsync.yaml``, or None.

    Raises:
        ConfigError: an explicitly named file does not exist.
    """
    named = explicit or os.environ.get("KBSYNC_CONFIG")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def read_yaml(path: Path | None) -> dict[str, Any]:
    """The interpolated YAML mapping at ``path`` (``{}`` for None or an empty file)."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, not {type(data).__name__}")
    return interpolate(data)


class _MappingSource(PydanticBaseSettingsSource):
    """A settings source that yields a fixed mapping (the interpolated YAML)."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.data = data

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self.data


def _format_errors(exc: ValidationError, data: dict[str, Any], origin: str) -> str:
    sources = data.get("sources") if isinstance(data.get("sources"), list) else []
    lines = []
    for err in exc.errors():
        parts: list[str] = []
        loc = list(err["loc"])
        i = 0
        while i < len(loc):
            part = loc[i]
            if isinstance(part, int):
                label = f"[{part}]"
                if parts == ["sources"] and part < len(sources) and isinstance(sources[part], dict):
                    name = sources[part].get("name")
                    label += f" ({name})" if name else ""
                    # skip the discriminator tag pydantic inserts (sources.0.git.url)
                    if i + 1 < len(loc) and loc[i + 1] == sources[part].get("type"):
                        i += 1
                parts.append(label)
            else:
                parts.append(("." if parts else "") + str(part))
            i += 1
        msg = err["msg"]
        if err["type"] == "union_tag_not_found":
            msg = "missing 'type' (the kind of source, e.g. type: git)"
        lines.append(f"{''.join(parts) or '(top level)'}: {msg}")
    return f"invalid configuration ({origin}):\n  " + "\n  ".join(lines)


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read and validate settings (see the module docstring for the precedence).

    Raises:
        ConfigError: missing file, bad YAML, unset ``${VAR}``, or invalid values; the
            message names each bad key.
    """
    file = config_path(path)
    data = read_yaml(file)

    class _FileSettings(Settings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                       dotenv_settings, file_secret_settings):
            return (init_settings, env_settings, _MappingSource(settings_cls, data))

    try:
        return _FileSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, data, str(file) if file else "environment")) from None

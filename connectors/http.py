"""One HTTP failure policy for every connector: classify, retry, cap, count.

Every client kbsync talks HTTP through (atlassian-python-api for Confluence, ``jira``'s
``ResilientSession``, python-gitlab, the ``openai`` client of the LLM) answers the same
three questions here, so they are answered once:

* **What kind of failure is it?** :func:`classify` -> ``retryable`` (5xx, 408, connection
  errors, timeouts), ``rate_limited`` (429, and a 403/503 that says so: a ``Retry-After``
  header, ``X-RateLimit-Remaining: 0`` or "rate limit" in the body, as Atlassian
  Server/DC and some proxies answer) or ``fatal`` (every other 4xx: retrying a bad token
  or a bad query only delays the clear error).
* **How long to wait?** ``Retry-After`` (seconds or an HTTP date, RFC 9110 10.2.3) or
  GitLab's ``RateLimit-Reset``, never longer than ``max_retry_after_seconds``; otherwise
  exponential backoff with jitter from ``backoff_seconds`` up to ``max_backoff_seconds``.
  Every wait is counted (:func:`new_stats`).
* **Who retries?** One layer per request. Where the client library retries itself
  (python-gitlab's ``Retry``, ``jira``'s ``ResilientSession``) it keeps doing so and
  :func:`cap_waits` caps the waits it is told (a ``requests`` response hook lowers
  ``Retry-After``/``RateLimit-Reset`` to the cap and counts them); where it does not
  (Confluence, whose client's own retry is off, and the LLM, whose ``openai`` retries are
  off) :func:`retrying` retries. A connector's own retry never wraps a library retry of
  the same failure.

Layers above the request: a page fetch that still fails raises
:class:`connectors.base.TransientSourceError`; the flow's Prefect ``fetch-page`` task
retries only that error (``sync.fetch_retries``, after ``sync.fetch_retry_delay_seconds``)
and resumes from the last checkpoint. That outer retry is for outages longer than one
request's retry budget (minutes, not seconds); at worst one page costs
``(fetch_retries + 1) x (max_retries + 1)`` requests, a bound, never an unbounded sleep.

Secrets: messages built here go through :func:`connectors.base.redact` by the caller
(the one place that knows a source's secrets).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import requests
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

#: What a failed request means.
Kind = Literal["retryable", "rate_limited", "fatal"]

#: Statuses retried with backoff.
RETRYABLE_STATUS = frozenset({408, 500, 502, 503, 504})


class RetryPolicy(BaseModel):
    """How a client retries a request: the one retry vocabulary of the settings.

    The top-level ``http:`` section of the settings is one; each Confluence, Jira and
    GitLab source and the ``llm:`` section may hold an ``http:`` of their own whose keys
    replace the top-level ones (:meth:`over`). The names are those the client libraries
    use (``max_retries`` in python-gitlab, ``jira`` and ``openai``).

    Attributes:
        max_retries: extra attempts after the first (0: no retry).
        backoff_seconds: the first backoff wait, doubled each attempt, plus jitter.
        max_backoff_seconds: the longest backoff wait.
        max_retry_after_seconds: the longest wait a server may ask for (``Retry-After``,
            ``RateLimit-Reset``); a longer ask is cut to it (and counted).
        timeout_seconds: the read timeout of one request (the LLM's is
            ``llm.timeout_seconds``: a generation is not a REST call).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_retries: int = Field(3, ge=0, le=50, description="extra attempts after the first")
    backoff_seconds: float = Field(2.0, ge=0, description="first backoff; doubles each try")
    max_backoff_seconds: float = Field(30.0, ge=0, description="longest backoff wait")
    max_retry_after_seconds: float = Field(
        60.0, ge=0, description="longest wait a server may ask for (Retry-After, "
                                "RateLimit-Reset); longer asks are cut to it and counted")
    timeout_seconds: float = Field(60.0, gt=0, description="read timeout of one request")

    def over(self, base: RetryPolicy) -> RetryPolicy:
        """``base`` with the keys set explicitly here put over it (a source's ``http:``
        over the top-level one)."""
        return base.model_copy(update={key: getattr(self, key) for key in self.model_fields_set})


#: Old per-source retry keys, still read (deprecated): old name -> ``http:`` key.
LEGACY_KEYS = {
    "max_retries": "max_retries", "timeout_seconds": "timeout_seconds",
    "backoff_seconds": "backoff_seconds", "max_backoff_seconds": "max_backoff_seconds",
    "max_retry_after_seconds": "max_retry_after_seconds",
    "retry_after_max_seconds": "max_retry_after_seconds",  # Confluence
    "backoff_initial_seconds": "backoff_seconds",  # Confluence
    "backoff_max_seconds": "max_backoff_seconds",  # Confluence
    "max_retry_delay_seconds": "max_backoff_seconds",  # Jira
}


def fold_legacy_keys(data: Any, legacy: Mapping[str, str] = LEGACY_KEYS) -> Any:
    """A source's (or ``llm:``'s) raw settings with its old flat retry keys moved into
    its ``http:`` mapping (a key given in ``http:`` wins). For ``mode="before"``
    validators; anything but a mapping passes through."""
    if not isinstance(data, Mapping) or not any(key in data for key in legacy):
        return data
    data = dict(data)
    nested = data.get("http") or {}
    if isinstance(nested, RetryPolicy):
        nested = {key: getattr(nested, key) for key in nested.model_fields_set}
    nested = dict(nested)
    for old, new in legacy.items():
        if old in data:
            nested.setdefault(new, data.pop(old))
    data["http"] = nested
    return data


class HttpOptions(BaseModel):
    """Mixin of the options of an HTTP source: its ``http:`` retry policy, which the
    settings resolve over the top-level ``http:`` (:meth:`RetryPolicy.over`); the old
    flat keys (``max_retries``, ``retry_after_max_seconds``, ...) are read into it."""

    http: RetryPolicy = Field(default_factory=RetryPolicy,
                              description="retries and timeouts; default the top-level http:")

    @model_validator(mode="before")
    @classmethod
    def _legacy_retry_keys(cls, data: Any) -> Any:
        return fold_legacy_keys(data)


#: The counters a retry loop keeps (a connector's ``stats`` dict holds them).
STAT_KEYS = ("retries", "throttled", "waited_seconds", "capped")


def new_stats() -> dict[str, float]:
    """Fresh counters: ``retries``, ``throttled`` (rate-limited answers),
    ``waited_seconds``, ``capped`` (server-asked waits cut to the cap)."""
    return {key: 0 for key in STAT_KEYS}


def _count(stats: MutableMapping[str, float], key: str, value: float = 1) -> None:
    stats[key] = round(stats.get(key, 0) + value, 3)


@dataclass(frozen=True)
class Outcome:
    """A classified failure: its kind, the HTTP status (0: no response) and the wait the
    server asked for in seconds (``None``: it did not say)."""

    kind: Kind
    status: int = 0
    retry_after: float | None = None

    @property
    def retry(self) -> bool:
        return self.kind != "fatal"


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or an HTTP date,
    RFC 9110 section 10.2.3); ``None`` when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def asked_wait(headers: Mapping[str, str] | None) -> float | None:
    """The wait a response asks for: ``Retry-After``, else GitLab's ``RateLimit-Reset``
    (an epoch second); ``None`` when it asks for none."""
    if not headers:
        return None
    wait = retry_after_seconds(headers.get("Retry-After"))
    if wait is None and headers.get("RateLimit-Reset"):
        try:
            wait = max(0.0, float(headers["RateLimit-Reset"]) - time.time())
        except ValueError:
            wait = None
    return wait


def classify(status: int | None, headers: Mapping[str, str] | None = None,
             text: str = "") -> Outcome:
    """The kind of an HTTP answer that is not a success (``status`` None or 0: no
    answer at all, a connection error or timeout: retryable)."""
    status = int(status or 0)
    wait = asked_wait(headers)
    if status == 429:
        return Outcome("rate_limited", status, wait)
    if status in (403, 503) and _says_rate_limited(headers or {}, text):
        return Outcome("rate_limited", status, wait)
    if status == 0 or status in RETRYABLE_STATUS or status >= 500:
        return Outcome("retryable", status, wait)
    return Outcome("fatal", status, wait)


def classify_exception(exc: BaseException) -> Outcome:
    """:func:`classify` for an exception of ``requests`` (or one carrying a
    ``response``/``status_code``, as the ``jira``, ``openai`` and python-gitlab errors
    do); exceptions that are not about HTTP are fatal."""
    response = getattr(exc, "response", None)
    status = getattr(exc, "status_code", None) or getattr(exc, "response_code", None) or (
        getattr(response, "status_code", None) if response is not None else None)
    if status:
        headers = getattr(response, "headers", None) or {}
        text = ""
        try:
            text = (getattr(response, "text", "") or "")[:2000]
        except Exception:  # noqa: BLE001 - a body that cannot be read says nothing
            text = ""
        return classify(int(status), headers, text)
    if isinstance(exc, requests.ConnectionError | requests.Timeout | TimeoutError
                  | ConnectionError):
        return Outcome("retryable")
    name = type(exc).__name__
    if name in ("APIConnectionError", "APITimeoutError"):  # openai, without importing it
        return Outcome("retryable")
    return Outcome("fatal")


def _says_rate_limited(headers: Mapping[str, str], text: str) -> bool:
    if headers.get("Retry-After"):
        return True
    if str(headers.get("X-RateLimit-Remaining", "")).strip() == "0":
        return True
    text = text[:2000].lower()
    return "rate limit" in text or "too many requests" in text


def retrying(policy: RetryPolicy, stats: MutableMapping[str, float], *, name: str,
             outcome: Callable[[BaseException], Outcome | None] = classify_exception,
             sleep: Callable[[float], None] = time.sleep,
             logger: logging.Logger | None = None) -> Retrying:
    """A tenacity ``Retrying`` for ``policy``: retries what ``outcome`` calls retryable
    or rate limited (``None``: not an HTTP failure, not retried), waits what the server
    asked for up to ``max_retry_after_seconds`` or backs off, counts into ``stats``,
    and re-raises the last exception when the attempts are spent."""
    log = logger or logging.getLogger(__name__)
    backoff = wait_exponential_jitter(initial=policy.backoff_seconds,
                                      max=policy.max_backoff_seconds,
                                      jitter=policy.backoff_seconds)

    def judged(exc: BaseException) -> Outcome | None:
        return outcome(exc)

    def should_retry(exc: BaseException) -> bool:
        judged_ = judged(exc)
        return judged_ is not None and judged_.retry

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        judged_ = judged(exc) if exc is not None else None
        if judged_ is not None and judged_.retry_after is not None:
            if judged_.retry_after > policy.max_retry_after_seconds:
                _count(stats, "capped")
            return min(judged_.retry_after, policy.max_retry_after_seconds)
        return backoff(state)

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        judged_ = judged(exc) if exc is not None else None
        _count(stats, "retries")
        if judged_ is not None and judged_.kind == "rate_limited":
            _count(stats, "throttled")
        log.warning("%s: %s; retry %d in %.1fs", name, _short(exc, judged_),
                    state.attempt_number, state.upcoming_sleep)

    def counted_sleep(seconds: float) -> None:
        _count(stats, "waited_seconds", seconds)
        sleep(seconds)

    return Retrying(retry=retry_if_exception(should_retry),
                    stop=stop_after_attempt(policy.max_retries + 1), wait=wait,
                    sleep=counted_sleep, before_sleep=before_sleep, reraise=True)


def _short(exc: BaseException | None, judged: Outcome | None) -> str:
    if judged is not None and judged.status:
        return f"HTTP {judged.status} ({judged.kind.replace('_', ' ')})"
    return type(exc).__name__ if exc is not None else "failure"


def cap_waits(session: requests.Session, policy: RetryPolicy, stats: MutableMapping[str, float]) -> None:
    """Make a client library's own retry loop wait at most ``max_retry_after_seconds``.

    Adds a ``requests`` response hook to ``session`` (python-gitlab's ``gl.session``,
    ``jira``'s ``ResilientSession``) that, on a rate-limited answer, counts it and
    lowers a longer ``Retry-After`` to the cap (and turns a ``RateLimit-Reset`` further
    away into a ``Retry-After`` of the cap), before the library reads the headers and
    sleeps. python-gitlab otherwise sleeps for any ``Retry-After`` it is sent.
    """
    cap = policy.max_retry_after_seconds

    def hook(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        judged = classify(response.status_code, response.headers) \
            if response.status_code >= 400 else None
        if judged is None or judged.kind != "rate_limited":
            return response
        _count(stats, "throttled")
        if judged.retry_after is not None and judged.retry_after > cap:
            _count(stats, "capped")
            response.headers["Retry-After"] = str(int(cap))
            response.headers.pop("RateLimit-Reset", None)
        return response

    session.hooks.setdefault("response", []).append(hook)

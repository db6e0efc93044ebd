"""Confluence Cloud and Server/Data Center as a source (atlassian-python-api).

Every request goes through an ``atlassian.Confluence`` client (its session, auth and
error parsing); the v1 REST resources are addressed by their documented paths
(``rest/api/content/search``, ``rest/api/content/{id}``, ``rest/api/user``) because in
atlassian-python-api 5.0.5 the Cloud client's ``cql()``/``search_content()`` request
``<site>/wiki/content/search`` (no ``rest/api``), which Confluence answers with 404.

**Incremental sync.** The *cursor* is a :class:`connectors.base.Watermark`,
``{"when": <latest version.when read, ISO 8601>, "seen": {<content id>: [<version number>,
<when>]}, "version": 1}`` (cursors without ``version`` are still read). A run searches

    <scope> and type in (page, blogpost[, attachment])
            and lastmodified >= "<cursor.when - overlap, as yyyy-MM-dd HH:mm>"
            order by lastmodified asc

(https://developer.atlassian.com/server/confluence/advanced-searching-using-cql/).
CQL dates have minute precision and are read in the *querying user's* time zone (set
``timezone`` to the account's profile zone); the overlap (default 30 minutes) re-reads
the edge so nothing is missed. Results of the overlap whose version is in
``cursor.seen`` are skipped without converting them; everything else is converted and
the flow's content hash skips what did not change.

**Several spaces** are read one search each (``space = "KEY" and ...``), each with its
own watermark: the cursor is ``{"spaces": {KEY: <watermark>}, "version": 1}``. Every
configured space, one alone too, is looked up once per run (``GET rest/api/space/{key}``)
before its search, because CQL silently leaves out the content of a space the account
may not view (the read would look empty and succeed); a space answering 403/404 there or
on its search is a failed entity (``<source>:space:<KEY>``) with its reason, its
watermark holds and the others move (see :meth:`ConfluenceConnector._fetch_spaces`);
when no configured space can be read the source fails. A single-space cursor records
its ``scope``, so a space added later is read from the beginning.

Bodies come with the search (``expand=body.storage,...``), so a page costs no request of
its own; only a result without a body is fetched again by id. Results are paged with the
API's own ``start``/``limit`` and ``_links.next``
(https://developer.atlassian.com/server/confluence/pagination-in-the-rest-api/) and a
checkpoint is written after each results page, so a failed run resumes where it stopped.
Offset pagination is guarded:

* Data Center silently caps ``limit`` when bodies are expanded and still advances
  ``start`` in ``_links.next`` by the requested limit; the next ``start`` is computed
  from the results really received.
* Each following page is requested from one result earlier; if that result is not the
  last one already read, the result set moved under us (a page edited or deleted while
  paging) and results may have been skipped. They all sort after that result, so the
  new cursor is held at its ``when`` and the next run reads them.

**Faults** (https://developer.atlassian.com/cloud/confluence/rate-limiting/ and
https://confluence.atlassian.com/doc/configuring-global-rate-limiting-1798635796.html for Data
Center), classified and retried by :mod:`connectors.http` (the client's own retries are
off). 429 waits for ``Retry-After`` (capped at ``http.max_retry_after_seconds``), and
so does Server/DC's 403 that says "rate limit"; 5xx and network errors retry with
exponential backoff; when a results page still fails with 5xx, the page
size is halved down to ``min_page_size``; when retries run out the fetch raises
:class:`TransientSourceError` (the flow retries from the last checkpoint). 400/401/404
and other 403s on the search fail fast with a :class:`ConnectorError` saying what to
check; on a single page's own request they fail that document, naming the page. A
body that cannot be converted is a failed document; the watermark holds at it, so the
cursor never moves past it.

**Deletions.** :meth:`ConfluenceConnector.list_ids` lists the ids in scope by CQL
(ids only, ordered by ``created`` so edits do not move results between pages); pages
deleted, archived, moved out of the scope or no longer readable are missing from it.
Any error, or a result set that moved while it was listed, makes the listing
incomplete, and an incomplete listing deletes nothing.

**Attachments** (optional): attachments in scope come from the same search; text-like
ones (txt, md, csv, html, pdf, ...; see :mod:`transforms.attachments`) up to
``attachment_max_bytes`` become documents of their own, linked to their page.

Secrets (API token, personal access token, password) travel only in the client's
session headers; every error message and log line is passed through
:func:`connectors.base.redact`.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qsl, quote, urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import requests
from pydantic import Field, SecretStr, field_validator

from connectors import http
from connectors.base import (
    Checkpoint,
    ConnectorError,
    Document,
    DocumentIssue,
    EntityError,
    FetchRequest,
    Listing,
    Page,
    SourceOptions,
    TransientSourceError,
    Watermark,
    entity_failure,
    parse_instant,
    read_entities,
    redact,
    reveal,
    utc,
)
from connectors.http import classify, retry_after_seconds  # noqa: F401 - re-exported

if TYPE_CHECKING:  # imported where the client is built: reading settings stays cheap
    from atlassian import Confluence

log = logging.getLogger(__name__)

SEARCH = "rest/api/content/search"
#: What one search request brings for each result (one request per results page).
EXPAND = ("body.storage,version,space,ancestors,metadata.labels,history,container,"
          "extensions")
#: CQL's date format (minute precision), in the querying user's time zone.
CQL_DATE = "%Y-%m-%d %H:%M"
#: Metadata that changes with every version of a page or attachment
#: (``Document.version_fields``).
VERSION_FIELDS = frozenset({"version", "last_modifier", "updated", "file_size"})
#: The source error when no configured space can be read (a wrong base_url looks the same).
NO_SPACE_READABLE = ("no configured space can be read (check the space keys, the account's "
                     "access and base_url)")
#: Parameters of the user lookup per mention kind (``GET rest/api/user``).
USER_PARAM = {"userkey": "key", "account-id": "accountId", "username": "username"}


class ConfluenceSourceOptions(http.HttpOptions, SourceOptions):
    """Settings of one Confluence source (``flows.settings.ConfluenceSource`` adds
    ``type``, ``schedule`` and the scope and auth checks).

    Auth is one of: ``email`` + ``api_token`` (Cloud), ``token`` (a Server/DC personal
    access token, sent as ``Bearer``), ``username`` + ``password`` (Server/DC basic), or
    none (anonymous read of a public site).
    """

    base_url: str = Field(pattern=r"^https?://\S+$",
                          description="https://<site>.atlassian.net/wiki or the Server URL")
    cloud: bool | None = Field(None, description="default: true for *.atlassian.net")
    spaces: list[Annotated[str, Field(pattern=r"^~?[A-Za-z0-9_-]+$")]] = Field(
        default_factory=list, description="space keys")
    cql: str | None = Field(None, description="extra CQL filter, without ORDER BY")
    email: str | None = Field(None, description="Cloud: the account's email")
    api_token: SecretStr | None = Field(None, description="Cloud API token, ${CONFLUENCE_TOKEN}")
    token: SecretStr | None = Field(None, description="Server/DC personal access token")
    username: str | None = Field(None, description="Server/DC user (with password)")
    password: SecretStr | None = None
    include_blogposts: bool = True
    overlap_minutes: int = Field(30, ge=0, le=7 * 24 * 60,
                                 description="re-read this much before the cursor")
    timezone: str = Field("UTC", description="the account's profile time zone (CQL dates)")
    page_size: int = Field(50, ge=2, le=1000, description="results per search request")
    min_page_size: int = Field(5, ge=2, le=1000, description="floor when 5xx shrink pages")
    list_page_size: int = Field(200, ge=2, le=1000, description="ids per listing request")
    attachments: bool = Field(False, description="index text-like attachments")
    attachment_max_bytes: int = Field(10_000_000, ge=1)
    resolve_mentions: bool = Field(True, description="look up names of mentioned users")
    verify_ssl: bool = True

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name, e.g. "
                             "Europe/Berlin)") from None
        return value

    @field_validator("cql")
    @classmethod
    def _no_order(cls, value: str | None) -> str | None:
        if value is not None and re.search(r"\border\s+by\b", value, re.IGNORECASE):
            raise ValueError("leave ORDER BY out of cql (kbsync orders by lastmodified)")
        return value.strip() if value else None

    @property
    def is_cloud(self) -> bool:
        """``cloud`` when set, else whether the host is ``*.atlassian.net``."""
        if self.cloud is not None:
            return self.cloud
        host = urlparse(self.base_url).hostname or ""
        return host.endswith((".atlassian.net", ".jira.com"))

    @property
    def api_url(self) -> str:
        """The site URL the REST paths hang off (Cloud sites live under ``/wiki``)."""
        url = self.base_url.rstrip("/")
        if self.is_cloud and not urlparse(url).path.rstrip("/"):
            url += "/wiki"
        return url

    @property
    def secrets(self) -> list[str | None]:
        """Every secret value and the encodings it travels in, for :func:`redact`."""
        api_token, password = reveal(self.api_token), reveal(self.password)
        out: list[str | None] = [api_token, reveal(self.token), password]
        for user, secret in ((self.email, api_token), (self.username, password)):
            if user and secret:
                out.append(base64.b64encode(f"{user}:{secret}".encode()).decode())
        return out


class _RedactFilter(logging.Filter):
    """Redacts known secrets in records of the client library's loggers (it logs whole
    response bodies at DEBUG, and an error page may echo request headers)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            cleaned = redact(message, sorted(self.secrets, key=len, reverse=True))
            if cleaned != message:
                record.msg, record.args = cleaned, None
        return True


_LIBRARY_LOG_FILTER = _RedactFilter()
for _name in ("atlassian", "atlassian.rest_client", "atlassian.confluence",
              "atlassian.confluence.base", "atlassian.confluence.server",
              "atlassian.confluence.cloud", "atlassian.confluence_base"):
    logging.getLogger(_name).addFilter(_LIBRARY_LOG_FILTER)


# ------------------------------------------------------------------ HTTP outcomes


class _Transient(Exception):
    """A retryable outcome of one request."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Throttled(_Transient):
    """429, or a 403/503 that says the client is rate limited."""


class _ServerError(_Transient):
    """5xx (or a response that is not the JSON asked for)."""


class _NetworkError(_Transient):
    """Connection refused/reset, timeout."""


def _outcome(exc: BaseException) -> http.Outcome | None:
    """What :func:`connectors.http.retrying` needs of this connector's outcomes."""
    if isinstance(exc, _Throttled):
        return http.Outcome("rate_limited", retry_after=exc.retry_after)
    if isinstance(exc, _Transient):
        return http.Outcome("retryable", retry_after=exc.retry_after)
    return None


class _ClientError(Exception):
    """A 4xx that retrying does not fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_when(value: Any) -> datetime | None:
    """``version.when`` / ``createdDate`` (ISO 8601, ``Z`` or an offset) -> aware UTC."""
    return parse_instant(value) if isinstance(value, str) else None


def _version(item: dict[str, Any]) -> dict[str, Any]:
    version = item.get("version")
    return version if isinstance(version, dict) else {}


def cql_date(moment: datetime, zone: str) -> str:
    """``moment`` as a CQL date in ``zone``, floored to the minute."""
    return utc(moment).astimezone(ZoneInfo(zone)).strftime(CQL_DATE)


def _space_refused(exc: ConnectorError) -> bool:
    """Whether a search of one space was refused with 403/404 (that space fails alone)."""
    return getattr(exc, "status", None) in (403, 404)


def _quote_cql(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------------- connector


class ConfluenceConnector:
    """Pages, blog posts and (optionally) attachments of one Confluence site.

    Args:
        options: the source's settings.
        client: an ``atlassian.Confluence`` to use instead of building one.

    Attributes:
        stats: counters of this connector's life: ``requests``, ``retries``,
            ``throttled``, ``waited_seconds``, ``page_size_reductions``,
            ``skipped_seen`` (results of the overlap skipped by version),
            ``pagination_drift`` (result sets that moved while paged).

    Raises (from :meth:`fetch`):
        ConnectorError: bad credentials, bad CQL, wrong URL, no permission.
        TransientSourceError: throttled, 5xx or unreachable after the retries.
    """

    source_type = "confluence"

    def __init__(self, options: ConfluenceSourceOptions, client: Confluence | None = None) -> None:
        self.options = options
        self.name = options.name
        self._client = client
        self.policy = options.http
        self._users: dict[str, str | None] = {}
        #: spaces :meth:`_check_space` found readable in this run (reset by :meth:`close`)
        self._readable: set[str] = set()
        self.stats: dict[str, float] = {
            "requests": 0, "retries": 0, "throttled": 0, "waited_seconds": 0.0,
            "page_size_reductions": 0, "skipped_seen": 0, "pagination_drift": 0,
            "capped": 0,
        }
        ZoneInfo(options.timezone)  # fail early on an unknown zone

    # ------------------------------------------------------------------ the client

    @property
    def client(self) -> Confluence:
        """The ``atlassian.Confluence`` client (built on first use).

        Its own Retry-After handling is off (``retry_with_header=False``) so every
        wait is capped and counted here.
        """
        if self._client is None:
            o = self.options
            kwargs: dict[str, Any] = {
                "cloud": o.is_cloud, "timeout": o.http.timeout_seconds, "verify_ssl": o.verify_ssl,
                "retry_with_header": False, "backoff_and_retry": False,
            }
            if o.email and o.api_token:
                kwargs.update(username=o.email, password=reveal(o.api_token))
            elif o.token:
                kwargs["token"] = reveal(o.token)
            elif o.username and o.password:
                kwargs.update(username=o.username, password=reveal(o.password))
            _LIBRARY_LOG_FILTER.secrets.update(s for s in o.secrets if s)
            from atlassian import Confluence

            self._client = Confluence(o.api_url, **kwargs)
        return self._client

    def close(self) -> None:
        """Close the client's HTTP session (a later call builds a new one) and forget
        which spaces were found readable (the next run looks them up again)."""
        self._readable.clear()
        if self._client is not None:
            self._client.close()
            self._client = None

    def _safe(self, text: str) -> str:
        return redact(text, self.options.secrets)

    def _error(self, message: str, cls: type[ConnectorError] = ConnectorError) -> ConnectorError:
        return cls(self._safe(f"confluence source {self.name!r}: {message}"))

    # -------------------------------------------------------------------- requests

    def _once(self, path: str, params: dict[str, Any] | None, absolute: bool, raw: bool) -> Any:
        """One request through the client, its outcome classified."""
        self.stats["requests"] += 1
        try:
            result = self.client.get(path, params=params, absolute=absolute,
                                     not_json_response=raw or None)
        except requests.HTTPError as exc:
            response = exc.response
            status = response.status_code if response is not None else 0
            message = self._safe(str(exc).strip()[:500]
                                 or (response.reason if response is not None else ""))
            judged = classify(status, response.headers if response is not None else None,
                              (response.text or "")[:2000] if response is not None else "")
            if judged.kind == "rate_limited":
                raise _Throttled(f"HTTP {status} (rate limited)", judged.retry_after) from None
            if judged.kind == "retryable" and status:
                raise _ServerError(f"HTTP {status}: {message}", judged.retry_after) from None
            raise _ClientError(status, f"HTTP {status}: {message}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _NetworkError(self._safe(f"{type(exc).__name__}: {exc}")) from None
        except requests.RequestException as exc:
            raise _ServerError(self._safe(f"{type(exc).__name__}: {exc}")) from None
        if not raw and not isinstance(result, dict):
            raise _ServerError(f"expected a JSON object, got {type(result).__name__}")
        return result

    def _get(self, path: str, params: dict[str, Any] | None = None, *, absolute: bool = False,
             raw: bool = False) -> Any:
        """GET with retries of transient outcomes (tenacity); the last outcome is raised
        as its ``_Transient``/``_ClientError`` class."""
        retrying = http.retrying(self.policy, self.stats, name=f"confluence source {self.name!r}",
                                 outcome=_outcome, sleep=time.sleep, logger=log)
        return retrying(self._once, path, params, absolute, raw)

    # -------------------------------------------------------------------------- CQL

    def _types(self) -> list[str]:
        types = ["page"]
        if self.options.include_blogposts:
            types.append("blogpost")
        if self.options.attachments:
            types.append("attachment")
        return types

    @property
    def spaces(self) -> list[str]:
        """The configured space keys, each once, in the configured order."""
        return list(dict.fromkeys(self.options.spaces))

    @property
    def per_space(self) -> bool:
        """Whether spaces are read one search each (several spaces configured), so that
        one space that cannot be read fails alone (see :meth:`fetch`)."""
        return len(self.spaces) > 1

    def scope_cql(self, space: str | None = None) -> str:
        """The CQL of everything this source covers (spaces and/or the user's CQL, types);
        with ``space``, of that one space only."""
        clauses = []
        if space is not None:
            clauses.append(f"space = {_quote_cql(space)}")
        elif self.options.spaces:
            clauses.append(f"space in ({','.join(_quote_cql(s) for s in self.options.spaces)})")
        if self.options.cql:
            clauses.append(f"({self.options.cql})")
        clauses.append(f"type in ({','.join(self._types())})")
        return " and ".join(clauses)

    def changes_cql(self, request: FetchRequest, space: str | None = None) -> str:
        """The search for a request: the scope (of one ``space`` when given), a
        ``lastmodified`` window (from ``request.cursor``, a watermark), ordered."""
        overlap = timedelta(minutes=self.options.overlap_minutes)
        clauses = [self.scope_cql(space)]
        zone = self.options.timezone
        if request.is_backfill:
            clauses.append(f'lastmodified >= "{cql_date(request.since - overlap, zone)}"')
            if request.until:
                end = request.until + timedelta(minutes=1)  # until's own minute included
                clauses.append(f'lastmodified <= "{cql_date(end, zone)}"')
        else:
            since = self._watermark(request.cursor).since
            if since is not None:
                clauses.append(f'lastmodified >= "{cql_date(since, zone)}"')
        return " and ".join(clauses) + " order by lastmodified asc"

    # ----------------------------------------------------------------- pagination

    def _search_page(self, params: dict[str, Any], where: str) -> tuple[dict[str, Any], int]:
        """One results page; halves ``limit`` on a persistent 5xx. Returns the response
        and the limit that worked."""
        # at least 2: every page after the first repeats the last result already read
        limit = max(2, int(params.get("limit") or self.options.page_size))
        while True:
            try:
                return self._get(SEARCH, {**params, "limit": limit}), limit
            except _ServerError as exc:
                if limit <= max(2, self.options.min_page_size):
                    raise self._error(f"search failed at {where} after retries: {exc}",
                                      TransientSourceError) from None
                limit = max(self.options.min_page_size, 2, limit // 2)
                self.stats["page_size_reductions"] += 1
                log.warning("confluence source %r: %s at %s; page size down to %d",
                            self.name, exc, where, limit)
            except _Transient as exc:
                raise self._error(f"search failed at {where} after retries: {exc}",
                                  TransientSourceError) from None
            except _ClientError as exc:
                raise self._search_error(exc, where) from None

    def _search_error(self, exc: _ClientError, where: str) -> ConnectorError:
        hint = {
            400: f"Confluence rejected the search (check `cql`): {self.scope_cql()}",
            401: "authentication failed: check email + api_token (Cloud), token, or "
                 "username + password (Server/Data Center)",
            403: "permission denied: the account cannot search this site or space",
            404: f"no search API at {self.options.api_url} (check base_url; Cloud sites "
                 "are https://<site>.atlassian.net/wiki)",
        }.get(exc.status, "the request was refused")
        error = self._error(f"{hint} ({exc}; at {where})")
        error.status = exc.status  # type: ignore[attr-defined] - read by _space_refused
        return error

    @staticmethod
    def _next_params(response: dict[str, Any], sent: dict[str, Any], received: int
                     ) -> dict[str, Any] | None:
        """Parameters of the next results page, from ``_links.next``; ``None`` at the end.

        Offset links (no ``cursor`` parameter) get ``start`` recomputed from the results
        really received (Data Center caps ``limit`` silently but advances ``start`` by
        the limit asked for).
        """
        link = (response.get("_links") or {}).get("next")
        if not link or not received:
            return None
        query = dict(parse_qsl(urlparse(link).query, keep_blank_values=True))
        params = {k: v for k, v in sent.items() if k not in ("start", "cursor")}
        params.update(query)
        if "cursor" not in query:
            params["start"] = int(sent.get("start") or 0) + received
        return params

    def _pages(self, params: dict[str, Any], state: dict[str, Any], where: str
               ) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]]:
        """Yield ``(response, new results, next params)`` page by page from ``params``.

        ``state["anchor"]`` is the id of the last result already read (kept across a
        checkpoint); offset pages are requested one result early to check it. When it
        is not there, ``state["watermark"]`` is held at ``state["anchor_when"]``.
        """
        while params is not None:
            sent = dict(params)
            anchor = state.get("anchor")
            overlap = bool(anchor) and "cursor" not in sent and int(sent.get("start") or 0) > 0
            if overlap:
                sent["start"] = int(sent["start"]) - 1
            response, limit = self._search_page(sent, f"{where}, start {sent.get('start', 0)}")
            sent["limit"] = limit
            results = [r for r in response.get("results") or [] if isinstance(r, dict)]
            received = len(results)
            if overlap:
                if results and str(results[0].get("id")) == anchor:
                    results = results[1:]
                else:
                    self._moved(state, where)
            next_params = self._next_params(response, sent, received)
            if overlap and not results:  # only the result already read: the end
                next_params = None
            if results:
                last = results[-1]
                state["anchor"] = str(last.get("id"))
                state["anchor_when"] = (last.get("version") or {}).get("when")
            yield response, results, next_params
            params = next_params

    def _moved(self, state: dict[str, Any], where: str) -> None:
        """Record that the result set moved under the pagination after ``state["anchor"]``:
        the results after it may have been skipped, so the watermark holds at its ``when``."""
        self.stats["pagination_drift"] += 1
        state["moved"] = True
        anchor_when = parse_when(state.get("anchor_when"))
        if anchor_when is not None and state.get("watermark") is not None:
            state["watermark"].hold_at(anchor_when)
        log.warning("confluence source %r: results moved while paging (%s) after id %s",
                    self.name, where, state.get("anchor"))

    # ----------------------------------------------------------------------- fetch

    def fetch(self, request: FetchRequest, checkpoint: Checkpoint | None = None) -> Iterator[Page]:
        """Yield the pages, blog posts and attachments that changed, one results page
        of the search at a time (see the module docstring).

        One configured space (or none: a ``cql`` scope): one search. The checkpoint is
        ``{"params": <next search parameters>, "watermark": <the Watermark so far>,
        "anchor": <last id read>, "anchor_when"}``; the last page's ``cursor`` is the
        :class:`Watermark` ``{"when", "seen", "version", "scope": [<space>]}``.

        The one space is looked up first, once per run (:meth:`_ensure_space`): CQL
        would silently leave out the content of a space the account may not view, and
        the run would read nothing and report success. A space that cannot be read (403/
        404 on the lookup or on its search) is reported as with several spaces: a page
        with the failed entity (``<source>:space:<KEY>``, ``scope="entity"``) and its
        reason, then, as every configured space is unreadable, :class:`ConnectorError`
        ("no configured space can be read"); the cursor holds.

        Several spaces: one search per space, see :meth:`_fetch_spaces`.
        """
        if self.per_space:
            yield from self._fetch_spaces(request, checkpoint)
            return
        if not self.spaces:  # a cql scope: nothing to look up
            yield from self._fetch_scope(request, checkpoint, None)
            return
        space = self.spaces[0]
        cursor = self._cursor_of(request.cursor, space)
        last = checkpoint  # what the failure page keeps: nothing read is given up
        try:
            self._ensure_space(space)
            for page in self._fetch_scope(replace(request, cursor=cursor), checkpoint, None):
                if page.cursor is not None:
                    page.cursor = {**page.cursor, "scope": self.spaces}
                last = page.checkpoint
                yield page
            return
        except EntityError as exc:
            reason = str(exc)
        except ConnectorError as exc:
            if not _space_refused(exc):
                raise
            reason = str(exc)
        log.warning("confluence source %r: %s", self.name, reason)
        yield Page(issues=[entity_failure(self.name, f"space:{space}", reason)], checkpoint=last)
        raise self._error(f"{NO_SPACE_READABLE}: {reason}")

    def _fetch_scope(self, request: FetchRequest, checkpoint: Checkpoint | None,
                     space: str | None) -> Iterator[Page]:
        """The pages of one search: the whole scope, or one ``space``'s
        (``request.cursor`` is that search's watermark)."""
        incremental = not request.is_backfill and request.cursor is not None
        wm = self._watermark(request.cursor if incremental else None)
        state: dict[str, Any] = {"anchor": None, "anchor_when": None}
        if checkpoint and "params" in checkpoint:  # params None: resumed after the last page
            state.update(anchor=checkpoint.get("anchor"), anchor_when=checkpoint.get("anchor_when"))
            wm = wm.restore(checkpoint.get("watermark"))
            params = dict(checkpoint["params"]) if checkpoint["params"] else None
        else:
            params = {"cql": self.changes_cql(request, space), "expand": EXPAND,
                      "limit": self.options.page_size, "start": 0}
        state["watermark"] = wm
        emitted = False
        for response, results, next_params in self._pages(params, state, "search of changes"):
            page = Page()
            base = str((response.get("_links") or {}).get("base") or self.options.api_url)
            self._resolve_mentions(results)
            for item in results:
                if item.get("type") == "attachment" and not self.options.attachments:
                    continue
                if self._known(item, wm):
                    continue
                if item.get("type") != "attachment" and self._incomplete(item):
                    completed = self._complete(item)
                    if isinstance(completed, DocumentIssue):
                        page.issues.append(completed)
                        wm.hold_at(parse_when(_version(item).get("when")) or wm.value)
                        continue
                    item = completed
                    if self._known(item, wm):
                        continue
                result = self._convert(item, base)
                if isinstance(result, Document):
                    page.documents.append(result)
                elif result is not None:
                    page.issues.append(result)
                if isinstance(result, DocumentIssue) and result.kind == "failed":
                    wm.hold_at(parse_when(_version(item).get("when")) or wm.value)
                else:
                    wm.advance(str(item.get("id")), _version(item).get("number"),
                               parse_when(_version(item).get("when")))
            wm.prune()
            page.checkpoint = self._checkpoint(next_params, state)
            if next_params is None:
                page.cursor = wm.result().to_json()
            emitted = True
            yield page
        if not emitted:  # resumed after the last page
            yield Page(checkpoint=self._checkpoint(None, state), cursor=wm.result().to_json())

    def _watermark(self, cursor: dict[str, Any] | None) -> Watermark:
        return Watermark.read(cursor, key="when",
                              lag=timedelta(minutes=self.options.overlap_minutes))

    @staticmethod
    def _cursor_of(cursor: dict[str, Any] | None, space: str) -> dict[str, Any] | None:
        """The watermark ``space`` starts from, in any cursor shape this connector wrote:
        per space (``{"spaces": {key: watermark}}``: that space's, ``None`` when it has
        none yet); one watermark for the whole scope, when its ``scope`` lists the space
        (older cursors without ``scope``: taken to cover every configured space); else
        ``None`` (a space added to the configuration is read from the beginning)."""
        if not cursor:
            return None
        if isinstance(cursor.get("spaces"), dict):
            return cursor["spaces"].get(space)
        scope = cursor.get("scope")
        if scope is not None and space not in scope:
            return None
        return {k: v for k, v in cursor.items() if k != "scope"}

    def _check_space(self, space: str) -> None:
        """``GET rest/api/space/{key}``: whether the account can read the space.

        Confluence answers 404 both for a space that does not exist and for one the
        account may not view (Cloud: "There is no space with the given key, or the
        calling user does not have permission to view the space"); its CQL search
        silently leaves such a space's content out instead of failing, so this check
        is what tells an unreadable space from an empty one.

        Raises:
            EntityError: 403/404 (the space fails alone).
            ConnectorError: 401 and other 4xx (the source fails).
            TransientSourceError: throttled, 5xx or unreachable after the retries.
        """
        try:
            self._get(f"rest/api/space/{quote(space)}")
        except _Transient as exc:
            raise self._error(f"reading space {space!r} failed after retries: {exc}",
                              TransientSourceError) from None
        except _ClientError as exc:
            if exc.status in (403, 404):
                raise self._error(f"space {space!r} cannot be read (no such space, or the "
                                  f"account may not view it): {exc}", EntityError) from None
            raise self._search_error(exc, f"space {space!r}") from None

    def _ensure_space(self, space: str) -> None:
        """:meth:`_check_space`, once per run: a space found readable is not looked up
        again by a retried or resumed fetch of the same connector (:meth:`close` ends
        the run). Raises what :meth:`_check_space` raises."""
        if space not in self._readable:
            self._check_space(space)
            self._readable.add(space)

    def _fetch_spaces(self, request: FetchRequest, checkpoint: Checkpoint | None
                      ) -> Iterator[Page]:
        """Several spaces, one search each, in the configured order.

        The cursor is ``{"spaces": {<key>: <Watermark>}, "version": 1}``: each space moves
        on its own. A space that cannot be read (:meth:`_check_space`, or a 403/404 on
        its search) is a failed entity: a :class:`DocumentIssue` with ``scope="entity"``
        and the reason; its watermark stays where it was (a space never read has none,
        so it is read from the beginning once it can be), and the other spaces are read.
        Only a source none of whose spaces can be read fails as a whole.

        The checkpoint is ``{"space": <key being read>, "inner": <its search's
        checkpoint, or None once done>, "done": {<key>: <new watermark>}, "entities":
        [[<key>, <reason>]]}``. The last page (possibly empty) carries the cursor and,
        again, the entity failures of runs before the checkpoint, so the run that
        finishes the read knows them. A checkpoint in which every space failed (the
        run that saved it failed as a whole) is not resumed: the read starts over, so a
        space whose access is restored is read instead of its old failure replayed.
        Each space is looked up once per run (:meth:`_ensure_space`), a resumed one too.
        """
        def read(sub: FetchRequest, inner: Checkpoint | None, space: str) -> Iterator[Page]:
            self._ensure_space(space)
            yield from self._fetch_scope(sub, inner, space)

        yield from read_entities(
            request, checkpoint, keys=self.spaces, kind="space", source=self.name,
            cursor_of=self._cursor_of, read=read, refused=lambda exc, _key: _space_refused(exc),
            fail=lambda reasons: self._error(f"{NO_SPACE_READABLE}: {reasons}"))

    @staticmethod
    def _checkpoint(params: dict[str, Any] | None, state: dict[str, Any]) -> Checkpoint:
        return {"params": params, "watermark": state["watermark"].to_json(),
                "anchor": state.get("anchor"), "anchor_when": state.get("anchor_when")}

    # ------------------------------------------------------------------- documents

    def _known(self, item: dict[str, Any], wm: Watermark) -> bool:
        """Whether ``item`` is at a version already read (then the watermark keeps it)."""
        cid, version = str(item.get("id")), _version(item).get("number")
        if not wm.is_known(cid, version):
            return False
        self.stats["skipped_seen"] += 1
        wm.advance(cid, version, parse_when(_version(item).get("when")))
        return True

    @staticmethod
    def _incomplete(item: dict[str, Any]) -> bool:
        """A search result without its body or version (not expanded, or dropped)."""
        storage = (item.get("body") or {}).get("storage")
        return not (isinstance(storage, dict) and "value" in storage) or \
            not (item.get("version") or {}).get("when")

    def _complete(self, item: dict[str, Any]) -> dict[str, Any] | DocumentIssue:
        """Fetch a page by id (``GET rest/api/content/{id}``) when its search result
        lacks the body or version; 4xx fails this page only, naming it."""
        cid = str(item.get("id"))
        title = str(item.get("title") or cid)
        doc_id = f"{self.name}:{cid}"
        try:
            fetched = self._get(f"rest/api/content/{quote(cid)}", {"expand": EXPAND})
        except _Transient as exc:
            return DocumentIssue(doc_id, f"fetching page {title!r} (id {cid}) failed: {exc}",
                                 "failed", title)
        except _ClientError as exc:
            return DocumentIssue(doc_id, f"fetching page {title!r} (id {cid}) refused: {exc}",
                                 "failed", title)
        self._resolve_mentions([fetched])
        # the search result's links are relative to its envelope's base: keep them
        return {**item, **{k: v for k, v in fetched.items() if k != "_links" and v}}

    def _resolve_mentions(self, results: list[dict[str, Any]]) -> None:
        """Look up the display names of users mentioned on these results (cached)."""
        from transforms.storage_format import mentioned_users  # bs4: imported when used

        if not self.options.resolve_mentions:
            return
        wanted: set[tuple[str, str]] = set()
        for item in results:
            body = ((item.get("body") or {}).get("storage") or {}).get("value")
            if isinstance(body, str):
                wanted |= {m for m in mentioned_users(body) if m[1] not in self._users}
        for kind, uid in sorted(wanted):
            try:
                user = self._get("rest/api/user", {USER_PARAM[kind]: uid})
            except (_Transient, _ClientError) as exc:
                if isinstance(exc, _ClientError):  # unknown or hidden user: ask once
                    self._users[uid] = None
                log.info("confluence source %r: user %s not resolved (%s)", self.name, uid, exc)
                continue
            name = user.get("displayName") or user.get("publicName") or user.get("username")
            self._users[uid] = str(name) if name else None

    def _page_url(self, item: dict[str, Any], base: str) -> str:
        links = item.get("_links") or {}
        webui = links.get("webui") or links.get("tinyui") or ""
        if webui.startswith(("http://", "https://")):
            return webui
        return base.rstrip("/") + "/" + webui.lstrip("/") if webui else base

    def _convert(self, item: dict[str, Any], base: str) -> Document | DocumentIssue | None:
        """One search result -> a document, a skipped/failed issue, or ``None`` (an
        attachment that is not text-like)."""
        from transforms.storage_format import storage_to_markdown

        kind = item.get("type")
        cid = str(item.get("id"))
        doc_id = f"{self.name}:{cid}"
        title = str(item.get("title") or cid)
        if kind == "attachment":
            return self._attachment(item, base) if self.options.attachments else None
        version = item.get("version") or {}
        updated = parse_when(version.get("when"))
        if updated is None:
            return DocumentIssue(doc_id, f"malformed result: no version.when ({title!r}, "
                                 f"id {cid})", "failed", title)
        storage = (item.get("body") or {}).get("storage")
        value = storage.get("value") if isinstance(storage, dict) else None
        users = {k: v for k, v in self._users.items() if v}
        try:
            if not isinstance(value, str):
                raise ValueError(f"body.storage.value is {type(value).__name__}, not text")
            text = storage_to_markdown(value, users=users)
        except Exception as exc:  # noqa: BLE001 - any conversion error fails this page only
            return DocumentIssue(doc_id, self._safe(
                f"malformed body of page {title!r} (id {cid}): {type(exc).__name__}: {exc}"),
                "failed", title)
        if not text.strip():
            return DocumentIssue(doc_id, "no text (the body holds only macros such as "
                                 "children or attachments)", "skipped", title)
        return Document(
            id=doc_id, source=self.name, source_type=self.source_type, title=title, text=text,
            url=self._page_url(item, base), updated_at=updated, format="markdown",
            metadata=self._metadata(item, cid, version, updated),
            version_fields=VERSION_FIELDS,
        )

    @staticmethod
    def _metadata(item: dict[str, Any], cid: str, version: dict[str, Any],
                  updated: datetime) -> dict[str, Any]:
        space = item.get("space") or {}
        history = item.get("history") or {}
        ancestors = [a.get("title") for a in item.get("ancestors") or []
                     if isinstance(a, dict) and a.get("title")]
        labels = sorted({str(lab.get("name")) for lab in
                         ((item.get("metadata") or {}).get("labels") or {}).get("results") or []
                         if isinstance(lab, dict) and lab.get("name")})

        def person(user: Any) -> str | None:
            if not isinstance(user, dict):
                return None
            return user.get("displayName") or user.get("publicName") or user.get("username")

        return {
            "space_key": space.get("key"),
            "space_name": space.get("name"),
            "page_id": cid,
            "content_type": item.get("type") or "page",
            "breadcrumb": " > ".join(ancestors) if ancestors else None,
            "labels": labels or None,
            "author": person(history.get("createdBy")),
            "last_modifier": person(version.get("by")),
            "version": version.get("number"),
            "created": parse_when(history.get("createdDate")),
            "updated": updated,
        }

    def _attachment(self, item: dict[str, Any], base: str) -> Document | DocumentIssue | None:
        from transforms.attachments import AttachmentTextError, attachment_kind, attachment_text

        cid = str(item.get("id"))
        doc_id = f"{self.name}:{cid}"
        filename = str(item.get("title") or cid)
        extensions = item.get("extensions") or {}
        media_type = extensions.get("mediaType") or (item.get("metadata") or {}).get("mediaType")
        if attachment_kind(filename, media_type) is None:
            return None
        container = item.get("container") or {}
        page_id, page_title = str(container.get("id") or ""), str(container.get("title") or "")
        title = f"{page_title} / {filename}" if page_title else filename
        where = f"attachment {filename!r} of page {page_title!r} (id {page_id or '?'})"
        version = item.get("version") or {}
        updated = parse_when(version.get("when"))
        size = extensions.get("fileSize")
        if isinstance(size, int | float) and size > self.options.attachment_max_bytes:
            return DocumentIssue(doc_id, f"over the size limit ({int(size)} bytes > "
                                 f"{self.options.attachment_max_bytes})", "skipped", title)
        if updated is None:
            return DocumentIssue(doc_id, f"malformed result for {where}: no version.when",
                                 "failed", title)
        link = (item.get("_links") or {}).get("download")
        if not link and page_id:
            link = f"/download/attachments/{page_id}/{quote(filename)}"
        if not link:
            return DocumentIssue(doc_id, f"no download link for {where}", "failed", title)
        url = link if link.startswith(("http://", "https://")) else \
            self.options.api_url.rstrip("/") + "/" + link.lstrip("/")
        try:
            data = self._get(url, absolute=True, raw=True)
        except _ClientError as exc:
            kind = "skipped" if exc.status == 404 else "failed"
            return DocumentIssue(doc_id, f"downloading {where}: {exc}", kind, title)
        except _Transient as exc:
            return DocumentIssue(doc_id, f"downloading {where} failed: {exc}", "failed", title)
        if len(data) > self.options.attachment_max_bytes:
            return DocumentIssue(doc_id, f"over the size limit ({len(data)} bytes > "
                                 f"{self.options.attachment_max_bytes})", "skipped", title)
        try:
            text, fmt = attachment_text(filename, data, media_type)
        except AttachmentTextError as exc:
            return DocumentIssue(doc_id, f"{where}: {exc}", "skipped", title)
        if not text.strip():
            return DocumentIssue(doc_id, f"{where}: no text", "skipped", title)
        space = item.get("space") or {}
        return Document(
            id=doc_id, source=self.name, source_type=self.source_type, title=title, text=text,
            url=self._page_url(item, base), updated_at=updated, format=fmt,
            metadata={
                "space_key": space.get("key"), "space_name": space.get("name"),
                "page_id": page_id or None, "page_title": page_title or None,
                "attachment_id": cid, "content_type": "attachment", "filename": filename,
                "media_type": media_type, "file_size": size if isinstance(size, int) else len(data),
                "breadcrumb": page_title or None,
                "last_modifier": ((version.get("by") or {}).get("displayName")),
                "version": version.get("number"), "updated": updated,
            },
            version_fields=VERSION_FIELDS,
        )

    # ----------------------------------------------------------------------- list

    def list_ids(self) -> Listing:
        """Every content id in scope now (ids only), by CQL ordered by ``created``.

        Incomplete (``complete=False``, nothing deleted) on any error, when a configured
        space cannot be read (CQL would silently leave its pages out, and they would all
        be deleted; see :meth:`_check_space`), or when the result set moved while it was
        listed (a page deleted or moved out between two requests shifts later results to
        an earlier offset, where the next request would miss one).
        """
        params: dict[str, Any] = {"cql": self.scope_cql() + " order by created asc",
                                  "limit": self.options.list_page_size, "start": 0}
        state: dict[str, Any] = {"anchor": None, "anchor_when": None}
        ids: set[str] = set()
        try:
            for space in self.spaces:
                self._check_space(space)
            for _, results, _ in self._pages(params, state, "listing of ids"):
                if state.get("moved"):
                    return Listing(frozenset(), complete=False,
                                   reason="the result set moved while it was listed")
                ids.update(f"{self.name}:{r.get('id')}" for r in results if r.get("id"))
        except ConnectorError as exc:
            return Listing(frozenset(), complete=False, reason=self._safe(str(exc)))
        except Exception as exc:  # noqa: BLE001 - any failure means: do not delete
            return Listing(frozenset(), complete=False,
                           reason=self._safe(f"{type(exc).__name__}: {exc}"))
        return Listing(frozenset(ids), complete=True)

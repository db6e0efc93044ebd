"""Jira Cloud and Server/Data Center as a source (the ``jira`` library, pycontribs).

One document per issue: ``"<source>:<KEY>"``, titled ``"KEY: summary"``, whose text is
the description and every comment (all comment pages, not only those the search
returns inline), each comment under its author and date (see
:func:`transforms.jira_markup.issue_markdown`).

Incremental reads
    The *cursor* is a :class:`connectors.base.Watermark`, ``{"updated": <ISO 8601 UTC>,
    "seen": {KEY: [<updated, epoch ms>, <updated>]}, "version": 1}``: the latest
    ``updated`` read, and the issues read within the overlap window before it (the
    older ``{"updated", "seen": {KEY: ms}}`` cursors are still read). A run asks for ``(<jql>) AND updated >= <cursor - overlap, epoch ms> ORDER BY
    updated ASC, key ASC``. The bound is an unquoted number of milliseconds: Jira reads a
    quoted date in the *user's* time zone at minute precision, a known cause of silently
    missed updates; a millisecond epoch means one instant everywhere. Issues of the
    overlap window that are in ``seen`` with the same ``updated`` are skipped before
    their comments are read.

Several projects
    With ``projects`` set, each project is read by its own search (``project = "KEY"
    AND (<jql>) ...``) with its own watermark: the cursor is ``{"projects": {KEY:
    <watermark>}, "version": 1}`` (a single-watermark cursor is where every project
    starts). A project Jira refuses (400 "The value 'KEY' does not exist for the field
    'project'.", 403, 404) is a failed entity; its watermark holds and the others move
    (see :meth:`JiraConnector._fetch_projects`). With only ``jql``, one search reads
    everything and any refusal fails the source.

Pages
    Server/DC: ``GET /rest/api/2/search`` with ``startAt``/``maxResults``
    (``JIRA.search_issues``); Cloud: ``GET /rest/api/{2,3}/search/jql`` with
    ``nextPageToken`` (``JIRA.enhanced_search_issues``), picked by the
    ``deploymentType`` of ``/serverInfo``. The checkpoint after each page holds the
    position and the cursor so far. Offset paging can skip an issue when the result set
    shifts under it (an issue updated or removed while paging); when a page shows that
    happened (a key seen twice, a smaller ``total``) the cursor is held back to the page
    boundary so the next run reads that stretch again. A Cloud ``nextPageToken`` saved
    in a checkpoint that Jira refuses later (HTTP 400: it expired) restarts the search at
    the checkpoint's watermark: not from scratch, and not past an unread issue.

Failures
    ``ResilientSession`` (the library's) retries 429 (waiting ``Retry-After``), 503 with
    ``Retry-After`` and connection errors, up to ``max_retries``; every wait it takes is
    capped by ``max_retry_after_seconds`` and counted (:func:`connectors.http.cap_waits`;
    its connection backoff is otherwise 20/40/80 s). :func:`connectors.http.retrying`
    adds exponential backoff for the 5xx the session does not retry (500, 502, 504, 503
    without ``Retry-After``) and read timeouts, so nothing is retried twice.
    401/403 and 400 (a bad JQL: Jira's own message is quoted) raise
    :class:`ConnectorError` at once. A search page that still fails raises
    :class:`TransientSourceError` (the flow retries it from the checkpoint). A failure
    reading one issue's comments is that issue's :class:`DocumentIssue`; the cursor is
    never moved past the first failed issue. Messages never contain the token.

API docs relied on:
https://developer.atlassian.com/cloud/jira/platform/rest/v3/api-group-issue-search/
https://docs.atlassian.com/software/jira/docs/api/REST/9.12.0/#api/2/search
https://developer.atlassian.com/cloud/jira/platform/rest/v2/api-group-issue-comments/
https://developer.atlassian.com/cloud/jira/platform/rate-limiting/
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, NoReturn, TypeVar

import requests
from jira import JIRA, JIRAError
from pydantic import Field, SecretStr

from connectors import http
from connectors.base import (
    Checkpoint,
    ConnectorError,
    Cursor,
    Document,
    DocumentIssue,
    FetchRequest,
    Listing,
    Page,
    SourceOptions,
    TransientSourceError,
    Watermark,
    read_entities,
    redact,
    reveal,
)
from transforms.jira_markup import issue_markdown, jira_time, person

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The issue fields a document is built from (``comment`` holds the first comments).
SEARCH_FIELDS = [
    "summary", "description", "comment", "issuetype", "status", "priority", "resolution",
    "labels", "components", "fixVersions", "assignee", "reporter", "created", "updated",
    "resolutiondate", "parent", "issuelinks", "project", "epic",
]
#: Most keys asked for per page when listing (Jira caps it lower where it must).
LIST_PAGE_SIZE = 1000
#: Metadata that changes with every edit or comment of an issue
#: (``Document.version_fields``).
VERSION_FIELDS = frozenset({"updated", "comment_count"})
#: The Server/DC "Epic Link" field (a custom field whose id differs per site).
EPIC_LINK_SCHEMA = "com.pyxis.greenhopper.jira:gh-epic-link"
_ORDER_BY = re.compile(r"\border\s+by\b", re.I)


class JiraSourceOptions(http.HttpOptions, SourceOptions):
    """Settings of one Jira source (``flows.settings.JiraSource`` adds ``type``,
    ``schedule`` and the one-auth check).

    ``email`` + ``api_token`` authenticate on Cloud (HTTP basic); ``token`` is a
    Server/DC personal access token (``Authorization: Bearer``); none means anonymous.
    """

    base_url: str = Field(pattern=r"^https?://",
                          description="site root, e.g. https://example.atlassian.net")
    jql: str = Field("", description="which issues, e.g. project in (PLAT, AUTH)")
    projects: list[Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]] = Field(
        default_factory=list,
        description="project keys, read one search each (one the account cannot read "
                    "fails alone); jql then filters within each")
    email: str | None = Field(None, description="Cloud: the account's email")
    api_token: SecretStr | None = Field(None, description="Cloud API token, ${JIRA_API_TOKEN}")
    token: SecretStr | None = Field(None, description="Server/DC personal access token")
    api_version: int = Field(2, ge=2, le=3, description="REST API version; 3 = Cloud, ADF bodies")
    overlap_minutes: int = Field(10, ge=0, description="re-read this much before the cursor")
    page_size: int = Field(50, ge=1, le=1000, description="issues per search page")
    comment_page_size: int = Field(100, ge=1, le=5000)


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the Unix epoch of an aware datetime (naive = UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def strip_order_by(jql: str) -> str:
    """The JQL without its ``ORDER BY`` clause (one outside quotes), trimmed."""
    for match in _ORDER_BY.finditer(jql):
        before = jql[: match.start()]
        if before.count('"') % 2 == 0 and before.count("'") % 2 == 0:
            return before.strip()
    return jql.strip()


def _name(value: Any) -> str | None:
    return value.get("name") if isinstance(value, Mapping) else None


def _names(values: Any) -> list[str]:
    return [v["name"] for v in values or [] if isinstance(v, Mapping) and v.get("name")]


class JiraConnector:
    """Issues matching a JQL filter on one Jira site.

    Args:
        options: the source's settings.
        client_factory: builds the ``jira.JIRA`` client (tests may pass a factory that
            adds options); default :meth:`make_client`.

    Raises (from :meth:`fetch`):
        ConnectorError: bad credentials (401/403), a JQL Jira rejects (400, with Jira's
            message), an unknown site (404).
        TransientSourceError: 429/5xx/connection errors that outlived the retries.
    """

    source_type = "jira"

    def __init__(self, options: JiraSourceOptions,
                 client_factory: Callable[[JiraSourceOptions], JIRA] | None = None) -> None:
        self.options = options
        self.name = options.name
        self.base_url = options.base_url.rstrip("/")
        self._factory = client_factory or (lambda o: make_client(o, self.stats))
        self._client: JIRA | None = None
        self._epic_field: str | None = None
        #: retries, throttled answers, seconds waited, waits cut to the cap
        self.stats: dict[str, float] = http.new_stats()

    # ------------------------------------------------------------------ plumbing

    @property
    def _secrets(self) -> list[str | None]:
        api_token = reveal(self.options.api_token)
        secrets: list[str | None] = [api_token, reveal(self.options.token)]
        if self.options.email and api_token:
            secrets.append(base64.b64encode(
                f"{self.options.email}:{api_token}".encode()).decode())
        return secrets

    def _message(self, text: str) -> str:
        return redact(f"jira source {self.name!r}: {text}", self._secrets)

    def _fail(self, what: str, exc: BaseException, jql: str | None = None) -> NoReturn:
        """Raise the ConnectorError (or TransientSourceError) that ``exc`` means; for a
        JIRAError, its HTTP status and Jira's message stay on the error as ``status`` and
        ``detail`` (read by :func:`_project_refused`)."""
        if isinstance(exc, ConnectorError):
            raise exc
        if isinstance(exc, JIRAError):
            error = self._http_error(what, exc, jql)
            error.status, error.detail = exc.status_code, (exc.text or "").strip()  # type: ignore[attr-defined]
            raise error from None
        if isinstance(exc, requests.RequestException | OSError):
            raise TransientSourceError(self._message(
                f"{what}: {type(exc).__name__}: {exc}")) from None
        raise ConnectorError(self._message(f"{what}: {type(exc).__name__}: {exc}")) from None

    def _http_error(self, what: str, exc: JIRAError, jql: str | None) -> ConnectorError:
        status, detail = exc.status_code, (exc.text or "").strip()
        if status in (401, 403):
            return ConnectorError(self._message(
                f"{what}: HTTP {status}, access denied (check email/api_token or token): "
                f"{detail}"))
        if status == 400 and jql is not None:
            return ConnectorError(self._message(f"Jira rejected the JQL {jql!r}: {detail}"))
        if status is None or status == 429 or status >= 500:
            return TransientSourceError(self._message(
                f"{what}: HTTP {status} after retries: {detail}"))
        return ConnectorError(self._message(f"{what}: HTTP {status}: {detail}"))

    def _retrying(self):
        """Backoff for what ``ResilientSession`` does not retry itself (one layer each)."""
        o = self.options
        return http.retrying(o.http, self.stats, name=f"jira source {self.name!r}",
                             outcome=_needs_backoff, logger=log)

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._retrying()(fn, *args, **kwargs)

    @property
    def client(self) -> JIRA:
        """The ``jira.JIRA`` client, created (``GET /serverInfo``) on first use."""
        if self._client is None:
            try:
                self._client = self._call(self._factory, self.options)
            except Exception as exc:  # noqa: BLE001 - mapped to a safe ConnectorError
                self._fail(f"cannot connect to {self.base_url}", exc)
        return self._client

    @property
    def is_cloud(self) -> bool:
        """Whether ``/serverInfo`` says ``deploymentType: Cloud``."""
        return getattr(self.client, "deploymentType", None) == "Cloud"

    def _fields(self) -> list[str]:
        """SEARCH_FIELDS plus the site's Epic Link custom field (Server/DC), found once."""
        if self._epic_field is None:
            found = ""
            if not self.is_cloud:
                try:
                    for spec in self._call(self.client.fields):
                        if (spec.get("schema") or {}).get("custom") == EPIC_LINK_SCHEMA:
                            found = spec["id"]
                            break
                except Exception as exc:  # noqa: BLE001 - same errors as a search
                    self._fail("cannot read the field list", exc)
            self._epic_field = found
        return SEARCH_FIELDS + ([self._epic_field] if self._epic_field else [])

    def _search(self, jql: str, fields: list[str], position: dict[str, Any],
                size: int) -> dict[str, Any]:
        """One search page (raw JSON): Cloud by token, Server/DC by offset."""
        try:
            if self.is_cloud:
                return self._call(self.client.enhanced_search_issues, jql,
                                  nextPageToken=position.get("token"), maxResults=size,
                                  fields=list(fields), json_result=True)
            return self._call(self.client.search_issues, jql,
                              startAt=int(position.get("start_at", 0)), maxResults=size,
                              fields=list(fields), json_result=True)
        except Exception as exc:  # noqa: BLE001 - mapped below
            self._fail("search failed", exc, jql=jql)

    # ------------------------------------------------------------------- queries

    @property
    def projects(self) -> list[str]:
        """The configured project keys, each once, in the configured order."""
        return list(dict.fromkeys(self.options.projects))

    def jql(self, request: FetchRequest, project: str | None = None) -> str:
        """The JQL sent for ``request`` (bounds as unquoted epoch milliseconds), of one
        ``project`` when given (``request.cursor`` is then that project's watermark)."""
        user = strip_order_by(self.options.jql)
        clauses = [f'project = "{project}"'] if project else []
        clauses += [f"({user})"] if user else []
        if request.is_backfill:
            clauses.append(f"updated >= {epoch_ms(request.since)}")
            if request.until is not None:
                clauses.append(f"updated <= {epoch_ms(request.until)}")
        elif (since := self._watermark(request.cursor).since) is not None:
            clauses.append(f"updated >= {epoch_ms(since)}")
        where = " AND ".join(clauses)
        return (where + " " if where else "") + "ORDER BY updated ASC, key ASC"

    # ------------------------------------------------------------------ issues

    def _doc_id(self, key: str) -> str:
        return f"{self.name}:{key}"

    def _comments(self, key: str, inline: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        """Every comment of an issue: those inline in the search result, then the rest
        from ``GET /issue/{key}/comment`` pages (``startAt``/``maxResults``)."""
        inline = inline if isinstance(inline, Mapping) else {}
        comments = [c for c in inline.get("comments") or [] if isinstance(c, Mapping)]
        total = inline.get("total")
        if not isinstance(total, int) or int(inline.get("startAt") or 0) != 0:
            total = len(comments)
        while len(comments) < total:
            page = self._call(self.client.comments, key, start_at=len(comments),
                              max_results=self.options.comment_page_size)
            if not page:
                break
            comments.extend(c.raw for c in page)
        return comments

    def document(self, raw: Mapping[str, Any],
                 comments: list[Mapping[str, Any]]) -> Document:
        """The document of one issue (``GET issue`` / ``search`` issue JSON + comments).

        Raises:
            KeyError, ValueError, TypeError: the issue JSON lacks ``key`` or ``updated``
                or has malformed content.
        """
        key = raw["key"]
        fields = raw.get("fields") or {}
        summary = (fields.get("summary") or "").strip()
        status = fields.get("status") or {}
        parent = fields.get("parent") if isinstance(fields.get("parent"), Mapping) else {}
        parent_fields = parent.get("fields") or {}
        epic = fields.get("epic")
        epic_key = epic.get("key") if isinstance(epic, Mapping) else None
        if self._epic_field and isinstance(fields.get(self._epic_field), str):
            epic_key = epic_key or fields[self._epic_field]
        if not epic_key and _name(parent_fields.get("issuetype")) == "Epic":
            epic_key = parent.get("key")
        links: list[tuple[str, str]] = []
        for link in fields.get("issuelinks") or []:
            kind = link.get("type") or {}
            if isinstance(link.get("outwardIssue"), Mapping):
                links.append((kind.get("outward") or "relates to", link["outwardIssue"]["key"]))
            elif isinstance(link.get("inwardIssue"), Mapping):
                links.append((kind.get("inward") or "relates to", link["inwardIssue"]["key"]))
        labels = [str(label) for label in fields.get("labels") or []]
        components = _names(fields.get("components"))
        fix_versions = _names(fields.get("fixVersions"))
        assignee, reporter = person(fields.get("assignee")), person(fields.get("reporter"))
        parent_line = None
        if parent.get("key"):
            parent_line = f"{parent['key']} {parent_fields.get('summary') or ''}".strip()
        facts = [
            ("Type", _name(fields.get("issuetype"))),
            ("Status", _name(status)),
            ("Priority", _name(fields.get("priority"))),
            ("Resolution", _name(fields.get("resolution"))),
            ("Assignee", assignee),
            ("Reporter", reporter),
            ("Labels", ", ".join(labels)),
            ("Components", ", ".join(components)),
            ("Fix versions", ", ".join(fix_versions)),
            ("Parent", parent_line),
            ("Epic", epic_key if epic_key != parent.get("key") else None),
            ("Links", "; ".join(f"{verb} {other}" for verb, other in links)),
        ]
        updated = jira_time(fields["updated"])
        project = fields.get("project") or {}
        return Document(
            id=self._doc_id(key),
            source=self.name,
            source_type=self.source_type,
            title=f"{key}: {summary}" if summary else key,
            text=issue_markdown(fields, comments, facts),
            url=f"{self.base_url}/browse/{key}",
            updated_at=updated,
            format="markdown",
            metadata={
                "project": project.get("key") or key.rsplit("-", 1)[0],
                "issue_key": key,
                "issue_type": _name(fields.get("issuetype")),
                "status": _name(status),
                "status_category": _name(status.get("statusCategory")),
                "priority": _name(fields.get("priority")),
                "resolution": _name(fields.get("resolution")),
                "labels": labels or None,
                "components": components or None,
                "fix_versions": fix_versions or None,
                "assignee": assignee,
                "reporter": reporter,
                "created": jira_time(fields.get("created")),
                "updated": updated,
                "resolved": jira_time(fields.get("resolutiondate")),
                "parent": parent.get("key"),
                "epic": epic_key,
                "linked_issues": sorted({other for _, other in links}) or None,
                "comment_count": len(comments),
            },
            version_fields=VERSION_FIELDS,
        )

    def _read_issue(self, raw: Mapping[str, Any]) -> Document | DocumentIssue:
        key = raw.get("key") or f"id-{raw.get('id')}"
        doc_id = self._doc_id(key)
        title = f"{key}: {((raw.get('fields') or {}).get('summary') or '').strip()}"
        try:
            comments = self._comments(key, (raw.get("fields") or {}).get("comment"))
        except JIRAError as exc:
            if exc.status_code == 401:
                self._fail(f"reading the comments of {key}", exc)
            if exc.status_code == 404:
                return DocumentIssue(doc_id, "the issue no longer exists (HTTP 404 reading "
                                     "its comments)", "skipped", title)
            return DocumentIssue(doc_id, self._message(
                f"reading the comments of {key}: HTTP {exc.status_code}: {exc.text or ''}"),
                "failed", title)
        except Exception as exc:  # noqa: BLE001 - one issue must not stop the run
            return DocumentIssue(doc_id, self._message(
                f"reading the comments of {key}: {type(exc).__name__}: {exc}"), "failed", title)
        try:
            return self.document(raw, comments)
        except Exception as exc:  # noqa: BLE001 - malformed issue JSON
            return DocumentIssue(doc_id, self._message(
                f"malformed issue {key}: {type(exc).__name__}: {exc}"), "failed", title)

    # ------------------------------------------------------------------ protocol

    def fetch(self, request: FetchRequest, checkpoint: Checkpoint | None = None) -> Iterator[Page]:
        """Yield the issues changed since the cursor (or in the backfill window), a page
        of at most ``page_size`` issues at a time.

        The checkpoint is ``{"jql", "start_at" | "token", "total", "watermark"}``: the
        position of the next page and the :class:`Watermark` so far. A Cloud page token
        that Jira no longer accepts restarts the read from that watermark.

        With ``projects`` configured, one search per project: see :meth:`_fetch_projects`.
        """
        if self.projects:
            yield from self._fetch_projects(request, checkpoint)
            return
        yield from self._fetch_jql(request, checkpoint, None)

    def _fetch_jql(self, request: FetchRequest, checkpoint: Checkpoint | None,
                   project: str | None) -> Iterator[Page]:
        """The pages of one search: the whole JQL, or one ``project``'s."""
        jql = self.jql(request, project)
        fields = self._fields()
        wm = self._watermark(request.cursor)
        if checkpoint and checkpoint.get("jql") == jql:
            state = dict(checkpoint)
            wm = wm.restore(state["watermark"])
        else:
            state = {"jql": jql, "start_at": 0, "token": None, "total": None}
        run_keys: set[str] = set()
        boundary: int | None = None  # updated (ms) of the last issue of the previous page
        log.info("jira source %r: %s", self.name, state["jql"])
        while True:
            data = self._search_from(state, fields, wm, request, project)
            issues = [i for i in data.get("issues") or [] if isinstance(i, Mapping)]
            total = data.get("total")
            shifted = isinstance(total, int) and isinstance(state.get("total"), int) \
                and total < state["total"]
            page = Page()
            last_ms = boundary
            for raw in issues:
                key = raw.get("key")
                updated_ms = _updated_ms(raw)
                at = None if updated_ms is None else _instant(updated_ms)
                shifted = shifted or key in run_keys
                run_keys.add(key)
                last_ms = updated_ms if updated_ms is not None else last_ms
                if not request.is_backfill and wm.is_known(key, updated_ms):
                    wm.advance(key, updated_ms, at)
                    continue  # indexed at this very `updated` by an earlier run
                result = self._read_issue(raw)
                if isinstance(result, Document):
                    page.documents.append(result)
                else:
                    page.issues.append(result)
                if isinstance(result, DocumentIssue) and result.kind == "failed":
                    wm.hold_at(wm.value)  # nothing after the last issue read counts
                else:
                    wm.advance(key, updated_ms, at)
            if shifted and boundary is not None:
                wm.hold_at(_instant(boundary))
            boundary = last_ms
            state["total"] = total if isinstance(total, int) else None
            if self.is_cloud:
                state["token"] = data.get("nextPageToken")
                last = not issues or not state["token"] or bool(data.get("isLast"))
            else:
                state["start_at"] = int(state.get("start_at") or 0) + len(issues)
                last = not issues or (isinstance(total, int) and state["start_at"] >= total)
            wm.prune()
            state["watermark"] = wm.to_json()
            page.checkpoint = dict(state)
            if last:
                page.cursor = wm.result().to_json()
            yield page
            if last:
                return

    def _watermark(self, cursor: Cursor | None) -> Watermark:
        return Watermark.read(cursor, key="updated", timespec="milliseconds",
                              lag=timedelta(minutes=self.options.overlap_minutes))

    @staticmethod
    def _cursor_of(cursor: Cursor | None, project: str) -> Cursor | None:
        """The watermark ``project`` starts from: its own in a per-project cursor
        (``None`` when it has none yet: read from the beginning); a single watermark
        (written before ``projects`` was configured, by the one search of ``jql``) is
        taken to cover every project."""
        if not cursor:
            return None
        if isinstance(cursor.get("projects"), Mapping):
            return cursor["projects"].get(project)
        return dict(cursor)

    def _fetch_projects(self, request: FetchRequest, checkpoint: Checkpoint | None
                        ) -> Iterator[Page]:
        """Each configured project by its own search, in the configured order.

        The cursor is ``{"projects": {<KEY>: <Watermark>}, "version": 1}``: each project
        moves on its own. A project the account cannot read is a failed entity (a
        :class:`DocumentIssue` with ``scope="entity"`` and Jira's message): Jira answers
        its search with HTTP 400 "The value 'KEY' does not exist for the field
        'project'." (for a project that does not exist and for one the account may not
        browse alike), or 403/404. Its watermark stays where it was (one never read has
        none, so it is read from the beginning once it can be) and the other projects
        are read. Only a source none of whose projects can be read fails as a whole.

        The checkpoint is ``{"project": <KEY being read>, "inner": <its search's
        checkpoint, or None once done>, "done": {<KEY>: <new watermark>}, "entities":
        [[<KEY>, <reason>]]}``. The last page (possibly empty) carries the cursor and,
        again, the entity failures of runs before the checkpoint. A checkpoint in which
        every project failed (the run that saved it failed as a whole) is not resumed:
        the read starts over, so a project whose access is restored is read instead of
        its old failure replayed.
        """
        yield from read_entities(
            request, checkpoint, keys=self.projects, kind="project", source=self.name,
            cursor_of=self._cursor_of, read=self._fetch_jql, refused=_project_refused,
            fail=lambda reasons: ConnectorError(
                self._message(f"no configured project can be read: {reasons}")))

    def _search_from(self, state: dict[str, Any], fields: list[str], wm: Watermark,
                     request: FetchRequest, project: str | None = None) -> dict[str, Any]:
        """The next search page; a Cloud ``nextPageToken`` Jira rejects (it expired while
        the checkpoint waited) restarts the read at the watermark so far: the issues
        before it are read, the ones after it were not (ascending ``updated`` order)."""
        try:
            return self._search(state["jql"], fields, state, self.options.page_size)
        except ConnectorError as exc:
            if not (state.get("token") and _bad_token(exc)):
                raise
        if request.is_backfill:
            restart = FetchRequest(since=wm.since or request.since, until=request.until)
        else:
            restart = FetchRequest(cursor=wm.to_json())
        log.warning("jira source %r: the saved page token was refused; reading again "
                    "from %s", self.name, wm.since)
        state.update(jql=self.jql(restart, project), token=None, start_at=0, total=None)
        return self._search(state["jql"], fields, state, self.options.page_size)

    def list_ids(self) -> Listing:
        """The keys of every issue the JQL matches now, as document ids.

        Asks for no fields (``fields=key``). Offset paging over a set that changes while
        it is read can miss a key, which would delete a live issue: a listing whose
        ``total`` changed between pages or whose keys do not add up to ``total`` is
        returned with ``complete=False``.
        """
        user = strip_order_by(self.options.jql)
        clauses = [f"({user})"] if user else []
        if self.projects:  # a project that cannot be read fails the listing (400)
            clauses.insert(0, "project in (" + ", ".join(f'"{p}"' for p in self.projects)
                           + ")")
        jql = (" AND ".join(clauses) + " " if clauses else "") + "ORDER BY key ASC"
        keys: set[str] = set()
        position: dict[str, Any] = {"start_at": 0, "token": None}
        totals: set[int] = set()
        try:
            while True:
                data = self._search(jql, ["key"], position, LIST_PAGE_SIZE)
                issues = data.get("issues") or []
                for raw in issues:
                    keys.add(raw["key"])
                if isinstance(data.get("total"), int):
                    totals.add(data["total"])
                if self.is_cloud:
                    position["token"] = data.get("nextPageToken")
                    if not issues or not position["token"] or data.get("isLast"):
                        break
                else:
                    position["start_at"] += len(issues)
                    if not issues or position["start_at"] >= data.get("total", 0):
                        break
        except (ConnectorError, KeyError, TypeError) as exc:
            return Listing(frozenset(), complete=False,
                           reason=self._message(f"listing failed: {exc}"))
        if len(totals) > 1 or (totals and len(keys) != min(totals)):
            return Listing(frozenset(), complete=False, reason=self._message(
                f"the result set changed while listing ({len(keys)} keys, totals "
                f"{sorted(totals)})"))
        return Listing(frozenset(self._doc_id(k) for k in keys), complete=True)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _instant(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _project_refused(exc: ConnectorError, project: str) -> bool:
    """Whether a search of one ``project`` was refused for that project: HTTP 403/404,
    or 400 with Jira's "The value 'KEY' does not exist for the field 'project'." (Jira
    says so for a project the account may not browse, too)."""
    status, detail = getattr(exc, "status", None), getattr(exc, "detail", "") or ""
    if status in (403, 404):
        return True
    return status == 400 and f"'{project}' does not exist for the field 'project'" in detail


def _bad_token(exc: ConnectorError) -> bool:
    """Whether a search that carried a ``nextPageToken`` was refused as a bad request
    (HTTP 400): its JQL already served the first page, so the token is what Jira refused."""
    return not isinstance(exc, TransientSourceError) and (
        "Jira rejected the JQL" in str(exc) or "HTTP 400" in str(exc))


def _updated_ms(raw: Mapping[str, Any]) -> int | None:
    """The issue's ``fields.updated`` in epoch ms, or None when missing or malformed."""
    try:
        return epoch_ms(jira_time((raw.get("fields") or {}).get("updated")))
    except (TypeError, ValueError, AttributeError):
        return None


def _needs_backoff(exc: BaseException) -> http.Outcome | None:
    """5xx that ``ResilientSession`` does not retry itself (500, 502, 504, 503 without
    ``Retry-After``) and read timeouts; ``None`` for everything else (not retried here:
    the session already retried 429, 503 with ``Retry-After`` and connection errors)."""
    if isinstance(exc, JIRAError):
        headers = getattr(exc.response, "headers", None) or {}
        judged = http.classify(exc.status_code or 0, headers)
        if judged.kind == "retryable" and exc.status_code and \
                not (exc.status_code == 503 and "Retry-After" in headers):
            return judged
        return None
    if isinstance(exc, requests.Timeout) and not isinstance(exc, requests.ConnectionError):
        return http.Outcome("retryable")
    return None


def make_client(options: JiraSourceOptions, stats: dict[str, float] | None = None) -> JIRA:
    """A ``jira.JIRA`` client for ``options`` (asks ``/serverInfo`` for the deployment type).

    ``http.max_retries`` and ``http.max_backoff_seconds`` configure the library's
    ``ResilientSession`` (429 waits ``Retry-After``: the session sleeps
    ``min(max_backoff_seconds, 2 * Retry-After)`` times a jitter in [0.5, 1], so keep
    ``max_backoff_seconds`` at least twice the longest
    ``Retry-After`` expected).
    """
    auth: dict[str, Any] = {}
    if options.email and options.api_token:
        auth["basic_auth"] = (options.email, reveal(options.api_token))
    elif options.token:
        auth["token_auth"] = reveal(options.token)
    client = JIRA(
        server=options.base_url.rstrip("/"),
        options={"rest_api_version": str(options.api_version), "check_update": False},
        max_retries=options.http.max_retries,
        timeout=options.http.timeout_seconds,
        get_server_info=True,
        **auth,
    )
    # JIRA() exposes max_retries but not the session's delay cap; set it on the session.
    # It caps every wait of the session: Retry-After (it sleeps 2 x Retry-After) and the
    # 10 x 2^n s backoff of connection errors (20/40/80 s otherwise).
    client._session.max_retry_delay = min(options.http.max_backoff_seconds,
                                          options.http.max_retry_after_seconds)
    http.cap_waits(client._session, http.RetryPolicy(
        max_retry_after_seconds=options.http.max_retry_after_seconds / 2), stats or {})
    return client

"""GitLab as a source: repository files, issues, merge requests and the project wiki.

One *source* is a GitLab instance (``base_url``) with a set of projects: named ones
(path or id) and/or every project of a group (optionally with its subgroups). Each
project contributes up to four *parts*:

``code``
    the repository, cloned bare over HTTPS and read by :class:`connectors.git.GitConnector`
    (incremental by commit diff; the token goes to git as an HTTP header through the
    environment). Document urls are GitLab blob URLs of the file at the commit that
    last changed it (the file's content at the synced commit).
``issues`` / ``merge_requests``
    listed with ``updated_after=<cursor - overlap>``, ``order_by=updated_at``,
    ``sort=asc`` and ``iterator=True`` (python-gitlab follows every ``Link: rel="next"``
    page). Listing in creation order and stopping at the first old item would miss
    old items updated recently. One Markdown document per issue/MR: title,
    facts, description and every discussion note with author and date (system notes
    dropped; see :mod:`transforms.gitlab`).
``wiki``
    every page listed ``with_content=1`` (the wiki API has no ``updated_after``); a page
    is a change when its content hash differs from the one in the cursor, and a slug
    that disappeared is a deletion.

Document ids: ``<source>:<project path>:code:<file path>``, ``<source>:<project path>#<iid>``
(issue), ``<source>:<project path>!<iid>`` (merge request, GitLab's own reference
syntax), ``<source>:<project path>:wiki:<slug>``.

The *cursor* is ``{"projects": {<project path>: {"code": {"commit": sha}, "issues":
<watermark>, "merge_requests": <watermark>, "wiki": {<slug>: <hash>}}}, "version": 1}``
where a watermark is a :class:`connectors.base.Watermark` (``{"updated", "seen":
{<iid>: [<updated_at>, <updated_at>]}, "version"}``; the older bare ``updated_at``
strings are still read). An issue/MR of the overlap window that the watermark read at
the same ``updated_at`` is not read again (its discussions are not fetched). The
watermark never passes an issue/MR that failed: it holds at the failed item's
``updated_at``. If an item shows up twice in one listing (it was updated while the
listing ran, which shifts later items across page boundaries), it holds at the item's
first position, so an item shifted past is read next time.

A project that cannot be read (403/404 on ``GET /projects/:id``), or one part of it (403
on its issues, a repository whose branch does not exist) is a failed *entity*: a
:class:`DocumentIssue` with ``scope="entity"`` naming it and why; its cursor stays where
it was, and the other projects and parts are read and their cursors move. Only a source
none of whose configured projects can be read fails as a whole (after reporting each as a
failed entity).

Confidential issues are skipped (recorded, and removed from the index if they were in
it) unless ``include_confidential``; then their metadata has ``confidential=True``. An
issue moved to another project (GitLab keeps the closed original, with ``moved_to_id``)
is skipped the same way; its copy in the other project is a document of that project.

Faults: python-gitlab retries 429 (sleeping ``Retry-After`` or until
``RateLimit-Reset``, cut to ``max_retry_after_seconds`` and counted in ``stats`` by
:func:`connectors.http.cap_waits`) and, with ``retry_transient_errors=True``, 5xx and connection
errors with exponential backoff (0.1 s * 2^n), up to ``max_retries`` times
(``gitlab/utils.py`` ``Retry``; https://python-gitlab.readthedocs.io/en/stable/api-usage-advanced.html#rate-limits).
What still fails: 401 -> :class:`ConnectorError` (not retried); 403/404 on a project's
listing -> that entity fails (above);
5xx/429/connection errors on a listing -> :class:`TransientSourceError` (the flow
retries the page from the last checkpoint); an error reading one item's discussions
-> a failed :class:`DocumentIssue` for that item, and the run goes on. The token is
sent as the ``PRIVATE-TOKEN`` header and never appears in a message.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import gitlab
import requests
from gitlab.exceptions import GitlabAuthenticationError, GitlabError
from pydantic import BeforeValidator, Field, SecretStr, field_validator

from connectors import http
from connectors.base import (
    WATERMARK_VERSION,
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
    now_utc,
    redact,
    reveal,
)
from connectors.git import GitConnector, GitSourceOptions
from transforms.gitlab import (
    ITEM_VERSION_FIELDS,
    api_time,
    is_confidential,
    issue_text,
    item_metadata,
    merge_request_text,
    parse_time,
    wiki_format,
    wiki_hash,
    wiki_metadata,
    wiki_text,
)

log = logging.getLogger(__name__)

#: The parts of a project, in the order a run reads them.
PARTS = ("code", "issues", "merge_requests", "wiki")

#: ``(kind, value)`` events of one part's reader: ``doc``, ``delete``, ``issue``, and
#: ``mark`` (a resume point; value = the part's checkpoint after what came before).
_Event = tuple[str, Any]


#: One part of a project (``PARTS``).
GitLabPart = Literal["code", "issues", "merge_requests", "wiki"]


class GitLabSourceOptions(http.HttpOptions, SourceOptions):
    """Settings of one GitLab source (``flows.settings.GitLabSource`` adds ``type``,
    ``schedule`` and the projects-or-group check)."""

    base_url: str = Field("https://gitlab.com", description="the GitLab instance")
    token: SecretStr | None = Field(
        None, description="personal/project/group access token (read_api + read_repository), "
                          "e.g. ${GITLAB_TOKEN}")
    projects: list[Annotated[str, BeforeValidator(str)]] = Field(
        default_factory=list, description="project paths (group/project) or ids")
    group: str | None = Field(None, description="every project of this group (path or id)")
    include_subgroups: bool = True
    parts: list[GitLabPart] = Field(default_factory=lambda: list(PARTS), min_length=1)
    branch: str | None = Field(None, description="code branch; default each project's default")
    include: list[str] = Field(default_factory=lambda: ["**"])
    exclude: list[str] = Field(default_factory=list)
    max_file_bytes: int = Field(1_000_000, ge=1)
    overlap_minutes: float = Field(
        10, ge=0, description="issues/MRs: re-read this much before the cursor")
    include_confidential: bool = Field(
        False, description="index confidential issues and internal notes")
    page_size: int = Field(100, ge=1, le=100, description="items per API page and per sync page")
    clone_url: str | None = Field(
        None, description="clone URL template ({path}, {id}); default http_url_to_repo")
    ssl_verify: bool | str = Field(True, description="false, or a CA bundle path")

    @field_validator("parts")
    @classmethod
    def _each_part_once(cls, parts: list[str]) -> list[str]:
        return list(dict.fromkeys(parts))


@dataclass(frozen=True)
class GitLabProject:
    """What kbsync needs of a project (from ``GET /projects/:id`` or a group listing)."""

    id: int
    path: str
    web_url: str
    http_url_to_repo: str | None
    default_branch: str | None
    parts: frozenset[str]

    @classmethod
    def from_api(cls, attrs: dict[str, Any]) -> GitLabProject:
        """Build from a project JSON object; a part is missing when the project turned
        the feature off (``*_enabled: false`` or ``*_access_level: "disabled"``) or,
        for code, when the repository is empty."""

        def enabled(flag: str, level: str) -> bool:
            return attrs.get(flag) is not False and attrs.get(level) != "disabled"

        parts = set()
        if (enabled("repository_enabled", "repository_access_level")
                and not attrs.get("empty_repo") and attrs.get("http_url_to_repo")):
            parts.add("code")
        if enabled("issues_enabled", "issues_access_level"):
            parts.add("issues")
        if enabled("merge_requests_enabled", "merge_requests_access_level"):
            parts.add("merge_requests")
        if enabled("wiki_enabled", "wiki_access_level"):
            parts.add("wiki")
        return cls(id=int(attrs["id"]), path=str(attrs["path_with_namespace"]),
                   web_url=str(attrs.get("web_url") or "").rstrip("/"),
                   http_url_to_repo=attrs.get("http_url_to_repo"),
                   default_branch=attrs.get("default_branch"), parts=frozenset(parts))


def _norm(value: str | None) -> str | None:
    """A GitLab timestamp in one spelling (``api_time``): an item's version."""
    return api_time(parse_time(value)) if value else None


class GitLabConnector:
    """A GitLab source: its projects' code, issues, merge requests and wiki.

    Args:
        options: the source's settings.
        data_dir: kbsync's data directory; clones live in ``<data_dir>/gitlab/<source>/``.

    Raises (from :meth:`fetch`):
        ConnectorError: bad token (401), a project, group or part that cannot be read
            (403/404). Messages never contain the token.
        TransientSourceError: 5xx, 429 or connection errors that outlasted
            python-gitlab's own retries.
    """

    source_type = "gitlab"

    def __init__(self, options: GitLabSourceOptions, data_dir: Path | None = None) -> None:
        unknown = set(options.parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown GitLab parts: {sorted(unknown)}")
        if not options.projects and not options.group:
            raise ValueError("a GitLab source needs projects or a group")
        self.options = options
        self.name = options.name
        self._data_dir = Path(data_dir) if data_dir else Path(".kbsync")
        self._gl: gitlab.Gitlab | None = None
        self._projects: list[GitLabProject] | None = None
        #: ``skipped_seen``: issues/MRs of the overlap not read again (same ``updated_at``)
        self.stats: dict[str, float] = {"skipped_seen": 0, **http.new_stats()}
        #: configured projects that could not be read: ``{ref: reason}``
        self.unreadable: dict[str, str] = {}
        self._git: dict[int, GitConnector] = {}

    # --------------------------------------------------------------------- the API

    @property
    def gl(self) -> gitlab.Gitlab:
        """The python-gitlab client (retries 429 and transient errors itself)."""
        if self._gl is None:
            self._gl = gitlab.Gitlab(
                url=self.options.base_url, private_token=reveal(self.options.token),
                timeout=self.options.http.timeout_seconds, ssl_verify=self.options.ssl_verify,
                retry_transient_errors=True, keep_base_url=True,
                user_agent="kbsync (python-gitlab)")
            # python-gitlab sleeps for any Retry-After it is sent: cap and count it
            http.cap_waits(self._gl.session, self.options.http, self.stats)
        return self._gl

    @property
    def _retries(self) -> dict[str, Any]:
        # max_retries is an argument of Gitlab.http_request, passed through list()/get()
        # (and kept by GitlabList for every following page)
        return {"max_retries": self.options.http.max_retries}

    def _message(self, what: str, exc: BaseException) -> str:
        if isinstance(exc, GitlabError):
            code, detail = exc.response_code, exc.error_message
            if isinstance(detail, bytes):  # a body that was not JSON (an HTML error page)
                detail = detail.decode("utf-8", "replace")
            detail = " ".join(str(detail).split())[:200]
            detail = f"{code} {detail}" if code else detail
        else:
            detail = f"{type(exc).__name__}: {exc}"
        return redact(f"gitlab source {self.name!r}: {what}: {detail}", [reveal(self.options.token)])

    @contextmanager
    def _api(self, what: str) -> Iterator[None]:
        """Turn python-gitlab and requests errors into the connector's errors."""
        try:
            yield
        except GitlabAuthenticationError as exc:
            raise ConnectorError(self._message(what, exc) + " (check the token)") from None
        except GitlabError as exc:
            code = exc.response_code
            if code is None or code == 429 or code >= 500:
                raise TransientSourceError(self._message(what, exc)) from None
            if code in (403, 404):
                raise EntityError(self._message(what, exc)) from None
            raise ConnectorError(self._message(what, exc)) from None
        except requests.RequestException as exc:
            raise TransientSourceError(self._message(what, exc)) from None

    def projects(self) -> list[GitLabProject]:
        """The configured projects plus the group's, sorted by path (cached per connector)."""
        if self._projects is not None:
            return self._projects
        found: dict[int, GitLabProject] = {}
        self.unreadable = {}
        for ref in self.options.projects:
            try:
                with self._api(f"cannot read project {str(ref)!r}"):
                    project = self.gl.projects.get(ref, **self._retries)
            except EntityError as exc:  # the other projects are still read
                self.unreadable[str(ref)] = str(exc)
                continue
            found[project.id] = GitLabProject.from_api(project.asdict())
        if self.unreadable and not found and not self.options.group:
            # nothing of the source can be read: a source error (a wrong path, a token
            # without access), not one entity among others; fetch reports each as a
            # failed entity first
            error = ConnectorError(f"gitlab source {self.name!r}: no configured project "
                                   "can be read: " + "; ".join(self.unreadable.values()))
            error.entities = dict(self.unreadable)  # type: ignore[attr-defined]
            raise error
        if self.options.group:
            with self._api(f"cannot list the projects of group {self.options.group!r}"):
                group = self.gl.groups.get(self.options.group, lazy=True)
                listing = group.projects.list(
                    iterator=True, per_page=100, with_shared="false", **self._retries,
                    include_subgroups="true" if self.options.include_subgroups else "false")
                for project in listing:
                    found.setdefault(project.id, GitLabProject.from_api(project.asdict()))
        self._projects = sorted(found.values(), key=lambda p: p.path)
        return self._projects

    def _project_api(self, project: GitLabProject):
        return self.gl.projects.get(project.id, lazy=True)

    def _git_connector(self, project: GitLabProject) -> GitConnector:
        conn = self._git.get(project.id)
        if conn is None:
            url = (self.options.clone_url.format(path=project.path, id=project.id)
                   if self.options.clone_url else project.http_url_to_repo)
            conn = GitConnector(
                GitSourceOptions(
                    name=self.name, url=str(url), branch=self.options.branch or project.default_branch,
                    include=self.options.include, exclude=self.options.exclude,
                    max_file_bytes=self.options.max_file_bytes, token=self.options.token,
                    username="oauth2", web_url=f"{project.web_url}/-/blob/{{commit}}/{{path}}",
                    page_size=self.options.page_size,
                ),
                data_dir=self._data_dir,
                clone_dir=self._data_dir / "gitlab" / self.name / f"{project.id}.git",
                id_prefix=f"{project.path}:code:",
            )
            self._git[project.id] = conn
        return conn

    # ------------------------------------------------------------------ document ids

    def item_id(self, project: GitLabProject, kind: str, iid: int) -> str:
        """``<source>:<project>#<iid>`` for an issue, ``<source>:<project>!<iid>`` for an MR."""
        return f"{self.name}:{project.path}{'#' if kind == 'issue' else '!'}{iid}"

    def wiki_id(self, project: GitLabProject, slug: str) -> str:
        return f"{self.name}:{project.path}:wiki:{slug}"

    # ---------------------------------------------------------------------- fetching

    def _steps(self) -> list[tuple[GitLabProject, str]]:
        return [(project, part) for project in self.projects() for part in PARTS
                if part in self.options.parts and part in project.parts]

    def fetch(self, request: FetchRequest, checkpoint: Checkpoint | None = None) -> Iterator[Page]:
        """Yield the changes of every project's parts, in pages of about ``page_size``
        entries (small parts share a page).

        The checkpoint is ``{"cursor": <cursor so far>, "at": [<project path>,
        <part index>], "inner": <the part's own resume point, or None once done>}``.
        A project or part that cannot be read (403, 404, a missing branch) is a failed
        entity (a :class:`DocumentIssue` with ``scope="entity"``); its cursor stays where
        it was and the other projects and parts are read. When no configured project can
        be read (and no group is configured), a page with each as a failed entity comes
        first, then :class:`ConnectorError` ("no configured project can be read").
        """
        old_projects = (request.cursor or {}).get("projects") or {}
        new_cursor: dict[str, dict[str, Any]] = copy.deepcopy(
            (checkpoint or {}).get("cursor") or {})
        resume_at = tuple((checkpoint or {}).get("at") or ())
        resume_inner = (checkpoint or {}).get("inner")
        size = max(1, self.options.page_size)
        buffer = Page()
        position: Checkpoint | None = dict(checkpoint) if checkpoint else None
        pending = 0

        # entity failures before the checkpoint: reported again on the last page, so the
        # run that finishes the read knows them (they decide what the cursor may do)
        carried = [tuple(e) for e in (checkpoint or {}).get("entities") or []]
        entities: list[tuple[str, str]] = list(carried)

        def at(key: tuple[str, int] | list, inner: Any) -> Checkpoint:
            return {"cursor": copy.deepcopy(new_cursor), "at": list(key), "inner": inner,
                    "entities": [list(e) for e in entities]}

        try:
            steps = self._steps()
        except ConnectorError as exc:
            unreadable = getattr(exc, "entities", None)
            if not unreadable:
                raise
            # no configured project can be read: each is a failed entity with its reason
            # (as when only some cannot), then the source fails; the checkpoint is kept
            yield Page(issues=[entity_failure(self.name, ref, reason)
                               for ref, reason in sorted(unreadable.items())],
                       checkpoint=checkpoint)
            raise
        if not resume_at:
            for ref, reason in sorted(self.unreadable.items()):
                buffer.issues.append(entity_failure(self.name, ref, reason))
                entities.append((ref, reason))
                if ref in old_projects and request.cursor:
                    new_cursor[ref] = copy.deepcopy(old_projects[ref])
        for project, part in steps:
            key = (project.path, PARTS.index(part))
            inner = None
            if resume_at:
                if key < resume_at or (key == resume_at and resume_inner is None):
                    continue
                if key == resume_at:
                    inner = resume_inner
            old = (old_projects.get(project.path) or {}).get(part) if request.cursor else None
            events = self._read_part(project, part, old, inner, request)
            while True:
                try:
                    kind, value = next(events)
                except StopIteration as stop:
                    if stop.value is not None:
                        new_cursor.setdefault(project.path, {})[part] = stop.value
                    else:
                        new_cursor.get(project.path, {}).pop(part, None)
                    position = at(key, None)
                    break
                except EntityError as exc:  # this part holds; the others go on
                    buffer.issues.append(entity_failure(self.name,
                        f"{project.path}:{part}", str(exc)))
                    entities.append((f"{project.path}:{part}", str(exc)))
                    pending += 1
                    if old is not None:
                        new_cursor.setdefault(project.path, {})[part] = old
                    position = at(key, None)
                    break
                if kind == "mark":
                    position = at(key, value)
                    if pending >= size:
                        buffer.checkpoint = position
                        yield buffer
                        buffer, pending = Page(), 0
                    continue
                pending += 1
                if kind == "doc":
                    buffer.documents.append(value)
                elif kind == "delete":
                    buffer.deletions.append(value)
                else:
                    buffer.issues.append(value)
            if pending >= size:
                buffer.checkpoint = position
                yield buffer
                buffer, pending = Page(), 0

        buffer.issues.extend(entity_failure(self.name, entity, reason)
                             for entity, reason in carried)
        buffer.checkpoint = position or at([], None)
        buffer.cursor = {"projects": new_cursor, "version": WATERMARK_VERSION}
        yield buffer

    def _read_part(self, project: GitLabProject, part: str, old: Any, inner: Any,
                   request: FetchRequest) -> Iterator[_Event]:
        if part == "code":
            return self._read_code(project, old, inner, request)
        if part == "wiki":
            return self._read_wiki(project, old)
        return self._read_items(project, part, old, inner, request)

    def _read_code(self, project: GitLabProject, old: Any, inner: Any,
                   request: FetchRequest) -> Iterator[_Event]:
        conn = self._git_connector(project)
        sub = FetchRequest(cursor=old if isinstance(old, dict) else None,
                           since=request.since, until=request.until)
        result = old
        try:
            for page in conn.fetch(sub, inner):
                for doc in page.documents:
                    yield "doc", replace(doc, source_type=self.source_type,
                                         metadata={**doc.metadata, "project": project.path,
                                                   "kind": "code"})
                for doc_id in page.deletions:
                    yield "delete", doc_id
                for issue in page.issues:
                    yield "issue", issue
                if page.cursor is not None:
                    result = page.cursor
                else:
                    yield "mark", page.checkpoint
        except (TransientSourceError, EntityError):
            raise
        except ConnectorError as exc:  # a repository that cannot be cloned, a missing branch
            raise EntityError(str(exc)) from None
        return result

    def _read_items(self, project: GitLabProject, part: str, old: Any, inner: Any,
                    request: FetchRequest) -> Iterator[_Event]:
        """Issues or merge requests updated since the part's watermark (or in the
        backfill window), oldest update first. An item the watermark already read at
        this ``updated_at`` is not read again (its discussions are not fetched). Returns
        the part's new cursor value (a :class:`Watermark`'s JSON)."""
        kind = "issue" if part == "issues" else "merge_request"
        wm = Watermark.read(None if request.is_backfill else old, key="updated",
                            lag=timedelta(minutes=self.options.overlap_minutes))
        state = dict(inner or {})
        if "after" in state:
            wm = wm.restore(state.get("watermark"))
        else:
            since = request.since if request.since is not None else wm.since
            state = {"after": api_time(since) if since else None}
        params: dict[str, Any] = {"order_by": "updated_at", "sort": "asc", "iterator": True,
                                  "per_page": min(100, self.options.page_size), **self._retries}
        if state["after"]:
            params["updated_after"] = state["after"]
        if request.until is not None:
            params["updated_before"] = api_time(request.until)
        what = f"cannot list the {part.replace('_', ' ')} of {project.path}"
        api = self._project_api(project)
        manager = api.issues if part == "issues" else api.mergerequests
        with self._api(what):
            listing = manager.list(**params)
        total_at_start = listing.total
        first_seen: dict[int, Any] = {}
        while True:
            with self._api(what):
                try:
                    item = next(listing)
                except StopIteration:
                    break
            attrs = item.asdict()
            updated = _norm(attrs.get("updated_at"))
            at = parse_time(updated) if updated else None
            if attrs.get("id") in first_seen:  # updated while we listed: see the docstring
                wm.hold_at(first_seen[attrs["id"]])
            first_seen.setdefault(attrs.get("id"), at)
            iid, failed = str(attrs.get("iid")), False
            if not request.is_backfill and wm.is_known(iid, updated):
                self.stats["skipped_seen"] += 1  # read at this updated_at already
            else:
                result = self._item_document(project, kind, item, attrs)
                yield ("doc" if isinstance(result, Document) else "issue"), result
                failed = isinstance(result, DocumentIssue) and result.kind == "failed"
            if failed:
                wm.hold_at(at)
            else:
                wm.advance(iid, updated, at)
            state["after"] = updated or state["after"]
            wm.prune()
            state["watermark"] = wm.to_json()
            yield "mark", dict(state)
        if total_at_start is not None and listing.total is not None \
                and listing.total < total_at_start:
            # an item left the listing while we read it; later items may have shifted
            # to a page already read: read this part again from where it started
            wm.hold_all()
        if request.is_backfill:
            return old
        return wm.result().to_json()

    def _item_document(self, project: GitLabProject, kind: str, item: Any,
                       attrs: dict[str, Any]) -> Document | DocumentIssue:
        iid = attrs.get("iid")
        doc_id = self.item_id(project, kind, iid)
        ref = doc_id.removeprefix(f"{self.name}:")
        title = f"{ref}: {attrs.get('title') or ''}".strip()
        if kind == "issue" and is_confidential(attrs) and not self.options.include_confidential:
            return DocumentIssue(doc_id, "confidential issue (include_confidential is off)",
                                 "skipped", title)
        if attrs.get("moved_to_id"):  # the closed original GitLab keeps after a move
            return DocumentIssue(doc_id, "moved to another project", "skipped", title)
        try:
            discussions: list[dict[str, Any]] = []
            if attrs.get("user_notes_count", 1):  # 0: nothing but system notes, if any
                discussions = [d.asdict() for d in item.discussions.list(
                    iterator=True, per_page=100, **self._retries)]
            render = issue_text if kind == "issue" else merge_request_text
            text = render(attrs, discussions, project.path, self.options.include_confidential)
            return Document(
                id=doc_id, source=self.name, source_type=self.source_type, title=title,
                text=text, url=attrs.get("web_url") or f"{project.web_url}",
                updated_at=parse_time(attrs.get("updated_at")) or now_utc(), format="markdown",
                metadata=item_metadata(attrs, project.path, kind,
                                       self.options.include_confidential),
                version_fields=ITEM_VERSION_FIELDS,
            )
        except GitlabAuthenticationError as exc:
            raise ConnectorError(self._message(f"cannot read {ref}", exc)) from None
        except (GitlabError, requests.RequestException, ValueError, KeyError, TypeError,
                AttributeError) as exc:
            return DocumentIssue(doc_id, self._message(f"cannot read {ref}", exc), "failed",
                                 title)

    def _read_wiki(self, project: GitLabProject, old: Any) -> Iterator[_Event]:
        """Every wiki page, compared with the hashes in ``old`` (``{slug: hash}``)."""
        with self._api(f"cannot list the wiki of {project.path}"):
            pages = [p.asdict() for p in self._project_api(project).wikis.list(
                with_content=1, iterator=True, **self._retries)]
        old_hashes = old if isinstance(old, dict) else None
        new: dict[str, str] = {}
        for page in sorted(pages, key=lambda p: str(p.get("slug"))):
            slug = str(page.get("slug"))
            digest = wiki_hash(page)
            if old_hashes is not None and old_hashes.get(slug) == digest:
                new[slug] = digest
                continue
            doc_id = self.wiki_id(project, slug)
            try:
                text = wiki_text(page)
            except ValueError as exc:
                yield "issue", DocumentIssue(doc_id, str(exc), "failed", str(page.get("title")))
                if old_hashes and slug in old_hashes:
                    new[slug] = old_hashes[slug]
                continue
            new[slug] = digest
            yield "doc", Document(
                id=doc_id, source=self.name, source_type=self.source_type,
                title=f"{project.path} wiki: {page.get('title') or slug}", text=text,
                url=f"{project.web_url}/-/wikis/{slug}",
                # the wiki API has no dates: a page's time is when kbsync saw it change
                updated_at=now_utc(), format=wiki_format(page),  # type: ignore[arg-type]
                metadata=wiki_metadata(page, project.path),
            )
        for slug in sorted((old_hashes or {}).keys() - {str(p.get("slug")) for p in pages}):
            yield "delete", self.wiki_id(project, slug)
        return new

    # ---------------------------------------------------------------------- listing

    def list_ids(self) -> Listing:
        """Every document id the source holds now, across projects and parts.

        A project, part or page that cannot be read makes the listing incomplete
        (``complete=False``, reason given), so nothing is deleted on its account.
        """
        ids: set[str] = set()
        try:
            for project, part in self._steps():
                ids |= self._list_part(project, part)
        except (ConnectorError, GitlabError, requests.RequestException) as exc:
            reason = exc.args[0] if isinstance(exc, ConnectorError) else self._message(
                "listing failed", exc)
            return Listing(frozenset(ids), complete=False, reason=str(reason))
        return Listing(frozenset(ids), complete=True)

    def _list_part(self, project: GitLabProject, part: str) -> set[str]:
        if part == "code":
            listing = self._git_connector(project).list_ids()
            if not listing.complete:
                raise ConnectorError(listing.reason)
            return set(listing.ids)
        api = self._project_api(project)
        what = f"cannot list the {part.replace('_', ' ')} of {project.path}"
        with self._api(what):
            if part == "wiki":
                return {self.wiki_id(project, str(p.slug))
                        for p in api.wikis.list(iterator=True, **self._retries)}
            if part == "issues":
                return {self.item_id(project, "issue", i.iid)
                        for i in api.issues.list(iterator=True, per_page=100, **self._retries)
                        if self._listed(i.asdict())}
            return {self.item_id(project, "merge_request", m.iid)
                    for m in api.mergerequests.list(iterator=True, per_page=100, view="simple",
                                                    **self._retries)}

    def _listed(self, issue: dict[str, Any]) -> bool:
        """Whether an issue is indexed at all (not moved away; confidential only if allowed)."""
        if issue.get("moved_to_id"):
            return False
        return self.options.include_confidential or not is_confidential(issue)

    def close(self) -> None:
        for conn in self._git.values():
            conn.close()
        self._git.clear()
        if self._gl is not None:
            self._gl.session.close()
            self._gl = None

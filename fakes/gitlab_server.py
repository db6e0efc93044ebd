"""A small GitLab REST API v4 for tests, served by pytest-httpserver.

It answers what kbsync's GitLab connector asks, shaped like gitlab.com's real
responses (see ``../shared/realdata/gitlab/``: recorded issue pages with their
headers, discussions, fdroid projects and merge requests):

* ``GET /projects/:id`` (numeric id or URL-encoded path), ``GET /groups/:id/projects``
  (``include_subgroups``);
* ``GET /projects/:id/issues`` and ``/merge_requests`` with ``updated_after``,
  ``updated_before`` (both inclusive), ``order_by`` (``created_at``/``updated_at``),
  ``sort``; merge requests also ``view=simple``;
* ``GET /projects/:id/{issues,merge_requests}/:iid/discussions``;
* ``GET /projects/:id/wikis`` (``with_content``).

Every list is paginated the way GitLab does it (``page``, ``per_page`` default 20,
max 100) with ``X-Page``, ``X-Per-Page``, ``X-Total``, ``X-Total-Pages``,
``X-Next-Page``, ``X-Prev-Page`` and a ``Link`` header (``rel="next"``, ``"prev"``,
``"first"``, ``"last"``). Requests need the ``PRIVATE-TOKEN`` header (else 401).
Faults (429 with ``Retry-After``/``RateLimit-Reset``, 5xx) are injected per path.
Every request is recorded in :attr:`GitLabFake.requests`.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode

from werkzeug.wrappers import Request, Response

FIXTURES = Path(__file__).parent / "fixtures" / "gitlab"

_ROUTES = [
    ("project", re.compile(r"^/api/v4/projects/(?P<ref>[^/]+)$")),
    ("items", re.compile(r"^/api/v4/projects/(?P<ref>[^/]+)/(?P<part>issues|merge_requests)$")),
    ("discussions", re.compile(
        r"^/api/v4/projects/(?P<ref>[^/]+)/(?P<part>issues|merge_requests)/(?P<iid>\d+)"
        r"/discussions$")),
    ("wikis", re.compile(r"^/api/v4/projects/(?P<ref>[^/]+)/wikis$")),
    ("group_projects", re.compile(r"^/api/v4/groups/(?P<ref>[^/]+)/projects$")),
]
_SIMPLE_MR_FIELDS = ("id", "iid", "project_id", "title", "description", "state", "created_at",
                     "updated_at", "web_url")


def gitlab_time(dt: datetime) -> str:
    """``2024-04-02T09:15:02.311Z``: GitLab's timestamp spelling (milliseconds, Z)."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def user(username: str, name: str, user_id: int = 99) -> dict[str, Any]:
    """A GitLab user object as it appears in ``author``/``assignees``."""
    return {"id": user_id, "username": username, "public_email": "", "name": name,
            "state": "active", "locked": False, "avatar_url": None,
            "web_url": f"https://gitlab.example.com/{username}"}


@dataclass
class Fault:
    """Answer requests whose path matches ``pattern`` with ``status`` ``times`` times
    (``times=None``: always)."""

    pattern: re.Pattern[str]
    status: int
    times: int | None = 1
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    #: only requests whose query has these parameters
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class Recorded:
    method: str
    path: str
    args: dict[str, str]
    status: int = 0
    at: float = field(default_factory=time.time)  # wall clock when it arrived


class GitLabFake:
    """The fake's state: projects, issues, merge requests, discussions, wiki pages.

    Args:
        httpserver: the ``pytest_httpserver.HTTPServer`` to serve from.
        token: the token requests must carry in ``PRIVATE-TOKEN``.
    """

    def __init__(self, httpserver, token: str = "glpat-FAKE-secret-0123456789") -> None:
        self.server = httpserver
        self.token = token
        self.projects: dict[int, dict[str, Any]] = {}
        self.items: dict[tuple[int, str], dict[int, dict[str, Any]]] = {}
        self.discussions: dict[tuple[int, str, int], list[dict[str, Any]]] = {}
        self.wikis: dict[int, dict[str, dict[str, Any]]] = {}
        self.faults: list[Fault] = []
        self.requests: list[Recorded] = []
        self._next_id = 500_000
        httpserver.expect_request(re.compile(r"^/api/v4/")).respond_with_handler(self._handle)

    @property
    def base_url(self) -> str:
        return self.server.url_for("/").rstrip("/")

    # ------------------------------------------------------------------- set-up

    def add_project(self, project: dict[str, Any], clone_url: str | None = None) -> dict[str, Any]:
        """Serve ``project`` (a ``GET /projects/:id`` object); ``clone_url`` replaces its
        ``http_url_to_repo`` (a ``file://`` URL of a bare repository in tests)."""
        project = copy.deepcopy(project)
        if clone_url is not None:
            project["http_url_to_repo"] = clone_url
        pid = project["id"]
        self.projects[pid] = project
        self.items.setdefault((pid, "issues"), {})
        self.items.setdefault((pid, "merge_requests"), {})
        self.wikis.setdefault(pid, {})
        return project

    def load_fixtures(self, clone_url: str | None = None) -> dict[str, Any]:
        """Serve the project in ``fakes/fixtures/gitlab/`` with its issues, merge
        requests, discussions and wiki; returns the project."""
        project = self.add_project(json.loads((FIXTURES / "project.json").read_text()), clone_url)
        pid = project["id"]
        for part in ("issues", "merge_requests"):
            for item in json.loads((FIXTURES / f"{part}.json").read_text()):
                self.items[(pid, part)][item["iid"]] = item
        for key, discussions in json.loads((FIXTURES / "discussions.json").read_text()).items():
            part, iid = key.split("/")
            self.discussions[(pid, part, int(iid))] = discussions
        for page in json.loads((FIXTURES / "wikis.json").read_text()):
            self.wikis[pid][page["slug"]] = page
        return project

    def add_item(self, pid: int, part: str, iid: int, title: str, *, when: datetime,
                 description: str = "", **fields: Any) -> dict[str, Any]:
        """A new issue or merge request (fields like the fixtures')."""
        self._next_id += 1
        project = self.projects[pid]
        kind = "issues" if part == "issues" else "merge_requests"
        item = {"id": self._next_id, "iid": iid, "project_id": pid, "title": title,
                "description": description, "state": "opened", "created_at": gitlab_time(when),
                "updated_at": gitlab_time(when), "closed_at": None, "labels": [],
                "milestone": None, "author": user("ana", "Ana Petrova", 12), "assignees": [],
                "user_notes_count": 0, "confidential": False,
                "web_url": f"{project['web_url']}/-/{kind}/{iid}", **fields}
        if part == "merge_requests":
            item.pop("confidential")
            item.setdefault("source_branch", f"topic-{iid}")
            item.setdefault("target_branch", project.get("default_branch") or "main")
            item.setdefault("merged_at", None)
        self.items[(pid, part)][iid] = item
        return item

    def add_note(self, pid: int, part: str, iid: int, body: str, *, when: datetime,
                 author: dict[str, Any] | None = None, system: bool = False) -> dict[str, Any]:
        """A new note in its own discussion; the issue/MR's ``updated_at`` becomes ``when``
        (GitLab touches the noteable when a note is added)."""
        self._next_id += 1
        item = self.items[(pid, part)][iid]
        note = {"id": self._next_id, "type": None, "body": body,
                "author": author or user("chen", "Chen Li", 45),
                "created_at": gitlab_time(when), "updated_at": gitlab_time(when),
                "system": system, "noteable_id": item["id"],
                "noteable_type": "Issue" if part == "issues" else "MergeRequest",
                "project_id": pid, "resolvable": False, "confidential": False, "internal": False,
                "noteable_iid": iid, "commands_changes": {}}
        self.discussions.setdefault((pid, part, iid), []).append(
            {"id": f"{self._next_id:040x}", "individual_note": True, "resolvable": False,
             "notes": [note]})
        item["updated_at"] = gitlab_time(when)
        if not system:
            item["user_notes_count"] = item.get("user_notes_count", 0) + 1
        return note

    def delete_item(self, pid: int, part: str, iid: int) -> None:
        self.items[(pid, part)].pop(iid)
        self.discussions.pop((pid, part, iid), None)

    def fail(self, pattern: str, status: int, times: int | None = 1,
             headers: dict[str, str] | None = None, body: Any = None,
             query: dict[str, str] | None = None) -> Fault:
        """Answer requests whose path matches the regex ``pattern`` (and whose query has
        the ``query`` parameters) with ``status``."""
        fault = Fault(re.compile(pattern), status, times, headers or {},
                      body if body is not None else {"message": f"{status} fault injected"},
                      query or {})
        self.faults.append(fault)
        return fault

    def requests_to(self, pattern: str) -> list[Recorded]:
        """The recorded requests whose path matches the regex ``pattern``."""
        regex = re.compile(pattern)
        return [r for r in self.requests if regex.search(r.path)]

    # ----------------------------------------------------------------- serving

    def _json(self, body: Any, status: int = 200, headers: dict[str, str] | None = None
              ) -> Response:
        if isinstance(body, str):  # a raw body, e.g. a proxy's HTML error page
            return Response(body, status=status, headers=headers or {}, content_type="text/html")
        return Response(json.dumps(body), status=status, headers=headers or {},
                        content_type="application/json")

    def _handle(self, request: Request) -> Response:
        raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") or request.path
        path = raw.split("?", 1)[0]
        args = {k: v for k, v in request.args.items()}
        record = Recorded(request.method, path, args)
        self.requests.append(record)
        response = self._respond(request, path, args)
        record.status = response.status_code
        return response

    def _respond(self, request: Request, path: str, args: dict[str, str]) -> Response:
        if self.token and request.headers.get("PRIVATE-TOKEN") != self.token:
            return self._json({"message": "401 Unauthorized"}, 401)
        for fault in self.faults:
            if (fault.times != 0 and fault.pattern.search(path)
                    and all(args.get(k) == v for k, v in fault.query.items())):
                if fault.times is not None:
                    fault.times -= 1
                return self._json(fault.body, fault.status, fault.headers)
        for name, regex in _ROUTES:
            match = regex.match(path)
            if match:
                return getattr(self, f"_{name}")(request, path, args, **match.groupdict())
        return self._json({"error": "404 Not Found"}, 404)

    def _find_project(self, ref: str) -> dict[str, Any] | None:
        ref = unquote(ref)
        for project in self.projects.values():
            if ref in (str(project["id"]), project["path_with_namespace"]):
                return project
        return None

    def _paginate(self, request: Request, path: str, args: dict[str, str],
                  items: list[Any]) -> Response:
        per_page = max(1, min(100, int(args.get("per_page", 20))))
        page = max(1, int(args.get("page", 1)))
        total = len(items)
        pages = max(1, math.ceil(total / per_page))
        chunk = items[(page - 1) * per_page: page * per_page]

        def link(n: int) -> str:
            return f"{self.base_url}{path}?{urlencode({**args, 'page': n, 'per_page': per_page})}"

        headers = {"X-Page": str(page), "X-Per-Page": str(per_page), "X-Total": str(total),
                   "X-Total-Pages": str(pages),
                   "X-Next-Page": str(page + 1) if page < pages else "",
                   "X-Prev-Page": str(page - 1) if page > 1 else ""}
        links = []
        if page < pages:
            links.append(f'<{link(page + 1)}>; rel="next"')
        if page > 1:
            links.append(f'<{link(page - 1)}>; rel="prev"')
        links += [f'<{link(1)}>; rel="first"', f'<{link(pages)}>; rel="last"']
        headers["Link"] = ", ".join(links)
        return self._json(chunk, headers=headers)

    def _project(self, request, path, args, ref):
        project = self._find_project(ref)
        if project is None:
            return self._json({"message": "404 Project Not Found"}, 404)
        return self._json(project)

    def _group_projects(self, request, path, args, ref):
        group = unquote(ref)
        subgroups = args.get("include_subgroups", "false").lower() in ("true", "1")
        found = []
        for project in sorted(self.projects.values(), key=lambda p: p["id"]):
            namespace = project["path_with_namespace"].rsplit("/", 1)[0]
            if namespace == group or (subgroups and namespace.startswith(group + "/")):
                found.append(project)
        if not found and not any(p["path_with_namespace"].startswith(group + "/")
                                 for p in self.projects.values()):
            return self._json({"message": "404 Group Not Found"}, 404)
        return self._paginate(request, path, args, found)

    def _items(self, request, path, args, ref, part):
        project = self._find_project(ref)
        if project is None:
            return self._json({"message": "404 Project Not Found"}, 404)
        items = list(self.items[(project["id"], part)].values())
        if "updated_after" in args:
            after = _parse(args["updated_after"])
            items = [i for i in items if _parse(i["updated_at"]) >= after]
        if "updated_before" in args:
            before = _parse(args["updated_before"])
            items = [i for i in items if _parse(i["updated_at"]) <= before]
        if args.get("state") in ("opened", "closed", "merged"):
            items = [i for i in items if i["state"] == args["state"]]
        order_by = args.get("order_by", "created_at")
        items.sort(key=lambda i: (_parse(i[order_by]), i["id"]),
                   reverse=args.get("sort", "desc") == "desc")
        if part == "merge_requests" and args.get("view") == "simple":
            items = [{k: i.get(k) for k in _SIMPLE_MR_FIELDS} for i in items]
        return self._paginate(request, path, args, items)

    def _discussions(self, request, path, args, ref, part, iid):
        project = self._find_project(ref)
        if project is None or int(iid) not in self.items[(project["id"], part)]:
            return self._json({"message": "404 Not found"}, 404)
        return self._paginate(request, path, args,
                              self.discussions.get((project["id"], part, int(iid)), []))

    def _wikis(self, request, path, args, ref):
        project = self._find_project(ref)
        if project is None:
            return self._json({"message": "404 Project Not Found"}, 404)
        with_content = args.get("with_content", "0").lower() in ("1", "true")
        pages = [dict(p) if with_content else {k: v for k, v in p.items() if k != "content"}
                 for p in self.wikis[project["id"]].values()]
        return self._json(pages)  # the wiki list is not paginated


def days_ago(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)

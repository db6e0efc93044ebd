"""A Jira corpus served locally: the Titanium archive behind Jira's REST paths.

Used by ``benchmarks/ingest.py --corpus jira`` (``benchmarks/corpus_jira.py``) and by the
tests (``tests/test_jira.py``), so the connector is measured and tested against the same
HTTP shapes:

* :func:`load_archive` reads ``../shared/realdata/jira/tidev_jira_archive`` (folders
  and ``.tar.gz`` files, read in memory) into issue JSON (``GET /rest/api/2/issue``
  shape).
* :class:`FakeJira` answers, on a ``pytest_httpserver.HTTPServer``, the paths the
  ``jira`` library calls: ``serverInfo``, ``field``, ``search`` (Server/DC, offset
  pages), ``search/jql`` (Cloud, ``nextPageToken``) and ``issue/{key}/comment`` pages.
  It evaluates the parts of JQL the connector sends (``project = KEY``, ``project in
  (...)``, ``updated >=/<= <epoch ms>``, ``ORDER BY updated|key``) and answers a JQL
  naming a project that does not exist or that the account may not browse
  (``hidden_projects``) with Jira's 400; the user's own filter is a Python predicate. Responses can
  be made to fail (``fail``) and every request is recorded (``calls``).

Only the standard library, werkzeug and pytest-httpserver are needed (the ``dev`` extra).
"""

from __future__ import annotations

import base64
import copy
import json
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ARCHIVE = Path("jira") / "tidev_jira_archive"
#: Projects of the archive: plain folders and tarballs.
ARCHIVE_PROJECTS = ("DAEMON", "MOD", "ALOY", "TIMOB")

_PROJECT = re.compile(r"\bproject\s*(?:=\s*(\"[^\"]*\"|'[^']*'|[\w-]+)|in\s*\(([^)]*)\))",
                      re.I)
_UPDATED_GE = re.compile(r"updated\s*>=\s*(\d+)")
_UPDATED_LE = re.compile(r"updated\s*<=\s*(\d+)")
_ORDER = re.compile(r"order\s+by\s+(.*)$", re.I | re.S)
_KEY_NUMBER = re.compile(r"^(.*)-(\d+)$")


def _ms(value: str) -> int:
    return int(datetime.fromisoformat(value).timestamp() * 1000)


def jira_timestamp(moment: datetime) -> str:
    """``2024-05-01T10:20:30.123+0000``, the way Jira writes ``updated``."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+0000"


def _normalise(issue: dict[str, Any]) -> dict[str, Any]:
    """The archive trimmed some comments but kept ``total``: make ``total`` honest."""
    comment = issue.setdefault("fields", {}).setdefault("comment", {})
    comments = comment.get("comments") or []
    comment.update({"comments": comments, "total": len(comments), "startAt": 0,
                    "maxResults": len(comments)})
    return issue


def _iter_archive(root: Path, project: str) -> Iterator[tuple[str, bytes]]:
    folder = root / project
    if folder.is_dir():
        for path in sorted(folder.glob("*/*.json")):
            yield path.name, path.read_bytes()
        return
    tarballs = sorted(root.glob(f"{project}*.tar.gz"))
    for tarball in tarballs:
        with tarfile.open(tarball) as tar:
            for member in tar:
                name = Path(member.name)
                if member.isfile() and name.suffix == ".json" and name.name != "project.json":
                    handle = tar.extractfile(member)
                    if handle is not None:
                        yield name.name, handle.read()


def load_archive(realdata: Path, projects: Iterable[str] = ARCHIVE_PROJECTS,
                 limit: int | None = None) -> list[dict[str, Any]]:
    """Issues of the Titanium archive (``GET issue`` JSON), ``limit`` per project.

    Raises:
        FileNotFoundError: the archive is not under ``realdata``.
    """
    root = Path(realdata) / ARCHIVE
    if not root.is_dir():
        raise FileNotFoundError(f"Jira archive not found: {root}")
    issues: list[dict[str, Any]] = []
    for project in projects:
        count = 0
        for name, data in _iter_archive(root, project):
            if name == "project.json":
                continue
            issues.append(_normalise(json.loads(data)))
            count += 1
            if limit is not None and count >= limit:
                break
    return issues


@dataclass
class Call:
    """One request the fake answered: its kind (``search``, ``comment``...) and args."""

    kind: str
    path: str
    args: dict[str, list[str]]
    headers: dict[str, str] = field(default_factory=dict)

    def arg(self, name: str) -> str | None:
        values = self.args.get(name)
        return values[0] if values else None


class FakeJira:
    """Jira's REST API over a set of issues, on a ``pytest_httpserver.HTTPServer``.

    Args:
        server: a started HTTPServer (the ``httpserver`` fixture).
        issues: issue JSON in the ``GET issue`` shape, comments inline in
            ``fields.comment.comments``.
        cloud: answer as Jira Cloud (``deploymentType: Cloud``, ``search/jql`` with
            ``nextPageToken``) instead of Server/DC (``search`` with ``startAt``).
        matches: the user's JQL filter, as a predicate over issue JSON.
        inline_comments: how many comments a search result carries inline (Jira keeps
            the rest for ``issue/{key}/comment``).
        max_results_cap: the most issues per page the site returns, whatever is asked.
        auth: the ``Authorization`` header every request must carry (else 401).
        projects: project keys that exist even without issues (a JQL naming any other
            project than these and the issues' is answered with Jira's 400).
    """

    def __init__(self, server, issues: Iterable[dict[str, Any]] = (), *, cloud: bool = False,
                 matches: Callable[[dict[str, Any]], bool] | None = None,
                 inline_comments: int = 50, max_results_cap: int = 1000,
                 auth: str | None = None, fields: list[dict[str, Any]] | None = None,
                 projects: Iterable[str] = ()) -> None:
        from werkzeug import Response

        self._response_cls = Response
        self.server = server
        self.cloud = cloud
        self.matches = matches or (lambda issue: True)
        self.inline_comments = inline_comments
        self.max_results_cap = max_results_cap
        self.auth = auth
        self.field_list = fields if fields is not None else [
            {"id": "summary", "name": "Summary", "custom": False, "clauseNames": ["summary"]},
            {"id": "issuekey", "name": "Key", "custom": False,
             "clauseNames": ["id", "issue", "issuekey", "key"]},
            {"id": "customfield_10008", "name": "Epic Link", "custom": True,
             "clauseNames": ["cf[10008]", "Epic Link"],
             "schema": {"type": "any", "custom": "com.pyxis.greenhopper.jira:gh-epic-link",
                        "customId": 10008}},
        ]
        #: project keys that exist besides those of the issues (a project may be empty)
        self.projects: set[str] = set(projects)
        self.issues: dict[str, dict[str, Any]] = {}
        for issue in issues:
            self.put(issue)
        self.calls: list[Call] = []
        self.faults: dict[str, list[tuple[int, dict[str, str], Any, Any]]] = {}
        #: project keys the account may not browse: a JQL naming one is answered like
        #: one naming a project that does not exist (HTTP 400, "The value 'KEY' does not
        #: exist for the field 'project'."), and their issues are never returned
        self.hidden_projects: set[str] = set()
        self.on_search: Callable[[FakeJira, int], None] | None = None
        server.expect_request(re.compile(r"^/rest/api/[^/]+/.*")).respond_with_handler(
            self._handle)

    @property
    def url(self) -> str:
        return self.server.url_for("").rstrip("/")

    # ------------------------------------------------------------------ the data

    def put(self, issue: dict[str, Any]) -> None:
        """Add or replace an issue (deep-copied)."""
        issue = copy.deepcopy(issue)
        self.issues[issue["key"]] = issue

    def delete(self, key: str) -> None:
        del self.issues[key]

    def add_comment(self, key: str, body: Any, author: str, when: datetime) -> None:
        """Append a comment and move the issue's ``updated`` to ``when``."""
        fields = self.issues[key]["fields"]
        comment = fields.setdefault("comment", {"comments": []})
        stamp = jira_timestamp(when)
        new_id = str(900000 + sum(len(i["fields"].get("comment", {}).get("comments", []))
                                 for i in self.issues.values()))
        comment["comments"].append({
            "id": new_id, "author": {"name": author.lower().replace(" ", ""),
                                     "displayName": author},
            "body": body, "created": stamp, "updated": stamp})
        comment.update(total=len(comment["comments"]), startAt=0,
                       maxResults=len(comment["comments"]))
        fields["updated"] = stamp

    def fail(self, kind: str, status: int, *, times: int = 1,
             headers: dict[str, str] | None = None, body: Any = None,
             match: Callable[[Call], bool] | None = None) -> None:
        """Answer the next ``times`` requests of ``kind`` (that ``match`` accepts, when
        given) with ``status``."""
        self.faults.setdefault(kind, []).extend([(status, headers or {}, body, match)] * times)

    def kinds(self, kind: str) -> list[Call]:
        return [c for c in self.calls if c.kind == kind]

    # ------------------------------------------------------------------ handlers

    def _json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None):
        return self._response_cls(json.dumps(payload), status=status, headers=headers or {},
                                  content_type="application/json;charset=UTF-8")

    def _handle(self, request):
        path = request.path
        rest = re.sub(r"^/rest/api/[^/]+/", "", path)
        if rest == "serverInfo":
            kind = "serverInfo"
        elif rest == "field":
            kind = "field"
        elif rest in ("search", "search/jql"):
            kind = "search"
        elif re.fullmatch(r"issue/[^/]+/comment", rest):
            kind = "comment"
        else:
            kind = rest
        call = Call(kind, path, request.args.to_dict(flat=False), dict(request.headers))
        self.calls.append(call)
        queue = self.faults.get(kind) or []
        fault = next((f for f in queue if f[3] is None or f[3](call)), None)
        if fault is not None:
            queue.remove(fault)
            status, headers, body, _ = fault
            return self._json(body if body is not None else
                              {"errorMessages": [f"injected HTTP {status}"], "errors": {}},
                              status, headers)
        if self.auth is not None and request.headers.get("Authorization") != self.auth:
            return self._json({"errorMessages": ["You are not authenticated."]}, 401)
        if kind == "serverInfo":
            return self._json({
                "baseUrl": self.url, "version": "9.12.0" if not self.cloud else "1001.0.0",
                "versionNumbers": [9, 12, 0] if not self.cloud else [1001, 0, 0],
                "deploymentType": "Cloud" if self.cloud else "Server",
                "buildNumber": 912000, "serverTitle": "Fake Jira"})
        if kind == "field":
            return self._json(self.field_list)
        if kind == "search":
            return self._search(request, path.endswith("/search/jql"))
        if kind == "comment":
            return self._comments(rest.split("/")[1], request)
        return self._json({"errorMessages": [f"no such resource {rest}"]}, 404)

    @staticmethod
    def project_of(issue: dict[str, Any]) -> str:
        """The issue's project key (``fields.project.key``, else the key's prefix)."""
        project = (issue.get("fields") or {}).get("project") or {}
        return project.get("key") or issue["key"].rsplit("-", 1)[0]

    def named_projects(self, jql: str) -> list[str]:
        """The project keys a JQL names (``project = KEY``, ``project in (A, "B")``)."""
        keys: list[str] = []
        for m in _PROJECT.finditer(jql):
            values = [m.group(1)] if m.group(1) else m.group(2).split(",")
            keys += [v.strip().strip("\"'") for v in values if v.strip()]
        return keys

    def select(self, jql: str) -> list[dict[str, Any]]:
        """The issues a JQL of the connector's shape matches, in its order."""
        chosen = [i for i in self.issues.values()
                  if self.matches(i) and self.project_of(i) not in self.hidden_projects]
        if named := self.named_projects(jql):
            chosen = [i for i in chosen if self.project_of(i) in named]
        if m := _UPDATED_GE.search(jql):
            chosen = [i for i in chosen if _ms(i["fields"]["updated"]) >= int(m.group(1))]
        if m := _UPDATED_LE.search(jql):
            chosen = [i for i in chosen if _ms(i["fields"]["updated"]) <= int(m.group(1))]

        def key_order(issue: dict[str, Any]) -> tuple[str, int]:
            m = _KEY_NUMBER.match(issue["key"])
            return (m.group(1), int(m.group(2))) if m else (issue["key"], 0)

        order = _ORDER.search(jql)
        terms = [t.strip().lower() for t in order.group(1).split(",")] if order else []
        for term in reversed(terms):
            name, _, direction = term.partition(" ")
            reverse = direction.strip() == "desc"
            if name == "updated":
                chosen.sort(key=lambda i: _ms(i["fields"]["updated"]), reverse=reverse)
            elif name == "key":
                chosen.sort(key=key_order, reverse=reverse)
        return chosen

    def _view(self, issue: dict[str, Any], fields: list[str]) -> dict[str, Any]:
        out = {"expand": "operations,editmeta,changelog,transitions,renderedFields",
               "id": issue.get("id", "0"), "self": f"{self.url}/rest/api/2/issue/"
               f"{issue.get('id', '0')}", "key": issue["key"]}
        if set(fields) <= {"key", "issuekey", "id"}:
            out["fields"] = {}
            return out
        body = copy.deepcopy(issue["fields"])
        wanted = set(fields) - {"*all", "*navigable"}
        if wanted:
            body = {k: v for k, v in body.items() if k in wanted}
        if "comment" in body:
            comments = body["comment"].get("comments") or []
            body["comment"] = {"comments": comments[: self.inline_comments],
                               "maxResults": self.inline_comments, "total": len(comments),
                               "startAt": 0}
        out["fields"] = body
        return out

    def _search(self, request, cloud_path: bool):
        if cloud_path != self.cloud:
            return self._json({"errorMessages": ["wrong search endpoint for this site"]}, 410)
        jql = request.args.get("jql", "")
        known = (self.projects | {self.project_of(i) for i in self.issues.values()}) - \
            self.hidden_projects
        for key in self.named_projects(jql):
            if key not in known:  # Jira's answer for a missing or unbrowsable project
                return self._json({"errorMessages": [
                    f"The value '{key}' does not exist for the field 'project'."],
                    "warningMessages": []}, 400)
        fields = [f for v in request.args.getlist("fields") for f in v.split(",") if f]
        size = min(int(request.args.get("maxResults", 50)), self.max_results_cap)
        if self.cloud:
            token = request.args.get("nextPageToken")
            start = int(base64.b64decode(token).decode()) if token else 0
        else:
            start = int(request.args.get("startAt", 0))
        if self.on_search is not None:
            self.on_search(self, start)
        chosen = self.select(jql)
        page = [self._view(i, fields or ["*navigable"]) for i in chosen[start:start + size]]
        if self.cloud:
            payload: dict[str, Any] = {"issues": page}
            following = start + len(page)
            if following < len(chosen):
                payload["nextPageToken"] = base64.b64encode(str(following).encode()).decode()
                payload["isLast"] = False
            else:
                payload["isLast"] = True
            return self._json(payload)
        return self._json({"expand": "schema,names", "startAt": start, "maxResults": size,
                           "total": len(chosen), "issues": page})

    def _comments(self, key: str, request):
        issue = self.issues.get(key)
        if issue is None:
            return self._json({"errorMessages": ["Issue does not exist or you do not have "
                                                 "permission to see it."], "errors": {}}, 404)
        comments = issue["fields"].get("comment", {}).get("comments") or []
        start = int(request.args.get("startAt", 0))
        size = min(int(request.args.get("maxResults", 5000)), 100)
        return self._json({"comments": comments[start:start + size], "maxResults": size,
                           "total": len(comments), "startAt": start})


def serve_archive(realdata: Path, projects: Iterable[str] = ARCHIVE_PROJECTS,
                  limit: int | None = None, **kwargs: Any):
    """Start an HTTPServer with a :class:`FakeJira` over the archive; returns
    ``(server, fake)``. Stop it with ``server.stop()``."""
    from pytest_httpserver import HTTPServer

    server = HTTPServer(host="127.0.0.1", port=0)
    server.start()
    fake = FakeJira(server, load_archive(realdata, projects, limit), **kwargs)
    return server, fake

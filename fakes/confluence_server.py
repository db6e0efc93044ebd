"""A Confluence REST API (v1) stand-in on a ``pytest_httpserver.HTTPServer``.

It answers the paths ``atlassian.Confluence`` requests for kbsync —
``rest/api/content/search`` (CQL), ``rest/api/content/{id}``, ``rest/api/space/{key}``
(404 for a space the account may not view, whose content CQL silently leaves out:
``hidden_spaces``), ``rest/api/user``,
``download/attachments/{page}/{file}`` — with bodies shaped like the real ones
(modelled on ``realdata/confluence/perceval_fixtures``: ``results``, ``start``,
``limit``, ``size``, ``_links.base/context/next``; content objects with ``space``,
``version{by,when,number}``, ``history{createdBy,createdDate}``, ``ancestors``,
``body.storage``, ``metadata.labels``, ``extensions`` and ``_expandable`` exactly as far
as ``expand`` asks).

It understands the CQL kbsync sends (``space in (...)``, ``type in (...)``,
``label = ...``, ``lastmodified >=/<= "yyyy-MM-dd HH:mm"`` read in the account's
``user_zone``, ``order by lastmodified|created``) and answers 400 to anything else, and
can behave like the real thing in its awkward ways: auth checks (Cloud basic with an
API token, Server bearer PAT or basic), Data Center's silent ``limit`` cap with a
``_links.next`` that still advances by the limit asked for, Cloud's ``cursor`` links,
and injected faults (429 with ``Retry-After``, 5xx bursts, 403 rate limiting).
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, quote_plus, urlencode
from zoneinfo import ZoneInfo

from werkzeug import Request, Response

EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


def iso(moment: datetime) -> str:
    """Confluence's timestamp format: ``2016-06-16T19:58:30.000Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + \
        f"{moment.microsecond // 1000:03d}Z"


@dataclass
class Content:
    """One piece of content held by the fake site."""

    id: str
    title: str
    space: str
    body: Any = ""
    when: datetime = EPOCH
    version: int = 1
    type: str = "page"
    created: datetime | None = None
    author: str = "u-author"
    modifier: str = "u-author"
    ancestors: list[tuple[str, str]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    container: str | None = None
    data: bytes = b""
    media_type: str | None = None
    omit_body: bool = False


@dataclass
class Fault:
    status: int
    headers: dict[str, str]
    body: str
    path: str
    match: Callable[[dict[str, str]], bool] | None = None


class FakeConfluence:
    """The fake site. Args:

    httpserver: a started ``pytest_httpserver.HTTPServer``.
    context: the context path (``"/wiki"`` on Cloud, ``""`` or ``"/confluence"`` on Server).
    cloud: Cloud-shaped users (``accountId``) and ``cursor`` pagination links.
    auth: ``("basic", user, secret)`` or ``("bearer", token)``; ``None`` = anonymous.
    user_zone: the time zone CQL dates are read in (the querying user's profile zone).
    max_limit: silently cap ``limit`` (Data Center with expanded bodies).
    """

    def __init__(self, httpserver, *, context: str = "", cloud: bool = False,
                 auth: tuple[str, ...] | None = None, user_zone: str = "UTC",
                 max_limit: int | None = None,
                 spaces: dict[str, str] | None = None) -> None:
        self.server = httpserver
        self.context = context.rstrip("/")
        self.cloud = cloud
        self.auth = auth
        self.user_zone = ZoneInfo(user_zone)
        self.max_limit = max_limit
        self.spaces = spaces or {"ENG": "Engineering", "OPS": "Operations"}
        #: spaces the account may not view: ``GET space/{key}`` answers 404 (as for a
        #: space that does not exist) and searches silently leave their content out
        self.hidden_spaces: set[str] = set()
        self.users: dict[str, str] = {"u-author": "Ada Author", "u-editor": "Eddie Editor"}
        self.contents: dict[str, Content] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.faults: deque[Fault] = deque()
        self.on_search: Callable[[int], None] | None = None
        self._lock = threading.Lock()
        self._searches = 0
        httpserver.expect_request(re.compile(r"^/.*")).respond_with_handler(self.handle)

    # ----------------------------------------------------------------- the data

    @property
    def url(self) -> str:
        """The base URL to configure (with the context path)."""
        return self.server.url_for(self.context or "/").rstrip("/")

    def add(self, id: str, title: str, space: str = "ENG", body: Any = "<p>text</p>",
            **kwargs: Any) -> Content:
        content = Content(id=str(id), title=title, space=space, body=body, **kwargs)
        if content.created is None:
            content.created = content.when
        self.contents[content.id] = content
        return content

    def edit(self, id: str, body: Any = None, when: datetime | None = None,
             title: str | None = None, modifier: str = "u-editor") -> Content:
        content = self.contents[str(id)]
        if body is not None:
            content.body = body
        if title is not None:
            content.title = title
        content.version += 1
        content.when = when or content.when + timedelta(hours=1)
        content.modifier = modifier
        return content

    def delete(self, id: str) -> None:
        del self.contents[str(id)]

    def fail(self, status: int, times: int = 1, *, headers: dict[str, str] | None = None,
             body: str | dict | None = None, path: str = "/rest/api/content/search",
             match: Callable[[dict[str, str]], bool] | None = None) -> None:
        """The next ``times`` requests to ``path`` (whose query ``match`` accepts) get
        ``status``."""
        text = body if isinstance(body, str) else json.dumps(
            body or {"statusCode": status, "message": f"fault {status}"})
        for _ in range(times):
            self.faults.append(Fault(status, headers or {}, text, path, match))

    def searches(self) -> list[dict[str, str]]:
        """The query parameters of every search request so far."""
        return [args for path, args in self.requests if path.endswith("/content/search")]

    # ------------------------------------------------------------------ serving

    def _json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None
              ) -> Response:
        return Response(json.dumps(payload), status=status, headers=headers or {},
                        content_type="application/json")

    def _authorized(self, request: Request) -> bool:
        if self.auth is None:
            return True
        header = request.headers.get("Authorization", "")
        if self.auth[0] == "bearer":
            return header == f"Bearer {self.auth[1]}"
        expected = base64.b64encode(f"{self.auth[1]}:{self.auth[2]}".encode()).decode()
        return header == f"Basic {expected}"

    def handle(self, request: Request) -> Response:
        path = request.path
        args = dict(request.args)
        with self._lock:
            self.requests.append((path, args))
        if self.context and path.startswith(self.context + "/"):
            path = path[len(self.context):]
        elif self.context:
            return self._json({"statusCode": 404, "message": "null"}, 404)
        if not self._authorized(request):
            return self._json({"statusCode": 401, "message": "Basic authentication with "
                               "passwords is deprecated or credentials are wrong"}, 401)
        with self._lock:
            fault = next((f for f in self.faults if path.startswith(f.path)
                          and (f.match is None or f.match(args))), None)
            if fault is not None:
                self.faults.remove(fault)
        if fault is not None:
            return Response(fault.body, status=fault.status, headers=fault.headers,
                            content_type="application/json")
        if path == "/rest/api/content/search":
            return self._search(args)
        match = re.fullmatch(r"/rest/api/space/([^/]+)", path)
        if match:
            return self._space(match.group(1))
        match = re.fullmatch(r"/rest/api/content/([^/]+)", path)
        if match:
            content = self.contents.get(match.group(1))
            if content is None:
                return self._json({"statusCode": 404, "message": "No content found"}, 404)
            return self._json(self.content_json(content, _expand(args)))
        if path == "/rest/api/user":
            uid = args.get("key") or args.get("accountId") or args.get("username")
            if uid not in self.users:
                return self._json({"statusCode": 404, "message": "No user found"}, 404)
            return self._json(self.user_json(uid))
        match = re.fullmatch(r"/download/attachments/([^/]+)/(.+)", path)
        if match:
            for content in self.contents.values():
                if content.container == match.group(1) and content.title == match.group(2):
                    return Response(content.data, content_type=content.media_type
                                    or "application/octet-stream")
            return self._json({"statusCode": 404, "message": "not found"}, 404)
        return self._json({"statusCode": 404, "message": f"no route {path}"}, 404)

    def _search(self, args: dict[str, str]) -> Response:
        try:
            keep, order = self._parse_cql(args.get("cql", ""))
        except ValueError as exc:
            return self._json({"statusCode": 400, "data": {"authorized": False, "valid": False},
                               "message": f"Could not parse cql : {exc}"}, 400)
        with self._lock:
            self._searches += 1
            number = self._searches
        if self.on_search is not None:
            self.on_search(number)
        items = sorted((c for c in self.contents.values()
                        if keep(c) and c.space not in self.hidden_spaces), key=order)
        limit = int(args.get("limit", 25))
        if self.cloud and args.get("cursor"):
            start = int(base64.b64decode(args["cursor"]).decode())
        else:
            start = int(args.get("start", 0))
        served = min(limit, self.max_limit) if self.max_limit else limit
        page = items[start:start + served]
        expand = _expand(args)
        base = self.url
        links: dict[str, str] = {"base": base, "context": self.context,
                                 "self": f"{base}/rest/api/content/search?{urlencode(args)}"}
        if start + limit < len(items) or (self.max_limit and start + served < len(items)):
            # Data Center advances start by the limit asked for, even when it served less
            nxt = {k: v for k, v in args.items() if k not in ("start", "cursor")}
            nxt["start"] = str(start + limit)
            if self.cloud:
                nxt["cursor"] = base64.b64encode(str(start + served).encode()).decode()
                nxt["next"] = "true"
            links["next"] = "/rest/api/content/search?" + urlencode(nxt)
        return self._json({"results": [self.content_json(c, expand) for c in page],
                           "start": start, "limit": limit, "size": len(page), "_links": links})

    def _space(self, key: str) -> Response:
        """``GET rest/api/space/{key}``; a space that does not exist or that the account
        may not view is the same 404 (Server/DC's body: ``"No space with key : KEY"``)."""
        known = set(self.spaces) | {c.space for c in self.contents.values()}
        if key not in known or key in self.hidden_spaces:
            return self._json({"statusCode": 404,
                               "data": {"authorized": False, "valid": True, "errors": [],
                                        "successful": False},
                               "message": f"No space with key : {key}",
                               "reason": "Not Found"}, 404)
        base = self.url
        return self._json({"id": 98000 + sorted(known).index(key), "key": key,
                           "name": self.spaces.get(key, key), "type": "global",
                           "status": "current",
                           "_links": {"webui": f"/spaces/{key}", "base": base,
                                      "context": self.context,
                                      "self": f"{base}/rest/api/space/{key}"},
                           "_expandable": {"homepage": "", "description": "",
                                           "metadata": "", "icon": ""}})

    # ----------------------------------------------------------------------- CQL

    def _date(self, text: str) -> datetime:
        return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=self.user_zone)

    def _parse_cql(self, cql: str) -> tuple[Callable[[Content], bool], Callable[[Content], Any]]:
        order: Callable[[Content], Any] = lambda c: (c.when, c.id)  # noqa: E731
        m = re.search(r"\s+order\s+by\s+(\w+)(?:\s+(asc|desc))?\s*$", cql, re.IGNORECASE)
        if m:
            field_name = m.group(1).lower()
            if field_name == "created":
                order = lambda c: (c.created, c.id)  # noqa: E731
            elif field_name != "lastmodified":
                raise ValueError(f"cannot order by {field_name}")
            cql = cql[: m.start()]
        tests: list[Callable[[Content], bool]] = []
        for clause in re.split(r"\s+and\s+", cql.strip(), flags=re.IGNORECASE):
            clause = clause.strip()
            while clause.startswith("(") and clause.endswith(")"):
                clause = clause[1:-1].strip()
            if not clause:
                continue
            m = re.fullmatch(r"(space|type|label)\s+in\s+\((.*)\)", clause, re.IGNORECASE) or \
                re.fullmatch(r"(space|type|label)\s*=\s*(.+)", clause, re.IGNORECASE)
            if m:
                values = {v.strip().strip('"') for v in m.group(2).split(",")}
                key = m.group(1).lower()
                if key == "space":
                    tests.append(lambda c, vs=values: c.space in vs)
                elif key == "type":
                    tests.append(lambda c, vs=values: c.type in vs)
                else:
                    tests.append(lambda c, vs=values: bool(vs & set(c.labels)))
                continue
            m = re.fullmatch(r'lastmodified\s*(>=|<=|>|<)\s*"([^"]+)"', clause, re.IGNORECASE)
            if m:
                bound = self._date(m.group(2))
                op = m.group(1)
                tests.append({
                    ">=": lambda c, b=bound: c.when >= b, "<=": lambda c, b=bound: c.when <= b,
                    ">": lambda c, b=bound: c.when > b, "<": lambda c, b=bound: c.when < b,
                }[op])
                continue
            raise ValueError(clause)
        return (lambda c: all(t(c) for t in tests)), order

    # ------------------------------------------------------------------- shapes

    def user_json(self, uid: str) -> dict[str, Any]:
        name = self.users.get(uid, uid)
        if self.cloud:
            return {"type": "known", "accountId": uid, "accountType": "atlassian",
                    "email": "", "publicName": name, "displayName": name,
                    "profilePicture": {"path": f"/wiki/aa-avatar/{uid}", "width": 48,
                                       "height": 48, "isDefault": False},
                    "_links": {"self": f"{self.url}/rest/api/user?accountId={uid}"}}
        return {"type": "known", "username": uid, "userKey": uid, "displayName": name,
                "profilePicture": {"path": "/s/en_GB/images/icons/profilepics/default.svg",
                                   "width": 48, "height": 48, "isDefault": True},
                "_links": {"self": f"{self.url}/rest/api/user?key={uid}"}}

    def content_json(self, c: Content, expand: set[str]) -> dict[str, Any]:
        base = self.url
        space_name = self.spaces.get(c.space, c.space)
        out: dict[str, Any] = {
            "id": c.id, "type": c.type, "status": "current", "title": c.title,
            "_links": {"webui": f"/display/{c.space}/{quote_plus(c.title)}",
                       "tinyui": f"/x/{c.id}", "self": f"{base}/rest/api/content/{c.id}"},
            "_expandable": {},
        }
        if c.type != "attachment":
            out["extensions"] = {"position": "none"}
        if c.type == "attachment":
            page = self.contents.get(c.container or "")
            out["_links"]["webui"] = (f"/pages/viewpage.action?pageId={c.container}"
                                      f"&preview=%2F{c.container}%2F{c.id}%2F{quote(c.title)}")
            out["_links"]["download"] = (
                f"/download/attachments/{c.container}/{quote(c.title)}?version={c.version}"
                f"&modificationDate={int(c.when.timestamp() * 1000)}&api=v2")
            out["extensions"] = {"mediaType": c.media_type, "fileSize": len(c.data),
                                 "comment": ""}
            out["metadata"] = {"mediaType": c.media_type, "comment": ""}
            if "container" in expand and page is not None:
                out["container"] = {"id": page.id, "type": page.type, "status": "current",
                                    "title": page.title,
                                    "_links": {"webui": f"/display/{page.space}/"
                                               f"{quote_plus(page.title)}"}}
        if "space" in expand:
            out["space"] = {"id": abs(hash(c.space)) % 10**8, "key": c.space, "name": space_name,
                            "type": "global", "status": "current",
                            "_links": {"webui": f"/display/{c.space}",
                                       "self": f"{base}/rest/api/space/{c.space}"},
                            "_expandable": {"homepage": "", "description": ""}}
        else:
            out["_expandable"]["space"] = f"/rest/api/space/{c.space}"
        if "version" in expand:
            out["version"] = {"by": self.user_json(c.modifier), "when": iso(c.when),
                              "message": "", "minorEdit": False, "number": c.version,
                              "_expandable": {"content": f"/rest/api/content/{c.id}"}}
        else:
            out["_expandable"]["version"] = ""
        if "history" in expand:
            out["history"] = {"latest": True, "createdBy": self.user_json(c.author),
                              "createdDate": iso(c.created or c.when),
                              "_links": {"self": f"{base}/rest/api/content/{c.id}/history"},
                              "_expandable": {"lastUpdated": "", "previousVersion": "",
                                              "nextVersion": ""}}
        else:
            out["_expandable"]["history"] = f"/rest/api/content/{c.id}/history"
        if "ancestors" in expand:
            out["ancestors"] = [{"id": aid, "type": "page", "status": "current", "title": t,
                                 "_links": {"webui": f"/display/{c.space}/{quote_plus(t)}"}}
                                for aid, t in c.ancestors]
        else:
            out["_expandable"]["ancestors"] = ""
        if "body.storage" in expand and not c.omit_body and c.type != "attachment":
            out["body"] = {"storage": {"value": c.body, "representation": "storage",
                                       "_expandable": {"content": f"/rest/api/content/{c.id}"}},
                           "_expandable": {"editor": "", "view": "", "export_view": "",
                                           "styled_view": "", "anonymous_export_view": ""}}
        else:
            out["_expandable"]["body"] = ""
        if "metadata.labels" in expand:
            out.setdefault("metadata", {})["labels"] = {
                "results": [{"prefix": "global", "name": lab, "id": str(abs(hash(lab)) % 10**6),
                             "label": lab} for lab in c.labels],
                "start": 0, "limit": 200, "size": len(c.labels), "_links": {}}
        return out


def _expand(args: dict[str, str]) -> set[str]:
    return {e.strip() for e in args.get("expand", "").split(",") if e.strip()}


def tiny_pdf(text: str) -> bytes:
    """A one-page PDF whose page shows ``text`` (Helvetica), small and valid enough for
    pypdf's text extraction."""
    stream = f"BT /F1 18 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream +
        b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, obj in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + obj + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
            ).encode()
    return bytes(out)

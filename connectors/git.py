"""Any git repository as a source (GitPython): files at a commit, incremental by diff.

* The *cursor* is ``{"commit": <sha>}``, the last commit synced.
* First run (no cursor): every eligible tracked file at the branch head.
* Later runs: ``git diff --no-renames <cursor> <head>``: added/modified files become
  documents, deleted files become deletions; a rename is a deletion plus an addition.
* Files are read from git objects, never from a working tree, so uncommitted edits in
  a local checkout are not indexed.
* Binary files (a NUL byte in the first 8,000 bytes, git's own heuristic), files over
  ``max_file_bytes``, text that is not UTF-8, symlinks and empty files are *skipped*
  with a recorded reason; if they were indexed before, their chunks are removed.

A clone URL is cloned bare under ``<data_dir>/git/<source>.git`` and fetched on each
run. An HTTPS token is handed to git through ``GIT_CONFIG_*`` environment variables
(``http.extraHeader: Authorization: Basic ...``, git >= 2.31), so it never appears in
a command line, a remote URL on disk, a log line or an error message.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pathspec import PathSpec
from pydantic import Field, SecretStr

if TYPE_CHECKING:  # GitPython is imported where it is used: reading the settings stays cheap
    import git

from connectors.base import (
    Checkpoint,
    ConnectorError,
    Document,
    DocumentIssue,
    FetchRequest,
    Listing,
    Page,
    SourceOptions,
    redact,
    reveal,
)

log = logging.getLogger(__name__)

#: File extension -> programming language name (the names of
#: ``langchain_text_splitters.Language`` where one exists).
LANGUAGE_BY_EXTENSION: dict[str, str] = {
    ".py": "python", ".pyi": "python", ".js": "js", ".mjs": "js", ".cjs": "js", ".jsx": "js",
    ".ts": "ts", ".tsx": "ts", ".java": "java", ".kt": "kotlin", ".kts": "kotlin",
    ".go": "go", ".rs": "rust", ".rb": "ruby", ".php": "php", ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp", ".cs": "csharp",
    ".scala": "scala", ".swift": "swift", ".lua": "lua", ".pl": "perl", ".pm": "perl",
    ".hs": "haskell", ".ex": "elixir", ".exs": "elixir", ".ps1": "powershell", ".r": "r",
    ".sol": "sol", ".proto": "proto", ".html": "html", ".htm": "html", ".tex": "latex",
    ".rst": "rst", ".sh": "shell", ".bash": "shell", ".sql": "sql", ".yaml": "yaml",
    ".yml": "yaml", ".toml": "toml", ".json": "json", ".xml": "xml", ".css": "css",
    ".scss": "css", ".vue": "js", ".dockerfile": "dockerfile", ".tf": "terraform",
    ".ini": "ini", ".cfg": "ini", ".gradle": "kotlin", ".m": "objective-c", ".dart": "dart",
}
MARKDOWN_EXTENSIONS = {".md", ".markdown", ".mdx", ".mdown"}
#: Languages that are configuration/data rather than code; chunked as plain text.
PLAIN_LANGUAGES = {"yaml", "toml", "json", "xml", "ini", "css", "sql", "shell", "terraform",
                   "dockerfile", "objective-c", "dart"}
SPECIAL_FILENAMES = {"dockerfile": "dockerfile", "makefile": "make", "jenkinsfile": "groovy"}

#: git's binary heuristic: a NUL byte in the first 8,000 bytes (xdiff-interface.c).
BINARY_SNIFF_BYTES = 8000
#: Git's file mode of a submodule entry (a gitlink): https://git-scm.com/docs/gitsubmodules
SUBMODULE_MODE = 0o160000
#: Metadata that changes with every commit of a file (``Document.version_fields``).
VERSION_FIELDS = frozenset({"last_commit", "last_commit_date", "size_bytes"})


def classify_path(path: str) -> tuple[str, str | None]:
    """Return ``(format, language)`` for a repository path.

    ``format`` is ``"markdown"``, ``"code"`` or ``"text"``; ``language`` is the
    language name for code and configuration files, else ``None``.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in MARKDOWN_EXTENSIONS:
        return "markdown", "markdown"
    language = LANGUAGE_BY_EXTENSION.get(suffix) or SPECIAL_FILENAMES.get(p.name.lower())
    if language is None:
        return "text", None
    if language in PLAIN_LANGUAGES or language in {"make", "groovy"}:
        return "text", language
    return "code", language


class GitSourceOptions(SourceOptions):
    """Settings of one git source (``flows.settings.GitSource`` adds ``type`` and
    ``schedule``)."""

    url: str = Field(description="local path or clone URL (https://, ssh://, file://)")
    branch: str | None = None
    include: list[str] = Field(default_factory=lambda: ["**"])
    exclude: list[str] = Field(default_factory=list)
    max_file_bytes: int = Field(1_000_000, ge=1)
    token: SecretStr | None = Field(None, description="HTTPS token, e.g. ${GITLAB_TOKEN}")
    username: str = Field("oauth2", description="HTTPS user that goes with the token")
    web_url: str | None = Field(
        None, description="document URL template: {path}, {commit}, {branch}")
    page_size: int = Field(100, ge=1, le=10_000)


class GitConnector:
    """A git repository at a local path or a clone URL.

    Args:
        options: the source's settings.
        data_dir: kbsync's data directory; clones live in ``<data_dir>/git/``.
        clone_dir: where to clone instead (GitLab keeps one per project).
        id_prefix: put between ``<name>:`` and the path in document ids
            (``"group/app:code:"``), so a source that holds several repositories
            (GitLab) keeps their ids apart.

    Raises:
        ConnectorError: the repository cannot be opened, cloned or fetched, or the
            branch does not exist. Messages never contain the token.
    """

    source_type = "git"

    def __init__(self, options: GitSourceOptions, data_dir: Path | None = None, *,
                 clone_dir: Path | None = None, id_prefix: str = "") -> None:
        self.options = options
        self._clone_dir = clone_dir
        self._id_prefix = id_prefix
        self.name = options.name
        self._data_dir = Path(data_dir) if data_dir else Path(".kbsync")
        self._include = PathSpec.from_lines("gitwildmatch", options.include or ["**"])
        self._exclude = PathSpec.from_lines("gitwildmatch", options.exclude or [])
        self._repo: git.Repo | None = None
        #: directory trees of one commit already parsed: ``(commit sha, folder) -> Tree``
        self._trees: dict[tuple[str, str], git.Tree] = {}
        #: the blobs of the last planned diff, by path (no tree lookup to read them)
        self._blobs: dict[str, git.Blob] = {}

    # ----------------------------------------------------------------- repository

    @property
    def is_remote(self) -> bool:
        url = self.options.url
        return "://" in url or (url.count(":") == 1 and "@" in url.split(":")[0])

    def _git_env(self) -> dict[str, str]:
        env = {"GIT_TERMINAL_PROMPT": "0"}
        token = reveal(self.options.token)
        if token:
            basic = base64.b64encode(f"{self.options.username}:{token}".encode()).decode()
            env.update(
                GIT_CONFIG_COUNT="1",
                GIT_CONFIG_KEY_0="http.extraHeader",
                GIT_CONFIG_VALUE_0=f"Authorization: Basic {basic}",
            )
        return env

    def _error(self, what: str, exc: Exception) -> ConnectorError:
        import git

        basic, token = None, reveal(self.options.token)
        if token:
            basic = base64.b64encode(f"{self.options.username}:{token}".encode()).decode()
        detail = str(exc.stderr if isinstance(exc, git.GitCommandError) else exc).strip()
        message = redact(f"{what}: {detail}", [token, basic])
        return ConnectorError(f"git source {self.name!r}: {message}")

    def repo(self) -> git.Repo:
        """Open (local) or clone/fetch (remote) the repository; cached per connector."""
        import git

        if self._repo is not None:
            return self._repo
        if self.is_remote:
            clone_dir = self._clone_dir or self._data_dir / "git" / f"{self.name}.git"
            safe_url = redact(self.options.url)
            try:
                if (clone_dir / "HEAD").exists():
                    repo = git.Repo(clone_dir)
                    with repo.git.custom_environment(**self._git_env()):
                        repo.git.fetch(
                            self.options.url, "+refs/heads/*:refs/heads/*", "--prune", "--force"
                        )
                else:
                    clone_dir.parent.mkdir(parents=True, exist_ok=True)
                    log.info("cloning %s into %s", safe_url, clone_dir)
                    repo = git.Repo.clone_from(
                        self.options.url, clone_dir, bare=True, env=self._git_env()
                    )
            except (git.GitCommandError, git.InvalidGitRepositoryError, OSError) as exc:
                raise self._error(f"cannot clone or fetch {safe_url}", exc) from None
        else:
            path = Path(self.options.url).expanduser()
            try:
                repo = git.Repo(path, search_parent_directories=False)
            except (git.NoSuchPathError, git.InvalidGitRepositoryError) as exc:
                raise ConnectorError(
                    f"git source {self.name!r}: {path} is not a git repository ({type(exc).__name__})"
                ) from None
        self._repo = repo
        return repo

    def head(self) -> git.Commit:
        """The commit to sync: the configured branch's head, else the repository HEAD."""
        import git

        repo = self.repo()
        ref = self.options.branch
        try:
            if ref:
                return repo.commit(ref if ref in repo.heads else f"refs/heads/{ref}")
            return repo.head.commit
        except (git.BadName, ValueError, git.GitCommandError) as exc:
            what = f"branch {ref!r} not found" if ref else "the repository has no commits"
            raise self._error(what, exc) from None

    def _commit(self, sha: str) -> git.Commit | None:
        """The commit ``sha`` if the repository has it (GitPython resolves lazily, so
        existence is checked with ``git cat-file -e``), else ``None``."""
        import git

        try:
            self.repo().git.cat_file("-e", f"{sha}^{{commit}}")
            return self.repo().commit(sha)
        except (git.BadName, ValueError, git.GitCommandError):
            return None

    # --------------------------------------------------------------------- reading

    def eligible(self, path: str) -> bool:
        """Whether ``path`` passes the include globs and none of the exclude globs."""
        return self._include.match_file(path) and not self._exclude.match_file(path)

    def _doc_id(self, path: str) -> str:
        return f"{self.name}:{self._id_prefix}{shown_path(path)}"

    def _tree_paths(self, commit: git.Commit) -> list[str]:
        out = self.repo().git.ls_tree("-r", "-z", "--name-only", commit.hexsha)
        return sorted(p for p in out.split("\0") if p and self.eligible(p))

    def _last_commits(self, commit: git.Commit, paths: set[str]) -> dict[str, tuple[str, int]]:
        """``path -> (sha, unix time)`` of the last commit touching each path.

        One streamed ``git log --name-only -z`` walk from ``commit`` that stops as soon
        as every path is found (output: ``\x01<sha> <time>\0\n<path>\0<path>\0...``).
        """
        found: dict[str, tuple[str, int]] = {}
        if not paths:
            return found
        proc = self.repo().git.log(
            "--name-only", "-z", "--no-renames", "--format=%x01%H %ct", commit.hexsha,
            as_process=True,
        )
        current: tuple[str, int] | None = None
        try:
            for token in _nul_tokens(proc.stdout):
                token = token.lstrip("\n")
                if token.startswith("\x01"):
                    sha, _, ts = token[1:].partition(" ")
                    current = (sha, int(ts))
                elif token and current and token in paths and token not in found:
                    found[token] = current
                    if len(found) == len(paths):
                        break
        finally:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.proc.kill()
            proc.proc.wait() if proc.proc is not None else None
        return found

    def _entry(self, commit: git.Commit, path: str) -> git.Blob | git.Tree | git.Submodule:
        """``commit.tree / path``, remembering the folder's tree: GitPython parses every
        tree object on the way on each lookup, so reading the files of one folder would
        parse it once per file. Only the last commit's trees are kept.

        Raises:
            KeyError: nothing at ``path`` in ``commit``.
        """
        folder, _, name = path.rpartition("/")
        key = (commit.hexsha, folder)
        tree = self._trees.get(key)
        if tree is None:
            if any(sha != commit.hexsha for sha, _ in self._trees):
                self._trees.clear()
            tree = commit.tree / folder if folder else commit.tree
            self._trees[key] = tree
        return tree / name

    def _read(self, commit: git.Commit, path: str) -> tuple[bytes | None, DocumentIssue | None]:
        doc_id, shown = self._doc_id(path), shown_path(path)
        try:
            obj = self._blobs.get(path) or self._entry(commit, path)
        except KeyError:
            return None, DocumentIssue(doc_id, "not found at the commit", "failed", shown)
        if obj.type != "blob":
            return None, DocumentIssue(doc_id, f"not a file ({obj.type})", "skipped", shown)
        if obj.mode == 0o120000:
            return None, DocumentIssue(doc_id, "symbolic link", "skipped", shown)
        if obj.size > self.options.max_file_bytes:
            return None, DocumentIssue(
                doc_id,
                f"over the size limit ({obj.size} bytes > {self.options.max_file_bytes})",
                "skipped",
                shown,
            )
        data = obj.data_stream.read()
        if b"\0" in data[:BINARY_SNIFF_BYTES]:
            return None, DocumentIssue(doc_id, "binary file", "skipped", shown)
        return data, None

    def _document(self, commit: git.Commit, path: str, data: bytes,
                  last: tuple[str, int] | None) -> Document | DocumentIssue:
        doc_id, shown = self._doc_id(path), shown_path(path)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return DocumentIssue(doc_id, f"not valid UTF-8 (byte {exc.start})", "skipped", shown)
        text = text.removeprefix("\ufeff")
        if not text.strip():
            return DocumentIssue(doc_id, "empty file", "skipped", shown)
        last_sha, last_ts = last if last else (commit.hexsha, commit.committed_date)
        fmt, language = classify_path(path)
        return Document(
            id=doc_id,
            source=self.name,
            source_type=self.source_type,
            title=shown,
            text=text,
            url=self._url(path, last_sha),
            updated_at=datetime.fromtimestamp(last_ts, UTC),
            format=fmt,
            language=language,
            metadata={
                "path": shown,
                "language": language or "text",
                "last_commit": last_sha,
                "last_commit_date": datetime.fromtimestamp(last_ts, UTC),
                "size_bytes": len(data),
            },
            version_fields=VERSION_FIELDS,
        )

    def _url(self, path: str, commit_sha: str) -> str:
        if self.options.web_url:
            branch = self.options.branch or ""
            return self.options.web_url.format(path=shown_path(path), commit=commit_sha,
                                               branch=branch)
        if self.is_remote:
            return f"{redact(self.options.url)}#{shown_path(path)}"
        # as_uri percent-encodes the file name's bytes, undecodable ones included
        return Path(self.options.url).expanduser().resolve().joinpath(path).as_uri()

    # -------------------------------------------------------------------- protocol

    def _plan(self, request: FetchRequest, target: git.Commit) -> list[tuple[str, str]]:
        """The sorted work list ``[(path, "read" | "delete")]`` for a request. A diff's
        blobs at ``target`` are remembered for :meth:`_read` (``self._blobs``)."""
        self._blobs = {}
        repo = self.repo()
        if request.is_backfill:
            args = ["--name-only", "-z", "--no-renames", "--format=", target.hexsha]
            args.insert(0, f"--since={request.since.isoformat()}")
            if request.until:
                args.insert(0, f"--until={request.until.isoformat()}")
            touched = {p.strip("\n") for p in repo.git.log(*args).split("\0") if p.strip("\n")}
            at_target = set(self._tree_paths(target))
            return sorted(
                (p, "read" if p in at_target else "delete")
                for p in touched if self.eligible(p)
            )
        base = self._commit(request.cursor["commit"]) if request.cursor else None
        if request.cursor and base is None:
            log.warning("git source %r: cursor commit %s is gone; reading every file",
                        self.name, request.cursor["commit"])
        if base is None:
            return [(p, "read") for p in self._tree_paths(target)]
        import git

        plan: dict[str, str] = {}
        for status, path, sha, mode in self._changes(base, target):
            if status == "D":
                plan[path] = "delete"
            else:
                plan[path] = "read"
                if mode != SUBMODULE_MODE:  # a submodule's "blob" is a commit
                    self._blobs[path] = git.Blob(repo, bytes.fromhex(sha), mode, path)
        return sorted((p, action) for p, action in plan.items() if self.eligible(p))

    def _changes(self, base: git.Commit,
                 target: git.Commit) -> Iterator[tuple[str, str, str, int]]:
        """``(status, path, blob sha at target, mode at target)`` of every file that
        differs between two commits (``status``: ``A``, ``M``, ``D``, ``T``): ``git
        diff-tree -r -z --no-renames --raw`` read as bytes, a path's undecodable bytes
        kept as surrogates like every other path here (:func:`shown_path`).

        Not ``Commit.diff``: GitPython decodes that output strictly as UTF-8, and on a
        file name that is not it drops the whole diff in its reader thread, with no
        error to the caller (GitPython 3.1, ``git.diff.Diff._handle_diff_line``), so every
        change of the range would be missed. Raw format:
        https://git-scm.com/docs/git-diff-tree#_raw_output_format
        """
        out = self.repo().git.diff_tree("-r", "-z", "--no-renames", "--raw", "--full-index",
                                        base.hexsha, target.hexsha, stdout_as_string=False)
        tokens = out.split(b"\0")
        for header, raw_path in zip(tokens[0::2], tokens[1::2], strict=False):
            # ":<mode before> <mode after> <sha before> <sha after> <status>"
            _, mode, _, sha, status = header.decode("ascii").lstrip(":").split(" ")
            yield status[:1], raw_path.decode("utf-8", "surrogateescape"), sha, int(mode, 8)

    def fetch(self, request: FetchRequest, checkpoint: Checkpoint | None = None) -> Iterator[Page]:
        """Yield the changed files as pages of at most ``page_size`` entries.

        The checkpoint is ``{"target": <sha>, "offset": <entries done>}``; a resumed run
        continues towards the same target commit even if the branch moved meanwhile.
        """
        if checkpoint and checkpoint.get("target"):
            target = self._commit(checkpoint["target"]) or self.head()
            offset = int(checkpoint.get("offset", 0))
        else:
            target, offset = self.head(), 0
        plan = self._plan(request, target)
        size = max(1, self.options.page_size)
        reads = {p for p, action in plan if action == "read"}
        last_commits = self._last_commits(target, reads) if reads else {}
        if offset >= len(plan):  # nothing changed, or resumed after the last page
            yield Page(checkpoint={"target": target.hexsha, "offset": len(plan)},
                       cursor={"commit": target.hexsha})
            return
        for start in range(offset, len(plan), size):
            page = Page()
            for path, action in plan[start:start + size]:
                if action == "delete":
                    page.deletions.append(self._doc_id(path))
                    continue
                data, issue = self._read(target, path)
                result = issue or self._document(target, path, data, last_commits.get(path))
                if isinstance(result, Document):
                    page.documents.append(result)
                else:
                    page.issues.append(result)
            end = min(start + size, len(plan))
            page.checkpoint = {"target": target.hexsha, "offset": end}
            if end >= len(plan):
                page.cursor = {"commit": target.hexsha}
            yield page

    def list_ids(self) -> Listing:
        """Every eligible path at the branch head, as document ids (``ls-tree``)."""
        import git

        try:
            paths = self._tree_paths(self.head())
        except (ConnectorError, git.GitCommandError) as exc:
            return Listing(frozenset(), complete=False, reason=str(exc))
        return Listing(frozenset(self._doc_id(p) for p in paths), complete=True)

    def close(self) -> None:
        if self._repo is not None:
            self._repo.close()
            self._repo = None



def shown_path(path: str) -> str:
    """``path`` as kbsync shows and stores it: a file name's bytes that are not UTF-8
    (an old repository's CP1251 or Latin-1 names), which git hands over as they are and
    Python keeps as lone surrogates (``surrogateescape``, PEP 383), written as ``\\xNN``
    (``café.md`` in Latin-1 -> ``caf\\xe9.md``). Unique per path, so documents, their
    deletions and the reconciliation listing agree on the id; a UTF-8 path is returned
    as it is. Git operations keep the path as read."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _nul_tokens(stream, chunk_size: int = 65536) -> Iterator[str]:
    """Split a byte stream on NUL bytes, decoding each token (undecodable bytes kept)."""
    buffer = b""
    for block in iter(lambda: stream.read(chunk_size), b""):
        buffer += block
        *tokens, buffer = buffer.split(b"\0")
        for token in tokens:
            yield token.decode("utf-8", "surrogateescape")
    if buffer:
        yield buffer.decode("utf-8", "surrogateescape")

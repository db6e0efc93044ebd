"""transforms/storage_format.py: Confluence storage format -> Markdown-like text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

from tests.conftest import REALDATA
from transforms.attachments import AttachmentTextError, attachment_kind, attachment_text
from transforms.storage_format import (
    MAX_DEPTH,
    StorageFormatError,
    mentioned_users,
    storage_to_markdown,
)

FIXTURES = Path(__file__).parent / "fixtures" / "confluence"
CWIKI = REALDATA / "confluence" / "apache_cwiki_storage_pages"
USER_KEY = "8aa980874ebf4c1f0151629839801275"


@pytest.fixture(scope="module")
def macros_page() -> str:
    text = (FIXTURES / "macros_page.xhtml").read_text(encoding="utf-8")
    return storage_to_markdown(text, users={USER_KEY: "Jun Rao"})


def test_headings_lists_and_inline_marks(macros_page):
    assert "# Release process" in macros_page.splitlines()
    assert "## Steps" in macros_page.splitlines()
    assert "1. Create the **release branch** from `trunk`:" in macros_page
    assert "2. Vote on the mailing list\n   - needs *three* binding +1 votes\n" \
           "   - lasts ~~48~~ 72 hours" in macros_page


def test_code_macro_keeps_language_title_and_cdata_verbatim(macros_page):
    assert ("   **Branch**\n   ```bash\n   git checkout -b release-3.7 origin/trunk\n"
            '   if [ "$A" -lt 2 ] && true; then echo "<ok>"; fi\n   ```') in macros_page
    assert "```\nKAFKA_HEAP_OPTS=-Xmx1G\n```" in macros_page  # noformat: no language
    assert "linenumbers" not in macros_page and "true\n" not in macros_page


def test_callouts_expand_details_and_unknown_macros_keep_their_text(macros_page):
    assert ("> **Info:** Before you start\n>\n> Read the [[Release Checklist|checklist]] "
            "and the [[Committer Guide]].") in macros_page
    assert "> **Warning:** Never push to the release tag twice." in macros_page
    assert "**Old procedure**\n\nWe used to tag by hand." in macros_page
    assert "| Owner | Release manager |" in macros_page  # details (page properties)
    assert "Text inside an unknown macro survives." in macros_page
    assert "red" not in macros_page  # a macro parameter is configuration, not text


def test_tables_become_markdown_tables(macros_page):
    assert ("| Version | Status |\n| --- | --- |\n| 3.7 | [RELEASED] |\n"
            "| a \\| b<br>next line |  |") in macros_page


def test_task_lists_links_mentions_and_small_macros(macros_page):
    assert "- [x] Update [[notes.txt]]" in macros_page
    assert "- [ ] Announce on [the mailing list](https://kafka.apache.org/contact)" in macros_page
    assert "Owner: @Jun Rao" in macros_page
    assert "Tracked in KAFKA-1234 and drawn here:" in macros_page
    assert "[diagram: release-flow]" in macros_page
    assert "![release flow](flow.png)" in macros_page


def test_navigation_layout_emoticons_and_placeholders_are_dropped(macros_page):
    assert "maxLevel" not in macros_page and "3\n" not in macros_page.split("#")[0]
    assert "smile" not in macros_page
    assert "Type here" not in macros_page
    assert macros_page.startswith("# Release process")  # toc + layout wrappers left nothing
    assert "\n\n\n" not in macros_page and macros_page == macros_page.strip()


def test_unknown_user_and_plain_text_bodies():
    body = ('<p>Ping <ac:link><ri:user ri:account-id="557058:abc" /></ac:link></p>'
            '<ac:structured-macro ac:name="markdown"><ac:plain-text-body><![CDATA[* raw *md*]]>'
            '</ac:plain-text-body></ac:structured-macro>')
    assert storage_to_markdown(body) == "Ping @user\n\n* raw *md*"
    assert mentioned_users(body) == {("account-id", "557058:abc")}
    assert mentioned_users(f'<ri:user ri:userkey="{USER_KEY}" />') == {("userkey", USER_KEY)}


def test_empty_and_malformed_bodies():
    assert storage_to_markdown("") == ""
    assert storage_to_markdown("  \n") == ""
    assert storage_to_markdown('<ac:structured-macro ac:name="toc" />') == ""
    with pytest.raises(StorageFormatError, match="not storage-format text"):
        storage_to_markdown(None)  # type: ignore[arg-type]
    with pytest.raises(StorageFormatError, match="not storage-format text"):
        storage_to_markdown({"value": "<p>x</p>"})  # type: ignore[arg-type]
    deep = "<div>" * (MAX_DEPTH + 10) + "x" + "</div>" * (MAX_DEPTH + 10)
    with pytest.raises(StorageFormatError, match="nest deeper"):
        storage_to_markdown(deep)
    # unbalanced markup is repaired, not rejected
    assert storage_to_markdown("<p>open <strong>bold</p><p>next") == "open **bold**\n\nnext"


def test_pre_blocks_fence_longer_than_their_backticks():
    out = storage_to_markdown("<pre>a\n```\nb</pre>")
    assert out == "````\na\n```\nb\n````"


def test_attachment_text_kinds():
    assert attachment_kind("Notes.MD") == ".md"
    assert attachment_kind("report", "application/pdf; charset=binary") == ".pdf"
    assert attachment_kind("photo.png", "image/png") is None
    assert attachment_text("a.csv", b"x,y\n1,2\n") == ("x,y\n1,2\n", "text")
    assert attachment_text("a.html", b"<h2>T</h2><p>body</p>") == ("## T\n\nbody", "markdown")
    with pytest.raises(AttachmentTextError, match="UTF-8"):
        attachment_text("a.txt", b"caf\xe9")
    with pytest.raises(AttachmentTextError, match="unreadable PDF"):
        attachment_text("a.pdf", b"%PDF-1.4 not really")


# ---------------------------------------------------------------- real pages


def _cwiki_pages() -> list[dict]:
    pages = []
    for name in ("kafka", "flink", "airflow"):
        pages += json.loads((CWIKI / f"{name}_pages.json").read_text(encoding="utf-8"))
    return pages


def _words(text: str) -> str:
    return "".join(re.findall(r"\w+", text.lower()))


def _visible_text(soup: BeautifulSoup) -> str:
    """The words a reader sees (macro parameters and dropped macros aside); destructive."""
    for node in soup.find_all("ac:structured-macro"):
        if node.get("ac:name") in ("toc", "children", "attachments", "view-file",
                                   "create-from-template", "detailssummary", "jira"):
            node.decompose()
    return soup.get_text(" ", strip=True)


@pytest.mark.realdata
def test_all_450_apache_pages_convert():
    """No exception, no empty output for a page with text, every code block's first line
    and every heading (outside tables and lists) kept, no storage markup left."""
    pages = _cwiki_pages()
    assert len(pages) == 450
    problems: list[str] = []
    for page in pages:
        body = page["body_html"]
        out = storage_to_markdown(body)  # must not raise
        label = f"{page['space_key']}/{page['title']}"
        soup = BeautifulSoup(body, "html.parser")
        for node in soup.find_all("ac:parameter"):
            node.decompose()
        for macro in soup.find_all("ac:structured-macro", attrs={"ac:name": ["code", "noformat"]}):
            plain = macro.find("ac:plain-text-body")
            lines = [ln.replace("\u00a0", " ").strip()
                     for ln in (plain.get_text() if plain else "").splitlines()]
            lines = [ln for ln in lines if ln]
            if lines and lines[0] not in out:
                problems.append(f"{label}: code line lost: {lines[0][:60]!r}")
        headings = [_words(re.sub(r"\](\((?:https?:|mailto:|/)[^)]*\))", "]", ln))  # no URLs
                    for ln in out.splitlines() if re.match(r"^(?:> )?#{1,6} ", ln)]
        for h in soup.find_all(re.compile(r"^h[1-6]$")):
            if h.find_parent(["table", "ul", "ol", "ac:task-list"]):
                continue  # flattened into a table cell or list item on purpose
            words = _words(h.get_text())
            if words and not any(words in line for line in headings):
                problems.append(f"{label}: heading lost: {words[:60]!r}")
        if "<ac:" in out or "<ri:" in out:
            problems.append(f"{label}: storage markup leaked into the text")
        if _visible_text(soup) and not out.strip():
            problems.append(f"{label}: empty output for a page with text")
    assert not problems, "\n".join(problems[:30])

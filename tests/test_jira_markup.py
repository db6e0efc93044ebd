"""transforms/jira_markup.py: Jira wiki markup and ADF -> Markdown (pure functions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REALDATA
from transforms.jira_markup import (
    adf_to_markdown,
    comment_heading,
    issue_markdown,
    to_markdown,
    wiki_to_markdown,
)

FIXTURES = Path(__file__).parent / "fixtures" / "jira"


def test_code_and_noformat_blocks_are_copied_verbatim():
    body = ("Before\r\n{code:java}\r\nif (a*b*c > 0) { x = [y|z]; }\r\n\r\n  indented();\r\n"
            "{code}\r\nmiddle {noformat}raw *text* {{x}}{noformat} after")
    out = wiki_to_markdown(body)
    assert "```java\nif (a*b*c > 0) { x = [y|z]; }\n\n  indented();\n```" in out
    assert "```\nraw *text* {{x}}\n```" in out
    assert out.startswith("Before\n") and out.endswith("after")


@pytest.mark.parametrize("params, fence", [
    ("javascript", "```javascript"),
    ("lang=js|title=app.js", "app.js:\n```js"),
    ("title=index.xml|borderStyle=solid", "index.xml:\n```\n"),
    ("JavaScript|title:app.js", "app.js:\n```javascript"),
    ("none", "```\n"),
])
def test_code_block_parameters(params, fence):
    assert fence in wiki_to_markdown("{code:" + params + "}\nx = 1\n{code}")


def test_code_containing_backtick_fences_gets_a_longer_fence():
    out = wiki_to_markdown("{code}\nMarkdown: ```py\nprint()\n```\n{code}")
    assert out.startswith("````\n") and out.endswith("\n````")


def test_headings_with_offset_and_lists():
    out = wiki_to_markdown("h1. Title\nh3.NoSpace\n* one\n** nested *bold*\n# first\n#* mixed\n"
                           "- dash", heading_offset=2)
    assert out.split("\n") == ["### Title", "##### NoSpace", "- one", "  - nested **bold**",
                               "1. first", "   - mixed", "- dash"]
    assert wiki_to_markdown("h6. deep", heading_offset=3) == "###### deep"


def test_links_mentions_attachments_and_images():
    out = wiki_to_markdown("See [the docs|https://example.com/a_b?x=1], [https://plain.example], "
                           "[~jdoe], [~accountid:5b10ac8d], [^trace.log], [PLAT-12], "
                           "[the ticket|PLAT-13] and !screen.png|thumbnail! but [WARN] and "
                           "list[0] stay. Hello! World!")
    assert "[the docs](https://example.com/a_b?x=1)" in out
    assert "<https://plain.example>" in out
    assert "@jdoe" in out and "@5b10ac8d" in out and "trace.log" in out
    assert "PLAT-12" in out and "the ticket (PLAT-13)" in out and "[PLAT-12]" not in out
    assert "![](screen.png)" in out
    assert "[WARN]" in out and "list[0]" in out and "Hello! World!" in out


def test_tables_become_markdown_tables():
    out = wiki_to_markdown("Intro\n||Platform||Link||\n|iOS|[docs|http://d.example/x]|\n"
                           "|Android|{{7.0 | 8.0}}|\nafter")
    assert out.split("\n") == [
        "Intro", "", "| Platform | Link |", "| --- | --- |",
        "| iOS | [docs](http://d.example/x) |", "| Android | `7.0 | 8.0` |", "", "after"]


def test_quotes_monospace_bold_escapes_and_dropped_macros():
    out = wiki_to_markdown("{quote}He said *no*.\nTwice.{quote}\nbq. short one\n"
                           "{{a*b*c}} is *bold* but snake_case_name and 2*3*4 are not; "
                           r"\*literal\* \[x|y\] " "{color:red}red{color}\n----\n"
                           "{panel:title=Note}inside{panel}")
    lines = out.split("\n")
    assert "> He said **no**." in lines and "> Twice." in lines and "> short one" in lines
    assert "`a*b*c` is **bold** but snake_case_name and 2*3*4 are not; *literal* [x|y] red" \
        in out
    assert "---" in lines and "**Note**" in lines and "inside" in lines
    assert "{color" not in out and "{panel" not in out and "{quote}" not in out


def test_code_block_inside_a_quote_keeps_the_quote_prefix():
    out = wiki_to_markdown("{quote}look:\n{code}\na = 1\n{code}\n{quote}")
    assert "> ```\n> a = 1\n> ```" in out


def test_private_use_characters_in_input_do_not_break_placeholders():
    out = wiki_to_markdown("odd \ue0001\ue001 text {{x}}")
    assert out == "odd 1 text `x`"


def test_empty_and_none():
    assert wiki_to_markdown(None) == wiki_to_markdown("") == ""
    assert adf_to_markdown(None) == "" and to_markdown(None) == ""


def test_adf_document_keeps_code_links_tables_and_lists():
    issue = json.loads((FIXTURES / "cloud_issues_adf.json").read_text())[0]
    out = adf_to_markdown(issue["fields"]["description"], heading_offset=2)
    assert "#### What happens" in out
    assert "Uploads over **5 GB** fail; see [the S3 limits](https://docs.example.com/s3-limits)." \
        in out
    assert "@Maria Lopez" in out
    assert "```python\nclient.upload_file(path, bucket, key)\n# raises EntityTooLarge\n```" in out
    assert "- switch to multipart uploads\n- chunk size 64 MB\n  1. measure first" in out
    assert "| Size | Result |\n| --- | --- |\n| 4 GB | ok |\n| 6 GB | EntityTooLarge |" in out
    assert "Do not raise the proxy limit." in out
    assert "text of an unknown node" in out  # an unknown node keeps its words


def test_adf_marks_and_inline_nodes():
    doc = {"type": "doc", "version": 1, "content": [{"type": "paragraph", "content": [
        {"type": "text", "text": "a", "marks": [{"type": "em"}]},
        {"type": "hardBreak"},
        {"type": "text", "text": "b", "marks": [{"type": "strike"}]},
        {"type": "text", "text": " x|y", "marks": [{"type": "code"}]},
        {"type": "emoji", "attrs": {"shortName": ":smile:", "text": "😄"}},
        {"type": "inlineCard", "attrs": {"url": "https://example.com/PLAT-1"}},
        {"type": "status", "attrs": {"text": "BLOCKED"}},
        {"type": "date", "attrs": {"timestamp": "1714521600000"}},
    ]}, {"type": "blockquote", "content": [{"type": "paragraph", "content": [
        {"type": "text", "text": "quoted"}]}]},
        {"type": "rule"},
        {"type": "taskList", "content": [{"type": "taskItem", "attrs": {"state": "DONE"},
                                          "content": [{"type": "text", "text": "done"}]}]}]}
    out = adf_to_markdown(doc)
    assert out == ("*a*\n~~b~~` x|y`😄https://example.com/PLAT-1[BLOCKED]2024-05-01\n\n"
                   "> quoted\n\n---\n\n- [x] done")


def test_adf_rejects_non_objects():
    with pytest.raises(TypeError):
        adf_to_markdown(["not", "a", "doc"])  # type: ignore[arg-type]


def test_issue_markdown_sections_and_comment_headings():
    issue = json.loads((FIXTURES / "server_issues.json").read_text())[0]
    comments = issue["fields"]["comment"]["comments"]
    out = issue_markdown(issue["fields"], comments, [("Type", "Bug"), ("Epic", None)])
    assert out.startswith("Type: Bug\n\n## Description\n\n#### Symptoms\n")  # h2 + 2
    assert "## Comments\n\n### Alex Kim, 2024-04-03 09:00 UTC\n\nThe in-memory token store" in out
    assert "### Maria Lopez, 2024-04-10 16:40 UTC (edited 2024-04-10 16:44 UTC)" in out
    assert "```java\nTokenStore store = TokenStore.inMemory();" in out
    assert "| 2.3.1 | fails |" in out and "[the runbook](https://wiki.example.com/runbooks/" in out
    assert "Epic" not in out.split("\n")[0]


def test_issue_with_empty_description_has_no_description_section():
    issue = json.loads((FIXTURES / "server_issues.json").read_text())[1]
    out = issue_markdown(issue["fields"], issue["fields"]["comment"]["comments"])
    assert "## Description" not in out
    assert out.startswith("## Comments\n\n### Jun Chen, 2024-04-12 10:00 UTC")
    assert issue_markdown({"description": ""}, []) == ""


def test_comment_heading_uses_utc_and_falls_back_to_account():
    assert comment_heading({"author": {"accountId": "5b10"},
                            "created": "2018-05-24T23:35:30.742+0200"}) == \
        "5b10, 2018-05-24 21:35 UTC"
    assert comment_heading({}) == "unknown"


@pytest.mark.realdata
def test_real_lucene_issue_converts_every_comment():
    path = REALDATA / "jira" / "lucene_single_issues" / "LUCENE-8227.json"
    issue = json.loads(path.read_text())
    comments = issue["fields"]["comment"]["comments"]
    out = issue_markdown(issue["fields"], comments)
    assert out.count("\n### ") == len(comments) == 41
    # every code block of the description and comments is closed
    fences = [ln for ln in out.split("\n") if ln.lstrip("> ").startswith("```")]
    assert len(fences) % 2 == 0

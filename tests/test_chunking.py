"""transforms/chunking.py: token budgets, structure, stable ids (real tokenizer)."""

from __future__ import annotations

import pytest

from tests.conftest import long_markdown
from transforms.chunking import ChunkingConfig, chunk_document, chunk_id, split_text
from transforms.context import context_lines, document_name, lexical_text, without_context_line


@pytest.fixture(scope="module")
def counter(embedder):
    return embedder.count_tokens


@pytest.fixture(scope="module")
def config(embedder):
    return ChunkingConfig(max_tokens=embedder.max_text_tokens, overlap_tokens=32)


def test_every_chunk_fits_the_model(embedder, counter, config):
    text = long_markdown(sections=10, paragraphs=4)
    chunks = chunk_document("d", text, fmt="markdown", title="handbook.md", config=config,
                            counter=counter)
    assert len(chunks) > 10
    assert max(counter(c.text) for c in chunks) <= embedder.max_text_tokens
    # and the model really keeps it all: tokens with specials fit max_seq_length
    assert max(len(embedder.model.tokenizer(c.text)["input_ids"]) for c in chunks) \
        <= embedder.max_seq_length


def test_markdown_keeps_heading_path_and_code_indentation(counter, config):
    text = (
        "# Guide\n\nIntro.\n\n## Install\n\nRun this:\n\n```python\ndef f():\n"
        "    return 1\n```\n\n## Use\n\nCall it.\n"
    )
    chunks = chunk_document("d", text, fmt="markdown", title="guide.md", config=config,
                            counter=counter)
    by_heading = {c.heading: c for c in chunks}
    assert set(by_heading) == {"Guide", "Guide > Install", "Guide > Use"}
    install = by_heading["Guide > Install"].text
    assert install.startswith("guide > Install\n\n")  # document name > nearest heading
    assert "def f():\n    return 1" in install  # indentation survives, code stays with its prose
    assert "Run this:" in install


def test_code_is_split_by_language(counter):
    functions = "\n\n".join(
        f"def function_{i}(value):\n    \"\"\"Compute result {i}.\"\"\"\n"
        f"    total = value * {i} + {i * 7}\n    return total - {i}\n" for i in range(40)
    )
    config = ChunkingConfig(max_tokens=120, overlap_tokens=0)
    pieces = split_text(functions, fmt="code", language="python", config=config, counter=counter,
                        title="m.py")
    assert len(pieces) > 3
    bodies = [text.split("\n\n", 1)[1] for _, text in pieces]
    # every piece starts at a function boundary, never in the middle of one
    assert all(b.lstrip().startswith("def function_") for b in bodies)


def test_unchanged_sections_keep_their_chunk_ids(counter, config):
    text = long_markdown(sections=8, paragraphs=3)
    before = chunk_document("doc", text, fmt="markdown", title="t", config=config, counter=counter)
    edited = text.replace("Paragraph 1 about caching in section 3.",
                          "Paragraph 1 about caching in section 3, rewritten entirely.")
    assert edited != text
    after = chunk_document("doc", edited, fmt="markdown", title="t", config=config, counter=counter)
    changed = {c.id for c in after} - {c.id for c in before}
    assert 1 <= len(changed) <= 2
    assert len(after) == len(before)


def test_chunk_ids_depend_on_document_and_occurrence():
    assert chunk_id("a", "same") != chunk_id("b", "same")
    assert chunk_id("a", "same", 0) != chunk_id("a", "same", 1)
    assert chunk_id("a", "same") == chunk_id("a", "same")


def test_repeated_text_gets_distinct_ids(counter):
    text = "\n\n".join(["Same boilerplate paragraph."] * 3 + ["Other."])
    config = ChunkingConfig(max_tokens=16, overlap_tokens=0)
    chunks = chunk_document("d", text, config=config, counter=counter)
    assert len({c.id for c in chunks}) == len(chunks)
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_empty_text_has_no_chunks(counter, config):
    assert chunk_document("d", "  \n\n ", config=config, counter=counter) == []


def test_long_unbroken_token_run_is_kept_not_lost(counter):
    blob = "x" * 3000  # no separators at all
    config = ChunkingConfig(max_tokens=64, overlap_tokens=0)
    pieces = split_text(blob, fmt="text", language=None, config=config, counter=counter)
    assert "".join(text for _, text in pieces) == blob


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="max_tokens"):
        ChunkingConfig(max_tokens=4)
    with pytest.raises(ValueError, match="overlap_tokens"):
        ChunkingConfig(max_tokens=100, overlap_tokens=60)


# ------------------------------------------------ short embedded line, full lexical text

DEEP = ("# Backups\n\nWhy backups matter.\n\n## Restore\n\nRestoring takes a while.\n\n"
        "### From S3\n\nCopy the snapshot from the bucket, then run the restore command.\n")


def test_embedded_line_is_name_and_nearest_heading_lexical_text_has_it_all(counter, config):
    title = "docs/admin/backup-restore.md"
    chunks = chunk_document("d", DEEP, fmt="markdown", title=title, config=config,
                            counter=counter)
    deepest = next(c for c in chunks if c.heading == "Backups > Restore > From S3")
    assert deepest.text == ("backup-restore > From S3\n\n"
                            "Copy the snapshot from the bucket, then run the restore command.")
    assert lexical_text(deepest.text, {"title": title, "heading": deepest.heading}) == (
        "docs/admin/backup-restore.md > Backups > Restore > From S3\n\n"
        "Copy the snapshot from the bucket, then run the restore command.")
    # the first section: name and its own heading; no heading at all: the name alone
    assert chunks[0].text.startswith("backup-restore > Backups\n\n")
    plain = chunk_document("d", "Just text.", title="notes/todo.txt", config=config,
                           counter=counter)
    assert plain[0].text == "todo\n\nJust text."
    assert lexical_text(plain[0].text, {"title": "notes/todo.txt", "heading": ""}) == \
        "notes/todo.txt\n\nJust text."


def test_document_name_shortens_paths_only():
    assert document_name("guide/doc_source/s3-bucket-policies.md") == "s3-bucket-policies"
    assert document_name("Makefile") == "Makefile"
    assert document_name("src/Makefile") == "Makefile"
    assert document_name("PROJ-12: Backups fail at night") == "PROJ-12: Backups fail at night"
    assert document_name("Release notes 2.1") == "Release notes 2.1"  # not an extension
    assert document_name("") == ""


def test_lexical_text_strips_whichever_fallback_line_the_chunk_has(counter):
    # a heading too long for a third of the budget: the line falls back to the name
    long_heading = "Configuring " + " ".join(f"option{i}" for i in range(60))
    text = f"# {long_heading}\n\nSet the options.\n"
    config = ChunkingConfig(max_tokens=120, overlap_tokens=0)
    [chunk] = chunk_document("d", text, fmt="markdown", title="cfg.md", config=config,
                             counter=counter)
    assert chunk.text == "cfg\n\nSet the options."
    assert context_lines("cfg.md", long_heading) == [f"cfg > {long_heading}", long_heading, "cfg"]
    meta = {"title": "cfg.md", "heading": long_heading}
    assert lexical_text(chunk.text, meta) == f"cfg.md > {long_heading}\n\nSet the options."
    # a text that starts with no context line is kept whole (no title, no heading)
    assert without_context_line("Body\n\nmore", "", "") == "Body\n\nmore"
    assert lexical_text("Body\n\nmore", {}) == "Body\n\nmore"


def test_a_renamed_outer_heading_gives_new_ids_for_unchanged_embedded_text(counter, config):
    before = chunk_document("d", DEEP, fmt="markdown", title="b.md", config=config,
                            counter=counter)
    after = chunk_document("d", DEEP.replace("# Backups", "# Backup and restore"),
                           fmt="markdown", title="b.md", config=config, counter=counter)
    assert [c.text for c in before][1:] == [c.text for c in after][1:]  # embedded: same
    # ...but the lexical index must learn the new heading, so the chunks are rewritten
    assert not {c.id for c in before} & {c.id for c in after}


# ------------------------------------------------ chunking version 3: fewer tokens, same words

MARKUP = (
    "# Tables and Data<a name=\"AppendixSampleTables\"></a>\n\n"
    "The guide uses sample tables in DynamoDB\\. See *PostedBy\\-Message\\-Index* \\(a GSI\\)\\.\n\n"
    "| Name | Value |\n| --- | --- |\n| a \\| b | `x\\_y` |\n\n"
    "```\nC:\\\\data\\_dir <a name=\"kept\"></a>\n```\n\n"
    "## Install {#install}\n\nRun it\\.\n"
)


def test_markup_with_no_words_is_dropped_and_code_is_kept(counter, config):
    chunks = chunk_document("d", MARKUP, fmt="markdown", title="guide.md", config=config,
                            counter=counter)
    assert [c.heading for c in chunks] == ["Tables and Data", "Tables and Data > Install"]
    first, second = chunks[0].text, chunks[1].text
    assert first.startswith("guide > Tables and Data\n\n")
    assert "in DynamoDB. See *PostedBy-Message-Index* (a GSI)." in first  # escapes dropped
    assert "| a \\| b | `x\\_y` |" in first  # a table's escaped pipe and inline code kept
    assert "```\nC:\\\\data\\_dir <a name=\"kept\"></a>\n```" in first  # code block untouched
    assert "AppendixSampleTables" not in first  # the heading's empty anchor is gone
    assert second == "guide > Install\n\nRun it."  # no {#id}, no escape


def test_overlap_only_where_a_cut_falls_inside_a_block(counter):
    config = ChunkingConfig(max_tokens=80, overlap_tokens=24)
    paragraphs = [f"Paragraph {i}: service {i} uses bucket {i}." for i in range(30)]
    long_block = " ".join(f"Sentence {i} of the long paragraph explains step {i}."
                          for i in range(30))
    text = "\n\n".join([*paragraphs, long_block])
    bodies = [body for _, body in split_text(text, fmt="text", language=None, config=config,
                                             counter=counter)]
    packed = [b for b in bodies if b.startswith("Paragraph")]
    cut = [b for b in bodies if b.startswith("Sentence") or "of the long" in b]
    assert len(packed) >= 3 and len(cut) >= 3
    # whole paragraphs are packed with none repeated across a cut between them
    assert [p for b in packed for p in b.split("\n\n")] == paragraphs
    # the long paragraph's pieces repeat text across each cut inside it: each starts
    # with words the one before it ends with
    for before, after in zip(cut, cut[1:], strict=False):
        assert " ".join(after.split()[:4]) in before
    assert sum(len(b.split()) for b in cut) > len(long_block.split())


def test_a_language_langchain_does_not_cut_is_cut_as_text(counter):
    # Language.PERL is a member of langchain's enum with no separators (it raises)
    perl = "\n\n".join(f"sub handler_{i} {{\n    my ($x) = @_;\n    return $x * {i};\n}}"
                       for i in range(40))
    config = ChunkingConfig(max_tokens=64, overlap_tokens=8)
    pieces = split_text(perl, fmt="code", language="perl", config=config, counter=counter,
                        title="lib/Handlers.pm")
    assert len(pieces) > 3
    assert all(counter(text) <= 64 for _, text in pieces)
    assert "".join(text.split("\n\n", 1)[1] for _, text in pieces).count("sub handler_") == 40

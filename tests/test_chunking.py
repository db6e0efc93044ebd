"""transforms/chunking.py: token budgets, structure, stable ids (real tokenizer)."""

from __future__ import annotations

import pytest

from tests.conftest import long_markdown
from transforms.chunking import ChunkingConfig, chunk_document, chunk_id, split_text


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
    assert install.startswith("guide.md > Guide > Install\n\n")
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

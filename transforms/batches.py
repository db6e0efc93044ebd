"""The unit of work handed from chunking to embedding and writing: a :class:`ChunkBatch`.

A batch says everything one page of a sync changes in the index: chunks to embed and
add, chunks whose metadata changes (their vectors are kept), and chunk ids to delete.
In the embedded default the sync applies it in-process (``flows.embed.apply_batch``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ChunkBatch:
    """Changes to the index from one page.

    Attributes:
        add_ids, add_texts, add_metadatas: new chunks (parallel lists), to embed and add.
        update_ids, update_metadatas: stored chunks whose metadata is replaced.
        delete_ids: chunk ids to delete.
        delete_doc_ids: documents removed entirely (deleted at the source, or no longer
            eligible): every chunk of theirs goes, also rows only the lexical index has.
        source: the source the batch belongs to (for logs and staging names).
    """

    source: str = ""
    add_ids: list[str] = field(default_factory=list)
    add_texts: list[str] = field(default_factory=list)
    add_metadatas: list[dict[str, Any]] = field(default_factory=list)
    update_ids: list[str] = field(default_factory=list)
    update_metadatas: list[dict[str, Any]] = field(default_factory=list)
    delete_ids: list[str] = field(default_factory=list)
    delete_doc_ids: list[str] = field(default_factory=list)

    def add(self, chunk_id: str, text: str, metadata: dict[str, Any]) -> None:
        self.add_ids.append(chunk_id)
        self.add_texts.append(text)
        self.add_metadatas.append(metadata)

    def update(self, chunk_id: str, metadata: dict[str, Any]) -> None:
        self.update_ids.append(chunk_id)
        self.update_metadatas.append(metadata)

    @property
    def empty(self) -> bool:
        return not (self.add_ids or self.update_ids or self.delete_ids or self.delete_doc_ids)

"""The unit of work handed from chunking to embedding and writing: a :class:`ChunkBatch`,
and its Arrow form for handing it to another machine.

A batch says everything one page of a sync changes in the index: chunks to embed and
add, chunks whose metadata changes (their vectors are kept), and chunk ids to delete.
In the embedded default the sync applies it in-process (``flows.embed.apply_batch``).
With ``embedding.mode: remote`` the sync writes it as a Parquet file (this module's
:data:`BATCH_SCHEMA`, written by ``connectors.staging``) and the ``embed`` deployment
on the GPU work pool reads it back.

The Arrow form is one row per operation (Parquet layout:
https://arrow.apache.org/docs/python/parquet.html):

======== ============ ===================== ===========================================
op       id           text                  metadata
======== ============ ===================== ===========================================
add      chunk id     chunk text            chunk metadata as a JSON object
update   chunk id     null                  new chunk metadata as a JSON object
delete   chunk id     null                  null
delete_doc document id null                 null
======== ============ ===================== ===========================================

and the schema's key-value metadata carries ``kbsync.batch.version``, ``source`` and
``model`` (the embedding model identity the chunks were sized for; the embed flow
refuses a batch for another model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

#: Version of the Arrow layout below; readers refuse other versions.
BATCH_FORMAT_VERSION = "1"
OPS = ("add", "update", "delete", "delete_doc")

BATCH_SCHEMA = pa.schema(
    [
        pa.field("op", pa.string(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("metadata", pa.string()),
    ],
    metadata={"kbsync.batch.version": BATCH_FORMAT_VERSION},
)


class BatchFormatError(ValueError):
    """A table is not a kbsync batch of a version this code reads."""


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
        model: the embedding model identity the batch is meant for ("" = unchecked).
    """

    source: str = ""
    add_ids: list[str] = field(default_factory=list)
    add_texts: list[str] = field(default_factory=list)
    add_metadatas: list[dict[str, Any]] = field(default_factory=list)
    update_ids: list[str] = field(default_factory=list)
    update_metadatas: list[dict[str, Any]] = field(default_factory=list)
    delete_ids: list[str] = field(default_factory=list)
    delete_doc_ids: list[str] = field(default_factory=list)
    model: str = ""

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

    def extend(self, other: ChunkBatch) -> None:
        """Append ``other``'s changes (another page of the same source; pages of one
        batch must not share documents)."""
        self.add_ids += other.add_ids
        self.add_texts += other.add_texts
        self.add_metadatas += other.add_metadatas
        self.update_ids += other.update_ids
        self.update_metadatas += other.update_metadatas
        self.delete_ids += other.delete_ids
        self.delete_doc_ids += other.delete_doc_ids


def batch_to_table(batch: ChunkBatch) -> pa.Table:
    """The batch as an Arrow table of :data:`BATCH_SCHEMA` (one row per operation, in the
    order add, update, delete, delete_doc). Metadata values must be JSON scalars."""
    ops: list[str] = []
    ids: list[str] = []
    texts: list[str | None] = []
    metas: list[str | None] = []

    def put(op: str, ident: str, text: str | None, meta: dict[str, Any] | None) -> None:
        ops.append(op)
        ids.append(ident)
        texts.append(text)
        metas.append(None if meta is None else json.dumps(meta, ensure_ascii=False))

    for cid, text, meta in zip(batch.add_ids, batch.add_texts, batch.add_metadatas, strict=True):
        put("add", cid, text, meta)
    for cid, meta in zip(batch.update_ids, batch.update_metadatas, strict=True):
        put("update", cid, None, meta)
    for cid in batch.delete_ids:
        put("delete", cid, None, None)
    for doc_id in batch.delete_doc_ids:
        put("delete_doc", doc_id, None, None)
    schema = BATCH_SCHEMA.with_metadata({**BATCH_SCHEMA.metadata,
                                         b"source": batch.source.encode(),
                                         b"model": batch.model.encode()})
    return pa.Table.from_pydict({"op": ops, "id": ids, "text": texts, "metadata": metas},
                                schema=schema)


def table_to_batch(table: pa.Table) -> ChunkBatch:
    """The :class:`ChunkBatch` an Arrow table of :data:`BATCH_SCHEMA` holds.

    Raises:
        BatchFormatError: another layout version, missing columns, an unknown ``op``,
            or an ``add`` row without text.
    """
    meta = table.schema.metadata or {}
    version = meta.get(b"kbsync.batch.version", b"").decode()
    if version != BATCH_FORMAT_VERSION:
        raise BatchFormatError(f"not a kbsync batch of format version {BATCH_FORMAT_VERSION} "
                               f"(found version {version or 'none'})")
    missing = [name for name in BATCH_SCHEMA.names if name not in table.column_names]
    if missing:
        raise BatchFormatError(f"batch lacks column(s) {', '.join(missing)}")
    batch = ChunkBatch(source=meta.get(b"source", b"").decode(),
                       model=meta.get(b"model", b"").decode())
    columns = table.select(BATCH_SCHEMA.names).to_pydict()
    for row, (op, ident, text, metadata) in enumerate(
            zip(columns["op"], columns["id"], columns["text"], columns["metadata"],
                strict=True)):
        if op == "add":
            if text is None:
                raise BatchFormatError(f"row {row}: add of {ident!r} has no text")
            batch.add(ident, text, json.loads(metadata) if metadata else {})
        elif op == "update":
            batch.update(ident, json.loads(metadata) if metadata else {})
        elif op == "delete":
            batch.delete_ids.append(ident)
        elif op == "delete_doc":
            batch.delete_doc_ids.append(ident)
        else:
            raise BatchFormatError(f"row {row}: unknown op {op!r} (known: {', '.join(OPS)})")
    return batch

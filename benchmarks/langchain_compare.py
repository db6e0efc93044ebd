"""kbsync's sync against LangChain's indexing API on the same documents, model and Chroma.

The referee of issue 12's "no more embedding work than the peer" target. In one run, on
the same AWS documentation pages (``--files``, default 300, the sample ``ingest.py``
takes), the same all-MiniLM-L6-v2 (loaded once, shared) and the same embedded Chroma
version (a collection each, cosine space):

* **LangChain**: ``RecursiveCharacterTextSplitter.from_huggingface_tokenizer`` (the
  model's own tokenizer, ``--lc-chunk-tokens`` 200 / ``--lc-overlap`` 30 tokens), then
  ``langchain_core.indexing.index()`` with an ``InMemoryRecordManager`` and
  ``cleanup="incremental"`` (``source_id_key="source"``, SHA-256 keys), into a minimal LangChain
  ``VectorStore`` over a chromadb collection (``langchain-chroma`` is not a dependency
  here; ours adds with the caller's ids and deletes by id, as ``index()`` needs);
* **kbsync**: the real ``sync-source`` flow over a git repository of the same files.

For each: full-sync seconds, chunks, tokens embedded (the model's tokens in the embedded
texts), mean tokens per chunk; then a no-op re-run (seconds, chunks embedded). The
model load and the Prefect server start are outside every figure. The sides run one after
the other: on a shared machine, run both orders (``--kbsync-first``). Retrieval quality
is ``retrieval.py``'s job.

    .venv/bin/python benchmarks/langchain_compare.py [--files 300]

API relied on: https://python.langchain.com/api_reference/core/indexing/
langchain_core.indexing.api.index.html (``index`` calls ``vector_store.add_documents(docs,
ids=..., batch_size=...)`` and ``vector_store.delete(ids)``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    DEFAULT_REALDATA,
    aws_corpus,
    commit_repo,
    corpus_files,
    pick,
    print_table,
    run_flow,
    settings_for,
    warm_up_prefect,
    write_json,
)


def langchain_side(files: dict[str, Path], embedder, path: Path, chunk_tokens: int,
                   overlap: int) -> dict[str, Any]:
    """Split and ``index()`` the files twice (full, then no-op); returns the figures."""
    import chromadb
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.indexing import InMemoryRecordManager, index
    from langchain_core.vectorstores import VectorStore
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    class SharedModel(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return embedder.encode(texts).tolist()

        def embed_query(self, text: str) -> list[float]:
            return embedder.encode([text], kind="query")[0].tolist()

    class ChromaCollection(VectorStore):
        """Adds (with the given ids) and deletes in one chromadb collection."""

        def __init__(self, collection, embeddings: Embeddings) -> None:
            self.col, self.emb = collection, embeddings

        def add_texts(self, texts, metadatas=None, *, ids=None, **kwargs: Any) -> list[str]:
            texts = list(texts)
            if texts:
                self.col.upsert(ids=ids, embeddings=self.emb.embed_documents(texts),
                                documents=texts, metadatas=metadatas)
            return ids

        def delete(self, ids=None, **kwargs: Any) -> bool:
            if ids:
                self.col.delete(ids=list(ids))
            return True

        def similarity_search(self, query: str, k: int = 4, **kwargs: Any):
            raise NotImplementedError("not used by index()")

        @classmethod
        def from_texts(cls, texts, embedding, metadatas=None, **kwargs: Any):
            raise NotImplementedError("not used by index()")

    client = chromadb.PersistentClient(path=str(path))
    col = client.create_collection("langchain", embedding_function=None,
                                   configuration={"hnsw": {"space": "cosine"}})
    store = ChromaCollection(col, SharedModel())
    manager = InMemoryRecordManager(namespace="chroma/langchain")
    manager.create_schema()
    splitter = RecursiveCharacterTextSplitter.from_huggingface_tokenizer(
        embedder.model.tokenizer, chunk_size=chunk_tokens, chunk_overlap=overlap)

    def run() -> tuple[dict[str, int], float, list[Document]]:
        start = time.perf_counter()
        docs = [Document(page_content=p.read_text(encoding="utf-8", errors="replace"),
                         metadata={"source": rel}) for rel, p in files.items()]
        chunks = splitter.split_documents(docs)
        result = index(chunks, manager, store, cleanup="incremental", source_id_key="source",
                       key_encoder="sha256")
        return result, time.perf_counter() - start, chunks

    full, full_s, chunks = run()
    tokens = sum(embedder.count_tokens(c.page_content) for c in chunks)
    noop, noop_s, _ = run()
    return {"full_sync_s": round(full_s, 2), "chunks": full["num_added"],
            "tokens_embedded": tokens, "noop_s": round(noop_s, 2),
            "noop_chunks_embedded": noop["num_added"] + noop["num_updated"]}


def kbsync_side(files: dict[str, Path], work: Path) -> dict[str, Any]:
    """The real sync flow, full then no-op."""
    commit_repo(files, work / "repo")
    settings = settings_for(work / "repo", work / "data")
    full, full_s = run_flow(settings, "aws")
    noop, noop_s = run_flow(settings, "aws")
    return {"full_sync_s": round(full_s, 2), "chunks": full["chunks_embedded"],
            "tokens_embedded": full["tokens_embedded"], "noop_s": round(noop_s, 2),
            "noop_chunks_embedded": noop["chunks_embedded"],
            "stages_s": full["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--lc-chunk-tokens", type=int, default=200)
    parser.add_argument("--lc-overlap", type=int, default=30)
    parser.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA)
    parser.add_argument("--kbsync-first", action="store_true",
                        help="run kbsync's side first (the machine's load drifts: run both orders)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from flows.settings import Settings
    from transforms.embedding import load_embedder

    work = Path(tempfile.mkdtemp(prefix="kbsync-bench-langchain-"))
    try:
        files = pick(corpus_files(aws_corpus(args.realdata, work / "corpus")), args.files)
        embedder = load_embedder(Settings(data_dir=work).embedding.spec())  # shared, untimed
        embedder.encode(["warm up"])
        warm_up_prefect()
        sides = {"langchain": lambda: langchain_side(files, embedder, work / "lc-chroma",
                                                     args.lc_chunk_tokens, args.lc_overlap),
                 "kbsync": lambda: kbsync_side(files, work / "kbsync")}
        order = ["kbsync", "langchain"] if args.kbsync_first else ["langchain", "kbsync"]
        results = {"files": len(files), "model": embedder.name, "device": embedder.device,
                   "order": order, **{side: sides[side]() for side in order}}
        lc, kb = results["langchain"], results["kbsync"]
        rows = []
        for key in ("full_sync_s", "chunks", "tokens_embedded", "noop_s", "noop_chunks_embedded"):
            ratio = f"{kb[key] / lc[key]:.2f}x" if lc[key] else "n/a"
            rows.append((f"{key}: kbsync / langchain", f"{kb[key]} / {lc[key]} ({ratio})"))
        rows.append(("mean tokens per chunk: kbsync / langchain",
                     f"{kb['tokens_embedded'] / kb['chunks']:.0f} / "
                     f"{lc['tokens_embedded'] / lc['chunks']:.0f}"))
        rows.append(("target: kbsync full sync <= langchain",
                     "met" if kb["full_sync_s"] <= lc["full_sync_s"] else "missed"))
        print_table(f"kbsync vs LangChain index() ({len(files)} AWS docs, {embedder.device})",
                    rows)
        print(f"JSON: {write_json('langchain_compare', results, args.out)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

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
texts), mean tokens per chunk; then a no-op re-run (seconds, chunks embedded). Each run
of a side is a fresh process with the same untimed set-up (model load, a warm-up encode
of 256 chunk-sized texts, the Prefect server's start), so no side inherits another's
warm process; the runs go one after the other in ``--order`` (``langchain,kbsync``
by default; ``langchain,kbsync,kbsync,langchain`` cancels a drift of the machine's speed
and reports each side's mean). Retrieval quality is ``retrieval.py``'s job.

    .venv/bin/python benchmarks/langchain_compare.py [--files 300] [--order ...]

API relied on: https://python.langchain.com/api_reference/core/indexing/
langchain_core.indexing.api.index.html (``index`` calls ``vector_store.add_documents(docs,
ids=..., batch_size=...)`` and ``vector_store.delete(ids)``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
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

SIDES = ("langchain", "kbsync")
#: The figures each run reports, averaged per side.
FIGURES = ("full_sync_s", "chunks", "tokens_embedded", "noop_s", "noop_chunks_embedded")


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


def warm_up(embedder, files: dict[str, Path], texts: int = 256) -> float:
    """Encode ``texts`` chunk-sized pieces of the first pages, untimed, so that neither
    side pays the process's first encodes (torch's first calls at each batch shape are
    slower); returns its seconds."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    splitter = RecursiveCharacterTextSplitter.from_huggingface_tokenizer(
        embedder.model.tokenizer, chunk_size=240, chunk_overlap=0)
    pieces: list[str] = []
    for path in files.values():
        pieces += splitter.split_text(path.read_text(encoding="utf-8", errors="replace"))
        if len(pieces) >= texts:
            break
    start = time.perf_counter()
    embedder.encode(pieces[:texts])
    return time.perf_counter() - start


def one_side(side: str, args: argparse.Namespace) -> dict[str, Any]:
    """One side's full and no-op syncs in this process, after the same untimed set-up
    for both: the model loaded and warmed up (:func:`warm_up`), Prefect started."""
    from flows.settings import Settings
    from transforms.embedding import load_embedder

    work = Path(tempfile.mkdtemp(prefix="kbsync-bench-langchain-"))
    try:
        files = pick(corpus_files(aws_corpus(args.realdata, work / "corpus")), args.files)
        embedder = load_embedder(Settings(data_dir=work).embedding.spec())  # the flow's too
        warm_s = warm_up(embedder, files)
        warm_up_prefect()
        if side == "langchain":
            result = langchain_side(files, embedder, work / "lc-chroma", args.lc_chunk_tokens,
                                    args.lc_overlap)
        else:
            result = kbsync_side(files, work / "kbsync")
        return {"side": side, "files": len(files), "model": embedder.name,
                "device": embedder.device, "warm_up_s": round(warm_s, 2), **result}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--lc-chunk-tokens", type=int, default=200)
    parser.add_argument("--lc-overlap", type=int, default=30)
    parser.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA)
    parser.add_argument("--order", default="langchain,kbsync",
                        help="the sides in the order they run, each in a fresh process "
                             "(e.g. langchain,kbsync,kbsync,langchain: each side's figure is "
                             "the mean of its runs)")
    parser.add_argument("--kbsync-first", action="store_true",
                        help="the same as --order kbsync,langchain")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    if args.side:  # a child process: one side, its figures as JSON on --out
        args.out.write_text(json.dumps(one_side(args.side, args)))
        return

    order = ["kbsync", "langchain"] if args.kbsync_first else args.order.split(",")
    if not order or set(order) - set(SIDES) or set(SIDES) - set(order):
        parser.error(f"--order must name both sides, {', '.join(SIDES)}")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, side in enumerate(order):
            out = Path(tmp) / f"{i}-{side}.json"
            subprocess.run([sys.executable, __file__, "--side", side, "--files", str(args.files),
                            "--lc-chunk-tokens", str(args.lc_chunk_tokens),
                            "--lc-overlap", str(args.lc_overlap),
                            "--realdata", str(args.realdata), "--out", str(out)], check=True)
            runs.append(json.loads(out.read_text()))
            print(f"run {i + 1}/{len(order)}: {side} full sync {runs[-1]['full_sync_s']} s",
                  flush=True)

    def mean(side: str, key: str) -> float | int:
        values = [run[key] for run in runs if run["side"] == side]
        value = round(statistics.fmean(values), 2)
        return int(value) if value.is_integer() else value

    kb, lc = ({key: mean(side, key) for key in FIGURES} for side in ("kbsync", "langchain"))
    rows = [(f"run {i + 1}: {run['side']} full sync s", run["full_sync_s"])
            for i, run in enumerate(runs)]
    for key in FIGURES:
        ratio = f"{kb[key] / lc[key]:.2f}x" if lc[key] else "n/a"
        rows.append((f"{key}: kbsync / langchain", f"{kb[key]} / {lc[key]} ({ratio})"))
    rows.append(("mean tokens per chunk: kbsync / langchain",
                 f"{kb['tokens_embedded'] / kb['chunks']:.0f} / "
                 f"{lc['tokens_embedded'] / lc['chunks']:.0f}"))
    rows.append(("target: kbsync full sync <= langchain",
                 "met" if kb["full_sync_s"] <= lc["full_sync_s"] else "missed"))
    print_table(f"kbsync vs LangChain index() ({runs[0]['files']} AWS docs, "
                f"{runs[0]['device']}, one process per run)", rows)
    results = {"files": runs[0]["files"], "model": runs[0]["model"],
               "device": runs[0]["device"], "order": order, "runs": runs,
               "kbsync": kb, "langchain": lc}
    print(f"JSON: {write_json('langchain_compare', results, args.out)}")


if __name__ == "__main__":
    main()

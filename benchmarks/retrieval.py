"""Retrieval quality per mode (dense, lexical, hybrid): hit@1/5/10 and MRR per document.

Two sets, each indexed through the real sync flow into its own embedded index:

* ``aws``: the AWS documentation corpus (``../shared/realdata``; every gold document plus
  distractors, the whole corpus by default) and the 100 questions of ``QA_true.csv``;
* ``ru``: the Russian Diplodoc pages (``diplodoc_ru_en/ru/`` only; ``en/`` holds their
  translations) and our hand-written, paraphrased Russian dev set
  ``benchmarks/data/diplodoc_ru_questions.yaml``.

Documents are ranked by their best chunk among the chunks retrieved. Each set's line
also gives the chunks indexed and the model tokens embedded (the encoder's work).

``--lexical both`` also copies each set's chunks into a lexical index on PostgreSQL
(a temporary database on ``--postgres``, dropped at the end) and prints the lexical and
hybrid modes for SQLite FTS5 and Postgres side by side, plus Postgres' own
``ts_rank_cd`` ranking for comparison with BM25 (lexical mode only).

    .venv/bin/python benchmarks/retrieval.py [--files 800] [--sets aws,ru] [--data-dir DIR]
        [--lexical sqlite|postgres|both] [--postgres postgresql+psycopg://postgres@127.0.0.1:5432]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import yaml
from common import (
    DEFAULT_REALDATA,
    ROOT,
    aws_corpus,
    aws_questions,
    commit_repo,
    corpus_files,
    pick,
    print_table,
    run_flow,
    settings_for,
    write_json,
)

from fakes.postgres import temporary_database
from flows.retrieve import MODES

RU_QUESTIONS = ROOT / "benchmarks" / "data" / "diplodoc_ru_questions.yaml"


def document_ranking(hits, k: int) -> list[str]:
    """Distinct document ids in order of their best chunk, at most ``k``."""
    seen: list[str] = []
    for hit in hits:
        if hit.doc_id not in seen:
            seen.append(hit.doc_id)
        if len(seen) == k:
            break
    return seen


def scores(ranks: list[int | None], ks=(1, 5, 10)) -> dict[str, float]:
    """hit@k = share of questions whose gold document is in the top k; MRR = mean of
    1/rank (0 when not found in the ranking)."""
    n = len(ranks)
    out = {f"hit@{k}": sum(1 for r in ranks if r is not None and r <= k) / n for k in ks}
    out["mrr"] = sum(1.0 / r for r in ranks if r is not None) / n
    return out


def evaluate(settings, name: str, questions, mode: str, chunks: int) -> dict[str, float]:
    """hit@k/MRR and mean query milliseconds of one mode on one set."""
    from flows.retrieve import retrieve

    ranks: list[int | None] = []
    t0 = time.perf_counter()
    for question, gold in questions:
        hits = retrieve(settings, question, k=chunks, mode=mode)
        docs = document_ranking(hits, 10_000)
        target = f"{name}:{gold}"
        ranks.append(docs.index(target) + 1 if target in docs else None)
    latency = (time.perf_counter() - t0) / len(questions) * 1000
    return {**{k: round(v, 3) for k, v in scores(ranks).items()}, "query_ms": round(latency, 1)}


def evaluate_ts_rank_cd(settings, url: str, name: str, questions, chunks: int) -> dict[str, float]:
    """Lexical mode with Postgres' ``ts_rank_cd`` instead of BM25 (same index)."""
    from connectors.lexical_postgres import PostgresLexicalIndex
    from flows.retrieve import open_store

    index = PostgresLexicalIndex(url, ranking="ts_rank_cd")
    col = open_store(settings).collection(create=False)
    ranks: list[int | None] = []
    t0 = time.perf_counter()
    try:
        for question, gold in questions:
            hits = index.search(question, k=chunks)
            got = col.get(ids=[h.chunk_id for h in hits], include=["metadatas"]) if hits else None
            doc_of = dict(zip(got["ids"], (m["doc_id"] for m in got["metadatas"]), strict=True)) if got else {}
            docs: list[str] = []
            for h in hits:
                if h.chunk_id in doc_of and doc_of[h.chunk_id] not in docs:
                    docs.append(doc_of[h.chunk_id])
            target = f"{name}:{gold}"
            ranks.append(docs.index(target) + 1 if target in docs else None)
    finally:
        index.close()
    latency = (time.perf_counter() - t0) / len(questions) * 1000
    return {**{k: round(v, 3) for k, v in scores(ranks).items()}, "query_ms": round(latency, 1)}


def fmt(score: dict[str, float]) -> str:
    return (f"{score['hit@1']} / {score['hit@5']} / {score['hit@10']} / {score['mrr']}  "
            f"({score['query_ms']:.0f} ms)")


def load_sets(args, work: Path) -> dict[str, tuple[dict[str, Path], list[tuple[str, str]]]]:
    """``name -> (files to index, [(question, gold relative path)])``."""
    sets = {}
    if "aws" in args.sets:
        questions = aws_questions(args.realdata)
        gold = {q["Document_True"] for q in questions}
        files = pick(corpus_files(aws_corpus(args.realdata, work / "corpus")), args.files, gold)
        missing = gold - set(files)
        if missing:
            raise SystemExit(f"gold documents missing from the corpus: {sorted(missing)[:5]}")
        sets["aws"] = (files, [(q["Question"], q["Document_True"]) for q in questions])
    if "ru" in args.sets:
        root = args.realdata / "docs_qa" / "diplodoc_ru_en" / "ru"
        files = {str(p.relative_to(root)): p for p in sorted(root.rglob("*.md"))}
        rows = yaml.safe_load(RU_QUESTIONS.read_text(encoding="utf-8"))
        sets["ru"] = (files, [(q["question"], q["gold"]) for q in rows])
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=None, help="AWS corpus size (default: all)")
    parser.add_argument("--sets", default="aws,ru", help="which sets: aws, ru")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="directory for the indexes, reused between runs (default: temp)")
    parser.add_argument("--chunks", type=int, default=50, help="chunks retrieved per question")
    parser.add_argument("--model", default=None, help="embedding model (default: packaged MiniLM)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--lexical", choices=["sqlite", "postgres", "both"], default="sqlite",
                        help="which lexical index to measure (postgres: a temporary database)")
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432",
                        help="PostgreSQL server URL (without a database) for --lexical")
    args = parser.parse_args()

    from connectors.lexical import open_index
    from flows.embed import rebuild_lexical
    from flows.retrieve import open_store

    work = Path(tempfile.mkdtemp(prefix="kbsync-bench-retrieval-"))
    base = args.data_dir or work
    results: dict[str, dict] = {}
    rows: list[tuple[str, object]] = []
    modes = args.modes.split(",")
    try:
        for name, (files, questions) in load_sets(args, work).items():
            repo_path = base / name / "repo"
            if not (repo_path / ".git").exists():
                commit_repo(files, repo_path)
            extra = {"embedding": {"model": args.model}} if args.model else {}
            settings = settings_for(repo_path, base / name / "data", name=name, **extra)
            summary, index_s = run_flow(settings, name)
            results[name] = {"files": len(files), "questions": len(questions),
                             "chunks": summary["chunks_embedded"] + summary["chunks_reused"],
                             "tokens_embedded": summary["tokens_embedded"],
                             "index_s": round(index_s, 2), "model": settings.embedding.model,
                             "modes": {}}
            rows.append((f"{name}: chunks / tokens embedded (mean per chunk)",
                         f"{results[name]['chunks']} / {summary['tokens_embedded']} "
                         f"({summary['tokens_embedded'] / max(summary['chunks_embedded'], 1):.0f})"))
            if args.lexical in ("sqlite", "both"):
                for mode in modes:
                    score = evaluate(settings, name, questions, mode, args.chunks)
                    results[name]["modes"][mode] = score
                    label = "" if args.lexical == "sqlite" or mode == "dense" else " (fts5)"
                    rows.append((f"{name} {mode}{label}: hit@1 / hit@5 / hit@10 / MRR", fmt(score)))
            if args.lexical in ("postgres", "both"):
                with temporary_database(args.postgres) as url:
                    pg = open_index(url)
                    t0 = time.perf_counter()
                    rebuild_lexical(open_store(settings), pg)
                    pg.close()
                    results[name]["postgres_load_s"] = round(time.perf_counter() - t0, 2)
                    on_pg = settings.model_copy(update={"lexical": settings.lexical.model_copy(
                        update={"url": url})})
                    pg_modes = [m for m in modes if m != "dense" or args.lexical == "postgres"]
                    results[name]["postgres"] = {}
                    for mode in pg_modes:
                        score = evaluate(on_pg, name, questions, mode, args.chunks)
                        results[name]["postgres"][mode] = score
                        rows.append((f"{name} {mode} (postgres bm25): hit@1 / hit@5 / hit@10 / MRR",
                                     fmt(score)))
                    if "lexical" in modes:
                        score = evaluate_ts_rank_cd(on_pg, url, name, questions, args.chunks)
                        results[name]["postgres"]["lexical_ts_rank_cd"] = score
                        rows.append((f"{name} lexical (postgres ts_rank_cd): hit@1 / hit@5 / "
                                     "hit@10 / MRR", fmt(score)))
            if args.lexical == "both":
                for mode in modes:
                    if mode != "dense":
                        a, b = results[name]["modes"][mode], results[name]["postgres"][mode]
                        rows.append((f"{name} {mode}: hit@5 / MRR postgres - fts5",
                                     f"{b['hit@5'] - a['hit@5']:+.3f} / {b['mrr'] - a['mrr']:+.3f}"))
        print_table("retrieval per mode (document level)", rows)
        print(f"JSON: {write_json('retrieval', results, args.out)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

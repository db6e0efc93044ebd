"""Retrieval quality on the AWS documentation questions: hit@1/5/10 and MRR per document.

Indexes the AWS documentation corpus (``../shared/realdata``; every gold document plus
distractors, the whole corpus by default) through the real sync flow, then asks each of
the 100 questions of ``QA_true.csv`` and ranks documents by their best chunk.

    .venv/bin/python benchmarks/retrieval.py [--files 800] [--data-dir DIR to reuse an index]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import (
    DEFAULT_REALDATA,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=None, help="corpus size (default: all)")
    parser.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="index directory to reuse between runs (default: a temp dir)")
    parser.add_argument("--chunks", type=int, default=50, help="chunks retrieved per question")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from flows.retrieve import retrieve

    work = Path(tempfile.mkdtemp(prefix="kbsync-bench-retrieval-"))
    try:
        questions = aws_questions(args.realdata)
        gold = {q["Document_True"] for q in questions}
        files = pick(corpus_files(aws_corpus(args.realdata, work / "corpus")), args.files, gold)
        missing = gold - set(files)
        if missing:
            raise SystemExit(f"gold documents missing from the corpus: {sorted(missing)[:5]}")
        repo_path = (args.data_dir or work) / "repo"
        if not (repo_path / ".git").exists():
            commit_repo(files, repo_path)
        settings = settings_for(repo_path, (args.data_dir or work) / "data")
        summary, index_s = run_flow(settings, "aws")

        ranks: list[int | None] = []
        t0 = time.perf_counter()
        for q in questions:
            hits = retrieve(settings, q["Question"], k=args.chunks)
            docs = document_ranking(hits, 10_000)
            target = f"aws:{q['Document_True']}"
            ranks.append(docs.index(target) + 1 if target in docs else None)
        query_s = (time.perf_counter() - t0) / len(questions)

        result = {"files": len(files), "questions": len(questions),
                  "chunks_embedded": summary["chunks_embedded"], "index_s": round(index_s, 2),
                  "query_ms": round(query_s * 1000, 1), "mode": "dense",
                  "model": settings.embedding.model, **scores(ranks)}
        print_table(f"retrieval on AWS docs ({len(files)} files, {len(questions)} questions)", [
            ("mode", "dense"), ("hit@1", result["hit@1"]), ("hit@5", result["hit@5"]),
            ("hit@10", result["hit@10"]), ("MRR", result["mrr"]),
            ("index time (s)", index_s), ("query latency (ms)", result["query_ms"]),
        ])
        print(f"JSON: {write_json('retrieval', result, args.out)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

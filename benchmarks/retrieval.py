"""Retrieval quality per mode (dense, lexical, hybrid): hit@1/5/10 and MRR per document.

Two sets, each indexed through the real sync flow into its own embedded index:

* ``aws``: the AWS documentation corpus (``../shared/realdata``; every gold document plus
  distractors, the whole corpus by default) and the 100 questions of ``QA_true.csv``;
* ``ru``: the Russian Diplodoc pages (``diplodoc_ru_en/ru/`` only; ``en/`` holds their
  translations) and our hand-written, paraphrased Russian dev set
  ``benchmarks/data/diplodoc_ru_questions.yaml``.

Documents are ranked by their best chunk among the chunks retrieved.

    .venv/bin/python benchmarks/retrieval.py [--files 800] [--sets aws,ru] [--data-dir DIR]
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
    args = parser.parse_args()

    from flows.retrieve import retrieve

    work = Path(tempfile.mkdtemp(prefix="kbsync-bench-retrieval-"))
    base = args.data_dir or work
    results: dict[str, dict] = {}
    rows: list[tuple[str, object]] = []
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
                             "index_s": round(index_s, 2), "model": settings.embedding.model,
                             "modes": {}}
            for mode in args.modes.split(","):
                ranks: list[int | None] = []
                t0 = time.perf_counter()
                for question, gold in questions:
                    hits = retrieve(settings, question, k=args.chunks, mode=mode)
                    docs = document_ranking(hits, 10_000)
                    target = f"{name}:{gold}"
                    ranks.append(docs.index(target) + 1 if target in docs else None)
                latency = (time.perf_counter() - t0) / len(questions) * 1000
                score = {k: round(v, 3) for k, v in scores(ranks).items()}
                results[name]["modes"][mode] = {**score, "query_ms": round(latency, 1)}
                rows.append((f"{name} {mode}: hit@1 / hit@5 / hit@10 / MRR",
                             f"{score['hit@1']} / {score['hit@5']} / {score['hit@10']} / "
                             f"{score['mrr']}  ({latency:.0f} ms)"))
        print_table("retrieval per mode (document level)", rows)
        print(f"JSON: {write_json('retrieval', results, args.out)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

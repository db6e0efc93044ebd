"""The validation flow, measured: what one run costs with a local LLM, and how clearly
it tells a working index from a broken one.

1. Index a slice of the AWS documentation corpus (``../shared/realdata``; every gold
   document of the golden questions plus seeded distractors) through the real sync flow.
2. **LLM run**: the real ``validate`` flow body with a sample of N chunks (question,
   retrieval, answer, faithfulness, correctness) against the configured endpoint, or
   the packaged SmolLM2-135M stand-in (llama-cpp-python) when ``--base-url`` is not
   given: seconds per stage, LLM latency, tokens, metrics.
3. **Sensitivity**: the golden set (hand-written AWS questions with their gold documents)
   evaluated without an LLM on the index as built and on a copy whose vectors were
   shuffled between chunks (dense retrieval): document hit@k and MRR, and whether the
   broken index fails the threshold.

    .venv/bin/python benchmarks/validation.py [--files 300] [--sample 5] [--golden 40]
        [--base-url http://localhost:11434/v1 --model deepseek-r1:7b] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import yaml
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


def run_validation_flow(settings, **kwargs):
    """The validation flow body in a real flow run; returns (report, wall seconds)."""
    from prefect import flow

    from flows.validate import final_state, report_of, run_validation

    @flow(name="benchmark-validate")
    def _bench():
        return final_state(run_validation(settings, **kwargs))

    start = time.perf_counter()
    state = _bench(return_state=True)
    return report_of(state), time.perf_counter() - start


def shuffle_vectors(settings, seed: int = 0) -> int:
    """Give every chunk another chunk's vector; returns the number of chunks."""
    import chromadb
    import numpy as np

    col = chromadb.PersistentClient(path=str(settings.chroma_path)).get_collection(
        settings.chroma.collection)
    ids, vectors = [], []
    offset = 0
    while True:
        res = col.get(include=["embeddings"], limit=5000, offset=offset)
        ids += res["ids"]
        vectors += list(res["embeddings"])
        if len(res["ids"]) < 5000:
            break
        offset += 5000
    perm = list(range(len(ids)))
    rng = random.Random(seed)
    while any(i == p for i, p in enumerate(perm)):
        rng.shuffle(perm)
    arr = np.asarray(vectors)[perm]
    for start in range(0, len(ids), 2000):
        col.update(ids=ids[start:start + 2000], embeddings=arr[start:start + 2000])
    return len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300, help="AWS corpus size")
    parser.add_argument("--sample", type=int, default=5, help="chunks for the LLM run")
    parser.add_argument("--golden", type=int, default=40, help="golden questions (of 100)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--base-url", default=None, help="LLM endpoint (default: the stand-in)")
    parser.add_argument("--model", default=None, help="model at --base-url")
    parser.add_argument("--max-context-tokens", type=int, default=None)
    parser.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="directory for the index, reused between runs (default: temp)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from connectors.llm import PACKAGED_MODEL_CONTEXT, StandinServer, free_port

    work = Path(tempfile.mkdtemp(prefix="kbsync-bench-validation-"))
    base = args.data_dir or work
    server = None
    try:
        questions = aws_questions(args.realdata)
        questions = random.Random(args.seed).sample(questions, min(args.golden, len(questions)))
        gold = {q["Document_True"] for q in questions}
        files = pick(corpus_files(aws_corpus(args.realdata, work / "corpus")), args.files, gold)
        repo_path = base / "repo"
        if not (repo_path / ".git").exists():
            commit_repo(files, repo_path)
        golden = base / "golden.yaml"
        golden.write_text(yaml.safe_dump([
            {"question": q["Question"], "expected": [f"aws:{q['Document_True']}"],
             "reference": q["Answer_True"]} for q in questions], allow_unicode=True))
        settings = settings_for(repo_path, base / "data")
        _, index_s = run_flow(settings, "aws")
        from flows.retrieve import open_store

        chunks = open_store(settings).count()

        # -- the LLM run (sample only; the golden set is measured below without an LLM)
        if args.base_url:
            llm = {"base_url": args.base_url, "model": args.model or "deepseek-r1:7b"}
            if args.max_context_tokens:
                llm["max_context_tokens"] = args.max_context_tokens
        else:
            server = StandinServer(log_path=work / "llm.log")
            endpoint = server.start()
            llm = {"base_url": endpoint.base_url, "model": endpoint.model,
                   "max_context_tokens": PACKAGED_MODEL_CONTEXT, "max_reply_tokens": 256}
        llm_settings = settings.model_copy(update={"llm": type(settings.llm)(**llm),
                                                   "validation": settings.validation.model_copy(
                                                       update={"top_k": args.top_k})})
        report, llm_s = run_validation_flow(llm_settings, sample_size=args.sample,
                                            seed=args.seed)
        if server is not None:
            server.stop()
        calls = report["llm"]["calls"]
        sample = report["metrics"]["sample"] or {}

        # -- sensitivity: golden set, dense retrieval, no LLM; built vs vectors shuffled
        def retrieval_only(data_dir: Path):
            s = settings_for(repo_path, data_dir, llm={
                "base_url": f"http://127.0.0.1:{free_port()}/v1"},
                retrieval={"mode": "dense"},
                validation={"golden_set": str(golden), "top_k": args.top_k})
            return run_validation_flow(s, seed=args.seed)

        good, good_s = retrieval_only(base / "data")
        broken_dir = work / "broken"
        shutil.copytree(base / "data", broken_dir)
        shuffle_vectors(settings_for(repo_path, broken_dir))
        broken, _ = retrieval_only(broken_dir)
        g, b = good["metrics"]["golden"], broken["metrics"]["golden"]
        broken_failed = any(not r["passed"] for r in broken["thresholds"])

        results = {
            "corpus": {"files": len(files), "chunks": chunks, "index_s": round(index_s, 1)},
            "llm_run": {
                "model": report["llm"]["models_used"], "status": report["status"],
                "reason": report["reason"], "sample": args.sample, "seed": args.seed,
                "top_k": args.top_k, "wall_s": round(llm_s, 1),
                "seconds": report["run"]["seconds"], "metrics": sample, "calls": calls,
            },
            "sensitivity": {"golden_questions": len(questions), "top_k": args.top_k,
                            "built": g, "shuffled": b, "shuffled_status": broken["status"],
                            "built_status": good["status"], "golden_run_s": round(good_s, 1)},
        }
        k = args.top_k
        rows = [
            ("corpus files / chunks / index s", f"{len(files)} / {chunks} / {index_s:.0f}"),
            ("LLM", ", ".join(report["llm"]["models_used"]) or "none"),
            (f"LLM run: {args.sample} chunks, wall s", round(llm_s, 1)),
            ("  s question / answer / judge / retrieval",
             " / ".join(f"{report['run']['seconds'].get(s, 0):.1f}"
                        for s in ("llm_question", "llm_answer", "llm_judge", "retrieval"))),
            ("  LLM calls / mean s / p95 s", f"{calls.get('calls', 0)} / "
             f"{calls.get('latency_mean_seconds', 0)} / {calls.get('latency_p95_seconds', 0)}"),
            ("  tokens prompt / completion", f"{calls.get('prompt_tokens', 0)} / "
             f"{calls.get('completion_tokens', 0)}"),
            (f"  chunk hit@{k} / doc hit@{k} / doc MRR",
             f"{sample.get('chunk_hit_rate')} / {sample.get('doc_hit_rate')} / "
             f"{sample.get('doc_mrr')}"),
            ("  faithfulness / correctness / judge failures",
             f"{sample.get('faithfulness')} / {sample.get('correctness')} / "
             f"{sample.get('judge_failures')}"),
            ("  status", report["status"]),
            (f"golden ({len(questions)} q) built: doc hit@{k} / MRR",
             f"{g['doc_hit_rate']} / {g['doc_mrr']}  ({good['status']})"),
            (f"golden shuffled vectors: doc hit@{k} / MRR",
             f"{b['doc_hit_rate']} / {b['doc_mrr']}  ({broken['status']})"),
            ("shuffled index fails the threshold", broken_failed),
        ]
        print_table("validation: cost of one LLM run, and sensitivity", rows)
        print(f"JSON: {write_json('validation', results, args.out)}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

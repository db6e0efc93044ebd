"""Ingest throughput of the sync flow against the ceiling of raw ``model.encode``.

Commits a subset of the AWS documentation corpus (``../shared/realdata``) into a temp git
repository and measures, through the real Prefect flow into an embedded Chroma:

* full sync: wall seconds, chunks/s and the model tokens embedded (the encoder's work;
  the model is loaded before timing; the Prefect server is started before timing by a
  warm-up flow);
* the ceiling: ``model.encode`` on exactly the chunk texts the sync stored, same batch
  size; the ratio pipeline/ceiling throughput (target >= 0.9);
* no-op re-sync (no new commit; target < 3 s);
* re-sync after editing 1% of the files (one sentence changed in the middle of each):
  wall seconds and chunks embedded, against the chunks whose ids really changed.

``--corpus confluence`` measures the same through the Confluence connector instead: the 450
Apache wiki pages (real storage format) served by a local Confluence REST stand-in
(``corpus_confluence.py``); ``--files`` then counts pages.

    .venv/bin/python benchmarks/ingest.py --files 300
    .venv/bin/python benchmarks/ingest.py --corpus confluence

``--corpus jira`` measures the same on the Titanium Jira issues (``benchmarks/
corpus_jira.py`` serves them behind Jira's REST paths on localhost; ``--files`` is then
the number of issues, and the 1% edit adds one comment to each of 1% of the issues):

    .venv/bin/python benchmarks/ingest.py --corpus jira --files 500
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
    commit_repo,
    corpus_files,
    pick,
    print_table,
    run_flow,
    settings_for,
    warm_up_prefect,
    write_json,
)


def edit_middle_sentence(text: str) -> str:
    """Change one sentence near the middle of a document (a realistic small edit)."""
    paragraphs = text.split("\n\n")
    candidates = [i for i, p in enumerate(paragraphs) if len(p) > 80 and not p.startswith(("#", "|", "```", " "))]
    i = candidates[len(candidates) // 2] if candidates else len(paragraphs) // 2
    paragraphs[i] = paragraphs[i].rstrip() + " This sentence was added by the benchmark edit."
    return "\n\n".join(paragraphs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=["aws", "confluence", "jira"], default="aws",
                        help="AWS docs in a git repo, Apache wiki pages from Confluence, or "
                             "Titanium issues from Jira")
    parser.add_argument("--files", type=int, default=None,
                        help="how many Markdown files / pages / issues (default 300 / all 450 / 300)")
    parser.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args()

    from connectors.chroma import ChromaStore
    from transforms.embedding import load_embedder

    work = Path(tempfile.mkdtemp(prefix="kbsync-bench-ingest-"))
    wiki = jira = None
    try:
        if args.corpus == "confluence":
            from corpus_confluence import ConfluenceCorpus

            wiki = ConfluenceCorpus(args.realdata, args.files)
            settings = wiki.settings(work / "data", embedding={"batch_size": args.batch_size})
            source, files, label = wiki.source, wiki.pages, "Apache wiki pages via Confluence"
        elif args.corpus == "jira":
            from corpus_jira import BenchCorpus

            from flows.settings import Settings

            jira = BenchCorpus(args.realdata, args.files or 300)
            files, source, label = range(jira.count), jira.name, "Titanium Jira issues"
            settings = Settings(data_dir=work / "data", sources=[jira.source],
                                embedding={"batch_size": args.batch_size})
        else:
            files = pick(corpus_files(aws_corpus(args.realdata, work / "corpus")),
                         args.files or 300)
            repo = commit_repo(files, work / "repo")
            settings = settings_for(work / "repo", work / "data",
                                    embedding={"batch_size": args.batch_size})
            source, label = "aws", "AWS docs"

        prefect_start = warm_up_prefect()
        t0 = time.perf_counter()
        embedder = load_embedder(settings.embedding.spec())
        model_load = time.perf_counter() - t0

        full, full_s = run_flow(settings, source)
        chunks = full["chunks_embedded"]

        store = ChromaStore(path=settings.chroma_path)
        stored = store.collection(create=False).get(include=["documents"])
        texts = stored["documents"]
        t0 = time.perf_counter()
        embedder.model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True,
                              convert_to_numpy=True, show_progress_bar=False)
        ceiling_s = time.perf_counter() - t0

        noop, noop_s = run_flow(settings, source)

        # edit 1% of the files (at least one)
        n_edit = max(1, len(files) // 100)
        before = {cid for cid in stored["ids"]}
        if wiki is not None:
            edited = wiki.edit(n_edit)
        elif jira is not None:
            edited = jira.edit(n_edit)
        else:
            edited = sorted(files)[:: max(1, len(files) // n_edit)][:n_edit]
            for rel in edited:
                p = work / "repo" / rel
                p.write_text(edit_middle_sentence(p.read_text(encoding="utf-8")),
                             encoding="utf-8")
            repo.git.add("-A")
            repo.index.commit("edit 1%")
        edit, edit_s = run_flow(settings, source)
        after = set(store.collection(create=False).get(include=[])["ids"])
        really_new = len(after - before)

        pipeline_cps = chunks / full_s
        ceiling_cps = len(texts) / ceiling_s
        result = {
            "corpus": args.corpus,
            "files": len(files),
            "documents_indexed": full["documents_added"],
            "chunks": chunks,
            "tokens_embedded": full["tokens_embedded"],
            "model": embedder.name,
            "device": embedder.device,
            "batch_size": args.batch_size,
            "prefect_start_s": round(prefect_start, 3),
            "model_load_s": round(model_load, 3),
            "full_sync_s": round(full_s, 3),
            "full_sync_stage_s": full["seconds"],
            "pipeline_chunks_per_s": round(pipeline_cps, 2),
            "ceiling_encode_s": round(ceiling_s, 3),
            "ceiling_chunks_per_s": round(ceiling_cps, 2),
            "ratio_pipeline_to_ceiling": round(pipeline_cps / ceiling_cps, 3),
            "noop_resync_s": round(noop_s, 3),
            "noop_chunks_embedded": noop["chunks_embedded"],
            "edited_files": len(edited),
            "edit_resync_s": round(edit_s, 3),
            "edit_chunks_embedded": edit["chunks_embedded"],
            "edit_chunks_with_new_ids": really_new,
            "edit_documents_updated": edit["documents_updated"],
        }
        print_table(f"ingest benchmark ({len(files)} {label}, {embedder.device})", [
            ("documents / chunks", f"{result['documents_indexed']} / {chunks}"),
            ("tokens embedded (mean per chunk)",
             f"{full['tokens_embedded']} ({full['tokens_embedded'] / max(chunks, 1):.0f})"),
            ("full sync (s)", full_s),
            ("pipeline chunks/s", pipeline_cps),
            ("ceiling: raw model.encode chunks/s", ceiling_cps),
            ("ratio pipeline / ceiling (target >= 0.9)", pipeline_cps / ceiling_cps),
            ("stage seconds", ", ".join(f"{k} {v:.2f}" for k, v in full["seconds"].items())),
            ("no-op re-sync (s, target < 3)", noop_s),
            (f"1% edit: {len(edited)} files re-sync (s)", edit_s),
            ("1% edit: chunks embedded / chunks with new ids", f"{edit['chunks_embedded']} / {really_new}"),
        ])
        name = "ingest" if args.corpus == "aws" else f"ingest_{args.corpus}"
        print(f"JSON: {write_json(name, result, args.out)}")
    finally:
        if wiki is not None:
            wiki.stop()
        if jira is not None:
            jira.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    main()

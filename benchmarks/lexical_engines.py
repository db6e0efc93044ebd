"""Which engine for the lexical (BM25) index: SQLite FTS5, tantivy or bm25s, measured.

All three index the same pre-analysed terms (``transforms.analysis.analyze``) of the same
chunks (the sync's own chunker over AWS documentation pages and the Russian Diplodoc
pages). Measured per engine:

* add cost per 1,000 chunks, written the way a sync writes them: pages of 100 chunks,
  each made durable (committed) before the next;
* delete cost per 1,000 chunks (by chunk id, in pages of 100);
* query latency (mean over the questions), disk size;
* hit@1/5/10 and MRR per document on the AWS questions and the Russian dev set.

bm25s has no incremental update: "adding a page" means rebuilding the whole index, which
is what a sync would have to do.

    .venv/bin/python benchmarks/lexical_engines.py [--aws-files 600]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import yaml
from common import (
    DEFAULT_REALDATA,
    ROOT,
    aws_corpus,
    aws_questions,
    corpus_files,
    pick,
    print_table,
    write_json,
)

PAGE = 100


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class FTS5:
    name = "sqlite-fts5"

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path / "lexical.db")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE chunks(rowid INTEGER PRIMARY KEY, chunk_id TEXT UNIQUE, doc_id TEXT)")
        self.db.execute("CREATE VIRTUAL TABLE terms USING fts5(body, "
                        "tokenize=\"unicode61 remove_diacritics 0 tokenchars '_'\", detail=column)")

    def add(self, rows):
        with self.db:
            for cid, doc, terms in rows:
                cur = self.db.execute("INSERT INTO chunks(chunk_id, doc_id) VALUES (?, ?)", (cid, doc))
                self.db.execute("INSERT INTO terms(rowid, body) VALUES (?, ?)", (cur.lastrowid, " ".join(terms)))

    def delete(self, ids):
        with self.db:
            q = f"SELECT rowid FROM chunks WHERE chunk_id IN ({','.join('?' * len(ids))})"
            rowids = [r[0] for r in self.db.execute(q, ids)]
            self.db.executemany("DELETE FROM terms WHERE rowid = ?", [(r,) for r in rowids])
            self.db.executemany("DELETE FROM chunks WHERE rowid = ?", [(r,) for r in rowids])

    def search(self, terms, k):
        if not terms:
            return []
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in dict.fromkeys(terms))
        rows = self.db.execute(
            "SELECT c.doc_id FROM terms JOIN chunks c ON c.rowid = terms.rowid "
            "WHERE terms MATCH ? ORDER BY bm25(terms) LIMIT ?", (match, k))
        return [r[0] for r in rows]

    def size(self):
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return dir_size(self.path)


class Tantivy:
    name = "tantivy"

    def __init__(self, path: Path) -> None:
        import tantivy

        self.t = tantivy
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        sb = tantivy.SchemaBuilder()
        sb.add_text_field("chunk_id", stored=True, tokenizer_name="raw")
        sb.add_text_field("doc_id", stored=True, tokenizer_name="raw")
        sb.add_text_field("body", stored=False, tokenizer_name="whitespace")
        self.schema = sb.build()
        self.index = tantivy.Index(self.schema, path=str(path))
        self.writer = self.index.writer(heap_size=50_000_000, num_threads=1)

    def add(self, rows):
        for cid, doc, terms in rows:
            self.writer.add_document(self.t.Document(chunk_id=cid, doc_id=doc, body=" ".join(terms)))
        self.writer.commit()

    def delete(self, ids):
        for cid in ids:
            self.writer.delete_documents_by_term("chunk_id", cid)
        self.writer.commit()

    def search(self, terms, k):
        if not terms:
            return []
        self.index.reload()
        searcher = self.index.searcher()
        q = self.t.Query.boolean_query([
            (self.t.Occur.Should, self.t.Query.term_query(self.schema, "body", term))
            for term in dict.fromkeys(terms)])
        return [searcher.doc(addr)["doc_id"][0] for _, addr in searcher.search(q, limit=k).hits]

    def size(self):
        return dir_size(self.path)


class BM25S:
    name = "bm25s (rebuild)"

    def __init__(self, path: Path) -> None:
        import bm25s

        self.bm25s = bm25s
        self.path = path
        self.rows: dict[str, tuple[str, list[str]]] = {}
        self.model = None

    def _rebuild(self):
        self.ids = list(self.rows)
        corpus = [self.rows[i][1] or ["_"] for i in self.ids]
        self.model = self.bm25s.BM25()
        self.model.index(corpus, show_progress=False)

    def add(self, rows):
        for cid, doc, terms in rows:
            self.rows[cid] = (doc, terms)
        self._rebuild()
        self.model.save(str(self.path))

    def delete(self, ids):
        for cid in ids:
            self.rows.pop(cid, None)
        self._rebuild()
        self.model.save(str(self.path))

    def search(self, terms, k):
        vocab = self.model.vocab_dict
        known = [t for t in terms if t in vocab]
        if not known:
            return []
        docs, _ = self.model.retrieve([known], k=min(k, len(self.ids)), show_progress=False)
        return [self.rows[self.ids[i]][0] for i in docs[0]]

    def size(self):
        return dir_size(self.path)


def chunk_corpus(pages: dict[str, str], prefix: str):
    """The sync's chunks of each page -> ``[(chunk id, doc id, terms)]``, the terms of
    the text the lexical index reads (``transforms.context.lexical_text``)."""
    from transforms.analysis import analyze
    from transforms.chunking import ChunkingConfig, chunk_document
    from transforms.context import lexical_text
    from transforms.embedding import EmbedderSpec, load_embedder

    embedder = load_embedder(EmbedderSpec())
    config = ChunkingConfig(max_tokens=embedder.max_text_tokens, overlap_tokens=32)
    rows = []
    for rel, text in pages.items():
        doc_id = f"{prefix}:{rel}"
        for c in chunk_document(doc_id, text, fmt="markdown", title=rel, config=config,
                                counter=embedder.count_tokens):
            meta = {"title": rel, "heading": c.heading}
            rows.append((c.id, doc_id, analyze(lexical_text(c.text, meta))))
    return rows


def evaluate(engine, questions, k_chunks=100):
    from transforms.analysis import analyze

    ranks, latency = [], 0.0
    for question, gold in questions:
        t0 = time.perf_counter()
        docs = list(dict.fromkeys(engine.search(analyze(question), k_chunks)))
        latency += time.perf_counter() - t0
        ranks.append(docs.index(gold) + 1 if gold in docs else None)
    n = len(ranks)
    out = {f"hit@{k}": round(sum(1 for r in ranks if r and r <= k) / n, 3) for k in (1, 5, 10)}
    out["mrr"] = round(sum(1 / r for r in ranks if r) / n, 3)
    return out, latency / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aws-files", type=int, default=600)
    parser.add_argument("--realdata", type=Path, default=DEFAULT_REALDATA)
    parser.add_argument("--engines", default="fts5,tantivy,bm25s")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kbsync-bench-lexical-"))
    try:
        aws_q = aws_questions(args.realdata)
        gold = {q["Document_True"] for q in aws_q}
        aws_files = pick(corpus_files(aws_corpus(args.realdata, work / "corpus")), args.aws_files, gold)
        ru_root = args.realdata / "docs_qa" / "diplodoc_ru_en" / "ru"
        ru_pages = {str(p.relative_to(ru_root)): p.read_text(encoding="utf-8")
                    for p in sorted(ru_root.rglob("*.md")) if "_includes" not in p.parts}
        rows = chunk_corpus({k: v.read_text(encoding="utf-8") for k, v in aws_files.items()}, "aws")
        rows += chunk_corpus(ru_pages, "ru")
        questions = {"aws": [(q["Question"], f"aws:{q['Document_True']}") for q in aws_q]}
        ru_file = ROOT / "benchmarks" / "data" / "diplodoc_ru_questions.yaml"
        if ru_file.is_file():
            questions["ru"] = [(q["question"], f"ru:{q['gold']}") for q in yaml.safe_load(ru_file.read_text())]

        engines = {"fts5": FTS5, "tantivy": Tantivy, "bm25s": BM25S}
        results = {}
        for key in args.engines.split(","):
            engine = engines[key](work / key)
            t0 = time.perf_counter()
            for start in range(0, len(rows), PAGE):
                engine.add(rows[start:start + PAGE])
            add_s = time.perf_counter() - t0
            size = engine.size()
            quality = {}
            latency = {}
            for lang, qs in questions.items():
                quality[lang], latency[lang] = evaluate(engine, qs)
            victims = [r[0] for r in rows[::7]][:1000]
            t0 = time.perf_counter()
            for start in range(0, len(victims), PAGE):
                engine.delete(victims[start:start + PAGE])
            delete_s = time.perf_counter() - t0
            results[engine.name] = {
                "chunks": len(rows),
                "add_s_per_1000": round(add_s / len(rows) * 1000, 3),
                "delete_s_per_1000": round(delete_s / len(victims) * 1000, 3),
                "query_ms": {k: round(v, 2) for k, v in latency.items()},
                "disk_mb": round(size / 1e6, 2),
                "quality": quality,
            }
            print(engine.name, results[engine.name], flush=True)

        rows_out = []
        for name, r in results.items():
            rows_out.append((f"{name}: add s/1000 chunks", r["add_s_per_1000"]))
            rows_out.append((f"{name}: delete s/1000 chunks", r["delete_s_per_1000"]))
            rows_out.append((f"{name}: query ms", ", ".join(f"{k} {v}" for k, v in r["query_ms"].items())))
            rows_out.append((f"{name}: disk MB", r["disk_mb"]))
            for lang, q in r["quality"].items():
                rows_out.append((f"{name}: {lang} hit@1/5/10 MRR",
                                 f"{q['hit@1']} / {q['hit@5']} / {q['hit@10']} / {q['mrr']}"))
        print_table(f"lexical engines ({len(rows)} chunks)", rows_out)
        print(f"JSON: {write_json('lexical_engines', results, args.out)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

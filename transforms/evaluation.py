"""Pure parts of the validation flow: which chunks to sample, ranks, hit@k, MRR,
faithfulness, aggregation and thresholds. No I/O here (``flows/validate.py`` does it).

Metrics, for questions whose expected chunk/document is known:

* **hit@k** (hit rate): share of questions whose expected item is among the top ``k``
  results.
* **MRR** (mean reciprocal rank): mean of ``1 / rank`` of the first expected item,
  0 when it is not in the top ``k`` (so it is MRR@k).
* Chunk level: the chunk the question was written from; document level: any chunk
  of that chunk's document (a golden question may name several documents or URLs).
* **Faithfulness** as in RAGAS (Es et al., 2023,
  https://docs.ragas.io/en/stable/concepts/metrics/available_metrics/faithfulness/):
  the answer is split into statements, each judged supported or not by the retrieved
  context; score = supported / total.
* **Correctness**: a 1-5 grade of the answer against the reference.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class ChunkRef:
    """A chunk that may be sampled: its id, document, source and document age."""

    chunk_id: str
    doc_id: str
    source: str
    updated_ts: float | None = None


def recency_weight(updated_ts: float | None, now_ts: float, half_life_days: float,
                   boost: float) -> float:
    """``1 + boost * 0.5 ** (age / half_life)``: a document changed just now is
    ``1 + boost`` times as likely to be drawn as a very old one; unknown age counts as old.
    """
    if updated_ts is None:
        return 1.0
    age_days = max(0.0, (now_ts - updated_ts) / 86400.0)
    return 1.0 + boost * 0.5 ** (age_days / half_life_days)


def sampling_order(chunks: Iterable[ChunkRef], *, seed: int, now_ts: float,
                   half_life_days: float = 30.0, boost: float = 3.0) -> dict[str, list[ChunkRef]]:
    """Per source, the order in which chunks should be tried for the sample.

    Documents are ordered by weighted random sampling without replacement
    (Efraimidis & Spirakis, 2006: key ``u ** (1 / w)``, largest first) with
    :func:`recency_weight`; then one chunk of each document is taken in that order
    before a second chunk of any document, so a sample covers as many documents as it
    can. The same chunks, seed and ``now_ts`` give the same order.
    """
    rng = random.Random(seed)
    by_source: dict[str, dict[str, list[ChunkRef]]] = defaultdict(lambda: defaultdict(list))
    for ref in sorted(chunks, key=lambda r: (r.source, r.doc_id, r.chunk_id)):
        by_source[ref.source][ref.doc_id].append(ref)
    order: dict[str, list[ChunkRef]] = {}
    for source in sorted(by_source):
        docs = by_source[source]
        keyed = []
        for doc_id in sorted(docs):
            refs = docs[doc_id]
            weight = recency_weight(refs[0].updated_ts, now_ts, half_life_days, boost)
            u = 1.0 - rng.random()  # (0, 1]
            keyed.append((u ** (1.0 / weight), doc_id))
            rng.shuffle(refs)
        ranked = [doc for _, doc in sorted(keyed, key=lambda kv: (-kv[0], kv[1]))]
        rounds = max(len(refs) for refs in docs.values())
        order[source] = [docs[d][i] for i in range(rounds) for d in ranked if i < len(docs[d])]
    return order


def allocate(n: int, capacity: Mapping[str, int]) -> dict[str, int]:
    """Split ``n`` samples over sources as evenly as their ``capacity`` allows
    (a small source gives its unused share to the others). Sources in name order get
    the remainder first."""
    quota = dict.fromkeys(capacity, 0)
    for _ in range(n):
        open_ = [s for s in sorted(capacity) if quota[s] < capacity[s]]
        if not open_:
            break
        quota[min(open_, key=lambda s: quota[s])] += 1
    return quota


def stratified_take(order: Mapping[str, Sequence[ChunkRef]], n: int,
                    accept: Callable[[list[ChunkRef]], list[bool]],
                    batch: int = 64) -> list[ChunkRef]:
    """Up to ``n`` chunks, spread over sources by :func:`allocate`, each source's taken
    in ``order`` and kept only when ``accept`` (called with batches) says so.

    When a source runs out of acceptable chunks its share goes to the others.
    """
    taken: dict[str, list[ChunkRef]] = {s: [] for s in order}
    cursor = dict.fromkeys(order, 0)
    while True:
        capacity = {s: len(taken[s]) + (len(order[s]) - cursor[s]) for s in order}
        quota = allocate(n, capacity)
        short = [s for s in order if len(taken[s]) < quota[s] and cursor[s] < len(order[s])]
        if not short:
            break
        for source in short:
            need = quota[source] - len(taken[source])
            while need > 0 and cursor[source] < len(order[source]):
                size = max(need * 2, min(batch, len(order[source]) - cursor[source]))
                part = list(order[source][cursor[source]:cursor[source] + size])
                cursor[source] += len(part)
                for ref, ok in zip(part, accept(part), strict=True):
                    if ok and need > 0:
                        taken[source].append(ref)
                        need -= 1
    out: list[ChunkRef] = []
    # interleave sources so the sample order does not group them
    for i in range(max((len(v) for v in taken.values()), default=0)):
        out += [taken[s][i] for s in sorted(taken) if i < len(taken[s])]
    return out


# ----------------------------------------------------------------------------- content

_LINK_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])?\s*\[[^\]]*\]\([^)]*\)\s*[.,;]?\s*$")
_TOC_DOTS = re.compile(r"\.{4,}\s*\d+\s*$")
_LICENSE = re.compile(
    r"licensed under the apache license|permission is hereby granted|all rights reserved|"
    r"gnu (?:lesser )?general public license|the software is provided \"as is\"|"
    r"spdx-license-identifier", re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]{2,}", re.UNICODE)


def chunk_body(text: str) -> str:
    """The chunk text without its context line (``title > heading`` + blank line)."""
    head, sep, body = text.partition("\n\n")
    return body if sep and "\n" not in head and len(head) < 300 else text


def why_not_informative(text: str, min_chars: int = 200) -> str | None:
    """Why a chunk is no good for a question, or ``None`` when it is.

    Rejects chunks shorter than ``min_chars`` (body only), with fewer than 12 words,
    tables of contents and link lists, mostly symbols or digits, highly repetitive
    text, and licence boilerplate.
    """
    body = chunk_body(text).strip()
    if len(body) < min_chars:
        return f"shorter than {min_chars} characters"
    words = _WORD.findall(body)
    if len(words) < 12:
        return "fewer than 12 words"
    lines = [ln for ln in body.splitlines() if ln.strip()]
    toc = sum(1 for ln in lines if _LINK_ITEM.match(ln) or _TOC_DOTS.search(ln))
    if lines and toc / len(lines) >= 0.6:
        return "table of contents or list of links"
    letters = sum(1 for ch in body if ch.isalpha())
    if letters / len(body) < 0.35:
        return "mostly symbols or digits"
    if len(words) >= 30 and len({w.lower() for w in words}) / len(words) < 0.2:
        return "repetitive"
    if _LICENSE.search(body) and len(body) < 2500:
        return "licence boilerplate"
    return None


# ----------------------------------------------------------------------------- metrics


def first_rank(ranked: Sequence[Any], expected: Callable[[Any], bool]) -> int | None:
    """The 1-based rank of the first item of ``ranked`` that is expected, else None."""
    for rank, item in enumerate(ranked, 1):
        if expected(item):
            return rank
    return None


def hit_rate(ranks: Sequence[int | None], k: int) -> float | None:
    """Share of ``ranks`` that are ``<= k`` (``None`` = not found); None if empty."""
    if not ranks:
        return None
    return sum(1 for r in ranks if r is not None and r <= k) / len(ranks)


def mrr(ranks: Sequence[int | None], k: int) -> float | None:
    """Mean of ``1/rank`` (0 beyond ``k`` or not found); None if empty."""
    if not ranks:
        return None
    return sum(1.0 / r for r in ranks if r is not None and r <= k) / len(ranks)


def faithfulness(verdicts: Sequence[bool]) -> float | None:
    """Supported statements / statements (RAGAS); None when there are no statements."""
    if not verdicts:
        return None
    return sum(1 for v in verdicts if v) / len(verdicts)


_CITATION = re.compile(r"\[(\d{1,2})\]")


def citations(answer: str, n_contexts: int) -> list[int]:
    """The context numbers (1-based) an answer cites as ``[n]``, in order, valid ones."""
    seen: list[int] = []
    for match in _CITATION.finditer(answer):
        i = int(match.group(1))
        if 1 <= i <= n_contexts and i not in seen:
            seen.append(i)
    return seen


def mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


class _Row(BaseModel):
    """A typed row of the report. ``row["key"]`` reads a field as the JSON report's
    dicts are read (``report["metrics"]["sample"]["doc_hit_rate"]``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)


class Metrics(_Row):
    """The measures of one set of questions (a set, a source): :func:`aggregate`'s result.

    Attributes:
        questions: items with a question (retrieval measured); ``items``: all items.
        chunk_hit_rate, chunk_mrr, doc_hit_rate, doc_mrr: 0..1 at k (None: no chunk to
            find, e.g. golden questions, or nothing asked).
        judged: answers checked; judge_failures / judge_failure_rate: items with an
            unusable LLM reply (rate over the items the LLM was asked about).
        faithfulness: 0..1; correctness: 1..5 (None: not measured).
    """

    questions: int
    items: int
    chunk_hit_rate: float | None = None
    chunk_mrr: float | None = None
    doc_hit_rate: float | None = None
    doc_mrr: float | None = None
    judged: int = 0
    judge_failures: int = 0
    judge_failure_rate: float | None = None
    faithfulness: float | None = None
    correctness: float | None = None


def aggregate(results: Sequence[Mapping[str, Any]], k: int) -> Metrics:
    """Metrics over per-question results (dicts as written in the report).

    Each result may have ``chunk_rank``, ``doc_rank`` (None = not in the top k),
    ``question`` (None = no question: left out of retrieval metrics), ``llm_used`` (the
    LLM was asked something for it), ``judged`` (its answer was checked, successfully
    or not), ``faithfulness`` and ``correctness`` (None = that check failed),
    ``has_reference`` (False = no reference, correctness not graded) and
    ``judge_failed`` (some reply of the LLM for it was unusable).

    A failed check counts as faithfulness 0 and correctness 1 (the lowest grade): an
    answer whose check failed is never counted as a pass. Floats are rounded to 4 digits.
    """
    asked = [r for r in results if r.get("question")]
    out: dict[str, Any] = {"questions": len(asked), "items": len(results)}
    chunk_ranks = [r.get("chunk_rank") for r in asked if "chunk_rank" in r]
    doc_ranks = [r.get("doc_rank") for r in asked]
    out["chunk_hit_rate"] = hit_rate(chunk_ranks, k) if chunk_ranks else None
    out["chunk_mrr"] = mrr(chunk_ranks, k) if chunk_ranks else None
    out["doc_hit_rate"] = hit_rate(doc_ranks, k)
    out["doc_mrr"] = mrr(doc_ranks, k)
    judged = [r for r in asked if r.get("judged")]
    out["judged"] = len(judged)
    used = [r for r in results if r.get("llm_used")]
    out["judge_failures"] = sum(1 for r in used if r.get("judge_failed"))
    out["judge_failure_rate"] = out["judge_failures"] / len(used) if used else None
    # judged but no score = the check failed: lowest score, never a pass
    faith = [r.get("faithfulness") or 0.0 for r in judged]
    out["faithfulness"] = mean(faith) if faith else None
    graded = [r for r in judged if r.get("has_reference", True)]
    out["correctness"] = mean([r.get("correctness") or 1.0 for r in graded]) if graded else None
    return Metrics(**{key: round(v, 4) if isinstance(v, float) else v for key, v in out.items()})


#: ``(metric in aggregate(), threshold field, direction)``
THRESHOLD_CHECKS: tuple[tuple[str, str, str], ...] = (
    ("doc_hit_rate", "min_doc_hit_rate", ">="),
    ("chunk_hit_rate", "min_chunk_hit_rate", ">="),
    ("doc_mrr", "min_doc_mrr", ">="),
    ("faithfulness", "min_faithfulness", ">="),
    ("correctness", "min_correctness", ">="),
    ("judge_failure_rate", "max_judge_failure_rate", "<="),
)


class ThresholdCheck(_Row):
    """One threshold checked against one set's measure.

    Attributes:
        set: ``sample``, ``golden`` or ``golden <mode>``.
        metric: a :class:`Metrics` field; value: its measure; op: ``>=`` or ``<=``;
        threshold: the configured limit; passed: whether the value meets it.
        verdict: whether it decides the result (False: measured with a stand-in model,
            reported only).
    """

    set: str
    metric: str
    value: float
    op: Literal[">=", "<="]
    threshold: float
    passed: bool
    verdict: bool = True


def check_thresholds(metrics: Metrics | Mapping[str, Any],
                     thresholds: Mapping[str, float | None],
                     label: str) -> list[ThresholdCheck]:
    """One check per threshold that applies (set and measured). A metric that was not
    measured is not checked."""
    rows = []
    for metric, field, op in THRESHOLD_CHECKS:
        limit, value = thresholds.get(field), metrics[metric]
        if limit is None or value is None:
            continue
        passed = value >= limit if op == ">=" else value <= limit
        rows.append(ThresholdCheck(set=label, metric=metric, value=value, op=op,
                                   threshold=limit, passed=passed))
    return rows


def metric_name(metric: str, k: int) -> str:
    """The words for a metric key of :func:`aggregate` (``doc_hit_rate`` -> ``document
    hit@5``)."""
    names = {"doc_hit_rate": f"document hit@{k}", "chunk_hit_rate": f"chunk hit@{k}",
             "doc_mrr": "document MRR", "chunk_mrr": "chunk MRR",
             "judge_failure_rate": "judge failure rate"}
    return names.get(metric, metric.replace("_", " "))


def describe_failures(rows: Sequence[ThresholdCheck], k: int) -> str:
    """A one-line reason listing the missed thresholds."""
    parts = [f"{r.set} {metric_name(r.metric, k)} {r.value:.2f} "
             f"(needs {r.op} {r.threshold:g})" for r in rows if not r.passed]
    return "thresholds missed: " + "; ".join(parts) if parts else ""


# ------------------------------------------------------------------ rendering
# One renderer per medium: JSON is ``model_dump()`` (the report file, the history, the
# flow's return value); Markdown (the Prefect artifact) and the terminal (the CLI's rich
# table) both lay out :data:`RESULT_COLUMNS`, so a column is declared once.


def fmt(value: Any, digits: int = 2) -> str:
    """A measure as shown: ``–`` for not measured, floats to ``digits`` places."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def result_columns(k: int, short: bool = False) -> list[tuple[str, str]]:
    """``(heading, Metrics field)`` of a results table at ``k``; ``short``: the narrow
    headings of the terminal."""
    columns = [("questions", "n", "questions"),
               (f"chunk hit@{k}", "chunk hit", "chunk_hit_rate"),
               ("chunk MRR", "chunk MRR", "chunk_mrr"),
               (f"doc hit@{k}", "doc hit", "doc_hit_rate"), ("doc MRR", "doc MRR", "doc_mrr"),
               ("faithfulness", "faith", "faithfulness"),
               ("correctness", "correct", "correctness"),
               ("judge failures", "judge fail", "judge_failures")]
    return [(narrow if short else wide, field) for wide, narrow, field in columns]


def result_cells(metrics: Metrics, k: int) -> list[str]:
    """The cells of one results row, in :func:`result_columns` order."""
    return [fmt(metrics[field]) for _, field in result_columns(k)]


def md_escape(text: Any) -> str:
    """``text`` safe in a Markdown table cell (``|`` escaped, one line)."""
    return str(text or "").replace("|", "\\|").replace("\n", " ")


def _md_table(headings: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    return lines + ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows]


def results_markdown(rows: Sequence[tuple[str, Metrics]], k: int, first: str) -> list[str]:
    """A Markdown results table, one row per ``(label, metrics)``."""
    return _md_table([first] + [h for h, _ in result_columns(k)],
                     ([label] + result_cells(m, k) for label, m in rows))


def thresholds_markdown(checks: Sequence[ThresholdCheck], k: int) -> list[str]:
    """A Markdown table of the threshold checks (stand-in rows marked as no verdict)."""
    def result(c: ThresholdCheck) -> str:
        word = "pass" if c.passed else "FAIL"
        return word if c.verdict else f"{word.lower()} (not a verdict: stand-in model)"

    rows = [[c.set, metric_name(c.metric, k), fmt(c.value), f"{c.op} {c.threshold:g}",
             result(c)] for c in checks] or [["–", "nothing measured", "", "", ""]]
    return _md_table(["set", "metric", "value", "threshold", "result"], rows)


def is_finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)

"""Validation: the local LLM spot-checks that the index still answers questions.

``validate`` (a Prefect flow; ``kbsync validate``; after each ``sync-all`` when
``validation.after_sync``) does, for a sample of chunks:

1. **Sample** N chunks (``validation.sample_size``), spread evenly over sources,
   favouring recently changed documents, one chunk per document first, skipping chunks
   that are too short or have no content (tables of contents, link lists, licence
   text). A seed makes the sample repeatable (``transforms.evaluation``).
2. **Question**: the LLM writes one question the chunk answers (JSON).
3. **Retrieve** the top-k chunks with :func:`flows.retrieve.retrieve` (the same model,
   mode and index users query) and record the rank of the source chunk and of its
   document -> hit@k and MRR at chunk and document level.
4. **Answer** the question from the retrieved chunks only, citing them as ``[n]``;
   contexts that would not fit ``llm.max_context_tokens`` are dropped from the lowest
   rank up.
5. **Judge**: faithfulness as in RAGAS (statements of the answer, each supported by the
   context or not; supported / total) and correctness against the source chunk (1-5
   with a one-line reason).
6. A **golden set** (``validation.golden_set``, YAML) is evaluated on every run the same
   way (document level: expected document ids or URLs; correctness against a
   reference answer when given) and reported separately.
7. Metrics are compared with ``validation.thresholds``; a missed threshold ends the
   flow run **Failed** with the reason as the state message.
8. A Prefect markdown artifact (``validation-report``) and a table artifact
   (``validation-samples``) are published; the JSON report is written under
   ``<data_dir>/validation/`` and a line appended to ``history.jsonl``.

When no LLM endpoint answers, the flow still measures what needs none (the golden
set's retrieval) and ends in a Completed state named **Unchecked** whose message says
that answer quality was not checked: it never reports a pass it did not measure.

Statuses: ``passed``, ``failed`` (a threshold missed), ``unchecked`` (no LLM, or
nothing to measure).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.states import Completed, Failed, State
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from connectors.base import redact
from connectors.llm import (
    InvalidJSONReply,
    LLMClient,
    LLMError,
    LLMRequestError,
    LLMUnavailable,
)
from flows.ask import answer_prompt
from flows.retrieve import RetrievedChunk, open_store, retrieve
from flows.settings import ConfigError, Settings, load_settings
from transforms.answering import Passage, format_contexts, question_language
from transforms.evaluation import (
    ChunkRef,
    Metrics,
    ThresholdCheck,
    aggregate,
    check_thresholds,
    chunk_body,
    citations,
    describe_failures,
    faithfulness,
    first_rank,
    md_escape,
    results_markdown,
    sampling_order,
    stratified_take,
    thresholds_markdown,
    why_not_informative,
)
from transforms.replies import message_tokens

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
REPORT_ARTIFACT = "validation-report"
TABLE_ARTIFACT = "validation-samples"


class ValidationFailed(Exception):
    """A validation run missed a threshold; ``report`` is the full report (a dict)."""

    def __init__(self, reason: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.report = report or {}

    def __reduce__(self):  # keep the report when the exception is pickled (Prefect results)
        return (ValidationFailed, (str(self), self.report))


# ----------------------------------------------------------------------------- golden set


class GoldenItem(BaseModel):
    """One golden question: ``expected`` are document ids (``source:native id``) or
    URLs, any of which counts as found; ``reference`` is an optional reference answer."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=3)
    expected: list[str] = Field(min_length=1)
    reference: str | None = None

    @field_validator("expected", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


def load_golden_set(path: Path) -> list[GoldenItem]:
    """Read a golden set: a YAML list of items (or ``{questions: [...]}``).

    Raises:
        ConfigError: missing or unreadable file, bad YAML, or an invalid item (named).
    """
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"validation.golden_set: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"validation.golden_set: {path} is not valid YAML: {exc}") from None
    if isinstance(data, dict):
        data = data.get("questions")
    if not isinstance(data, list):
        raise ConfigError(f"validation.golden_set: {path} must hold a list of questions")
    items = []
    for i, raw in enumerate(data):
        try:
            items.append(GoldenItem.model_validate(raw))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"validation.golden_set: {path} item {i}: {where}: "
                              f"{first['msg']}") from None
    return items


# ----------------------------------------------------------------------------- LLM replies


class QuestionReply(BaseModel):
    question: str = Field(min_length=8, max_length=400)


class StatementVerdict(BaseModel):
    statement: str
    supported: bool


class FaithfulnessReply(BaseModel):
    statements: list[StatementVerdict] = Field(max_length=20)


class CorrectnessReply(BaseModel):
    score: Literal[1, 2, 3, 4, 5]  # an enum: grammar-constrained servers enforce it
    reason: str


QUESTION_SYSTEM = ("You write evaluation questions for a search system over a team's "
                   "documentation, code and tickets.")
QUESTION_USER = (
    'Passage from "{title}":\n"""\n{text}\n"""\n\n'
    "Write one specific question that this passage answers. The question must make sense "
    "on its own, without the passage: name the product, component or topic it is about. "
    "Do not mention 'the passage' or 'the text'. "
    'Reply as a JSON object with the key "question".')
FAITHFULNESS_SYSTEM = "You check whether statements are supported by a context. Be strict."
FAITHFULNESS_USER = (
    "Context:\n{contexts}\n\nAnswer to check:\n{answer}\n\n"
    "Split the answer into short standalone factual statements (at most 8). For each "
    "statement, decide whether the context supports it: true if it can be directly "
    "inferred from the context, false otherwise. "
    'Reply as a JSON object with the key "statements": a list of objects with the keys '
    '"statement" (text) and "supported" (true or false).')
CORRECTNESS_SYSTEM = "You grade answers against a reference. Be strict and brief."
CORRECTNESS_USER = (
    "Question: {question}\n\nReference:\n{reference}\n\nAnswer to grade:\n{answer}\n\n"
    "Grade how correct and complete the answer is compared with the reference, from 1 "
    "(wrong, or no answer) to 5 (fully correct), with a one-line reason. "
    'Reply as a JSON object with the keys "score" (an integer from 1 to 5) and "reason".')


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """What one validation run holds while it works."""

    settings: Settings
    seed: int
    sample_size: int
    llm: LLMClient
    llm_error: str | None = None
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    notes: list[str] = field(default_factory=list)

    @property
    def k(self) -> int:
        return self.settings.validation.top_k

    @property
    def llm_ok(self) -> bool:
        return self.llm_error is None

    def lost_llm(self, exc: LLMUnavailable) -> None:
        if self.llm_error is None:
            self.llm_error = str(exc)
            self.notes.append(f"the LLM became unreachable during the run: {exc}")


def _timed(run: Run, stage: str, start: float) -> None:
    run.seconds[stage] = round(run.seconds[stage] + time.perf_counter() - start, 4)


def _fit(run: Run, template_messages: list[dict[str, str]], contexts: list[str]) -> int:
    """How many contexts fit beside the fixed part of the prompt."""
    from connectors.llm import fit_contexts

    fixed = message_tokens(template_messages) + 64  # JSON schema / instructions margin
    return fit_contexts(fixed, contexts, run.llm.prompt_budget)


def _write_question(run: Run, ref: ChunkRef, text: str, title: str) -> tuple[str, str]:
    """(question, model) for a chunk; raises InvalidJSONReply / LLM errors."""
    body = chunk_body(text).strip()
    budget_chars = max(400, (run.llm.prompt_budget - 400) * 3)
    messages = [{"role": "system", "content": QUESTION_SYSTEM},
                {"role": "user", "content": QUESTION_USER.format(title=title,
                                                                 text=body[:budget_chars])}]
    start = time.perf_counter()
    try:
        reply, meta = run.llm.chat_json(messages, QuestionReply, purpose="question",
                                        preset="balanced", seed=run.seed)
    finally:
        _timed(run, "llm_question", start)
    return " ".join(reply.question.split()), meta.model


def _answer_and_judge(run: Run, row: dict[str, Any], question: str,
                      hits: list[RetrievedChunk], reference: str | None) -> None:
    """Steps 4 and 5 for one question; fills ``row`` (never raises LLM errors except
    LLMUnavailable)."""
    row["judged"] = True
    row["has_reference"] = reference is not None
    try:  # the same prompt as `kbsync ask`
        messages, kept = answer_prompt(run.llm, question, hits,
                                       language=question_language(question))
    except LLMError as exc:
        row["judge_failed"], row["error"] = True, str(exc)
        return
    contexts = format_contexts([Passage(h.title, h.text) for h in hits[:kept]])
    row["contexts_used"], row["contexts_dropped"] = kept, len(hits) - kept
    start = time.perf_counter()
    try:
        answer = run.llm.chat(messages, purpose="answer", preset="factual", seed=run.seed)
    except LLMRequestError as exc:
        row["judge_failed"], row["error"] = True, f"answer: {exc}"
        return
    finally:
        _timed(run, "llm_answer", start)
    row["answer"] = answer.text
    row["answered_by"] = answer.model
    cited = citations(answer.text, kept)
    row["citations"] = [hits[i - 1].chunk_id for i in cited]
    if not answer.text:
        row["judge_failed"], row["error"] = True, "empty answer (cut off while reasoning?)"
        return

    judge_models: list[str] = []
    # faithfulness: statements of the answer against the contexts the answer saw
    f_template = [{"role": "system", "content": FAITHFULNESS_SYSTEM},
                  {"role": "user", "content": FAITHFULNESS_USER.format(
                      contexts="", answer=answer.text)}]
    f_contexts = contexts[:_fit_or_zero(run, f_template, contexts)]
    f_messages = [f_template[0], {"role": "user", "content": FAITHFULNESS_USER.format(
        contexts="\n\n".join(f_contexts) or "(none)", answer=answer.text)}]
    start = time.perf_counter()
    try:
        verdicts, meta = run.llm.chat_json(f_messages, FaithfulnessReply,
                                           purpose="faithfulness", seed=run.seed)
        judge_models.append(meta.model)
        score = faithfulness([v.supported for v in verdicts.statements])
        row["statements"] = len(verdicts.statements)
        row["statements_supported"] = sum(1 for v in verdicts.statements if v.supported)
        if score is None:
            row["judge_failed"] = True
            row["error"] = "faithfulness: the judge found no statements in the answer"
        row["faithfulness"] = score
    except (InvalidJSONReply, LLMRequestError) as exc:
        row["judge_failed"], row["error"] = True, f"faithfulness: {exc}"
    finally:
        _timed(run, "llm_judge", start)

    if reference is not None:
        c_messages = [{"role": "system", "content": CORRECTNESS_SYSTEM},
                      {"role": "user", "content": CORRECTNESS_USER.format(
                          question=question, reference=reference[:6000],
                          answer=answer.text)}]
        start = time.perf_counter()
        try:
            grade, meta = run.llm.chat_json(c_messages, CorrectnessReply,
                                            purpose="correctness", seed=run.seed)
            judge_models.append(meta.model)
            row["correctness"] = grade.score
            row["correctness_reason"] = " ".join(grade.reason.split())[:300]
        except (InvalidJSONReply, LLMRequestError) as exc:
            row["judge_failed"] = True
            row["error"] = "; ".join(filter(None, [row.get("error"), f"correctness: {exc}"]))
        finally:
            _timed(run, "llm_judge", start)
    row["judged_by"] = ", ".join(dict.fromkeys(judge_models)) or None


def _fit_or_zero(run: Run, template: list[dict[str, str]], contexts: list[str]) -> int:
    try:
        return _fit(run, template, contexts)
    except LLMError:
        return 0


def _retrieve(run: Run, question: str, mode: str | None = None) -> list[RetrievedChunk]:
    start = time.perf_counter()
    try:
        return retrieve(run.settings, question, k=run.k, mode=mode)
    finally:
        _timed(run, "retrieval", start)


@task(name="validate-chunk", cache_policy=NO_CACHE)
def check_chunk(run: Run, ref: ChunkRef, text: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Question -> retrieval -> answer -> judge for one sampled chunk; returns its row."""
    row: dict[str, Any] = {
        "set": "sample", "source": ref.source, "doc_id": ref.doc_id, "chunk_id": ref.chunk_id,
        "title": str(meta.get("title", "")), "url": str(meta.get("url", "")),
        "updated_at": meta.get("updated_at"), "question": None, "llm_used": True,
    }
    try:
        row["question"], row["question_by"] = _write_question(run, ref, text, row["title"])
    except (InvalidJSONReply, LLMRequestError) as exc:
        row["judge_failed"], row["error"] = True, f"question: {exc}"
        return row
    hits = _retrieve(run, row["question"])
    row["retrieved"] = [h.chunk_id for h in hits]
    row["chunk_rank"] = first_rank(hits, lambda h: h.chunk_id == ref.chunk_id)
    row["doc_rank"] = first_rank(hits, lambda h: h.doc_id == ref.doc_id)
    if run.settings.validation.check_answers:
        _answer_and_judge(run, row, row["question"], hits, chunk_body(text).strip())
    return row


def _matches_expected(hit: RetrievedChunk, expected: set[str]) -> bool:
    url = hit.url.rstrip("/")
    return hit.doc_id in expected or (bool(url) and url in expected)


@task(name="validate-golden", cache_policy=NO_CACHE)
def check_golden(run: Run, index: int, item: GoldenItem) -> dict[str, Any]:
    """Retrieval (and, with an LLM, answer and judge) for one golden question."""
    expected = {e.strip().rstrip("/") for e in item.expected}
    hits = _retrieve(run, item.question)
    row: dict[str, Any] = {
        "set": "golden", "index": index, "question": item.question,
        "expected": sorted(expected), "retrieved": [h.chunk_id for h in hits],
        "doc_rank": first_rank(hits, lambda h: _matches_expected(h, expected)),
        "llm_used": False,
    }
    main_mode = run.settings.retrieval.mode
    row["mode_ranks"] = {  # validation.golden_modes: each retrieval mode on its own
        mode: first_rank(_retrieve(run, item.question, mode),
                         lambda h: _matches_expected(h, expected))
        for mode in run.settings.validation.golden_modes if mode != main_mode}
    top = next((h for h in hits if _matches_expected(h, expected)), None)
    row["source"] = top.metadata.get("source", "") if top else ""
    row["title"] = top.title if top else ""
    row["url"] = top.url if top else ""
    if run.llm_ok and run.settings.validation.check_answers:
        row["llm_used"] = True
        _answer_and_judge(run, row, item.question, hits, item.reference)
    return row


# ----------------------------------------------------------------------------- sampling


@task(name="sample-chunks", cache_policy=NO_CACHE)
def sample_chunks(settings: Settings, n: int, seed: int,
                  now: datetime | None = None) -> list[tuple[ChunkRef, str, dict[str, Any]]]:
    """``n`` informative chunks (ref, text, metadata), stratified by source and favouring
    recently changed documents (see :func:`transforms.evaluation.sampling_order`)."""
    store = open_store(settings)
    refs: list[ChunkRef] = []
    for chunk_id, meta in store.iter_metadata():
        ts = meta.get("updated_ts")
        refs.append(ChunkRef(chunk_id, str(meta.get("doc_id", "")), str(meta.get("source", "")),
                             float(ts) if isinstance(ts, int | float) else None))
    if not refs:
        return []
    v = settings.validation
    now_ts = (now or datetime.now(UTC)).timestamp()
    order = sampling_order(refs, seed=seed, now_ts=now_ts,
                           half_life_days=v.recency_half_life_days, boost=v.recency_boost)
    col = store.collection(create=False)
    fetched: dict[str, tuple[str, dict[str, Any]]] = {}

    def accept(part: list[ChunkRef]) -> list[bool]:
        res = col.get(ids=[r.chunk_id for r in part], include=["documents", "metadatas"])
        got = {cid: (doc or "", meta or {}) for cid, doc, meta in
               zip(res["ids"], res["documents"], res["metadatas"], strict=True)}
        fetched.update(got)
        return [r.chunk_id in got and why_not_informative(got[r.chunk_id][0],
                                                          v.min_chunk_chars) is None
                for r in part]

    chosen = stratified_take(order, n, accept)
    return [(r, *fetched[r.chunk_id]) for r in chosen]


# ----------------------------------------------------------------------------- report


def _llm_section(run: Run, endpoint_label: str | None) -> dict[str, Any]:
    calls = run.llm.summary()
    used = list(calls.get("by_model", {}))
    primary = run.llm.config.endpoints[0].label
    return {
        "available": run.llm_ok,
        "primary": primary,
        "endpoint": endpoint_label,
        "fallback_used": bool(endpoint_label and endpoint_label != primary),
        "models_used": used,
        "json_modes": run.llm.json_modes(),
        "error": run.llm_error,
        "calls": calls,
        "call_log": [c.to_dict() for c in run.llm.calls],
    }


def _by_source(rows: list[dict[str, Any]], k: int) -> dict[str, Metrics]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row.get("source") or "?"].append(row)
    return {s: aggregate(g, k) for s, g in sorted(groups.items())}


def build_report(run: Run, *, started: datetime, samples: list[dict[str, Any]],
                 golden: list[dict[str, Any]], endpoint_label: str | None,
                 sampled_note: str | None) -> dict[str, Any]:
    """The report (a JSON-able dict) with the status and the reason."""
    settings, k = run.settings, run.k
    v = settings.validation
    thresholds = {"sample": v.thresholds.model_dump(),
                  "golden": (v.golden_thresholds or v.thresholds).model_dump()}
    metrics = {"sample": aggregate(samples, k) if samples else None,
               "golden": aggregate(golden, k) if golden else None}
    for mode in v.golden_modes:  # retrieval only, one mode at a time
        if mode != settings.retrieval.mode and golden:
            metrics[f"golden {mode}"] = aggregate(
                [{"question": r["question"], "doc_rank": r.get("mode_ranks", {}).get(mode)}
                 for r in golden], k)
            thresholds[f"golden {mode}"] = thresholds["golden"]
    rows: list[ThresholdCheck] = []
    for label, m in metrics.items():
        if m:
            rows += check_thresholds(m, thresholds[label], label)
    standin = settings.llm.standin and run.llm_ok
    if standin:
        # answers, and questions the model wrote, measure the stand-in, not the index
        rows = [r.model_copy(update={"verdict": r.set != "sample"
                                     and r.metric not in ANSWER_METRICS}) for r in rows]
    verdict_rows = [r for r in rows if r.verdict]
    reason = describe_failures(verdict_rows, k)
    answers_checked = run.llm_ok and settings.validation.check_answers and any(
        r.get("judged") for r in samples + golden)
    retrieval_checked = any(r.get("question") for r in samples + golden)
    notes = list(run.notes)
    if sampled_note:
        notes.append(sampled_note)
    if not run.llm_ok:
        notes.insert(0, "ANSWER QUALITY NOT CHECKED: " + (run.llm_error or "no LLM") +
                     (". Only the golden set's retrieval was measured." if golden else
                      ". No golden set is configured, so retrieval was not measured either."))
    elif not settings.validation.check_answers:
        notes.append("answers were not checked (validation.check_answers is false): "
                     "questions and retrieval only")
    if standin:
        missed = describe_failures([r for r in rows if not r.verdict], k)
        notes.insert(0, f"NOT A VERDICT: {_llm_label(run)} is a stand-in model (llm.standin): "
                        "the sampled questions it wrote and the answers it gave are "
                        "reported but do not decide the result; only the golden set's "
                        "retrieval does. Use a real model (e.g. DeepSeek-R1 on Ollama) "
                        "for a verdict on answer quality" +
                        (f" (stand-in figures: {missed.removeprefix('thresholds missed: ')})"
                         if missed else ""))
    if reason:
        status = "failed"
    elif not run.llm_ok or not retrieval_checked:
        status = "unchecked"
        reason = notes[0] if notes else "nothing was measured"
    elif standin and not verdict_rows:
        status = "unchecked"
        reason = ("ANSWER QUALITY NOT A VERDICT and no golden set: a stand-in model "
                  "answered, so nothing measured decides the result (set "
                  "validation.golden_set)")
    elif standin:
        status = "passed"
        reason = ("golden-set retrieval thresholds met; answer quality measured with a "
                  "stand-in model: reported, not a verdict")
    else:
        status = "passed"
        what = "retrieval and answers" if answers_checked else "retrieval"
        reason = f"all thresholds met ({what} checked)"
    finished = datetime.now(UTC)
    flow_run = FlowRunContext.get()
    return {
        "status": status,
        "reason": reason,
        "checked": {"retrieval": retrieval_checked, "answers": bool(answers_checked)},
        "notes": notes,
        "run": {
            "started_at": started.isoformat(), "finished_at": finished.isoformat(),
            "seconds": {"total": round((finished - started).total_seconds(), 3),
                        **{k_: round(v, 3) for k_, v in run.seconds.items()}},
            "flow_run_id": str(flow_run.flow_run.id) if flow_run and flow_run.flow_run else None,
            "seed": run.seed, "sample_size": run.sample_size, "top_k": k,
            "retrieval_mode": settings.retrieval.mode,
            "collection": settings.chroma.collection,
            "embedding_model": settings.embedding.model,
        },
        "llm": _llm_section(run, endpoint_label),
        "metrics": {label: m.model_dump() if m else None for label, m in metrics.items()},
        "by_source": {s: m.model_dump() for s, m in _by_source(samples, k).items()},
        "thresholds": [r.model_dump() for r in rows],
        "samples": samples,
        "golden": golden,
    }


#: Metrics of the model's answers (see :func:`transforms.evaluation.aggregate`).
ANSWER_METRICS = frozenset({"faithfulness", "correctness", "judge_failure_rate"})


def _llm_label(run: Run) -> str:
    active = run.llm.active
    return active.label if active else run.llm.config.endpoints[0].label


def report_markdown(report: dict[str, Any]) -> str:
    """The markdown artifact: status, reason, thresholds, model, per-source breakdown
    (the tables by :func:`transforms.evaluation.thresholds_markdown` and
    :func:`~transforms.evaluation.results_markdown`)."""
    k = report["run"]["top_k"]
    title = {"passed": "PASSED", "failed": "FAILED", "unchecked": "NOT CHECKED"}[report["status"]]
    llm = report["llm"]
    lines = [f"# kbsync validation: {title}", "", f"**{md_escape(report['reason'])}**", ""]
    for note in report["notes"]:
        lines.append(f"- {md_escape(note)}")
    if report["notes"]:
        lines.append("")
    run = report["run"]
    judged = ", ".join(llm["models_used"]) or "none"
    lines += [
        f"- model: `{llm['primary']}`" + (f"; fallback used: `{llm['endpoint']}`"
                                          if llm["fallback_used"] else ""),
        f"- answered and judged by: {judged}",
        f"- sample: {run['sample_size']} chunks requested, seed {run['seed']}, top-k {k}, "
        f"retrieval `{run['retrieval_mode']}`, collection `{run['collection']}`",
        "- seconds: " + ", ".join(f"{s} {v:.1f}" for s, v in run["seconds"].items()),
        "", "## Thresholds", "",
    ]
    lines += thresholds_markdown([ThresholdCheck(**r) for r in report["thresholds"]], k)
    lines += ["", "## Results", ""]
    lines += results_markdown([(label, Metrics(**m)) for label, m in report["metrics"].items()
                               if m], k, first="set")
    if report["by_source"]:
        lines += ["", "## Per source (sampled chunks)", ""]
        lines += results_markdown([(s, Metrics(**m)) for s, m in report["by_source"].items()],
                                  k, first="source")
    calls = llm["calls"]
    if calls.get("calls"):
        lines += ["", "## LLM calls", "",
                  f"{calls['calls']} calls ({calls['failed']} failed, {calls['invalid_json']} "
                  f"invalid JSON replies), latency mean {calls['latency_mean_seconds']:.1f} s, "
                  f"p95 {calls['latency_p95_seconds']:.1f} s; tokens: {calls['prompt_tokens']} "
                  f"prompt, {calls['completion_tokens']} completion.", ""]
        lines += ["| purpose | calls | failed | seconds |", "|---|---|---|---|"]
        for purpose, p in calls["by_purpose"].items():
            lines.append(f"| {purpose} | {p['calls']} | {p['failed']} | {p['seconds']:.1f} |")
        if llm["json_modes"]:
            lines += ["", "JSON mode: " + ", ".join(f"`{m}` ({e})"
                                                   for e, m in llm["json_modes"].items())]
    return "\n".join(lines) + "\n"


def report_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The table artifact: one row per sampled chunk and golden question."""
    rows = []
    for row in report["samples"] + report["golden"]:
        rows.append({
            "set": row["set"], "source": row.get("source", ""), "title": row.get("title", ""),
            "url": row.get("url", ""), "question": row.get("question") or "",
            "chunk rank": row.get("chunk_rank", "–") if row["set"] == "sample" else "–",
            "doc rank": row.get("doc_rank"), "faithfulness": row.get("faithfulness"),
            "correctness": row.get("correctness"), "note": row.get("error") or "",
        })
    return rows


def write_report(settings: Settings, report: dict[str, Any]) -> Path:
    """Write ``<data_dir>/validation/<time>.json``, append to ``history.jsonl``, and
    keep the newest ``validation.history_keep`` reports. Returns the report's path."""
    folder = settings.validation_dir
    folder.mkdir(parents=True, exist_ok=True)
    stamp = report["run"]["started_at"].replace(":", "").replace("-", "").split(".")[0]
    path = folder / f"report-{stamp}-{report['run']['seed']}.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str),
                    encoding="utf-8")
    entry = {
        "started_at": report["run"]["started_at"], "status": report["status"],
        "reason": report["reason"], "seed": report["run"]["seed"],
        "sample_size": report["run"]["sample_size"], "top_k": report["run"]["top_k"],
        "seconds": report["run"]["seconds"].get("total"),
        "models": report["llm"]["models_used"], "checked": report["checked"],
        "sample": report["metrics"]["sample"], "golden": report["metrics"]["golden"],
        "report": path.name,
    }
    with (folder / HISTORY_FILE).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
    reports = sorted(folder.glob("report-*.json"))
    for old in reports[:-settings.validation.history_keep]:
        old.unlink(missing_ok=True)
    return path


def read_history(settings: Settings, last: int = 20) -> list[dict[str, Any]]:
    """The newest ``last`` history entries, oldest first (unreadable lines skipped)."""
    path = settings.validation_dir / HISTORY_FILE
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries[-last:]


def _publish(report: dict[str, Any], secrets_: list[str]) -> None:
    if FlowRunContext.get() is None:
        return
    try:
        create_markdown_artifact(
            markdown=redact(report_markdown(report), secrets_), key=REPORT_ARTIFACT,
            description=f"kbsync validation: {report['status']}")
        create_table_artifact(table=report_table(report), key=TABLE_ARTIFACT,
                              description="kbsync validation: one row per question")
    except Exception as exc:  # noqa: BLE001 - a UI artifact must not fail the run
        log.warning("could not publish the validation artifacts: %s", exc)


def run_validation(settings: Settings, *, sample_size: int | None = None,
                   seed: int | None = None, llm: LLMClient | None = None) -> dict[str, Any]:
    """Validate the index (the body of the ``validate`` flow; must run inside a flow).

    Args:
        settings: loaded settings (``validation.*``, ``llm.*``, the index).
        sample_size: chunks to sample; default ``validation.sample_size``.
        seed: sampling seed; default ``validation.seed``, else a new random one (the
            report records it, so a run can be repeated).
        llm: a client to use instead of one built from ``llm.*``.

    Returns:
        The report (see :func:`build_report`), also written under the data dir.

    Raises:
        ConfigError: the golden set cannot be read.
        connectors.chroma.EmbeddingModelMismatch: the collection holds another model.
    """
    logger = get_run_logger()
    started = datetime.now(UTC)
    v = settings.validation
    n = sample_size or v.sample_size
    seed = seed if seed is not None else v.seed if v.seed is not None else secrets.randbelow(
        2**31)
    run = Run(settings=settings, seed=seed, sample_size=n,
              llm=llm or LLMClient(settings.llm_config()))
    golden_items = load_golden_set(v.golden_set) if v.golden_set else []
    endpoint_label: str | None = None
    try:
        start = time.perf_counter()
        try:
            endpoint_label = run.llm.probe().label
        except LLMUnavailable as exc:
            run.llm_error = str(exc)
            logger.warning("validation without an LLM: %s", exc)
        _timed(run, "llm_probe", start)

        samples: list[dict[str, Any]] = []
        sampled_note = None
        if run.llm_ok:
            start = time.perf_counter()
            chosen = sample_chunks(settings, n, seed)
            _timed(run, "sampling", start)
            if len(chosen) < n:
                sampled_note = (f"only {len(chosen)} informative chunks could be sampled "
                                f"({n} requested)")
            for ref, text, meta in chosen:
                if not run.llm_ok:
                    break
                try:
                    samples.append(check_chunk.with_options(
                        task_run_name=f"chunk {ref.source}: {str(meta.get('title', ''))[:60]}",
                    )(run, ref, text, meta))
                except LLMUnavailable as exc:
                    run.lost_llm(exc)
        golden: list[dict[str, Any]] = []
        for i, item in enumerate(golden_items):
            try:
                golden.append(check_golden.with_options(task_run_name=f"golden {i}")(
                    run, i, item))
            except LLMUnavailable as exc:
                run.lost_llm(exc)
                golden.append(check_golden.with_options(task_run_name=f"golden {i}")(
                    run, i, item))
        active = run.llm.active
        endpoint_label = active.label if run.llm_ok and active else None
        report = build_report(run, started=started, samples=samples, golden=golden,
                              endpoint_label=endpoint_label, sampled_note=sampled_note)
    finally:
        run.llm.close()
    path = write_report(settings, report)
    report["report_path"] = str(path)
    _publish(report, settings.llm_config().secrets)
    logger.info("validation %s: %s (report %s)", report["status"], report["reason"], path)
    return report


def final_state(report: dict[str, Any]) -> State:
    """The flow's final state: Failed (a threshold missed; data = :class:`ValidationFailed`),
    Completed named ``Unchecked`` (nothing or no answers measured), or Completed."""
    if report["status"] == "failed":
        return Failed(message=report["reason"], data=ValidationFailed(report["reason"], report))
    if report["status"] == "unchecked":
        return Completed(name="Unchecked", message=report["reason"][:500], data=report)
    return Completed(message=report["reason"], data=report)


def _validate_run_name() -> str:
    """``validate-<n>``: n is the number of chunks sampled."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    n = p.get("sample_size")
    if n is None:
        try:
            n = load_settings(p.get("config_path"), **(p.get("overrides") or {})
                              ).validation.sample_size
        except ConfigError:
            n = "default"
    return f"validate-{n}"


@flow(name="validate", log_prints=True, flow_run_name=_validate_run_name)
def validate(sample_size: int | None = None, seed: int | None = None,
             config_path: str | None = None,
             overrides: dict[str, Any] | None = None) -> State:
    """Spot-check retrieval and answer quality with the LLM; returns the final state
    whose data is the report (``ValidationFailed`` carrying it when a threshold is
    missed). Parameters are plain values so the flow can be deployed and scheduled."""
    settings = load_settings(config_path, **(overrides or {}))
    return final_state(run_validation(settings, sample_size=sample_size, seed=seed))


def report_of(state: State) -> dict[str, Any]:
    """The report carried by a ``validate`` flow run's final state."""
    data = state.result(raise_on_failure=False)
    if isinstance(data, ValidationFailed):
        return data.report
    if isinstance(data, dict):
        return data
    raise RuntimeError(f"validation ended {state.name}: {state.message or data}")

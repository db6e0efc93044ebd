"""The validation flow: pure sampling/metrics, then real runs (real Prefect, real Chroma,
the real embedding model, a real llama-cpp-python server with the packaged SmolLM2-135M).

The stand-in model is tiny and often wrong, so these tests check the pipeline's
behaviour and the shapes of what it returns, not the model's facts; retrieval metrics
are checked on hand-written golden questions.
"""

from __future__ import annotations

import json
import random
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import chromadb
import numpy as np
import pytest
import yaml
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from typer.testing import CliRunner

from connectors.llm import free_port
from flows.cli import app
from flows.settings import ConfigError, Settings
from flows.sync import run_sync
from flows.validate import (
    REPORT_ARTIFACT,
    TABLE_ARTIFACT,
    ValidationFailed,
    load_golden_set,
    read_history,
    report_of,
    run_validation,
)
from flows.validate import final_state as validation_state
from tests.conftest import Repo
from tests.validation_corpus import GOLDEN, HANDBOOK
from transforms.evaluation import (
    ChunkRef,
    Metrics,
    ThresholdCheck,
    aggregate,
    allocate,
    check_thresholds,
    citations,
    describe_failures,
    results_markdown,
    sampling_order,
    stratified_take,
    thresholds_markdown,
    why_not_informative,
)

# ----------------------------------------------------------------------------- pure


def test_sampling_is_repeatable_spread_over_documents_and_favours_recent_ones():
    now = datetime(2025, 6, 1, tzinfo=UTC).timestamp()
    day = 86400.0
    chunks = [ChunkRef(f"{d}-{c}", f"src:doc{d}", "src", now - (1 if d < 5 else 400) * day)
              for d in range(50) for c in range(3)]
    order = sampling_order(chunks, seed=3, now_ts=now, half_life_days=30, boost=3)["src"]
    assert order == sampling_order(list(reversed(chunks)), seed=3, now_ts=now)["src"]
    assert order != sampling_order(chunks, seed=4, now_ts=now)["src"]
    # one chunk of every document before a second chunk of any
    assert len({r.doc_id for r in order[:50]}) == 50
    # recent documents (weight ~4) come first far more often than old ones (weight ~1)
    recent_first = 0
    for seed in range(200):
        first10 = sampling_order(chunks, seed=seed, now_ts=now)["src"][:10]
        recent_first += sum(1 for r in first10 if int(r.doc_id[7:]) < 5)
    share = recent_first / (200 * 10)
    assert share > 2 * (5 / 50)  # well above the 10% of an unweighted draw


def test_stratified_take_spreads_over_sources_and_skips_rejected_chunks():
    refs = ([ChunkRef(f"a{i}", f"a:{i}", "a") for i in range(20)] +
            [ChunkRef(f"b{i}", f"b:{i}", "b") for i in range(2)] +
            [ChunkRef(f"c{i}", f"c:{i}", "c") for i in range(20)])
    order = sampling_order(refs, seed=1, now_ts=0)
    assert allocate(10, {"a": 20, "b": 2, "c": 20}) == {"a": 4, "b": 2, "c": 4}
    rejected = {"a0", "a1", "a2", "c3"}
    taken = stratified_take(order, 10, lambda part: [r.chunk_id not in rejected for r in part])
    counts = {s: sum(1 for r in taken if r.source == s) for s in "abc"}
    assert counts == {"a": 4, "b": 2, "c": 4}
    assert not rejected & {r.chunk_id for r in taken}
    assert len(stratified_take(order, 100, lambda part: [True] * len(part))) == 42


def test_uninformative_chunks_are_not_sampled():
    good = ("Guide > Backups\n\nNightly backups of the billing database run at 02:00 UTC "
            "and are kept for 35 days in the eu-west bucket; restores are tested every "
            "quarter by the SRE team, and a restore slower than four hours is an incident.")
    assert why_not_informative(good, 100) is None
    assert why_not_informative("Guide\n\nSee below.", 100) == "shorter than 100 characters"
    toc = "Guide > Contents\n\n" + "\n".join(f"- [Chapter {i}](ch{i}.md)" for i in range(12))
    assert why_not_informative(toc, 100) == "table of contents or list of links"
    licence = ("LICENSE\n\nCopyright 2024 Example Corp. Licensed under the Apache License, "
               "Version 2.0 (the License); you may not use this file except in compliance "
               "with the License. You may obtain a copy of the License at the address below.")
    assert why_not_informative(licence, 100) == "licence boilerplate"
    numbers = "Data\n\n" + " | ".join(str(i * 7919) for i in range(60))
    assert why_not_informative(numbers, 100) in ("fewer than 12 words",
                                                 "mostly symbols or digits")


def test_aggregate_counts_failed_checks_as_failures_and_thresholds_name_them():
    rows = [
        {"question": "q1", "chunk_rank": 1, "doc_rank": 1, "llm_used": True, "judged": True,
         "faithfulness": 1.0, "correctness": 5},
        {"question": "q2", "chunk_rank": None, "doc_rank": 2, "llm_used": True, "judged": True,
         "faithfulness": None, "correctness": None, "judge_failed": True},
        {"question": None, "llm_used": True, "judge_failed": True},  # no question written
    ]
    m = aggregate(rows, k=5)
    assert m["questions"] == 2 and m["chunk_hit_rate"] == 0.5 and m["doc_hit_rate"] == 1.0
    assert m["doc_mrr"] == 0.75 and m["chunk_mrr"] == 0.5
    assert m["faithfulness"] == 0.5  # the failed check counts as 0, never as a pass
    assert m["correctness"] == 3.0  # ... and as the lowest grade
    assert m["judge_failures"] == 2 and m["judge_failure_rate"] == pytest.approx(2 / 3, 1e-3)
    checks = check_thresholds(m, {"min_doc_hit_rate": 0.8, "min_faithfulness": 0.8,
                                  "max_judge_failure_rate": 0.25, "min_doc_mrr": None}, "sample")
    assert [(c["metric"], c["passed"]) for c in checks] == [
        ("doc_hit_rate", True), ("faithfulness", False), ("judge_failure_rate", False)]
    reason = describe_failures(checks, 5)
    assert reason.startswith("thresholds missed: sample faithfulness 0.50 (needs >= 0.8)")
    assert citations("Kept 35 days [1][3], see [9] and [1].", 3) == [1, 3]


def test_results_are_typed_rows_with_one_renderer_per_medium():
    m = aggregate([{"question": "q1", "chunk_rank": 1, "doc_rank": 2, "llm_used": True,
                    "judged": True, "faithfulness": 0.5, "correctness": 4}], k=5)
    assert isinstance(m, Metrics) and Metrics.model_validate_json(m.model_dump_json()) == m
    [check] = check_thresholds(m, {"min_doc_mrr": 0.8}, "sample | x")
    assert isinstance(check, ThresholdCheck) and not check.passed and check.value == 0.5
    with pytest.raises(KeyError):
        m["no_such_measure"]
    table = results_markdown([("docs", m)], 5, first="source")
    assert table[0].startswith("| source | questions | chunk hit@5 |")
    assert table[2] == "| docs | 1 | 1.00 | 1.00 | 1.00 | 0.50 | 0.50 | 4.00 | 0 |"
    [_, _, row] = thresholds_markdown([check], 5)
    assert row == "| sample \\| x | document MRR | 0.50 | >= 0.8 | FAIL |"
    stand_in = check.model_copy(update={"verdict": False})
    assert thresholds_markdown([stand_in], 5)[2].endswith(
        "| fail (not a verdict: stand-in model) |")
    assert thresholds_markdown([], 5)[2].startswith("| – | nothing measured |")


def test_golden_set_file_errors_name_the_item(tmp_path):
    good = tmp_path / "golden.yaml"
    good.write_text(yaml.safe_dump({"questions": GOLDEN[:2]}))
    items = load_golden_set(good)
    assert items[0].expected == ["handbook:backups.md"] and items[1].reference
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([{"question": "Where?", "expected": []}]))
    with pytest.raises(ConfigError, match=r"bad.yaml item 0: expected"):
        load_golden_set(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_golden_set(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def handbook_index(tmp_path_factory):
    """The handbook synced once into a data dir (copied per test)."""
    root = tmp_path_factory.mktemp("handbook")
    repo = Repo(root / "repo")
    repo.commit({k: v for k, v in HANDBOOK.items()},
                when=datetime.now(UTC) - timedelta(days=2))
    golden = root / "golden.yaml"
    golden.write_text(yaml.safe_dump(GOLDEN))
    settings = Settings(data_dir=root / "data", sources=[
        {"type": "git", "name": "handbook", "url": str(repo.path)}])

    @flow(name="test-index-handbook")
    def index():
        return run_sync(settings, "handbook").to_dict()

    summary = index()
    assert summary["documents_added"] == len(HANDBOOK)
    return root


def settings_for(handbook_index, tmp_path, llm=None, golden=True, **validation):
    data = tmp_path / "data"
    shutil.copytree(handbook_index / "data", data)
    llm_settings = {"max_context_tokens": 2048, "max_reply_tokens": 192, "retries": 1,
                    "retry_backoff_seconds": 0.2, "timeout_seconds": 600,
                    "connect_timeout_seconds": 2, **(llm or {})}
    v = {"sample_size": 3, "seed": 11, "min_chunk_chars": 100, "top_k": 3, **validation}
    if golden:
        v["golden_set"] = str(handbook_index / "golden.yaml")
    return Settings(data_dir=data, llm=llm_settings, validation=v, sources=[
        {"type": "git", "name": "handbook", "url": str(handbook_index / "repo")}])


def run_flow(settings, **kwargs):
    """Run validation in a real flow run; returns (state, report)."""

    @flow(name="test-validate")
    def _validate():
        return validation_state(run_validation(settings, **kwargs))

    state = _validate(return_state=True)
    return state, report_of(state)


def artifacts_of(state):
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    return {a.key: a for a in found}


def down_llm():
    return {"base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "deepseek-r1:7b"}


def test_no_llm_runs_golden_retrieval_only_and_does_not_pass(handbook_index, tmp_path):
    port = free_port()
    settings = settings_for(handbook_index, tmp_path, llm={
        "base_url": f"http://kbsync:url-secret@127.0.0.1:{port}/v1", "api_key": "sk-key-secret"})
    state, report = run_flow(settings)

    assert state.is_completed() and state.name == "Unchecked"
    assert report["status"] == "unchecked"
    assert "ANSWER QUALITY NOT CHECKED" in state.message and "cannot connect" in state.message
    assert report["checked"] == {"retrieval": True, "answers": False}
    assert report["samples"] == [] and report["metrics"]["sample"] is None
    golden = report["metrics"]["golden"]
    assert golden["questions"] == len(GOLDEN) and golden["doc_hit_rate"] >= 0.8
    assert golden["faithfulness"] is None and golden["judged"] == 0
    assert report["llm"]["available"] is False and report["llm"]["calls"]["calls"] == 0
    markdown = artifacts_of(state)[REPORT_ARTIFACT].data
    assert "NOT CHECKED" in markdown and "ANSWER QUALITY NOT CHECKED" in markdown
    saved = Path(report["report_path"]).read_text()
    for text in (markdown, saved, state.message, json.dumps(read_history(settings))):
        assert "url-secret" not in text and "sk-key-secret" not in text
    assert f"http://***@127.0.0.1:{port}/v1" in markdown

    # no golden set either: nothing is measured, and the report says so
    bare = settings_for(handbook_index, tmp_path / "bare", llm=down_llm(), golden=False)
    state, report = run_flow(bare)
    assert state.name == "Unchecked" and report["status"] == "unchecked"
    assert "retrieval was not measured either" in report["reason"]


def test_cli_validate_without_llm_exits_3_and_history_prints_the_trend(handbook_index,
                                                                        tmp_path):
    settings = settings_for(handbook_index, tmp_path, llm=down_llm())
    config = tmp_path / "kbsync.yaml"
    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    runner = CliRunner()
    result = runner.invoke(app, ["--config", str(config), "validate", "--seed", "5"])
    assert result.exit_code == 3, result.output
    assert "validation UNCHECKED" in result.output
    assert "ANSWER QUALITY NOT CHECKED" in result.output

    history = runner.invoke(app, ["--config", str(config), "validate", "--history"])
    assert history.exit_code == 0, history.output
    assert "unchecked" in history.output and "validation history" in history.output
    [entry] = read_history(settings)
    assert entry["seed"] == 5 and entry["golden"]["questions"] == len(GOLDEN)
    assert (settings.validation_dir / entry["report"]).is_file()


def test_sync_all_validates_after_syncing(handbook_index, tmp_path):
    from flows.sync import sync_all

    settings = settings_for(handbook_index, tmp_path, llm=down_llm())
    config = tmp_path / "kbsync.yaml"
    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    results = sync_all(config_path=str(config))
    assert results["handbook"]["status"] == "completed"
    [entry] = read_history(settings)  # the validation subflow ran after the sync
    assert entry["status"] == "unchecked"
    sync_all(config_path=str(config), validation=False)
    assert len(read_history(settings)) == 1


def test_full_run_with_the_local_llm(handbook_index, tmp_path, llm_server):
    settings = settings_for(handbook_index, tmp_path, golden=False, llm={
        "base_url": llm_server.base_url, "model": llm_server.alias})
    golden = tmp_path / "golden.yaml"
    golden.write_text(yaml.safe_dump(GOLDEN[:1]))
    settings.validation.golden_set = golden
    state, report = run_flow(settings, sample_size=2, seed=11)

    # the tiny model may or may not meet the thresholds; the state must match the report
    assert report["status"] in ("passed", "failed")
    assert state.is_failed() == (report["status"] == "failed")
    if state.is_failed():
        assert state.message.startswith("thresholds missed:")
        assert isinstance(state.result(raise_on_failure=False), ValidationFailed)
    assert report["checked"] == {"retrieval": True, "answers": True}
    assert len(report["samples"]) == 2 and len({r["doc_id"] for r in report["samples"]}) == 2
    for row in report["samples"]:
        assert row["source"] == "handbook" and row["url"] and row["title"]
        if row.get("question"):
            assert row["chunk_rank"] in (None, 1, 2, 3) and row["doc_rank"] in (None, 1, 2, 3)
            assert len(row["retrieved"]) == 3
            assert row["judged"] is True
            assert row.get("faithfulness") is None or 0 <= row["faithfulness"] <= 1
            assert row.get("correctness") is None or row["correctness"] in range(1, 6)
            if row.get("faithfulness") is None or row.get("correctness") is None:
                assert row["judge_failed"] and row["error"]
    [g] = report["golden"]
    assert g["doc_rank"] == 1 and g["judged"] and g["has_reference"]
    m = report["metrics"]["sample"]
    assert m["questions"] + m["judge_failures"] >= 2
    llm = report["llm"]
    assert llm["available"] and not llm["fallback_used"]
    assert llm["models_used"] == [llm_server.endpoint.label]
    calls = llm["calls"]
    assert calls["calls"] >= 4 and calls["prompt_tokens"] > 0 and calls["completion_tokens"] > 0
    assert set(calls["by_purpose"]) >= {"question", "answer", "faithfulness"}
    assert report["run"]["seconds"]["llm_answer"] > 0

    # both artifacts and the JSON report + history
    arts = artifacts_of(state)
    assert arts[REPORT_ARTIFACT].type == "markdown"
    markdown = arts[REPORT_ARTIFACT].data
    assert "# kbsync validation:" in markdown and "## Thresholds" in markdown
    assert "## Per source" in markdown and "| handbook |" in markdown
    assert llm_server.alias in markdown
    table = arts[TABLE_ARTIFACT].data
    table = json.loads(table) if isinstance(table, str) else table
    assert len(table) == 3 and {"source", "title", "url", "question", "chunk rank",
                                "doc rank", "faithfulness", "correctness"} <= set(table[0])
    path = Path(report["report_path"])
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["status"] == report["status"] and len(saved["samples"]) == 2
    assert path.parent == settings.validation_dir
    assert read_history(settings)[-1]["report"] == path.name


def shuffle_vectors(settings: Settings, seed: int = 0) -> None:
    """Break the index: every chunk gets another chunk's vector (a derangement)."""
    client = chromadb.PersistentClient(path=str(settings.chroma_path))
    col = client.get_collection(settings.chroma.collection)
    res = col.get(include=["embeddings"])
    ids, vectors = res["ids"], np.asarray(res["embeddings"])
    perm = list(range(len(ids)))
    rng = random.Random(seed)
    while any(i == p for i, p in enumerate(perm)):
        rng.shuffle(perm)
    col.update(ids=ids, embeddings=vectors[perm])


def test_sensitivity_broken_index_scores_clearly_lower_and_fails(handbook_index, tmp_path,
                                                                 llm_server):
    """Same corpus, same sample, same questions: vectors shuffled between chunks must
    give clearly lower retrieval metrics and a Failed validation."""
    # The tiny stand-in writes vague questions, so a sample of 3 is too noisy to pass or
    # fail on; the hand-written golden questions carry the threshold.
    off = {"min_doc_hit_rate": None, "min_faithfulness": None, "min_correctness": None,
           "max_judge_failure_rate": None}
    common = {"llm": {"base_url": llm_server.base_url, "model": llm_server.alias},
              "check_answers": False, "sample_size": 3, "thresholds": off,
              "golden_thresholds": {**off, "min_doc_hit_rate": 0.6}}
    good = settings_for(handbook_index, tmp_path / "good", **common)
    broken = settings_for(handbook_index, tmp_path / "broken", **common)
    for s in (good, broken):
        s.retrieval.mode = "dense"
    shuffle_vectors(broken)

    good_state, good_report = run_flow(good, seed=21)
    broken_state, broken_report = run_flow(broken, seed=21)

    questions = [r["question"] for r in good_report["samples"]]
    assert questions == [r["question"] for r in broken_report["samples"]]
    g, b = good_report["metrics"], broken_report["metrics"]
    assert g["golden"]["doc_hit_rate"] >= 0.8 and g["golden"]["doc_mrr"] >= 0.7
    assert b["golden"]["doc_hit_rate"] <= g["golden"]["doc_hit_rate"] - 0.5
    assert b["golden"]["doc_mrr"] <= g["golden"]["doc_mrr"] - 0.5
    # the same questions find their own chunk no more often in the broken index
    assert b["sample"]["questions"] == g["sample"]["questions"]
    assert b["sample"]["chunk_hit_rate"] <= g["sample"]["chunk_hit_rate"]
    assert b["sample"]["doc_mrr"] <= g["sample"]["doc_mrr"]

    assert not good_state.is_failed(), good_state.message
    assert broken_state.is_failed() and broken_report["status"] == "failed"
    assert "golden document hit@3" in broken_state.message
    assert broken_report["checked"] == {"retrieval": True, "answers": False}


def test_fallback_model_judges_and_the_report_says_so(handbook_index, tmp_path, llm_server):
    settings = settings_for(handbook_index, tmp_path, golden=False, check_answers=False,
                            sample_size=1, llm={
                                **down_llm(),
                                "fallbacks": [{"base_url": llm_server.base_url,
                                               "model": llm_server.alias}]})
    state, report = run_flow(settings)
    llm = report["llm"]
    assert llm["available"] and llm["fallback_used"]
    assert llm["endpoint"] == llm_server.endpoint.label
    assert llm["models_used"] == [llm_server.endpoint.label]
    assert "cannot connect" in llm["calls"]["endpoints_down"][llm["primary"]]
    assert len(report["samples"]) == 1
    assert "fallback used" in artifacts_of(state)[REPORT_ARTIFACT].data


# ----------------------------------------------------------------------------- the demo

DEMO_ROOT = Path(__file__).resolve().parents[1]
#: besides the files the demo's golden set expects: distractors from the same repository
DEMO_DISTRACTORS = ["README.md", "kbsync.example.yaml", "Makefile", "flows/sync.py",
                    "flows/embed.py", "flows/cli.py", "connectors/git.py", "connectors/jira.py",
                    "connectors/chroma.py", "connectors/base.py", "transforms/embedding.py",
                    "transforms/analysis.py"]


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory):
    """This repository's own files (those the demo's golden set expects, plus
    distractors) synced as the demo does: a git source named ``kbsync``."""
    root = tmp_path_factory.mktemp("demo")
    items = load_golden_set(DEMO_ROOT / "demo" / "golden.yaml")
    paths = sorted({e.split(":", 1)[1] for item in items for e in item.expected} |
                   set(DEMO_DISTRACTORS))
    repo = Repo(root / "repo")
    repo.commit({p: (DEMO_ROOT / p).read_text(encoding="utf-8") for p in paths})
    settings = Settings(data_dir=root / "data", sources=[
        {"type": "git", "name": "kbsync", "url": str(repo.path)}])

    @flow(name="test-index-demo")
    def index():
        return run_sync(settings, "kbsync").to_dict()

    assert index()["documents_added"] == len(paths)
    return root


def demo_settings(demo_index, tmp_path, llm_server, broken: bool = False, **validation):
    data = tmp_path / "data"
    shutil.copytree(demo_index / "data", data)
    settings = Settings(data_dir=data, sources=[
        {"type": "git", "name": "kbsync", "url": str(demo_index / "repo")}], llm={
        "base_url": llm_server.base_url, "model": llm_server.alias, "standin": True,
        "max_context_tokens": 2048, "max_reply_tokens": 192, "retries": 0,
        "timeout_seconds": 600}, validation={
        "golden_set": str(DEMO_ROOT / "demo" / "golden.yaml"), "golden_modes": ["dense"],
        "sample_size": 1, "seed": 3, **validation})
    if broken:
        shuffle_vectors(settings)
    return settings


@pytest.mark.slow  # the stand-in answers and judges 13 questions: minutes on 2 cores
def test_demo_validation_passes_a_healthy_index_with_the_standin(demo_index, tmp_path,
                                                                 llm_server):
    """The stand-in's answer quality is reported, marked not a verdict; the golden set's
    retrieval (hybrid, and dense alone) decides."""
    settings = demo_settings(demo_index, tmp_path, llm_server,
                             thresholds={"min_doc_hit_rate": 0.8, "min_faithfulness": 0.99,
                                         "min_correctness": 5, "max_judge_failure_rate": 0})
    state, report = run_flow(settings)
    assert report["status"] == "passed", report["reason"]
    assert state.is_completed() and not state.is_failed()
    assert "not a verdict" in state.message and "stand-in" in state.message
    m = report["metrics"]
    assert m["golden"]["doc_hit_rate"] >= 0.8 and m["golden dense"]["doc_hit_rate"] >= 0.8
    assert m["golden"]["faithfulness"] is not None  # answers were checked and reported
    rows = {(r["set"], r["metric"]): r for r in report["thresholds"]}
    assert rows[("golden", "doc_hit_rate")]["verdict"] is True
    assert rows[("golden dense", "doc_hit_rate")]["verdict"] is True
    assert rows[("golden", "faithfulness")]["verdict"] is False
    assert rows[("sample", "doc_hit_rate")]["verdict"] is False
    assert report["notes"][0].startswith("NOT A VERDICT: ")
    assert f"{llm_server.alias}" in report["notes"][0]
    markdown = artifacts_of(state)[REPORT_ARTIFACT].data
    assert "(not a verdict: stand-in model)" in markdown and "NOT A VERDICT" in markdown


def test_demo_validation_fails_a_broken_index_with_the_standin(demo_index, tmp_path,
                                                               llm_server):
    """Vectors shuffled between chunks: hybrid may still find files by their words, the
    dense-only golden retrieval does not, and the run fails on it."""
    settings = demo_settings(demo_index, tmp_path, llm_server, broken=True,
                             check_answers=False)
    state, report = run_flow(settings)
    assert state.is_failed() and report["status"] == "failed"
    assert "golden dense document hit@5" in state.message
    assert report["metrics"]["golden dense"]["doc_hit_rate"] < 0.5

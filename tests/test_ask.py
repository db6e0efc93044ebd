"""``kbsync ask``: the answer prompt, streaming without ``<think>``, and real questions
against a real index and the real stand-in server (llama-cpp-python + SmolLM2-135M).

The stand-in is tiny: these tests check what kbsync does with its replies (streaming,
citations, sources, language instruction, exit codes), not the model's facts.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from prefect import flow
from typer.testing import CliRunner

from connectors.llm import LLMClient, free_port, strip_think
from flows.ask import answer_prompt, ask
from flows.cli import app
from flows.settings import Settings
from flows.sync import run_sync
from tests.conftest import Repo
from tests.test_llm import DEEPSEEK_STYLE, RECORDED_SMOLLM2
from tests.validation_corpus import HANDBOOK
from transforms.answering import (
    ThinkFilter,
    answer_messages,
    is_reasoning_model,
    question_language,
)

RUSSIAN_PAGE = """# Отпуск

Сотрудники получают 28 дней отпуска в год. Заявление на отпуск подаётся в системе
Personio не позднее чем за две недели, если отпуск длится больше трёх дней. До пяти
неиспользованных дней можно перенести на следующий год; их нужно использовать до 31 марта.
"""

# ----------------------------------------------------------------------------- pure


def test_question_language_and_the_prompt_asks_for_it():
    assert question_language("Сколько дней отпуска в год?") == "Russian"
    assert question_language("How many vacation days per year?") == "English"
    assert question_language("Сколько дней хранится backup в bucket?") == "Russian"
    assert question_language("12345") == "English"
    messages = answer_messages("Сколько дней?", ["[1] (Отпуск) 28 дней"], "Russian")
    assert "in Russian, the language of the question" in messages[0]["content"]
    assert "[1] (Отпуск) 28 дней" in messages[1]["content"]
    assert messages[1]["content"].endswith("Question: Сколько дней?\nAnswer:")
    assert is_reasoning_model("deepseek-r1:7b") and is_reasoning_model("qwq:32b")
    assert not is_reasoning_model("smollm2-135m-instruct")
    assert not is_reasoning_model("llama3.1:8b")


def pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
@pytest.mark.parametrize(("raw", "_"), RECORDED_SMOLLM2 + DEEPSEEK_STYLE + [
    ("<think>a < b, so</think>The answer [1].", None),
    ("Answer with a <b>tag</b> and <thinking> words.", None),
    ("<THINK>loud</THINK> quiet", None),
    ("x<think>cut off", None),
])
def test_think_filter_streams_what_strip_think_keeps(raw, _, size):
    for hold in (False, True):
        shown_pieces = []
        think = ThinkFilter(hold_until_close=hold)
        for piece in pieces(raw, size):
            out = think.feed(piece)
            assert "<think>" not in out.lower() and "</think>" not in out.lower()
            shown_pieces.append(out)
        shown_pieces.append(think.end())
        lone_close = "</think>" in re.sub(r"(?is)<think>.*?</think>", "", raw).lower()
        if hold or not lone_close:  # unheld, reasoning before a lone </think> is shown
            assert "".join(shown_pieces).strip() == strip_think(raw)


def test_think_filter_holds_reasoning_without_an_opening_tag():
    """DeepSeek-R1's newer template opens <think> in the prompt: the reply streams
    reasoning, then ``</think>``, then the answer. Held back, none of it is shown."""
    raw = "Let me look at passage 2. It says 35 days.\n</think>\n\nBackups are kept 35 days [2]."
    think = ThinkFilter(hold_until_close=True)
    shown = [think.feed(p) for p in pieces(raw, 4)] + [think.end()]
    assert "".join(shown) == "Backups are kept 35 days [2]."
    assert all(s == "" for s in shown[:raw.index("</think>") // 4])


# ----------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """The handbook plus one Russian page, synced once (copied per test is not needed:
    asking does not write)."""
    root = tmp_path_factory.mktemp("ask")
    repo = Repo(root / "repo")
    repo.commit({**HANDBOOK, "ru/otpusk.md": RUSSIAN_PAGE},
                when=datetime.now(UTC) - timedelta(days=1))
    settings = Settings(data_dir=root / "data", sources=[
        {"type": "git", "name": "handbook", "url": str(repo.path)}])

    @flow(name="test-index-ask")
    def index():
        return run_sync(settings, "handbook").to_dict()

    assert index()["documents_added"] == len(HANDBOOK) + 1
    return root


def settings_with(indexed, llm: dict) -> Settings:
    return Settings(data_dir=indexed / "data", sources=[
        {"type": "git", "name": "handbook", "url": str(indexed / "repo")}], llm={
        "max_context_tokens": 2048, "max_reply_tokens": 160, "retries": 0,
        "connect_timeout_seconds": 2, "timeout_seconds": 600,
        "presets": {"factual": {"temperature": 0.0, "top_p": 1.0}}, **llm})


def config_file(tmp_path, settings: Settings):
    import yaml

    path = tmp_path / "kbsync.yaml"
    path.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    return path


def test_english_question_streams_an_answer_with_sources(indexed, llm_server, tmp_path):
    settings = settings_with(indexed, {"base_url": llm_server.base_url,
                                       "model": llm_server.alias})
    streamed: list[str] = []
    answer = ask(settings, "How many days are billing database backups kept?", k=3,
                 on_text=streamed.append)

    assert answer.language == "English"
    assert answer.hits[0].doc_id == "handbook:backups.md"
    assert answer.used == 3 and answer.llm_error is None
    assert answer.model == llm_server.endpoint.label
    assert answer.text  # the stand-in says something (often little, and often wrong)
    assert streamed and "".join(streamed).strip() == answer.text
    assert all(1 <= n <= 3 for n in answer.cited)

    # the same through the CLI: answer, then the numbered sources with title and URL
    config = config_file(tmp_path, settings)
    result = CliRunner().invoke(app, ["--config", str(config), "ask",
                                      "How many days are billing database backups kept?",
                                      "-k", "3"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.index("backups kept?") < out.index("sources") < out.index("[1] backups.md")
    assert out.split("[1] backups.md", 1)[1].splitlines()[1].strip().endswith("repo/backups.md")
    assert re.search(r"\[3\] ", out) and "[4] " not in out
    assert f"answered by {llm_server.endpoint.label}" in out

    as_json = CliRunner().invoke(app, ["--config", str(config), "ask", "--json", "-k", "2",
                                       "--source", "handbook", "Which UDP port does the VPN use?"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert data["answer"] and data["model"] == llm_server.endpoint.label
    assert [s["n"] for s in data["sources"]] == [1, 2]
    assert data["sources"][0]["doc_id"] == "handbook:vpn.md"
    assert data["sources"][0]["url"].endswith("vpn.md")
    assert {"title", "url", "source", "cited", "given_to_model"} <= set(data["sources"][0])


def test_russian_question_is_answered_from_the_russian_page(indexed, llm_server):
    settings = settings_with(indexed, {"base_url": llm_server.base_url,
                                       "model": llm_server.alias})
    client = LLMClient(settings.llm.config())
    question = "Сколько дней отпуска в год получают сотрудники?"
    streamed: list[str] = []
    answer = ask(settings, question, k=3, on_text=streamed.append, llm=client)

    assert answer.language == "Russian"
    assert answer.hits[0].doc_id == "handbook:ru/otpusk.md"
    assert answer.text and "".join(streamed).strip() == answer.text
    assert len(streamed) > 1  # streamed piece by piece as the server sent it, not in one block
    messages, kept = answer_prompt(client, question, answer.hits, language="Russian")
    # Cyrillic costs more tokens: what did not fit the window was left out, lowest rank first
    assert kept == answer.used >= 1 and "Write the answer in Russian" in messages[0]["content"]
    assert "Сотрудники получают 28 дней отпуска" in messages[1]["content"]
    [call] = client.calls
    assert call.purpose == "answer" and call.ok
    client.close()


def test_no_llm_prints_the_sources_and_exits_3(indexed, tmp_path):
    settings = settings_with(indexed, {"base_url": f"http://127.0.0.1:{free_port()}/v1",
                                       "model": "deepseek-r1:7b"})
    config = config_file(tmp_path, settings)
    result = CliRunner().invoke(app, ["--config", str(config), "ask",
                                      "How long are application logs searchable in Loki?"])
    assert result.exit_code == 3, result.output
    assert "[1] logging.md" in result.output and "repo/logging.md" in result.output
    assert "no LLM endpoint answered" in result.output and "cannot connect" in result.output
    assert "kbsync llm serve" in result.output

    empty = CliRunner().invoke(app, ["--config", str(config), "ask", "--source", "nope",
                                     "anything at all?"])
    assert empty.exit_code == 1 and "nothing matched" in empty.output

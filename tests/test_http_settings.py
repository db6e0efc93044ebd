"""The one retry vocabulary (``http:``): the top-level section and a source's own
``http:`` reach each client's retry loop, checked by counting the requests the real
HTTP stand-ins in fakes/ receive; the old per-source keys still load."""

from __future__ import annotations

import json

import pytest
from werkzeug import Response

from connectors.base import FetchRequest, TransientSourceError
from connectors.http import RetryPolicy
from connectors.llm import LLMUnavailable
from fakes.confluence_server import FakeConfluence
from fakes.gitlab_server import GitLabFake
from fakes.jira_server import FakeJira
from flows.settings import ConfigError, Settings, load_settings

#: Fast waits, so only the number of attempts matters.
FAST = {"backoff_seconds": 0.01, "max_backoff_seconds": 0.02, "max_retry_after_seconds": 0.05}


def settings_with(source: dict, http: dict | None = None, **more) -> Settings:
    return Settings(http={**FAST, **(http or {})}, sources=[source], **more)


def drain(connector) -> list:
    return list(connector.fetch(FetchRequest(), None))


@pytest.mark.parametrize(("http", "own", "requests"), [
    ({"max_retries": 2}, None, 3),                 # the top-level section
    ({"max_retries": 4}, {"max_retries": 1}, 2),   # the source's own http: wins
])
def test_confluence_503_is_retried_as_the_settings_say(httpserver, http, own, requests):
    fake = FakeConfluence(httpserver)
    fake.fail(503, times=10)
    source = {"type": "confluence", "name": "wiki", "base_url": fake.url, "spaces": ["ENG"],
              "page_size": 5, "min_page_size": 5,  # no smaller pages: one request each
              **({"http": own} if own else {})}
    settings = settings_with(source, http)
    connector = settings.sources[0].build(settings)
    with pytest.raises(TransientSourceError):
        drain(connector)
    assert len(fake.searches()) == requests


@pytest.mark.parametrize(("http", "own", "requests"), [
    ({"max_retries": 1}, None, 2),
    ({"max_retries": 1}, {"max_retries": 3}, 4),
])
def test_jira_5xx_is_retried_as_the_settings_say(httpserver, http, own, requests):
    fake = FakeJira(httpserver, [])
    fake.fail("search", 500, times=10)
    source = {"type": "jira", "name": "jira", "base_url": fake.url, "jql": "project = PLAT",
              **({"http": own} if own else {})}
    settings = settings_with(source, http)
    with pytest.raises(TransientSourceError, match="HTTP 500"):
        drain(settings.sources[0].build(settings))
    assert len(fake.kinds("search")) == requests


@pytest.mark.parametrize(("http", "own", "requests"), [
    ({"max_retries": 1}, None, 2),
    ({"max_retries": 0}, {"max_retries": 2}, 3),
])
def test_gitlab_5xx_is_retried_as_the_settings_say(httpserver, tmp_path, http, own, requests):
    fake = GitLabFake(httpserver)
    fake.load_fixtures()
    fake.fail(r"/issues$", 502, times=None)
    source = {"type": "gitlab", "name": "gl", "base_url": fake.base_url, "token": fake.token,
              "projects": ["platform/deploy-tools"], "parts": ["issues"],
              **({"http": own} if own else {})}
    settings = settings_with(source, http, data_dir=tmp_path / "data")
    with pytest.raises(TransientSourceError):
        drain(settings.sources[0].build(settings))
    assert len(fake.requests_to(r"/issues$")) == requests


@pytest.mark.parametrize(("http", "llm", "requests"), [
    ({"max_retries": 2}, {}, 3),
    ({"max_retries": 2}, {"http": {"max_retries": 0}}, 1),
    ({"max_retries": 2}, {"retries": 1}, 2),  # the old key
])
def test_llm_503_is_retried_as_the_settings_say(httpserver, http, llm, requests):
    httpserver.expect_request("/v1/models").respond_with_json(
        {"object": "list", "data": [{"id": "m", "object": "model"}]})
    httpserver.expect_request("/v1/chat/completions").respond_with_response(
        Response('{"error": {"message": "busy"}}', status=503,
                 content_type="application/json"))
    settings = Settings(http={**FAST, **http}, llm={"base_url": httpserver.url_for("/v1"),
                                                    "model": "m", **llm})
    from connectors.llm import LLMClient

    client = LLMClient(settings.llm_config())
    with pytest.raises(LLMUnavailable, match="503"):
        client.chat([{"role": "user", "content": "hi"}])
    chats = [r for r, _ in httpserver.log if r.path == "/v1/chat/completions"]
    assert len(chats) == requests
    assert client.stats["retries"] == requests - 1


@pytest.mark.parametrize(("http", "embedding", "requests"), [
    ({"max_retries": 1}, {}, 2),
    ({"max_retries": 2}, {"http": {"max_retries": 0}}, 1),
    ({"max_retries": 2}, {"request_retries": 1}, 2),  # the old key
])
def test_embeddings_server_503_is_retried_as_the_settings_say(httpserver, tmp_path, http,
                                                              embedding, requests):
    from connectors.embeddings import EmbeddingServerError, RemoteEmbedder

    httpserver.expect_request("/embeddings").respond_with_response(
        Response('{"error": {"message": "busy"}}', status=503,
                 content_type="application/json"))
    settings = Settings(data_dir=tmp_path, http={**FAST, **http}, embedding={
        "backend": "openai", "base_url": httpserver.url_for(""), **embedding})
    embedder = RemoteEmbedder(settings.embedding.spec(settings.http))
    with pytest.raises(EmbeddingServerError, match="503"):
        embedder.encode(["a chunk"], label="batch 1")
    assert len([r for r, _ in httpserver.log if r.path == "/embeddings"]) == requests


def test_embeddings_server_errors_name_no_secret(httpserver, tmp_path):
    from connectors.embeddings import EmbeddingServerError, RemoteEmbedder

    # a proxy that echoes the request's Authorization header in its error body
    httpserver.expect_request("/embeddings").respond_with_handler(
        lambda request: Response(
            json.dumps({"error": {"message": f"denied for {request.headers.get('Authorization')}"}}),
            status=502, content_type="application/json"))
    url = httpserver.url_for("").replace("http://", "http://kb:hunter2@")
    settings = Settings(data_dir=tmp_path, http=FAST, embedding={
        "backend": "openai", "base_url": url, "http": {"max_retries": 0}})
    embedder = RemoteEmbedder(settings.embedding.spec(settings.http), api_key="s3cr3t-key")
    with pytest.raises(EmbeddingServerError) as caught:
        embedder.encode(["a chunk"])
    message = str(caught.value)
    assert "502" in message and "denied for" in message and "***" in message
    assert "s3cr3t-key" not in message and "hunter2" not in message
    assert "hunter2" not in embedder.device


def test_old_per_source_keys_still_load_into_http(tmp_path):
    path = tmp_path / "kbsync.yaml"
    path.write_text("""
http: {timeout_seconds: 20}
llm: {retries: 1, retry_backoff_seconds: 0.5}
sources:
  - {type: confluence, name: wiki, base_url: "https://wiki.example.com", spaces: [ENG],
     max_retries: 2, retry_after_max_seconds: 5, backoff_initial_seconds: 0.1,
     backoff_max_seconds: 4, timeout_seconds: 9}
  - {type: jira, name: jira, base_url: "https://jira.example.com",
     max_retries: 6, max_retry_delay_seconds: 11, backoff_seconds: 3,
     max_retry_after_seconds: 7}
  - {type: gitlab, name: gl, projects: [a/b], max_retries: 8,
     http: {max_retries: 1}}
""")
    settings = load_settings(path)
    policies = {s.name: s.build(settings).options.http if s.type != "confluence"
                else s.options(settings).http for s in settings.sources}
    assert policies["wiki"] == RetryPolicy(max_retries=2, max_retry_after_seconds=5,
                                           backoff_seconds=0.1, max_backoff_seconds=4,
                                           timeout_seconds=9)
    assert policies["jira"] == RetryPolicy(max_retries=6, max_backoff_seconds=11,
                                           backoff_seconds=3, max_retry_after_seconds=7,
                                           timeout_seconds=20)
    assert policies["gl"] == RetryPolicy(max_retries=1, timeout_seconds=20)  # http: wins
    assert settings.llm_config().http == RetryPolicy(max_retries=1, backoff_seconds=0.5,
                                                     timeout_seconds=20)


def test_a_bad_http_key_names_its_place(tmp_path):
    path = tmp_path / "kbsync.yaml"
    path.write_text("http: {max_retries: -1}\nsources:\n  - {type: jira, name: j, "
                    "base_url: 'https://j.example.com', http: {retries: 2}}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert "http.max_retries" in str(err.value)
    assert "sources[0] (j).http.retries" in str(err.value)

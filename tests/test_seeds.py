"""The seeds' own interfaces end to end: /execute, /api/query, /api/status and /llm/*, over a real gunicorn
and fake upstreams; the /execute address checks and a few edge cases through the test client."""
from __future__ import annotations

import base64
import json
import socket

import pytest
import requests
import responses

from refine import REVIEW_PROMPT
from support import ADMIN_KEY, CLIENT_KEY, FakeOpenAI, Gunicorn, Reply, auth, completion_body, stream_events, validate

MESSAGES = [{"role": "user", "content": "Say hello"}]
PUBLIC_IP = "93.184.215.14"


@pytest.fixture
def openai_fake():
    with FakeOpenAI(Reply(body=completion_body("Hello"), stream=stream_events(["Hel", "lo"]))) as fake:
        yield fake


@pytest.fixture
def mistral_fake():
    with FakeOpenAI(Reply(body=completion_body("Bonjour", model="mistral-large-latest"),
                          stream=stream_events(["Bon", "jour"], model="mistral-large-latest"))) as fake:
        yield fake


@pytest.fixture
def proxy(openai_fake, mistral_fake, database_url):
    env = {"DATABASE_URL": database_url, "API_KEY": CLIENT_KEY, "ADMIN_API_KEY": ADMIN_KEY,
           "OPENAI_API_KEY": "sk-server-openai",
           "OPENAI_BASE_URL": openai_fake.url, "MISTRAL_BASE_URL": mistral_fake.url, "ALLOW_PRIVATE_URLS": "true",
           "EXECUTE_ALLOWED_HOSTS": "127.0.0.1", "INITIAL_BACKOFF": "1", "MAX_RETRIES": "1", "REQUEST_TIMEOUT": "5"}
    with Gunicorn(env) as server:
        yield server


def call(proxy, method, path, headers=None, **kw):
    return requests.request(method, proxy.url + path, headers={**auth(), **(headers or {})}, timeout=20, **kw)


# -- /execute ---------------------------------------------------------------------------------------

def test_execute_calls_the_given_endpoint_with_the_given_key(proxy, openai_fake):
    headers = {"x-llm-endpoint": openai_fake.url + "/chat/completions", "x-llm-apikey": "sk-user-own"}
    r = call(proxy, "POST", "/execute", headers, json={"model": "my-model", "messages": MESSAGES})
    assert r.status_code == 200, r.text
    validate(r.json(), "CreateChatCompletionResponse")
    assert r.json()["choices"][0]["message"]["content"] == "Hello"
    sent = openai_fake.posts[0]
    assert sent["path"] == "/v1/chat/completions" and sent["headers"]["Authorization"] == "Bearer sk-user-own"
    assert sent["json"] == {"model": "my-model", "messages": MESSAGES}
    assert r.headers["x-llm-provider"] == "execute:127.0.0.1" and r.headers["x-llm-attempts"] == "1"


def test_execute_refines_and_streams(proxy, openai_fake):
    headers = {"x-llm-endpoint": openai_fake.url + "/chat/completions", "x-llm-apikey": "k", "x-llm-num-calls": "2"}
    r = call(proxy, "POST", "/execute", headers, json={"model": "m", "messages": MESSAGES, "stream": True},
             stream=True)
    events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in map(json.loads, events[:-1])
                   if c["choices"]) == "Hello"
    assert len(openai_fake.posts) == 2 and openai_fake.posts[1]["json"]["messages"][-1]["content"] == REVIEW_PROMPT


@pytest.fixture
def strict_proxy(openai_fake, database_url):
    env = {"DATABASE_URL": database_url, "API_KEY": CLIENT_KEY, "EXECUTE_ALLOWED_HOSTS": "127.0.0.1,localhost"}
    with Gunicorn(env) as server:
        yield server


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:{port}/v1/chat/completions",
                                      "http://localhost:{port}/v1/chat/completions",
                                      "http://127.0.0.2:{port}/v1/chat/completions"])
def test_execute_refuses_loopback_and_unlisted_hosts_without_connecting(strict_proxy, openai_fake, endpoint):
    r = call(strict_proxy, "POST", "/execute", {"x-llm-endpoint": endpoint.format(port=openai_fake.port),
                                                "x-llm-apikey": "k"}, json={"model": "m", "messages": MESSAGES})
    assert r.status_code == 403 and r.json()["error"]["type"] == "endpoint_not_allowed"
    assert openai_fake.requests == []


@pytest.mark.parametrize("missing", ["x-llm-endpoint", "x-llm-apikey"])
def test_execute_names_a_missing_header(client, missing):
    headers = {**auth(), "x-llm-endpoint": "https://api.openai.com/v1/chat/completions", "x-llm-apikey": "k"}
    del headers[missing]
    r = client.post("/execute", json={"model": "m", "messages": MESSAGES}, headers=headers)
    assert r.status_code == 400 and missing in r.get_json()["error"]["message"]


def fake_dns(monkeypatch, *addresses):
    def getaddrinfo(host, port, *a, **k):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in addresses]
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_execute_checks_every_resolved_address(make_app, monkeypatch):
    fake_dns(monkeypatch, PUBLIC_IP, "10.0.0.7")
    client = make_app(execute_allowed_hosts=("*",)).test_client()
    with responses.RequestsMock() as upstream:  # any connection attempt would fail the test
        r = client.post("/execute", json={"model": "m", "messages": MESSAGES}, headers={
            **auth(), "x-llm-endpoint": "https://llm.example.com/v1/chat/completions", "x-llm-apikey": "k"})
        assert r.status_code == 403 and len(upstream.calls) == 0


def test_execute_never_follows_a_redirect(make_app, monkeypatch):
    fake_dns(monkeypatch, PUBLIC_IP)
    client = make_app(execute_allowed_hosts=("llm.example.com",)).test_client()
    with responses.RequestsMock() as upstream:
        upstream.post("https://llm.example.com/v1/chat/completions", status=307,
                      headers={"Location": "http://169.254.169.254/latest/meta-data"})
        r = client.post("/execute", json={"model": "m", "messages": MESSAGES}, headers={
            **auth(), "x-llm-endpoint": "https://llm.example.com/v1/chat/completions", "x-llm-apikey": "k"})
        assert r.status_code == 502
        assert {c.request.url for c in upstream.calls} == {"https://llm.example.com/v1/chat/completions"}


def test_execute_to_a_provider_host_is_costed_as_that_provider(make_app, monkeypatch):
    fake_dns(monkeypatch, PUBLIC_IP)
    client = make_app().test_client()
    with responses.RequestsMock() as upstream:
        upstream.post("https://api.openai.com/v1/chat/completions", json=completion_body())
        r = client.post("/execute", json={"model": "gpt-4o-mini", "messages": MESSAGES}, headers={
            **auth(), "x-llm-endpoint": "https://api.openai.com/v1/chat/completions", "x-llm-apikey": "sk-user"})
        assert r.status_code == 200 and r.headers["x-llm-provider"] == "openai"
        assert r.headers["x-llm-cost"] == "0.0000045"
        assert upstream.calls[0].request.headers["Authorization"] == "Bearer sk-user"


def test_execute_keeps_a_bounded_number_of_breakers_and_the_open_ones(make_app, monkeypatch):
    import providers
    fake_dns(monkeypatch, PUBLIC_IP)
    monkeypatch.setattr(providers, "MAX_HOST_CIRCUITS", 3)
    monkeypatch.setattr(providers, "CIRCUITS", {name: providers.Circuit() for name in providers.PROVIDERS})
    client = make_app(execute_allowed_hosts=("*",)).test_client()
    hosts = [f"h{i}.example.com" for i in range(6)]
    with responses.RequestsMock(assert_all_requests_are_fired=False) as upstream:
        upstream.post("https://h0.example.com/v1/chat/completions", status=500, json={"error": {"message": "down"}})
        for host in hosts[1:]:
            upstream.post(f"https://{host}/v1/chat/completions", json=completion_body())
        for host in hosts[:1] * 3 + hosts[1:]:
            client.post("/execute", json={"model": "m", "messages": MESSAGES}, headers={
                **auth(), "x-llm-endpoint": f"https://{host}/v1/chat/completions", "x-llm-apikey": "k"})
    own = {name: c.state for name, c in providers.CIRCUITS.items() if name.startswith("execute:")}
    assert len(own) <= 3 and own["execute:h0.example.com"] == "open"  # the dead host is still refused
    assert "execute:h5.example.com" in own and all(name in providers.CIRCUITS for name in providers.PROVIDERS)


# -- /api/query and /api/status ---------------------------------------------------------------------

def test_query_routes_by_task_type_and_fails_over(proxy, openai_fake, mistral_fake):
    openai_fake.script = [Reply(status=401, body={"error": {"message": "Incorrect API key provided"}})]
    r = call(proxy, "POST", "/api/query", {"x-llm-apikey": "mistral-user-key"},
             json={"query": "Write a haiku", "task_type": "text_generation", "request_id": "q-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] == "q-1" and body["cached"] is False
    # cheapest text_generation model first (gpt-5-mini); its rejected key fails over to Mistral
    assert openai_fake.posts[0]["json"]["model"] == "gpt-5-mini"
    assert (body["provider"], body["model"], body["response"]) == ("mistral", "mistral-large-latest", "Bonjour")
    assert body["usage"]["total_tokens"] == 15 and body["latency_ms"] > 0

    status = call(proxy, "GET", "/api/status").json()["providers"]
    assert status["openai"]["configured"] is True and status["openai"]["circuit"] == "closed"
    assert status["openai"]["requests"] == 1 and status["openai"]["errors"] == 1
    assert status["openai"]["last_error"] is None  # error texts are for the admin only
    as_admin = call(proxy, "GET", "/api/status", auth(ADMIN_KEY)).json()["providers"]
    assert "Incorrect API key" in as_admin["openai"]["last_error"]
    assert status["mistral"]["configured"] is False  # the per-request key was for that request only
    assert status["mistral"]["requests"] == 1 and status["mistral"]["last_latency_ms"] > 0


def test_query_by_provider_name_with_refinement(proxy, openai_fake):
    r = call(proxy, "POST", "/api/query", {"x-llm-num-calls": "2"}, json={"query": "Hi", "model": "openai"})
    assert r.status_code == 200 and r.json()["model"] == "gpt-5-mini" and r.json()["usage"]["total_tokens"] == 30
    assert len(openai_fake.posts) == 2


@pytest.mark.parametrize("body, status, err_type", [
    ({}, 400, "validation_error"),
    ({"query": "  "}, 400, "validation_error"),
    ({"query": "hi", "task_type": "juggling"}, 400, "validation_error"),
    ({"query": "hi", "model": "claude"}, 400, "provider_not_configured"),
    ({"query": "hi", "request_id": "bad id!"}, 400, "validation_error"),
])
def test_query_rejects_bad_input(client, body, status, err_type):
    r = client.post("/api/query", json=body, headers=auth())
    assert r.status_code == status and r.get_json()["error"]["type"] == err_type


def test_query_with_no_provider_key_answers_with_echo(client):
    r = client.post("/api/query", json={"query": "ping", "task_type": "summarization"}, headers=auth())
    assert r.status_code == 200 and r.get_json()["response"] == "ping" and r.get_json()["provider"] == "echo"


# -- /llm/* -----------------------------------------------------------------------------------------

def test_engines_with_server_and_body_keys(proxy):
    assert call(proxy, "GET", "/llm/engines").json() == {"engines": [{"id": "openai", "name": "OpenAI"}]}
    ids = [e["id"] for e in call(proxy, "POST", "/llm/engines", json={"mistralaiKey": "m"}).json()["engines"]]
    assert ids == ["openai", "mistralai"]


def test_models_of_an_engine(proxy, mistral_fake):
    r = call(proxy, "POST", "/llm/models/mistralai", json={"mistralaiKey": "m"})
    chat = r.json()["models"]["chat"]
    ids = [m["id"] for m in chat]
    assert "mistral-large-latest" in ids and "gpt-4o-mini" in ids  # configured list, then the provider's own
    assert {"id", "name", "meta"} <= set(chat[0])
    assert mistral_fake.requests[0]["headers"]["Authorization"] == "Bearer m"
    assert call(proxy, "GET", "/llm/models/google").json()["error"]["type"] == "provider_not_configured"
    assert call(proxy, "GET", "/llm/models/nope").status_code == 400


def ndjson(r) -> list[dict]:
    return [json.loads(line) for line in r.iter_lines(decode_unicode=True) if line]


def test_chat_streams_ndjson_lines(proxy, openai_fake):
    r = call(proxy, "POST", "/llm/chat", json={"engine": "openai", "model": "gpt-4o-mini", "prompt": "Say hello"},
             stream=True)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/x-ndjson")
    lines = ndjson(r)
    assert lines[:2] == [{"type": "content", "text": "Hel", "done": False},
                         {"type": "content", "text": "lo", "done": False}]
    assert lines[2]["type"] == "usage" and lines[2]["usage"]["total_tokens"] == 12
    assert lines[3] == {"type": "content", "text": "", "done": True} and len(lines) == 4
    assert openai_fake.posts[0]["json"]["messages"] == [{"role": "user", "content": "Say hello"}]


def test_chat_attachments_and_a_per_user_key(proxy, openai_fake, mistral_fake):
    png = base64.b64encode(b"\x89PNG fake").decode()
    r = call(proxy, "POST", "/llm/chat", json={"engine": "openai", "model": "gpt-4o-mini", "prompt": "What is this?",
                                               "attachment": {"mimeType": "image/png", "contents": png}})
    assert ndjson(r)[-1]["done"] is True
    assert openai_fake.posts[0]["json"]["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]

    r = call(proxy, "POST", "/llm/chat", json={
        "engine": "mistralai", "model": "mistral-large-latest", "prompt": "Summarise", "mistralaiKey": "user-m",
        "messages": [{"role": "system", "content": "Be brief."}],
        "attachment": {"mimeType": "text/markdown", "content": "# Notes\nhello"}})
    assert "".join(line.get("text", "") for line in ndjson(r)) == "Bonjour"
    sent = mistral_fake.posts[0]
    assert sent["headers"]["Authorization"] == "Bearer user-m"
    assert sent["json"]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["json"]["messages"][1]["content"].endswith("# Notes\nhello")


@pytest.mark.parametrize("body, status", [
    ({"engine": "nope", "model": "m", "prompt": "x"}, 400),
    ({"engine": "openai", "prompt": "x"}, 400),
    ({"engine": "openai", "model": "gpt-4o-mini"}, 400),
    ({"engine": "google", "model": "gemini-2.5-flash", "prompt": "x"}, 400),
    ({"engine": "openai", "model": "m", "prompt": "x", "attachment": {"mimeType": "application/pdf",
                                                                    "contents": "JVBER"}}, 400),
])
def test_chat_errors_before_streaming_are_json(client, body, status):
    r = client.post("/llm/chat", json=body, headers=auth())
    assert r.status_code == status and "error" in r.get_json()


def test_llm_endpoints_need_a_key(client):
    assert client.get("/llm/engines").status_code == 401
    assert client.post("/llm/chat", json={}).status_code == 401

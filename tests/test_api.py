"""The client API through Flask's test client: auth, validation, errors, echo, models, headers."""
from __future__ import annotations

import json
import logging

import pytest

import gateway
from support import ADMIN_KEY, CLIENT_KEY, auth, validate

HELLO = {"model": "echo", "messages": [{"role": "user", "content": "Hello there"}]}


def sse(data: bytes) -> list:
    """The JSON events of an SSE body, with [DONE] as the string."""
    out = []
    for block in data.decode().split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_echo_completion_is_an_openai_completion(client):
    r = client.post("/v1/chat/completions", json=HELLO, headers=auth())
    assert r.status_code == 200
    body = r.get_json()
    validate(body, "CreateChatCompletionResponse")
    assert body["choices"][0]["message"]["content"] == "Hello there"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert r.headers["x-llm-provider"] == "echo"
    assert r.headers["x-llm-model"] == "echo"
    assert r.headers["x-llm-attempts"] == "1"
    assert r.headers["x-llm-cost"] == "0"
    assert float(r.headers["x-llm-overhead-ms"]) >= 0
    assert r.headers["X-Request-ID"].startswith("req_")


def test_unversioned_alias_and_echo_prefix(client):
    r = client.post("/chat/completions", json={**HELLO, "model": "echo/anything"}, headers=auth())
    assert r.status_code == 200
    assert r.get_json()["model"] == "anything"


def test_echo_stream_chunks_validate_and_end_with_done(client):
    r = client.post("/v1/chat/completions", json={**HELLO, "stream": True}, headers=auth())
    assert r.status_code == 200
    assert r.mimetype == "text/event-stream"
    assert r.headers["Cache-Control"] == "no-cache"
    assert r.headers["X-Accel-Buffering"] == "no"
    events = sse(r.data)
    assert events[-1] == "[DONE]"
    for chunk in events[:-1]:
        validate(chunk, "CreateChatCompletionStreamResponse")
        assert "usage" not in chunk  # not asked for
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1]) == "Hello there"


def test_stream_include_usage_sends_a_last_usage_chunk(client):
    body = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
    events = sse(client.post("/v1/chat/completions", json=body, headers=auth()).data)
    last = events[-2]
    validate(last, "CreateChatCompletionStreamResponse")
    assert last["choices"] == [] and last["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("headers", [{"X-API-Key": CLIENT_KEY}, {"X-ClientId": CLIENT_KEY}, auth(ADMIN_KEY)])
def test_every_key_header_is_accepted(client, headers):
    assert client.post("/v1/chat/completions", json=HELLO, headers=headers).status_code == 200


@pytest.mark.parametrize("headers", [{}, auth("wrong"), {"Authorization": CLIENT_KEY},
                                     {"Authorization": f"Token {CLIENT_KEY}"}, {"X-API-Key": "sk-unknown"}])
def test_missing_or_bad_keys_are_401(client, headers):
    r = client.post("/v1/chat/completions", json=HELLO, headers=headers)
    assert r.status_code == 401
    validate(r.get_json(), "ErrorResponse")
    assert r.get_json()["error"]["type"] == "authentication_error"
    assert CLIENT_KEY not in r.get_data(as_text=True)


@pytest.mark.parametrize("body, paths", [
    ({"messages": [{"role": "user", "content": "x"}]}, ["model"]),
    ({"model": "echo", "messages": []}, ["messages"]),
    ({"model": "echo", "messages": [{"role": "wizard", "content": "x"}]}, ["messages[0].role"]),
    ({"model": "echo", "messages": [{"role": "user"}]}, ["messages[0].content"]),
    ({"model": "echo", "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                   "image_url": {"url": "ftp://x"}}]}]},
     ["messages[0].content[0].image_url.url"]),
    ({**HELLO, "temperature": 2.5, "top_p": -0.1}, ["temperature", "top_p"]),
    ({**HELLO, "presence_penalty": 3, "frequency_penalty": "high"}, ["presence_penalty", "frequency_penalty"]),
    ({**HELLO, "max_tokens": 0, "n": 129}, ["max_tokens", "n"]),
    ({**HELLO, "stop": ["a", "b", "c", "d", "e"]}, ["stop"]),
    ({**HELLO, "webhookUrl": "not a url"}, ["webhookUrl"]),
    ({**HELLO, "stream": "yes", "tools": {}}, ["stream", "tools"]),
    ({**HELLO, "tools": ["x", {"type": "function", "function": "x"}]}, ["tools[0].function", "tools[1].function"]),
    ({**HELLO, "function_call": 5, "tool_choice": ["auto"]}, ["tool_choice", "function_call"]),
    ({"model": "echo", "messages": [{"role": "assistant", "tool_calls": ["x"]},
                                    {"role": "assistant", "function_call": "x"}]},
     ["messages[0].tool_calls[0].function", "messages[1].function_call"]),
    ({**HELLO, "response_format": {"type": "json_schema", "json_schema": "x"}}, ["response_format"]),
    ({**HELLO, "webhookUrl": "http://[::1"}, ["webhookUrl"]),
])
def test_validation_errors_list_every_problem(client, body, paths):
    r = client.post("/v1/chat/completions", json=body, headers=auth())
    assert r.status_code == 400
    err = r.get_json()
    validate(err, "ErrorResponse")
    assert err["error"]["type"] == "validation_error"
    assert [d["path"] for d in err["error"]["details"]] == paths


@pytest.mark.parametrize("data, ctype, status, err_type", [
    ("{not json", "application/json", 400, "invalid_json"),
    ("[1, 2]", "application/json", 400, "invalid_request_error"),
    ('"text"', "application/json", 400, "invalid_request_error"),
    ("model=echo", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ("\xff\xfe", "application/json", 400, "invalid_json"),
    ("[" * 100_000, "application/json", 400, "invalid_json"),
])
def test_malformed_bodies_get_json_errors(client, data, ctype, status, err_type):
    r = client.post("/v1/chat/completions", data=data, headers={**auth(), "Content-Type": ctype})
    assert r.status_code == status
    validate(r.get_json(), "ErrorResponse")
    assert r.get_json()["error"]["type"] == err_type


def test_huge_body_is_413(make_app):
    client = make_app(max_body_bytes=2048).test_client()
    body = {**HELLO, "messages": [{"role": "user", "content": "x" * 5000}]}
    r = client.post("/v1/chat/completions", json=body, headers=auth())
    assert r.status_code == 413
    assert r.get_json()["error"]["type"] == "request_too_large"


def test_flask_404_and_405_are_json(client):
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.get_json()["error"]["type"] == "not_found"
    r = client.get("/v1/chat/completions", headers=auth())
    assert r.status_code == 405 and r.get_json()["error"]["type"] == "method_not_allowed"
    assert "POST" in r.headers["Allow"]


def test_unknown_model_and_unconfigured_provider(client):
    r = client.post("/v1/chat/completions", json={**HELLO, "model": "no-such-model"}, headers=auth())
    assert r.status_code == 400 and r.get_json()["error"]["type"] == "model_not_found"
    r = client.post("/v1/chat/completions", json={**HELLO, "model": "gpt-4o"}, headers=auth())
    assert r.status_code == 400 and r.get_json()["error"]["type"] == "provider_not_configured"
    r = client.post("/v1/chat/completions", json={**HELLO, "model": "nosuchprovider/x"}, headers=auth())
    assert r.status_code == 400 and r.get_json()["error"]["type"] == "model_not_found"


def test_request_id_is_taken_from_the_client_when_well_formed(client):
    r = client.post("/v1/chat/completions", json=HELLO, headers={**auth(), "X-Request-ID": "abc-123.x_y"})
    assert r.headers["X-Request-ID"] == "abc-123.x_y"
    r = client.post("/v1/chat/completions", json=HELLO, headers={**auth(), "X-Request-ID": "bad id/../"})
    assert r.headers["X-Request-ID"].startswith("req_")


def test_security_headers_on_every_response(client):
    for r in (client.get("/health"), client.get("/missing"), client.post("/v1/chat/completions", json=HELLO)):
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]


def test_cors_only_for_configured_origins(make_app):
    client = make_app(cors_origins=("https://ui.example",)).test_client()
    r = client.options("/v1/chat/completions", headers={"Origin": "https://ui.example",
                                                        "Access-Control-Request-Method": "POST"})
    assert r.status_code == 204 and r.headers["Access-Control-Allow-Origin"] == "https://ui.example"
    r = client.post("/v1/chat/completions", json=HELLO, headers={**auth(), "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers


def test_health(client):
    assert client.get("/health").get_json() == {"status": "ok"}


def test_health_is_503_when_the_database_is_gone(app):
    db = app.extensions["llm_proxy"].db
    db.close()
    if db.is_pg:
        db.url = "postgresql://postgres@127.0.0.1:1/none?connect_timeout=1"
    else:
        db.path = "/nonexistent-dir/llm-proxy.db"
    r = app.test_client().get("/health")
    assert r.status_code == 503 and r.get_json()["status"] == "error"


def test_models_lists_configured_models_with_a_key(make_app):
    client = make_app(provider_keys={"openai": "sk-test"}).test_client()
    r = client.get("/v1/models", headers=auth())
    validate(r.get_json(), "ListModelsResponse")
    ids = [m["id"] for m in r.get_json()["data"]]
    assert "echo" in ids and "gpt-4o-mini" in ids
    assert "claude-sonnet-4-5" not in ids  # no Anthropic key
    assert client.get("/models", headers=auth()).get_json() == r.get_json()


def test_unexpected_failure_is_a_bare_500(client, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("secret internal detail")
    monkeypatch.setattr(gateway.Gateway, "complete", boom)
    r = client.post("/v1/chat/completions", json=HELLO, headers=auth())
    assert r.status_code == 500
    err = r.get_json()["error"]
    assert err["type"] == "internal_error" and r.headers["X-Request-ID"] in err["message"]
    assert "secret" not in r.get_data(as_text=True) and "Traceback" not in r.get_data(as_text=True)


def test_every_call_writes_a_usage_row(app, client):
    client.post("/v1/chat/completions", json=HELLO, headers={**auth(), "X-Request-ID": "usage-1"})
    streamed = client.post("/v1/chat/completions", json={**HELLO, "stream": True},
                           headers={**auth(), "X-Request-ID": "usage-2"})
    assert streamed.data.endswith(b"data: [DONE]\n\n")
    assert app.extensions["llm_proxy"].db.usage.flush()  # written just after each answer (usage.py)
    rows = app.extensions["llm_proxy"].db.query("SELECT request_id, model, provider, status, prompt_tokens, "
                                                 "completion_tokens FROM usage ORDER BY request_id")
    assert [(r["request_id"], r["provider"], r["status"]) for r in rows] == [
        ("usage-1", "echo", "ok"), ("usage-2", "echo", "ok")]
    assert all(r["prompt_tokens"] > 0 and r["completion_tokens"] > 0 for r in rows)


class Lines(logging.Handler):
    """A logging handler that keeps the proxy's log lines."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def log_lines():
    handler = Lines()
    logger = logging.getLogger("llm_proxy")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def test_prompts_reach_the_log_only_with_log_bodies(make_app, log_lines):
    for log_bodies in (False, True):
        client = make_app(log_bodies=log_bodies).test_client()
        client.post("/v1/chat/completions", json={**HELLO, "messages": [{"role": "user", "content": "p-" + str(
            log_bodies)}]}, headers=auth()).close()
    access = [json.loads(line) for line in log_lines if '"path":"/v1/chat/completions"' in line]
    assert "messages" not in access[0] and "p-False" not in log_lines[0]
    assert access[1]["messages"] == [{"role": "user", "content": "p-True"}]
    assert all(CLIENT_KEY not in line for line in log_lines)


def test_usage_is_retried_while_the_database_is_down_and_written_when_it_is_back(app, client, monkeypatch):
    from errors import ServiceUnavailable
    db = app.extensions["llm_proxy"].db
    real, failures = db.record_usage, []

    def flaky(rows):
        if len(failures) < 2:
            failures.append(len(rows))
            raise ServiceUnavailable("the database is unavailable")
        real(rows)
    monkeypatch.setattr(db, "record_usage", flaky)
    r = client.post("/v1/chat/completions", json=HELLO, headers={**auth(), "X-Request-ID": "kept-0"})
    assert r.status_code == 200  # the answer does not wait for its usage row
    assert app.extensions["llm_proxy"].db.usage.flush()
    assert failures == [1, 1]
    assert db.query_one("SELECT COUNT(*) AS n FROM usage WHERE request_id = ?", ("kept-0",))["n"] == 1


def test_an_answer_is_not_lost_when_its_usage_cannot_be_written(app, client, log_lines, monkeypatch):
    import usage
    from errors import ServiceUnavailable

    def down(rows):
        raise ServiceUnavailable("the database is unavailable")
    monkeypatch.setattr(app.extensions["llm_proxy"].db, "record_usage", down)
    monkeypatch.setattr(usage, "RETRY_FOR", 0.2)
    r = client.post("/v1/chat/completions", json=HELLO, headers={**auth(), "X-Request-ID": "kept-1"})
    assert r.status_code == 200 and r.get_json()["choices"][0]["message"]["content"] == "Hello there"
    assert app.extensions["llm_proxy"].db.usage.flush()
    [line] = [json.loads(x) for x in log_lines if "usage_not_recorded" in x]
    assert line["request_id"] == "kept-1" and line["completion_tokens"] > 0

"""End to end: a real gunicorn, a fake OpenAI upstream on 127.0.0.1, and the official openai SDK."""
from __future__ import annotations

import json
import socket
import time

import openai
import pytest
import requests

from support import CLIENT_KEY, FakeOpenAI, Gunicorn, Reply, completion_body, stream_events, validate

TOOL_CALLS = [{"id": "call_abc123", "type": "function",
               "function": {"name": "get_current_weather", "arguments": "{\"location\": \"Boston, MA\"}"}}]
TOOLS = [{"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}]
MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def upstream():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def mistral():
    with FakeOpenAI(Reply(body=completion_body("Bonjour", model="mistral-small-latest"))) as fake:
        yield fake


@pytest.fixture
def proxy(upstream, mistral, database_url):
    env = {"DATABASE_URL": database_url, "API_KEY": CLIENT_KEY, "OPENAI_API_KEY": "sk-upstream-secret",
           "OPENAI_BASE_URL": upstream.url, "MISTRAL_API_KEY": "mistral-secret", "MISTRAL_BASE_URL": mistral.url,
           "INITIAL_BACKOFF": "10", "MAX_BACKOFF": "2000", "MAX_RETRIES": "2", "REQUEST_TIMEOUT": "5"}
    with Gunicorn(env, workers=2) as server:
        yield server


@pytest.fixture
def sdk(proxy):
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20)


def test_non_stream_completion(sdk, upstream):
    raw = sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from the fake upstream."
    assert completion.usage.total_tokens == 15
    validate(json.loads(raw.text), "CreateChatCompletionResponse")
    assert raw.headers["x-llm-provider"] == "openai" and raw.headers["x-llm-attempts"] == "1"
    assert raw.headers["x-llm-cost"] == "0.0000045"  # 10 x 0.00015/1k + 5 x 0.0006/1k (seeded prices)
    sent = upstream.posts[0]
    assert sent["headers"]["Authorization"] == "Bearer sk-upstream-secret"
    assert sent["json"]["model"] == "gpt-4o-mini" and sent["json"]["messages"] == MESSAGES


def test_stream_with_usage(sdk, upstream):
    upstream.default = Reply(stream=stream_events(["Hel", "lo", "!"]))
    stream = sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello!"
    assert chunks[-1].usage.total_tokens == 13
    for c in chunks:
        validate(c.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")


def test_stream_without_usage_hides_the_usage_chunk(proxy, upstream):
    upstream.default = Reply(stream=stream_events(["a", "b"]))
    r = requests.post(proxy.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                      json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}, stream=True)
    events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])
    assert upstream.posts[0]["json"]["stream_options"] == {"include_usage": True}


def test_tool_call_round_trip(sdk, upstream):
    upstream.default = Reply(body=completion_body(tool_calls=TOOL_CALLS))
    completion = sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=TOOLS,
                                             tool_choice="auto")
    call = completion.choices[0].message.tool_calls[0]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_current_weather" and json.loads(call.function.arguments) == {
        "location": "Boston, MA"}
    assert upstream.posts[0]["json"]["tools"] == TOOLS and upstream.posts[0]["json"]["tool_choice"] == "auto"


def test_errors_arrive_as_the_sdks_exception_types(sdk, proxy, upstream):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[], temperature=9)
    assert info.value.body["type"] == "validation_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=proxy.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="not-a-model", messages=MESSAGES)
    assert info.value.body["type"] == "model_not_found"
    upstream.script = [Reply(status=400, body={"error": {"message": "Invalid 'messages[0].content'",
                                                         "type": "invalid_request_error"}})]
    with pytest.raises(openai.BadRequestError, match="Invalid 'messages\\[0\\].content'"):
        sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    upstream.default = Reply(status=500, body={"error": {"message": "The server had an error"}})
    with pytest.raises(openai.InternalServerError) as info:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 502 and info.value.response.headers["x-llm-attempts"] == "3"


def test_retry_after_429(sdk, upstream):
    upstream.script = [Reply(status=429, headers={"Retry-After": "1"},
                             body={"error": {"message": "Rate limit reached", "type": "requests"}})]
    started = time.monotonic()
    raw = sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert raw.headers["x-llm-attempts"] == "2" and len(upstream.posts) == 2
    assert time.monotonic() - started >= 0.95  # waited for Retry-After, not the 10 ms backoff


def test_fallback_to_another_provider(sdk, upstream, mistral):
    upstream.default = Reply(status=401, body={"error": {"message": "Incorrect API key provided"}})
    raw = sdk.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_body={"fallbacks": ["mistral-small-latest"]})
    assert raw.parse().choices[0].message.content == "Bonjour"
    assert raw.headers["x-llm-provider"] == "mistral" and raw.headers["x-llm-model"] == "mistral-small-latest"
    assert raw.headers["x-llm-attempts"] == "2"
    assert "fallbacks" not in mistral.posts[0]["json"]


def test_client_disconnect_closes_the_upstream_stream(proxy, upstream):
    upstream.default = Reply(stream=stream_events([f"w{i} " for i in range(200)]), chunk_delay=0.05)
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {CLIENT_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"data: " not in received:
            received += s.recv(4096)
    deadline = time.time() + 10
    while upstream.disconnects == 0 and time.time() < deadline:
        time.sleep(0.1)
    assert upstream.disconnects == 1  # the proxy hung up on the provider well before 200 chunks (10 s)


def test_mid_stream_drop_ends_with_an_error_event(proxy, upstream):
    upstream.default = Reply(stream=stream_events(["a", "b", "c"]), drop_after=2, done=False)
    r = requests.post(proxy.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                      json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}, stream=True)
    events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1]["error"]["type"] == "upstream_error"
    validate(events[-1], "ErrorResponse")
    assert len(upstream.posts) == 1  # no fallback after the first byte


def test_log_lines_are_json_and_hold_no_secrets(sdk, proxy, upstream):
    sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-wrong-secret", max_retries=0).models.list()
    time.sleep(0.3)
    log = proxy.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    access = [entry for entry in lines if entry.get("path") == "/v1/chat/completions"]
    assert access and access[0]["status"] == 200 and access[0]["provider"] == "openai"
    assert {"request_id", "key_id", "latency_ms", "tokens", "cost", "model"} <= set(access[0])
    for secret in ("sk-upstream-secret", "mistral-secret", CLIENT_KEY, "sk-wrong-secret", "Say hello"):
        assert secret not in log

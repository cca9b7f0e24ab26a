"""The OpenAI-compatible adapter and providers.send(): what goes upstream, what comes back, retries,
fallback and the circuit breaker, with `responses` and payloads from OpenAI's API reference."""
from __future__ import annotations

import json

import pytest
import requests
import responses

import providers
from adapters import Endpoint
from errors import ModelNotFound, UpstreamError, UpstreamTimeout
from providers import PROVIDERS, Route, Target, resolve, send
from support import completion_body, stream_events, validate

BASE = "https://api.openai.com/v1"
POLICY = providers.RetryPolicy(max_retries=2, initial_backoff=100, max_backoff=2000, factor=2.0, jitter=0.0)
REQUEST = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "developer", "content": "You are a helpful assistant."},
                 {"role": "user", "content": "Hello!"}],
    "temperature": 0.2, "fallbacks": ["mistral-small-latest"], "webhookUrl": "https://example.com/hook",
    "logit_bias": {"50256": -100},
}


def target(provider: str = "openai", model: str = "gpt-4o-mini", base: str = BASE, key: str = "sk-up") -> Target:
    return Target(Route(model, provider, model), Endpoint(base, key))


def sse_body(chunks: list[dict], done: bool = True) -> str:
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + ("data: [DONE]\n\n" if done else "")


def run(targets, body=REQUEST, stream=False, sleeps=None):
    return send(targets, body, stream, POLICY, 5.0, sleep=(sleeps.append if sleeps is not None else lambda s: None))


@responses.activate
def test_request_goes_upstream_without_proxy_extensions():
    responses.post(f"{BASE}/chat/completions", json=completion_body())
    outcome = run([target()])
    sent = responses.calls[0].request
    assert sent.url == f"{BASE}/chat/completions"
    assert sent.headers["Authorization"] == "Bearer sk-up"
    body = json.loads(sent.body)
    assert "fallbacks" not in body and "webhookUrl" not in body and "stream" not in body
    assert body["logit_bias"] == {"50256": -100}  # unknown fields pass through to OpenAI-compatible providers
    assert body["messages"] == REQUEST["messages"]
    validate(outcome.completion, "CreateChatCompletionResponse")
    assert outcome.completion["usage"]["total_tokens"] == 15 and outcome.attempts == 1


@responses.activate
def test_compatible_provider_gets_its_own_model_id_and_missing_fields_filled():
    minimal = {"id": "x", "object": "chat.completion", "created": 1, "model": "mistral-small-latest",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "Bonjour"},
                            "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    responses.post("https://api.mistral.ai/v1/chat/completions", json=minimal)
    t = Target(Route("mistral/mistral-small-latest", "mistral", "mistral-small-latest"),
               Endpoint("https://api.mistral.ai/v1", "mk"))
    completion = run([t]).completion
    assert json.loads(responses.calls[0].request.body)["model"] == "mistral-small-latest"
    validate(completion, "CreateChatCompletionResponse")
    assert completion["usage"]["total_tokens"] == 5


@responses.activate
def test_stream_asks_for_usage_and_yields_chunks():
    chunks = stream_events(["Hel", "lo"])
    responses.post(f"{BASE}/chat/completions", body=sse_body(chunks), content_type="text/event-stream")
    outcome = run([target()], body={**REQUEST, "stream": True}, stream=True)
    got = list(outcome.chunks)
    assert json.loads(responses.calls[0].request.body)["stream_options"] == {"include_usage": True}
    assert [c["choices"][0]["delta"].get("content") for c in got if c["choices"]] == ["", "Hel", "lo", None]
    assert got[-1]["usage"]["total_tokens"] == 12
    for c in got:
        validate(c, "CreateChatCompletionStreamResponse")


@responses.activate
def test_stream_dropped_before_done_is_an_upstream_error():
    responses.post(f"{BASE}/chat/completions", body=sse_body(stream_events(["a"]), done=False))
    outcome = run([target()], body={**REQUEST, "stream": True}, stream=True)
    with pytest.raises(UpstreamError, match="without \\[DONE\\]"):
        list(outcome.chunks)


@responses.activate
def test_429_is_retried_after_retry_after():
    responses.post(f"{BASE}/chat/completions", status=429, headers={"Retry-After": "1"},
                   json={"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}})
    responses.post(f"{BASE}/chat/completions", json=completion_body())
    sleeps: list[float] = []
    outcome = run([target()], sleeps=sleeps)
    assert outcome.attempts == 2
    assert sleeps == [1.0]  # Retry-After (1 s) is longer than the first backoff (0.1 s)


@responses.activate
def test_5xx_backs_off_exponentially_then_gives_502():
    for _ in range(3):
        responses.post(f"{BASE}/chat/completions", status=503, json={"error": {"message": "overloaded"}})
    sleeps: list[float] = []
    with pytest.raises(UpstreamError) as info:
        run([target()], sleeps=sleeps)
    assert info.value.status == 502 and info.value.type == "upstream_error"
    assert info.value.attempts == 3 and sleeps == [0.1, 0.2]
    assert "overloaded" in info.value.message


@pytest.mark.parametrize("status", [400, 413, 422])
@responses.activate
def test_request_errors_are_returned_at_once_with_the_upstream_status(status):
    responses.post(f"{BASE}/chat/completions", status=status,
                   json={"error": {"message": "Invalid 'messages'", "type": "invalid_request_error"}})
    fallback = target("mistral", "mistral-small-latest", "https://api.mistral.ai/v1")
    with pytest.raises(UpstreamError) as info:
        run([target(), fallback])
    assert info.value.status == status and "Invalid 'messages'" in info.value.message
    assert len(responses.calls) == 1


@pytest.mark.parametrize("status", [401, 403, 404])
@responses.activate
def test_rejected_key_or_gone_model_fails_over(status):
    responses.post(f"{BASE}/chat/completions", status=status, json={"error": {"message": "Incorrect API key"}})
    responses.post("https://api.mistral.ai/v1/chat/completions", json=completion_body(model="mistral-small-latest"))
    outcome = run([target(), target("mistral", "mistral-small-latest", "https://api.mistral.ai/v1")])
    assert outcome.target.route.provider == "mistral" and outcome.attempts == 2
    assert outcome.failures[0]["status"] == status


@responses.activate
def test_last_4xx_without_fallback_keeps_its_status():
    responses.post(f"{BASE}/chat/completions", status=401, json={"error": {"message": "Incorrect API key"}})
    with pytest.raises(UpstreamError) as info:
        run([target()])
    assert info.value.status == 401 and len(responses.calls) == 1


@responses.activate
def test_timeouts_become_504_and_connection_errors_502():
    responses.post(f"{BASE}/chat/completions", body=requests.ReadTimeout("read timed out"))
    with pytest.raises(UpstreamTimeout) as info:
        run([target()])
    assert info.value.status == 504 and info.value.attempts == 3
    responses.replace(responses.POST, f"{BASE}/chat/completions", body=requests.ConnectionError("refused"))
    with pytest.raises(UpstreamError) as info:
        run([target()])
    assert info.value.status == 502


@responses.activate
def test_garbage_body_is_retried_then_502():
    responses.post(f"{BASE}/chat/completions", body="<html>Bad gateway</html>", status=200)
    with pytest.raises(UpstreamError, match="not JSON") as info:
        run([target()])
    assert info.value.attempts == 3


@responses.activate
def test_circuit_opens_after_five_failures_and_skips_the_provider():
    responses.post(f"{BASE}/chat/completions", status=500, json={"error": {"message": "boom"}})
    responses.post("https://api.mistral.ai/v1/chat/completions", json=completion_body())
    fallback = target("mistral", "mistral-small-latest", "https://api.mistral.ai/v1")
    run([target(), fallback])  # 3 failures
    run([target(), fallback])  # 5 failures: open now
    assert providers.CIRCUITS["openai"].state == "open"
    before = len(responses.calls)
    outcome = run([target(), fallback])
    assert outcome.target.route.provider == "mistral" and len(responses.calls) == before + 1
    providers.CIRCUITS["openai"].opened_at -= providers.CIRCUIT_OPEN_SECONDS
    assert providers.CIRCUITS["openai"].state == "half_open"


def test_retry_delay_respects_cap_and_jitter():
    policy = providers.RetryPolicy(max_retries=5, initial_backoff=1000, max_backoff=3000, factor=2.0, jitter=0.1)
    assert 0.9 <= policy.delay(0) <= 1.1
    assert 1.8 <= policy.delay(1) <= 2.2
    assert 2.7 <= policy.delay(4) <= 3.0  # capped at MAX_BACKOFF, jitter applied below the cap
    assert policy.delay(0, retry_after=60) == 3.0  # Retry-After is capped at MAX_BACKOFF


@pytest.mark.parametrize("name, provider, upstream", [
    ("gpt-4o", "openai", "gpt-4o"), ("o3-mini", "openai", "o3-mini"), ("chatgpt-4o-latest", "openai", None),
    ("claude-3-7-sonnet", "anthropic", None), ("gemini-2.0-pro", "gemini", None),
    ("codestral-2501", "mistral", None), ("open-mistral-nemo", "mistral", None), ("grok-4", "xai", None),
    ("deepseek-chat", "deepseek", None), ("groq/llama-3.3-70b-versatile", "groq", "llama-3.3-70b-versatile"),
    ("openrouter/meta-llama/llama-3.1-8b", "openrouter", "meta-llama/llama-3.1-8b"),
])
def test_model_resolution(name, provider, upstream):
    route = resolve(name, {})
    assert route.provider == provider and route.upstream_model == (upstream or name)


def test_models_table_wins_and_unknown_names_fail():
    models = {"fast": {"name": "fast", "provider": "groq", "upstream_model": "llama-3.1-8b-instant",
                       "fallbacks": ["gpt-4o-mini"], "input_cost_per_1k": 0.00005, "output_cost_per_1k": 0.00008}}
    route = resolve("fast", models)
    assert (route.provider, route.upstream_model, route.fallbacks) == ("groq", "llama-3.1-8b-instant", ["gpt-4o-mini"])
    with pytest.raises(ModelNotFound):
        resolve("llama3", models)
    with pytest.raises(ModelNotFound):
        resolve("ollama/llama3.2", models, enabled=lambda p: p != "ollama")


def test_every_provider_of_the_spec_is_registered():
    assert {"openai", "anthropic", "gemini", "mistral", "azure", "ollama", "groq", "xai", "deepseek", "cerebras",
            "openrouter", "echo"} <= set(PROVIDERS)


@pytest.mark.parametrize("sent, expected", [("stop", "stop"), ("model_length", "length"), ("error", "stop"),
                                            ("tool_calls", "tool_calls"), (None, "stop")])
def test_compatible_providers_finish_reasons_are_mapped_to_openais(sent, expected):
    body = completion_body()
    body["choices"][0]["finish_reason"] = sent
    completion = PROVIDERS["mistral"].parse_response(body, "mistral-small-latest")
    assert completion["choices"][0]["finish_reason"] == expected
    validate(completion, "CreateChatCompletionResponse")
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {}, "finish_reason": sent}]}
    [parsed] = PROVIDERS["mistral"].parse_stream([f"data: {json.dumps(chunk)}".encode(), b"", b"data: [DONE]", b""],
                                                 "m")
    assert parsed["choices"][0]["finish_reason"] == (None if sent is None else expected)


def test_a_request_that_cannot_be_translated_does_not_wedge_a_half_open_circuit(monkeypatch):
    circuit = providers.CIRCUITS["openai"]
    circuit.opened_at = 0.0  # opened long ago: half open, the next request is the trial

    def untranslatable(*args):
        raise ValueError("cannot translate")
    monkeypatch.setattr(PROVIDERS["openai"], "build_request", untranslatable)
    with pytest.raises(ValueError):
        run([target()])
    assert circuit.state == "half_open" and circuit.allow()  # the next request may still be the trial


# --- the lean upstream call (providers._prepare / LeanAdapter): what requests did, kept ----------

GEMINI_ANSWER = {"candidates": [{"content": {"parts": [{"text": "Hi."}], "role": "model"}, "finishReason": "STOP",
                                 "index": 0}],
                 "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1, "totalTokenCount": 4}}


@pytest.mark.parametrize("provider, base, model, url", [
    ("gemini", "https://generativelanguage.googleapis.com", "my model|ä",
     "https://generativelanguage.googleapis.com/v1beta/models/my%20model%7C%C3%A4:generateContent"),
    ("azure", "https://res.openai.azure.com", "dep loy",
     "https://res.openai.azure.com/openai/deployments/dep%20loy/chat/completions?api-version=2024-10-21"),
])
@responses.activate
def test_model_names_in_the_path_are_quoted_as_requests_quotes_them(provider, base, model, url):
    responses.post(url, json=GEMINI_ANSWER if provider == "gemini" else completion_body())
    outcome = run([Target(Route(model, provider, model), Endpoint(base, "k"))])
    assert responses.calls[0].request.url == url
    assert outcome.completion["choices"][0]["message"]["content"]


@pytest.mark.parametrize("base, name", [("api.openai.com/v1?key=sk-secret", "MissingSchema"),
                                        ("https:///v1?key=sk-secret", "InvalidURL"),
                                        ("https://api.openai.com:99999/v1?key=sk-secret", "InvalidURL"),
                                        ("ftp://api.openai.com/v1?key=sk-secret", "InvalidSchema")])
@responses.activate
def test_an_invalid_base_url_is_a_clean_upstream_error(base, name):
    with pytest.raises(UpstreamError) as info:
        run([target(base=base)])
    assert info.value.status == 502 and info.value.message == f"request to openai failed ({name})"
    assert "sk-secret" not in json.dumps(info.value.to_dict())
    assert len(responses.calls) == 0


@responses.activate
def test_body_is_compact_utf8_json_and_nan_is_refused_as_requests_refused_it():
    responses.post(f"{BASE}/chat/completions", json=completion_body())
    messages = [{"role": "user", "content": "Grüß dich \u2603"}]
    run([target()], body={"model": "gpt-4o-mini", "messages": messages})
    sent = responses.calls[0].request
    assert "Grüß dich \u2603".encode() in sent.body and json.loads(sent.body)["messages"] == messages
    assert sent.headers["content-length"] == str(len(sent.body)) and sent.headers["content-type"] == "application/json"
    lone = [{"role": "user", "content": "half a pair \ud83d"}]  # valid JSON from a client, not encodable as UTF-8
    run([target()], body={"model": "gpt-4o-mini", "messages": lone})
    assert json.loads(responses.calls[1].request.body)["messages"] == lone
    with pytest.raises(UpstreamError, match=r"\(InvalidJSONError\)"):
        run([target()], body={"model": "gpt-4o-mini", "messages": messages, "temperature": float("nan")})
    assert len(responses.calls) == 2  # nothing went out


@responses.activate
def test_credentials_in_the_base_url_become_basic_auth_as_with_requests():
    answer = {"model": "llama3.2", "done": True, "message": {"role": "assistant", "content": "Hi"}}
    responses.post("http://user:pa%20ss@localhost:11434/api/chat", json=answer)
    run([Target(Route("llama3.2", "ollama", "llama3.2"), Endpoint("http://user:pa%20ss@localhost:11434"))])
    assert responses.calls[0].request.headers["Authorization"] == "Basic dXNlcjpwYSBzcw=="


@responses.activate
def test_a_newline_in_a_key_is_refused_before_anything_is_sent():
    with pytest.raises(UpstreamError, match=r"\(InvalidHeader\)"):
        run([target(key="sk-up\r\nX-Injected: 1")])
    assert len(responses.calls) == 0


@responses.activate
def test_public_only_targets_go_through_the_public_only_adapter():
    responses.post("https://hooks.example.com/v1/chat/completions", json=completion_body())
    t = Target(Route("gpt-4o-mini", "openai", "gpt-4o-mini"),
               Endpoint("https://hooks.example.com/v1", "sk", public_only=True))
    assert run([t]).completion["usage"]["total_tokens"] == 15
    assert isinstance(responses.calls[0].response.connection, providers.PUBLIC_SESSION.get_adapter("https://").__class__)


@responses.activate
def test_error_body_text_is_surfaced_when_it_is_not_json():
    responses.post(f"{BASE}/chat/completions", status=400, body="Modèle inconnu: gpt-5x",
                   content_type="text/plain; charset=utf-8")
    with pytest.raises(UpstreamError) as info:
        run([target()])
    assert info.value.message == "openai returned 400: Modèle inconnu: gpt-5x"

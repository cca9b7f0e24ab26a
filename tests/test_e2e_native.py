"""End to end through gunicorn and the openai SDK against fake Anthropic, Gemini and Ollama servers
speaking their real wire formats: the SDK gets the same shape of answer from every provider."""
from __future__ import annotations

import json

import openai
import pytest

from fakes_native import FakeAnthropic, FakeGemini, FakeOllama
from support import CLIENT_KEY, Gunicorn, validate

MODELS = {"anthropic": "claude-sonnet-4-5", "gemini": "gemini-2.5-flash", "ollama": "ollama/llama3.2"}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}]


@pytest.fixture(scope="module")
def fakes():
    with FakeAnthropic() as anthropic, FakeGemini() as gemini, FakeOllama() as ollama:
        yield {"anthropic": anthropic, "gemini": gemini, "ollama": ollama}


@pytest.fixture(scope="module")
def sdk(fakes, tmp_path_factory):
    env = {"DATABASE_URL": f"sqlite:///{tmp_path_factory.mktemp('db') / 'native.db'}", "API_KEY": CLIENT_KEY,
           "ANTHROPIC_API_KEY": "ant-secret", "ANTHROPIC_BASE_URL": fakes["anthropic"].url,
           "GEMINI_API_KEY": "gem-secret", "GEMINI_BASE_URL": fakes["gemini"].url,
           "OLLAMA_ENABLED": "true", "OLLAMA_BASE_URL": fakes["ollama"].url, "INITIAL_BACKOFF": "10"}
    with Gunicorn(env, workers=1) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20)


@pytest.mark.parametrize("provider", sorted(MODELS))
def test_text_answer(sdk, fakes, provider):
    raw = sdk.chat.completions.with_raw_response.create(
        model=MODELS[provider], messages=[{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}])
    validate(json.loads(raw.text), "CreateChatCompletionResponse")
    completion = raw.parse()
    assert completion.choices[0].message.content == fakes[provider].reply
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 12 and completion.usage.completion_tokens == 5
    assert raw.headers["x-llm-provider"] == provider


@pytest.mark.parametrize("provider", sorted(MODELS))
def test_streamed_answer_with_usage(sdk, fakes, provider):
    chunks = list(sdk.chat.completions.create(model=MODELS[provider], stream=True,
                                              stream_options={"include_usage": True},
                                              messages=[{"role": "user", "content": "Hi"}]))
    for chunk in chunks:
        validate(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == fakes[provider].reply
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.total_tokens == 17


@pytest.mark.parametrize("provider", sorted(MODELS))
def test_tool_call_both_ways(sdk, fakes, provider):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = sdk.chat.completions.create(model=MODELS[provider], messages=messages, tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"location": "Paris"}
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
    second = sdk.chat.completions.create(model=MODELS[provider], messages=messages, tools=TOOLS)
    assert second.choices[0].message.content == fakes[provider].reply
    assert "18 C, sunny" in json.dumps(fakes[provider].requests[-1]["json"])  # the tool result went upstream


@pytest.mark.parametrize("provider", sorted(MODELS))
def test_streamed_tool_call(sdk, provider):
    chunks = list(sdk.chat.completions.create(model=MODELS[provider], stream=True, tools=TOOLS,
                                              messages=[{"role": "user", "content": "Weather in Paris?"}]))
    args = "".join(tc.function.arguments or "" for c in chunks if c.choices
                   for tc in (c.choices[0].delta.tool_calls or []))
    names = [tc.function.name for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])
             if tc.function and tc.function.name]
    assert names == ["get_weather"] and json.loads(args) == {"location": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_provider_model_lists(sdk):
    ids = {m.id for m in sdk.models.list(extra_query={"refresh": "1"}).data}
    assert any(i.startswith("anthropic/") for i in ids)
    assert any(i.startswith("gemini/") for i in ids)
    assert any(i.startswith("ollama/") for i in ids)


def test_keys_go_in_headers_never_in_urls(sdk, fakes):
    sdk.chat.completions.create(model=MODELS["gemini"], messages=[{"role": "user", "content": "Hi"}])
    sent = fakes["gemini"].requests[-1]
    assert sent["headers"].get("x-goog-api-key") == "gem-secret" and "gem-secret" not in sent["path"]
    sdk.chat.completions.create(model=MODELS["anthropic"], messages=[{"role": "user", "content": "Hi"}])
    assert fakes["anthropic"].requests[-1]["headers"].get("x-api-key") == "ant-secret"

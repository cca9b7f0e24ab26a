"""Native adapters (native.py): Anthropic, Gemini, Azure OpenAI and Ollama, translated both ways.

Pure translation tests first (no HTTP), with payloads copied from each provider's documentation and
SDK test fixtures; then full calls through providers.send() with `responses`; then the fakes in
fakes_native.py, proven against the providers' own SDKs and against our adapters over real HTTP.
"""
from __future__ import annotations

import json

import pytest
import responses

import native
import providers
from adapters import Endpoint
from errors import InvalidRequest, UpstreamError
from fakes_native import FakeAnthropic, FakeGemini, FakeOllama
from providers import Route, Target
from support import validate

ANTHROPIC, GEMINI, AZURE, OLLAMA = (providers.PROVIDERS[n] for n in ("anthropic", "gemini", "azure", "ollama"))
FAST = providers.RetryPolicy(max_retries=1, initial_backoff=1, max_backoff=2, jitter=0)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
TOOL_HISTORY = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"location": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "15 degrees"},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"celsius": 21}'},
    {"role": "user", "content": "Which is warmer?"},
]

# --- payloads from the providers' documentation and SDK fixtures ------------------------------

# docs.anthropic.com, Messages API example response.
ANTHROPIC_TEXT = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
    "content": [{"type": "text", "text": "Hello!"}], "model": "claude-sonnet-4-20250514",
    "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 6}}
# docs.anthropic.com, tool use: the get_weather answer.
ANTHROPIC_TOOL_USE = {
    "id": "msg_01Aq9w938a90dw8q", "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514",
    "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"input_tokens": 384, "output_tokens": 91, "cache_creation_input_tokens": 0,
              "cache_read_input_tokens": 0},
    "content": [
        {"type": "text", "text": "I'll check the current weather in San Francisco for you."},
        {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
         "input": {"location": "San Francisco, CA", "unit": "celsius"}}]}


def sse(events) -> str:
    """An Anthropic event stream: `event: <type>` and `data: <json>` per event."""
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)


def text_delta(index, text):
    return {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}


def json_delta(index, partial):
    return {"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta",
                                                                     "partial_json": partial}}


# anthropics/anthropic-sdk-python tests/lib/streaming/fixtures/basic_response.txt, event by event.
ANTHROPIC_TEXT_STREAM = sse([
    {"type": "message_start", "message": {
        "id": "msg_4QpJur2dWWDjF6C758FbBw5vm12BaVipnK", "type": "message", "role": "assistant", "content": [],
        "model": "claude-3-opus-latest", "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 11, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    text_delta(0, "Hello"), text_delta(0, " there"), text_delta(0, "!"),
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
     "usage": {"output_tokens": 6}},
    {"type": "message_stop"}])
# anthropics/anthropic-sdk-python tests/lib/streaming/fixtures/tool_use_response.txt, event by event.
ANTHROPIC_TOOL_STREAM = sse([
    {"type": "message_start", "message": {
        "id": "msg_019Q1hrJbZG26Fb9BQhrkHEr", "type": "message", "role": "assistant",
        "model": "claude-sonnet-4-20250514", "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 377, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                  "output_tokens": 1, "service_tier": "standard"}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    text_delta(0, "I"), text_delta(0, "'ll check the current weather in Paris for you."),
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_01NRLabsLyVHZPKxbKvkfSMn", "name": "get_weather",
        "caller": {"type": "direct"}, "input": {}}},
    json_delta(1, ""), json_delta(1, '{"locati'), json_delta(1, 'on": "P'), json_delta(1, "ar"),
    json_delta(1, 'is"}'),
    {"type": "content_block_stop", "index": 1},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
     "usage": {"output_tokens": 65}},
    {"type": "message_stop"}])
# ai.google.dev, generateContent response (text).
GEMINI_TEXT = {
    "candidates": [{"content": {"parts": [{"text": "1+1 equals 2."}], "role": "model"},
                    "finishReason": "STOP", "index": 0}],
    "usageMetadata": {"promptTokenCount": 15, "candidatesTokenCount": 6, "totalTokenCount": 21},
    "modelVersion": "gemini-2.0-flash", "responseId": "Il0taoSYJ5Cez7"}
# ai.google.dev, function calling: the model asks for a call.
GEMINI_FUNCTION_CALL = {
    "candidates": [{"content": {"role": "model", "parts": [
        {"functionCall": {"name": "get_weather", "args": {"location": "San Francisco, CA"}},
         "thoughtSignature": "CiQBVKhc7sig"}]}, "finishReason": "STOP", "index": 0}],
    "usageMetadata": {"promptTokenCount": 70, "candidatesTokenCount": 8, "totalTokenCount": 104,
                      "thoughtsTokenCount": 26},
    "modelVersion": "gemini-2.5-flash"}
# ai.google.dev, streamGenerateContent?alt=sse: one GenerateContentResponse per event, no [DONE].
GEMINI_STREAM = "".join(f"data: {json.dumps(e)}\r\n\r\n" for e in [
    {"candidates": [{"content": {"parts": [{"text": "The"}], "role": "model"}, "index": 0}],
     "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8}, "modelVersion": "gemini-2.0-flash",
     "responseId": "resp-1"},
    {"candidates": [{"content": {"parts": [{"text": " sky is blue."}], "role": "model"}, "index": 0}],
     "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8}, "modelVersion": "gemini-2.0-flash",
     "responseId": "resp-1"},
    {"candidates": [{"content": {"parts": [{"text": ""}], "role": "model"}, "finishReason": "STOP", "index": 0}],
     "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 5, "totalTokenCount": 13},
     "modelVersion": "gemini-2.0-flash", "responseId": "resp-1"}])
# docs.ollama.com/api/chat, non-streaming response.
OLLAMA_TEXT = {
    "model": "llama3.2", "created_at": "2023-12-12T14:13:43.416799Z",
    "message": {"role": "assistant", "content": "Hello! How are you today?"}, "done": True, "done_reason": "stop",
    "total_duration": 5191566416, "load_duration": 2154458, "prompt_eval_count": 26,
    "prompt_eval_duration": 383809000, "eval_count": 298, "eval_duration": 4799921000}
# docs.ollama.com/api/chat, streaming: NDJSON, the last line `done: true` with the counts.
OLLAMA_STREAM = "".join(json.dumps(line) + "\n" for line in [
    {"model": "llama3.2", "created_at": "2023-08-04T08:52:19.385406455-07:00",
     "message": {"role": "assistant", "content": "The"}, "done": False},
    {"model": "llama3.2", "created_at": "2023-08-04T08:52:19.385406455-07:00",
     "message": {"role": "assistant", "content": " sky"}, "done": False},
    {"model": "llama3.2", "created_at": "2023-08-04T19:22:45.499127Z",
     "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
     "total_duration": 4883583458, "load_duration": 1334875, "prompt_eval_count": 26,
     "prompt_eval_duration": 342546000, "eval_count": 282, "eval_duration": 4535599000}])
# docs.ollama.com, tool calling response.
OLLAMA_TOOL_CALL = {
    "model": "llama3.2", "created_at": "2024-07-22T20:33:28.123648Z", "done": True, "done_reason": "stop",
    "message": {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"location": "Toronto"}}}]},
    "prompt_eval_count": 88, "eval_count": 22}


# --- helpers ----------------------------------------------------------------------------------

def lines(text: str) -> list[bytes]:
    """A wire payload as the lines requests' iter_lines() would give."""
    return [line.encode() for line in text.replace("\r\n", "\n").split("\n")]


def collect(chunks) -> dict:
    """Validate every chunk against OpenAI's schema and assemble what an OpenAI client would."""
    chunks = list(chunks)
    out = {"content": "", "tool_calls": {}, "finish": None, "usage": None, "chunks": chunks}
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
        assert (chunk["id"], chunk["created"]) == (chunks[0]["id"], chunks[0]["created"])
        if chunk.get("usage"):
            assert chunk["choices"] == [] and chunk is chunks[-1]
            out["usage"] = chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            out["content"] += delta.get("content") or ""
            for tc in delta.get("tool_calls") or []:
                call = out["tool_calls"].setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
                call["id"] = tc.get("id") or call["id"]
                call["name"] = (tc.get("function") or {}).get("name") or call["name"]
                call["arguments"] += (tc.get("function") or {}).get("arguments") or ""
            out["finish"] = choice["finish_reason"] or out["finish"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    return out


def completion(adapter, data, model="m"):
    """parse_response, validated against OpenAI's schema."""
    result = adapter.parse_response(data, model)
    validate(result, "CreateChatCompletionResponse")
    return result


def chat(**extra) -> dict:
    return {"model": "client-name", "messages": [{"role": "user", "content": "Hello"}], **extra}


# --- the registry -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, base_url, key_vars, needs_key", [
    ("anthropic", "https://api.anthropic.com", ("ANTHROPIC_API_KEY", "CLAUDE_API_KEY"), True),
    ("gemini", "https://generativelanguage.googleapis.com", ("GEMINI_API_KEY", "GOOGLE_API_KEY"), True),
    ("azure", "", ("AZURE_OPENAI_API_KEY",), True),
    ("ollama", "http://localhost:11434", (), False),
])
def test_native_adapters_are_registered_with_their_configuration(name, base_url, key_vars, needs_key):
    adapter = providers.PROVIDERS[name]
    assert adapter in native.ADAPTERS
    assert (adapter.default_base_url, adapter.key_vars, adapter.needs_key) == (base_url, key_vars, needs_key)
    expected_url_var = "AZURE_OPENAI_BASE_URL" if name == "azure" else f"{name.upper()}_BASE_URL"
    assert adapter.base_url_vars == (expected_url_var,)


# --- Anthropic: request -----------------------------------------------------------------------

ANTHROPIC_ENDPOINT = Endpoint("https://api.anthropic.com", "sk-ant-test")


def anthropic_request(body, stream=False):
    return ANTHROPIC.build_request(body, "claude-sonnet-4-5", ANTHROPIC_ENDPOINT, stream)


def test_anthropic_request_url_headers_system_and_defaults():
    url, headers, out = anthropic_request({"model": "c", "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": "Hi"}]})
    assert url == "https://api.anthropic.com/v1/messages"
    assert headers == {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01",
                       "Content-Type": "application/json"}
    assert out == {"model": "claude-sonnet-4-5", "max_tokens": 4096,
                   "system": "You are terse.\n\nAnswer in French.",
                   "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}


def test_anthropic_request_maps_sampling_fields_and_drops_the_rest():
    _, _, out = anthropic_request(chat(
        max_completion_tokens=100, max_tokens=50, temperature=1.7, top_p=0.9, stop="END", user="u-42",
        stream=True, stream_options={"include_usage": True}, n=2, seed=7, presence_penalty=1, frequency_penalty=1,
        logprobs=True, response_format={"type": "json_object"}, fallbacks=["gpt-4o"], webhookUrl="https://x.test",
        some_future_field=True), stream=True)
    assert out == {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hello"}]}], "max_tokens": 100, "temperature": 1.0, "top_p": 0.9,
        "stop_sequences": ["END"], "metadata": {"user_id": "u-42"}, "stream": True}


def test_anthropic_request_images_become_base64_or_url_sources():
    _, _, out = anthropic_request({"model": "c", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "text", "text": ""},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}}]}]})
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "Compare"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]


def test_anthropic_request_tool_history_becomes_tool_use_and_merged_tool_results():
    _, _, out = anthropic_request({"model": "c", "messages": TOOL_HISTORY, "tools": [WEATHER_TOOL]})
    assert out["tools"] == [{"name": "get_weather", "description": "Get the current weather in a given location",
                             "input_schema": WEATHER_TOOL["function"]["parameters"]}]
    assert "tool_choice" not in out
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"location": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"location": "Rome"}}]},
        {"role": "user", "content": [  # both results and the next question in one user turn
            {"type": "tool_result", "tool_use_id": "call_1", "content": "15 degrees"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": '{"celsius": 21}'},
            {"type": "text", "text": "Which is warmer?"}]}]


@pytest.mark.parametrize("tool_choice, parallel, expected", [
    ("auto", None, {"type": "auto"}),
    ("none", None, {"type": "none"}),
    ("required", None, {"type": "any"}),
    ({"type": "function", "function": {"name": "get_weather"}}, None, {"type": "tool", "name": "get_weather"}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
])
def test_anthropic_request_tool_choice(tool_choice, parallel, expected):
    body = chat(tools=[WEATHER_TOOL], tool_choice=tool_choice, parallel_tool_calls=parallel)
    assert anthropic_request(body)[2]["tool_choice"] == expected


def test_anthropic_request_tool_without_parameters_gets_an_empty_object_schema():
    tool = {"type": "function", "function": {"name": "now"}}
    assert anthropic_request(chat(tools=[tool]))[2]["tools"] == [
        {"name": "now", "input_schema": {"type": "object", "properties": {}}}]


def test_legacy_functions_and_function_messages_are_translated_as_tools():
    body = {"model": "c", "functions": [WEATHER_TOOL["function"]], "function_call": {"name": "get_weather"},
            "messages": [{"role": "user", "content": "Paris?"},
                         {"role": "assistant", "content": None,
                          "function_call": {"name": "get_weather", "arguments": '{"location": "Paris"}'}},
                         {"role": "function", "name": "get_weather", "content": "15 degrees"}]}
    out = anthropic_request(body)[2]
    assert out["tool_choice"] == {"type": "tool", "name": "get_weather"}
    assert out["tools"][0]["name"] == "get_weather"
    call_id = out["messages"][1]["content"][0]["id"]
    assert out["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": call_id, "content": "15 degrees"}]
    gemini_out = GEMINI.build_request(body, "g", Endpoint("https://g", "k"), False)[2]
    assert gemini_out["contents"][2]["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"result": "15 degrees"}}}]


def test_tool_call_arguments_that_are_not_a_json_object_are_a_400():
    bad = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1, 2"}}]}]
    for adapter in (ANTHROPIC, GEMINI, OLLAMA):
        with pytest.raises(InvalidRequest):
            adapter.build_request({"model": "m", "messages": bad}, "m", Endpoint("http://x", "k"), False)


# --- Anthropic: response and stream ----------------------------------------------------------

def test_anthropic_text_response():
    result = completion(ANTHROPIC, ANTHROPIC_TEXT)
    assert result["id"] == "msg_01XFDUDYJgAACzvnptvVoYEL"
    assert result["model"] == "claude-sonnet-4-20250514"
    assert result["choices"][0]["message"] == {"role": "assistant", "content": "Hello!", "refusal": None}
    assert result["choices"][0]["finish_reason"] == "stop"
    assert result["usage"] == {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}


def test_anthropic_tool_use_response_becomes_tool_calls():
    result = completion(ANTHROPIC, ANTHROPIC_TOOL_USE)
    choice = result["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "I'll check the current weather in San Francisco for you."
    assert choice["message"]["tool_calls"] == [{
        "id": "toolu_01A09q90qw90lq917835lq9", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"location": "San Francisco, CA", "unit": "celsius"}'}}]
    assert result["usage"]["total_tokens"] == 475


@pytest.mark.parametrize("stop_reason, finish", [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("refusal", "content_filter"), ("something_new", "stop")])
def test_anthropic_stop_reasons(stop_reason, finish):
    result = completion(ANTHROPIC, {**ANTHROPIC_TEXT, "stop_reason": stop_reason})
    assert result["choices"][0]["finish_reason"] == finish


def test_anthropic_cached_prompt_tokens_count_as_prompt_tokens():
    usage = {"input_tokens": 10, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 1000,
             "output_tokens": 5}
    assert completion(ANTHROPIC, {**ANTHROPIC_TEXT, "usage": usage})["usage"] == {
        "prompt_tokens": 1110, "completion_tokens": 5, "total_tokens": 1115,
        "prompt_tokens_details": {"cached_tokens": 1000}}


def test_anthropic_text_stream():
    out = collect(ANTHROPIC.parse_stream(lines(ANTHROPIC_TEXT_STREAM), "m"))
    assert out["content"] == "Hello there!"
    assert out["finish"] == "stop"
    assert out["usage"] == {"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17}
    assert out["chunks"][0]["id"] == "msg_4QpJur2dWWDjF6C758FbBw5vm12BaVipnK"


def test_anthropic_tool_stream_gives_tool_call_deltas():
    out = collect(ANTHROPIC.parse_stream(lines(ANTHROPIC_TOOL_STREAM), "m"))
    assert out["content"] == "I'll check the current weather in Paris for you."
    assert out["tool_calls"] == {0: {"id": "toolu_01NRLabsLyVHZPKxbKvkfSMn", "name": "get_weather",
                                     "arguments": '{"location": "Paris"}'}}
    assert out["finish"] == "tool_calls"
    assert out["usage"] == {"prompt_tokens": 377, "completion_tokens": 65, "total_tokens": 442}


@pytest.mark.parametrize("error_type, retryable", [("overloaded_error", True), ("invalid_request_error", False)])
def test_anthropic_stream_error_event_raises(error_type, retryable):
    head = ANTHROPIC_TEXT_STREAM.split("event: content_block_delta")[0]
    error = json.dumps({"type": "error", "error": {"type": error_type, "message": "Overloaded"}})
    with pytest.raises(UpstreamError, match="Overloaded") as caught:
        list(ANTHROPIC.parse_stream(lines(f"{head}event: error\ndata: {error}\n\n"), "m"))
    assert caught.value.retryable is retryable


def test_anthropic_stream_cut_before_message_stop_raises():
    cut = ANTHROPIC_TEXT_STREAM.split("event: message_delta")[0]
    with pytest.raises(UpstreamError, match="message_stop"):
        list(ANTHROPIC.parse_stream(lines(cut), "m"))


def test_anthropic_models():
    url, headers = ANTHROPIC.models_request(ANTHROPIC_ENDPOINT)
    assert url == "https://api.anthropic.com/v1/models?limit=1000"
    assert headers == {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
    models = ANTHROPIC.parse_models({"data": [{"type": "model", "id": "claude-sonnet-4-20250514",
                                               "display_name": "Claude Sonnet 4",
                                               "created_at": "2025-02-19T00:00:00Z"}], "has_more": False})
    assert models == [{"id": "anthropic/claude-sonnet-4-20250514", "object": "model", "created": 1739923200,
                       "owned_by": "anthropic"}]
    validate({"object": "list", "data": models}, "ListModelsResponse")


def test_anthropic_error_message():
    body = {"type": "error", "error": {"type": "not_found_error", "message": "model: claude-x"}}
    assert ANTHROPIC.error_message(body) == "model: claude-x"


# --- Gemini: request --------------------------------------------------------------------------

GEMINI_ENDPOINT = Endpoint("https://generativelanguage.googleapis.com", "AIza-test")


def gemini_request(body, stream=False, endpoint=GEMINI_ENDPOINT):
    return GEMINI.build_request(body, "gemini-2.0-flash", endpoint, stream)


def test_gemini_request_urls_and_key_header():
    url, headers, _ = gemini_request(chat())
    assert url == "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent"
    assert headers == {"x-goog-api-key": "AIza-test", "Content-Type": "application/json"}
    url, _, out = gemini_request(chat(stream=True), stream=True)
    assert url.endswith("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse")
    assert "AIza" not in url and "stream" not in out
    v1 = Endpoint("https://generativelanguage.googleapis.com", "k", api_version="v1")
    assert gemini_request(chat(), endpoint=v1)[0].endswith("/v1/models/gemini-2.0-flash:generateContent")


@pytest.mark.parametrize("model", ["x/../../cachedContents#", "x?alt=json&", "x:countTokens#"])
def test_a_client_chosen_model_name_stays_one_path_segment(model):
    gemini = GEMINI.build_request(chat(), model, GEMINI_ENDPOINT, False)[0]
    assert gemini.startswith("https://generativelanguage.googleapis.com/v1beta/models/x%")
    assert gemini.endswith(":generateContent") and gemini.count("/") == 5 and "#" not in gemini
    azure = AZURE.build_request(chat(), model, Endpoint("https://myres.openai.azure.com", "k"), False)[0]
    assert azure.startswith("https://myres.openai.azure.com/openai/deployments/x%")
    assert azure.endswith("/chat/completions?api-version=2024-10-21") and azure.count("/") == 7


def test_gemini_request_roles_system_and_generation_config():
    body = {"model": "g", "messages": [
        {"role": "system", "content": "You are a cat."}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Meow?"}, {"role": "user", "content": "What now?"}],
        "temperature": 0.5, "top_p": 0.8, "max_tokens": 200, "stop": ["\n\n", "END"], "n": 2, "seed": 3,
        "presence_penalty": 0.5, "frequency_penalty": 0.5, "user": "u", "logit_bias": {"1": 2},
        "fallbacks": ["x"], "stream_options": {"include_usage": True}}
    assert gemini_request(body)[2] == {
        "systemInstruction": {"parts": [{"text": "You are a cat."}]},
        "contents": [{"role": "user", "parts": [{"text": "Hello"}]}, {"role": "model", "parts": [{"text": "Meow?"}]},
                     {"role": "user", "parts": [{"text": "What now?"}]}],
        "generationConfig": {"temperature": 0.5, "topP": 0.8, "maxOutputTokens": 200,
                             "stopSequences": ["\n\n", "END"], "candidateCount": 2, "seed": 3}}


def test_gemini_request_images_and_no_empty_text_parts():
    out = gemini_request({"model": "g", "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": ""},
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/photo.png?size=large"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/render"}}]},
        {"role": "assistant", "content": ""}]})[2]
    assert out["contents"] == [{"role": "user", "parts": [
        {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}},
        {"fileData": {"fileUri": "https://example.com/photo.png?size=large", "mimeType": "image/png"}},
        {"fileData": {"fileUri": "https://example.com/render"}}]}]


def test_gemini_request_tools_calls_and_results():
    out = gemini_request({"model": "g", "messages": TOOL_HISTORY, "tools": [WEATHER_TOOL], "tool_choice": "auto"})[2]
    assert out["tools"] == [{"functionDeclarations": [{
        "name": "get_weather", "description": "Get the current weather in a given location",
        "parametersJsonSchema": WEATHER_TOOL["function"]["parameters"]}]}]
    assert out["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    assert out["contents"] == [
        {"role": "user", "parts": [{"text": "Weather in Paris and Rome?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"location": "Paris"}}},
                                    {"functionCall": {"name": "get_weather", "args": {"location": "Rome"}}}]},
        {"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"result": "15 degrees"}}},
            {"functionResponse": {"name": "get_weather", "response": {"celsius": 21}}},
            {"text": "Which is warmer?"}]}]


@pytest.mark.parametrize("tool_choice, expected", [
    ("none", {"mode": "NONE"}), ("required", {"mode": "ANY"}),
    ({"type": "function", "function": {"name": "get_weather"}},
     {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}),
])
def test_gemini_request_tool_choice(tool_choice, expected):
    out = gemini_request(chat(tools=[WEATHER_TOOL], tool_choice=tool_choice))[2]
    assert out["toolConfig"] == {"functionCallingConfig": expected}


def test_gemini_tool_result_without_a_matching_call_is_a_400():
    with pytest.raises(InvalidRequest) as caught:
        gemini_request({"model": "g", "messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]})
    assert caught.value.param == "messages[0].tool_call_id"


@pytest.mark.parametrize("response_format, expected", [
    ({"type": "json_object"}, {"responseMimeType": "application/json"}),
    ({"type": "json_schema", "json_schema": {"name": "city", "schema": {
        "type": "object", "properties": {"name": {"type": "string"}}, "additionalProperties": False}}},
     {"responseMimeType": "application/json", "responseJsonSchema": {
         "type": "object", "properties": {"name": {"type": "string"}}, "additionalProperties": False}}),
    ({"type": "text"}, None),
])
def test_gemini_json_mode(response_format, expected):
    assert gemini_request(chat(response_format=response_format))[2].get("generationConfig") == expected


# --- Gemini: response and stream --------------------------------------------------------------

def test_gemini_text_response():
    result = completion(GEMINI, GEMINI_TEXT)
    assert result["id"] == "Il0taoSYJ5Cez7"
    assert result["choices"][0]["message"]["content"] == "1+1 equals 2."
    assert result["choices"][0]["finish_reason"] == "stop"
    assert result["usage"] == {"prompt_tokens": 15, "completion_tokens": 6, "total_tokens": 21}


def test_gemini_function_call_response_and_thought_signature_round_trip():
    result = completion(GEMINI, GEMINI_FUNCTION_CALL)
    choice = result["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"location": "San Francisco, CA"}'}
    assert result["usage"] == {"prompt_tokens": 70, "completion_tokens": 34, "total_tokens": 104,
                               "completion_tokens_details": {"reasoning_tokens": 26}}
    # The client sends the call back with its result: Gemini gets the signature it issued.
    history = [{"role": "user", "content": "Weather?"}, {**choice["message"]},
               {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
    contents = gemini_request({"model": "g", "messages": history})[2]["contents"]
    assert contents[1]["parts"] == [{"functionCall": {"name": "get_weather", "args": {"location": "San Francisco, CA"}},
                                     "thoughtSignature": "CiQBVKhc7sig"}]
    assert contents[2]["parts"][0]["functionResponse"]["name"] == "get_weather"


@pytest.mark.parametrize("reason, finish", [
    ("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
    ("BLOCKLIST", "content_filter"), ("PROHIBITED_CONTENT", "content_filter"), ("SPII", "content_filter"),
    ("OTHER", "stop")])
def test_gemini_finish_reasons(reason, finish):
    data = json.loads(json.dumps(GEMINI_TEXT))
    data["candidates"][0]["finishReason"] = reason
    assert completion(GEMINI, data)["choices"][0]["finish_reason"] == finish


def test_gemini_blocked_prompt_is_a_content_filter_completion():
    data = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 9}}
    result = completion(GEMINI, data)
    assert result["choices"][0]["finish_reason"] == "content_filter"
    assert result["usage"]["prompt_tokens"] == 9


def test_gemini_candidates_become_choices_and_thoughts_are_hidden():
    data = {"candidates": [
        {"content": {"role": "model", "parts": [{"text": "thinking...", "thought": True}, {"text": "A"}]},
         "finishReason": "STOP", "index": 0},
        {"content": {"role": "model", "parts": [{"text": "B"}]}, "finishReason": "MAX_TOKENS", "index": 1}],
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2}}
    choices = completion(GEMINI, data)["choices"]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in choices] == [
        (0, "A", "stop"), (1, "B", "length")]


def test_gemini_text_stream():
    out = collect(GEMINI.parse_stream(lines(GEMINI_STREAM), "gemini-2.0-flash"))
    assert out["content"] == "The sky is blue."
    assert out["finish"] == "stop"
    assert out["usage"] == {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13}
    assert out["chunks"][0]["id"] == "resp-1"


def test_gemini_function_call_stream():
    stream = f"data: {json.dumps(GEMINI_FUNCTION_CALL)}\r\n\r\n"
    out = collect(GEMINI.parse_stream(lines(stream), "g"))
    assert out["finish"] == "tool_calls"
    assert out["tool_calls"][0]["name"] == "get_weather"
    assert json.loads(out["tool_calls"][0]["arguments"]) == {"location": "San Francisco, CA"}


def test_gemini_stream_without_finish_reason_is_a_dropped_stream():
    first_event = GEMINI_STREAM.split("\r\n\r\n")[0] + "\r\n\r\n"
    with pytest.raises(UpstreamError, match="finishReason"):
        list(GEMINI.parse_stream(lines(first_event), "g"))


def test_gemini_stream_error_event_raises():
    error = {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}
    with pytest.raises(UpstreamError, match="overloaded"):
        list(GEMINI.parse_stream(lines(f"data: {json.dumps(error)}\n\n"), "g"))


def test_gemini_models_and_errors():
    url, headers = GEMINI.models_request(GEMINI_ENDPOINT)
    assert url == "https://generativelanguage.googleapis.com/v1beta/models?pageSize=1000"
    assert headers == {"x-goog-api-key": "AIza-test"}
    models = GEMINI.parse_models({"models": [
        {"name": "models/gemini-2.0-flash", "supportedGenerationMethods": ["generateContent", "countTokens"]},
        {"name": "models/text-embedding-004", "supportedGenerationMethods": ["embedContent"]}]})
    assert models == [{"id": "gemini/gemini-2.0-flash", "object": "model", "created": 0, "owned_by": "google"}]
    error = {"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT"}}
    assert GEMINI.error_message(error) == GEMINI.error_message([error]) == "API key not valid."


# --- Azure ------------------------------------------------------------------------------------

def test_azure_request_addresses_the_deployment():
    endpoint = Endpoint("https://myres.openai.azure.com/", "azure-key")
    url, headers, out = AZURE.build_request(chat(fallbacks=["x"], seed=1), "gpt4o-prod", endpoint, False)
    assert url == ("https://myres.openai.azure.com/openai/deployments/gpt4o-prod/chat/completions"
                   "?api-version=2024-10-21")
    assert headers == {"api-key": "azure-key", "Content-Type": "application/json"}
    assert out == {"model": "gpt4o-prod", "messages": chat()["messages"], "seed": 1}
    endpoint = Endpoint("https://myres.openai.azure.com/openai", "azure-key", api_version="2025-01-01-preview")
    url, _, out = AZURE.build_request(chat(stream=True), "dep", endpoint, True)
    assert url == "https://myres.openai.azure.com/openai/deployments/dep/chat/completions?api-version=2025-01-01-preview"
    assert out["stream_options"] == {"include_usage": True}


def test_azure_models():
    url, headers = AZURE.models_request(Endpoint("https://myres.openai.azure.com", "k"))
    assert (url, headers) == ("https://myres.openai.azure.com/openai/models?api-version=2024-10-21", {"api-key": "k"})
    assert AZURE.parse_models({"data": [{"id": "gpt-4o-2024-08-06", "created_at": 1722902400, "object": "model"}]}) == [
        {"id": "azure/gpt-4o-2024-08-06", "object": "model", "created": 1722902400, "owned_by": "azure"}]


# --- Ollama -----------------------------------------------------------------------------------

OLLAMA_ENDPOINT = Endpoint("http://localhost:11434")


def test_ollama_request():
    body = {"model": "o", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}}]},
        *TOOL_HISTORY[1:3]],
        "tools": [WEATHER_TOOL], "tool_choice": "auto", "temperature": 0.2, "max_completion_tokens": 64,
        "stop": "END", "seed": 1, "response_format": {"type": "json_object"}, "user": "u", "fallbacks": ["x"]}
    url, headers, out = OLLAMA.build_request(body, "llama3.2", OLLAMA_ENDPOINT, False)
    assert (url, headers) == ("http://localhost:11434/api/chat", {"Content-Type": "application/json"})
    assert out == {
        "model": "llama3.2", "stream": False, "format": "json", "tools": [WEATHER_TOOL],
        "options": {"temperature": 0.2, "seed": 1, "num_predict": 64, "stop": ["END"]},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is this?", "images": ["iVBOR"]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"location": "Paris"}}},
                {"function": {"name": "get_weather", "arguments": {"location": "Rome"}}}]},
            {"role": "tool", "content": "15 degrees", "tool_name": "get_weather"}]}
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    out = OLLAMA.build_request(chat(response_format={"type": "json_schema", "json_schema": {"schema": schema}}),
                               "llama3.2", OLLAMA_ENDPOINT, True)[2]
    assert (out["format"], out["stream"]) == (schema, True)


def test_ollama_refuses_image_urls_it_cannot_fetch():
    body = {"model": "o", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}
    with pytest.raises(InvalidRequest, match="data: URLs"):
        OLLAMA.build_request(body, "llama3.2", OLLAMA_ENDPOINT, False)


def test_ollama_responses():
    result = completion(OLLAMA, OLLAMA_TEXT)
    assert result["choices"][0]["message"]["content"] == "Hello! How are you today?"
    assert result["usage"] == {"prompt_tokens": 26, "completion_tokens": 298, "total_tokens": 324}
    result = completion(OLLAMA, OLLAMA_TOOL_CALL)
    choice = result["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                              "arguments": '{"location": "Toronto"}'}
    assert completion(OLLAMA, {**OLLAMA_TEXT, "done_reason": "length"})["choices"][0]["finish_reason"] == "length"


def test_ollama_stream():
    out = collect(OLLAMA.parse_stream(lines(OLLAMA_STREAM), "m"))
    assert (out["content"], out["finish"]) == ("The sky", "stop")
    assert out["usage"] == {"prompt_tokens": 26, "completion_tokens": 282, "total_tokens": 308}
    tool_stream = json.dumps({**OLLAMA_TOOL_CALL, "done": False}) + "\n" + OLLAMA_STREAM.splitlines()[-1]
    out = collect(OLLAMA.parse_stream(lines(tool_stream), "m"))
    assert out["finish"] == "tool_calls" and out["tool_calls"][0]["name"] == "get_weather"


def test_ollama_stream_errors():
    with pytest.raises(UpstreamError, match="done"):
        list(OLLAMA.parse_stream(lines("\n".join(OLLAMA_STREAM.splitlines()[:2])), "m"))
    with pytest.raises(UpstreamError, match="out of memory"):
        list(OLLAMA.parse_stream(lines('{"error": "out of memory"}\n'), "m"))


def test_ollama_models():
    assert OLLAMA.models_request(OLLAMA_ENDPOINT) == ("http://localhost:11434/api/tags", {})
    models = OLLAMA.parse_models({"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest", "size": 2019393189,
                                              "modified_at": "2024-09-25T13:41:46.123456789-07:00"}]})
    assert models == [{"id": "ollama/llama3.2:latest", "object": "model", "created": 1727296906,
                       "owned_by": "ollama"}]


# --- full calls through providers.send() ------------------------------------------------------

CALLS = {  # provider -> (endpoint, upstream model, URL called, JSON answer, stream URL, stream body, content type)
    "anthropic": (Endpoint("https://api.anthropic.com", "sk-ant"), "claude-sonnet-4-20250514",
                  "https://api.anthropic.com/v1/messages", ANTHROPIC_TEXT,
                  "https://api.anthropic.com/v1/messages", ANTHROPIC_TEXT_STREAM, "text/event-stream"),
    "gemini": (Endpoint("https://generativelanguage.googleapis.com", "AIza"), "gemini-2.0-flash",
               "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent",
               GEMINI_TEXT,
               "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:streamGenerateContent",
               GEMINI_STREAM, "text/event-stream"),
    "ollama": (Endpoint("http://localhost:11434"), "llama3.2", "http://localhost:11434/api/chat", OLLAMA_TEXT,
               "http://localhost:11434/api/chat", OLLAMA_STREAM, "application/x-ndjson"),
}


def send(provider, body, stream=False, endpoint=None):
    endpoint_, model = CALLS[provider][:2]
    target = Target(Route("client-model", provider, model), endpoint or endpoint_)
    return providers.send([target], body, stream, FAST, read_timeout=5, sleep=lambda s: None)


@pytest.mark.parametrize("provider", sorted(CALLS))
@responses.activate
def test_send_translates_a_full_call(provider):
    _, _, url, answer, _, _, _ = CALLS[provider]
    responses.post(url, json=answer)
    outcome = send(provider, chat(fallbacks=["other"]))
    validate(outcome.completion, "CreateChatCompletionResponse")
    assert outcome.completion["choices"][0]["message"]["content"]
    assert outcome.completion["usage"]["total_tokens"] > 0
    sent = json.loads(responses.calls[0].request.body)
    assert "fallbacks" not in sent and sent.get("model") in (None, CALLS[provider][1])
    assert "Hello" in json.dumps(sent)


@pytest.mark.parametrize("provider", sorted(CALLS))
@responses.activate
def test_send_translates_a_full_stream(provider):
    _, _, _, _, url, stream, content_type = CALLS[provider]
    responses.post(url, body=stream.encode(), content_type=content_type)
    outcome = send(provider, chat(stream=True), stream=True)
    out = collect(outcome.chunks)
    assert out["content"] and out["finish"] == "stop" and out["usage"]["total_tokens"] > 0


@responses.activate
def test_send_to_azure():
    url = "https://myres.openai.azure.com/openai/deployments/dep/chat/completions?api-version=2024-10-21"
    openai_answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    responses.post(url, json=openai_answer)
    target = Target(Route("azure/dep", "azure", "dep"), Endpoint("https://myres.openai.azure.com", "az-key"))
    outcome = providers.send([target], chat(), False, FAST, read_timeout=5, sleep=lambda s: None)
    validate(outcome.completion, "CreateChatCompletionResponse")
    assert responses.calls[0].request.headers["api-key"] == "az-key"
    assert "Authorization" not in responses.calls[0].request.headers


@responses.activate
def test_send_sends_anthropic_headers_and_retries_overload():
    url = "https://api.anthropic.com/v1/messages"
    responses.post(url, status=529, json={"type": "error", "error": {"type": "overloaded_error",
                                                                     "message": "Overloaded"}})
    responses.post(url, json=ANTHROPIC_TOOL_USE)
    outcome = send("anthropic", chat(tools=[WEATHER_TOOL]))
    assert outcome.attempts == 2
    assert outcome.completion["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    request = responses.calls[1].request
    assert request.headers["x-api-key"] == "sk-ant" and request.headers["anthropic-version"] == "2023-06-01"


@responses.activate
def test_send_returns_a_provider_400_with_its_message():
    responses.post("https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent",
                   status=400, json={"error": {"code": 400, "message": "Invalid JSON payload received.",
                                               "status": "INVALID_ARGUMENT"}})
    with pytest.raises(UpstreamError, match="Invalid JSON payload received.") as caught:
        send("gemini", chat())
    assert caught.value.status == 400 and caught.value.attempts == 1


@responses.activate
def test_list_provider_models_for_each_native_provider():
    responses.get("https://api.anthropic.com/v1/models?limit=1000", json={"data": [{"id": "claude-x"}]})
    responses.get("https://generativelanguage.googleapis.com/v1beta/models?pageSize=1000",
                  json={"models": [{"name": "models/gemini-x"}]})
    responses.get("http://localhost:11434/api/tags", json={"models": [{"name": "qwen3:8b"}]})
    ids = [m["id"] for name in ("anthropic", "gemini", "ollama")
           for m in providers.list_provider_models(providers.PROVIDERS[name], CALLS[name][0])]
    assert ids == ["anthropic/claude-x", "gemini/gemini-x", "ollama/qwen3:8b"]


# --- the fakes: proven against the official SDKs, then against our adapters over real HTTP ---

@pytest.fixture
def fake_anthropic():
    with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
def fake_gemini():
    with FakeGemini() as fake:
        yield fake


@pytest.fixture
def fake_ollama():
    with FakeOllama() as fake:
        yield fake


def test_fake_anthropic_satisfies_the_anthropic_sdk(fake_anthropic):
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(api_key="sk-ant", base_url=fake_anthropic.url, max_retries=0)
    message = client.messages.create(model="claude-x", max_tokens=50, messages=[{"role": "user", "content": "Hi"}])
    assert (message.content[0].text, message.stop_reason, message.usage.output_tokens) == (
        "Hello from anthropic!", "end_turn", 5)
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    with client.messages.stream(model="claude-x", max_tokens=50, tools=tools,
                                messages=[{"role": "user", "content": "Weather?"}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert (final.content[1].name, final.content[1].input) == ("get_weather", {"location": "Paris"})
    assert [m.id for m in client.models.list()] == ["claude-sonnet-4-20250514", "claude-3-5-haiku-20241022"]


def test_fake_gemini_satisfies_the_google_genai_sdk(fake_gemini):
    genai = pytest.importorskip("google.genai")
    client = genai.Client(api_key="AIza", http_options=genai.types.HttpOptions(base_url=fake_gemini.url))
    response = client.models.generate_content(model="gemini-2.0-flash", contents="Hi")
    assert (response.text, response.usage_metadata.total_token_count) == ("Hello from gemini!", 17)
    streamed = client.models.generate_content_stream(model="gemini-2.0-flash", contents="Hi")
    assert "".join(chunk.text or "" for chunk in streamed) == "Hello from gemini!"
    tool = genai.types.Tool(function_declarations=[genai.types.FunctionDeclaration(
        name="get_weather", parameters_json_schema={"type": "object"})])
    response = client.models.generate_content(model="gemini-2.0-flash", contents="Weather?",
                                              config=genai.types.GenerateContentConfig(tools=[tool]))
    assert (response.function_calls[0].name, response.function_calls[0].args) == ("get_weather", {"location": "Paris"})
    assert fake_gemini.requests[-1]["headers"]["x-goog-api-key"] == "AIza"


@pytest.mark.parametrize("stream", [False, True])
def test_adapters_against_the_fakes_over_http(fake_anthropic, fake_gemini, fake_ollama, stream):
    for provider, fake, model in (("anthropic", fake_anthropic, "claude-x"), ("gemini", fake_gemini, "gemini-x"),
                                  ("ollama", fake_ollama, "llama3.2")):
        endpoint = Endpoint(fake.url, None if provider == "ollama" else "key")
        target = Target(Route(f"{provider}/{model}", provider, model), endpoint)
        outcome = providers.send([target], chat(tools=[WEATHER_TOOL], stream=stream), stream, FAST, 5)
        if stream:
            out = collect(outcome.chunks)
            (call,) = out["tool_calls"].values()
        else:
            validate(outcome.completion, "CreateChatCompletionResponse")
            (call,) = [{"name": tc["function"]["name"], **tc["function"]}
                       for tc in outcome.completion["choices"][0]["message"]["tool_calls"]]
        assert (call["name"], json.loads(call["arguments"])) == ("get_weather", {"location": "Paris"}), provider
        # The tool result goes back, and the model answers with text.
        history = [*chat()["messages"], {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": call["arguments"]}}]},
            {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}]
        outcome = providers.send([target], {"model": "m", "messages": history, "tools": [WEATHER_TOOL]}, False, FAST, 5)
        assert outcome.completion["choices"][0]["message"]["content"] == f"Hello from {provider}!", provider


def test_a_fake_stream_cut_short_is_an_upstream_error(fake_anthropic, fake_gemini, fake_ollama):
    for provider, fake in (("anthropic", fake_anthropic), ("gemini", fake_gemini), ("ollama", fake_ollama)):
        fake.drop_stream = True
        target = Target(Route("m", provider, "m"), Endpoint(fake.url, "key"))
        outcome = providers.send([target], chat(), True, FAST, 5)
        with pytest.raises(UpstreamError):
            list(outcome.chunks)

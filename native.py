"""Native provider adapters: Anthropic, Gemini, Azure OpenAI and Ollama, on adapters.py's contract.

Each adapter is pure translation between OpenAI's chat format and one provider's wire format. The
request side is an allow-list: only fields a provider accepts are built, because Anthropic and
Gemini reject unknown fields, so anything else the client sent is dropped for these providers.

Ollama speaks its native /api/chat rather than its OpenAI-compatible /v1 layer: the native API is
Ollama's primary, stable one; its last NDJSON line (`done: true`) always carries the token counts
(the /v1 layer reports stream usage only on newer versions and only when asked) and is a definite
end-of-stream marker, so a dropped stream is detected; and sampling options map one to one.
"""
from __future__ import annotations

import json
import mimetypes
import time
import uuid
from datetime import datetime
from typing import Iterable, Iterator
from urllib.parse import quote

from adapters import (
    Adapter,
    Endpoint,
    OpenAIAdapter,
    completion_id,
    loads_upstream,
    make_chunk,
    make_completion,
    make_usage,
    message_text,
    sse_data,
)
from errors import InvalidRequest, UpstreamError

ANTHROPIC_VERSION = "2023-06-01"
ANTHROPIC_DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; every current Claude model allows this
AZURE_DEFAULT_API_VERSION = "2024-10-21"  # the GA version with tools, JSON schema and stream usage
GEMINI_DEFAULT_API_VERSION = "v1beta"  # where every feature used here (tools, JSON schema) is served

ANTHROPIC_STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
                          "max_tokens": "length", "model_context_window_exceeded": "length",
                          "tool_use": "tool_calls", "refusal": "content_filter"}
GEMINI_FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter",
                         "RECITATION": "content_filter", "BLOCKLIST": "content_filter",
                         "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
                         "IMAGE_SAFETY": "content_filter"}
OLLAMA_DONE_REASONS = {"stop": "stop", "length": "length"}
# Anthropic stream errors worth another attempt when they come before the first byte.
ANTHROPIC_RETRYABLE_ERRORS = frozenset({"overloaded_error", "api_error", "rate_limit_error"})
# OpenAI sampling fields that Ollama takes, under the same names, in `options`.
OLLAMA_OPTIONS = ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty")
# Gemini 3 rejects a replayed functionCall without the thoughtSignature it came with; the proxy is
# stateless, so the signature rides inside the OpenAI tool-call id and is taken out again on replay.
SIGNATURE_SEPARATOR = "__sig__"


# --- shared helpers ---------------------------------------------------------------------------

def modernize(body: dict) -> tuple[list[dict], list[dict], object]:
    """The request's messages, tools and tool_choice, with legacy functions/function_call rewritten as tools."""
    tools = body.get("tools") or [{"type": "function", "function": f} for f in body.get("functions") or []]
    tool_choice = body.get("tool_choice")
    legacy_choice = body.get("function_call")
    if tool_choice is None and legacy_choice is not None:
        tool_choice = legacy_choice if isinstance(legacy_choice, str) else {
            "type": "function", "function": {"name": legacy_choice.get("name")}}
    messages, pending = [], {}  # pending: function name -> id of its latest unanswered call
    for i, msg in enumerate(body.get("messages") or []):
        if msg.get("role") == "assistant" and msg.get("function_call") and not msg.get("tool_calls"):
            call = msg["function_call"]
            pending[call.get("name")] = call_id = f"call_legacy_{i}"
            msg = {**msg, "tool_calls": [{"id": call_id, "type": "function", "function": call}]}
        elif msg.get("role") == "function":
            msg = {**msg, "role": "tool", "tool_call_id": pending.pop(msg.get("name"), f"call_{msg.get('name')}")}
        messages.append(msg)
    return messages, tools, tool_choice


def parts_of(content) -> list[dict]:
    """A message's content as a list of OpenAI parts (a plain string becomes one text part)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [p for p in content or [] if isinstance(p, dict)]


def image_source(part: dict) -> tuple[str | None, str]:
    """(mime type, base64 data) for a `data:` image URL, or (None, url) for an http(s) URL."""
    image = part.get("image_url")
    url = image.get("url", "") if isinstance(image, dict) else str(image or "")
    if not url.startswith("data:"):
        return None, url
    header, _, data = url[5:].partition(",")
    mime, *params = header.split(";")
    if "base64" not in params:
        raise InvalidRequest("image data: URLs must be base64-encoded", param="messages")
    return mime or "application/octet-stream", data


def arguments_object(arguments) -> dict:
    """A tool call's JSON-string arguments as the object Anthropic, Gemini and Ollama want."""
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        raise InvalidRequest("tool call arguments must be a JSON object", param="messages") from None
    if not isinstance(value, dict):
        raise InvalidRequest("tool call arguments must be a JSON object", param="messages")
    return value


def function_call_of(tool_call: dict, arguments_key: str) -> dict:
    """An OpenAI tool call as `{"name", <arguments_key>: arguments object}` (input, args or arguments)."""
    fn = tool_call.get("function") or {}
    return {"name": fn.get("name"), arguments_key: arguments_object(fn.get("arguments"))}


def tool_call_names(messages: list[dict]) -> dict[str, str]:
    """Map each earlier assistant tool-call id to its function name (Gemini and Ollama need the name)."""
    return {tc.get("id"): (tc.get("function") or {}).get("name")
            for msg in messages if msg.get("role") == "assistant" for tc in msg.get("tool_calls") or []}


def tool_name_for(msg: dict, names: dict[str, str], index: int) -> str:
    """The function name a tool result answers, found from its tool_call_id."""
    name = names.get(msg.get("tool_call_id")) or msg.get("name")
    if not name:
        raise InvalidRequest(f"messages[{index}].tool_call_id does not match an earlier assistant tool call",
                             param=f"messages[{index}].tool_call_id")
    return name


def max_tokens_of(body: dict):
    """max_completion_tokens, or the older max_tokens."""
    return body.get("max_completion_tokens") or body.get("max_tokens")


def stop_list(stop) -> list[str]:
    """OpenAI's `stop` (a string or a list) as a list."""
    if not stop:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str) and s]


def system_text(messages: list[dict]) -> str:
    """All system and developer messages joined, for providers that take the system prompt apart."""
    texts = [message_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
    return "\n\n".join(t for t in texts if t)


def iso_timestamp(value) -> int:
    """Unix seconds from an ISO-8601 timestamp (nanosecond fractions allowed), 0 when unreadable."""
    if not isinstance(value, str):
        return 0
    head, dot, rest = value.partition(".")
    if dot:  # Python parses at most 6 fractional digits
        digits = len(rest) - len(rest.lstrip("0123456789"))
        value = f"{head}.{rest[:min(digits, 6)]}{rest[digits:]}"
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def merge_turn(turns: list[dict], role: str, key: str, items: list[dict]) -> None:
    """Append a turn, or extend the last one when it has the same role (both APIs want roles to alternate)."""
    if turns and turns[-1]["role"] == role:
        turns[-1][key].extend(items)
    else:
        turns.append({"role": role, key: items})


def model_entry(provider: str, model_id: str, created: int, owned_by: str) -> dict:
    """One OpenAI model object, named `<provider>/<id>` so that it routes back to the provider."""
    return {"id": f"{provider}/{model_id}", "object": "model", "created": created, "owned_by": owned_by}


# --- Anthropic --------------------------------------------------------------------------------

class AnthropicAdapter(Adapter):
    """Anthropic's Messages API (/v1/messages), with its event stream."""

    def headers(self, endpoint: Endpoint) -> dict:
        """Anthropic's key and version headers."""
        return {"x-api-key": endpoint.key or "", "anthropic-version": ANTHROPIC_VERSION,
                "Content-Type": "application/json"}

    def build_request(self, body: dict, model: str, endpoint: Endpoint, stream: bool):
        """OpenAI request -> Messages API request."""
        messages, tools, tool_choice = modernize(body)
        out: dict = {"model": model, "messages": self.messages(messages),
                     "max_tokens": max_tokens_of(body) or ANTHROPIC_DEFAULT_MAX_TOKENS}
        if system := system_text(messages):
            out["system"] = system
        if body.get("temperature") is not None:
            out["temperature"] = min(float(body["temperature"]), 1.0)  # Anthropic's range is 0..1, OpenAI's 0..2
        for field in ("top_p", "top_k"):
            if body.get(field) is not None:
                out[field] = body[field]
        if stops := stop_list(body.get("stop")):
            out["stop_sequences"] = stops
        if isinstance(body.get("user"), str):
            out["metadata"] = {"user_id": body["user"]}
        if tools:
            out["tools"] = [self.tool(t) for t in tools if t.get("type", "function") == "function"]
            if choice := self.tool_choice(tool_choice, body.get("parallel_tool_calls")):
                out["tool_choice"] = choice
        if stream:
            out["stream"] = True
        return f"{endpoint.base_url}/v1/messages", self.headers(endpoint), out

    def messages(self, messages: list[dict]) -> list[dict]:
        """OpenAI messages -> Anthropic turns; consecutive turns of one role merge (tool results first)."""
        turns: list[dict] = []
        for msg in messages:
            role = msg.get("role")
            if role in ("system", "developer"):
                continue
            if role == "tool":
                result = {"type": "tool_result", "tool_use_id": msg.get("tool_call_id")}
                content = msg.get("content")
                if content := (content if isinstance(content, str) else self.blocks(content)):
                    result["content"] = content
                role, blocks = "user", [result]
            elif role == "assistant":
                blocks = self.blocks(msg.get("content")) + [
                    {"type": "tool_use", "id": tc.get("id"), **function_call_of(tc, "input")}
                    for tc in msg.get("tool_calls") or []]
                if not blocks:
                    continue  # Anthropic rejects empty assistant turns
            else:
                role, blocks = "user", self.blocks(msg.get("content"))
            merge_turn(turns, role, "content", blocks)
        return turns

    def blocks(self, content) -> list[dict]:
        """OpenAI content parts -> Anthropic text and image blocks (empty text dropped: Anthropic rejects it)."""
        out = []
        for part in parts_of(content):
            if part.get("type") == "text" and part.get("text"):
                out.append({"type": "text", "text": part["text"]})
            elif part.get("type") == "image_url":
                mime, data = image_source(part)
                source = ({"type": "base64", "media_type": mime, "data": data} if mime
                          else {"type": "url", "url": data})
                out.append({"type": "image", "source": source})
        return out

    def tool(self, tool: dict) -> dict:
        """An OpenAI function tool -> an Anthropic tool (input_schema is required)."""
        fn = tool.get("function") or {}
        out = {"name": fn.get("name"),
               "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
        if fn.get("description"):
            out["description"] = fn["description"]
        return out

    def tool_choice(self, choice, parallel) -> dict | None:
        """OpenAI tool_choice (and parallel_tool_calls) -> Anthropic tool_choice."""
        if isinstance(choice, dict):
            out = {"type": "tool", "name": (choice.get("function") or {}).get("name")}
        elif choice in ("auto", "none"):
            out = {"type": choice}
        elif choice == "required":
            out = {"type": "any"}
        elif parallel is False:
            out = {"type": "auto"}
        else:
            return None
        if parallel is False and out["type"] != "none":
            out["disable_parallel_tool_use"] = True
        return out

    def parse_response(self, data: dict, model: str) -> dict:
        """Messages API response -> chat.completion."""
        text, tool_calls = [], []
        for block in data.get("content") or []:
            if block.get("type") == "text":
                text.append(block.get("text") or "")
            elif block.get("type") == "tool_use":
                tool_calls.append({"id": block.get("id"), "type": "function",
                                   "function": {"name": block.get("name"),
                                                "arguments": json.dumps(block.get("input") or {})}})
        message: dict = {"content": "".join(text) if text or not tool_calls else None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        finish = ANTHROPIC_STOP_REASONS.get(data.get("stop_reason"), "stop")
        return make_completion(data.get("model") or model, message, finish, self.usage(data.get("usage")),
                               id=data.get("id"))

    def usage(self, usage) -> dict:
        """Anthropic usage -> OpenAI usage; cache writes and reads are prompt tokens too."""
        usage = usage or {}
        cached = int(usage.get("cache_read_input_tokens") or 0)
        prompt = int(usage.get("input_tokens") or 0) + int(usage.get("cache_creation_input_tokens") or 0) + cached
        out = make_usage(prompt, usage.get("output_tokens"))
        if cached:
            out["prompt_tokens_details"] = {"cached_tokens": cached}
        return out

    def parse_stream(self, lines: Iterable[bytes], model: str) -> Iterator[dict]:
        """Anthropic's event stream -> chunks; message_stop ends it, an `error` event raises."""
        cid, created, usage, finish = completion_id(), int(time.time()), {}, "stop"
        tool_index: dict[int, int] = {}  # Anthropic content-block index -> OpenAI tool_calls index
        for _event, data in sse_data(lines):
            event = loads_upstream(data, self.name)
            kind = event.get("type")
            if kind == "message_start":
                message = event.get("message") or {}
                cid, model = message.get("id") or cid, message.get("model") or model
                usage.update(message.get("usage") or {})
                yield make_chunk(cid, model, created, {"role": "assistant", "content": ""})
            elif kind == "content_block_start":
                block = event.get("content_block") or {}
                if block.get("type") == "text" and block.get("text"):
                    yield make_chunk(cid, model, created, {"content": block["text"]})
                elif block.get("type") == "tool_use":
                    tool_index[event.get("index")] = index = len(tool_index)
                    call = {"index": index, "id": block.get("id"), "type": "function",
                            "function": {"name": block.get("name"),
                                         "arguments": json.dumps(block["input"]) if block.get("input") else ""}}
                    yield make_chunk(cid, model, created, {"tool_calls": [call]})
            elif kind == "content_block_delta":
                delta = event.get("delta") or {}
                if delta.get("type") == "text_delta" and delta.get("text"):
                    yield make_chunk(cid, model, created, {"content": delta["text"]})
                elif delta.get("type") == "input_json_delta" and delta.get("partial_json"):
                    call = {"index": tool_index.get(event.get("index"), 0),
                            "function": {"arguments": delta["partial_json"]}}
                    yield make_chunk(cid, model, created, {"tool_calls": [call]})
            elif kind == "message_delta":
                finish = ANTHROPIC_STOP_REASONS.get((event.get("delta") or {}).get("stop_reason"), finish)
                usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            elif kind == "message_stop":
                yield make_chunk(cid, model, created, {}, finish)
                yield make_chunk(cid, model, created, None, usage=self.usage(usage))
                return
            elif kind == "error":
                error = event.get("error") or {}
                raise UpstreamError(f"{self.name} stream error: {self.error_message(event)}",
                                    retryable=error.get("type") in ANTHROPIC_RETRYABLE_ERRORS)
            # ping, content_block_stop and thinking deltas carry nothing for an OpenAI client
        raise UpstreamError(f"{self.name} stream ended before message_stop")

    def models_request(self, endpoint: Endpoint):
        """GET /v1/models (one page of up to 1000)."""
        headers = self.headers(endpoint)
        del headers["Content-Type"]
        return f"{endpoint.base_url}/v1/models?limit=1000", headers

    def parse_models(self, data: dict) -> list[dict]:
        """Anthropic's model list -> OpenAI model objects."""
        return [model_entry(self.name, m["id"], iso_timestamp(m.get("created_at")), self.owned_by)
                for m in data.get("data") or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]


# --- Gemini -----------------------------------------------------------------------------------

class GeminiAdapter(Adapter):
    """Google's Gemini API (generateContent / streamGenerateContent?alt=sse, v1beta)."""

    def build_request(self, body: dict, model: str, endpoint: Endpoint, stream: bool):
        """OpenAI request -> generateContent request; the key goes in a header, never in the URL."""
        messages, tools, tool_choice = modernize(body)
        out: dict = {"contents": self.contents(messages)}
        if system := system_text(messages):
            out["systemInstruction"] = {"parts": [{"text": system}]}
        if tools:
            out["tools"] = [{"functionDeclarations": [self.declaration(t) for t in tools
                                                      if t.get("type", "function") == "function"]}]
            if config := self.tool_config(tool_choice):
                out["toolConfig"] = config
        if config := self.generation_config(body):
            out["generationConfig"] = config
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        # The model is one path segment: a client's "gemini/x/../cachedContents#" must not address another endpoint.
        url = f"{self.api_root(endpoint)}/models/{quote(model.removeprefix('models/'), safe='')}:{method}"
        return url, {"x-goog-api-key": endpoint.key or "", "Content-Type": "application/json"}, out

    def api_root(self, endpoint: Endpoint) -> str:
        """{base}/v1beta, or the API version the provider row names (e.g. v1)."""
        return f"{endpoint.base_url}/{endpoint.api_version or GEMINI_DEFAULT_API_VERSION}"

    def contents(self, messages: list[dict]) -> list[dict]:
        """OpenAI messages -> Gemini contents (roles user/model); consecutive turns of one role merge."""
        names, contents = tool_call_names(messages), []
        for i, msg in enumerate(messages):
            role = msg.get("role")
            if role in ("system", "developer"):
                continue
            if role == "tool":
                role, parts = "user", [{"functionResponse": {"name": tool_name_for(msg, names, i),
                                                             "response": self.tool_result(msg.get("content"))}}]
            elif role == "assistant":
                role, parts = "model", self.parts(msg.get("content")) + [
                    self.function_call(tc) for tc in msg.get("tool_calls") or []]
            else:
                role, parts = "user", self.parts(msg.get("content"))
            if not parts:
                continue  # Gemini rejects contents without parts
            merge_turn(contents, role, "parts", parts)
        return contents

    def parts(self, content) -> list[dict]:
        """OpenAI content parts -> Gemini parts; Gemini rejects empty text parts, so none are sent."""
        out = []
        for part in parts_of(content):
            if part.get("type") == "text" and part.get("text"):
                out.append({"text": part["text"]})
            elif part.get("type") == "image_url":
                mime, data = image_source(part)
                if mime:
                    out.append({"inlineData": {"mimeType": mime, "data": data}})
                else:
                    file_data = {"fileUri": data}
                    if guessed := mimetypes.guess_type(data.split("?")[0])[0]:
                        file_data["mimeType"] = guessed
                    out.append({"fileData": file_data})
        return out

    def function_call(self, tool_call: dict) -> dict:
        """An assistant tool call -> a functionCall part, with the thoughtSignature it came with."""
        part: dict = {"functionCall": function_call_of(tool_call, "args")}
        _, sep, signature = str(tool_call.get("id") or "").partition(SIGNATURE_SEPARATOR)
        if sep and signature:
            part["thoughtSignature"] = signature
        return part

    def tool_result(self, content) -> dict:
        """A tool message's content -> functionResponse.response, which must be a JSON object."""
        text = message_text(content)
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        return value if isinstance(value, dict) else {"result": text}

    def declaration(self, tool: dict) -> dict:
        """An OpenAI function tool -> a Gemini function declaration.

        parametersJsonSchema takes full JSON Schema; the older `parameters` field accepts only an
        OpenAPI subset and rejects keys such as additionalProperties that OpenAI schemas often use.
        """
        fn = tool.get("function") or {}
        out = {"name": fn.get("name")}
        if fn.get("description"):
            out["description"] = fn["description"]
        if fn.get("parameters"):
            out["parametersJsonSchema"] = fn["parameters"]
        return out

    def tool_config(self, choice) -> dict | None:
        """OpenAI tool_choice -> Gemini toolConfig."""
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
        mode = {"auto": "AUTO", "none": "NONE", "required": "ANY"}.get(choice)
        return {"functionCallingConfig": {"mode": mode}} if mode else None

    def generation_config(self, body: dict) -> dict:
        """OpenAI sampling and output fields -> Gemini generationConfig."""
        config = {gemini: body[openai] for openai, gemini in (
            ("temperature", "temperature"), ("top_p", "topP"), ("top_k", "topK"), ("seed", "seed"),
            ("n", "candidateCount")) if body.get(openai) is not None}
        if max_tokens := max_tokens_of(body):
            config["maxOutputTokens"] = max_tokens
        if stops := stop_list(body.get("stop")):
            config["stopSequences"] = stops
        response_format = body.get("response_format") or {}
        if response_format.get("type") in ("json_object", "json_schema"):
            config["responseMimeType"] = "application/json"
            schema = (response_format.get("json_schema") or {}).get("schema")
            if response_format["type"] == "json_schema" and schema:
                config["responseJsonSchema"] = schema  # full JSON Schema, unlike responseSchema
        return config

    def parse_response(self, data: dict, model: str) -> dict:
        """generateContent response -> chat.completion (one choice per candidate)."""
        candidates = data.get("candidates") or []
        if not candidates:  # the prompt itself was blocked (promptFeedback.blockReason)
            return make_completion(model, {"content": ""}, "content_filter", self.usage(data.get("usageMetadata")),
                                   id=data.get("responseId"))
        choices = []
        for i, candidate in enumerate(candidates):
            text, tool_calls = self.candidate_output(candidate)
            message: dict = {"content": text if text or not tool_calls else None}
            if tool_calls:
                message["tool_calls"] = tool_calls
            choice = make_completion(model, message, self.finish_reason(candidate, bool(tool_calls)) or "stop",
                                     None)["choices"][0]
            choice["index"] = candidate.get("index", i)
            choices.append(choice)
        completion = make_completion(data.get("modelVersion") or model, {}, "stop",
                                     self.usage(data.get("usageMetadata")), id=data.get("responseId"))
        completion["choices"] = choices
        return completion

    def candidate_output(self, candidate: dict) -> tuple[str, list[dict]]:
        """A candidate's visible text and its function calls as OpenAI tool calls (thought parts skipped)."""
        text, tool_calls = [], []
        for part in (candidate.get("content") or {}).get("parts") or []:
            if "text" in part and not part.get("thought"):
                text.append(part["text"])
            elif "functionCall" in part:
                call = part["functionCall"]
                call_id = "call_" + uuid.uuid4().hex[:24]
                if part.get("thoughtSignature"):
                    call_id += SIGNATURE_SEPARATOR + part["thoughtSignature"]
                tool_calls.append({"id": call_id, "type": "function",
                                   "function": {"name": call.get("name"),
                                                "arguments": json.dumps(call.get("args") or {})}})
        return "".join(text), tool_calls

    def finish_reason(self, candidate: dict, has_tool_calls: bool) -> str | None:
        """Gemini's finishReason -> OpenAI's (None while the candidate is still going)."""
        reason = candidate.get("finishReason")
        if reason is None:
            return None
        if has_tool_calls and reason == "STOP":
            return "tool_calls"
        return GEMINI_FINISH_REASONS.get(reason, "stop")

    def usage(self, metadata) -> dict:
        """usageMetadata -> OpenAI usage; thinking tokens are billed as output, as OpenAI's reasoning tokens."""
        metadata = metadata or {}
        thoughts = int(metadata.get("thoughtsTokenCount") or 0)
        usage = make_usage(metadata.get("promptTokenCount"), int(metadata.get("candidatesTokenCount") or 0) + thoughts)
        if thoughts:
            usage["completion_tokens_details"] = {"reasoning_tokens": thoughts}
        if metadata.get("cachedContentTokenCount"):
            usage["prompt_tokens_details"] = {"cached_tokens": int(metadata["cachedContentTokenCount"])}
        return usage

    def parse_stream(self, lines: Iterable[bytes], model: str) -> Iterator[dict]:
        """streamGenerateContent SSE -> chunks; the stream is complete once every candidate has a finishReason."""
        cid, created, usage_metadata = None, int(time.time()), None
        open_candidates: dict[int, int] = {}  # candidate index -> tool calls sent so far
        finished: set[int] = set()
        for _event, data in sse_data(lines):
            event = loads_upstream(data, self.name)
            if "error" in event:
                raise UpstreamError(f"{self.name} stream error: {self.error_message(event)}", retryable=False)
            cid = cid or event.get("responseId") or completion_id()
            model = event.get("modelVersion") or model
            usage_metadata = event.get("usageMetadata") or usage_metadata
            candidates = event.get("candidates") or []
            if not candidates and (event.get("promptFeedback") or {}).get("blockReason"):
                yield make_chunk(cid, model, created, {"role": "assistant", "content": ""}, "content_filter")
                finished.add(0)
            for i, candidate in enumerate(candidates):
                index = candidate.get("index", i)
                text, tool_calls = self.candidate_output(candidate)
                delta: dict = {}
                if index not in open_candidates:
                    open_candidates[index] = 0
                    delta["role"] = "assistant"
                if text or "role" in delta:
                    delta["content"] = text
                if tool_calls:
                    delta["tool_calls"] = [{"index": open_candidates[index] + k, **tc}
                                           for k, tc in enumerate(tool_calls)]
                    open_candidates[index] += len(tool_calls)
                finish = self.finish_reason(candidate, open_candidates[index] > 0)
                if delta or finish:
                    chunk = make_chunk(cid, model, created, delta, finish)
                    chunk["choices"][0]["index"] = index
                    yield chunk
                if finish:
                    finished.add(index)
        if not finished or not set(open_candidates) <= finished:
            raise UpstreamError(f"{self.name} stream ended before a finishReason")
        yield make_chunk(cid, model, created, None, usage=self.usage(usage_metadata))

    def error_message(self, data) -> str:
        """Gemini's `{"error": {"message"}}`, also when wrapped in a list."""
        if isinstance(data, list) and data:
            data = data[0]
        return super().error_message(data)

    def models_request(self, endpoint: Endpoint):
        """GET /v1beta/models (one page of up to 1000)."""
        return f"{self.api_root(endpoint)}/models?pageSize=1000", {"x-goog-api-key": endpoint.key or ""}

    def parse_models(self, data: dict) -> list[dict]:
        """Gemini's model list -> OpenAI model objects, only models that can chat."""
        return [model_entry(self.name, m["name"].removeprefix("models/"), 0, self.owned_by)
                for m in data.get("models") or []
                if isinstance(m, dict) and isinstance(m.get("name"), str)
                and "generateContent" in (m.get("supportedGenerationMethods") or ["generateContent"])]


# --- Azure OpenAI -----------------------------------------------------------------------------

class AzureAdapter(OpenAIAdapter):
    """Azure OpenAI: OpenAI bodies, sent to a deployment URL with `api-version` and an `api-key` header."""

    def resource_url(self, endpoint: Endpoint) -> str:
        """The resource's base URL, accepting it with or without a trailing /openai."""
        return endpoint.base_url.rstrip("/").removesuffix("/openai")

    def build_request(self, body: dict, model: str, endpoint: Endpoint, stream: bool):
        """The OpenAI request, addressed to deployment `model`."""
        _, _, payload = super().build_request(body, model, endpoint, stream)
        version = endpoint.api_version or AZURE_DEFAULT_API_VERSION
        deployment = quote(model, safe="")  # one path segment, whatever the client sent
        url = f"{self.resource_url(endpoint)}/openai/deployments/{deployment}/chat/completions?api-version={version}"
        return url, {"api-key": endpoint.key or "", "Content-Type": "application/json"}, payload

    def models_request(self, endpoint: Endpoint):
        """GET /openai/models: the models the resource can deploy."""
        version = endpoint.api_version or AZURE_DEFAULT_API_VERSION
        return f"{self.resource_url(endpoint)}/openai/models?api-version={version}", {"api-key": endpoint.key or ""}

    def parse_models(self, data: dict) -> list[dict]:
        """Azure's list says `created_at` where OpenAI says `created`."""
        return [model_entry(self.name, m["id"], int(m.get("created_at") or m.get("created") or 0), self.owned_by)
                for m in data.get("data") or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]


# --- Ollama -----------------------------------------------------------------------------------

class OllamaAdapter(Adapter):
    """A local Ollama server's native /api/chat (NDJSON stream) and /api/tags."""

    def build_request(self, body: dict, model: str, endpoint: Endpoint, stream: bool):
        """OpenAI request -> /api/chat request."""
        messages, tools, _tool_choice = modernize(body)  # Ollama has no tool_choice
        out: dict = {"model": model, "messages": self.messages(messages), "stream": stream}
        options = {k: body[k] for k in OLLAMA_OPTIONS if body.get(k) is not None}
        if max_tokens := max_tokens_of(body):
            options["num_predict"] = max_tokens
        if stops := stop_list(body.get("stop")):
            options["stop"] = stops
        if options:
            out["options"] = options
        if tools:
            out["tools"] = [{"type": "function", "function": t.get("function") or {}} for t in tools
                            if t.get("type", "function") == "function"]
        response_format = body.get("response_format") or {}
        if response_format.get("type") == "json_object":
            out["format"] = "json"
        elif response_format.get("type") == "json_schema":
            out["format"] = (response_format.get("json_schema") or {}).get("schema") or "json"
        return f"{endpoint.base_url}/api/chat", {"Content-Type": "application/json"}, out

    def messages(self, messages: list[dict]) -> list[dict]:
        """OpenAI messages -> Ollama messages: text content, base64 `images`, object tool arguments."""
        names, out = tool_call_names(messages), []
        for i, msg in enumerate(messages):
            role = "system" if msg.get("role") == "developer" else msg.get("role")
            item: dict = {"role": role, "content": message_text(msg.get("content"))}
            images = [image_source(p) for p in parts_of(msg.get("content")) if p.get("type") == "image_url"]
            if any(mime is None for mime, _ in images):
                # Fetching the image would be I/O in a translator, and Ollama cannot fetch it either.
                raise InvalidRequest("Ollama accepts images only as data: URLs", param=f"messages[{i}].content")
            if images:
                item["images"] = [data for _, data in images]
            if msg.get("tool_calls"):
                item["tool_calls"] = [{"function": function_call_of(tc, "arguments")} for tc in msg["tool_calls"]]
            if role == "tool" and (name := names.get(msg.get("tool_call_id")) or msg.get("name")):
                item["tool_name"] = name  # lets Ollama's templates label the result
            out.append(item)
        return out

    def message_out(self, message: dict) -> dict:
        """An Ollama reply message -> OpenAI message fields (content and tool calls)."""
        out: dict = {"content": message.get("content") or ""}
        calls = [{"id": call.get("id") or "call_" + uuid.uuid4().hex[:24], "type": "function",
                  "function": {"name": (call.get("function") or {}).get("name"),
                               "arguments": json.dumps((call.get("function") or {}).get("arguments") or {})}}
                 for call in message.get("tool_calls") or []]
        if calls:
            out["tool_calls"] = calls
            out["content"] = out["content"] or None
        return out

    def finish_reason(self, data: dict, has_tool_calls: bool) -> str:
        """done_reason -> finish_reason; Ollama says `stop` even when it called a tool."""
        return "tool_calls" if has_tool_calls else OLLAMA_DONE_REASONS.get(data.get("done_reason"), "stop")

    def usage(self, data: dict) -> dict:
        """Ollama's prompt_eval_count / eval_count -> OpenAI usage."""
        return make_usage(data.get("prompt_eval_count"), data.get("eval_count"))

    def parse_response(self, data: dict, model: str) -> dict:
        """/api/chat response -> chat.completion."""
        message = self.message_out(data.get("message") or {})
        return make_completion(data.get("model") or model, message,
                               self.finish_reason(data, "tool_calls" in message), self.usage(data))

    def parse_stream(self, lines: Iterable[bytes], model: str) -> Iterator[dict]:
        """NDJSON lines -> chunks; the `done: true` line ends the stream and carries the usage."""
        cid, created, calls_sent, started = completion_id(), int(time.time()), 0, False
        for line in lines:
            if not line.strip():
                continue
            data = loads_upstream(line, self.name)
            if "error" in data:
                raise UpstreamError(f"{self.name} stream error: {self.error_message(data)}", retryable=False)
            model = data.get("model") or model
            message = self.message_out(data.get("message") or {})
            delta: dict = {} if started else {"role": "assistant", "content": ""}
            if message["content"]:
                delta["content"] = message["content"]
            started = True
            if message.get("tool_calls"):
                delta["tool_calls"] = [{"index": calls_sent + k, **tc} for k, tc in enumerate(message["tool_calls"])]
                calls_sent += len(message["tool_calls"])
            if delta:
                yield make_chunk(cid, model, created, delta)
            if data.get("done"):
                yield make_chunk(cid, model, created, {}, self.finish_reason(data, calls_sent > 0))
                yield make_chunk(cid, model, created, None, usage=self.usage(data))
                return
        raise UpstreamError(f"{self.name} stream ended before done")

    def models_request(self, endpoint: Endpoint):
        """GET /api/tags: the models pulled on this Ollama server."""
        return f"{endpoint.base_url}/api/tags", {}

    def parse_models(self, data: dict) -> list[dict]:
        """Ollama's tags -> OpenAI model objects."""
        return [model_entry(self.name, m.get("model") or m["name"], iso_timestamp(m.get("modified_at")),
                            self.owned_by)
                for m in data.get("models") or [] if isinstance(m, dict) and (m.get("model") or m.get("name"))]


ADAPTERS = [
    AnthropicAdapter("anthropic", "https://api.anthropic.com", ("ANTHROPIC_API_KEY", "CLAUDE_API_KEY"),
                     ("ANTHROPIC_BASE_URL",)),
    GeminiAdapter("gemini", "https://generativelanguage.googleapis.com", ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
                  ("GEMINI_BASE_URL",), owned_by="google"),
    AzureAdapter("azure", "", ("AZURE_OPENAI_API_KEY",), ("AZURE_OPENAI_BASE_URL",), owned_by="azure"),
    OllamaAdapter("ollama", "http://localhost:11434", (), ("OLLAMA_BASE_URL",), needs_key=False),
]

"""Provider adapters: pure translation between OpenAI's chat format and each provider's wire format.

An adapter never does I/O. `providers.send()` owns the HTTP session, timeouts, retries and fallback,
and calls these methods to build the upstream request and to read what comes back. The native
providers (Anthropic, Gemini, Azure, Ollama) live in native.py on the same contract.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator

from errors import UpstreamError

# Proxy extensions and fields no provider should see.
EXTENSION_FIELDS = frozenset({"fallbacks", "webhookUrl", "webhook_url"})


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach one provider for one call."""

    base_url: str
    key: str | None = None
    api_version: str | None = None
    public_only: bool = False  # a client-chosen URL (/execute): connect to public addresses only


class RawChunk(dict):
    """A chunk the provider sent exactly as OpenAI's format has it: `raw` is its JSON text, relayed as is.

    Whoever changes such a chunk must relay a plain dict instead (app.sse_events drops `raw` when it
    removes the usage field).
    """

    __slots__ = ("raw",)

    def __init__(self, chunk: dict, raw: str):
        super().__init__(chunk)
        self.raw = raw


def completion_id() -> str:
    """A fresh OpenAI-style completion id."""
    return "chatcmpl-" + uuid.uuid4().hex


def estimate_tokens(value) -> int:
    """A rough token count (4 characters a token) for prompts or text the provider did not count."""
    if value is None:
        return 0
    if not isinstance(value, str):
        value = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return max(1, (len(value) + 3) // 4) if value else 0


def make_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """An OpenAI usage object."""
    prompt_tokens, completion_tokens = int(prompt_tokens or 0), int(completion_tokens or 0)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def make_completion(model: str, message: dict, finish_reason: str, usage: dict | None,
                    id: str | None = None, created: int | None = None) -> dict:
    """A single-choice `chat.completion`, with the nullable fields OpenAI's schema requires."""
    message = {"role": "assistant", "content": None, "refusal": None, **message}
    return {"id": id or completion_id(), "object": "chat.completion", "created": created or int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage or make_usage(0, 0)}


def make_chunk(id: str, model: str, created: int, delta: dict | None = None, finish_reason: str | None = None,
               usage: dict | None = None) -> dict:
    """A `chat.completion.chunk`; with delta None it is the usage-only last chunk (empty choices)."""
    chunk = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model}
    if delta is None:
        chunk["choices"] = []
    else:
        chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def chunks_from_completion(completion: dict) -> Iterator[dict]:
    """Replay a finished completion as a stream of chunks (echo provider, cache hits, refinement)."""
    cid, model, created = completion["id"], completion["model"], completion["created"]
    for choice in completion["choices"]:
        msg = choice["message"]
        delta: dict = {"role": "assistant", "content": msg.get("content") or ""}
        if msg.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **tc} for i, tc in enumerate(msg["tool_calls"])]
        chunk = make_chunk(cid, model, created, delta)
        chunk["choices"][0]["index"] = choice["index"]
        yield chunk
        end = make_chunk(cid, model, created, {}, choice["finish_reason"])
        end["choices"][0]["index"] = choice["index"]
        yield end
    if completion.get("usage"):
        yield make_chunk(cid, model, created, None, usage=completion["usage"])


def sse_data(lines: Iterable[bytes]) -> Iterator[tuple[str | None, str]]:
    """Yield (event, data) pairs from a server-sent-event stream given as lines."""
    event, data = None, []
    for raw in lines:
        line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if line.endswith("\r"):
            line = line[:-1]
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                data.append(value)
            elif field == "event":
                event = value
    if data:
        yield event, "\n".join(data)


def loads_upstream(text: str | bytes, provider: str) -> dict:
    """Parse an upstream JSON body; garbage is a retryable upstream error, never a 500."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise UpstreamError(f"{provider} returned a body that is not JSON") from None
    if not isinstance(data, dict):
        raise UpstreamError(f"{provider} returned JSON that is not an object")
    return data


FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
# What OpenAI-compatible providers send beyond OpenAI's own values (Mistral: model_length, error).
FINISH_REASON_ALIASES = {"model_length": "length", "max_tokens": "length", "tool_call": "tool_calls",
                         "eos": "stop", "end_turn": "stop", "stop_sequence": "stop"}


def openai_finish_reason(reason) -> str | None:
    """One of OpenAI's finish reasons for whatever a compatible provider sent (None stays None)."""
    if reason is None or reason in FINISH_REASONS:
        return reason
    return FINISH_REASON_ALIASES.get(reason, "stop")


def normalize_usage(usage) -> dict | None:
    """Usage with all three counts as integers, keeping any detail fields the provider sent."""
    if not isinstance(usage, dict):
        return None
    out = dict(usage)
    p, c = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    out.update(prompt_tokens=p, completion_tokens=c, total_tokens=int(usage.get("total_tokens") or p + c))
    return out


class Adapter:
    """Base contract. Subclasses translate; attributes say what the provider needs.

    build_request(body, model, endpoint, stream) -> (url, headers, json_body)
    parse_response(data, model) -> chat.completion dict
    parse_stream(lines, model) -> iterator of chat.completion.chunk dicts (a chunk with `usage`
        carries the call's usage; raise UpstreamError on an error event)
    models_request(endpoint) -> (url, headers); parse_models(data) -> list of OpenAI model objects
    error_message(data) -> the human message inside a provider's error body
    """

    local = False  # True: answered in-process by respond(), no HTTP

    def __init__(self, name: str, default_base_url: str = "", key_vars: tuple[str, ...] = (),
                 base_url_vars: tuple[str, ...] = (), needs_key: bool = True, owned_by: str | None = None):
        self.name = name
        self.default_base_url = default_base_url
        self.key_vars = key_vars
        self.base_url_vars = base_url_vars or (f"{name.upper()}_BASE_URL",)
        self.needs_key = needs_key
        self.owned_by = owned_by or name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def error_message(self, data) -> str:
        """The message of an OpenAI-style error body, or a generic one."""
        if isinstance(data, dict):
            err = data.get("error", data)
            if isinstance(err, dict) and isinstance(err.get("message"), str):
                return err["message"]
            if isinstance(err, str):
                return err
            if isinstance(data.get("message"), str):
                return data["message"]
        return "no error message"

    def parse_models(self, data: dict) -> list[dict]:
        """OpenAI-style `{"data": [{"id": ...}]}` model lists."""
        out = []
        for m in data.get("data") or []:
            if isinstance(m, dict) and isinstance(m.get("id"), str):
                out.append({"id": f"{self.name}/{m['id']}", "object": "model",
                            "created": int(m.get("created") or 0), "owned_by": self.owned_by})
        return out


class OpenAIAdapter(Adapter):
    """OpenAI and every OpenAI-compatible provider: the body passes through, extensions stripped."""

    def build_request(self, body: dict, model: str, endpoint: Endpoint, stream: bool):
        """Forward the client's body with the upstream model id; ask for usage on streams."""
        out = {k: v for k, v in body.items() if k not in EXTENSION_FIELDS}
        out["model"] = model
        if stream:
            out["stream"] = True
            # Usage is needed for costing; the proxy drops the usage chunk if the client did not ask.
            out["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        else:
            out.pop("stream", None)
            out.pop("stream_options", None)
        headers = {"Content-Type": "application/json"}
        if endpoint.key:
            headers["Authorization"] = f"Bearer {endpoint.key}"
        return f"{endpoint.base_url}/chat/completions", headers, out

    def parse_response(self, data: dict, model: str) -> dict:
        """Fill in what OpenAI's schema requires but compatible providers sometimes omit."""
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UpstreamError(f"{self.name} returned a completion without choices")
        if "id" not in data:  # not setdefault: a fresh id costs a uuid4
            data["id"] = completion_id()
        data["object"] = "chat.completion"
        data.setdefault("created", int(time.time()))
        if not isinstance(data.get("model"), str):
            data["model"] = model
        for i, choice in enumerate(choices):
            if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
                raise UpstreamError(f"{self.name} returned a choice without a message")
            choice.setdefault("index", i)
            choice.setdefault("logprobs", None)
            choice["finish_reason"] = openai_finish_reason(choice.get("finish_reason")) or "stop"
            msg = choice["message"]
            msg.setdefault("role", "assistant")
            msg.setdefault("content", None)
            msg.setdefault("refusal", None)
        data["usage"] = normalize_usage(data.get("usage")) or make_usage(0, 0)
        return data

    def parse_stream(self, lines: Iterable[bytes], model: str) -> Iterator[dict]:
        """OpenAI SSE: `data: {chunk}` events up to `data: [DONE]`; an `error` object is an upstream error."""
        for _event, data in sse_data(lines):
            if data.strip() == "[DONE]":
                return
            chunk = loads_upstream(data, self.name)
            if "error" in chunk:
                raise UpstreamError(f"{self.name} stream error: {self.error_message(chunk)}", retryable=False)
            changed = chunk.get("object") != "chat.completion.chunk" or not isinstance(chunk.get("model"), str)
            chunk["object"] = "chat.completion.chunk"
            if not isinstance(chunk.get("model"), str):
                chunk["model"] = model
            for choice in chunk.get("choices") or []:
                reason = openai_finish_reason(choice.get("finish_reason"))
                changed = changed or "finish_reason" not in choice or reason != choice["finish_reason"]
                choice["finish_reason"] = reason
            if chunk.get("usage") is not None:
                usage = normalize_usage(chunk["usage"])
                changed = changed or usage != chunk["usage"]
                chunk["usage"] = usage
            yield chunk if changed else RawChunk(chunk, data)
        raise UpstreamError(f"{self.name} stream ended without [DONE]")

    def models_request(self, endpoint: Endpoint):
        """GET {base}/models with the bearer key."""
        headers = {"Authorization": f"Bearer {endpoint.key}"} if endpoint.key else {}
        return f"{endpoint.base_url}/models", headers


class EchoAdapter(Adapter):
    """Answers with the last user message, for trying the proxy without any provider key."""

    local = True

    def respond(self, body: dict, model: str) -> dict:
        """A completion whose content is the last user message's text."""
        text = ""
        for msg in reversed(body.get("messages") or []):
            if msg.get("role") == "user":
                text = message_text(msg.get("content"))
                break
        usage = make_usage(estimate_tokens(body.get("messages")), estimate_tokens(text))
        return make_completion(model, {"content": text}, "stop", usage)

    def parse_models(self, data: dict) -> list[dict]:
        return [{"id": "echo", "object": "model", "created": 0, "owned_by": "llm-proxy"}]


def message_text(content) -> str:
    """The text of a message's content, whether a string or an array of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""

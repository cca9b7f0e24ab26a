"""Fake Anthropic, Gemini and Ollama servers on 127.0.0.1 that speak each provider's real wire format.

Each fake runs a threaded http.server on a free port, records every request it receives
(`fake.requests`: method, path, headers, json), and answers deterministically:
- with tools in the request and no tool result yet in the conversation: a call of the first tool
  with `fake.tool_input` as its arguments;
- otherwise: the text `fake.reply` (default "Hello from <provider>!"), streamed word by word.
`fake.fail_with.append(status)` makes the next call fail with that status in the provider's error
format; `fake.drop_stream = True` cuts every stream before its terminal event (a mid-stream drop).

Usage:
    with FakeAnthropic() as fake:
        base_url = fake.url          # e.g. ANTHROPIC_BASE_URL
        ...
        fake.requests[-1]["json"]
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}
GOOGLE_STATUSES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                   429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


class FakeServer:
    """A provider fake on a free local port; subclasses implement `handle(method, path, query, body)`."""

    name = "fake"

    def __init__(self):
        self.requests: list[dict] = []
        self.fail_with: list[int] = []
        self.drop_stream = False
        self.reply = f"Hello from {self.name}!"
        self.tool_input: dict = {"location": "Paris"}
        self.prompt_tokens, self.completion_tokens = 12, 5
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        """The base URL to configure as the provider's <PROVIDER>_BASE_URL."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> "FakeServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FakeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wants_tool_call(self, body: dict) -> bool:
        """Call a tool when tools are offered and no tool result is in the conversation yet."""
        return bool(self.tools(body)) and not self.has_tool_result(body)

    def words(self) -> list[str]:
        """The reply split into stream pieces (spaces kept)."""
        words = self.reply.split(" ")
        return [w + " " for w in words[:-1]] + [words[-1]]


def _handler_for(fake: FakeServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

        def _dispatch(self, method):
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            fake.requests.append({"method": method, "path": self.path, "headers": dict(self.headers), "json": body})
            fake.handle(self, method, parts.path, parts.query, body)

        def send_json(self, status: int, payload) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def send_stream(self, content_type: str, pieces: list[str]) -> None:
            """A streamed body without Content-Length; the connection closes at its end."""
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for piece in pieces:
                self.wfile.write(piece.encode())
                self.wfile.flush()
            self.close_connection = True

    return Handler


class FakeAnthropic(FakeServer):
    """POST /v1/messages (JSON or SSE, text or tool_use) and GET /v1/models."""

    name = "anthropic"

    def tools(self, body):
        return body.get("tools")

    def has_tool_result(self, body):
        return any(isinstance(m.get("content"), list) and any(b.get("type") == "tool_result" for b in m["content"])
                   for m in body.get("messages") or [])

    def handle(self, h, method, path, query, body):
        # The API documents x-api-key; anthropic SDK 2.x sends the same key as a bearer token.
        key = h.headers.get("x-api-key") or (h.headers.get("Authorization") or "").removeprefix("Bearer ")
        if not key or not h.headers.get("anthropic-version"):
            return self.error(h, 401, "invalid x-api-key")
        if self.fail_with:
            status = self.fail_with.pop(0)
            return self.error(h, status, f"fake failure {status}")
        if method == "GET" and path == "/v1/models":
            return h.send_json(200, {"data": [
                {"type": "model", "id": "claude-sonnet-4-20250514", "display_name": "Claude Sonnet 4",
                 "created_at": "2025-05-22T00:00:00Z"},
                {"type": "model", "id": "claude-3-5-haiku-20241022", "display_name": "Claude Haiku 3.5",
                 "created_at": "2024-10-22T00:00:00Z"}],
                "has_more": False, "first_id": "claude-sonnet-4-20250514", "last_id": "claude-3-5-haiku-20241022"})
        if method != "POST" or path != "/v1/messages":
            return self.error(h, 404, f"Not found: {path}")
        if not body.get("max_tokens") or not body.get("messages"):
            return self.error(h, 400, "max_tokens: Field required")
        message = {"id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
                   "model": body["model"], "stop_sequence": None,
                   "usage": {"input_tokens": self.prompt_tokens, "output_tokens": self.completion_tokens}}
        tool = self.tools(body)[0] if self.wants_tool_call(body) else None
        if tool:
            content = [{"type": "text", "text": "Let me check."},
                       {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": tool["name"],
                        "input": self.tool_input}]
            stop_reason = "tool_use"
        else:
            content, stop_reason = [{"type": "text", "text": self.reply}], "end_turn"
        if not body.get("stream"):
            return h.send_json(200, {**message, "content": content, "stop_reason": stop_reason})
        events = [("message_start", {"type": "message_start", "message": {
            **message, "content": [], "stop_reason": None, "usage": {"input_tokens": self.prompt_tokens,
                                                                     "output_tokens": 1}}})]
        events.append(("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "text", "text": ""}}))
        events.append(("ping", {"type": "ping"}))
        text = content[0]["text"]
        for word in ([text] if tool else self.words()):
            events.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": word}}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
        if tool:
            block = content[1]
            events.append(("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
                "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}}))
            arguments = json.dumps(block["input"])
            for piece in (arguments[:len(arguments) // 2], arguments[len(arguments) // 2:]):
                events.append(("content_block_delta", {"type": "content_block_delta", "index": 1,
                                                       "delta": {"type": "input_json_delta", "partial_json": piece}}))
            events.append(("content_block_stop", {"type": "content_block_stop", "index": 1}))
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                         "usage": {"output_tokens": self.completion_tokens}}))
        events.append(("message_stop", {"type": "message_stop"}))
        if self.drop_stream:
            events = events[:3]
        h.send_stream("text/event-stream", [f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events])

    def error(self, h, status, message):
        h.send_json(status, {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"),
                                                        "message": message}})


class FakeGemini(FakeServer):
    """POST /v1beta/models/{model}:generateContent and :streamGenerateContent?alt=sse; GET /v1beta/models.

    The same routes answer under /v1 too.
    """

    name = "gemini"

    def tools(self, body):
        return [d for t in body.get("tools") or [] for d in t.get("functionDeclarations") or []]

    def has_tool_result(self, body):
        return any("functionResponse" in p for c in body.get("contents") or [] for p in c.get("parts") or [])

    def handle(self, h, method, path, query, body):
        if not h.headers.get("x-goog-api-key"):
            return self.error(h, 403, "Method doesn't allow unregistered callers. Please use API Key.")
        if self.fail_with:
            status = self.fail_with.pop(0)
            return self.error(h, status, f"fake failure {status}")
        # google-genai 3.x calls /v1, the REST docs /v1beta: serve both.
        version, _, path = path.removeprefix("/").partition("/")
        if version not in ("v1", "v1beta"):
            return self.error(h, 404, f"Not found: /{version}/{path}")
        if method == "GET" and path == "models":
            return h.send_json(200, {"models": [
                {"name": "models/gemini-2.0-flash", "displayName": "Gemini 2.0 Flash",
                 "supportedGenerationMethods": ["generateContent", "countTokens"]},
                {"name": "models/text-embedding-004", "displayName": "Text Embedding 004",
                 "supportedGenerationMethods": ["embedContent"]}]})
        model, _, action = path.removeprefix("models/").partition(":")
        if method != "POST" or action not in ("generateContent", "streamGenerateContent"):
            return self.error(h, 404, f"Not found: {path}")
        if not body.get("contents"):
            return self.error(h, 400, "* GenerateContentRequest.contents: contents is not specified")
        usage = {"promptTokenCount": self.prompt_tokens, "candidatesTokenCount": self.completion_tokens,
                 "totalTokenCount": self.prompt_tokens + self.completion_tokens}
        tool = self.tools(body)[0] if self.wants_tool_call(body) else None
        if tool:
            pieces = [[{"functionCall": {"name": tool["name"], "args": self.tool_input}}]]
        else:
            pieces = [[{"text": word}] for word in self.words()]
        if action == "generateContent":
            parts = pieces[0] if tool else [{"text": self.reply}]
            return h.send_json(200, {"candidates": [{"content": {"parts": parts, "role": "model"},
                                                     "finishReason": "STOP", "index": 0}],
                                     "usageMetadata": usage, "modelVersion": model, "responseId": "fake-gemini-1"})
        if query != "alt=sse":
            return self.error(h, 400, "the fake streams only with alt=sse")
        events = []
        for i, parts in enumerate(pieces):
            last = i == len(pieces) - 1
            candidate = {"content": {"parts": parts, "role": "model"}, "index": 0}
            if last:
                candidate["finishReason"] = "STOP"
            events.append({"candidates": [candidate], "usageMetadata": usage if last else {
                "promptTokenCount": self.prompt_tokens}, "modelVersion": model, "responseId": "fake-gemini-1"})
        if self.drop_stream:
            events = events[:1] if len(events) > 1 else []
        h.send_stream("text/event-stream", [f"data: {json.dumps(e)}\r\n\r\n" for e in events])

    def error(self, h, status, message):
        h.send_json(status, {"error": {"code": status, "message": message,
                                       "status": GOOGLE_STATUSES.get(status, "UNKNOWN")}})


class FakeOllama(FakeServer):
    """POST /api/chat (NDJSON stream by default, as Ollama does) and GET /api/tags; no key needed."""

    name = "ollama"

    def tools(self, body):
        return body.get("tools")

    def has_tool_result(self, body):
        return any(m.get("role") == "tool" for m in body.get("messages") or [])

    def handle(self, h, method, path, query, body):
        if self.fail_with:
            status = self.fail_with.pop(0)
            return h.send_json(status, {"error": f"fake failure {status}"})
        if method == "GET" and path == "/api/tags":
            return h.send_json(200, {"models": [
                {"name": "llama3.2:latest", "model": "llama3.2:latest", "modified_at": "2024-10-01T12:00:00.123456789Z",
                 "size": 2019393189, "digest": "a80c4f17acd5", "details": {"family": "llama"}}]})
        if method != "POST" or path != "/api/chat":
            return h.send_json(404, {"error": "404 page not found"})
        if not body.get("model"):
            return h.send_json(400, {"error": "model is required"})
        stamp = "2024-10-01T12:00:00.000000Z"
        final = {"model": body["model"], "created_at": stamp, "done": True, "done_reason": "stop",
                 "total_duration": 4883583458, "load_duration": 1334875, "prompt_eval_count": self.prompt_tokens,
                 "prompt_eval_duration": 342546000, "eval_count": self.completion_tokens,
                 "eval_duration": 4535599000}
        tool = self.tools(body)[0]["function"] if self.wants_tool_call(body) else None
        if tool:
            messages = [{"role": "assistant", "content": "",
                         "tool_calls": [{"function": {"name": tool["name"], "arguments": self.tool_input}}]}]
        else:
            messages = [{"role": "assistant", "content": word} for word in self.words()]
        if body.get("stream") is False:
            message = messages[0] if tool else {"role": "assistant", "content": self.reply}
            return h.send_json(200, {**final, "message": message})
        lines = [{"model": body["model"], "created_at": stamp, "message": m, "done": False} for m in messages]
        lines.append({**final, "message": {"role": "assistant", "content": ""}})
        if self.drop_stream:
            lines = lines[:-1]
        h.send_stream("application/x-ndjson", [json.dumps(line) + "\n" for line in lines])

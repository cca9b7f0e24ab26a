"""A fast fake OpenAI-compatible upstream for benchmarks (stdlib asyncio streams, HTTP/1.1 keep-alive).

Endpoints: POST /v1/chat/completions (non-streaming, or an SSE stream when "stream": true),
GET /v1/models, GET /health. Stream shape: N content chunks spaced S ms apart (the first one at
once), a finish chunk, a usage chunk when stream_options.include_usage, then `data: [DONE]`.

    python bench/fake_upstream.py --port 9000 --chunks 20 --interval-ms 50
    (or FAKE_PORT, FAKE_CHUNKS, FAKE_INTERVAL_MS, FAKE_DELAY_MS in the environment)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

CREATED = 1700000000
MODELS = json.dumps({"object": "list", "data": [
    {"id": name, "object": "model", "created": CREATED, "owned_by": "bench"}
    for name in ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini")
]}).encode()
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
CHAT_PATHS = (b"/v1/chat/completions", b"/chat/completions")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags, defaulting to FAKE_* environment variables."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=env("FAKE_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("FAKE_PORT", "9000")))
    parser.add_argument("--chunks", type=int, default=int(env("FAKE_CHUNKS", "20")),
                        help="content chunks per stream (also the completion's token count)")
    parser.add_argument("--interval-ms", type=float, default=float(env("FAKE_INTERVAL_MS", "50")),
                        help="milliseconds between stream chunks")
    parser.add_argument("--delay-ms", type=float, default=float(env("FAKE_DELAY_MS", "0")),
                        help="milliseconds before a non-streaming answer (default: none)")
    return parser.parse_args(argv)


def head(status: int, content_type: str, length: int | None, keep_alive: bool) -> bytes:
    """An HTTP/1.1 response head; chunked when no length is given."""
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}", f"Content-Type: {content_type}", framing,
             "Connection: keep-alive" if keep_alive else "Connection: close"]
    if length is None:
        lines.append("Cache-Control: no-cache")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def error_body(message: str, code: str) -> bytes:
    """An OpenAI-style error object."""
    return json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": code}}).encode()


def usage(body: dict, completion_tokens: int) -> dict:
    """Token counts: about four characters a prompt token, one token a chunk."""
    chars = sum(len(str(m.get("content", ""))) for m in body.get("messages") or [] if isinstance(m, dict))
    prompt_tokens = chars // 4 + 1
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(body: dict, chunks: int) -> bytes:
    """A non-streaming chat.completion with usage."""
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model", "gpt-4o-mini"), "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok " * chunks, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": usage(body, chunks),
    }).encode()


def sse_events(body: dict, chunks: int):
    """The stream's `data:` payloads as bytes, in order (without [DONE])."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": body.get("model", "gpt-4o-mini"), "system_fingerprint": "fp_bench"}
    for i in range(chunks):
        delta = {"role": "assistant", "content": "tok "} if i == 0 else {"content": "tok "}
        yield json.dumps({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                               "finish_reason": None}]}).encode()
    yield json.dumps({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                           "finish_reason": "stop"}]}).encode()
    if (body.get("stream_options") or {}).get("include_usage"):
        yield json.dumps({**base, "choices": [], "usage": usage(body, chunks)}).encode()


def chunk(data: bytes) -> bytes:
    """One HTTP chunked-encoding frame."""
    return b"%x\r\n%s\r\n" % (len(data), data)


async def stream(writer: asyncio.StreamWriter, body: dict, opts, keep_alive: bool) -> None:
    """Write an SSE chat stream, one chunk every interval."""
    writer.write(head(200, "text/event-stream", None, keep_alive))
    for i, event in enumerate(sse_events(body, opts.chunks)):
        if 0 < i < opts.chunks and opts.interval_ms > 0:
            await asyncio.sleep(opts.interval_ms / 1000)
        writer.write(chunk(b"data: " + event + b"\n\n"))
        await writer.drain()
    writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


async def respond(writer, method: bytes, path: bytes, raw: bytes, opts, keep_alive: bool) -> None:
    """Route one request and write its answer."""
    path = path.split(b"?", 1)[0]
    if path in (b"/v1/models", b"/models", b"/health"):
        payload = MODELS if path != b"/health" else b'{"status":"ok"}'
        writer.write(head(200, "application/json", len(payload), keep_alive) + payload)
        return
    if path not in CHAT_PATHS:
        payload = error_body("not found", "not_found")
        writer.write(head(404, "application/json", len(payload), keep_alive) + payload)
        return
    if method != b"POST":
        payload = error_body("use POST", "method_not_allowed")
        writer.write(head(405, "application/json", len(payload), keep_alive) + payload)
        return
    try:
        body = json.loads(raw)
        assert isinstance(body, dict)
    except (ValueError, AssertionError):
        payload = error_body("body is not a JSON object", "invalid_json")
        writer.write(head(400, "application/json", len(payload), keep_alive) + payload)
        return
    if body.get("stream"):
        await stream(writer, body, opts, keep_alive)
        return
    if opts.delay_ms > 0:
        await asyncio.sleep(opts.delay_ms / 1000)
    payload = completion(body, opts.chunks)
    writer.write(head(200, "application/json", len(payload), keep_alive) + payload)


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, opts) -> None:
    """Answer requests on one keep-alive connection until the client closes it."""
    try:
        while True:
            request_head = await reader.readuntil(b"\r\n\r\n")
            lines = request_head.split(b"\r\n")
            method, path, version = lines[0].split(b" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip().lower()
            raw = await reader.readexactly(int(headers.get(b"content-length", b"0")))
            connection = headers.get(b"connection", b"")
            keep_alive = connection != b"close" if version == b"HTTP/1.1" else connection == b"keep-alive"
            await respond(writer, method, path, raw, opts, keep_alive)
            await writer.drain()
            if not keep_alive:
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main(opts) -> None:
    """Listen until killed."""
    server = await asyncio.start_server(lambda r, w: serve_connection(r, w, opts),
                                        opts.host, opts.port, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print(f"fake upstream on http://{opts.host}:{port}/v1 ({opts.chunks} chunks x {opts.interval_ms:g} ms)",
          flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main(parse_args()))
    except KeyboardInterrupt:
        pass

"""Test support: OpenAI schema validation, a fake OpenAI-compatible upstream, and a real gunicorn."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import requests

CLIENT_KEY = "test-client-key"
ADMIN_KEY = "test-admin-key"
ROOT = Path(__file__).resolve().parent.parent
OPENAPI = ROOT.parent / "shared" / "openai-openapi" / "openapi.json"


def auth(key: str = CLIENT_KEY) -> dict:
    """Headers for a client key."""
    return {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------------------------------------
# OpenAI's own schema


@lru_cache(maxsize=1)
def _spec() -> dict:
    with open(OPENAPI, encoding="utf-8") as f:
        return json.load(f)


def _nullable(keyword):
    """OpenAI's 3.1 document still marks some fields `nullable: true` (OAS 3.0 style); honour it."""
    def check(validator, value, instance, schema):
        if instance is None and schema.get("nullable") is True:
            return
        yield from keyword(validator, value, instance, schema)
    return check


@lru_cache(maxsize=16)
def _validator(name: str):
    from jsonschema import validators
    from jsonschema._keywords import enum
    from jsonschema._keywords import type as type_
    from openapi_schema_validator import OAS31Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    spec = _spec()
    registry = Registry().with_resource("urn:openai", Resource.from_contents(spec, default_specification=DRAFT202012))
    cls = validators.extend(OAS31Validator, {"type": _nullable(type_), "enum": _nullable(enum)})
    return cls({"$ref": f"urn:openai#/components/schemas/{name}"}, registry=registry,
               format_checker=OAS31Validator.FORMAT_CHECKER)


def validate(obj: dict, schema: str) -> None:
    """Raise if obj does not validate against components/schemas/<schema> of OpenAI's openapi.json."""
    errors = sorted(_validator(schema).iter_errors(obj), key=lambda e: list(e.path))
    if errors:
        raise AssertionError(f"{schema}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5]))


# ---------------------------------------------------------------------------------------------
# Ports and a fake upstream


def eventually(check: Callable[[], object], timeout: float = 5.0, interval: float = 0.02):
    """Poll check() until it returns something truthy (and return it), or fail after timeout seconds.

    For reads of another process's writes: a gunicorn worker writes usage rows just after the answer
    (usage.py), so a test reading the database directly may be a few tens of milliseconds early.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            assert result, f"still not true after {timeout} s: {check}"
            return result
        time.sleep(interval)


def completion_body(content: str = "Hello from the fake upstream.", model: str = "gpt-4o-mini",
                    prompt_tokens: int = 10, completion_tokens: int = 5, tool_calls: list | None = None) -> dict:
    """A chat.completion as OpenAI's API reference shows it."""
    message = {"role": "assistant", "content": None if tool_calls else content, "refusal": None,
               "annotations": []}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "object": "chat.completion", "created": 1741569952,
        "model": model, "choices": [{"index": 0, "message": message, "logprobs": None,
                                     "finish_reason": "tool_calls" if tool_calls else "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens,
                  "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
        "service_tier": "default",
    }


def stream_events(words: list[str], model: str = "gpt-4o-mini", usage: bool = True,
                  prompt_tokens: int = 10) -> list[dict]:
    """The chunks of an OpenAI stream for these words, as in the streaming API reference."""
    base = {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190, "model": model,
            "system_fingerprint": "fp_44709d6fcb"}
    out = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]}]
    out += [{**base, "choices": [{"index": 0, "delta": {"content": w}, "logprobs": None, "finish_reason": None}]}
            for w in words]
    out.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
    if usage:
        out.append({**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                                                     "total_tokens": prompt_tokens + len(words)}})
    return out


class Reply:
    """One scripted answer of the fake upstream."""

    def __init__(self, status: int = 200, body: dict | str | None = None, headers: dict | None = None,
                 stream: list[dict] | None = None, delay: float = 0.0, chunk_delay: float = 0.0,
                 drop_after: int | None = None, done: bool = True):
        self.status, self.body, self.headers = status, body, headers or {}
        self.stream, self.delay, self.chunk_delay = stream, delay, chunk_delay
        self.drop_after, self.done = drop_after, done


class FakeOpenAI:
    """An OpenAI-compatible server on 127.0.0.1 that records requests and plays scripted replies.

    `script` is consumed first (one Reply per request); then `default` (a Reply or a callable
    taking the request record) answers. Streams are sent when the request asks for them and the
    reply has `stream` chunks. `disconnects` counts streams whose client went away.
    """

    def __init__(self, default: Reply | Callable[[dict], Reply] | None = None):
        self.requests: list[dict] = []
        self.script: list[Reply] = []
        self.default = default or Reply(body=completion_body())
        self.disconnects = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                fake._record(self, None)
                self._send_json(200, {"object": "list", "data": [
                    {"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"}]})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                record = fake._record(self, body)
                reply = fake._next(record)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.stream is not None and isinstance(body, dict) and body.get("stream"):
                    self._send_stream(reply)
                else:
                    self._send_json(reply.status, reply.body, reply.headers)

            def _send_json(self, status, body, headers=None):
                data = body if isinstance(body, (bytes, str)) else json.dumps(body)
                data = data.encode() if isinstance(data, str) else data
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _send_stream(self, reply: Reply):
                # Like OpenAI: HTTP/1.1 keep-alive with chunked transfer encoding.
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def send(data: bytes) -> None:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()

                try:
                    for i, chunk in enumerate(reply.stream):
                        if reply.drop_after is not None and i >= reply.drop_after:
                            self.close_connection = True  # the connection drops mid-stream
                            return
                        send(f"data: {json.dumps(chunk)}\n\n".encode())
                        if reply.chunk_delay:
                            time.sleep(reply.chunk_delay)
                    if reply.done:
                        send(b"data: [DONE]\n\n")
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                    with fake.lock:
                        fake.disconnects += 1

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _record(self, handler: BaseHTTPRequestHandler, body) -> dict:
        record = {"method": handler.command, "path": handler.path, "headers": dict(handler.headers), "json": body}
        with self.lock:
            self.requests.append(record)
        return record

    def _next(self, record: dict) -> Reply:
        with self.lock:
            if self.script:
                return self.script.pop(0)
        return self.default(record) if callable(self.default) else self.default

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def posts(self) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST"]


# ---------------------------------------------------------------------------------------------
# A real gunicorn


class QuietServer(ThreadingHTTPServer):
    """A fake provider's server: a client that hangs up on an idle keep-alive connection (as a pooled
    session does when it is closed) is no error worth a traceback in the test output."""

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class Gunicorn:
    """`gunicorn -c gunicorn.conf.py app:app` with the given environment, on a port of its own.

    gunicorn binds port 0 and the port is read back from its "Listening at" line: a port
    picked beforehand and released could be taken by another socket before gunicorn binds it.
    """

    STARTED: list["Gunicorn"] = []  # every server of the running test, for its failure report

    def __init__(self, env: dict | None = None, workers: int = 1, threads: int = 32):
        self.port = 0
        self.url = ""
        self.env = {k: v for k, v in os.environ.items() if not _provider_var(k)}
        self.env.update({"HOST": "127.0.0.1", "WEB_CONCURRENCY": str(workers),
                         "GUNICORN_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
        self.env.update({k: str(v) for k, v in (env or {}).items()})
        fd, path = tempfile.mkstemp(prefix="gunicorn-", suffix=".log", dir=os.environ.get("TMPDIR", "/tmp"))
        os.close(fd)
        self.log_path = Path(path)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Gunicorn":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                                      "--bind", "127.0.0.1:0", "app:app"],
                                     cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        Gunicorn.STARTED.append(self)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.log()[-2000:]}")
            if not self.url and (found := re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", self.log())):
                self.port = int(found.group(1))
                self.url = f"http://127.0.0.1:{self.port}"
            try:
                if self.url and requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not start: {self.log()[-2000:]}")

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes (children of the master)."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "Gunicorn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


PROVIDER_VAR_SUFFIXES = ("_API_KEY", "_BASE_URL", "_API_BASE_URL")


def _provider_var(name: str) -> bool:
    """Environment variables the tests must not inherit from a developer's shell."""
    return name.endswith(PROVIDER_VAR_SUFFIXES) or name in (
        "API_KEY", "ADMIN_API_KEY", "AUTHORIZED_CLIENT_ID", "ENCRYPTION_KEY", "DATABASE_URL", "CLAUDE_API_KEY",
        "GOOGLE_API_KEY", "MISTRALAI_API_KEY", "OLLAMA_ENABLED", "WEBHOOK_SECRET", "CACHE_ENABLED")

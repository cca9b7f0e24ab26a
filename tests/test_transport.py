"""The upstream transport against real sockets on 127.0.0.1 (no `responses`): keep-alive reuse, error
bodies, streams closed early, truncated and compressed bodies, and the public-only peer check."""
from __future__ import annotations

import gzip
import json
import socket
import threading
import time

import pytest

import providers
from adapters import Endpoint
from errors import UpstreamError
from providers import Route, Target, send
from support import FakeOpenAI, Reply, completion_body, eventually, stream_events

POLICY = providers.RetryPolicy(max_retries=2, initial_backoff=1, max_backoff=10000, factor=2.0, jitter=0.0)
REQUEST = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
              "no_proxy")


def target(url: str, public_only: bool = False) -> Target:
    return Target(Route("gpt-4o-mini", "openai", "gpt-4o-mini"), Endpoint(url, "sk-up", public_only=public_only))


def run(url: str, body: dict = REQUEST, stream: bool = False, sleeps: list | None = None, public_only: bool = False,
        read_timeout: float = 5.0):
    return send([target(url, public_only)], body, stream, POLICY, read_timeout,
                sleep=sleeps.append if sleeps is not None else lambda s: None)


def count_connections(fake: FakeOpenAI) -> list:
    """The client addresses of the TCP connections the fake accepts from now on."""
    accepted: list = []
    process = fake.server.process_request

    def counting(request, client_address):
        accepted.append(client_address)
        return process(request, client_address)
    fake.server.process_request = counting
    return accepted


@pytest.fixture(params=[False, True], ids=["no-env", "trust-env"])
def session_env(request, monkeypatch):
    """Both ways create_app configures the session: without and with consulting the environment."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(providers.SESSION, "trust_env", request.param)


def test_calls_reuse_one_keep_alive_connection(session_env):
    with FakeOpenAI() as fake:
        accepted = count_connections(fake)
        ok = Reply(body=completion_body())
        fake.script = [ok, Reply(status=400, body={"error": {"message": "Invalid 'messages'"}}), ok]
        assert run(fake.url).completion["choices"][0]["message"]["content"] == "Hello from the fake upstream."
        with pytest.raises(UpstreamError, match="Invalid 'messages'"):
            run(fake.url)
        run(fake.url)
        assert len(fake.posts) == 3 and len(accepted) == 1  # the error body was read, so its connection was reused
        headers = fake.posts[0]["headers"]
        assert headers["Content-Type"] == "application/json" and headers["Authorization"] == "Bearer sk-up"
        assert fake.posts[0]["json"] == REQUEST


def test_provider_error_messages_and_retry_after_surface():
    with FakeOpenAI() as fake:
        fake.script = [Reply(status=404, body={"error": {"message": "The model `gpt-5x` does not exist — désolé"}})]
        with pytest.raises(UpstreamError) as info:
            run(fake.url)
        assert info.value.status == 404
        assert info.value.message == "openai returned 404: The model `gpt-5x` does not exist — désolé"
        fake.script = [Reply(status=429, headers={"Retry-After": "3"}, body={"error": {"message": "slow down"}})]
        sleeps: list = []
        assert run(fake.url, sleeps=sleeps).attempts == 2
        assert sleeps == [3.0]
        fake.script = [Reply(status=503, body="<html>Service Unavailable</html>")] * 3
        with pytest.raises(UpstreamError) as info:
            run(fake.url)
        assert info.value.message == "openai returned 503: <html>Service Unavailable</html>"


def test_a_stream_closed_early_closes_its_upstream_connection():
    with FakeOpenAI(Reply(stream=stream_events(["tok"] * 300), chunk_delay=0.01)) as fake:
        accepted = count_connections(fake)
        outcome = run(fake.url, body={**REQUEST, "stream": True}, stream=True)
        assert next(outcome.chunks)["choices"][0]["delta"]["role"] == "assistant"
        assert next(outcome.chunks)["choices"][0]["delta"]["content"] == "tok"
        outcome.chunks.close()  # the client went away
        eventually(lambda: fake.disconnects == 1)
        fake.default = Reply(body=completion_body())
        assert run(fake.url).completion["choices"][0]["message"]["content"] == "Hello from the fake upstream."
        assert len(accepted) == 2  # the half-read stream's connection was not handed out again


def test_a_full_stream_then_a_call_on_the_same_pool():
    with FakeOpenAI(Reply(body=completion_body(), stream=stream_events(["a", "b"]))) as fake:
        outcome = run(fake.url, body={**REQUEST, "stream": True}, stream=True)
        assert [c["choices"][0]["delta"].get("content") for c in outcome.chunks if c["choices"]] == ["", "a", "b", None]
        assert run(fake.url).completion["usage"]["total_tokens"] == 15


class RawServer:
    """A one-answer-per-connection HTTP server on 127.0.0.1 that sends `answer` bytes, then optionally
    stalls, then closes (for answers no well-behaved server would give)."""

    def __init__(self, answer: bytes, stall: float = 0.0):
        self.answer, self.stall = answer, stall
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(self.answer)
                time.sleep(self.stall)

    def __enter__(self) -> "RawServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


def answer(body: bytes, *headers: str) -> bytes:
    return b"\r\n".join([b"HTTP/1.1 200 OK", *(h.encode() for h in headers), b"", body])


def test_a_compressed_body_is_decoded():
    data = gzip.compress(json.dumps(completion_body(content="squeezed")).encode())
    with RawServer(answer(data, "Content-Type: application/json", "Content-Encoding: gzip",
                          f"Content-Length: {len(data)}")) as server:
        assert run(server.url).completion["choices"][0]["message"]["content"] == "squeezed"


def test_a_truncated_body_is_a_retried_upstream_error():
    with RawServer(answer(b'{"id": "chatcmpl-', "Content-Type: application/json", "Content-Length: 400")) as server:
        with pytest.raises(UpstreamError) as info:
            run(server.url)
    assert info.value.status == 502 and info.value.attempts == 3
    assert info.value.message == "request to openai failed (ChunkedEncodingError)"


def test_a_body_that_stalls_fails_within_the_read_timeout():
    with RawServer(answer(b'{"id": "chatcmpl-', "Content-Type: application/json", "Content-Length: 400"),
                   stall=3.0) as server:
        started = time.perf_counter()
        with pytest.raises(UpstreamError) as info:
            send([target(server.url)], REQUEST, False, providers.RetryPolicy(max_retries=0), 0.3)
    assert info.value.status == 502 and time.perf_counter() - started < 2.5
    assert info.value.message == "connection to openai failed"  # what requests made of it: a dropped connection


def test_a_public_only_target_never_reaches_a_loopback_server():
    with FakeOpenAI() as fake:
        with pytest.raises(UpstreamError, match="connection to openai failed"):
            run(fake.url, public_only=True)
        assert fake.posts == []


def test_a_finished_stream_leaves_its_connection_for_the_next_call():
    with FakeOpenAI(Reply(stream=stream_events(["a", "b"]))) as fake:
        accepted = count_connections(fake)
        for _ in range(3):
            outcome = run(fake.url, body={**REQUEST, "stream": True}, stream=True)
            assert [c["choices"][0]["delta"].get("content") for c in outcome.chunks if c["choices"]][1:3] == ["a", "b"]
        fake.default = Reply(body=completion_body())
        assert run(fake.url).completion["usage"]["total_tokens"] == 15
        assert len(fake.posts) == 4 and len(accepted) == 1  # one TCP (and, upstream, TLS) handshake for all four


def test_a_stream_whose_body_stays_open_after_its_end_is_not_held_up():
    events = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in stream_events(["a"])) + b"data: [DONE]\n\n"
    chunked = b"%x\r\n%s\r\n" % (len(events), events)  # and then no terminating chunk: the body stays open
    with RawServer(answer(chunked, "Content-Type: text/event-stream", "Transfer-Encoding: chunked"),
                   stall=10) as server:
        started = time.monotonic()
        outcome = run(server.url, body={**REQUEST, "stream": True}, stream=True)
        assert [c["choices"][0]["delta"].get("content") for c in outcome.chunks if c["choices"]][1] == "a"
        assert time.monotonic() - started < providers.STREAM_TAIL_TIMEOUT + 2  # not the 5 s read timeout

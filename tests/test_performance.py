"""The hot path's promises: an honest x-llm-overhead-ms, one-time upstream session settings, few round trips."""
from __future__ import annotations

import json
import time

import pytest

import providers
from config import load_config
from keys_support import chat, create_key
from support import FakeOpenAI, Reply, auth, completion_body, stream_events

UPSTREAM_DELAY = 0.1  # seconds the fake provider waits before answering


@pytest.mark.parametrize("stream", [False, True])
def test_overhead_header_excludes_the_upstream_wait(make_app, stream):
    reply = Reply(body=completion_body(), stream=stream_events(["Hi", " there"]), delay=UPSTREAM_DELAY)
    with FakeOpenAI(reply) as fake:
        client = make_app(provider_keys={"openai": "sk"}, base_urls={"openai": fake.url}).test_client()
        started = time.perf_counter()
        r = client.post("/v1/chat/completions", json=chat(model="gpt-4o-mini", stream=stream), headers=auth())
        total_ms = (time.perf_counter() - started) * 1000
    assert r.status_code == 200
    overhead = float(r.headers["x-llm-overhead-ms"])
    # The upstream's 100 ms are not ours; what is left is positive and within the client's own total.
    assert 0 < overhead < total_ms - UPSTREAM_DELAY * 1000


def test_requests_reads_the_environment_only_when_something_is_set():
    assert load_config({}).upstream_trust_env is False
    assert load_config({"https_proxy": "http://proxy:3128"}).upstream_trust_env is True
    assert load_config({"NO_PROXY": "localhost"}).upstream_trust_env is True
    bundle = load_config({"REQUESTS_CA_BUNDLE": "/etc/ssl/corp.pem"})  # read once, not per call
    assert bundle.upstream_trust_env is False and bundle.upstream_ca_bundle == "/etc/ssl/corp.pem"


def test_upstream_pool_follows_the_thread_count(make_app):
    assert load_config({"GUNICORN_THREADS": "64"}).upstream_pool_size == 64
    make_app(upstream_pool_size=300, upstream_trust_env=False, upstream_ca_bundle="/etc/ssl/corp.pem")
    assert providers.SESSION.get_adapter("http://x")._pool_maxsize == 300
    assert providers.SESSION.trust_env is False and providers.SESSION.verify == "/etc/ssl/corp.pem"
    make_app()  # back to this environment's settings for the tests that follow


def test_a_virtual_key_call_reads_and_writes_the_database_in_few_statements(make_app, monkeypatch):
    client = make_app().test_client()
    _, key = create_key(client, rpm_limit=100, tpm_limit=100_000)
    client.post("/v1/chat/completions", json=chat(), headers=auth(key))  # warm the model catalog
    db = client.application.extensions["llm_proxy"].db
    assert db.usage.flush()
    calls = {"single": 0, "transactions": 0}
    single, transaction = db.query, db.transaction

    def counted_query(*args, **kwargs):
        calls["single"] += 1
        return single(*args, **kwargs)

    def counted_transaction(*args, **kwargs):
        calls["transactions"] += 1
        return transaction(*args, **kwargs)

    monkeypatch.setattr(db, "query", counted_query)
    monkeypatch.setattr(db, "transaction", counted_transaction)
    assert client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 200
    assert db.usage.flush()
    # The key's row is reused (it has rate limits, so admission re-reads revocation and spend anyway),
    # admission is one statement batch on PostgreSQL (a transaction on SQLite), and the usage write,
    # made just after the answer (usage.py), one transaction: two trips to the database in all.
    assert calls == ({"single": 1, "transactions": 1} if db.is_pg else {"single": 0, "transactions": 2})


@pytest.mark.parametrize("include_usage", [True, False])
def test_openai_stream_chunks_are_relayed_as_sent_unless_changed(make_app, include_usage):
    events = stream_events(["Hello", " world"])
    with FakeOpenAI(Reply(stream=events)) as fake:
        client = make_app(provider_keys={"openai": "sk"}, base_urls={"openai": fake.url}).test_client()
        body = chat(model="gpt-4o-mini", stream=True, stream_options={"include_usage": include_usage})
        r = client.post("/v1/chat/completions", json=body, headers=auth())
    sent = [block for block in r.data.decode().split("\n\n") if block]
    if include_usage:  # the fake's own bytes (json.dumps with spaces), not re-encoded
        assert sent == [f"data: {json.dumps(e)}" for e in events] + ["data: [DONE]"]
    else:  # the usage chunk is dropped, so the rest cannot be relayed as sent
        assert len(sent) == len(events) and all('"usage"' not in block for block in sent)

"""The response cache: hits make no upstream call, cost 0 and replay as streams; no-cache bypasses it."""
from __future__ import annotations

import json
import time

import pytest
import requests

import cache
from db import Database
from support import CLIENT_KEY, FakeOpenAI, Gunicorn, Reply, auth, completion_body, eventually, stream_events, validate

QUESTION = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 0}


@pytest.fixture
def upstream():
    with FakeOpenAI(Reply(body=completion_body("4"), stream=stream_events(["4"]))) as fake:
        yield fake


@pytest.fixture
def proxy(upstream, database_url):
    env = {"DATABASE_URL": database_url, "API_KEY": CLIENT_KEY, "OPENAI_API_KEY": "sk-upstream",
           "OPENAI_BASE_URL": upstream.url, "CACHE_ENABLED": "true", "CACHE_TTL": "60", "REQUEST_TIMEOUT": "5"}
    with Gunicorn(env, workers=2) as server:
        yield server


def post(proxy, body, headers=None, **kw):
    return requests.post(proxy.url + "/v1/chat/completions", json=body, headers={**auth(), **(headers or {})},
                         timeout=20, **kw)


def sse(r) -> list:
    return [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]


def test_a_hit_makes_no_upstream_call_and_costs_nothing(proxy, upstream, database_url):
    first = post(proxy, QUESTION)
    assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
    for _ in range(3):  # two gunicorn workers: the cache is in the database, shared by both
        again = post(proxy, {**QUESTION, "user": "someone-else"})
        assert again.headers["x-cache"] == "HIT" and again.headers["x-llm-cost"] == "0"
        assert again.json()["choices"] == first.json()["choices"] and again.json()["id"] != first.json()["id"]
        validate(again.json(), "CreateChatCompletionResponse")
    assert len(upstream.posts) == 1
    db = Database(database_url)
    rows = eventually(lambda: len(found := db.query("SELECT cost_nusd, cached FROM usage ORDER BY created_at")) == 4
                      and found)
    db.close()
    assert [(r["cost_nusd"], r["cached"]) for r in rows] == [(4500, 0)] + [(0, 1)] * 3


def test_no_cache_bypasses_the_lookup(proxy, upstream):
    post(proxy, QUESTION)
    fresh = post(proxy, QUESTION, {"Cache-Control": "no-cache"})
    assert fresh.headers["x-cache"] == "MISS" and fresh.headers["x-llm-cost"] != "0"
    assert len(upstream.posts) == 2


def test_other_parameters_miss(proxy, upstream):
    post(proxy, QUESTION)
    assert post(proxy, {**QUESTION, "temperature": 1}).headers["x-cache"] == "MISS"
    assert post(proxy, QUESTION, {"x-llm-num-calls": "2"}).headers["x-cache"] == "MISS"
    assert len(upstream.posts) == 1 + 1 + 2


def test_a_streamed_answer_is_stored_and_replayed_as_a_stream(proxy, upstream):
    body = {**QUESTION, "stream": True, "stream_options": {"include_usage": True}}
    streamed = post(proxy, body, stream=True)
    assert streamed.headers["x-cache"] == "MISS" and sse(streamed)[-1] == "[DONE]"
    replayed = post(proxy, body, stream=True)
    assert replayed.headers["x-cache"] == "HIT"
    events = sse(replayed)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "4"
    assert chunks[-1]["usage"]["total_tokens"] == 11
    plain = post(proxy, QUESTION)  # the non-streaming form of the same request hits the same entry
    assert plain.headers["x-cache"] == "HIT" and plain.json()["choices"][0]["message"]["content"] == "4"
    assert len(upstream.posts) == 1


def test_disabled_cache_says_nothing(client):
    r = client.post("/v1/chat/completions", json={**QUESTION, "model": "echo"}, headers=auth())
    assert r.status_code == 200 and "x-cache" not in r.headers


def test_entries_expire_and_are_purged(make_app):
    app = make_app(cache_enabled=True, cache_ttl=0)
    client, db = app.test_client(), app.extensions["llm_proxy"].db
    body = {**QUESTION, "model": "echo"}
    assert [client.post("/v1/chat/completions", json=body, headers=auth()).headers["x-cache"]
            for _ in range(2)] == ["MISS", "MISS"]
    assert cache.purge_expired(db, time.time() + 1) == 1
    assert db.query_one("SELECT COUNT(*) AS n FROM cache")["n"] == 0


def test_cache_key_ignores_stream_user_and_extensions():
    base = cache.cache_key(QUESTION)
    assert cache.cache_key({**QUESTION, "stream": True, "stream_options": {"include_usage": True},
                            "user": "u", "fallbacks": ["x"], "webhookUrl": "https://example.com"}) == base
    assert cache.cache_key({**QUESTION, "top_p": 0.5}) != base
    assert cache.cache_key(QUESTION, num_calls=2) != base
    assert cache.cache_key(dict(reversed(list(QUESTION.items())))) == base


def test_bypass_directives():
    assert cache.bypassed({"Cache-Control": "no-cache"}) and cache.bypassed({"Cache-Control": "max-age=0, No-Store"})
    assert not cache.bypassed({}) and not cache.bypassed({"Cache-Control": "max-age=60"})

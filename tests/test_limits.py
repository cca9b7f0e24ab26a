"""Per-key limits (SPEC 5): requests and tokens per sliding minute, Retry-After, x-ratelimit-* headers."""
from __future__ import annotations

import time

import pytest

import limits
from adapters import estimate_tokens
from keys_support import chat, create_key
from support import CLIENT_KEY, FakeOpenAI, Reply, auth, completion_body


def db_of(app):
    return app.extensions["llm_proxy"].db


def post(client, key, body=None, **headers):
    return client.post("/v1/chat/completions", json=body or chat(), headers={**auth(key), **headers})


def age_events(app, key_id: str, seconds: float) -> None:
    """Pretend the key's requests happened `seconds` earlier (once their usage rows are written)."""
    db = db_of(app)
    assert db.usage.flush()
    db.execute("UPDATE rate_events SET created_at = created_at - ? WHERE key_id = ?", (seconds, key_id))
    for table in ("request_buckets", "token_buckets"):
        db.execute(f"UPDATE {table} SET epoch_second = epoch_second - ? WHERE key_id = ?", (seconds, key_id))
    db.execute("UPDATE usage SET created_at = created_at - ? WHERE key_id = ?", (seconds, key_id))


def test_requests_per_minute_then_429_with_retry_after(client):
    _, key = create_key(client, rpm_limit=3)
    remaining = []
    for _ in range(3):
        r = post(client, key)
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(r.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    r = post(client, key)
    assert r.status_code == 429
    assert r.get_json()["error"]["type"] == "rate_limit_exceeded"
    assert 59 <= int(r.headers["Retry-After"]) <= 60
    assert r.headers["x-ratelimit-remaining-requests"] == "0"


def test_refused_requests_do_not_count_and_the_minute_slides(client, app):
    key_id, key = create_key(client, rpm_limit=2)
    assert [post(client, key).status_code for _ in range(4)] == [200, 200, 429, 429]
    age_events(app, key_id, 45)
    r = post(client, key)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) <= 16
    age_events(app, key_id, 16)  # now 61 s old: out of the window
    assert post(client, key).status_code == 200


def test_tokens_per_minute_counts_the_prompt_estimate_first(client):
    body = chat("x" * 400)  # about 100+ prompt tokens
    estimate = estimate_tokens(body["messages"])
    _, key = create_key(client, tpm_limit=estimate * 2 + estimate // 2)
    r = post(client, key, body)
    assert r.status_code == 200 and r.headers["x-ratelimit-limit-tokens"] == str(estimate * 2 + estimate // 2)
    assert int(r.headers["x-ratelimit-remaining-tokens"]) == estimate + estimate // 2
    r = post(client, key, body)  # echo answers with as many tokens again: the real usage is now counted
    assert r.status_code == 429 and int(r.headers["x-ratelimit-remaining-tokens"]) < estimate
    assert "tokens per minute" in r.get_json()["error"]["message"]


def test_real_usage_replaces_the_estimate(make_app):
    reply = Reply(body=completion_body(prompt_tokens=7, completion_tokens=500))
    with FakeOpenAI(reply) as fake:
        app = make_app(provider_keys={"openai": "sk"}, base_urls={"openai": fake.url})
        client = app.test_client()
        key_id, key = create_key(client, tpm_limit=1000)
        assert post(client, key, chat(model="gpt-4o-mini")).status_code == 200
        assert db_of(app).usage.flush()  # the usage row is written just after the answer (usage.py)
        window = limits.current_window(db_of(app), key_id)
        assert window.tokens == 507  # the upstream's own count, not the estimate
        assert post(client, key, chat(model="gpt-4o-mini")).status_code == 200
        r = post(client, key, chat(model="gpt-4o-mini"))
        assert r.status_code == 429 and r.headers["x-ratelimit-remaining-tokens"] == "0"


def test_request_larger_than_the_token_limit_is_refused(client):
    _, key = create_key(client, tpm_limit=5)
    r = post(client, key, chat("a long prompt " * 20))
    assert r.status_code == 429 and "larger than the key's limit" in r.get_json()["error"]["message"]


def test_zero_means_no_requests(client):
    _, key = create_key(client, rpm_limit=0)
    assert post(client, key).status_code == 429


def test_headers_only_for_keys_with_limits(client):
    _, unlimited = create_key(client)
    for key in (unlimited, CLIENT_KEY):
        r = post(client, key)
        assert r.status_code == 200 and not [h for h in r.headers.keys() if h.lower().startswith("x-ratelimit")]
    _, rpm_only = create_key(client, rpm_limit=10)
    r = post(client, rpm_only)
    assert r.headers["x-ratelimit-remaining-requests"] == "9" and "x-ratelimit-limit-tokens" not in r.headers


def test_stream_and_error_responses_carry_the_headers(make_app):
    with FakeOpenAI(Reply(status=500, body={"error": {"message": "boom"}})) as fake:
        client = make_app(provider_keys={"openai": "sk"}, base_urls={"openai": fake.url}).test_client()
        _, key = create_key(client, rpm_limit=10, tpm_limit=10_000)
        r = post(client, key, chat(stream=True))
        assert r.status_code == 200 and r.mimetype == "text/event-stream"
        assert r.headers["x-ratelimit-remaining-requests"] == "9" and "x-ratelimit-remaining-tokens" in r.headers
        r = post(client, key, chat(model="gpt-4o-mini"))  # admitted, then the upstream fails
        assert r.status_code == 502 and r.headers["x-ratelimit-remaining-requests"] == "8"


def test_streamed_usage_settles_the_estimate(client, app):
    key_id, key = create_key(client, tpm_limit=10_000)
    r = post(client, key, chat("stream me", stream=True))
    assert r.status_code == 200 and r.data.endswith(b"data: [DONE]\n\n")
    assert db_of(app).usage.flush()
    window = limits.current_window(db_of(app), key_id)
    used = db_of(app).query_one("SELECT SUM(prompt_tokens + completion_tokens) AS t FROM usage WHERE key_id = ?",
                                (key_id,))["t"]
    assert window.tokens == used


def test_revoked_or_budget_exhausted_keys_are_checked_under_the_lock(client, app):
    key_id, key = create_key(client, rpm_limit=10, max_budget=1)
    db_of(app).execute("UPDATE api_keys SET spend_nusd = ? WHERE id = ?", (1_000_000_000, key_id))
    r = post(client, key)
    assert r.status_code == 402 and r.get_json()["error"]["type"] == "budget_exceeded"


def test_old_events_are_pruned(app, client, monkeypatch):
    key_id, key = create_key(client, rpm_limit=100)
    for _ in range(3):
        post(client, key)
    age_events(app, key_id, 120)
    monkeypatch.setattr(limits, "PRUNE_CLOCK", limits.PruneClock())  # due at once
    post(client, key)
    assert db_of(app).usage.flush()
    assert db_of(app).query_one("SELECT COUNT(*) AS n FROM request_buckets")["n"] == 1  # this second's
    assert db_of(app).query_one("SELECT COUNT(*) AS n FROM token_buckets")["n"] == 1
    assert db_of(app).query_one("SELECT COUNT(*) AS n FROM rate_events")["n"] == 0  # settled by usage rows
    assert limits.prune_events(db_of(app), time.time() + 62) == 2


def test_a_busy_minute_is_a_few_bucket_rows(client, app):
    key_id, key = create_key(client, rpm_limit=1000, tpm_limit=10**9)
    for _ in range(20):
        assert post(client, key).status_code == 200
    buckets = db_of(app).query_one("SELECT COUNT(*) AS n, SUM(requests) AS r FROM request_buckets WHERE key_id = ?",
                                   (key_id,))
    assert buckets["r"] == 20 and buckets["n"] <= 3
    assert limits.current_window(db_of(app), key_id).requests == 20


@pytest.mark.parametrize("rpm", [1, 5])
def test_limits_are_per_key(client, rpm):
    _, first = create_key(client, rpm_limit=rpm)
    _, second = create_key(client, rpm_limit=rpm)
    assert [post(client, first).status_code for _ in range(rpm + 1)][-1] == 429
    assert post(client, second).status_code == 200


@pytest.mark.parametrize("path, body", [
    ("/api/query", {"query": "Hi", "model": "echo"}),
    ("/llm/chat", {"engine": "openai", "model": "gpt-4o-mini", "prompt": "Hi", "openaiKey": "sk-user"}),
])
def test_every_spending_endpoint_enforces_limits_and_budgets(make_app, path, body):
    # OpenAI is "reached" on a closed local port: admitted calls fail fast, nothing leaves the machine
    client = make_app(base_urls={"openai": "http://127.0.0.1:9/v1"}).test_client()
    _, limited = create_key(client, rpm_limit=1)
    _, broke = create_key(client, max_budget=0)
    assert client.post(path, json=body, headers=auth(broke)).status_code == 402
    assert client.post(path, json=body, headers=auth(limited)).status_code in (200, 502)  # admitted
    refused = client.post(path, json=body, headers=auth(limited))
    assert refused.status_code == 429 and refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_every_client_response_of_a_limited_key_carries_the_rate_headers(make_app):
    client = make_app().test_client()
    _, key = create_key(client, rpm_limit=5, tpm_limit=1000)
    client.post("/v1/chat/completions", json=chat(), headers=auth(key))
    for r in (client.get("/v1/models", headers=auth(key)), client.get("/api/me", headers=auth(key)),
              client.post("/v1/chat/completions", json={"model": "echo"}, headers=auth(key))):  # a 400
        assert r.headers["x-ratelimit-limit-requests"] == "5"
        assert r.headers["x-ratelimit-remaining-requests"] == "4"  # only the admitted call counts
        assert r.headers["x-ratelimit-limit-tokens"] == "1000"
    _, unlimited = create_key(client)
    assert "x-ratelimit-limit-requests" not in client.get("/v1/models", headers=auth(unlimited)).headers

"""Limits and costs under concurrency, through real gunicorn workers and instances sharing one database."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from adapters import estimate_tokens
from db import cost_nusd
from keys_support import ADMIN, ENCRYPTION_KEY_HEX, chat, create_key, price_echo
from support import ADMIN_KEY, Gunicorn, auth, eventually

# Prices with fractional nano-dollars per token, so any rounding slip would show in the totals.
INPUT_PER_1K, OUTPUT_PER_1K = 0.0001234567, 0.0007654321


def proxy_env(database_url: str) -> dict:
    return {"DATABASE_URL": database_url, "ADMIN_API_KEY": ADMIN_KEY, "ENCRYPTION_KEY": ENCRYPTION_KEY_HEX}


def fire(urls: list[str], key: str, bodies: list[dict]) -> list[requests.Response]:
    """POST every body at once (50 in flight), round-robin over the proxies' URLs."""
    def one(i: int) -> requests.Response:
        return requests.post(urls[i % len(urls)] + "/v1/chat/completions", json=bodies[i], headers=auth(key),
                             timeout=60)
    with ThreadPoolExecutor(max_workers=50) as pool:
        return list(pool.map(one, range(len(bodies))))


def test_rpm_limit_holds_across_two_gunicorn_workers(make_app, database_url):
    _, key = create_key(make_app().test_client(), rpm_limit=10)
    with Gunicorn(proxy_env(database_url), workers=2, threads=32) as proxy:
        statuses = sorted(r.status_code for r in fire([proxy.url], key, [chat()] * 50))
    assert statuses == [200] * 10 + [429] * 40


def test_rpm_limit_holds_across_two_instances_on_postgresql(make_app, database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("two instances share a PostgreSQL database (set TEST_DATABASE_URL)")
    _, key = create_key(make_app().test_client(), rpm_limit=10)
    with Gunicorn(proxy_env(database_url), workers=2, threads=32) as one, \
            Gunicorn(proxy_env(database_url), workers=2, threads=32) as two:
        statuses = sorted(r.status_code for r in fire([one.url, two.url], key, [chat()] * 50))
    assert statuses == [200] * 10 + [429] * 40


def expected_usage(body: dict) -> tuple[int, int]:
    """What the echo model reports: the prompt's estimate, and the estimate of the echoed text."""
    return estimate_tokens(body["messages"]), estimate_tokens(body["messages"][-1]["content"])


def streamed_usage(response: requests.Response) -> dict:
    """The usage chunk of an SSE body asked with include_usage."""
    for block in response.text.split("\n\n"):
        if block.startswith("data: {"):
            chunk = json.loads(block[len("data: "):])
            if chunk.get("usage"):
                return chunk["usage"]
    raise AssertionError("no usage chunk")


def test_200_concurrent_requests_are_costed_exactly(make_app, database_url):
    app = make_app()
    client = app.test_client()
    price_echo(client, INPUT_PER_1K, OUTPUT_PER_1K)
    key_id, key = create_key(client, rpm_limit=10_000, tpm_limit=10_000_000)
    bodies = [chat(f"request {i} " + "word " * (i % 37)) for i in range(200)]
    for body in bodies[::4]:  # a quarter of them streamed: costed when the stream ends
        body.update(stream=True, stream_options={"include_usage": True})
    with Gunicorn(proxy_env(database_url), workers=2, threads=32) as proxy:
        responses = fire([proxy.url], key, bodies)
    assert [r.status_code for r in responses] == [200] * 200

    expected = 0
    for body, response in zip(bodies, responses, strict=True):
        usage = streamed_usage(response) if body.get("stream") else response.json()["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == expected_usage(body)
        expected += cost_nusd(*expected_usage(body), INPUT_PER_1K, OUTPUT_PER_1K)
    db = app.extensions["llm_proxy"].db
    count = "SELECT COUNT(*) AS n, SUM(cost_nusd) AS total FROM usage WHERE key_id = ?"
    rows = eventually(lambda: (row := db.query_one(count, (key_id,)))["n"] == 200 and row)
    spend = client.get(f"/api/keys/{key_id}", headers=ADMIN).get_json()["spend_nusd"]
    assert spend == int(rows["total"]) == expected

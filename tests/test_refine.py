"""Multi-call refinement (x-llm-num-calls): N upstream calls, each reviewing the last answer; usage summed."""
from __future__ import annotations

import json

import pytest
import requests

from db import Database
from refine import REVIEW_PROMPT
from support import CLIENT_KEY, FakeOpenAI, Gunicorn, Reply, auth, completion_body, eventually, stream_events, validate

QUESTION = [{"role": "user", "content": "Name a prime number."}]
DRAFTS = ["Draft one.", "Draft two.", "Final answer."]


@pytest.fixture
def upstream():
    with FakeOpenAI() as fake:
        fake.script = [Reply(body=completion_body(text)) for text in DRAFTS]
        yield fake


@pytest.fixture
def proxy(upstream, database_url):
    env = {"DATABASE_URL": database_url, "API_KEY": CLIENT_KEY, "OPENAI_API_KEY": "sk-upstream",
           "OPENAI_BASE_URL": upstream.url, "MAX_NUM_CALLS": "3", "INITIAL_BACKOFF": "1", "REQUEST_TIMEOUT": "5"}
    with Gunicorn(env) as server:
        yield server


def post(proxy, body, num_calls, **kw):
    return requests.post(proxy.url + "/v1/chat/completions", json=body, timeout=20,
                         headers={**auth(), "x-llm-num-calls": str(num_calls)}, **kw)


def test_each_call_reviews_the_previous_answer(proxy, upstream, database_url):
    r = post(proxy, {"model": "gpt-4o-mini", "messages": QUESTION}, 3)
    assert r.status_code == 200, r.text
    body = r.json()
    validate(body, "CreateChatCompletionResponse")
    assert body["choices"][0]["message"]["content"] == "Final answer."
    assert [p["json"]["messages"] for p in upstream.posts] == [
        QUESTION,
        QUESTION + [{"role": "assistant", "content": "Draft one."}, {"role": "user", "content": REVIEW_PROMPT}],
        QUESTION + [{"role": "assistant", "content": "Draft one."}, {"role": "user", "content": REVIEW_PROMPT},
                    {"role": "assistant", "content": "Draft two."}, {"role": "user", "content": REVIEW_PROMPT}],
    ]
    assert body["usage"] == {"prompt_tokens": 30, "completion_tokens": 15, "total_tokens": 45}
    assert r.headers["x-llm-attempts"] == "3"
    assert r.headers["x-llm-cost"] == "0.0000135"  # three calls at 10 x 0.00015/1k + 5 x 0.0006/1k
    db = Database(database_url)
    rows = eventually(lambda: len(found := db.query("SELECT cost_nusd, status FROM usage WHERE request_id = ?",
                                                    (r.headers["X-Request-ID"],))) == 3 and found)
    db.close()
    assert [(row["cost_nusd"], row["status"]) for row in rows] == [(4500, "ok")] * 3


def test_only_the_last_call_streams(proxy, upstream):
    upstream.script = [Reply(body=completion_body("Draft one.")),
                       Reply(stream=stream_events(["Better", " answer."], prompt_tokens=20))]
    r = post(proxy, {"model": "gpt-4o-mini", "messages": QUESTION, "stream": True,
                     "stream_options": {"include_usage": True}}, 2, stream=True)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "Better answer."
    assert chunks[-1]["usage"] == {"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37}
    assert [bool(p["json"].get("stream")) for p in upstream.posts] == [False, True]
    assert upstream.posts[1]["json"]["messages"][-1] == {"role": "user", "content": REVIEW_PROMPT}


@pytest.mark.parametrize("value", ["0", "4", "-1", "two", "2.5", "", "1e1"])
def test_out_of_range_or_not_an_integer_is_400(make_app, value):
    client = make_app(max_num_calls=3).test_client()
    r = client.post("/v1/chat/completions", json={"model": "echo", "messages": QUESTION},
                    headers={**auth(), "x-llm-num-calls": value})
    assert r.status_code == 400
    err = r.get_json()["error"]
    assert err["type"] == "validation_error" and err["param"] == "x-llm-num-calls"


def test_echo_refinement_costs_every_call(app):
    client = app.test_client()
    r = client.post("/v1/chat/completions", json={"model": "echo", "messages": QUESTION},
                    headers={**auth(), "x-llm-num-calls": "2", "X-Request-ID": "refined"})
    assert r.status_code == 200
    # echo answers the last user message: the review prompt itself
    assert r.get_json()["choices"][0]["message"]["content"] == REVIEW_PROMPT
    assert app.extensions["llm_proxy"].db.usage.flush()
    rows = app.extensions["llm_proxy"].db.query("SELECT status FROM usage WHERE request_id = 'refined'")
    assert len(rows) == 2


def test_a_tool_call_ends_the_refinement(make_app):
    call = [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]
    with FakeOpenAI(Reply(body=completion_body(tool_calls=call))) as fake:
        client = make_app(provider_keys={"openai": "sk"}, base_urls={"openai": fake.url}).test_client()
        r = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": QUESTION},
                        headers={**auth(), "x-llm-num-calls": "3"})
        assert r.status_code == 200
        assert r.get_json()["choices"][0]["message"]["tool_calls"][0]["id"] == "call_1"
        assert len(fake.posts) == 1

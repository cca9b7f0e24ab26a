"""Async requests (SPEC section 7): submit, poll, webhooks, ownership, expiry, and the job store's claims."""
from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import jobs
from auth import hash_key
from support import ADMIN_KEY, CLIENT_KEY, FakeOpenAI, Reply, auth, eventually, validate

HELLO = {"model": "echo", "messages": [{"role": "user", "content": "Hello async"}]}
ASYNC = {"Prefer": "respond-async"}
SECRET = "whsec-test-secret"
FAST_JOBS = {"start_workers": True, "job_lease": 1.0, "job_poll_interval": 0.05, "webhook_backoff": 0.05,
             "webhook_secret": SECRET, "allow_private_urls": True}


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers the scripted statuses in turn, then 200."""

    def __init__(self, statuses: list[int] | None = None):
        self.statuses = list(statuses or [])
        self.calls: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.calls.append({"body": raw, "headers": dict(self.headers), "status": status})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=abc"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def start(make_app):
    """Build apps whose job workers run (fast leases and polls); stop the workers afterwards."""
    started = []

    def build(**overrides):
        app = make_app(**{**FAST_JOBS, **overrides})
        started.append(app)
        return app

    yield build
    for app in started:
        app.extensions["jobs"].stop(grace=2)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def upstream():
    with FakeOpenAI() as fake:
        yield fake


def openai_at(fake: FakeOpenAI) -> dict:
    """Config overrides routing openai models to the fake upstream."""
    return {"provider_keys": {"openai": "sk-upstream"}, "base_urls": {"openai": fake.url}}


def wait_done(client, request_id: str, key: str = CLIENT_KEY, timeout: float = 10.0) -> dict:
    """Poll the status endpoint until the job has completed or failed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = client.get(f"/v1/chat/completions/{request_id}", headers=auth(key))
        assert r.status_code == 200, r.get_json()
        if r.get_json()["status"] in ("completed", "error"):
            return r.get_json()
        time.sleep(0.02)
    raise AssertionError(f"job {request_id} did not finish: {r.get_json()}")


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def create_virtual_key(app, name: str = "team") -> tuple[str, str]:
    """A live virtual key straight in the database: (key id, key)."""
    key, key_id = "sk-" + uuid.uuid4().hex * 2, "key_" + uuid.uuid4().hex[:12]
    app.extensions["llm_proxy"].db.execute(
        "INSERT INTO api_keys (id, name, key_hash, key_prefix, created_at) VALUES (?, ?, ?, ?, ?)",
        (key_id, name, hash_key(key), key[:8], time.time()))
    return key_id, key


def verify(signature: str, body: bytes) -> bool:
    """What a receiver does: recompute the HMAC over the raw body and compare in constant time."""
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


# -- submit and poll ------------------------------------------------------------------------------------

def test_prefer_respond_async_answers_202_and_the_poll_returns_the_completion(start):
    client = start().test_client()
    r = client.post("/v1/chat/completions", json=HELLO, headers={**auth(), **ASYNC, "X-Request-ID": "job-1"})
    assert r.status_code == 202
    assert r.get_json() == {"request_id": "job-1", "status": "pending", "queue_position": 1, "active_requests": 0}
    assert r.headers["Location"] == "/v1/chat/completions/job-1"
    job = wait_done(client, "job-1")
    assert job["status"] == "completed"
    assert job["request"] == HELLO
    validate(job["response"], "CreateChatCompletionResponse")
    assert job["response"]["choices"][0]["message"]["content"] == "Hello async"
    assert job["timestamp"].endswith("Z")
    assert "error" not in job
    r = client.get("/chat/completions/job-1", headers=auth())  # the unversioned alias too
    assert r.status_code == 200 and r.get_json()["status"] == "completed"


def test_queue_position_counts_the_pending_jobs_ahead(make_app):
    client = make_app().test_client()  # no workers: everything stays pending
    positions = [client.post("/v1/chat/completions", json=HELLO, headers={**auth(), **ASYNC}).get_json()
                 ["queue_position"] for _ in range(3)]
    assert positions == [1, 2, 3]
    job_id = client.post("/v1/chat/completions", json=HELLO, headers={**auth(), **ASYNC}).get_json()["request_id"]
    r = client.get(f"/v1/chat/completions/{job_id}", headers=auth())
    assert r.get_json()["status"] == "pending"
    assert "response" not in r.get_json()


def test_async_call_goes_upstream_once_and_is_costed_to_the_submitting_key(start, upstream):
    app = start(**openai_at(upstream))
    client = app.test_client()
    key_id, key = create_virtual_key(app)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    r = client.post("/v1/chat/completions", json=body, headers={**auth(key), **ASYNC})
    assert r.status_code == 202
    job = wait_done(client, r.get_json()["request_id"], key)
    assert job["status"] == "completed"
    validate(job["response"], "CreateChatCompletionResponse")  # stored whole even when stream was asked for
    assert len(upstream.posts) == 1
    assert upstream.posts[0]["json"].get("stream") is not True
    db = app.extensions["llm_proxy"].db
    rows = eventually(lambda: db.query("SELECT key_id, status, cost_nusd FROM usage WHERE request_id = ?",
                                       (job["request_id"],)))
    assert [(row["key_id"], row["status"]) for row in rows] == [(key_id, "ok")]
    assert rows[0]["cost_nusd"] > 0  # 10 prompt + 5 completion tokens at gpt-4o-mini's seeded prices
    assert db.query_one("SELECT spend_nusd FROM api_keys WHERE id = ?", (key_id,))["spend_nusd"] == rows[0]["cost_nusd"]


def test_async_request_keeps_its_refinement_count(start, upstream):
    client = start(**openai_at(upstream)).test_client()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    r = client.post("/v1/chat/completions", json=body, headers={**auth(), **ASYNC, "x-llm-num-calls": "2"})
    job = wait_done(client, r.get_json()["request_id"])
    assert len(upstream.posts) == 2
    assert job["response"]["usage"]["total_tokens"] == 30  # both calls' usage, summed
    assert job["request"] == body


def test_failed_job_reports_message_type_and_attempts(start, upstream):
    upstream.default = Reply(status=503, body={"error": {"message": "overloaded", "type": "server_error"}})
    client = start(**openai_at(upstream)).test_client()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    job_id = client.post("/v1/chat/completions", json=body, headers={**auth(), **ASYNC}).get_json()["request_id"]
    job = wait_done(client, job_id)
    assert job["status"] == "error"
    assert job["error"]["type"] == "upstream_error"
    assert "overloaded" in job["error"]["message"]
    assert job["error"]["attempts"] == 3  # the first try and the test config's 2 retries
    assert "response" not in job


def test_request_errors_are_still_answered_at_once(make_app):
    client = make_app().test_client()
    r = client.post("/v1/chat/completions", json={**HELLO, "model": "nope"}, headers={**auth(), **ASYNC})
    assert r.status_code == 400 and r.get_json()["error"]["type"] == "model_not_found"
    r = client.post("/v1/chat/completions", json={**HELLO, "webhookUrl": "ftp://x"}, headers=auth())
    assert r.status_code == 400 and r.get_json()["error"]["type"] == "validation_error"
    r = client.post("/v1/chat/completions", json=HELLO, headers={**auth(), **ASYNC, "x-llm-apikey": "sk-mine"})
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "x-llm-apikey"
    assert "sk-mine" not in r.get_data(as_text=True)


def test_repeating_a_request_id_returns_the_same_job_only_to_its_owner(make_app):
    app = make_app()
    client = app.test_client()
    headers = {**auth(), **ASYNC, "X-Request-ID": "same-id"}
    assert client.post("/v1/chat/completions", json=HELLO, headers=headers).status_code == 202
    again = client.post("/v1/chat/completions", json=HELLO, headers=headers)  # a client retrying its submit
    assert again.status_code == 202 and again.get_json()["request_id"] == "same-id"
    assert app.extensions["llm_proxy"].db.query_one("SELECT COUNT(*) AS n FROM jobs")["n"] == 1
    other = client.post("/v1/chat/completions", json=HELLO, headers={**headers, **auth(ADMIN_KEY)})
    assert other.status_code == 400 and other.get_json()["error"]["param"] == "X-Request-ID"


# -- who may see a job, and for how long ------------------------------------------------------------------

def test_status_is_visible_only_to_the_key_that_submitted_it(make_app):
    app = make_app()
    client = app.test_client()
    _, key = create_virtual_key(app)
    job_id = client.post("/v1/chat/completions", json=HELLO, headers={**auth(key), **ASYNC}).get_json()["request_id"]
    assert client.get(f"/v1/chat/completions/{job_id}", headers=auth(key)).status_code == 200
    for other in (CLIENT_KEY, ADMIN_KEY):
        r = client.get(f"/v1/chat/completions/{job_id}", headers=auth(other))
        assert r.status_code == 404
        assert r.get_json()["error"]["type"] == "request_not_found"
    r = client.get("/v1/chat/completions/no-such-job", headers=auth(key))
    assert r.status_code == 404 and r.get_json()["error"]["type"] == "request_not_found"
    assert client.get(f"/v1/chat/completions/{job_id}").status_code == 401


def test_finished_jobs_expire_after_job_ttl_and_are_cleaned_up(start):
    app = start(job_ttl=60)
    client = app.test_client()
    done = client.post("/v1/chat/completions", json=HELLO, headers={**auth(), **ASYNC}).get_json()["request_id"]
    wait_done(client, done)
    db = app.extensions["llm_proxy"].db
    db.execute("UPDATE jobs SET updated_at = updated_at - 61 WHERE id = ?", (done,))
    r = client.get(f"/v1/chat/completions/{done}", headers=auth())
    assert r.status_code == 404 and r.get_json()["error"]["type"] == "request_not_found"
    app.extensions["jobs"].stop(grace=1)
    waiting = client.post("/v1/chat/completions", json=HELLO, headers={**auth(), **ASYNC}).get_json()["request_id"]
    db.execute("UPDATE jobs SET created_at = created_at - 3600 WHERE id = ?", (waiting,))
    assert jobs.delete_expired_jobs(db, 60) == 1  # the finished one; a job still waiting to run is kept
    assert [row["id"] for row in db.query("SELECT id FROM jobs")] == [waiting]


# -- webhooks -----------------------------------------------------------------------------------------

def test_webhook_receiver_failing_twice_gets_the_signed_result_once_it_accepts(start):
    hook = Receiver([500, 503])
    try:
        client = start().test_client()
        r = client.post("/v1/chat/completions", json={**HELLO, "webhookUrl": hook.url}, headers=auth())
        assert r.status_code == 202  # a webhookUrl alone makes the request async
        job_id = r.get_json()["request_id"]
        wait_until(lambda: len(hook.calls) >= 3)
        time.sleep(0.3)  # several backoff periods: nothing more may arrive once it was accepted
        assert [c["status"] for c in hook.calls] == [500, 503, 200]
        assert len({c["body"] for c in hook.calls}) == 1  # the same bytes every time
        call = hook.calls[-1]
        assert verify(call["headers"]["X-Webhook-Signature"], call["body"])
        assert call["headers"]["Content-Type"] == "application/json"
        payload = json.loads(call["body"])
        assert set(payload) == {"request_id", "status", "response"}
        assert payload["request_id"] == job_id and payload["status"] == "completed"
        validate(payload["response"], "CreateChatCompletionResponse")
        assert client.get(f"/v1/chat/completions/{job_id}", headers=auth()).get_json()["webhook"] == {
            "status": "delivered", "attempts": 3}
    finally:
        hook.close()


def test_webhook_for_a_failed_job_carries_the_error_and_gives_up_after_the_retries(start, upstream):
    upstream.default = Reply(status=400, body={"error": {"message": "bad thing", "type": "invalid_request_error"}})
    hook = Receiver([500] * 10)
    try:
        client = start(webhook_retries=2, **openai_at(upstream)).test_client()
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "webhookUrl": hook.url}
        job_id = client.post("/v1/chat/completions", json=body, headers=auth()).get_json()["request_id"]
        wait_until(lambda: client.get(f"/v1/chat/completions/{job_id}", headers=auth()).get_json()
                   .get("webhook", {}).get("status") == "failed")
        assert len(hook.calls) == 3  # the first POST and 2 retries
        payload = json.loads(hook.calls[0]["body"])
        assert payload["status"] == "error"
        assert payload["error"]["type"] == "invalid_request_error" and payload["error"]["attempts"] == 1
    finally:
        hook.close()


def test_webhook_without_a_secret_is_sent_unsigned(start, receiver):
    client = start(webhook_secret=None).test_client()
    client.post("/v1/chat/completions", json={**HELLO, "webhookUrl": receiver.url}, headers=auth())
    wait_until(lambda: receiver.calls)
    assert "X-Webhook-Signature" not in receiver.calls[0]["headers"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://localhost/hook", "http://[::1]/x",
                                 "http://10.1.2.3/x", "http://169.254.169.254/latest/meta-data"])
def test_private_and_loopback_webhooks_are_refused(make_app, url):
    app = make_app()
    r = app.test_client().post("/v1/chat/completions", json={**HELLO, "webhookUrl": url}, headers=auth())
    assert r.status_code == 403
    assert r.get_json()["error"]["type"] == "endpoint_not_allowed"
    assert app.extensions["llm_proxy"].db.query_one("SELECT COUNT(*) AS n FROM jobs")["n"] == 0


def test_every_resolved_address_is_checked(monkeypatch):
    answers = {"mixed.example": ["93.184.216.34", "10.0.0.5"], "mapped.example": ["::ffff:127.0.0.1"],
               "public.example": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]}

    def fake_getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    jobs.check_webhook_url("https://public.example/hook")
    for host in ("mixed.example", "mapped.example"):
        with pytest.raises(jobs.APIError) as info:
            jobs.check_webhook_url(f"https://{host}/hook")
        assert info.value.type == "endpoint_not_allowed"


def test_a_webhook_target_that_turns_private_is_refused_at_delivery(start, receiver, monkeypatch):
    app = start(start_workers=False)  # allowed at submit ...
    client = app.test_client()
    job_id = client.post("/v1/chat/completions", json={**HELLO, "webhookUrl": receiver.url},
                         headers={**auth(), **ASYNC}).get_json()["request_id"]
    queue = app.extensions["jobs"]
    monkeypatch.setattr(queue, "config", queue.config.with_overrides(allow_private_urls=False))  # ... not now
    queue.start()
    wait_until(lambda: client.get(f"/v1/chat/completions/{job_id}", headers=auth()).get_json()
               .get("webhook", {}).get("status") == "refused")
    assert receiver.calls == []


# -- the job store: claims, leases, fencing ---------------------------------------------------------------

def submit_pending(app, count: int) -> list[str]:
    client = app.test_client()
    return [client.post("/v1/chat/completions", json=HELLO, headers={**auth(), **ASYNC}).get_json()["request_id"]
            for _ in range(count)]


def test_a_job_whose_lease_ran_out_is_claimed_again_and_the_old_claim_cannot_finish_it(make_app):
    app = make_app()
    db = app.extensions["llm_proxy"].db
    [job_id] = submit_pending(app, 1)
    dead = jobs.claim_job(db, "dead-worker", lease=0.05)
    assert dead["id"] == job_id and dead["attempts"] == 1
    assert jobs.claim_job(db, "other", lease=5) is None  # leased: nobody else may take it
    time.sleep(0.1)
    again = jobs.claim_job(db, "other", lease=5)
    assert again["id"] == job_id and again["attempts"] == 2
    assert not jobs.finish_job(db, dead, "dead-worker", {"late": True}, None)
    assert jobs.finish_job(db, again, "other", {"ok": True}, None)
    assert json.loads(db.query_one("SELECT response FROM jobs WHERE id = ?", (job_id,))["response"]) == {"ok": True}


def test_the_heartbeat_keeps_a_long_job_from_being_taken_over(start, upstream):
    upstream.default = Reply(body=upstream.default.body, delay=1.5)  # longer than the 0.3 s lease
    app = start(job_lease=0.3, **openai_at(upstream))
    client = app.test_client()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "slow"}]}
    job_id = client.post("/v1/chat/completions", json=body, headers={**auth(), **ASYNC}).get_json()["request_id"]
    other = start(job_lease=0.3, **openai_at(upstream))  # a second process on the same database
    assert wait_done(client, job_id)["status"] == "completed"
    assert len(upstream.posts) == 1
    assert other.extensions["jobs"].worker_id != app.extensions["jobs"].worker_id


def test_concurrent_claims_take_each_job_exactly_once(make_app):
    app = make_app()
    db = app.extensions["llm_proxy"].db
    ids = submit_pending(app, 40)
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name):
        while (job := jobs.claim_job(db, name, lease=60)) is not None:
            with lock:
                claimed.append(job["id"])

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)


def test_stopping_hands_unfinished_jobs_back_to_the_queue(make_app):
    app = make_app()
    db = app.extensions["llm_proxy"].db
    [job_id] = submit_pending(app, 1)
    queue = app.extensions["jobs"]
    job = jobs.claim_job(db, queue.worker_id, lease=60)
    queue.stop(grace=0)
    assert db.query_one("SELECT status FROM jobs WHERE id = ?", (job_id,))["status"] == "pending"
    assert not jobs.finish_job(db, job, queue.worker_id, {"late": True}, None)

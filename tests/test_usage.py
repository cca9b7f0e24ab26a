"""The usage writer (usage rows off the critical path) and the short-lived rows of rate-limited keys."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import usage
from keys_support import ADMIN, chat, create_key, price_echo
from support import auth, eventually


def writer_of(app) -> usage.UsageWriter:
    return app.extensions["llm_proxy"].db.usage


def db_of(app):
    return app.extensions["llm_proxy"].db


def test_a_burst_of_calls_shares_commits_and_every_row_and_cost_lands(app, client, monkeypatch):
    price_echo(client, 1.0, 2.0)
    key_id, key = create_key(client)
    db = db_of(app)
    gate, batches = threading.Event(), []
    real = db.record_usage

    def slow_first(rows):  # hold the first write so that the next calls queue up behind it
        batches.append(len(rows))
        gate.wait(5)
        real(rows)
    monkeypatch.setattr(db, "record_usage", slow_first)
    for i in range(20):
        assert client.post("/v1/chat/completions", json=chat(f"call {i}"), headers=auth(key)).status_code == 200
    gate.set()
    assert writer_of(app).flush()
    assert sum(batches) == 20 and len(batches) <= 3  # the calls queued behind the held write share one
    rows = db.query("SELECT cost_nusd FROM usage WHERE key_id = ?", (key_id,))
    spend = db.query_one("SELECT spend_nusd FROM api_keys WHERE id = ?", (key_id,))["spend_nusd"]
    assert len(rows) == 20 and spend == sum(r["cost_nusd"] for r in rows) > 0


def test_calls_a_moment_apart_share_a_commit_and_a_reader_does_not_wait_for_the_linger(app, client, monkeypatch):
    key_id, key = create_key(client)
    db = db_of(app)
    monkeypatch.setattr(usage, "LINGER", 30.0)  # far longer than the test: only a reader ends it
    batches, real = [], db.record_usage
    monkeypatch.setattr(db, "record_usage", lambda rows: (batches.append(len(rows)), real(rows)))
    for _ in range(5):
        assert client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 200
    assert batches == []  # still gathering
    me = client.get("/api/me", headers=auth(key)).get_json()  # a reader: written now, in one batch
    assert me["usage"]["requests"] == 5 and batches == [5]


def test_a_full_queue_makes_callers_wait_for_the_writer(app, client, monkeypatch):
    key_id, key = create_key(client)
    db = db_of(app)
    monkeypatch.setattr(usage, "MAX_QUEUE", 2)
    writing, gate, real = threading.Event(), threading.Event(), db.record_usage
    monkeypatch.setattr(db, "record_usage", lambda rows: (writing.set(), gate.wait(5), real(rows)))
    assert client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 200
    assert writing.wait(5)  # the writer holds the first row
    for _ in range(2):  # two more queued: the queue is full
        assert client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 200
    answered = []
    caller = threading.Thread(target=lambda: answered.append(
        client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code))
    caller.start()
    caller.join(0.5)
    assert answered == []  # waits for room in the queue
    gate.set()
    caller.join(5)
    assert answered == [200] and writer_of(app).flush()
    assert db.query_one("SELECT COUNT(*) AS n FROM usage WHERE key_id = ?", (key_id,))["n"] == 4


def test_reads_of_usage_and_spend_see_the_callers_own_calls(app, client, monkeypatch):
    price_echo(client, 1.0, 1.0)
    key_id, key = create_key(client)
    db = db_of(app)
    real = db.record_usage
    release = threading.Event()
    monkeypatch.setattr(db, "record_usage", lambda rows: (release.wait(0.3), real(rows)))
    assert client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 200
    me = client.get("/api/me", headers=auth(key)).get_json()  # waits for the queued row
    assert me["usage"]["requests"] == 1 and me["spend_nusd"] > 0
    summary = client.get(f"/api/usage?key_id={key_id}", headers=ADMIN).get_json()
    assert summary["total"]["requests"] == 1


def test_closing_writes_what_is_queued(app, client, monkeypatch):
    key_id, key = create_key(client)
    db = db_of(app)
    real, started = db.record_usage, threading.Event()

    def stalled(rows):
        started.set()
        started.wait()
        real(rows)
    monkeypatch.setattr(db, "record_usage", stalled)
    for _ in range(3):
        assert client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 200
    writer_of(app).close()
    assert db.query_one("SELECT COUNT(*) AS n FROM usage WHERE key_id = ?", (key_id,))["n"] == 3
    # after close a call is still recorded, synchronously
    assert client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 200
    assert db.query_one("SELECT COUNT(*) AS n FROM usage WHERE key_id = ?", (key_id,))["n"] == 4


def test_a_revoked_rate_limited_key_is_refused_at_once_although_its_row_is_reused(app, client, monkeypatch):
    key_id, key = create_key(client, rpm_limit=100)
    db = db_of(app)
    lookups = []
    real = db.find_live_key
    monkeypatch.setattr(db, "find_live_key", lambda h: (lookups.append(h), real(h))[1])
    for _ in range(3):
        assert client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 200
    assert len(lookups) == 1  # read once, reused for the next calls
    # revoked behind this process's back (another instance): admission still refuses it at once
    db.execute("UPDATE api_keys SET revoked_at = 1 WHERE id = ?", (key_id,))
    r = client.post("/v1/chat/completions", json=chat(), headers=auth(key))
    assert r.status_code == 401 and r.get_json()["error"]["type"] == "authentication_error"
    # endpoints that do not spend always read the key
    assert client.get("/v1/models", headers=auth(key)).status_code == 401


def test_limit_edits_apply_at_once_in_this_process(client):
    key_id, key = create_key(client, rpm_limit=100)
    assert client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 200
    assert client.patch(f"/api/keys/{key_id}", json={"rpm_limit": 1}, headers=ADMIN).status_code == 200
    r = client.post("/v1/chat/completions", json=chat(), headers=auth(key))
    assert r.status_code == 429 and r.headers["x-ratelimit-limit-requests"] == "1"


def test_an_edit_made_while_a_call_reads_the_key_is_not_undone_by_that_read(client, app, monkeypatch):
    key_id, key = create_key(client, rpm_limit=100)
    db = db_of(app)
    real = db.find_live_key

    def read_then_edit(key_hash):  # the row is read, then an admin lowers the limit before it is cached
        row = real(key_hash)
        monkeypatch.setattr(db, "find_live_key", real)
        assert client.patch(f"/api/keys/{key_id}", json={"rpm_limit": 1}, headers=ADMIN).status_code == 200
        return row

    monkeypatch.setattr(db, "find_live_key", read_then_edit)
    assert client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 200
    r = client.post("/v1/chat/completions", json=chat(), headers=auth(key))  # the old row was not kept
    assert r.status_code == 429 and r.headers["x-ratelimit-limit-requests"] == "1"


def test_keys_without_rate_limits_are_read_every_time(app, client):
    key_id, key = create_key(client, max_budget=1.0)
    assert client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 200
    db_of(app).execute("UPDATE api_keys SET revoked_at = 1 WHERE id = ?", (key_id,))
    assert client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 401


def test_a_process_exiting_normally_writes_its_queued_rows_first(tmp_path):
    """A gunicorn worker stopping (SIGTERM, SIGQUIT) leaves through sys.exit: atexit writes the queue."""
    path = tmp_path / "exit.db"
    script = f"""
import time
from db import Database
db = Database({f"sqlite:///{path}"!r})
db.init_schema()
real = db.record_usage
db.record_usage = lambda rows: (time.sleep(0.2), real(rows))  # a slow database
for i in range(5):
    db.usage.submit([{{"request_id": f"r{{i}}", "model": "echo", "provider": "echo"}}])
raise SystemExit(0)  # with rows still queued
"""
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", script], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                   check=True, timeout=60)
    from db import Database
    db = Database(f"sqlite:///{path}")
    assert db.query_one("SELECT COUNT(*) AS n FROM usage")["n"] == 5
    db.close()


def test_admission_counts_unwritten_calls_without_waiting_for_them(app, client, monkeypatch):
    price_echo(client, 1.0, 1.0)  # "Hello there" and its echo cost a few hundred-thousandths
    key_id, key = create_key(client, max_budget=1.0, tpm_limit=10_000)
    db = db_of(app)
    real, gate = db.record_usage, threading.Event()
    monkeypatch.setattr(db, "record_usage", lambda rows: (gate.wait(10), real(rows)))  # a stalled database
    started = time.monotonic()
    for _ in range(3):  # far from the limits: admitted at once, although none of the rows is written
        assert client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 200
    assert time.monotonic() - started < 3
    cost, tokens = db.usage.unwritten(key_id)
    assert cost > 0 and tokens > 0
    gate.set()
    assert db.usage.flush() and db.usage.unwritten(key_id) == (0, 0)


def test_a_budget_spent_by_unwritten_calls_is_refused_exactly(app, client, monkeypatch):
    price_echo(client, 1000.0, 1000.0)  # one call costs more than the whole budget
    key_id, key = create_key(client, max_budget=0.5, rpm_limit=100)
    db = db_of(app)
    real = db.record_usage
    monkeypatch.setattr(db, "record_usage", lambda rows: (time.sleep(0.2), real(rows)))  # a slow database
    assert client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 200
    r = client.post("/v1/chat/completions", json=chat(), headers=auth(key))
    assert r.status_code == 402 and r.get_json()["error"]["type"] == "budget_exceeded"
    assert db.query_one("SELECT COUNT(*) AS n FROM usage WHERE key_id = ?", (key_id,))["n"] == 1


def test_a_writer_thread_that_fails_is_replaced_by_the_next_call(app, client, monkeypatch):
    db = db_of(app)
    writer = db.usage
    writer.flush()
    real = writer._count
    calls = []

    def broken_once(rows, sign):
        calls.append(sign)
        if len(calls) == 2:  # the first batch's "written" bookkeeping blows up in the thread
            raise RuntimeError("bug")
        real(rows, sign)
    monkeypatch.setattr(writer, "_count", broken_once)
    assert client.post("/v1/chat/completions", json=chat(), headers=auth()).status_code == 200
    eventually(lambda: writer._thread is None, timeout=1)  # the thread logs and ends
    assert client.post("/v1/chat/completions", json=chat(), headers=auth()).status_code == 200
    # both rows written, by two threads
    eventually(lambda: db.query_one("SELECT COUNT(*) AS n FROM usage")["n"] == 2, timeout=1)


def test_one_bad_row_does_not_take_its_batch_with_it(app, client, monkeypatch, caplog):
    db = db_of(app)
    real = db.record_usage

    def picky(rows):  # a row the database refuses (say, a value its column cannot hold)
        if any(r["request_id"] == "bad" for r in rows):
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        real(rows)
    monkeypatch.setattr(db, "record_usage", picky)
    rows = [{"request_id": r, "model": "echo", "provider": "echo"} for r in ("good-1", "bad", "good-2")]
    db.usage.submit(rows)
    assert db.usage.flush()
    monkeypatch.setattr(db, "record_usage", real)
    written = db.query("SELECT request_id FROM usage ORDER BY request_id")
    assert [r["request_id"] for r in written] == ["good-1", "good-2"]
    assert any('"usage_not_recorded"' in r.getMessage() and '"bad"' in r.getMessage() for r in caplog.records)


def test_absurd_or_negative_token_counts_are_clamped_before_costing_and_recording(make_app):
    from gateway import MAX_TOKENS, tokens
    assert tokens({"prompt_tokens": -50}, "prompt_tokens") == 0  # cannot lower a key's spend
    assert tokens({"prompt_tokens": 2**70}, "prompt_tokens") == MAX_TOKENS
    assert tokens({"prompt_tokens": "12"}, "prompt_tokens") == 12 and tokens(None, "prompt_tokens") == 0
    assert tokens({"prompt_tokens": {"x": 1}}, "prompt_tokens") == 0


def test_a_failed_commit_leaves_a_usable_connection(app):
    db = db_of(app)
    with pytest.raises(Exception):  # noqa: B017 - whichever error the database raises for a duplicate key
        with db.transaction() as tx:
            tx.defer("INSERT INTO meta (name, value) VALUES (?, ?)", ("dup", "1"))
            tx.defer("INSERT INTO meta (name, value) VALUES (?, ?)", ("dup", "2"))  # fails at the COMMIT batch
    for _ in range(db.pool_size + 1):  # every pooled connection still answers
        assert db.query_one("SELECT COUNT(*) AS n FROM meta WHERE name = ?", ("dup",))["n"] == 0

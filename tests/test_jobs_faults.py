"""Async jobs under faults, through real gunicorns: a killed worker, a full restart, two instances.

The fake upstream counts calls per job (each job's prompt names it) and the jobs table counts claims
per job (`attempts`, the run number). A job whose worker is killed mid-run is legitimately run again
after its lease runs out; every other job must reach the upstream exactly once.
"""
from __future__ import annotations

import os
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from db import Database
from support import CLIENT_KEY, FakeOpenAI, Gunicorn, Reply, auth, completion_body

FINISHED = ("completed", "error")


@pytest.fixture
def db(database_url):
    database = Database(database_url)
    yield database
    database.close()


def proxy_env(database_url: str, upstream: FakeOpenAI, **extra) -> dict:
    """A gunicorn environment with fast job polling and leases, and no upstream retries (one call per run)."""
    return {"DATABASE_URL": database_url, "API_KEY": CLIENT_KEY, "OPENAI_API_KEY": "sk-upstream",
            "OPENAI_BASE_URL": upstream.url, "MAX_RETRIES": "0", "REQUEST_TIMEOUT": "10",
            "JOB_POLL_INTERVAL": "0.05", "JOB_LEASE": "1.5", **{k: str(v) for k, v in extra.items()}}


def submit(base_url: str, name: str) -> str:
    """Queue one job whose prompt is its name; its request id."""
    r = requests.post(f"{base_url}/v1/chat/completions", timeout=10,
                      headers={**auth(), "Prefer": "respond-async", "X-Request-ID": name},
                      json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": name}]})
    assert r.status_code == 202, r.text
    return r.json()["request_id"]


def upstream_calls(upstream: FakeOpenAI) -> Counter:
    """Upstream calls per job name."""
    return Counter(p["json"]["messages"][-1]["content"] for p in upstream.posts)


def job_rows(db: Database) -> dict[str, dict]:
    return {row["id"]: row for row in db.query("SELECT id, status, attempts, worker FROM jobs")}


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def assert_all_completed(base_url: str, ids: list[str]) -> None:
    """Every job reads as completed through the status endpoint."""
    for job_id in ids:
        r = requests.get(f"{base_url}/v1/chat/completions/{job_id}", headers=auth(), timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "completed", r.text


def test_kill_9_of_the_worker_loses_no_job_and_reruns_only_the_interrupted_ones(database_url, db):
    with FakeOpenAI(Reply(body=completion_body(), delay=0.3)) as upstream, \
            Gunicorn(proxy_env(database_url, upstream, MAX_CONCURRENT=2), workers=1) as server:
        ids = [submit(server.url, f"kill-{i}") for i in range(20)]
        wait_for(lambda: sum(r["status"] == "completed" for r in job_rows(db).values()) >= 3, what="3 jobs done")
        wait_for(lambda: any(r["status"] == "processing" for r in job_rows(db).values()), what="a running job")
        [pid] = server.worker_pids()
        os.kill(pid, signal.SIGKILL)
        # Taken right after the kill: the dead worker's claims cannot change any more.
        interrupted = {i for i, r in job_rows(db).items()
                       if r["status"] == "processing" and r["worker"].split(":")[1] == str(pid)}
        wait_for(lambda: all(r["status"] in FINISHED for r in job_rows(db).values()), what="all 20 jobs")
        assert server.worker_pids() and server.worker_pids() != [pid]  # gunicorn replaced the worker
        assert_all_completed(server.url, ids)
    assert interrupted, "the kill should have interrupted at least one running job"
    calls, rows = upstream_calls(upstream), job_rows(db)
    for job_id in ids:
        if job_id in interrupted:  # cut off mid-run: claimed again once its lease ran out
            assert rows[job_id]["attempts"] == 2 and calls[job_id] in (1, 2), (job_id, rows[job_id], calls[job_id])
        else:
            assert rows[job_id]["attempts"] == 1 and calls[job_id] == 1, (job_id, rows[job_id], calls[job_id])


def test_jobs_pending_at_a_restart_complete_after_it(database_url, db):
    with FakeOpenAI(Reply(body=completion_body(), delay=0.2)) as upstream:
        env = proxy_env(database_url, upstream, MAX_CONCURRENT=1)
        with Gunicorn(env, workers=1) as server:
            ids = [submit(server.url, f"restart-{i}") for i in range(10)]
            wait_for(lambda: any(r["status"] == "completed" for r in job_rows(db).values()), what="a first job")
        left = [i for i, r in job_rows(db).items() if r["status"] not in FINISHED]
        assert left, "the server should have stopped with jobs still queued"
        assert all(job_rows(db)[i]["status"] == "pending" for i in left)  # a graceful stop hands nothing out
        with Gunicorn(env, workers=2) as server:
            wait_for(lambda: all(r["status"] in FINISHED for r in job_rows(db).values()), what="the rest")
            assert_all_completed(server.url, ids)
    assert upstream_calls(upstream) == Counter({i: 1 for i in ids})  # nothing was lost or run twice


def test_two_instances_on_one_database_run_each_of_100_jobs_exactly_once(database_url, db):
    if database_url.startswith("sqlite"):
        pytest.skip("two instances share a PostgreSQL database (set TEST_DATABASE_URL)")
    with FakeOpenAI(Reply(body=completion_body(), delay=0.02)) as upstream:
        env = proxy_env(database_url, upstream, MAX_CONCURRENT=4)
        with Gunicorn(env, workers=2) as one, Gunicorn(env, workers=2) as two:
            with ThreadPoolExecutor(8) as pool:
                ids = list(pool.map(lambda i: submit((one, two)[i % 2].url, f"pair-{i}"), range(100)))
            wait_for(lambda: all(r["status"] in FINISHED for r in job_rows(db).values()), what="100 jobs")
            assert_all_completed(one.url, ids[:50])
            assert_all_completed(two.url, ids[50:])
            pids = {int(r["worker"].split(":")[1]) for r in job_rows(db).values()}
            assert pids & set(one.worker_pids()) and pids & set(two.worker_pids())  # both instances worked
    assert upstream_calls(upstream) == Counter({i: 1 for i in ids})
    assert all(r["attempts"] == 1 for r in job_rows(db).values())

"""Durable async chat requests (SPEC section 7): the job store, this process's workers, and webhooks.

A job is a row of the `jobs` table, so it survives restarts and is shared by every worker and
instance. A worker claims one atomically (a row lock with SKIP LOCKED on PostgreSQL, the write lock
on SQLite) and holds it under a lease that a heartbeat renews while the call runs. If the process
dies the lease runs out and another worker takes the job up again; a worker finishes a job only
while it still holds that claim (its worker id and run number), so a late answer from a lost claim
never overwrites a newer run. Webhooks are delivered by a separate loop from state kept on the row,
so a slow or failing receiver never holds a job worker.
"""
from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from urllib.parse import urlsplit

import requests

import refine
from auth import Caller, caller_from_row
from db import usd
from errors import APIError, AuthenticationError, InvalidRequest, ValidationError
from urlguard import check_public, host_and_port, public_session

log = logging.getLogger("llm_proxy")

MAX_RUNS = 5  # a job whose run was cut off this often (e.g. it crashes its worker) is failed, not rerun forever
SHUTDOWN_GRACE = 5.0  # seconds a stopping process lets running jobs finish before handing them back
CLEANUP_INTERVAL = 60.0  # seconds between deletions of jobs past JOB_TTL (lookups check the TTL themselves)
WEBHOOK_TIMEOUT = (5.0, 10.0)  # connect, read
WEBHOOK_MAX_BACKOFF = 300.0
PUBLIC_SESSION = public_session()  # webhooks to client-chosen URLs: public peers only
DUE = "(status = 'pending' OR (status = 'processing' AND lease_until < ?))"
WEBHOOK_DUE = "webhook_status = 'pending' AND webhook_next_at <= ?"


def dumps(obj) -> bytes:
    """Compact JSON bytes (the exact bytes a webhook signature covers)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def owner(caller: Caller) -> str:
    """Whose job it is: the virtual key id, or 'static'/'admin' for the server-wide keys."""
    return caller.key_id or caller.kind


def wants_async(headers, body: dict) -> bool:
    """`Prefer: respond-async` (RFC 7240, among other preferences) or a `webhookUrl` in the body."""
    prefs = (headers.get("Prefer") or "").lower().replace(";", ",").split(",")
    return "respond-async" in (p.strip() for p in prefs) or bool(body.get("webhookUrl"))


def sign(secret: str, body: bytes) -> str:
    """The X-Webhook-Signature value: sha256=<hex HMAC-SHA256 of the body with WEBHOOK_SECRET>."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def check_webhook_url(url: str) -> None:
    """403 endpoint_not_allowed unless every address the URL's host resolves to is public.

    Raises OSError when the host does not resolve (now); callers decide whether that is fatal.
    """
    target = host_and_port(url)
    if target is None:
        raise ValidationError([{"path": "webhookUrl", "message": "must be an http(s) URL with a valid port"}])
    check_public(*target, what="webhookUrl", param="webhookUrl")


def timestamp(epoch: float) -> str:
    """ISO 8601 UTC with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


# -- the job store ------------------------------------------------------------------------------------

def submit_job(db, job_id: str, job_owner: str, body: dict, num_calls: int = 1) -> dict:
    """Store a pending job (a repeated id from the same owner returns the existing job) and its queue place."""
    now = time.time()
    request = dumps({"body": body, "num_calls": num_calls}).decode("utf-8")
    with db.transaction() as tx:
        tx.execute("INSERT INTO jobs (id, key_id, status, request, webhook_url, created_at, updated_at) "
                   "VALUES (?, ?, 'pending', ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                   (job_id, job_owner, request, body.get("webhookUrl"), now, now))
        row = tx.query_one("SELECT key_id, status, created_at FROM jobs WHERE id = ?", (job_id,))
        if row["key_id"] != job_owner:
            raise InvalidRequest("This X-Request-ID is already in use; send another one.", param="X-Request-ID")
        ahead = tx.query_one("SELECT COUNT(*) AS n FROM jobs WHERE status = 'pending' AND created_at <= ?",
                             (row["created_at"],))["n"] if row["status"] == "pending" else 0
        active = tx.query_one("SELECT COUNT(*) AS n FROM jobs WHERE status = 'processing'")["n"]
    return {"request_id": job_id, "status": row["status"], "queue_position": int(ahead),
            "active_requests": int(active)}


def claim_job(db, worker: str, lease: float) -> dict | None:
    """Atomically take the oldest pending job (or one whose lease ran out) for this worker, or None."""
    now = time.time()
    if db.query_one(f"SELECT id FROM jobs WHERE {DUE} LIMIT 1", (now,)) is None:
        return None  # idle polls stay read-only, so they never queue for SQLite's write lock
    with db.transaction(immediate=True) as tx:
        lock = " FOR UPDATE SKIP LOCKED" if tx.is_pg else ""  # SQLite: BEGIN IMMEDIATE already serialises
        job = tx.query_one(f"SELECT id, key_id, request, attempts FROM jobs WHERE {DUE} "
                           f"ORDER BY created_at, id LIMIT 1{lock}", (now,))
        if job is None:
            return None
        tx.execute("UPDATE jobs SET status = 'processing', worker = ?, lease_until = ?, attempts = attempts + 1, "
                   "updated_at = ? WHERE id = ?", (worker, now + lease, now, job["id"]))
    job["attempts"] += 1  # the run number: with the worker id, it identifies this claim
    return job


def renew_leases(db, worker: str, lease: float) -> None:
    """Extend the lease of every job this worker is running (the heartbeat)."""
    db.execute("UPDATE jobs SET lease_until = ? WHERE worker = ? AND status = 'processing'",
               (time.time() + lease, worker))


def finish_job(db, job: dict, worker: str, response: dict | None, error: dict | None) -> bool:
    """Store the answer or error if this claim still holds; queue the webhook. False if the claim was lost."""
    now = time.time()
    return db.execute(
        "UPDATE jobs SET status = ?, response = ?, error = ?, lease_until = NULL, updated_at = ?, "
        "webhook_status = CASE WHEN webhook_url IS NULL THEN NULL ELSE 'pending' END, webhook_next_at = ? "
        "WHERE id = ? AND worker = ? AND attempts = ? AND status = 'processing'",
        ("error" if error else "completed", dumps(response).decode("utf-8") if response else None,
         dumps(error).decode("utf-8") if error else None, now, now, job["id"], worker, job["attempts"])) == 1


def release_jobs(db, worker: str) -> int:
    """Hand this worker's running jobs back to the queue (a stopping process), so they need not wait a lease."""
    return db.execute("UPDATE jobs SET status = 'pending', worker = NULL, lease_until = NULL "
                      "WHERE worker = ? AND status = 'processing'", (worker,))


def find_job(db, job_id: str, job_owner: str, ttl: int) -> dict | None:
    """The owner's job, unless it finished more than `ttl` seconds ago."""
    return db.query_one(
        "SELECT id, status, request, response, error, webhook_status, webhook_attempts, updated_at FROM jobs "
        "WHERE id = ? AND key_id = ? AND NOT (status IN ('completed', 'error') AND updated_at < ?)",
        (job_id, job_owner, time.time() - ttl))


def delete_expired_jobs(db, ttl: int) -> int:
    """Delete jobs that finished more than `ttl` seconds ago."""
    return db.execute("DELETE FROM jobs WHERE status IN ('completed', 'error') AND updated_at < ?",
                      (time.time() - ttl,))


def claim_webhook(db, lease: float) -> dict | None:
    """Take one due webhook delivery, pushing its next try past `lease` so no one else sends it meanwhile."""
    now = time.time()
    if db.query_one(f"SELECT id FROM jobs WHERE {WEBHOOK_DUE} LIMIT 1", (now,)) is None:
        return None
    with db.transaction(immediate=True) as tx:
        lock = " FOR UPDATE SKIP LOCKED" if tx.is_pg else ""
        job = tx.query_one(f"SELECT id, status, response, error, webhook_url, webhook_attempts FROM jobs "
                           f"WHERE {WEBHOOK_DUE} ORDER BY webhook_next_at LIMIT 1{lock}", (now,))
        if job is not None:
            tx.execute("UPDATE jobs SET webhook_next_at = ? WHERE id = ?", (now + lease, job["id"]))
    return job


def record_webhook(db, job_id: str, status: str, attempts: int, next_at: float | None) -> None:
    """Store a delivery's outcome: delivered, refused, failed, or pending with the next try's time."""
    db.execute("UPDATE jobs SET webhook_status = ?, webhook_attempts = ?, webhook_next_at = ? WHERE id = ?",
               (status, attempts, next_at, job_id))


def load_owner(db, job_owner: str) -> Caller:
    """The Caller a job runs as: its virtual key as it is now (limits, models), or the static/admin key."""
    if job_owner in ("static", "admin"):
        return Caller(job_owner, name=job_owner)
    row = db.find_live_key_by_id(job_owner)
    if row is None:
        raise AuthenticationError("The key that submitted this request has been revoked.")
    return caller_from_row(row)


def describe(job: dict) -> dict:
    """The status body of GET /v1/chat/completions/<request_id>."""
    out = {"request_id": job["id"], "status": job["status"], "request": json.loads(job["request"])["body"]}
    if job["response"]:
        out["response"] = json.loads(job["response"])
    if job["error"]:
        out["error"] = json.loads(job["error"])
    if job["webhook_status"]:
        out["webhook"] = {"status": job["webhook_status"], "attempts": job["webhook_attempts"]}
    out["timestamp"] = timestamp(job["updated_at"])
    return out


# -- this process's workers ---------------------------------------------------------------------------

class JobQueue:
    """Submits and looks up jobs, and runs this process's job workers, lease heartbeat and webhook loop."""

    def __init__(self, config, db, gateway):
        self.config, self.db, self.gateway = config, db, gateway
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stopping = threading.Event()
        self._wake = threading.Condition()
        self._webhook_wake = threading.Event()
        self._running: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._cleaned_at = float("-inf")

    def submit(self, job_id: str, caller: Caller, body: dict, num_calls: int = 1,
               request_key: str | None = None) -> dict:
        """Queue a validated, routable chat request (with its x-llm-num-calls); the 202 body."""
        if request_key:  # a per-request provider key would have to be stored to run later; we never store it
            raise InvalidRequest("x-llm-apikey cannot be used with an async request; store the key with "
                                 "PUT /api/keys/<id>/provider-keys instead.", param="x-llm-apikey")
        url = body.get("webhookUrl")
        if url and not self.config.allow_private_urls:
            try:
                check_webhook_url(url)
            except OSError:
                pass  # DNS may be down for a moment; the address is checked again before each delivery
        accepted = submit_job(self.db, job_id, owner(caller), body, num_calls)
        with self._wake:
            self._wake.notify()
        return accepted

    def status(self, job_id: str, caller: Caller) -> dict:
        """The caller's job as the status endpoint shows it; 404 request_not_found otherwise."""
        job = find_job(self.db, job_id, owner(caller), self.config.job_ttl)
        if job is None:
            raise APIError(f"No async request with id '{job_id}'.", status=404, type="request_not_found")
        return describe(job)

    # -- threads ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start MAX_CONCURRENT daemon workers, the lease heartbeat and the webhook/cleanup loop."""
        loops = [self._work] * self.config.max_concurrent + [self._heartbeat, self._webhooks]
        for i, loop in enumerate(loops):
            thread = threading.Thread(target=self._forever, args=(loop,), name=f"jobs-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        atexit.register(self.stop)

    def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop claiming, let running jobs finish for up to `grace` seconds, hand the rest back."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        atexit.unregister(self.stop)
        with self._wake:
            self._wake.notify_all()
        self._webhook_wake.set()
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        try:
            released = release_jobs(self.db, self.worker_id)
        except APIError as exc:
            log.warning(json.dumps({"event": "job_release_failed", "error": exc.message}))
            return
        if released:
            log.info(json.dumps({"event": "jobs_released", "count": released}))

    def _forever(self, step) -> None:
        """Run one loop step until stopped; an error is logged and the loop goes on after a pause.

        This is the background threads' last resort (like the 500 handler for requests): a dead
        thread would silently shrink the pool.
        """
        while not self._stopping.is_set():
            try:
                step()
            except APIError as exc:  # the database is down: say so once per poll, without a traceback
                log.warning(json.dumps({"event": "job_loop_error", "loop": step.__name__, "error": exc.message}))
                self._stopping.wait(self.config.job_poll_interval)
            except Exception:  # noqa: BLE001 - see docstring
                log.exception(json.dumps({"event": "job_loop_error", "loop": step.__name__}))
                self._stopping.wait(self.config.job_poll_interval)

    def _work(self) -> None:
        """Claim and run one job, or wait for a submit in this process or the next poll."""
        job = claim_job(self.db, self.worker_id, self.config.job_lease)
        if job is None:
            with self._wake:
                self._wake.wait(self.config.job_poll_interval)
            return
        self._running.add(job["id"])
        try:
            self.run(job)
        finally:
            self._running.discard(job["id"])

    def _heartbeat(self) -> None:
        """Renew the leases of the jobs running here, three times per lease."""
        if not self._stopping.wait(self.config.job_lease / 3) and self._running:
            renew_leases(self.db, self.worker_id, self.config.job_lease)

    def _webhooks(self) -> None:
        """Deliver every due webhook, delete expired jobs now and then, then wait for more work."""
        self._webhook_wake.clear()
        if time.monotonic() - self._cleaned_at >= CLEANUP_INTERVAL:
            self._cleaned_at = time.monotonic()
            delete_expired_jobs(self.db, self.config.job_ttl)
        while not self._stopping.is_set() and self.deliver_next():
            pass
        self._webhook_wake.wait(self.config.job_poll_interval)

    # -- running a job ------------------------------------------------------------------------------

    def run(self, job: dict) -> None:
        """Run one claimed job through the gateway and store its answer or error; one log line per run."""
        started = time.perf_counter()
        entry = {"event": "job", "request_id": job["id"], "key_id": job["key_id"], "run": job["attempts"]}
        try:
            response, error = self._call(job, entry)
        except Exception:  # noqa: BLE001 - a bug must fail this job, not leave it to be rerun after every lease
            log.exception(json.dumps({"event": "job_crashed", "request_id": job["id"]}))
            response, error = None, {"message": "Internal error while running the request.",
                                     "type": "internal_error", "attempts": 0}
        if finish_job(self.db, job, self.worker_id, response, error):
            self._webhook_wake.set()
        else:
            entry["lost_claim"] = True  # the lease ran out and the job was taken up again elsewhere
        entry.update(status="error" if error else "completed",
                     latency_ms=round((time.perf_counter() - started) * 1000, 2))
        log.info(json.dumps(entry, separators=(",", ":")))

    def _call(self, job: dict, entry: dict) -> tuple[dict | None, dict | None]:
        """Plan and complete the stored request as its owner (same retries, fallback and usage rows as sync).

        The answer is stored whole, so `stream` is ignored; refinement runs all its calls here.
        """
        if job["attempts"] > MAX_RUNS:
            return None, {"message": f"The request was abandoned after {MAX_RUNS} interrupted runs.",
                          "type": "internal_error", "attempts": 0}
        request = json.loads(job["request"])
        body = request["body"]
        try:
            caller = load_owner(self.db, job["key_id"])
            targets = self.gateway.plan(body["model"], body.get("fallbacks"), caller)
            result = refine.complete(self.gateway, targets, body, request["num_calls"], job["id"], caller)
        except APIError as exc:
            entry["error_type"] = exc.type
            return None, {"message": exc.message, "type": exc.type, "attempts": getattr(exc, "attempts", 0)}
        entry.update(model=result.route.name, provider=result.route.provider, attempts=result.attempts,
                     tokens=result.completion.get("usage", {}).get("total_tokens"), cost=usd(result.cost_nusd))
        return result.completion, None

    # -- webhooks -----------------------------------------------------------------------------------

    def deliver_next(self) -> bool:
        """Send one due webhook and record the outcome (retry later with backoff); False if none was due."""
        job = claim_webhook(self.db, lease=sum(WEBHOOK_TIMEOUT) + 5)
        if job is None:
            return False
        attempts = job["webhook_attempts"] + 1
        outcome = self._post_webhook(job)
        if outcome in ("delivered", "refused"):
            record_webhook(self.db, job["id"], outcome, attempts, None)
        elif attempts > self.config.webhook_retries:
            record_webhook(self.db, job["id"], "failed", attempts, None)
        else:
            delay = min(WEBHOOK_MAX_BACKOFF, self.config.webhook_backoff * 2 ** (attempts - 1))
            record_webhook(self.db, job["id"], "pending", attempts, time.time() + delay)
        log.info(json.dumps({"event": "webhook", "request_id": job["id"], "attempt": attempts, "outcome": outcome,
                             "host": urlsplit(job["webhook_url"]).hostname}))  # never the URL: it may hold a token
        return True

    def _post_webhook(self, job: dict) -> str:
        """POST {request_id, status, response | error}, signed when WEBHOOK_SECRET is set; the outcome."""
        url = job["webhook_url"]
        if not self.config.allow_private_urls:
            try:
                check_webhook_url(url)  # again at delivery: DNS may now point somewhere else
            except APIError:
                return "refused"
            except OSError:
                return "unresolvable"
        payload = {"request_id": job["id"], "status": job["status"]}
        if job["status"] == "completed":
            payload["response"] = json.loads(job["response"])
        else:
            payload["error"] = json.loads(job["error"])
        body = dumps(payload)
        headers = {"Content-Type": "application/json", "User-Agent": "llm-proxy-webhook"}
        if self.config.webhook_secret:
            headers["X-Webhook-Signature"] = sign(self.config.webhook_secret, body)
        try:
            session = requests if self.config.allow_private_urls else PUBLIC_SESSION
            with session.post(url, data=body, headers=headers, timeout=WEBHOOK_TIMEOUT,
                              allow_redirects=False) as resp:  # a redirect could lead to a private address
                return "delivered" if 200 <= resp.status_code < 300 else f"http_{resp.status_code}"
        except requests.RequestException as exc:
            return type(exc).__name__

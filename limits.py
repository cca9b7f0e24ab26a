"""Per-key admission: budgets and sliding-minute request/token limits, shared through the database (SPEC 5).

Every gunicorn worker and every proxy instance sees the same counters because they live in the
database: one `rate_events` row per admitted request (its prompt estimate in `tokens`), counted over
the last WINDOW seconds under a per-key lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: SELECT ... FOR
UPDATE on the key's row). Real token counts come from the `usage` rows the gateway writes after each
call; an event's estimate stops counting as soon as its request has a usage row, so the correction
costs no extra write.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from decimal import Decimal

from adapters import estimate_tokens
from auth import Caller
from db import NANO, usd
from errors import AuthenticationError, BudgetExceeded, RateLimited

WINDOW = 60.0        # seconds: the sliding minute
PRUNE_EVERY = 60.0   # seconds between deletions of expired rate events, per process

# One statement, five indexed lookups: requests and tokens in the window, and when the oldest expires.
# The settled-estimate probe matches on request_id alone so that it always uses the usage_request
# index (with key_id too, PostgreSQL may pick usage_key_time and scan the key's history per event).
WINDOW_SQL = (
    "SELECT (SELECT COUNT(*) FROM rate_events WHERE key_id = ? AND created_at > ?) AS requests, "
    "(SELECT MIN(created_at) FROM rate_events WHERE key_id = ? AND created_at > ?) AS oldest_request, "
    "(SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM usage "
    " WHERE key_id = ? AND created_at > ?) AS used_tokens, "
    "(SELECT MIN(created_at) FROM usage WHERE key_id = ? AND created_at > ? "
    " AND prompt_tokens + completion_tokens > 0) AS oldest_usage, "
    "(SELECT COALESCE(SUM(e.tokens), 0) FROM rate_events e WHERE e.key_id = ? AND e.created_at > ? "
    " AND NOT EXISTS (SELECT 1 FROM usage u WHERE u.request_id = e.request_id)) "
    "AS pending_tokens")


@dataclass
class Window:
    """What a key has used in the sliding minute."""

    requests: int
    tokens: int
    oldest: float | None  # when the oldest counted request or token use happened

    def retry_after(self, now: float) -> int:
        """Whole seconds until the oldest entry leaves the window (at least 1)."""
        return max(1, math.ceil((self.oldest or now) + WINDOW - now))


class PruneClock:
    """Lets one thread per process delete expired rate events at most every PRUNE_EVERY seconds."""

    def __init__(self):
        self._lock = threading.Lock()
        self._last = 0.0

    def due(self, now: float) -> bool:
        with self._lock:
            if now - self._last < PRUNE_EVERY:
                return False
            self._last = now
            return True


PRUNE_CLOCK = PruneClock()


def admit(db, caller: Caller | None, body: dict, request_id: str) -> dict[str, str]:
    """Admit one chat request for this caller or raise 402/429; returns the x-ratelimit-* headers."""
    if caller is None or caller.key_id is None:
        return {}
    if caller.rpm_limit is None and caller.tpm_limit is None:
        check_budget(caller.max_budget, caller.spend_nusd)  # spend as read at authentication: no round trip
        return {}
    estimate = estimate_tokens(body.get("messages"))
    now = time.time()
    with db.transaction(immediate=True) as tx:
        spend = lock_key(tx, caller.key_id)
        check_budget(caller.max_budget, spend)
        used = window_usage(tx, caller.key_id, now)
        check_limits(caller, used, estimate, now)
        tx.execute("INSERT INTO rate_events (key_id, request_id, created_at, tokens) VALUES (?, ?, ?, ?)",
                   (caller.key_id, request_id, now, estimate))
    if PRUNE_CLOCK.due(now):
        prune_events(db, now)
    return rate_headers(caller, Window(used.requests + 1, used.tokens + estimate, used.oldest))


def lock_key(tx, key_id: str) -> int:
    """Take the key's lock for this transaction and return its current spend; 401 if revoked meanwhile."""
    row = tx.query_one("SELECT spend_nusd FROM api_keys WHERE id = ? AND revoked_at IS NULL"
                       + (" FOR UPDATE" if tx.is_pg else ""), (key_id,))
    if row is None:
        raise AuthenticationError("Invalid API key.")
    return int(row["spend_nusd"] or 0)


def window_usage(tx, key_id: str, now: float) -> Window:
    """Requests and tokens (real usage plus estimates of calls still running) in the last minute."""
    since = now - WINDOW
    row = tx.query_one(WINDOW_SQL, (key_id, since) * 5)
    oldest = [t for t in (row["oldest_request"], row["oldest_usage"]) if t is not None]
    return Window(int(row["requests"]), int(row["used_tokens"]) + int(row["pending_tokens"]),
                  min(oldest) if oldest else None)


def check_budget(max_budget: float | None, spend_nusd: int) -> None:
    """402 budget_exceeded once the key's spend has reached its budget."""
    if max_budget is not None and spend_nusd >= Decimal(repr(float(max_budget))) * NANO:
        raise BudgetExceeded(f"This key has spent ${usd(spend_nusd)} of its ${max_budget:g} budget.")


def check_limits(caller: Caller, used: Window, estimate: int, now: float) -> None:
    """429 rate_limit_exceeded, with Retry-After and the rate-limit headers, when a limit would be passed."""
    message = None
    if caller.rpm_limit is not None and used.requests + 1 > caller.rpm_limit:
        message = f"Rate limit reached: {caller.rpm_limit} requests per minute."
    elif caller.tpm_limit is not None and estimate > caller.tpm_limit:
        message = (f"This request (about {estimate} prompt tokens) is larger than the key's limit of "
                   f"{caller.tpm_limit} tokens per minute.")
    elif caller.tpm_limit is not None and used.tokens + estimate > caller.tpm_limit:
        message = f"Rate limit reached: {caller.tpm_limit} tokens per minute."
    if message:
        headers = rate_headers(caller, used)
        headers["Retry-After"] = str(used.retry_after(now))
        raise RateLimited(message, headers=headers)


def rate_headers(caller: Caller, used: Window) -> dict[str, str]:
    """x-ratelimit-limit/remaining for whichever of the key's limits are set."""
    headers = {}
    if caller.rpm_limit is not None:
        headers["x-ratelimit-limit-requests"] = str(caller.rpm_limit)
        headers["x-ratelimit-remaining-requests"] = str(max(0, caller.rpm_limit - used.requests))
    if caller.tpm_limit is not None:
        headers["x-ratelimit-limit-tokens"] = str(caller.tpm_limit)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, caller.tpm_limit - used.tokens))
    return headers


def current_window(db, key_id: str) -> Window:
    """The key's sliding-minute usage right now, without admitting anything (GET /api/me)."""
    with db.transaction() as tx:
        return window_usage(tx, key_id, time.time())


def prune_events(db, now: float) -> int:
    """Delete rate events that have left the window; returns how many."""
    return db.execute("DELETE FROM rate_events WHERE created_at < ?", (now - WINDOW,))

"""Per-key admission: budgets and sliding-minute request/token limits, shared through the database (SPEC 5).

Every gunicorn worker and every proxy instance sees the same counters because they live in the
database, read and updated under a per-key lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory
lock on the key, held only inside one statement batch, which the usage writer never takes).
`request_buckets` counts the requests admitted per key and second, `token_buckets` the real tokens
used (db.record_usage adds those), so the minute is a sum over at most 61 rows of each however busy
the key is: the window slides in whole seconds. A request's prompt estimate waits in `rate_events`
until its first usage row settles it, so only calls in flight are counted that way.
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

ADMISSION_LOCK = 727275  # first half of PostgreSQL's advisory lock key; the second is the key id's hash
# One statement: the key's spend (NULL once revoked), the buckets of the last minute, and the
# estimates of calls still in flight.
WINDOW_SQL = (
    "SELECT (SELECT spend_nusd FROM api_keys WHERE id = ? AND revoked_at IS NULL) AS spend_nusd, "
    "(SELECT COALESCE(SUM(requests), 0) FROM request_buckets WHERE key_id = ? AND epoch_second > ?) AS requests, "
    "(SELECT MIN(epoch_second) FROM request_buckets WHERE key_id = ? AND epoch_second > ?) AS oldest_request, "
    "(SELECT COALESCE(SUM(tokens), 0) FROM token_buckets WHERE key_id = ? AND epoch_second > ?) AS used_tokens, "
    "(SELECT MIN(epoch_second) FROM token_buckets WHERE key_id = ? AND epoch_second > ? AND tokens > 0) "
    "AS oldest_usage, "
    "(SELECT COALESCE(SUM(tokens), 0) FROM rate_events WHERE key_id = ? AND created_at > ?) AS pending_tokens")
COUNT_REQUEST_SQL = (
    "INSERT INTO request_buckets (key_id, epoch_second, requests) VALUES (?, ?, 1) "
    "ON CONFLICT (key_id, epoch_second) DO UPDATE SET requests = request_buckets.requests + 1")
PENDING_SQL = "INSERT INTO rate_events (key_id, request_id, created_at, tokens) VALUES (?, ?, ?, ?)"
NO_LIMIT = 2 ** 62  # stands for "no limit" in ADMIT_SQL's comparisons
# PostgreSQL, sent as one message (one implicit transaction, one round trip): take the key's lock,
# then, in a statement whose snapshot is taken after the lock, read the window and count the request
# only if it passes the budget (spend < budget; NULL when revoked), rpm and tpm checks that
# refuse_if_over makes in Python. The counters are this minute's, not records: no WAL flush at commit.
ADMIT_SQL = (
    "SET LOCAL synchronous_commit = off; "
    "SELECT pg_advisory_xact_lock(?, hashtext(?)); "
    f"WITH w AS ({WINDOW_SQL}), "
    "admitted AS (SELECT 1 FROM w WHERE spend_nusd < ? AND requests + 1 <= ? "
    "AND ? <= ? - used_tokens - pending_tokens), "
    "counted AS (" + COUNT_REQUEST_SQL.replace("VALUES (?, ?, 1)", "SELECT ?, ?, 1 FROM admitted") + "), "
    "pending AS (" + PENDING_SQL.replace("VALUES (?, ?, ?, ?)", "SELECT ?, ?, ?, ? FROM admitted") + ") "
    "SELECT w.*, EXISTS (SELECT 1 FROM admitted) AS admitted FROM w")


@dataclass
class Window:
    """What a key has used in the sliding minute."""

    requests: int
    tokens: int
    oldest: float | None  # when the oldest counted request or token use happened
    spend_nusd: int | None = None  # the key's spend; None when it has been revoked

    def plus(self, ahead: tuple[int, int]) -> Window:
        """This window with a process's unwritten cost and tokens added (a revoked key stays revoked)."""
        cost, tokens = ahead
        if not cost and not tokens:
            return self
        return Window(self.requests, self.tokens + tokens, self.oldest,
                      None if self.spend_nusd is None else self.spend_nusd + cost)

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
    """Admit one chat request for this caller or raise 402/429; returns the x-ratelimit-* headers.

    The key's calls whose usage rows this process has not written yet (usage.py: some 20 ms after
    each answer) are counted too, at their real cost and tokens on top of what the database says
    (their prompt estimates may then count twice: refusing is checked again, exactly, after writing them).
    """
    if caller is None or caller.key_id is None:
        return {}
    limited = caller.rpm_limit is not None or caller.tpm_limit is not None
    if not limited and caller.max_budget is None:
        return {}
    ahead = db.usage.unwritten(caller.key_id)
    try:
        return _admit(db, caller, body, request_id, limited, ahead)
    except (BudgetExceeded, RateLimited):
        if not any(ahead):
            raise
        if not db.usage.flush():  # near a limit: write this process's rows, then decide on the database
            raise
        return _admit(db, caller, body, request_id, limited, (0, 0), reread_spend=True)


def _admit(db, caller: Caller, body: dict, request_id: str, limited: bool, ahead: tuple[int, int],
           reread_spend: bool = False) -> dict[str, str]:
    if not limited:  # a budget only: the spend read at authentication (no round trip) plus what is unwritten
        spend = caller.spend_nusd
        if reread_spend:
            row = db.query_one("SELECT spend_nusd FROM api_keys WHERE id = ?", (caller.key_id,))
            spend = int(row["spend_nusd"] or 0) if row else spend
        check_budget(caller.max_budget, spend + ahead[0])
        return {}
    estimate = estimate_tokens(body.get("messages"))
    now = time.time()
    admit_once = admit_in_one_trip if db.is_pg else admit_in_transaction
    used = admit_once(db, caller, request_id, estimate, now, ahead)
    if PRUNE_CLOCK.due(now):
        prune_events(db, now)
    return rate_headers(caller, Window(used.requests + 1, used.tokens + estimate, used.oldest))


def admit_in_transaction(db, caller: Caller, request_id: str, estimate: int, now: float,
                         ahead: tuple[int, int] = (0, 0)) -> Window:
    """SQLite: under BEGIN IMMEDIATE (which serialises every writer), check the window, then count the request."""
    with db.transaction(immediate=True) as tx:
        used = window_usage(tx, caller.key_id, now).plus(ahead)
        refuse_if_over(caller, used, estimate, now)
        tx.execute(COUNT_REQUEST_SQL, (caller.key_id, int(now)))
        tx.execute(PENDING_SQL, (caller.key_id, request_id, now, estimate))
    return used


def admit_in_one_trip(db, caller: Caller, request_id: str, estimate: int, now: float,
                      ahead: tuple[int, int] = (0, 0)) -> Window:
    """PostgreSQL: lock, check and count in one round trip (ADMIT_SQL), so the key's lock is held only
    inside the server, never while this thread waits for the GIL; Python then explains a refusal."""
    cost_ahead, tokens_ahead = ahead
    row = db.query_one(ADMIT_SQL, (ADMISSION_LOCK, caller.key_id) + window_params(caller.key_id, now) + (
        NO_LIMIT if caller.max_budget is None else budget_nusd(caller.max_budget) - cost_ahead,
        NO_LIMIT if caller.rpm_limit is None else caller.rpm_limit,
        estimate, NO_LIMIT if caller.tpm_limit is None else caller.tpm_limit - tokens_ahead,
        caller.key_id, int(now), caller.key_id, request_id, now, estimate), prepare="admit_window")
    used = window_from(row).plus(ahead)
    if not row["admitted"]:
        refuse_if_over(caller, used, estimate, now)
        raise RateLimited("Rate limit reached.")  # not reached: the SQL and refuse_if_over agree
    return used


def refuse_if_over(caller: Caller, used: Window, estimate: int, now: float) -> None:
    """401 if the key was revoked meanwhile, 402 over budget, 429 over a limit (with Retry-After)."""
    if used.spend_nusd is None:
        raise AuthenticationError("Invalid API key.")
    check_budget(caller.max_budget, used.spend_nusd)
    check_limits(caller, used, estimate, now)


def window_usage(tx, key_id: str, now: float) -> Window:
    """Requests and tokens (real usage plus estimates of calls still running) in the last minute."""
    return window_from(tx.query_one(WINDOW_SQL, window_params(key_id, now)))


def window_params(key_id: str, now: float) -> tuple:
    """WINDOW_SQL's parameters: the buckets are whole seconds (an integer bound keeps their index
    range usable on PostgreSQL), the estimates' times are exact."""
    since = now - WINDOW
    return (key_id,) + (key_id, math.floor(since)) * 4 + (key_id, since)


def window_from(row: dict) -> Window:
    """A Window from WINDOW_SQL's columns."""
    oldest = [t for t in (row["oldest_request"], row["oldest_usage"]) if t is not None]
    return Window(int(row["requests"]), int(row["used_tokens"]) + int(row["pending_tokens"]),
                  min(oldest) if oldest else None, None if row["spend_nusd"] is None else int(row["spend_nusd"]))


def budget_nusd(max_budget: float | None) -> int | None:
    """The budget in whole nano-dollars (rounded up: a spend reaches it when spend >= this)."""
    return None if max_budget is None else math.ceil(Decimal(repr(float(max_budget))) * NANO)


def check_budget(max_budget: float | None, spend_nusd: int) -> None:
    """402 budget_exceeded once the key's spend has reached its budget."""
    if max_budget is not None and spend_nusd >= budget_nusd(max_budget):
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
    with db.transaction(read_only=True) as tx:
        return window_usage(tx, key_id, time.time())


def prune_events(db, now: float) -> int:
    """Delete buckets and estimates that have left the window; returns how many rows."""
    with db.transaction() as tx:
        return sum(tx.execute(f"DELETE FROM {table} WHERE {column} < ?", (since,)) for table, column, since in (
            ("rate_events", "created_at", now - WINDOW), ("request_buckets", "epoch_second", now - WINDOW - 1),
            ("token_buckets", "epoch_second", now - WINDOW - 1)))

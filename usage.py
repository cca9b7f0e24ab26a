"""The usage writer: every upstream call's usage row and cost, written off the request's critical path.

A handler hands its rows to `UsageWriter.submit` and answers at once; one thread per process writes
whatever has queued up in one transaction (db.record_usage: the rows, each key's spend, its token
counters, settling the prompt estimates). The writer lets rows gather for LINGER (20 ms) before each
batch, so even at a few calls a second many calls share a commit; a call's row is written about
20 ms after its answer, at once when a reader is waiting for it. Nothing is dropped on purpose:

- a failed write is retried with backoff (the rows stay queued) for RETRY_FOR seconds, then the rows
  go to the log as `usage_not_recorded` events, to be reconciled (and, until a write succeeds again,
  later batches are tried once, so a long outage cannot pile rows up in memory);
- `flush()` waits until everything submitted so far is written (readers of usage and spend in this
  process call it first, so they see their own calls; tests use it too), and admission adds a key's
  unwritten cost and tokens (`unwritten`) to what the database says, so its budget and token limits
  count every call this process has made; other processes' rows are a few tens of milliseconds
  behind, as calls still in flight are;
- `close()` (at interpreter exit: a gunicorn worker stopping gracefully) writes the rest;
- a database slower than the calls for long makes callers wait in `submit()` once MAX_QUEUE rows
  are queued (up to FULL_WAIT seconds each), so the queue's memory stays bounded in practice.

What a hard kill of the process (SIGKILL, out of memory) can lose is the rows of the last few tens of
milliseconds — as it would lose the calls still waiting for their provider.
"""
from __future__ import annotations

import atexit
import json
import logging
import threading
import time
import weakref

from errors import ServiceUnavailable

log = logging.getLogger("llm_proxy")
MAX_BATCH = 500       # rows per transaction
IDLE_EXIT = 30.0      # seconds without work before the writer thread ends (submit starts a new one)
RETRY_FOR = 60.0      # seconds a failing batch is retried before its rows are logged instead
FLUSH_TIMEOUT = 5.0   # seconds a reader waits for the queue before reading anyway
MAX_QUEUE = 20_000    # rows queued before submit() makes its caller wait (a database slower than arrivals)
FULL_WAIT = 5.0       # seconds submit() waits for room before queueing anyway
VACUUM_EVERY = 10.0   # seconds between db.vacuum_churn() calls while rows are being written
LINGER = 0.02         # seconds the writer lets rows gather before a batch (unless someone is waiting)

_WRITERS: weakref.WeakSet = weakref.WeakSet()


class UsageWriter:
    """A queue of usage rows and the one thread that writes them, for one database."""

    def __init__(self, db):
        self.db = db
        self._cond = threading.Condition()
        self._queue: list[dict] = []
        self._submitted = 0   # rows ever submitted
        self._done = 0        # rows ever written (or given up on and logged)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._write_lock = threading.Lock()  # one batch at a time: the thread, or close() at exit
        self._failing = False  # the last batch gave up: later ones are tried once until a write succeeds
        self._flushers = 0     # threads waiting in flush(): the writer does not linger for them
        self._unwritten: dict[str, list[int]] = {}  # per virtual key: [rows, cost_nusd, tokens] queued
        _WRITERS.add(self)

    def submit(self, rows: list[dict]) -> None:
        """Queue rows for writing; returns at once (writes synchronously once closed)."""
        if not rows:
            return
        with self._cond:
            if len(self._queue) >= MAX_QUEUE and self._thread is not None:
                # Back-pressure: the database writes slower than calls arrive. The caller waits for
                # room (its answer is delayed, the queue's memory stays bounded), though not forever:
                # rows are never dropped.
                self._cond.wait_for(lambda: len(self._queue) < MAX_QUEUE or self._closed, FULL_WAIT)
            if not self._closed:
                self._queue.extend(rows)
                self._submitted += len(rows)
                self._count(rows, 1)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
                    self._thread.start()
                self._cond.notify_all()
                return
        self._write(rows)  # after close(): nobody is left to write it later

    def unwritten(self, key_id: str) -> tuple[int, int]:
        """(cost in nano-dollars, tokens) of this key's rows still queued here (limits.admit adds them)."""
        entry = self._unwritten.get(key_id)
        return (entry[1], entry[2]) if entry else (0, 0)

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Wait until every row submitted before this call is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._submitted
            self._flushers += 1
            self._cond.notify_all()
            try:
                while self._done < target:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(remaining)
            finally:
                self._flushers -= 1
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking rows into the queue and write what is left (at exit; tests)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.flush(timeout)
        with self._cond:  # the thread may have ended without emptying the queue (it never does, but)
            rest, self._queue = self._queue, []
        self._write(rest)
        with self._cond:
            self._done += len(rest)
            self._count(rest, -1)
            self._cond.notify_all()

    # -- the writer thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # noqa: BLE001 - never expected; the next submit starts a new thread
            log.exception(json.dumps({"event": "usage_writer_failed"}))
            with self._cond:
                self._thread = None

    def _loop(self) -> None:
        idle_since = vacuumed = time.monotonic()
        while True:
            with self._cond:
                while not self._queue:
                    if self._closed or time.monotonic() - idle_since > IDLE_EXIT:
                        self._thread = None
                        return
                    self._cond.wait(1.0)
                # Let the calls of the next few milliseconds join this batch: one commit for many
                # rows costs the worker far less CPU than one each, even at a few calls a second.
                self._cond.wait_for(self._no_lingering, LINGER)
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            self._write(batch)
            with self._cond:
                self._done += len(batch)
                self._count(batch, -1)
                self._cond.notify_all()
            idle_since = time.monotonic()
            if idle_since - vacuumed > VACUUM_EVERY:
                self.db.vacuum_churn()
                vacuumed = time.monotonic()

    def _no_lingering(self) -> bool:
        """A full batch, a reader waiting in flush(), or closing: write now (under self._cond)."""
        return len(self._queue) >= MAX_BATCH or self._flushers > 0 or self._closed

    def _count(self, rows: list[dict], sign: int) -> None:
        """Keep each key's queued rows, cost and tokens (under self._cond)."""
        for row in rows:
            key_id = row.get("key_id")
            if not key_id:
                continue
            entry = self._unwritten.setdefault(key_id, [0, 0, 0])
            entry[0] += sign
            entry[1] += sign * int(row.get("cost_nusd") or 0)
            entry[2] += sign * (int(row.get("prompt_tokens") or 0) + int(row.get("completion_tokens") or 0))
            if entry[0] <= 0:
                del self._unwritten[key_id]

    def _write_one(self, row: dict) -> None:
        """One row on its own (after its batch failed): written, or logged."""
        try:
            self.db.record_usage([row])
        except Exception:  # noqa: BLE001
            log.exception(json.dumps({"event": "usage_write_failed", "rows": 1}))
            log.error(json.dumps({"event": "usage_not_recorded", **row}, default=str))

    def _write(self, rows: list[dict]) -> None:
        """Write one batch, retrying while the database is unavailable; log the rows if it never comes back."""
        if not rows:
            return
        delay, give_up = 0.05, time.monotonic() + RETRY_FOR
        with self._write_lock:
            while True:
                try:
                    self.db.record_usage(rows)
                    self._failing = False
                    return
                except ServiceUnavailable:
                    if self._failing or self._closed or time.monotonic() + delay > give_up:
                        self._failing = True
                        break
                except Exception:  # noqa: BLE001 - one bad row must not take the batch's others with it
                    if len(rows) > 1:
                        for row in rows:
                            self._write_one(row)
                        return
                    log.exception(json.dumps({"event": "usage_write_failed", "rows": len(rows)}))
                    break
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        # The providers have answered (and charged): keep the rows in the log, to be reconciled.
        for row in rows:
            log.error(json.dumps({"event": "usage_not_recorded", **row}, default=str))


@atexit.register
def _close_all() -> None:
    """A gunicorn worker (or any process) exiting normally writes its queued rows first."""
    for writer in list(_WRITERS):
        writer.close()

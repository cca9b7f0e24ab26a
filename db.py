"""Storage: a small connection pool and every SQL statement, written once for SQLite and PostgreSQL.

SQL here uses `?` placeholders; for PostgreSQL they are rewritten to psycopg2's `%s` once per
statement. Connections are borrowed per operation (never held across an upstream call), so a few
pooled connections serve hundreds of concurrent streams.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import sqlite3
import threading
import time
from contextlib import closing, contextmanager
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Iterator

from errors import ServiceUnavailable
from usage import UsageWriter

HERE = os.path.dirname(os.path.abspath(__file__))
POOL_TIMEOUT = 10.0  # seconds to wait for a free connection before answering 503
KEY_ROWS_TTL = 5.0  # seconds a rate-limited key's row may be reused (auth.py); like the model catalog
KEY_ROWS_MAX = 10_000
NANO = Decimal(1_000_000_000)

try:
    import psycopg2
    import psycopg2.errors
    import psycopg2.extensions
    DB_ERRORS: tuple = (sqlite3.OperationalError, psycopg2.OperationalError, psycopg2.InterfaceError)

    class PGConnection(psycopg2.extensions.connection):
        """A PostgreSQL connection that remembers which statements it has prepared (Database.query)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.prepared: set[str] = set()
except ImportError:  # pragma: no cover - psycopg2-binary is in requirements.txt
    psycopg2 = None
    DB_ERRORS = (sqlite3.OperationalError,)


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


@functools.lru_cache(maxsize=64)
def _pg_prepared(sql: str, name: str) -> tuple[str, str]:
    """(PREPARE text for the last statement of sql, the sql to send instead: the statements before
    it, then EXECUTE with its parameters). Our SQL has no `?` or `; ` inside string literals."""
    *lead, last = sql.split("; ")
    parts = last.split("?")
    numbered = parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], 1))
    execute = f"EXECUTE {name} ({', '.join('?' * (len(parts) - 1))})" if len(parts) > 1 else f"EXECUTE {name}"
    return f"PREPARE {name} AS {numbered}", _pg_sql("; ".join([*lead, execute]))


def _rows(cur) -> list[dict]:
    """The cursor's result as dicts by column name."""
    names = [d[0] for d in cur.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _sqlite_path(url: str) -> str:
    """sqlite:///relative.db, sqlite:////absolute.db, or a bare path."""
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///"):] or "llm-proxy.db"
    if url.startswith("sqlite://"):
        return url[len("sqlite://"):] or "llm-proxy.db"
    return url


class Tx:
    """One transaction on one connection: query/execute with `?` placeholders.

    On PostgreSQL the connection is in autocommit mode and the transaction is spelled out: BEGIN
    travels with the first statement, and statements whose result nobody reads (`defer`) travel
    with the COMMIT, so a transaction costs as few network round trips as its reads need.
    """

    def __init__(self, conn, is_pg: bool):
        self.conn, self.is_pg = conn, is_pg
        self._unsent: list[bytes] = [b"BEGIN"] if is_pg else []  # PostgreSQL text not yet sent

    def _run(self, cur, sql: str, params) -> None:
        if not self.is_pg:
            cur.execute(sql, params)
            return
        self._unsent.append(cur.mogrify(_pg_sql(sql), params))
        text, self._unsent = b"; ".join(self._unsent), []
        cur.execute(text)  # several statements, one round trip; the cursor holds the last one's result

    def execute(self, sql: str, params: tuple | list = ()) -> int:
        cur = self.conn.cursor()
        try:
            self._run(cur, sql, params)
            return cur.rowcount
        finally:
            cur.close()

    def defer(self, sql: str, params: tuple | list = ()) -> None:
        """A statement whose result is not needed: on PostgreSQL it is sent with the next one, or the COMMIT."""
        if not self.is_pg:
            self.execute(sql, params)
            return
        with self.conn.cursor() as cur:
            self._unsent.append(cur.mogrify(_pg_sql(sql), params))

    def defer_many(self, sql: str, rows: list) -> None:
        """defer() for many parameter rows: one executemany on SQLite (one call, not one per row)."""
        if not self.is_pg:
            cur = self.conn.cursor()
            try:
                cur.executemany(sql, rows)
            finally:
                cur.close()
            return
        for params in rows:
            self.defer(sql, params)

    def query(self, sql: str, params: tuple | list = ()) -> list[dict]:
        cur = self.conn.cursor()
        try:
            self._run(cur, sql, params)
            return _rows(cur)
        finally:
            cur.close()

    def query_one(self, sql: str, params: tuple | list = ()) -> dict | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def commit(self) -> None:
        if not self.is_pg:
            self.conn.commit()
        elif self._unsent != [b"BEGIN"]:  # nothing was run at all: nothing to send
            with self.conn.cursor() as cur:
                cur.execute(b"; ".join([*self._unsent, b"COMMIT"]))
        self._unsent = []

    def rollback(self) -> None:
        if not self.is_pg:
            self.conn.rollback()
        elif self.conn.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            with self.conn.cursor() as cur:  # BEGIN went out (maybe with a failed COMMIT batch): end it
                cur.execute("ROLLBACK")
        self._unsent = []


class KeyRows:
    """Rows of virtual keys, by key hash, as read within the last KEY_ROWS_TTL seconds (see auth.py for
    which keys and endpoints may use them); admin edits in this process forget a key at once.

    A row read before an edit must not be cached after it: read `generation` before reading the row
    and pass it to put(), which drops the row if anything was forgotten in between.
    """

    def __init__(self, ttl: float = KEY_ROWS_TTL):
        self.ttl = ttl
        self.generation = 0
        self._rows: dict[str, tuple[float, dict]] = {}
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> dict | None:
        entry = self._rows.get(key_hash)
        if entry is None or time.monotonic() - entry[0] > self.ttl:
            return None
        return entry[1]

    def put(self, key_hash: str, row: dict, generation: int) -> None:
        with self._lock:
            if generation != self.generation:
                return
            if len(self._rows) >= KEY_ROWS_MAX:
                self._rows.clear()
            self._rows[key_hash] = (time.monotonic(), row)

    def forget(self, key_id: str) -> None:
        with self._lock:
            self.generation += 1
            for key_hash, (_, row) in list(self._rows.items()):
                if row["id"] == key_id:
                    del self._rows[key_hash]


class Database:
    """A pool of connections to SQLite (default) or PostgreSQL (`postgresql://...`)."""

    def __init__(self, url: str, pool_size: int = 8):
        self.url = url
        self.is_pg = url.startswith(("postgres://", "postgresql://"))
        if self.is_pg and psycopg2 is None:  # pragma: no cover
            raise RuntimeError("DATABASE_URL is PostgreSQL but psycopg2 is not installed")
        self.pool_size = pool_size
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        self.path = None if self.is_pg else _sqlite_path(url)
        self.key_rows = KeyRows()
        self._vacuum_refused = False
        # SQLite lets one connection write at a time; the others sleep in its busy handler (1 ms,
        # then longer) until they get through. Threads of this process queue here instead, and are
        # woken the moment the writer before them commits.
        self._sqlite_writes = threading.RLock() if not self.is_pg else contextlib.nullcontext()
        self.usage = UsageWriter(self)  # usage rows are queued and written off the critical path (usage.py)

    def _connect(self):
        if self.is_pg:
            conn = psycopg2.connect(self.url, connect_timeout=5, connection_factory=PGConnection)
            conn.autocommit = True  # a lone statement is its own transaction; Tx spells out the others
            return conn
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    @contextmanager
    def _connection(self):
        """Borrow a pooled connection; a broken one is closed instead of returned; 503 when unreachable."""
        if not self._slots.acquire(timeout=POOL_TIMEOUT):
            raise ServiceUnavailable("the database is busy; try again")
        conn = None
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._connect()
            try:
                yield conn
            except DB_ERRORS:
                raise
            except BaseException:
                # The caller failed (a 429, a 401...), not the connection: its transaction was
                # rolled back, so the connection goes back to the pool rather than being closed.
                self._idle.put(conn)
                conn = None
                raise
            self._idle.put(conn)
            conn = None
        except DB_ERRORS as exc:
            raise ServiceUnavailable("the database is unavailable") from exc
        finally:
            if conn is not None:  # broken or mid-error: drop it rather than reuse it
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                    pass
            self._slots.release()

    @contextmanager
    def transaction(self, immediate: bool = False, read_only: bool = False) -> Iterator[Tx]:
        """Borrow a connection and run one transaction; commit on success, roll back on error.

        immediate=True takes SQLite's write lock at BEGIN, so read-then-write sequences (rate
        limits, job claims) serialise; on PostgreSQL use SELECT ... FOR UPDATE in the SQL instead.
        read_only=True (a consistent read of several statements) does not queue behind writers.
        """
        with contextlib.nullcontext() if read_only else self._sqlite_writes, self._connection() as conn:
            if not self.is_pg:
                conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            tx = Tx(conn, self.is_pg)
            try:
                yield tx
                tx.commit()
            except BaseException:
                tx.rollback()
                raise

    # One statement needs no BEGIN/COMMIT: it runs on its own (autocommit), one round trip on PostgreSQL.

    def query(self, sql: str, params: tuple | list = (), prepare: str | None = None) -> list[dict]:
        """Run sql (one statement, or several separated by "; ") and return the last one's rows.

        prepare names a hot statement: on PostgreSQL its last statement is prepared once per
        connection (PREPARE), so the server parses and plans it once, not on every call.
        """
        with self._connection() as conn, closing(conn.cursor()) as cur:
            if not self.is_pg:
                cur.execute(sql, params)
            elif prepare is None:
                cur.execute(_pg_sql(sql), params)
            else:
                statement, sql = _pg_prepared(sql, prepare)
                if prepare not in conn.prepared:
                    cur.execute(statement)
                    conn.prepared.add(prepare)
                try:
                    cur.execute(sql, params)
                except psycopg2.errors.InvalidSqlStatementName:  # gone (DISCARD ALL, a pooler): again
                    cur.execute(statement)
                    cur.execute(sql, params)
            return _rows(cur)

    def query_one(self, sql: str, params: tuple | list = (), prepare: str | None = None) -> dict | None:
        rows = self.query(sql, params, prepare)
        return rows[0] if rows else None

    def execute(self, sql: str, params: tuple | list = ()) -> int:
        with self._sqlite_writes, self._connection() as conn, closing(conn.cursor()) as cur:
            cur.execute(_pg_sql(sql) if self.is_pg else sql, params)
            return cur.rowcount

    def close(self) -> None:
        """Write the queued usage rows, then close idle connections (tests, shutdown)."""
        self.usage.close()
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    def vacuum_churn(self) -> None:
        """PostgreSQL: VACUUM rate_events, which every limited call inserts into and its usage write
        deletes from. Its dead rows would otherwise pile up in the index admission reads until an
        autovacuum comes by (a minute at best; never where autovacuum is off). The usage writer calls
        this every few seconds, off the critical path. A user that may not vacuum the table gets a
        warning from PostgreSQL and the table is skipped: then, as after any error, autovacuum has to
        do, and this stops trying (no warning every few seconds in the server's log)."""
        if not self.is_pg or self._vacuum_refused:
            return
        try:
            with self._connection() as conn, closing(conn.cursor()) as cur:
                del conn.notices[:]
                cur.execute("VACUUM rate_events")
                if conn.notices:  # a plain VACUUM says nothing unless it skipped the table
                    self._vacuum_refused = True
        except ServiceUnavailable:
            pass
        except psycopg2.Error:
            self._vacuum_refused = True

    # -- schema ---------------------------------------------------------------------------------

    def init_schema(self) -> None:
        """Apply schema.sql (idempotent) and, once per database, the seed price list."""
        statements = _statements(os.path.join(HERE, "schema.sql"))
        with self.transaction(immediate=True) as tx:
            if self.is_pg:  # several workers may start at once; serialise DDL
                tx.execute("SELECT pg_advisory_xact_lock(727274)")
            for stmt in statements:
                tx.execute(stmt)
            if tx.query_one("SELECT value FROM meta WHERE name = ?", ("seeded",)) is None:
                for stmt in _statements(os.path.join(HERE, "seed.sql")):
                    tx.execute(stmt)
                tx.execute("INSERT INTO meta (name, value) VALUES (?, ?)", ("seeded", str(int(time.time()))))

    def ping(self) -> None:
        """Raise ServiceUnavailable if the database does not answer."""
        self.query_one("SELECT 1 AS ok")

    # -- models and providers -------------------------------------------------------------------

    def load_models(self) -> dict[str, dict]:
        """Every row of the models table by name, JSON columns decoded."""
        rows = self.query("SELECT name, provider, upstream_model, fallbacks, input_cost_per_1k, "
                          "output_cost_per_1k, task_types FROM models")
        for row in rows:
            row["fallbacks"] = _json_list(row["fallbacks"])
            row["task_types"] = _json_list(row["task_types"])
        return {row["name"]: row for row in rows}

    def load_providers(self) -> dict[str, dict]:
        """Every row of the providers table by name."""
        rows = self.query("SELECT name, api_base, api_version, enabled FROM providers")
        return {row["name"]: {**row, "enabled": bool(row["enabled"])} for row in rows}

    # -- virtual keys (lookup only; management lives with the admin API) --------------------------

    LIVE_KEY_SQL = ("SELECT id, name, key_prefix, rpm_limit, tpm_limit, max_budget, models, spend_nusd, "
                    "EXISTS (SELECT 1 FROM provider_keys p WHERE p.key_id = api_keys.id) AS has_provider_keys "
                    "FROM api_keys WHERE revoked_at IS NULL AND ")

    def find_live_key(self, key_hash: str) -> dict | None:
        """The unrevoked virtual key with this SHA-256 hash, or None; also whether it has stored provider keys."""
        return self.query_one(self.LIVE_KEY_SQL + "key_hash = ?", (key_hash,))

    def find_live_key_by_id(self, key_id: str) -> dict | None:
        """The unrevoked virtual key with this id (as find_live_key returns it), or None."""
        return self.query_one(self.LIVE_KEY_SQL + "id = ?", (key_id,))

    # -- usage ------------------------------------------------------------------------------------

    def record_usage(self, rows: list[dict]) -> None:
        """Write usage rows, add their cost to each key's spend and their tokens to its rate window, at once.

        The request's prompt estimate (limits.py's rate event) stops counting here: its real tokens
        take its place. Nothing is read back, so on PostgreSQL this is a single round trip.
        """
        if not rows:
            return
        now = time.time()
        spend: dict[str, int] = {}
        tokens: dict[tuple[str, int], int] = {}
        settled: set[str] = set()
        inserts = []
        for r in rows:
            created = r.get("created_at", now)
            prompt, completion = int(r.get("prompt_tokens", 0)), int(r.get("completion_tokens", 0))
            inserts.append((r["request_id"], r.get("key_id"), r["model"], r["provider"], prompt, completion,
                            int(r.get("cost_nusd", 0)), float(r.get("latency_ms", 0)), r.get("status", "ok"),
                            1 if r.get("cached") else 0, created))
            if r.get("key_id"):
                spend[r["key_id"]] = spend.get(r["key_id"], 0) + int(r.get("cost_nusd", 0))
                bucket = (r["key_id"], int(created))
                tokens[bucket] = tokens.get(bucket, 0) + prompt + completion
                settled.add(r["request_id"])
        # A handful of statements however many rows: on SQLite each call into it lets the GIL go and
        # must win it back, while this transaction holds the database's write lock.
        with self.transaction() as tx:
            tx.defer_many("INSERT INTO usage (request_id, key_id, model, provider, prompt_tokens, completion_tokens, "
                          "cost_nusd, latency_ms, status, cached, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          inserts)
            tx.defer_many("UPDATE api_keys SET spend_nusd = spend_nusd + ? WHERE id = ?",
                          [(cost, key_id) for key_id, cost in spend.items() if cost])
            tx.defer_many("INSERT INTO token_buckets (key_id, epoch_second, tokens) VALUES (?, ?, ?) "
                          "ON CONFLICT (key_id, epoch_second) DO UPDATE SET tokens = token_buckets.tokens + "
                          "excluded.tokens", [(key, second, used) for (key, second), used in tokens.items() if used])
            ids = sorted(settled)
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                tx.defer(f"DELETE FROM rate_events WHERE request_id IN ({', '.join('?' * len(chunk))})", chunk)


def cost_nusd(prompt_tokens: int, completion_tokens: int, input_per_1k: float, output_per_1k: float) -> int:
    """Cost in nano-dollars: tokens / 1000 x price per 1k, rounded half up to the nano-dollar."""
    usd = (Decimal(int(prompt_tokens)) * Decimal(repr(float(input_per_1k)))
           + Decimal(int(completion_tokens)) * Decimal(repr(float(output_per_1k)))) / 1000
    return int((usd * NANO).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def usd(nusd: int | None) -> str:
    """Nano-dollars as a plain decimal USD string (no exponent)."""
    value = (Decimal(int(nusd or 0)) / NANO).normalize()
    return format(value, "f")


def _json_list(value: Any) -> list:
    if isinstance(value, list):
        return value
    try:
        parsed = json.loads(value or "[]")
    except ValueError:
        return []
    return parsed if isinstance(parsed, list) else []


def _statements(path: str) -> list[str]:
    """Split an SQL file on semicolons at line ends, dropping comments."""
    with open(path, encoding="utf-8") as f:
        lines = [line.split("--", 1)[0].rstrip() for line in f]
    text = "\n".join(lines)
    return [s.strip().rstrip(";").strip() for s in text.split(";\n") if s.strip().strip(";").strip()]

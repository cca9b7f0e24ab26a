"""What rate limits cost on the hot path: database round trips and added latency per request.

Counts the transactions and statements one echo request makes for a virtual key without limits
and for one with rpm/tpm limits, then times N requests of each through Flask's test client (no
network, no upstream: what is left is the proxy and its database). Run from the repo root:

    .venv/bin/python bench/limits_overhead.py [--requests 500] [--pg postgresql://postgres@127.0.0.1:5432/test]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import db as dbmod  # noqa: E402
from app import create_app  # noqa: E402

ADMIN = {"Authorization": "Bearer bench-admin"}
BODY = {"model": "echo", "messages": [{"role": "user", "content": "Hello there, how are you today?"}]}


class Counter:
    """Counts transactions and PostgreSQL round trips by wrapping Database's and Tx's methods.

    A round trip is a lone statement (Database.query/execute), a transaction statement whose result
    is read (Tx._run, which carries BEGIN and deferred statements along) and a COMMIT with anything to send.
    """

    def __init__(self):
        self.transactions = self.trips = 0

    @contextmanager
    def installed(self):
        names = [(dbmod.Database, "transaction"), (dbmod.Database, "query"), (dbmod.Database, "execute"),
                 (dbmod.Tx, "_run"), (dbmod.Tx, "commit")]
        originals = {(cls, name): getattr(cls, name) for cls, name in names}
        counter = self

        @contextmanager
        def transaction(db, immediate=False):
            counter.transactions += 1
            with originals[(dbmod.Database, "transaction")](db, immediate) as tx:
                yield tx

        def trip(cls, name):
            def counted(self, *args, **kwargs):
                if name != "commit" or (self.is_pg and self._unsent != [b"BEGIN"]):
                    counter.trips += 1
                return originals[(cls, name)](self, *args, **kwargs)
            return counted

        dbmod.Database.transaction = transaction
        for cls, name in names[1:]:
            setattr(cls, name, trip(cls, name))
        try:
            yield self
        finally:
            for (cls, name), original in originals.items():
                setattr(cls, name, original)


def measure(url: str, n: int) -> None:
    app = create_app({"database_url": url, "admin_api_key": "bench-admin", "start_workers": False,
                      "log_level": "warning"})
    client = app.test_client()
    keys = {}
    for label, limits in (("no limits", {}), ("rpm+tpm limits", {"rpm_limit": 10**6, "tpm_limit": 10**9})):
        r = client.post("/api/keys", json={"name": label, **limits}, headers=ADMIN)
        keys[label] = {"Authorization": "Bearer " + r.get_json()["key"]}
    kind = "PostgreSQL" if url.startswith("postgresql") else "SQLite"
    print(f"\n{kind}: {n} echo requests each, in-process")
    base = None
    for label, headers in keys.items():
        for _ in range(20):  # warm the pool and the catalog
            client.post("/v1/chat/completions", json=BODY, headers=headers)
        usage = app.extensions["llm_proxy"].db.usage
        usage.flush()
        with Counter().installed() as c:
            client.post("/v1/chat/completions", json=BODY, headers=headers)
            usage.flush()  # the usage write, made just after the answer, counts too
        times = []
        for _ in range(n):
            t = time.perf_counter()
            assert client.post("/v1/chat/completions", json=BODY, headers=headers).status_code == 200
            times.append((time.perf_counter() - t) * 1000)
        median, p95 = statistics.median(times), sorted(times)[int(n * 0.95)]
        added = "" if base is None else f"  (+{median - base:.3f} ms median)"
        base = median if base is None else base
        where = "round trips" if kind == "PostgreSQL" else "calls into SQLite (in-process)"
        print(f"  {label:15s} {c.transactions} transactions, {c.trips} {where} (with the usage write); "
              f"median {median:.3f} ms, p95 {p95:.3f} ms{added}")
    app.extensions["llm_proxy"].db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--pg", help="a PostgreSQL URL (a scratch schema is created and dropped)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        measure(f"sqlite:///{tmp}/bench.db", args.requests)
    if args.pg:
        import psycopg2
        schema = "bench_" + uuid.uuid4().hex[:8]
        conn = psycopg2.connect(args.pg)
        conn.autocommit = True
        conn.cursor().execute(f"CREATE SCHEMA {schema}")
        try:
            sep = "&" if "?" in args.pg else "?"
            measure(f"{args.pg}{sep}options={quote(f'-csearch_path={schema}')}", args.requests)
        finally:
            conn.cursor().execute(f"DROP SCHEMA {schema} CASCADE")
            conn.close()


if __name__ == "__main__":
    main()

"""The database layer on SQLite and PostgreSQL: schema, placeholders, transactions, money."""
from __future__ import annotations

import pytest

from db import Database, cost_nusd, usd
from errors import ServiceUnavailable


@pytest.fixture
def db(database_url):
    database = Database(database_url)
    database.init_schema()
    yield database
    database.close()


def test_schema_is_idempotent_and_seeds_once(db):
    db.execute("DELETE FROM models WHERE name = ?", ("gpt-4o",))
    db.init_schema()  # a restart must not re-create what an admin deleted
    models = db.load_models()
    assert "gpt-4o" not in models and models["gpt-4o-mini"]["provider"] == "openai"
    assert models["echo"]["input_cost_per_1k"] == 0 and "summarization" in models["echo"]["task_types"]


def test_one_placeholder_style_with_percent_signs(db):
    db.execute("INSERT INTO meta (name, value) VALUES (?, ?)", ("probe", "100% sure"))
    row = db.query_one("SELECT value FROM meta WHERE name = ? AND value LIKE '100%'", ("probe",))
    assert row == {"value": "100% sure"}


def test_a_failed_transaction_leaves_nothing_behind(db):
    with pytest.raises(RuntimeError):
        with db.transaction() as tx:
            tx.execute("INSERT INTO meta (name, value) VALUES (?, ?)", ("half", "done"))
            raise RuntimeError("boom")
    assert db.query_one("SELECT value FROM meta WHERE name = ?", ("half",)) is None
    assert db.query_one("SELECT 1 AS ok") == {"ok": 1}  # the pool still works


def test_usage_rows_and_spend_change_together(db):
    db.execute("INSERT INTO api_keys (id, name, key_hash, key_prefix, created_at) VALUES (?, ?, ?, ?, ?)",
               ("k1", "alice", "hash", "sk-abc", 0))
    rows = [{"request_id": "r1", "key_id": "k1", "model": "m", "provider": "p", "prompt_tokens": 3,
             "completion_tokens": 4, "cost_nusd": 1234, "status": "ok"},
            {"request_id": "r1", "key_id": "k1", "model": "m", "provider": "p", "status": "error"}]
    db.record_usage(rows)
    spend = db.query_one("SELECT spend_nusd FROM api_keys WHERE id = ?", ("k1",))["spend_nusd"]
    total = db.query_one("SELECT SUM(cost_nusd) AS s, COUNT(*) AS n FROM usage WHERE key_id = ?", ("k1",))
    assert spend == total["s"] == 1234 and total["n"] == 2


def test_unreachable_database_is_service_unavailable(tmp_path):
    with pytest.raises(ServiceUnavailable):
        Database(f"sqlite:///{tmp_path}/missing-dir/x.db").ping()
    with pytest.raises(ServiceUnavailable):
        Database("postgresql://postgres@127.0.0.1:1/none?connect_timeout=1").ping()


@pytest.mark.parametrize("prompt, completion, price_in, price_out, expected", [
    (10, 5, 0.00015, 0.0006, 4500),            # gpt-4o-mini: $0.0000045
    (1, 0, 0.00000015, 0, 0),                  # 0.15 nano-dollars rounds down
    (3, 0, 0.00000015, 0, 0),                  # 0.45 rounds down
    (1, 1, 0.0000005, 0.0000005, 1),           # 0.5 + 0.5 = 1.0 exactly
    (1_000_000, 1_000_000, 0.003, 0.015, 18_000_000_000),
])
def test_cost_is_exact_in_nano_dollars(prompt, completion, price_in, price_out, expected):
    assert cost_nusd(prompt, completion, price_in, price_out) == expected


def test_usd_strings_have_no_exponent():
    assert usd(4500) == "0.0000045" and usd(0) == "0" and usd(18_000_000_000) == "18"


def test_a_refused_transaction_keeps_its_connection(db):
    from errors import RateLimited
    db.query_one("SELECT 1 AS ok")
    with pytest.raises(RateLimited):
        with db.transaction() as tx:
            tx.query_one("SELECT COUNT(*) AS n FROM meta")
            raise RateLimited("over the limit")  # e.g. admission refusing a request
    assert db._idle.qsize() == 1  # rolled back and reused, not closed and reconnected
    assert db.query_one("SELECT 1 AS ok") == {"ok": 1}


def test_a_prepared_statement_is_prepared_once_per_connection_and_answers_like_plain_sql(db):
    db.execute("INSERT INTO meta (name, value) VALUES (?, ?)", ("p1", "one"))
    sql = "SELECT value, ? AS echo FROM meta WHERE name = ? AND value LIKE '%n%'"
    lead = "SELECT 1 AS lead WHERE 1 = ?; " if db.is_pg else ""  # several statements: PostgreSQL only
    params = (1, "x", "p1") if db.is_pg else ("x", "p1")
    for _ in range(3):
        assert db.query(lead + sql, params, prepare="meta_value") == [{"value": "one", "echo": "x"}]
        assert db.query(lead + sql, params) == [{"value": "one", "echo": "x"}]
    if db.is_pg:
        [conn] = list(db._idle.queue)  # one pooled connection served every call, and prepared it once
        assert conn.prepared == {"meta_value"}
        with conn.cursor() as cur:
            cur.execute("SELECT name FROM pg_prepared_statements")
            assert [r[0] for r in cur.fetchall()] == ["meta_value"]


def test_the_churning_rate_events_table_is_vacuumed_on_postgresql(db):
    db.execute("INSERT INTO rate_events (key_id, request_id, created_at, tokens) VALUES ('k', 'r', 1, 1)")
    db.execute("DELETE FROM rate_events")
    db.vacuum_churn()  # SQLite has nothing to do; PostgreSQL vacuums the table
    if db.is_pg:
        count = ("SELECT pg_stat_clear_snapshot(), vacuum_count FROM pg_stat_user_tables "
                 "WHERE relname = 'rate_events' AND schemaname = current_schema()")
        assert db.query_one(count)["vacuum_count"] >= 1 and not db._vacuum_refused


def test_a_user_that_may_not_vacuum_stops_trying(database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("VACUUM is PostgreSQL's")
    owner = Database(database_url)
    owner.init_schema()
    owner.execute("DROP ROLE IF EXISTS llm_proxy_tenant")
    owner.execute("CREATE ROLE llm_proxy_tenant")
    try:
        owner.execute("GRANT USAGE ON SCHEMA " + owner.query_one("SELECT current_schema() AS s")["s"]
                      + " TO llm_proxy_tenant")
        tenant = Database(database_url + "%20-crole%3Dllm_proxy_tenant")
        vacuums = []
        real = tenant._connection

        def counted():
            vacuums.append(1)
            return real()

        tenant._connection = counted
        tenant.vacuum_churn()  # skipped with a warning: not the table's owner
        tenant.vacuum_churn()
        assert tenant._vacuum_refused and len(vacuums) == 1
        tenant.close()
    finally:
        owner.execute("DROP OWNED BY llm_proxy_tenant")
        owner.execute("DROP ROLE llm_proxy_tenant")
        owner.close()


def test_a_prepared_statement_the_server_forgot_is_prepared_again(db):
    if not db.is_pg:
        pytest.skip("prepared statements are PostgreSQL's")
    sql = "SELECT ? AS echo"
    assert db.query(sql, ("a",), prepare="echo_back") == [{"echo": "a"}]
    [conn] = list(db._idle.queue)
    with conn.cursor() as cur:
        cur.execute("DEALLOCATE ALL")  # what a pooler's DISCARD ALL, or a server restart, does
    assert db.query(sql, ("b",), prepare="echo_back") == [{"echo": "b"}]

"""Fixtures: app -> client -> runner over a fresh database, SQLite always and PostgreSQL when
TEST_DATABASE_URL is set (every database test runs once per database)."""
from __future__ import annotations

import os
import uuid
from urllib.parse import quote

import pytest

import providers
from providers import RetryPolicy
from support import ADMIN_KEY, CLIENT_KEY, Gunicorn, _provider_var

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL")
DATABASES = ["sqlite"] + (["postgresql"] if TEST_DATABASE_URL else [])
FAST_RETRY = RetryPolicy(max_retries=2, initial_backoff=1, max_backoff=20, factor=2.0, jitter=0.1)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No provider keys, URLs or secrets from the developer's shell leak into a test; fresh circuits."""
    for name in list(os.environ):
        if _provider_var(name):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(os.environ.get("TMPDIR", "/tmp"))  # a stray .env or llm-proxy.db is never picked up
    for circuit in providers.CIRCUITS.values():
        circuit.__init__()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report carries the log of every gunicorn it started (a server that stopped
    answering says why there); the logs are removed once the next test begins."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in Gunicorn.STARTED:
            report.sections.append((f"gunicorn {server.url or '(not listening)'} log", server.log()[-6000:]))


@pytest.fixture(autouse=True)
def _forget_gunicorn_logs():
    """The previous test's gunicorn logs are no longer needed."""
    for server in Gunicorn.STARTED:
        server.log_path.unlink(missing_ok=True)
    Gunicorn.STARTED.clear()
    yield


def _pg_schema_url(base: str, schema: str) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(params=DATABASES)
def database_url(request, tmp_path):
    """A fresh, empty database URL: a SQLite file, or a new PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    import psycopg2
    schema = "t_" + uuid.uuid4().hex[:12]
    conn = psycopg2.connect(TEST_DATABASE_URL)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
    try:
        yield _pg_schema_url(TEST_DATABASE_URL, schema)
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA {schema} CASCADE")
        conn.close()


@pytest.fixture
def make_app(database_url):
    """Build apps on the test database with test keys, fast retries and no background workers."""
    from app import create_app
    made = []

    def make(**overrides):
        config = {"database_url": database_url, "api_key": CLIENT_KEY, "admin_api_key": ADMIN_KEY,
                  "retry": FAST_RETRY, "request_timeout": 5.0, "start_workers": False}
        config.update(overrides)
        app = create_app(config)
        app.testing = True
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions["llm_proxy"].db.close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()

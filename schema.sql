-- llm-proxy schema: one file for SQLite and PostgreSQL, applied idempotently at start and by
-- `flask --app app init-db`. Times are Unix epoch seconds (DOUBLE PRECISION). Money is stored as
-- whole nano-dollars (BIGINT, 1e-9 USD) so that sums are exact on both databases.

CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Virtual keys: only the SHA-256 of the key is stored, with a short prefix for display.
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    key_hash TEXT NOT NULL UNIQUE,
    key_prefix TEXT NOT NULL,
    rpm_limit INTEGER,                 -- NULL: no limit
    tpm_limit INTEGER,                 -- NULL: no limit
    max_budget DOUBLE PRECISION,       -- USD; NULL: no budget
    models TEXT,                       -- JSON list of allowed model names; NULL: all
    spend_nusd BIGINT NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION
);

-- Provider keys stored per virtual key, AES-256-GCM encrypted (nonce || ciphertext, base64).
CREATE TABLE IF NOT EXISTS provider_keys (
    key_id TEXT NOT NULL REFERENCES api_keys(id) ON DELETE CASCADE,
    provider TEXT NOT NULL,
    ciphertext TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (key_id, provider)
);

-- Database-driven model configuration (SPEC section 5); seeded from seed.sql once.
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    upstream_model TEXT NOT NULL,
    fallbacks TEXT NOT NULL DEFAULT '[]',          -- JSON list of model names
    input_cost_per_1k DOUBLE PRECISION NOT NULL DEFAULT 0,
    output_cost_per_1k DOUBLE PRECISION NOT NULL DEFAULT 0,
    task_types TEXT NOT NULL DEFAULT '[]',         -- JSON list
    updated_at DOUBLE PRECISION NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS providers (
    name TEXT PRIMARY KEY,
    api_base TEXT,
    api_version TEXT,
    enabled INTEGER NOT NULL DEFAULT 1,
    updated_at DOUBLE PRECISION NOT NULL DEFAULT 0
);

-- One row per upstream call (streams, failures and cache hits included).
CREATE TABLE IF NOT EXISTS usage (
    request_id TEXT NOT NULL,
    key_id TEXT,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_nusd BIGINT NOT NULL DEFAULT 0,
    latency_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    cached INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_key_time ON usage (key_id, created_at);
CREATE INDEX IF NOT EXISTS usage_time ON usage (created_at);
CREATE INDEX IF NOT EXISTS usage_request ON usage (request_id);

-- Sliding-minute rate limits, shared by every worker and instance (limits.py).
-- Per key and per second: the requests admitted (written by admission) and the real tokens used
-- (written with the usage rows). Two tables, so the two writers never wait on each other's rows;
-- the minute is a sum over at most 61 rows of each however busy the key is.
CREATE TABLE IF NOT EXISTS request_buckets (
    key_id TEXT NOT NULL,
    epoch_second BIGINT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, epoch_second)
);
CREATE TABLE IF NOT EXISTS token_buckets (
    key_id TEXT NOT NULL,
    epoch_second BIGINT NOT NULL,
    tokens BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, epoch_second)
);

-- rate_events: the prompt estimate of each admitted request still waiting for its first usage row
-- (deleted then, when its real tokens reach token_buckets); so only calls in flight are here.
CREATE TABLE IF NOT EXISTS rate_events (
    key_id TEXT NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL,
    tokens INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS rate_events_key_time ON rate_events (key_id, created_at);
CREATE INDEX IF NOT EXISTS rate_events_request ON rate_events (request_id);

-- Durable async jobs (SPEC section 7).
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    key_id TEXT,
    status TEXT NOT NULL,                          -- pending|processing|completed|error
    request TEXT NOT NULL,                         -- JSON: body and routing options
    response TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    webhook_url TEXT,
    webhook_status TEXT,                           -- NULL (none)|pending|delivered|failed|refused
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    webhook_next_at DOUBLE PRECISION,              -- next delivery try (pushed ahead while one is sent)
    worker TEXT,
    lease_until DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created_at);

-- Response cache (SPEC section 9), shared by every worker and instance.
CREATE TABLE IF NOT EXISTS cache (
    cache_key TEXT PRIMARY KEY,
    response TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS cache_expires ON cache (expires_at);

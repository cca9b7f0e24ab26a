"""Configuration: the environment (and .env) turned once into a typed, immutable Config."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Mapping

from providers import PROVIDERS, RetryPolicy

# /execute may call these hosts unless EXECUTE_ALLOWED_HOSTS says otherwise.
KNOWN_PROVIDER_HOSTS = (
    "api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com", "api.mistral.ai",
    "api.groq.com", "api.x.ai", "api.deepseek.com", "api.cerebras.ai", "openrouter.ai",
)
# Proxy settings requests would look up in the environment on every call (either case). Only when one
# is set does the upstream session keep that per-call scan (NO_PROXY is matched per URL); otherwise
# it skips it, and ~/.netrc with it (which could replace a provider key). A CA bundle named by
# REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE is read once instead.
PROXY_ENV_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


class ConfigError(ValueError):
    """The environment holds a value the proxy cannot start with."""


@dataclass(frozen=True)
class Config:
    """Everything the proxy reads from its environment, with SPEC section 1's defaults."""

    port: int = 3000
    database_url: str = "sqlite:///llm-proxy.db"
    admin_api_key: str | None = None
    api_key: str | None = None
    encryption_key: bytes | None = None
    provider_keys: dict[str, str] = field(default_factory=dict)
    base_urls: dict[str, str] = field(default_factory=dict)
    azure_api_version: str | None = None
    ollama_enabled: bool = False
    max_concurrent: int = 2
    retry: RetryPolicy = RetryPolicy()
    request_timeout: float = 300.0
    cache_enabled: bool = False
    cache_ttl: int = 300
    job_ttl: int = 3600
    job_lease: float = 30.0  # seconds a claimed job stays claimed without a heartbeat (dead worker -> rerun)
    job_poll_interval: float = 1.0  # seconds between idle queue polls (a submit in-process wakes at once)
    webhook_retries: int = 8  # webhook re-deliveries after the first failed POST
    webhook_backoff: float = 2.0  # seconds before the first webhook retry; doubles each time, capped at 300
    webhook_secret: str | None = None
    allow_private_urls: bool = False
    execute_allowed_hosts: tuple[str, ...] = KNOWN_PROVIDER_HOSTS
    max_num_calls: int = 5
    max_body_bytes: int = 20 * 1024 * 1024
    log_level: str = "info"
    log_bodies: bool = False
    cors_origins: tuple[str, ...] = ()
    upstream_pool_size: int = 512  # pooled connections per provider host (GUNICORN_THREADS: one per thread)
    upstream_trust_env: bool = False  # a proxy variable is set: let requests read the environment per call
    upstream_ca_bundle: str | None = None  # REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE: verify providers against it
    start_workers: bool = True  # background job workers and cleanup (tests may turn them off)

    def with_overrides(self, **overrides) -> "Config":
        """A copy with some fields replaced (tests)."""
        return replace(self, **overrides)

    def provider_enabled(self, name: str) -> bool:
        """Ollama is offered only when OLLAMA_ENABLED; everything else always."""
        return name != "ollama" or self.ollama_enabled


def _first(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value is not None and value.strip():
            return value.strip()
    return None


def _bool(value: str | None, default: bool = False) -> bool:
    if value is None or not value.strip():
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _number(env: Mapping[str, str], name: str, default, cast=int, minimum=None):
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = cast(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}")
    return value


def _list(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def parse_encryption_key(value: str | None) -> bytes | None:
    """ENCRYPTION_KEY: 64 hex characters (32 bytes for AES-256-GCM), or unset."""
    if value is None or not value.strip():
        return None
    if not HEX64.match(value.strip()):
        raise ConfigError("ENCRYPTION_KEY must be 64 hexadecimal characters (32 bytes); "
                          "generate one with: python -c \"import secrets; print(secrets.token_hex(32))\"")
    return bytes.fromhex(value.strip())


def load_config(env: Mapping[str, str] | None = None) -> Config:
    """Read the environment once; raise ConfigError with a clear message for unusable values."""
    env = os.environ if env is None else env
    keys, urls = {}, {}
    for name, adapter in PROVIDERS.items():
        key = _first(env, *adapter.key_vars)
        if key:
            keys[name] = key
        urls[name] = (_first(env, *adapter.base_url_vars) or adapter.default_base_url).rstrip("/")
    retry = RetryPolicy(
        max_retries=_number(env, "MAX_RETRIES", 3, int, 0),
        initial_backoff=_number(env, "INITIAL_BACKOFF", 1000.0, float, 0),
        max_backoff=_number(env, "MAX_BACKOFF", 30000.0, float, 0),
        factor=_number(env, "BACKOFF_FACTOR", 2.0, float, 1),
        jitter=_number(env, "JITTER", 0.1, float, 0),
    )
    allowed = env.get("EXECUTE_ALLOWED_HOSTS")
    return Config(
        port=_number(env, "PORT", 3000, int, 1),
        database_url=_first(env, "DATABASE_URL") or "sqlite:///llm-proxy.db",
        admin_api_key=_first(env, "ADMIN_API_KEY"),
        api_key=_first(env, "API_KEY", "AUTHORIZED_CLIENT_ID"),
        encryption_key=parse_encryption_key(env.get("ENCRYPTION_KEY")),
        provider_keys=keys,
        base_urls=urls,
        azure_api_version=_first(env, "AZURE_OPENAI_API_VERSION"),
        ollama_enabled=_bool(env.get("OLLAMA_ENABLED")),
        max_concurrent=_number(env, "MAX_CONCURRENT", 2, int, 0),
        retry=retry,
        request_timeout=_number(env, "REQUEST_TIMEOUT", 300.0, float, 0.1),
        cache_enabled=_bool(env.get("CACHE_ENABLED")),
        cache_ttl=_number(env, "CACHE_TTL", 300, int, 0),
        job_ttl=_number(env, "JOB_TTL", 3600, int, 1),
        job_lease=_number(env, "JOB_LEASE", 30.0, float, 0.5),
        job_poll_interval=_number(env, "JOB_POLL_INTERVAL", 1.0, float, 0.01),
        webhook_retries=_number(env, "WEBHOOK_RETRIES", 8, int, 0),
        webhook_backoff=_number(env, "WEBHOOK_BACKOFF", 2.0, float, 0),
        webhook_secret=_first(env, "WEBHOOK_SECRET"),
        allow_private_urls=_bool(env.get("ALLOW_PRIVATE_URLS")),
        execute_allowed_hosts=_list(allowed) if allowed and allowed.strip() else KNOWN_PROVIDER_HOSTS,
        max_num_calls=_number(env, "MAX_NUM_CALLS", 5, int, 1),
        max_body_bytes=_number(env, "MAX_BODY_BYTES", 20 * 1024 * 1024, int, 1024),
        log_level=(env.get("LOG_LEVEL") or "info").strip().lower(),
        log_bodies=_bool(env.get("LOG_BODIES")),
        cors_origins=_list(env.get("CORS_ORIGINS")),
        upstream_pool_size=_number(env, "GUNICORN_THREADS", 512, int, 1),
        upstream_trust_env=any(env.get(n) or env.get(n.lower()) for n in PROXY_ENV_VARS),
        upstream_ca_bundle=_first(env, "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"),
    )

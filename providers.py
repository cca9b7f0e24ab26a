"""The provider registry, model resolution, and the one place that sends requests upstream.

`send()` owns the HTTP session, timeouts, retries with backoff, the circuit breakers and fallback.
Adapters (adapters.py, native.py) only translate.
"""
from __future__ import annotations

import itertools
import json
import random
import threading
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Callable, Iterator

import requests
from requests.adapters import HTTPAdapter
from requests.auth import _basic_auth_str
from requests.exceptions import InvalidJSONError
from requests.models import PreparedRequest
from requests.structures import CaseInsensitiveDict
from requests.utils import check_header_validity, get_auth_from_url, get_encoding_from_headers

from adapters import Adapter, EchoAdapter, Endpoint, OpenAIAdapter, chunks_from_completion, loads_upstream
from errors import ModelNotFound, UpstreamError, UpstreamTimeout
from urlguard import public_session


def _openai_compatible(name: str, base_url: str, *key_vars: str, base_url_vars: tuple = ()) -> OpenAIAdapter:
    return OpenAIAdapter(name, base_url, key_vars or (f"{name.upper()}_API_KEY",), base_url_vars)


PROVIDERS: dict[str, Adapter] = {
    a.name: a for a in (
        _openai_compatible("openai", "https://api.openai.com/v1",
                           base_url_vars=("OPENAI_BASE_URL", "OPENAI_API_BASE_URL")),
        _openai_compatible("mistral", "https://api.mistral.ai/v1", "MISTRAL_API_KEY", "MISTRALAI_API_KEY"),
        _openai_compatible("groq", "https://api.groq.com/openai/v1"),
        _openai_compatible("xai", "https://api.x.ai/v1"),
        _openai_compatible("deepseek", "https://api.deepseek.com/v1"),
        _openai_compatible("cerebras", "https://api.cerebras.ai/v1"),
        _openai_compatible("openrouter", "https://openrouter.ai/api/v1"),
        EchoAdapter("echo", needs_key=False, owned_by="llm-proxy"),
    )
}

try:  # the native translators register themselves here when present
    import native
    PROVIDERS.update({a.name: a for a in native.ADAPTERS})
except ImportError:  # pragma: no cover - native.py is part of the tree; this guards partial checkouts
    pass

# Step 3 of model resolution (SPEC section 4): well-known name prefixes.
MODEL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("gpt-", "openai"), ("o1", "openai"), ("o3", "openai"), ("o4", "openai"), ("chatgpt-", "openai"),
    ("claude-", "anthropic"), ("gemini-", "gemini"),
    ("mistral-", "mistral"), ("open-mistral", "mistral"), ("codestral", "mistral"),
    ("ministral", "mistral"), ("pixtral", "mistral"),
    ("grok-", "xai"), ("deepseek-", "deepseek"),
)

RETRYABLE_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))
FALLBACK_STATUSES = frozenset({401, 403, 404})
CONNECT_TIMEOUT = 10.0
CIRCUIT_FAILURES = 5
CIRCUIT_OPEN_SECONDS = 30.0


class LeanAdapter(HTTPAdapter):
    """requests' HTTPAdapter without the per-call work a provider call does not need.

    send() is requests' own, so whatever patches HTTPAdapter.send (the tests' `responses`) still sees
    every upstream call. Around it: the Response is built bare (no cookie extraction, no charset
    lookup: _status_error sets the encoding when it needs the text), and without a proxy the
    connection pool for a URL is looked up once, not on every call.
    """

    MAX_POOLS = 256  # cached (url, verify, cert) -> pool entries; the cache starts over when full

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pools: dict[tuple, object] = {}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._pools = {}

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        """The pool requests would pick, remembered per (URL, verify, cert) when no proxy is involved."""
        if proxies:
            return super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
        key = (request.url, verify, cert)
        pool = self._pools.get(key)
        if pool is None or pool.pool is None:  # not seen yet, or the pool manager has closed it since
            pool = super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
            if len(self._pools) >= self.MAX_POOLS:
                self._pools.clear()
            self._pools[key] = pool
        return pool

    def request_url(self, request, proxies) -> str:
        """The path to send (requests' own answer), worked out once per URL when no proxy is involved."""
        if proxies:
            return super().request_url(request, proxies)
        return _path_url(request.url)

    def build_response(self, req, resp) -> requests.Response:
        """A Response over urllib3's: status, headers (already case-insensitive), reason and the raw stream."""
        response = requests.Response()
        response.status_code = resp.status
        response.headers = resp.headers
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response

    def close(self) -> None:
        self._pools.clear()
        super().close()


@lru_cache(maxsize=1024)
def _path_url(url: str) -> str:
    """A URL's path and query, as requests sends them without a proxy (PreparedRequest.path_url)."""
    prepared = PreparedRequest()
    prepared.url = url
    return prepared.path_url


# One session per worker process: connection pools to each provider are reused across requests.
# create_app sizes the pools and decides whether requests must consult the environment per call.
SESSION = requests.Session()
PUBLIC_SESSION = public_session()  # for client-chosen URLs: refuses non-public peers at connect time
DEFAULT_POOL_SIZE = 512  # connections kept per provider host: one per gunicorn thread


def configure_session(pool_size: int = DEFAULT_POOL_SIZE, trust_env: bool = True, ca_bundle: str | None = None) -> None:
    """Pool up to pool_size connections per host; with trust_env False, skip requests' per-call scan
    of proxy, CA-bundle and netrc settings (config.py keeps it only when a proxy is configured)."""
    SESSION.trust_env = trust_env
    SESSION.verify = ca_bundle or True
    for prefix in ("https://", "http://"):
        SESSION.mount(prefix, LeanAdapter(pool_connections=32, pool_maxsize=pool_size))


configure_session()


@dataclass
class Route:
    """A client-facing model name resolved to a provider and an upstream model id."""

    name: str
    provider: str
    upstream_model: str
    fallbacks: list[str] = field(default_factory=list)
    input_cost_per_1k: float = 0.0
    output_cost_per_1k: float = 0.0

    @property
    def adapter(self) -> Adapter:
        return PROVIDERS[self.provider]


def resolve(name: str, models: dict[str, dict], enabled: Callable[[str], bool] = lambda p: True) -> Route:
    """Resolve a model name: models table, then `provider/model`, then well-known prefixes (SPEC 4)."""
    row = models.get(name)
    if row is not None and row["provider"] in PROVIDERS:
        return Route(name, row["provider"], row.get("upstream_model") or name, list(row.get("fallbacks") or []),
                     float(row.get("input_cost_per_1k") or 0), float(row.get("output_cost_per_1k") or 0))
    provider, sep, rest = name.partition("/")
    if sep and provider in PROVIDERS and rest and enabled(provider):
        return _priced(Route(name, provider, rest), models)
    if name == "echo":
        return Route(name, "echo", "echo")
    for prefix, provider in MODEL_PREFIXES:
        if name.startswith(prefix) and provider in PROVIDERS and enabled(provider):
            return _priced(Route(name, provider, name), models)
    raise ModelNotFound(f"The model '{name}' does not exist or is not routed by this proxy.", param="model")


def _priced(route: Route, models: dict[str, dict]) -> Route:
    """Take prices (and DB fallbacks) from a models row whose upstream id matches the route, if any."""
    for row in models.values():
        if row["provider"] == route.provider and (row.get("upstream_model") or row["name"]) == route.upstream_model:
            route.input_cost_per_1k = float(row.get("input_cost_per_1k") or 0)
            route.output_cost_per_1k = float(row.get("output_cost_per_1k") or 0)
            break
    return route


@dataclass(frozen=True)
class RetryPolicy:
    """SPEC section 4's retry knobs (backoffs in milliseconds)."""

    max_retries: int = 3
    initial_backoff: float = 1000
    max_backoff: float = 30000
    factor: float = 2.0
    jitter: float = 0.1

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0-based); Retry-After wins when longer."""
        ms = min(self.max_backoff, self.initial_backoff * self.factor ** attempt)
        ms *= 1 + random.uniform(-self.jitter, self.jitter)
        if retry_after is not None:
            ms = max(ms, retry_after * 1000)
        return min(ms, self.max_backoff) / 1000


class Circuit:
    """A per-provider circuit breaker: 5 consecutive failures open it for 30 s, then one trial decides."""

    def __init__(self):
        self.lock = threading.Lock()
        self.failures = 0
        self.opened_at: float | None = None
        self.trial_running = False
        self.requests = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_latency_ms: float | None = None

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "open" if time.time() - self.opened_at < CIRCUIT_OPEN_SECONDS else "half_open"

    def allow(self) -> bool:
        """Whether a request may go to this provider now (one trial at a time when half open)."""
        with self.lock:
            state = self.state
            if state == "closed":
                return True
            if state == "half_open" and not self.trial_running:
                self.trial_running = True
                return True
            return False

    def success(self, latency_ms: float) -> None:
        with self.lock:
            self.requests += 1
            self.failures, self.opened_at, self.trial_running = 0, None, False
            self.last_latency_ms = latency_ms

    def release(self) -> None:
        """The call ended without an answer from the provider (our own error): free a half-open trial."""
        with self.lock:
            self.trial_running = False

    def failure(self, message: str) -> None:
        with self.lock:
            self.requests += 1
            self.errors += 1
            self.failures += 1
            self.last_error, self.last_error_at = message, time.time()
            if self.trial_running or self.failures >= CIRCUIT_FAILURES:
                self.opened_at = time.time()
            self.trial_running = False

    def snapshot(self) -> dict:
        return {"circuit": self.state, "requests": self.requests, "errors": self.errors,
                "last_error": self.last_error, "last_error_at": self.last_error_at,
                "last_latency_ms": self.last_latency_ms}


CIRCUITS: dict[str, Circuit] = {name: Circuit() for name in PROVIDERS}
MAX_HOST_CIRCUITS = 1000  # breakers kept for /execute's own hosts (EXECUTE_ALLOWED_HOSTS=* allows any)


def circuit_for(name: str) -> Circuit:
    """The breaker of a provider, or of an /execute host (made on first use). Past MAX_HOST_CIRCUITS
    hosts, the closed ones are forgotten first (they hold nothing a fresh breaker lacks), so
    client-chosen hosts cannot grow the map without bound; open ones stay open."""
    circuit = CIRCUITS.get(name)
    if circuit is None:
        if len(CIRCUITS) >= len(PROVIDERS) + MAX_HOST_CIRCUITS:
            for other, breaker in list(CIRCUITS.items()):
                if other not in PROVIDERS and breaker.state == "closed":
                    CIRCUITS.pop(other, None)
        circuit = CIRCUITS.setdefault(name, Circuit())
    return circuit


@dataclass
class Target:
    """One model to try: its route and the endpoint (URL, key, API version) to reach it."""

    route: Route
    endpoint: Endpoint


@dataclass
class Outcome:
    """What a successful send produced. For streams `chunks` yields the rest of the stream."""

    target: Target
    attempts: int
    upstream_seconds: float
    completion: dict | None = None
    chunks: Iterator[dict] | None = None
    failures: list[dict] = field(default_factory=list)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _status_error(adapter: Adapter, resp: requests.Response) -> UpstreamError:
    """Turn an upstream non-2xx answer into our error, keeping its status and message."""
    status = resp.status_code
    if resp.encoding is None:  # LeanAdapter leaves it unset; decode the text as requests would
        resp.encoding = get_encoding_from_headers(resp.headers)
    try:
        message = adapter.error_message(resp.json())
    except ValueError:
        message = (resp.text or "").strip()[:200] or resp.reason or "no error message"
    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
    text = f"{adapter.name} returned {status}: {message}"
    if 400 <= status < 500 and status not in RETRYABLE_STATUSES:
        err_type = "authentication_error" if status == 401 else (
            "permission_error" if status == 403 else "not_found" if status == 404 else "invalid_request_error")
        return UpstreamError(text, status=status, type=err_type, upstream_status=status, retryable=False)
    return UpstreamError(text, upstream_status=status, retry_after=retry_after)


def _translate_exception(adapter: Adapter, exc: requests.RequestException) -> UpstreamError:
    """Map requests' exceptions to ours, without leaking URLs (they may carry keys)."""
    if isinstance(exc, requests.Timeout) and not isinstance(exc, requests.ConnectTimeout):
        return UpstreamTimeout(f"{adapter.name} did not answer in time")
    if isinstance(exc, requests.ConnectTimeout):
        return UpstreamTimeout(f"could not connect to {adapter.name} in time")
    if isinstance(exc, requests.ConnectionError):
        return UpstreamError(f"connection to {adapter.name} failed")
    return UpstreamError(f"request to {adapter.name} failed ({type(exc).__name__})")


@lru_cache(maxsize=1024)
def _upstream_url(url: str) -> tuple[str, str | None]:
    """requests' own preparation of a URL (quoting, IDNA, validation), once per distinct URL, and the
    Basic Authorization requests would derive from credentials in it (None without any)."""
    prepared = PreparedRequest()
    prepared.prepare_url(url, None)
    user, password = get_auth_from_url(prepared.url)
    return prepared.url, (_basic_auth_str(user, password) if user or password else None)


@lru_cache(maxsize=4096)
def _check_header(name: str, value: str) -> None:
    """requests' check of a header (InvalidHeader for a newline or leading space), once per distinct header."""
    check_header_validity((name, value))


def _json_body(payload: dict) -> bytes:
    """The payload as JSON, refused like requests' json= refuses it (NaN, infinities), but compact and in
    UTF-8 rather than ASCII escapes."""
    try:
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise InvalidJSONError(exc) from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the client's JSON): escape it, as requests does
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("ascii")


def _prepare(url: str, headers: dict, payload: dict) -> PreparedRequest:
    """What requests.Request("POST", url, json=payload, headers=...).prepare() builds, with less work:
    the URL is prepared once per distinct URL, the body encoded once, the session's default headers
    first, then the adapter's (each checked as requests checks them)."""
    url, basic_auth = _upstream_url(url)
    merged = CaseInsensitiveDict()
    for name, value in (*SESSION.headers.items(), *headers.items()):
        _check_header(name, value)
        merged[name] = value
    prepared = PreparedRequest()
    prepared.method, prepared.url, prepared.body = "POST", url, _json_body(payload)
    if "content-type" not in merged:
        merged["Content-Type"] = "application/json"
    merged["Content-Length"] = str(len(prepared.body))
    if basic_auth:
        merged["Authorization"] = basic_auth
    prepared.headers = merged
    return prepared


def _read_body(resp: requests.Response) -> bytes:
    """The whole body (requests' Response.content, with its error mapping), then the connection is
    released: back to the pool after a full read, closed after a failed one."""
    try:
        return resp.content
    finally:
        resp.close()


def _attempt(target: Target, body: dict, stream: bool, read_timeout: float):
    """One upstream call: (a completion dict, or (first_chunk, rest_iterator) for streams, upstream seconds).

    The upstream seconds run from just before the bytes go out to the end of the body (the first
    chunk for streams): building and encoding the request, and parsing the answer, are our own time.
    """
    adapter, model = target.route.adapter, target.route.upstream_model
    if adapter.local:
        completion = adapter.respond(body, model)
        return (completion if not stream else _first_and_rest(chunks_from_completion(completion))), 0.0
    url, headers, payload = adapter.build_request(body, model, target.endpoint, stream)
    try:
        # Session.post's steps, cut down to what a provider call needs: the session's default headers
        # are its only session state (no cookies, auth or params to merge), and the environment is
        # consulted only if a proxy is set. The transport adapter's send() is called directly, so
        # redirects are never followed: a provider API does not redirect POSTs, and following one
        # could lead /execute past its private-address check.
        prepared = _prepare(url, headers, payload)
        transport = (PUBLIC_SESSION if target.endpoint.public_only else SESSION).get_adapter(prepared.url)
        if SESSION.trust_env:
            settings = SESSION.merge_environment_settings(prepared.url, {}, stream, None, None)
            verify, cert, proxies = settings["verify"], settings["cert"], settings["proxies"]
        else:
            verify, cert, proxies = SESSION.verify, None, {}
        sent = time.perf_counter()
        resp = transport.send(prepared, stream=True, timeout=(CONNECT_TIMEOUT, read_timeout), verify=verify,
                              cert=cert, proxies=proxies)
        if not 200 <= resp.status_code < 300:
            _read_body(resp)  # here, where a dropped connection is still a failed request
            raise _status_error(adapter, resp)
        if not stream:
            content = _read_body(resp)
            waited = time.perf_counter() - sent
    except requests.RequestException as exc:
        raise _translate_exception(adapter, exc) from None
    if not stream:
        return adapter.parse_response(loads_upstream(content, adapter.name), model), waited
    chunks = _guarded_stream(adapter, resp, model)
    try:
        first_and_rest = _first_and_rest(chunks)
    except BaseException:
        chunks.close()
        raise
    return first_and_rest, time.perf_counter() - sent


def _guarded_stream(adapter: Adapter, resp: requests.Response, model: str) -> Iterator[dict]:
    """Relay the adapter's chunks; a dropped connection becomes an UpstreamError; always release upstream.

    Once the adapter has seen the stream's end, the rest of the body (the end of the chunked encoding)
    is read too, so the connection goes back to the pool: the next call skips a TCP and TLS handshake.
    A stream given up early (the client went away, an error) is closed, never handed out again.
    """
    lines = resp.iter_lines(chunk_size=None)
    try:
        yield from adapter.parse_stream(lines, model)
        _read_to_end(resp, lines)
    except requests.RequestException as exc:
        raise _translate_exception(adapter, exc) from None
    finally:
        resp.close()  # back to the pool when read to the end, else closed


STREAM_TAIL_LINES = 8     # lines that may follow a stream's end marker (blank ones, say) before the body ends
STREAM_TAIL_TIMEOUT = 0.25  # seconds to wait for them; a provider that keeps the body open loses its reuse


def _read_to_end(resp: requests.Response, lines: Iterator[bytes]) -> None:
    """Read what little follows the end marker, briefly, so the body counts as consumed (requests then
    releases the connection to the pool instead of closing it); give up quietly otherwise."""
    sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
    timeout = sock.gettimeout() if sock is not None else None
    try:
        if sock is not None:
            sock.settimeout(STREAM_TAIL_TIMEOUT)
        for _ in itertools.islice(lines, STREAM_TAIL_LINES):
            pass
    except (requests.RequestException, OSError):
        pass  # not consumed: resp.close() closes the connection
    finally:
        # Read to the end, the connection is back in the pool and maybe another call's already (which
        # urllib3 gave its own timeout); only a connection still ours gets its timeout back.
        if sock is not None and getattr(resp.raw, "connection", None) is not None:
            try:
                sock.settimeout(timeout)
            except OSError:
                pass


def _first_and_rest(chunks: Iterator[dict]):
    """Pull the first chunk now, so that failures before the first byte can still fail over."""
    try:
        first = next(chunks)
    except StopIteration:
        raise UpstreamError("the provider closed the stream without sending anything") from None
    return first, chunks


def send(targets: list[Target], body: dict, stream: bool, policy: RetryPolicy, read_timeout: float,
         sleep: Callable[[float], None] = time.sleep) -> Outcome:
    """Try each target in turn with retries and backoff; return the first success or raise the last error.

    A 400/413/422 (the request itself is wrong) is raised at once; 401/403/404 moves on to the next
    target; retryable failures are retried up to policy.max_retries times, then fall over.
    """
    attempts, waited = 0, 0.0
    failures: list[dict] = []
    last: UpstreamError | None = None
    for index, target in enumerate(targets):
        provider = target.route.provider
        circuit = circuit_for(provider)
        for retry in range(policy.max_retries + 1):
            if not circuit.allow():  # no upstream call is made, so no failure row either
                last = UpstreamError(f"{provider} is unavailable (circuit open)")
                break
            attempts += 1
            started = time.perf_counter()
            try:
                result, upstream_seconds = _attempt(target, body, stream, read_timeout)
            except UpstreamError as exc:
                elapsed = time.perf_counter() - started
                waited += elapsed
                last = exc
                failures.append({"model": target.route.name, "provider": provider, "error": exc.message,
                                 "status": exc.upstream_status, "latency_ms": elapsed * 1000})
                if exc.retryable or exc.upstream_status in FALLBACK_STATUSES:
                    circuit.failure(exc.message)
                else:
                    circuit.success(elapsed * 1000)  # the provider answered; the request was wrong
                    raise _with_attempts(exc, attempts, failures) from None
                if exc.upstream_status in FALLBACK_STATUSES and index + 1 < len(targets):
                    break
                if not exc.retryable:
                    raise _with_attempts(exc, attempts, failures) from None
                if retry < policy.max_retries:
                    sleep(policy.delay(retry, exc.retry_after))
                continue
            except BaseException:  # e.g. a request the adapter cannot translate: not the provider's fault
                circuit.release()
                raise
            waited += upstream_seconds
            circuit.success((time.perf_counter() - started) * 1000)
            if stream:
                first, rest = result
                return Outcome(target, attempts, waited, chunks=_prepend(first, rest), failures=failures)
            return Outcome(target, attempts, waited, completion=result, failures=failures)
    if last is None:
        last = UpstreamError("no provider could be tried")
    raise _with_attempts(last, attempts, failures)


def _with_attempts(exc: UpstreamError, attempts: int, failures: list[dict]) -> UpstreamError:
    """Attach what was tried to the error: the handler reports attempts, the gateway costs failures."""
    exc.attempts, exc.failures = attempts, failures
    return exc


def _prepend(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    try:
        yield first
        yield from rest
    finally:
        close = getattr(rest, "close", None)
        if close:
            close()


def list_provider_models(adapter: Adapter, endpoint: Endpoint, read_timeout: float = 15.0) -> list[dict]:
    """Ask a provider for its model list (GET /v1/models?refresh=1)."""
    if adapter.local:
        return adapter.parse_models({})
    url, headers = adapter.models_request(endpoint)
    try:
        resp = SESSION.get(url, headers=headers, timeout=(CONNECT_TIMEOUT, read_timeout))
    except requests.RequestException as exc:
        raise _translate_exception(adapter, exc) from None
    with resp:
        if resp.status_code != 200:
            raise _status_error(adapter, resp)
        return adapter.parse_models(loads_upstream(resp.content, adapter.name))

"""llm-proxy: the Flask app — factory, request hooks, error handlers and the client API handlers."""
from __future__ import annotations

import json
import logging
import re
import secrets
import sys
import time
from dataclasses import dataclass

import click
from dotenv import load_dotenv
from flask import Flask, Response, current_app, g, request, send_from_directory
from werkzeug.exceptions import HTTPException

import cache
import limits
import refine
from auth import Caller, authenticate, authenticate_admin
from config import Config, ConfigError, load_config
from db import Database, usd
from errors import APIError, InvalidJSON, InvalidRequest, ServiceUnavailable
from gateway import Gateway
from jobs import JobQueue, wants_async
from providers import PROVIDERS, configure_session, list_provider_models
from validate import validate_chat

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
HTTP_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
                    415: "unsupported_media_type", 429: "rate_limit_exceeded"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
}
JSON_TYPES = ("application/json",)
ARRIVED = "llm_proxy.arrived"  # WSGI environ key: perf_counter() when the request reached the app
log = logging.getLogger("llm_proxy")


@dataclass
class State:
    """What every handler needs: the config, the database and the gateway."""

    config: Config
    db: Database
    gateway: Gateway


def state() -> State:
    """The running app's State."""
    return current_app.extensions["llm_proxy"]


def dumps(obj) -> bytes:
    """Compact JSON, encoded once."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
    """A JSON response from a dict."""
    return Response(dumps(obj), status=status, headers=headers, mimetype="application/json")


def error_response(exc: APIError) -> Response:
    """The SPEC's error JSON for one of our errors."""
    return json_response(exc.to_dict(), exc.status, exc.headers)


# -- request plumbing -------------------------------------------------------------------------------

def json_body() -> dict:
    """The request's JSON object: 415 for a non-JSON content type, 400 for bad or non-object JSON."""
    ctype = (request.mimetype or "").lower()
    if ctype and ctype not in JSON_TYPES and not ctype.endswith("+json"):
        raise APIError("Content-Type must be application/json.", status=415, type="unsupported_media_type")
    raw = request.get_data(cache=True)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidJSON(f"The request body is not valid JSON ({exc.__class__.__name__}).") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def client(spending: bool = False) -> Caller:
    """Authenticate a client-API caller (static key, admin key or virtual key); spending: see authenticate."""
    s = state()
    caller = authenticate(request.headers, s.config, s.db, spending)
    g.log["key_id"] = caller.log_id
    g.caller = caller
    return caller


def admin() -> Caller:
    """Authenticate an admin-API caller."""
    s = state()
    caller = authenticate_admin(request.headers, s.config, s.db)
    g.log["key_id"] = caller.log_id
    return caller


def note_request(model: str, messages) -> None:
    """Put the model, and the prompt only when LOG_BODIES is on, in the access-log line."""
    g.log["model"] = model
    if state().config.log_bodies:
        g.log["messages"] = messages


def call_headers(route, attempts: int, cost_nusd: int, upstream_seconds: float) -> dict:
    """SPEC section 3's response headers for a call: who answered, attempts, cost and our overhead.

    The overhead is measured again, as late as it can be, when the response leaves (finish_response).
    """
    g.upstream_seconds = upstream_seconds
    overhead = max(0.0, (time.perf_counter() - g.started) - upstream_seconds) * 1000
    g.log.update(provider=route.provider, model=route.name, attempts=attempts, cost=usd(cost_nusd))
    return {"x-llm-provider": route.provider, "x-llm-model": route.name, "x-llm-attempts": str(attempts),
            "x-llm-cost": usd(cost_nusd), "x-llm-overhead-ms": f"{overhead:.2f}"}


# -- handlers ---------------------------------------------------------------------------------------

def chat_completions():
    """POST /v1/chat/completions: authenticate, validate, route, call, respond (or stream)."""
    caller = client(spending=True)
    body = json_body()
    validate_chat(body)
    num_calls = refine.num_calls(request.headers, state().config)
    note_request(body["model"], body["messages"])
    gw = state().gateway
    targets = gw.plan(body["model"], body.get("fallbacks"), caller, request.headers.get("x-llm-apikey"))
    g.rate_headers = limits.admit(state().db, caller, body, g.request_id)  # 402/429; headers added by keys.py
    if wants_async(request.headers, body):  # SPEC 7: queue it, answer 202 at once
        queued = current_app.extensions["jobs"].submit(g.request_id, caller, body, num_calls,
                                                       request.headers.get("x-llm-apikey"))
        return json_response(queued, 202, {"Location": f"{request.path}/{queued['request_id']}"})
    cached = cache.lookup(gw, request.headers, body, num_calls, g.request_id, caller)
    g.log["cached"] = bool(cached.hit)
    if body.get("stream"):
        return stream_chat(targets, body, caller, num_calls, cached)
    result = cached.hit or refine.complete(gw, targets, body, num_calls, g.request_id, caller)
    cached.store(result)
    g.log["tokens"] = result.completion["usage"].get("total_tokens")
    return json_response(result.completion, headers={**call_headers(
        result.route, result.attempts, result.cost_nusd, result.upstream_seconds), **cached.headers})


def stream_chat(targets, body: dict, caller: Caller, num_calls: int = 1, cached: cache.Lookup = cache.OFF) -> Response:
    """Open the upstream stream (failing over before the first chunk) and relay it as SSE.

    With refinement only the last call streams; a cache hit is replayed, a miss stored once it ends.
    """
    stream_state, chunks = cached.replay() if cached.hit else cached.capture(
        *refine.open_stream(state().gateway, targets, body, num_calls, g.request_id, caller))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    headers = call_headers(stream_state.route, stream_state.attempts, 0, stream_state.upstream_seconds)
    del headers["x-llm-cost"]  # not known until the stream ends; it is in the usage row and the log
    headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **cached.headers})
    entry = g.log

    def events():
        try:
            yield from sse_events(chunks, include_usage)
        finally:
            chunks.close()
            usage = stream_state.usage or {}
            entry.update(tokens=usage.get("total_tokens"), cost=usd(stream_state.cost_nusd),
                         stream=("complete" if stream_state.finished else
                                 "error" if stream_state.error else "disconnected"))
            if stream_state.error:
                entry["error_type"] = stream_state.error.type

    return Response(events(), mimetype="text/event-stream", headers=headers)


def sse_events(chunks, include_usage: bool):
    """Frame chunk dicts as SSE; drop usage unless asked; an upstream error becomes a last error event."""
    try:
        for chunk in chunks:
            raw = getattr(chunk, "raw", None)  # the provider's own bytes, when they need no change
            if not include_usage and "usage" in chunk:
                if not chunk.get("choices") and chunk.get("usage"):
                    continue
                chunk.pop("usage")
                raw = None
            yield b"data: " + (raw.encode("utf-8") if raw is not None else dumps(chunk)) + b"\n\n"
    except APIError as exc:
        yield b"data: " + dumps(exc.to_dict()) + b"\n\n"
        return
    yield b"data: [DONE]\n\n"


def job_status(request_id: str):
    """GET /v1/chat/completions/<request_id>: an async request's status, for the key that submitted it."""
    return json_response(current_app.extensions["jobs"].status(request_id, client()))


def list_models():
    """GET /v1/models: configured models this caller can reach; providers' own lists with ?refresh=1."""
    caller = client()
    gw = state().gateway
    models, _ = gw.catalog()
    data, seen = [], set()
    for name, row in sorted(models.items()):
        if caller.models is not None and name not in caller.models:
            continue
        if gw.provider_enabled(row["provider"]) and gw.endpoint(row["provider"], caller) is not None:
            data.append({"id": name, "object": "model", "created": 0, "owned_by": PROVIDERS[row["provider"]].owned_by})
            seen.add(name)
    if request.args.get("refresh") in ("1", "true", "yes"):
        for name, adapter in PROVIDERS.items():
            endpoint = gw.endpoint(name, caller) if gw.provider_enabled(name) else None
            if endpoint is None:
                continue
            try:
                listed = list_provider_models(adapter, endpoint)
            except APIError as exc:
                log.warning(json.dumps({"event": "model_list_failed", "provider": name, "error": exc.message}))
                continue
            for m in listed:
                if m["id"] not in seen and (caller.models is None or m["id"] in caller.models):
                    data.append(m)
                    seen.add(m["id"])
    return json_response({"object": "list", "data": data})


def health():
    """GET /health: ok, or 503 when the database does not answer."""
    try:
        state().db.ping()
    except ServiceUnavailable as exc:
        return json_response({"status": "error", "error": exc.message}, 503)
    return json_response({"status": "ok"})


def index():
    """GET /: the web UI."""
    return send_from_directory(current_app.static_folder, "index.html")


# -- hooks ------------------------------------------------------------------------------------------

def begin_request() -> None:
    """Request id, start time and the access-log entry."""
    g.started = request.environ.get(ARRIVED, 0.0) or time.perf_counter()
    given = request.headers.get("X-Request-ID", "")
    g.request_id = given if REQUEST_ID.match(given) else "req_" + secrets.token_hex(16)
    g.log = {"request_id": g.request_id, "method": request.method, "path": request.path}


def finish_response(response: Response) -> Response:
    """Security and CORS headers, the request id, and the access log line once the body is sent."""
    response.headers.extend(SECURITY_HEADERS)  # set only here: add, not update (which scans per header)
    response.headers["X-Request-ID"] = g.get("request_id", "")
    origin = request.headers.get("Origin")
    allowed = state().config.cors_origins
    if origin and (origin in allowed or "*" in allowed):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
        response.headers["Access-Control-Expose-Headers"] = "X-Request-ID, x-llm-provider, x-llm-model, " \
            "x-llm-attempts, x-llm-cost, x-llm-overhead-ms, x-cache, Retry-After, x-ratelimit-limit-requests, " \
            "x-ratelimit-remaining-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens"
    if "x-llm-overhead-ms" in response.headers:  # the last moment our own time is knowable
        overhead = time.perf_counter() - g.started - g.get("upstream_seconds", 0.0)
        response.headers["x-llm-overhead-ms"] = f"{max(0.0, overhead) * 1000:.2f}"
    entry = g.get("log")
    if entry is not None:
        entry["status"] = response.status_code
        started = g.started
        response.call_on_close(lambda: write_access_log(entry, started))
    return response


def stamp_arrival(wsgi_app):
    """Wrap the WSGI app to note when each request arrives, before Flask's own routing and hooks."""
    def stamped(environ, start_response):
        environ[ARRIVED] = time.perf_counter()
        return wsgi_app(environ, start_response)
    return stamped


def cors_preflight() -> Response | None:
    """A browser's CORS preflight (OPTIONS with Origin) is answered before routing, for any path."""
    origin = request.headers.get("Origin")
    if request.method != "OPTIONS" or not origin:
        return None
    response = Response(status=204)
    allowed = state().config.cors_origins
    if origin in allowed or "*" in allowed:
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = request.headers.get(
            "Access-Control-Request-Headers", "Authorization, Content-Type")
        response.headers["Access-Control-Max-Age"] = "600"
    return response


def write_access_log(entry: dict, started: float) -> None:
    """One JSON line per request (SPEC section 11); never keys, prompts only with LOG_BODIES."""
    entry["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
    entry["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    entry["level"] = "error" if entry.get("status", 200) >= 500 else "info"
    log.info(json.dumps(entry, separators=(",", ":"), default=str))


def handle_api_error(exc: APIError) -> Response:
    """Our errors, in the SPEC's format."""
    g.setdefault("log", {})["error_type"] = exc.type
    response = error_response(exc)
    attempts = getattr(exc, "attempts", None)
    if attempts:
        response.headers["x-llm-attempts"] = str(attempts)
    return response


def handle_http_error(exc: HTTPException) -> Response:
    """Flask's own errors (404, 405, 413, ...) in the same JSON shape."""
    code = exc.code or 500
    err_type = HTTP_ERROR_TYPES.get(code, "invalid_request_error" if code < 500 else "internal_error")
    message = {404: "No such endpoint.", 405: f"Method {request.method} is not allowed here.",
               413: "The request body is too large."}.get(code, exc.description or exc.name)
    g.setdefault("log", {})["error_type"] = err_type
    response = error_response(APIError(message, status=code, type=err_type))
    if code == 405 and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def handle_unexpected(exc: Exception) -> Response:
    """Last resort: log the traceback, answer internal_error with the request id and nothing internal."""
    if isinstance(exc, HTTPException):
        return handle_http_error(exc)
    log.exception(json.dumps({"event": "unhandled_exception", "request_id": g.get("request_id")}))
    g.setdefault("log", {})["error_type"] = "internal_error"
    return error_response(APIError(f"Internal error (request id {g.get('request_id', '')}).",
                                   status=500, type="internal_error"))


# -- the app ----------------------------------------------------------------------------------------

class JSONLogFormatter(logging.Formatter):
    """Log records that are already JSON pass through; others are wrapped as JSON."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if msg.startswith("{"):
            text = msg
        else:
            text = json.dumps({"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
                               "message": msg})
        if record.exc_info:  # tracebacks go to the log, never to the client
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging(level: str) -> None:
    """JSON lines on stdout, at LOG_LEVEL (the handler is added once per process)."""
    if not any(isinstance(h.formatter, JSONLogFormatter) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JSONLogFormatter())
        log.addHandler(handler)
    log.setLevel(getattr(logging, level.upper(), logging.INFO))
    log.propagate = False


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app: read the config once, open the database, apply the schema, register everything."""
    load_dotenv()
    config = load_config()
    if test_config:
        config = config.with_overrides(**test_config)
    configure_logging(config.log_level)
    configure_session(config.upstream_pool_size, config.upstream_trust_env, config.upstream_ca_bundle)
    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    db = Database(config.database_url)
    db.init_schema()
    app.extensions["llm_proxy"] = State(config, db, Gateway(config, db))
    app.extensions["jobs"] = JobQueue(config, db, app.extensions["llm_proxy"].gateway)
    # Each gunicorn worker builds its own app (no preload): a pool per process. A one-off
    # `flask <command>` (init-db, create-key) runs inside click and starts none.
    if config.start_workers and click.get_current_context(silent=True) is None:
        app.extensions["jobs"].start()

    app.wsgi_app = stamp_arrival(app.wsgi_app)
    app.before_request(begin_request)
    app.before_request(cors_preflight)
    app.after_request(finish_response)
    app.register_error_handler(APIError, handle_api_error)
    app.register_error_handler(HTTPException, handle_http_error)
    app.register_error_handler(Exception, handle_unexpected)

    for prefix in ("/v1", ""):
        app.add_url_rule(f"{prefix}/chat/completions", f"chat{prefix}", chat_completions, methods=["POST"])
        app.add_url_rule(f"{prefix}/chat/completions/<request_id>", f"job{prefix}", job_status, methods=["GET"])
        app.add_url_rule(f"{prefix}/models", f"models{prefix}", list_models, methods=["GET"])
    app.add_url_rule("/health", "health", health, methods=["GET"])
    from seeds import bp as seeds_bp  # seeds.py builds on this module's helpers, so it is imported late
    app.register_blueprint(seeds_bp)
    from keys import register as register_keys  # the admin API, also built on this module's helpers
    register_keys(app)
    app.add_url_rule("/", "index", index, methods=["GET"])
    register_cli(app)
    return app


def register_cli(app: Flask) -> None:
    """`flask --app app init-db`."""

    @app.cli.command("init-db")
    def init_db_command():
        """Apply schema.sql (idempotent) to DATABASE_URL."""
        state_ = app.extensions["llm_proxy"]
        state_.db.init_schema()
        click.echo(f"Initialized the database ({'PostgreSQL' if state_.db.is_pg else state_.db.path}).")


def __getattr__(name: str):
    """`app:app` for gunicorn and flask: build the app on first use, not at import (tests import create_app)."""
    if name == "app":
        global app
        try:
            app = create_app()
        except ConfigError as exc:
            sys.stderr.write(f"llm-proxy: configuration error: {exc}\n")
            raise SystemExit(2) from None
        return app
    raise AttributeError(name)


if __name__ == "__main__":
    cfg = load_config()
    __getattr__("app").run(host="0.0.0.0", port=cfg.port, threaded=True)

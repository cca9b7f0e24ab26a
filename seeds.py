"""The seeds' own interfaces (SPEC section 6): /execute, /api/query, /api/status and /llm/*.

Each is a thin translation onto the same gateway as /v1/chat/completions, so routing, keys,
retries, fallback, circuit breakers, usage rows and costs behave exactly as they do there.
"""
from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from flask import Blueprint, Response, g, request

import cache
import limits
import refine
from adapters import Adapter, Endpoint, OpenAIAdapter
from app import REQUEST_ID, call_headers, client, dumps, json_body, json_response, note_request, state, stream_chat
from db import usd
from errors import (
    APIError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    ProviderNotConfigured,
    UpstreamError,
    ValidationError,
)
from providers import CIRCUITS, PROVIDERS, Route, Target, list_provider_models
from urlguard import EndpointNotAllowed, check_public, host_and_port
from validate import validate_chat

bp = Blueprint("seeds", __name__)

# Engine ids of the /llm/* seed -> (our provider, display name).
ENGINES = {
    "openai": ("openai", "OpenAI"), "anthropic": ("anthropic", "Anthropic"), "mistralai": ("mistral", "Mistral AI"),
    "google": ("gemini", "Google Gemini"), "xai": ("xai", "xAI"), "groq": ("groq", "Groq"),
    "cerebras": ("cerebras", "Cerebras"), "deepseek": ("deepseek", "DeepSeek"),
    "openrouter": ("openrouter", "OpenRouter"), "ollama": ("ollama", "Ollama"),
}
# Provider names /api/query accepts in `model` besides our own provider names.
PROVIDER_ALIASES = {"claude": "anthropic", "google": "gemini", "mistralai": "mistral", "grok": "xai"}
DEFAULT_TASK = "text_generation"
STATUS_WINDOW = 3600  # seconds of usage rows counted by /api/status
MODEL_LIST_TIMEOUT = 5.0  # seconds; /llm/models falls back to the configured list when a provider is slow
TEXT_MIME_TYPES = ("application/json", "application/xml", "application/x-yaml", "application/yaml",
                   "application/javascript", "application/x-sh", "application/sql")
CHAT_OPTIONS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed")


# -- POST /execute ----------------------------------------------------------------------------------

class ExactURLAdapter(OpenAIAdapter):
    """An OpenAI-compatible endpoint given as its full chat-completions URL: posts to exactly that URL."""

    def build_request(self, body: dict, model: str, endpoint: Endpoint, stream: bool):
        """OpenAI's translation, sent to endpoint.base_url as it is (no /chat/completions appended)."""
        _, headers, payload = super().build_request(body, model, endpoint, stream)
        return endpoint.base_url, headers, payload


@dataclass
class ExecuteRoute(Route):
    """A route whose adapter is given rather than looked up in PROVIDERS (the endpoint is the client's)."""

    exact_adapter: Adapter | None = None

    @property
    def adapter(self) -> Adapter:
        return self.exact_adapter


def header(name: str) -> str:
    """A required request header; 400 naming it when missing or empty."""
    value = (request.headers.get(name) or "").strip()
    if not value:
        raise InvalidRequest(f"Missing required header {name}.", param=name)
    return value


def check_endpoint(url: str, config) -> str:
    """Check an /execute URL against EXECUTE_ALLOWED_HOSTS and ALLOW_PRIVATE_URLS; returns its host."""
    target = host_and_port(url)
    if target is None:
        raise InvalidRequest("x-llm-endpoint must be an absolute http(s) URL.", param="x-llm-endpoint")
    host, port = target
    allowed = {h.lower() for h in config.execute_allowed_hosts}
    if "*" not in allowed and host not in allowed:
        raise EndpointNotAllowed(f"The host '{host}' is not in EXECUTE_ALLOWED_HOSTS.", param="x-llm-endpoint")
    if not config.allow_private_urls:
        try:
            check_public(host, port, what="x-llm-endpoint", param="x-llm-endpoint")
        except OSError:
            raise UpstreamError("The x-llm-endpoint host name could not be resolved.") from None
    return host


def execute_target(url: str, key: str, model: str) -> Target:
    """A Target for the client's endpoint: a known provider's host is costed and circuit-broken as that
    provider; any other host gets its own breaker (providers.circuit_for), so one dead endpoint never
    opens a provider's circuit."""
    host = urlsplit(url).hostname.lower()
    label = next((name for name, a in PROVIDERS.items()
                  if a.default_base_url and urlsplit(a.default_base_url).hostname == host), f"execute:{host}")
    route = ExecuteRoute(model, label, model, exact_adapter=ExactURLAdapter(label))
    for row in state().gateway.catalog()[0].values():
        if row["provider"] == label and row["upstream_model"] == model:
            route.input_cost_per_1k = float(row["input_cost_per_1k"] or 0)
            route.output_cost_per_1k = float(row["output_cost_per_1k"] or 0)
            break
    return Target(route, Endpoint(url, key, public_only=not state().config.allow_private_urls))


@bp.post("/execute")
def execute():
    """POST /execute: call the client's OpenAI-compatible endpoint through the gateway."""
    caller = client(spending=True)
    url, key = header("x-llm-endpoint"), header("x-llm-apikey")
    num_calls = refine.num_calls(request.headers, state().config)
    check_endpoint(url, state().config)
    body = json_body()
    validate_chat(body)
    if caller.models is not None and body["model"] not in caller.models:
        raise PermissionDenied(f"This key may not use the model '{body['model']}'.", param="model")
    note_request(body["model"], body["messages"])
    targets = [execute_target(url, key, body["model"])]
    g.rate_headers = limits.admit(state().db, caller, body, g.request_id)
    if body.get("stream"):
        return stream_chat(targets, body, caller, num_calls)
    result = refine.complete(state().gateway, targets, body, num_calls, g.request_id, caller)
    g.log["tokens"] = result.completion["usage"].get("total_tokens")
    return json_response(result.completion, headers=call_headers(
        result.route, result.attempts, result.cost_nusd, result.upstream_seconds))


# -- POST /api/query, GET /api/status ---------------------------------------------------------------

def _string(body: dict, name: str, problems: list, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        problems.append({"path": name, "message": "must be a non-empty string"})
        return None
    return value.strip()


def _price(row: dict) -> float:
    return float(row["input_cost_per_1k"] or 0) + float(row["output_cost_per_1k"] or 0)


def query_models(model: str | None, task_type: str, caller, request_key: str | None) -> list[str]:
    """The models /api/query tries, best first: a named model; a provider's model for the task; or,
    by task type, the cheapest models of every available provider (echo only as a last resort)."""
    gw = state().gateway
    models = gw.catalog()[0]
    if model and (model in models or PROVIDER_ALIASES.get(model.lower(), model.lower()) not in PROVIDERS):
        return [model]
    if model:
        provider = PROVIDER_ALIASES.get(model.lower(), model.lower())
        pool = sorted((r for r in models.values() if r["provider"] == provider),
                      key=lambda r: (task_type not in r["task_types"], _price(r), r["name"]))
        if not pool:
            raise ModelNotFound(f"No model is configured for the provider '{model}'; name a model instead.",
                                param="model")
        return [r["name"] for r in pool]
    for_task = [r for r in models.values() if task_type in r["task_types"]]
    if not for_task:
        known = sorted({t for r in models.values() for t in r["task_types"]})
        raise ValidationError([{"path": "task_type", "message": "no model handles this task type; known: "
                                + ", ".join(known)}])
    usable = [r for r in for_task if (caller.models is None or r["name"] in caller.models)
              and gw.provider_enabled(r["provider"]) and gw.endpoint(r["provider"], caller, request_key)]
    if not usable:
        raise ProviderNotConfigured(f"No configured provider offers a model for the task type '{task_type}'.",
                                    param="task_type")
    return [r["name"] for r in sorted(usable, key=lambda r: (r["provider"] == "echo", _price(r), r["name"]))]


@bp.post("/api/query")
def api_query():
    """POST /api/query {query, model?, task_type?, request_id?}: one question, one answer, routed by task."""
    caller = client(spending=True)
    body = json_body()
    problems: list[dict] = []
    query = _string(body, "query", problems, required=True)
    model, task_type = _string(body, "model", problems), _string(body, "task_type", problems) or DEFAULT_TASK
    request_id = _string(body, "request_id", problems)
    if request_id and not REQUEST_ID.match(request_id):
        problems.append({"path": "request_id", "message": "must be at most 128 characters of [A-Za-z0-9._-]"})
    if problems:
        raise ValidationError(problems)
    if request_id:
        g.request_id = g.log["request_id"] = request_id
    num_calls = refine.num_calls(request.headers, state().config)
    request_key = request.headers.get("x-llm-apikey")
    names = query_models(model, task_type, caller, request_key)
    note_request(names[0], [{"role": "user", "content": query}])
    gw = state().gateway
    targets = gw.plan(names[0], names[1:], caller, request_key)
    chat = {"model": names[0], "messages": [{"role": "user", "content": query}]}
    g.rate_headers = limits.admit(state().db, caller, chat, g.request_id)
    cached = cache.lookup(gw, request.headers, chat, num_calls, g.request_id, caller)
    result = cached.hit or refine.complete(gw, targets, chat, num_calls, g.request_id, caller)
    cached.store(result)
    usage = result.completion["usage"]
    g.log.update(tokens=usage.get("total_tokens"), cached=bool(cached.hit))
    answer = {"request_id": g.request_id, "model": result.route.name, "provider": result.route.provider,
              "response": result.completion["choices"][0]["message"].get("content") or "", "usage": usage,
              "latency_ms": round((time.perf_counter() - g.started) * 1000, 2), "cached": bool(cached.hit)}
    return json_response(answer, headers={**call_headers(result.route, result.attempts, result.cost_nusd,
                                                         result.upstream_seconds), **cached.headers})


def count_recent_usage(db, since: float) -> dict[str, dict]:
    """Upstream calls and failed calls per provider since a time (cache hits excluded), from every worker."""
    rows = db.query("SELECT provider, COUNT(*) AS requests, "
                    "SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END) AS errors "
                    "FROM usage WHERE created_at >= ? AND cached = 0 GROUP BY provider", (since,))
    return {r["provider"]: {"requests": int(r["requests"]), "errors": int(r["errors"] or 0)} for r in rows}


@bp.get("/api/status")
def api_status():
    """GET /api/status: per provider, configured or not, its circuit, recent counts and last error/latency.

    Counts come from the usage table (every worker, the last STATUS_WINDOW seconds); the circuit and
    the last error/latency are this worker's own view, as each process keeps its own breakers.
    """
    caller = client()
    gw = state().gateway
    gw.db.usage.flush()  # this worker's queued usage rows count too
    recent = count_recent_usage(gw.db, time.time() - STATUS_WINDOW)
    out = {}
    for name in PROVIDERS:
        enabled = gw.provider_enabled(name)
        snap = CIRCUITS[name].snapshot()
        out[name] = {"configured": enabled and gw.endpoint(name, caller) is not None, "enabled": enabled,
                     "circuit": snap["circuit"], **recent.get(name, {"requests": 0, "errors": 0}),
                     "last_error": snap["last_error"] if caller.is_admin else None,
                     "last_error_at": snap["last_error_at"],
                     "last_latency_ms": snap["last_latency_ms"]}
    return json_response({"window_seconds": STATUS_WINDOW, "providers": out})


# -- /llm/engines, /llm/models/<engine>, /llm/chat ----------------------------------------------------

def optional_body() -> dict:
    """The JSON body of a GET-or-POST endpoint; none at all is an empty object."""
    return json_body() if request.method == "POST" and request.get_data(cache=True).strip() else {}


def engine_key(body: dict, engine: str) -> str | None:
    """The per-request key a /llm/* body carries for an engine (`<engine>Key`, or `<provider>Key`)."""
    for name in (f"{engine}Key", f"{ENGINES[engine][0]}Key"):
        value = body.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def engine_endpoint(engine: str, caller, body: dict) -> Endpoint | None:
    """The endpoint for an engine with the body's key, the virtual key's or the server's; None when unusable."""
    gw = state().gateway
    provider = ENGINES[engine][0]
    if provider not in PROVIDERS or not gw.provider_enabled(provider):
        return None
    return gw.endpoint(provider, caller, engine_key(body, engine))


def known_engine(engine) -> str:
    """The engine id, or 400 naming the known ones."""
    if not isinstance(engine, str) or engine not in ENGINES:
        raise ValidationError([{"path": "engine", "message": "must be one of " + ", ".join(ENGINES)}])
    return engine


@bp.route("/llm/engines", methods=["GET", "POST"])
def llm_engines():
    """GET|POST /llm/engines: the engines usable with a server key, a stored key or a `<engine>Key` in the body."""
    caller = client()
    body = optional_body()
    engines = [{"id": engine, "name": label} for engine, (_, label) in ENGINES.items()
               if engine_endpoint(engine, caller, body) is not None]
    return json_response({"engines": engines})


@bp.route("/llm/models/<engine>", methods=["GET", "POST"])
def llm_models(engine: str):
    """GET|POST /llm/models/<engine>: the configured models of that engine, plus the provider's own list."""
    caller = client()
    body = optional_body()
    engine = known_engine(engine)
    endpoint = engine_endpoint(engine, caller, body)
    provider = ENGINES[engine][0]
    if endpoint is None:
        raise ProviderNotConfigured(f"The engine '{engine}' has no API key configured.", param="engine")
    chat = []
    for row in sorted(state().gateway.catalog()[0].values(), key=lambda r: r["name"]):
        if row["provider"] == provider:
            chat.append({"id": row["name"], "name": row["name"], "meta": {
                "source": "config", "upstream_model": row["upstream_model"], "task_types": row["task_types"],
                "input_cost_per_1k": row["input_cost_per_1k"], "output_cost_per_1k": row["output_cost_per_1k"]}})
    seen = {m["id"] for m in chat} | {m["meta"]["upstream_model"] for m in chat}
    try:
        listed = list_provider_models(PROVIDERS[provider], endpoint, MODEL_LIST_TIMEOUT)
    except APIError:  # the configured list still answers when the provider's own list is unavailable
        listed = []
    for m in listed:
        model_id = m["id"].removeprefix(provider + "/")
        if model_id not in seen:
            seen.add(model_id)
            chat.append({"id": model_id, "name": model_id, "meta": {"source": "provider", "owned_by": m["owned_by"]}})
    return json_response({"models": {"chat": chat}})


def attachment_part(attachment, prompt: str) -> list | str:
    """The user message content for a prompt and an optional attachment: images as image_url parts,
    text files as text. `contents` (or `content`) is base64 or a data: URL for images, plain text
    (or a data: URL) for text."""
    if attachment is None:
        return prompt
    mime = attachment.get("mimeType") if isinstance(attachment, dict) else None
    contents = (attachment.get("contents") or attachment.get("content")) if isinstance(attachment, dict) else None
    if not isinstance(mime, str) or not isinstance(contents, str) or not contents:
        raise ValidationError([{"path": "attachment", "message": "must be {mimeType, contents} with string values"}])
    mime = mime.strip().lower()
    if mime.startswith("image/"):
        url = contents if contents.startswith(("data:", "https://", "http://")) else f"data:{mime};base64,{contents}"
        return [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}]
    if mime.startswith("text/") or mime in TEXT_MIME_TYPES or mime.endswith(("+json", "+xml")):
        text = _data_url_text(contents) if contents.startswith("data:") else contents
        name = attachment.get("name") or attachment.get("filename") or "attachment"
        return f"{prompt}\n\n--- {name} ({mime}) ---\n{text}"
    raise ValidationError([{"path": "attachment.mimeType",
                            "message": "only image/* and text attachments are supported"}])


def _data_url_text(url: str) -> str:
    meta, _, data = url.partition(",")
    if not meta.endswith(";base64"):
        return data
    try:
        return base64.b64decode(data, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise ValidationError([{"path": "attachment.contents", "message": "is not base64 UTF-8 text"}]) from None


def engine_model(provider: str, model: str) -> str:
    """The model name that routes to this engine: a configured model of it, or `provider/model`."""
    row = state().gateway.catalog()[0].get(model)
    if model.startswith(provider + "/") or (row is not None and row["provider"] == provider):
        return model
    return f"{provider}/{model}"


def chat_messages(body: dict) -> list:
    """The conversation of a /llm/chat body: `messages`, then the prompt (with its attachment)."""
    messages = body.get("messages")
    if messages is not None and not isinstance(messages, list):
        raise ValidationError([{"path": "messages", "message": "must be an array of messages"}])
    messages = list(messages or [])
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValidationError([{"path": "prompt", "message": "must be a string"}])
    if prompt or body.get("attachment") is not None:
        messages = (messages or []) + [{"role": "user", "content": attachment_part(body.get("attachment"),
                                                                                 prompt or "")}]
    return messages


@bp.post("/llm/chat")
def llm_chat():
    """POST /llm/chat: stream the answer as NDJSON lines (content ..., usage, then done)."""
    caller = client(spending=True)
    body = json_body()
    engine = known_engine(body.get("engine"))
    if not isinstance(body.get("model"), str) or not body["model"].strip():
        raise ValidationError([{"path": "model", "message": "must be a non-empty string"}])
    provider = ENGINES[engine][0]
    chat = {"model": engine_model(provider, body["model"].strip()), "messages": chat_messages(body), "stream": True,
            **{k: body[k] for k in CHAT_OPTIONS if k in body}}
    validate_chat(chat)
    note_request(chat["model"], chat["messages"])
    gw = state().gateway
    targets = gw.plan(chat["model"], None, caller, engine_key(body, engine))
    g.rate_headers = limits.admit(state().db, caller, chat, g.request_id)
    stream_state, chunks = gw.open_stream(targets, chat, g.request_id, caller)
    headers = call_headers(stream_state.route, stream_state.attempts, 0, stream_state.upstream_seconds)
    del headers["x-llm-cost"]  # known only at the end: in the usage line, the usage row and the log
    headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return Response(ndjson_lines(stream_state, chunks, g.log), mimetype="application/x-ndjson", headers=headers)


def ndjson_lines(stream_state, chunks, entry: dict):
    """Content lines as the text arrives, then the usage line and the done line; an error ends the stream."""
    try:
        for chunk in chunks:
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text and choice.get("index", 0) == 0:
                    yield dumps({"type": "content", "text": text, "done": False}) + b"\n"
    except APIError as exc:
        entry["error_type"] = exc.type
        yield dumps({"type": "error", "error": exc.to_dict()["error"], "done": True}) + b"\n"
        return
    finally:
        chunks.close()  # also on a client disconnect: the gateway closes upstream and costs the call
        entry.update(tokens=(stream_state.usage or {}).get("total_tokens"), cost=usd(stream_state.cost_nusd))
    usage = {**(stream_state.usage or {}), "cost": float(usd(stream_state.cost_nusd))}
    yield dumps({"type": "usage", "usage": usage}) + b"\n"
    yield dumps({"type": "content", "text": "", "done": True}) + b"\n"


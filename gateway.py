"""The chat pipeline shared by every endpoint: plan the models to try, send, relay, and cost each call.

Handlers (app.py and the seed-compatible endpoints) and the async job workers all go through here,
so routing, keys, retries, fallback and usage rows behave the same everywhere.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterator

import providers
from adapters import Endpoint, estimate_tokens
from auth import Caller
from db import cost_nusd
from errors import ModelNotFound, PermissionDenied, ProviderNotConfigured, UpstreamError
from providers import PROVIDERS, Outcome, Route, Target

CATALOG_TTL = 5.0  # seconds; admin edits to models/providers reach every worker within this


@dataclass
class CallResult:
    """A finished non-streaming call and what it cost."""

    completion: dict
    route: Route
    attempts: int
    upstream_seconds: float
    cost_nusd: int


@dataclass
class StreamState:
    """What a relayed stream has seen so far; filled in while it runs, read after it ends."""

    route: Route
    attempts: int
    upstream_seconds: float
    usage: dict | None = None
    completion_chars: int = 0
    cost_nusd: int = 0
    error: UpstreamError | None = None
    finished: bool = False


class Gateway:
    """Routes chat requests for one app: the model catalog, provider keys, sending and costing."""

    def __init__(self, config, db):
        self.config, self.db = config, db
        self._lock = threading.Lock()
        self._catalog_at = 0.0
        self._models: dict[str, dict] = {}
        self._providers: dict[str, dict] = {}

    # -- catalog ----------------------------------------------------------------------------------

    def catalog(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """The models and providers tables, re-read at most every CATALOG_TTL seconds."""
        if time.monotonic() - self._catalog_at > CATALOG_TTL:
            with self._lock:
                if time.monotonic() - self._catalog_at > CATALOG_TTL:
                    self._models, self._providers = self.db.load_models(), self.db.load_providers()
                    self._catalog_at = time.monotonic()
        return self._models, self._providers

    def invalidate(self) -> None:
        """Forget the cached catalog (after an admin edit in this process)."""
        self._catalog_at = 0.0

    def provider_enabled(self, name: str) -> bool:
        """A provider is offered unless disabled in the providers table (Ollama also needs OLLAMA_ENABLED)."""
        if name not in PROVIDERS or not self.config.provider_enabled(name):
            return False
        row = self.catalog()[1].get(name)
        return row is None or row["enabled"]

    # -- keys and endpoints -----------------------------------------------------------------------

    def stored_key(self, caller: Caller | None, provider: str) -> str | None:
        """The calling virtual key's own stored key for this provider, if any."""
        if caller is None or caller.key_id is None or not caller.has_provider_keys:
            return None
        import keys  # the admin/keys module owns encryption; imported lazily to keep this module small
        return keys.stored_provider_key(self.db, self.config, caller.key_id, provider)

    def endpoint(self, provider: str, caller: Caller | None, request_key: str | None = None) -> Endpoint | None:
        """Where and with which key to call a provider; None when it needs a key and has none.

        Key order (SPEC 4): the per-request key, the virtual key's stored key, the server-wide key.
        """
        if not self.provider_enabled(provider):  # disabled in the providers table (or Ollama not enabled)
            return None
        adapter = PROVIDERS[provider]
        key = request_key or self.stored_key(caller, provider) or self.config.provider_keys.get(provider)
        if adapter.needs_key and not key:
            return None
        row = self.catalog()[1].get(provider) or {}
        base_url = (row.get("api_base") or self.config.base_urls.get(provider) or "").rstrip("/")
        if not base_url and not adapter.local:
            return None
        api_version = row.get("api_version") or (self.config.azure_api_version if provider == "azure" else None)
        return Endpoint(base_url, key, api_version)

    def plan(self, model: str, extra_fallbacks: list[str] | None = None, caller: Caller | None = None,
             request_key: str | None = None) -> list[Target]:
        """The targets to try in order: the model, its DB fallbacks, then the request's fallbacks."""
        models = self.catalog()[0]
        if caller is not None and caller.models is not None and model not in caller.models:
            raise PermissionDenied(f"This key may not use the model '{model}'.", param="model")
        primary = providers.resolve(model, models, self.provider_enabled)
        names = [primary.name] + [m for m in primary.fallbacks + list(extra_fallbacks or []) if m != primary.name]
        targets, seen = [], set()
        for name in names:
            if name in seen:
                continue
            seen.add(name)
            if name == primary.name:
                route = primary
            else:
                if caller is not None and caller.models is not None and name not in caller.models:
                    continue
                try:
                    route = providers.resolve(name, models, self.provider_enabled)
                except ModelNotFound:  # an unknown fallback is skipped, not fatal
                    continue
            endpoint = self.endpoint(route.provider, caller, request_key)
            if endpoint is not None:
                targets.append(Target(route, endpoint))
        if not targets:
            raise ProviderNotConfigured(
                f"The provider '{primary.provider}' for model '{model}' has no API key configured.", param="model")
        return targets

    # -- calls ------------------------------------------------------------------------------------

    def send(self, targets: list[Target], body: dict, stream: bool) -> Outcome:
        """providers.send with this app's retry policy and timeout."""
        return providers.send(targets, body, stream, self.config.retry, self.config.request_timeout)

    def complete(self, targets: list[Target], body: dict, request_id: str, caller: Caller | None) -> CallResult:
        """One non-streaming call with retries and fallback; every upstream attempt gets a usage row."""
        started = time.perf_counter()
        try:
            outcome = self.send(targets, body, stream=False)
        except UpstreamError as exc:
            self.record(request_id, caller, getattr(exc, "failures", []), None, None, started)
            raise
        usage = outcome.completion.get("usage") or {}
        cost = self.cost(outcome.target.route, usage)
        self.record(request_id, caller, outcome.failures, outcome.target.route, usage, started, cost)
        return CallResult(outcome.completion, outcome.target.route, outcome.attempts, outcome.upstream_seconds, cost)

    def open_stream(self, targets: list[Target], body: dict, request_id: str,
                    caller: Caller | None) -> tuple[StreamState, Iterator[dict]]:
        """Start a streaming call (fallback happens only before the first chunk); relay with costing."""
        started = time.perf_counter()
        try:
            outcome = self.send(targets, body, stream=True)
        except UpstreamError as exc:
            self.record(request_id, caller, getattr(exc, "failures", []), None, None, started)
            raise
        state = StreamState(outcome.target.route, outcome.attempts, outcome.upstream_seconds)
        return state, self._relay(outcome, state, body, request_id, caller, started)

    def _relay(self, outcome: Outcome, state: StreamState, body: dict, request_id: str,
               caller: Caller | None, started: float) -> Iterator[dict]:
        """Yield the upstream's chunks; in `finally` (also on client disconnect) close upstream and cost it."""
        try:
            for chunk in outcome.chunks:
                if chunk.get("usage"):
                    state.usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        state.completion_chars += len(delta["content"])
                    for call in delta.get("tool_calls") or ():
                        state.completion_chars += len(((call.get("function") or {}).get("arguments")) or "")
                yield chunk
            state.finished = True
        except UpstreamError as exc:
            state.error = exc
            raise
        finally:
            outcome.chunks.close()
            if state.usage is None:  # the provider sent none (or we were cut off): estimate
                state.usage = {"prompt_tokens": estimate_tokens(body.get("messages")),
                               "completion_tokens": (state.completion_chars + 3) // 4}
                state.usage["total_tokens"] = state.usage["prompt_tokens"] + state.usage["completion_tokens"]
            state.cost_nusd = self.cost(state.route, state.usage)
            status = "ok" if state.finished else ("error" if state.error else "disconnected")
            self.record(request_id, caller, outcome.failures, state.route, state.usage, started,
                        state.cost_nusd, status=status)

    # -- costs ------------------------------------------------------------------------------------

    @staticmethod
    def cost(route: Route, usage: dict) -> int:
        """Nano-dollars for this usage at the route's prices."""
        return cost_nusd(tokens(usage, "prompt_tokens"), tokens(usage, "completion_tokens"),
                         route.input_cost_per_1k, route.output_cost_per_1k)

    def record(self, request_id: str, caller: Caller | None, failures: list[dict], route: Route | None,
               usage: dict | None, started: float, cost: int = 0, status: str = "ok", cached: bool = False) -> None:
        """Queue one usage row per failed attempt and one for the answer; the writer adds them and the
        key's spend in one transaction, just after the response (usage.py)."""
        key_id, now = (caller.key_id if caller else None), time.time()
        rows = [{"request_id": request_id, "key_id": key_id, "model": f["model"], "provider": f["provider"],
                 "status": "error", "latency_ms": f.get("latency_ms", 0), "created_at": now} for f in failures]
        if route is not None:
            rows.append({"request_id": request_id, "key_id": key_id, "model": route.name, "provider": route.provider,
                         "prompt_tokens": tokens(usage, "prompt_tokens"),
                         "completion_tokens": tokens(usage, "completion_tokens"),
                         "cost_nusd": cost, "latency_ms": (time.perf_counter() - started) * 1000,
                         "status": status, "cached": cached, "created_at": now})
        self.db.usage.submit(rows)


MAX_TOKENS = 2**31 - 1  # the usage table's INTEGER columns


def tokens(usage: dict | None, name: str) -> int:
    """A token count as costed and recorded: a whole number from 0 to MAX_TOKENS, whatever the provider
    (or a client-chosen /execute endpoint) reported, so a negative count cannot lower a key's spend
    and an absurd one cannot fail the usage batch it is written with."""
    try:
        value = int((usage or {}).get(name) or 0)
    except (TypeError, ValueError, OverflowError):
        return 0
    return min(max(value, 0), MAX_TOKENS)

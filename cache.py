"""The response cache (SPEC section 9): answers stored in the database, shared by every worker and instance.

A request's key is the SHA-256 of its model and generation parameters (everything but `stream`,
`stream_options`, `user` and the proxy's extensions) and the number of refinement calls. A hit is
answered without any upstream call, recorded as a usage row with cost 0 and cached=1, and replayed
as chunks when the request streams. `Cache-Control: no-cache` skips the lookup; the fresh answer is
still stored, so it refreshes the entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from typing import Iterator

import refine
from adapters import EXTENSION_FIELDS, completion_id, make_usage
from errors import ServiceUnavailable
from gateway import CallResult, Gateway, StreamState
from providers import Route

UNKEYED_FIELDS = frozenset({"stream", "stream_options", "user"}) | EXTENSION_FIELDS
PURGE_INTERVAL = 60.0  # seconds between sweeps of expired rows, per process
log = logging.getLogger("llm_proxy")


def cache_key(body: dict, num_calls: int = 1) -> str:
    """SHA-256 of the canonical JSON of the body's keyed fields (and the refinement count)."""
    keyed = {k: v for k, v in body.items() if k not in UNKEYED_FIELDS}
    if num_calls > 1:
        keyed["x-llm-num-calls"] = num_calls
    canonical = json.dumps(keyed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def bypassed(headers) -> bool:
    """`Cache-Control: no-cache` (or no-store) on the request."""
    directives = {d.strip().lower() for d in (headers.get("Cache-Control") or "").split(",")}
    return bool(directives & {"no-cache", "no-store"})


# -- storage ----------------------------------------------------------------------------------------

def find_entry(db, key: str, now: float) -> dict | None:
    """The stored, unexpired entry under this key, decoded, or None."""
    row = db.query_one("SELECT response FROM cache WHERE cache_key = ? AND expires_at > ?", (key, now))
    return json.loads(row["response"]) if row else None


def save_entry(db, key: str, entry: dict, ttl: float, now: float) -> None:
    """Insert or replace the entry under this key, live for ttl seconds."""
    db.execute("INSERT INTO cache (cache_key, response, created_at, expires_at) VALUES (?, ?, ?, ?) "
               "ON CONFLICT (cache_key) DO UPDATE SET response = excluded.response, "
               "created_at = excluded.created_at, expires_at = excluded.expires_at",
               (key, json.dumps(entry, separators=(",", ":")), now, now + ttl))


def purge_expired(db, now: float | None = None) -> int:
    """Delete expired entries; returns how many."""
    return db.execute("DELETE FROM cache WHERE expires_at <= ?", (time.time() if now is None else now,))


class _Sweeper:
    """Runs purge_expired at most once per PURGE_INTERVAL in this process, piggybacking on stores."""

    def __init__(self):
        self.lock = threading.Lock()
        self.last = 0.0

    def maybe_purge(self, db) -> None:
        with self.lock:
            if time.monotonic() - self.last < PURGE_INTERVAL:
                return
            self.last = time.monotonic()
        purge_expired(db)


SWEEPER = _Sweeper()


# -- one request's view of the cache -----------------------------------------------------------------

class Lookup:
    """The cache's answer for one request: a hit to serve, or a key under which to store the answer."""

    def __init__(self, gw: Gateway | None = None, key: str | None = None, hit: CallResult | None = None):
        self.gw, self.key, self.hit = gw, key, hit

    @property
    def headers(self) -> dict:
        """`x-cache: HIT|MISS` when the cache is enabled, nothing otherwise."""
        if self.key is None:
            return {}
        return {"x-cache": "HIT" if self.hit else "MISS"}

    def store(self, result: CallResult) -> None:
        """Keep a fresh answer (not a hit; a database hiccup only costs the entry, never the answer)."""
        if self.key is None or self.hit is not None:
            return
        entry = {"completion": result.completion, "model": result.route.name, "provider": result.route.provider}
        try:
            save_entry(self.gw.db, self.key, entry, self.gw.config.cache_ttl, time.time())
            SWEEPER.maybe_purge(self.gw.db)
        except ServiceUnavailable as exc:
            log.warning(json.dumps({"event": "cache_store_failed", "error": exc.message}))

    def replay(self) -> tuple[StreamState, Iterator[dict]]:
        """The hit as a stream of chunks."""
        return refine.replay(self.hit)

    def capture(self, state: StreamState, chunks: Iterator[dict]) -> tuple[StreamState, Iterator[dict]]:
        """Relay a streamed miss and store the assembled answer once the stream has ended cleanly."""
        if self.key is None:
            return state, chunks
        return state, self._capture(state, chunks)

    def _capture(self, state: StreamState, chunks: Iterator[dict]) -> Iterator[dict]:
        collected = Assembler()
        try:
            for chunk in chunks:
                collected.add(chunk)
                yield chunk
        finally:
            chunks.close()
        if state.finished:
            completion = collected.completion(state.usage)
            self.store(CallResult(completion, state.route, state.attempts, 0.0, state.cost_nusd))


OFF = Lookup()


def lookup(gw: Gateway, headers, body: dict, num_calls: int, request_id: str, caller) -> Lookup:
    """Look the request up (when the cache is on and not bypassed); a hit is recorded at cost 0."""
    if not gw.config.cache_enabled:
        return OFF
    key = cache_key(body, num_calls)
    entry = None if bypassed(headers) else find_entry(gw.db, key, time.time())
    if entry is None:
        return Lookup(gw, key)
    # A fresh id and time: clients may rely on completion ids being unique.
    completion = {**entry["completion"], "id": completion_id(), "created": int(time.time())}
    route = Route(entry["model"], entry["provider"], entry["model"])
    gw.record(request_id, caller, [], route, completion.get("usage"), time.perf_counter(), cost=0, cached=True)
    return Lookup(gw, key, CallResult(completion, route, 0, 0.0, 0))


class Assembler:
    """Rebuilds a chat.completion from the chunks of a stream (content, tool calls, finish reasons, usage)."""

    def __init__(self):
        self.meta: dict = {}
        self.usage: dict | None = None
        self.choices: dict[int, dict] = {}

    def add(self, chunk: dict) -> None:
        """Fold one chunk in."""
        self.meta = self.meta or {k: chunk.get(k) for k in ("id", "created", "model")}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            slot = self.choices.setdefault(choice.get("index", 0), {"text": [], "tools": {}, "finish": None})
            delta = choice.get("delta") or {}
            if delta.get("content"):
                slot["text"].append(delta["content"])
            for call in delta.get("tool_calls") or ():
                tool = slot["tools"].setdefault(call.get("index", 0), {"id": None, "type": "function",
                                                                       "function": {"name": "", "arguments": ""}})
                tool["id"] = call.get("id") or tool["id"]
                function = call.get("function") or {}
                tool["function"]["name"] += function.get("name") or ""
                tool["function"]["arguments"] += function.get("arguments") or ""
            slot["finish"] = choice.get("finish_reason") or slot["finish"]

    def completion(self, usage: dict | None = None) -> dict:
        """The assembled chat.completion; `usage` stands in when the stream carried none."""
        choices = []
        for index, slot in sorted(self.choices.items()):
            message = {"role": "assistant", "content": "".join(slot["text"]) or None, "refusal": None}
            if slot["tools"]:
                message["tool_calls"] = [slot["tools"][i] for i in sorted(slot["tools"])]
            choices.append({"index": index, "message": message, "logprobs": None,
                            "finish_reason": slot["finish"] or "stop"})
        return {"id": self.meta.get("id") or completion_id(), "object": "chat.completion",
                "created": self.meta.get("created") or int(time.time()), "model": self.meta.get("model") or "",
                "choices": choices, "usage": self.usage or usage or make_usage(0, 0)}

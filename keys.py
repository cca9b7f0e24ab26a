"""The admin API (SPEC section 5): virtual keys, their encrypted provider keys, models, providers, usage.

Virtual keys are `sk-` + 32 random bytes, shown once and stored as a SHA-256 hash with a short
display prefix. Provider keys are AES-256-GCM encrypted under ENCRYPTION_KEY with a fresh 12-byte
nonce per value, bound to their (virtual key, provider) row, and stored as base64(nonce || ciphertext).
"""
from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
import uuid
from datetime import datetime, timezone
from decimal import Decimal

import click
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from flask import Blueprint, Flask, g, has_request_context, request

import limits
from app import admin, client, json_body, json_response, state
from auth import Caller, hash_key
from db import NANO
from errors import APIError, NotFound, PermissionDenied, ServiceUnavailable, ValidationError
from providers import PROVIDERS

bp = Blueprint("keys", __name__, url_prefix="/api")

KEY_BYTES = 32          # entropy of a virtual key (SPEC 2: at least 32 bytes)
PREFIX_CHARS = 10       # "sk-" and 7 more characters, enough to tell keys apart in a list
NONCE_BYTES = 12        # AES-GCM's standard nonce size
KEY_FIELDS = ("id", "name", "key_prefix", "rpm_limit", "tpm_limit", "max_budget", "models", "spend_nusd",
              "created_at", "revoked_at")
MODEL_NUMBERS = ("input_cost_per_1k", "output_cost_per_1k")
GROUPS = {"day": "day", "model": "model", "key": "key_id", "provider": "provider"}
# UTC day number as floor(created_at / 86400), written so SQLite (CAST truncates) and PostgreSQL
# (CAST rounds) agree.
DAY_SQL = ("(CAST(created_at AS BIGINT) - CASE WHEN CAST(created_at AS BIGINT) > created_at THEN 1 ELSE 0 END)"
           " / 86400")
# /api/save-keys field prefixes (`<name>Key`) and the provider each one stores.
SEED_KEY_NAMES = {"openai": "openai", "anthropic": "anthropic", "claude": "anthropic", "gemini": "gemini",
                  "google": "gemini", "mistral": "mistral", "mistralai": "mistral", "groq": "groq", "xai": "xai",
                  "deepseek": "deepseek", "cerebras": "cerebras", "openrouter": "openrouter", "azure": "azure"}


class EncryptionNotConfigured(APIError):
    status, type = 400, "encryption_not_configured"


class DecryptionFailed(APIError):
    """A stored provider key cannot be decrypted: ENCRYPTION_KEY is missing or not the one it was saved with."""

    status, type = 500, "internal_error"


# -- encryption -------------------------------------------------------------------------------------

def encrypt_secret(key: bytes, plaintext: str, context: str) -> str:
    """base64(nonce || AES-256-GCM ciphertext), authenticated together with `context` (key id and provider)."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return base64.b64encode(nonce + AESGCM(key).encrypt(nonce, plaintext.encode("utf-8"), context.encode())).decode()


def decrypt_secret(key: bytes | None, stored: str, context: str) -> str:
    """The plaintext of encrypt_secret's output; DecryptionFailed (never garbage) for a wrong or missing key."""
    if key is None:
        raise DecryptionFailed("Stored provider keys exist but ENCRYPTION_KEY is not set; set the key they were "
                               "saved with.")
    try:
        raw = base64.b64decode(stored, validate=True)
        return AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode()).decode("utf-8")
    except (InvalidTag, ValueError, binascii.Error):
        raise DecryptionFailed("A stored provider key cannot be decrypted: ENCRYPTION_KEY is not the key it "
                               "was saved with.") from None


def stored_provider_key(db, config, key_id: str, provider: str) -> str | None:
    """A virtual key's own decrypted key for a provider, or None; the key's rows are read once per request."""
    memo = g.setdefault("stored_provider_keys", {}) if has_request_context() else {}
    if key_id not in memo:
        memo[key_id] = find_provider_keys(db, key_id)
    stored = memo[key_id].get(provider)
    return None if stored is None else decrypt_secret(config.encryption_key, stored, f"{key_id}:{provider}")


# -- SQL --------------------------------------------------------------------------------------------

def insert_key(db, name: str, limits_: dict) -> tuple[str, str]:
    """Create a virtual key; returns (id, the key itself), which is never stored."""
    key_id = "key_" + uuid.uuid4().hex[:16]
    key = "sk-" + secrets.token_urlsafe(KEY_BYTES)
    db.execute("INSERT INTO api_keys (id, name, key_hash, key_prefix, rpm_limit, tpm_limit, max_budget, models, "
               "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (key_id, name, hash_key(key), key[:PREFIX_CHARS], limits_.get("rpm_limit"), limits_.get("tpm_limit"),
                limits_.get("max_budget"), _models_json(limits_.get("models")), time.time()))
    return key_id, key


def find_keys(db, key_id: str | None = None) -> list[dict]:
    """Every virtual key (or the one with this id), newest first, with its stored providers' names."""
    where, params = ("WHERE id = ?", (key_id,)) if key_id else ("", ())
    with db.transaction(read_only=True) as tx:
        rows = tx.query(f"SELECT {', '.join(KEY_FIELDS)} FROM api_keys {where} ORDER BY created_at DESC", params)
        stored = tx.query("SELECT key_id, provider FROM provider_keys" + (" WHERE key_id = ?" if key_id else "")
                          + " ORDER BY provider", params)
    for row in rows:
        row["provider_keys"] = [s["provider"] for s in stored if s["key_id"] == row["id"]]
    return rows


def update_key(db, key_id: str, changes: dict) -> bool:
    """Apply validated field changes to a key; False when there is no such key."""
    if "models" in changes:
        changes = {**changes, "models": _models_json(changes["models"])}
    if not changes:
        return db.query_one("SELECT id FROM api_keys WHERE id = ?", (key_id,)) is not None
    sets = ", ".join(f"{name} = ?" for name in changes)
    updated = db.execute(f"UPDATE api_keys SET {sets} WHERE id = ?", (*changes.values(), key_id)) > 0
    db.key_rows.forget(key_id)
    return updated


def revoke_key(db, key_id: str) -> bool:
    """Revoke a key (it stops authenticating at once) and forget its provider keys; False if unknown."""
    with db.transaction(immediate=True) as tx:  # read, then write: SQLite must take its write lock first
        if tx.query_one("SELECT id FROM api_keys WHERE id = ?", (key_id,)) is None:
            return False
        tx.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (time.time(), key_id))
        tx.execute("DELETE FROM provider_keys WHERE key_id = ?", (key_id,))
    db.key_rows.forget(key_id)
    return True


def find_provider_keys(db, key_id: str) -> dict[str, str]:
    """A virtual key's stored provider keys, still encrypted, by provider."""
    rows = db.query("SELECT provider, ciphertext FROM provider_keys WHERE key_id = ?", (key_id,))
    return {r["provider"]: r["ciphertext"] for r in rows}


def save_provider_keys(db, key_id: str, encrypted: dict[str, str | None]) -> None:
    """Store (or, for None, delete) encrypted provider keys of one virtual key, in one transaction."""
    now = time.time()
    with db.transaction() as tx:
        for provider, ciphertext in encrypted.items():
            tx.execute("DELETE FROM provider_keys WHERE key_id = ? AND provider = ?", (key_id, provider))
            if ciphertext is not None:
                tx.execute("INSERT INTO provider_keys (key_id, provider, ciphertext, updated_at) VALUES (?, ?, ?, ?)",
                           (key_id, provider, ciphertext, now))
    db.key_rows.forget(key_id)


def upsert_row(db, table: str, fields: dict) -> None:
    """Insert or replace one row of the models or providers table (keyed by name)."""
    names = list(fields)
    updates = ", ".join(f"{n} = excluded.{n}" for n in names if n != "name")
    db.execute(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
               f"ON CONFLICT (name) DO UPDATE SET {updates}", tuple(fields.values()))


def summarize_usage(db, filters: dict, group_by: str | None) -> tuple[list[dict], dict]:
    """Requests, calls, errors, tokens and cost from the usage table, in total and per group."""
    where, params = [], []
    for column, op in (("key_id", "="), ("model", "="), ("since", ">="), ("until", "<")):
        if filters.get(column) is not None:
            where.append(f"{'created_at' if column in ('since', 'until') else column} {op} ?")
            params.append(filters[column])
    if filters.get("no_key"):
        where.append("key_id IS NULL")
    clause = ("WHERE " + " AND ".join(where)) if where else ""
    totals = ("COUNT(DISTINCT request_id) AS requests, COUNT(*) AS calls, "
              "SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END) AS errors, "
              "SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens, "
              "SUM(cost_nusd) AS cost_nusd")
    with db.transaction(read_only=True) as tx:
        total = tx.query_one(f"SELECT {totals} FROM usage {clause}", params)
        groups = []
        if group_by:
            expr = DAY_SQL if group_by == "day" else GROUPS[group_by]
            groups = tx.query(f"SELECT {expr} AS grp, {totals} FROM usage {clause} GROUP BY {expr} ORDER BY grp",
                              params)
    out = []
    for row in groups:
        label = row.pop("grp")
        if group_by == "day":
            label = datetime.fromtimestamp(int(label) * 86400, timezone.utc).strftime("%Y-%m-%d")
        out.append({GROUPS[group_by]: label, **_usage_numbers(row)})
    return out, _usage_numbers(total)


def recent_usage(db, limit: int, key_id: str | None = None) -> list[dict]:
    """The newest usage rows (one per upstream call), newest first."""
    where, params = ("WHERE key_id = ? ", [key_id]) if key_id else ("", [])
    rows = db.query("SELECT request_id, key_id, model, provider, prompt_tokens, completion_tokens, cost_nusd, "
                    f"latency_ms, status, cached, created_at FROM usage {where}ORDER BY created_at DESC LIMIT ?",
                    (*params, limit))
    for row in rows:
        row["cost"] = float(Decimal(int(row["cost_nusd"] or 0)) / NANO)
        row["cached"] = bool(row["cached"])
    return rows


def _usage_numbers(row: dict) -> dict:
    prompt, completion = int(row["prompt_tokens"] or 0), int(row["completion_tokens"] or 0)
    cost = int(row["cost_nusd"] or 0)
    return {"requests": int(row["requests"] or 0), "calls": int(row["calls"] or 0), "errors": int(row["errors"] or 0),
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "cost": float(Decimal(cost) / NANO), "cost_nusd": cost}


def _models_json(models: list | None) -> str | None:
    return None if models is None else json.dumps(models)


# -- validation -------------------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and value != float("inf")


def check_key_fields(body: dict, partial: bool) -> dict:
    """The key fields of a POST or PATCH body, or 400 with one detail per problem; null clears a limit."""
    problems, out = [], {}
    for name in ("rpm_limit", "tpm_limit"):
        if name in body:
            value = body[name]
            if value is not None and not (_is_int(value) and value >= 0):
                problems.append({"path": name, "message": "must be a non-negative integer or null"})
            out[name] = value
    if "max_budget" in body:
        value = body["max_budget"]
        if value is not None and not (_is_number(value) and value >= 0):
            problems.append({"path": "max_budget", "message": "must be a non-negative number (USD) or null"})
        out["max_budget"] = None if value is None else float(value) if _is_number(value) else value
    if "models" in body:
        value = body["models"]
        if value is not None and not (isinstance(value, list) and all(isinstance(m, str) and m for m in value)):
            problems.append({"path": "models", "message": "must be a list of model names or null"})
        out["models"] = value
    if "name" in body or not partial:
        value = body.get("name", "")
        if not isinstance(value, str) or len(value) > 200:
            problems.append({"path": "name", "message": "must be a string of at most 200 characters"})
        out["name"] = value
    unknown = sorted(set(body) - {"name", "rpm_limit", "tpm_limit", "max_budget", "models"})
    problems += [{"path": k, "message": "is not a key field"} for k in unknown]
    if problems:
        raise ValidationError(problems)
    return out


def check_provider_keys(body: dict) -> dict[str, str | None]:
    """{provider: key or null} with known providers that take keys, or 400 with details."""
    problems = []
    for provider, value in body.items():
        if provider not in PROVIDERS or not PROVIDERS[provider].needs_key:
            problems.append({"path": provider, "message": "is not a provider that takes an API key"})
        elif value is not None and not (isinstance(value, str) and value.strip()):
            problems.append({"path": provider, "message": "must be a non-empty string (or null to delete)"})
    if problems:
        raise ValidationError(problems)
    return {p: (v.strip() if v else None) for p, v in body.items()}


def check_model_fields(name: str, body: dict, existing: dict | None) -> dict:
    """A full models row from a PUT body merged over the existing row, or 400 with details."""
    problems = []
    row = {"name": name, "provider": None, "upstream_model": name, "fallbacks": [], "input_cost_per_1k": 0.0,
           "output_cost_per_1k": 0.0, "task_types": []}
    row.update({k: v for k, v in (existing or {}).items() if k in row})
    unknown = sorted(set(body) - set(row) - {"name"})
    problems += [{"path": k, "message": "is not a model field"} for k in unknown]
    row.update({k: v for k, v in body.items() if k in row and k != "name"})
    if row["provider"] not in PROVIDERS:
        problems.append({"path": "provider", "message": "must be one of " + ", ".join(sorted(PROVIDERS))})
    if not isinstance(row["upstream_model"], str) or not row["upstream_model"]:
        problems.append({"path": "upstream_model", "message": "must be a non-empty string"})
    for field in ("fallbacks", "task_types"):
        if not (isinstance(row[field], list) and all(isinstance(v, str) and v for v in row[field])):
            problems.append({"path": field, "message": "must be a list of strings"})
    for field in MODEL_NUMBERS:
        if not (_is_number(row[field]) and row[field] >= 0):
            problems.append({"path": field, "message": "must be a non-negative number (USD per 1,000 tokens)"})
    if problems:
        raise ValidationError(problems)
    return {**row, "fallbacks": json.dumps(row["fallbacks"]), "task_types": json.dumps(row["task_types"]),
            "updated_at": time.time()}


def check_provider_fields(name: str, body: dict) -> dict:
    """A providers row from a PUT body, or 400 with details."""
    problems = []
    unknown = sorted(set(body) - {"api_base", "api_version", "enabled"})
    problems += [{"path": k, "message": "is not a provider field"} for k in unknown]
    api_base, api_version = body.get("api_base"), body.get("api_version")
    if api_base is not None and not (isinstance(api_base, str) and api_base.startswith(("http://", "https://"))):
        problems.append({"path": "api_base", "message": "must be an http(s) URL or null"})
    if api_version is not None and not (isinstance(api_version, str) and api_version):
        problems.append({"path": "api_version", "message": "must be a non-empty string or null"})
    if not isinstance(body.get("enabled", True), bool):
        problems.append({"path": "enabled", "message": "must be true or false"})
    if problems:
        raise ValidationError(problems)
    return {"name": name, "api_base": api_base.rstrip("/") if api_base else None, "api_version": api_version,
            "enabled": 1 if body.get("enabled", True) else 0, "updated_at": time.time()}


def parse_time(name: str, value: str | None) -> float | None:
    """An epoch-seconds number or an ISO 8601 date/time (UTC unless it says otherwise), or 400."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError([{"path": name, "message": "must be epoch seconds or an ISO 8601 date/time"}]) from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


# -- views ------------------------------------------------------------------------------------------

def key_view(row: dict) -> dict:
    """A key as the API shows it: limits, spend, which providers have stored keys; never the key or hash."""
    view = {k: row[k] for k in KEY_FIELDS if k != "spend_nusd"}
    view.update(object="api_key", models=json.loads(row["models"]) if row["models"] else None,
                spend=float(Decimal(int(row["spend_nusd"] or 0)) / NANO), spend_nusd=int(row["spend_nusd"] or 0),
                revoked=row["revoked_at"] is not None, provider_keys=row.get("provider_keys", []))
    return view


def one_key(key_id: str) -> dict:
    """The key with this id, or 404."""
    rows = find_keys(state().db, key_id)
    if not rows:
        raise NotFound(f"No key with id '{key_id}'.")
    return rows[0]


def create_key(name: str, fields: dict) -> dict:
    """Create a key and return its view with the key itself (the only time it is shown)."""
    key_id, key = insert_key(state().db, name, fields)
    return {**key_view(one_key(key_id)), "key": key}


def store_keys(key_id: str, plain: dict[str, str | None]) -> list[str]:
    """Encrypt and store provider keys for a virtual key; the providers it now has keys for."""
    enc_key = state().config.encryption_key
    if enc_key is None and any(v is not None for v in plain.values()):
        raise EncryptionNotConfigured("Storing provider keys needs ENCRYPTION_KEY (64 hex characters) to be set.")
    save_provider_keys(state().db, key_id, {
        p: None if v is None else encrypt_secret(enc_key, v, f"{key_id}:{p}") for p, v in plain.items()})
    return one_key(key_id)["provider_keys"]


def holder_or_admin(caller: Caller, key_id: str) -> None:
    """403 unless the caller is the admin or this very virtual key."""
    if not caller.is_admin and caller.key_id != key_id:
        raise PermissionDenied("You may only change the provider keys of your own virtual key.")


def optional_json() -> dict:
    """A JSON body that may be absent entirely."""
    return json_body() if request.get_data(cache=True).strip() else {}


@bp.post("/keys")
def keys_create():
    """POST /api/keys: create a virtual key; 201 with the key, shown this once."""
    admin()
    fields = check_key_fields(json_body(), partial=False)
    return json_response(create_key(fields.pop("name"), fields), 201)


@bp.get("/keys")
def keys_list():
    """GET /api/keys: every virtual key, revoked ones included."""
    admin()
    return json_response({"object": "list", "data": [key_view(r) for r in find_keys(state().db)]})


@bp.get("/keys/<key_id>")
def keys_get(key_id: str):
    """GET /api/keys/<id>."""
    admin()
    return json_response(key_view(one_key(key_id)))


@bp.patch("/keys/<key_id>")
def keys_update(key_id: str):
    """PATCH /api/keys/<id>: change name, limits, budget or models (null removes a limit)."""
    admin()
    if not update_key(state().db, key_id, check_key_fields(json_body(), partial=True)):
        raise NotFound(f"No key with id '{key_id}'.")
    return json_response(key_view(one_key(key_id)))


@bp.delete("/keys/<key_id>")
def keys_revoke(key_id: str):
    """DELETE /api/keys/<id>: revoke the key (idempotent) and drop its stored provider keys."""
    admin()
    if not revoke_key(state().db, key_id):
        raise NotFound(f"No key with id '{key_id}'.")
    return json_response(key_view(one_key(key_id)))


@bp.put("/keys/<key_id>/provider-keys")
def keys_provider_keys(key_id: str):
    """PUT /api/keys/<id>/provider-keys {provider: key|null}: store encrypted; answer only which providers have one."""
    holder_or_admin(client(), key_id)
    plain = check_provider_keys(json_body())
    one_key(key_id)
    return json_response({"id": key_id, "provider_keys": store_keys(key_id, plain)})


@bp.post("/generate-virtual-key")
def generate_virtual_key():
    """POST /api/generate-virtual-key (seed form): {"virtualKey": "sk-..."}."""
    admin()
    body = optional_json()
    renamed = {"requestsPerMinute": "rpm_limit", "tokensPerMinute": "tpm_limit", "maxBudget": "max_budget",
               "name": "name", "models": "models"}
    fields = check_key_fields({renamed.get(k, k): v for k, v in body.items()}, partial=False)
    created = create_key(fields.pop("name"), fields)
    return json_response({"virtualKey": created["key"], "id": created["id"]})


@bp.post("/save-keys")
def save_keys():
    """POST /api/save-keys (seed form) {virtualKey, openaiKey, ...}: admin, or the holder of that virtual key."""
    caller = client()
    body = json_body()
    virtual_key = body.get("virtualKey")
    if not isinstance(virtual_key, str) or not virtual_key.strip():
        raise ValidationError([{"path": "virtualKey", "message": "is required"}])
    row = state().db.find_live_key(hash_key(virtual_key.strip()))
    if row is None and caller.is_admin:
        raise NotFound("No live virtual key matches virtualKey.")
    holder_or_admin(caller, row["id"] if row else "")
    plain, problems = {}, []
    for name, value in body.items():
        if name == "virtualKey":
            continue
        provider = SEED_KEY_NAMES.get(name[:-3]) if name.endswith("Key") else None
        if provider is None:
            problems.append({"path": name, "message": "is not a known <provider>Key field"})
        elif value not in (None, ""):
            plain[provider] = value
    if problems:
        raise ValidationError(problems)
    providers = store_keys(row["id"], check_provider_keys(plain))
    return json_response({"success": True, "message": "Keys saved.", "provider_keys": providers})


@bp.get("/me")
def me():
    """GET /api/me: the calling key's own limits, spend, current minute and usage."""
    caller = client()
    db = state().db
    if caller.key_id is None:
        _, total = summarize_usage(db, {"no_key": True}, None)
        return json_response({"object": "api_key", "kind": caller.kind, "id": None, "usage": total})
    view = key_view(one_key(caller.key_id))
    window = limits.current_window(db, caller.key_id)
    _, total = summarize_usage(db, {"key_id": caller.key_id}, None)
    return json_response({**view, "kind": "virtual", "current_minute": {"requests": window.requests,
                                                                        "tokens": window.tokens}, "usage": total})


@bp.get("/usage")
def usage():
    """GET /api/usage?key_id=&model=&since=&until=&group_by=day|model|key|provider: aggregated usage."""
    admin()
    group_by = request.args.get("group_by") or None
    if group_by is not None and group_by not in GROUPS:
        raise ValidationError([{"path": "group_by", "message": "must be one of " + ", ".join(GROUPS)}])
    filters = {"key_id": request.args.get("key_id") or None, "model": request.args.get("model") or None,
               "since": parse_time("since", request.args.get("since")),
               "until": parse_time("until", request.args.get("until"))}
    data, total = summarize_usage(state().db, filters, group_by)
    return json_response({"object": "usage", "group_by": group_by, "data": data, "total": total})


@bp.get("/usage/recent")
def usage_recent():
    """GET /api/usage/recent?limit=50&key_id=: the newest calls, for the UI's recent-requests table."""
    admin()
    raw = request.args.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= 500:
        raise ValidationError([{"path": "limit", "message": "must be an integer from 1 to 500"}])
    rows = recent_usage(state().db, int(raw), request.args.get("key_id") or None)
    return json_response({"object": "list", "data": rows})


@bp.get("/models")
def models_list():
    """GET /api/models: the models table."""
    admin()
    models = state().db.load_models()
    return json_response({"object": "list", "data": [models[n] for n in sorted(models)]})


@bp.get("/models/<path:name>")
def models_get(name: str):
    """GET /api/models/<name>."""
    admin()
    row = state().db.load_models().get(name)
    if row is None:
        raise NotFound(f"No model '{name}' in the models table.")
    return json_response(row)


@bp.put("/models/<path:name>")
def models_put(name: str):
    """PUT /api/models/<name>: create, or change the given fields of, a model (provider needed to create)."""
    admin()
    s = state()
    existing = s.db.load_models().get(name)
    upsert_row(s.db, "models", check_model_fields(name, json_body(), existing))
    s.gateway.invalidate()
    return json_response(s.db.load_models()[name], 200 if existing else 201)


@bp.delete("/models/<path:name>")
def models_delete(name: str):
    """DELETE /api/models/<name>."""
    admin()
    s = state()
    if s.db.execute("DELETE FROM models WHERE name = ?", (name,)) == 0:
        raise NotFound(f"No model '{name}' in the models table.")
    s.gateway.invalidate()
    return json_response({"name": name, "deleted": True})


def provider_view(name: str, row: dict | None) -> dict:
    """A provider: its overrides (if any), the base URL in effect and whether the server has a key."""
    s = state()
    row = row or {}
    return {"name": name, "api_base": row.get("api_base"), "api_version": row.get("api_version"),
            "enabled": bool(row.get("enabled", True)), "base_url": row.get("api_base") or s.config.base_urls.get(name),
            "server_key": name in s.config.provider_keys, "needs_key": PROVIDERS[name].needs_key}


def known_provider(name: str) -> str:
    """The provider's name, or 404."""
    if name not in PROVIDERS:
        raise NotFound(f"No provider '{name}'.")
    return name


@bp.get("/providers")
def providers_list():
    """GET /api/providers: every provider with its database overrides."""
    admin()
    rows = state().db.load_providers()
    return json_response({"object": "list", "data": [provider_view(n, rows.get(n)) for n in sorted(PROVIDERS)]})


@bp.get("/providers/<name>")
def providers_get(name: str):
    """GET /api/providers/<name>."""
    admin()
    return json_response(provider_view(known_provider(name), state().db.load_providers().get(name)))


@bp.put("/providers/<name>")
def providers_put(name: str):
    """PUT /api/providers/<name> {api_base, api_version, enabled}: override where and whether it is reached."""
    admin()
    s = state()
    upsert_row(s.db, "providers", check_provider_fields(known_provider(name), json_body()))
    s.gateway.invalidate()
    return json_response(provider_view(name, s.db.load_providers().get(name)))


@bp.delete("/providers/<name>")
def providers_delete(name: str):
    """DELETE /api/providers/<name>: drop the overrides (back to the environment's settings)."""
    admin()
    s = state()
    s.db.execute("DELETE FROM providers WHERE name = ?", (known_provider(name),))
    s.gateway.invalidate()
    return json_response(provider_view(name, None))


# -- wiring -----------------------------------------------------------------------------------------

def attach_rate_headers(response):
    """x-ratelimit-* on every response to a key with limits: from admission when the request was
    admitted, else (models, me, job status, a refused body) from the key's current minute."""
    headers = g.get("rate_headers")
    caller = g.get("caller")
    if headers is None and caller is not None and caller.key_id and (
            caller.rpm_limit is not None or caller.tpm_limit is not None):
        try:
            headers = limits.rate_headers(caller, limits.current_window(state().db, caller.key_id))
        except ServiceUnavailable:  # the response itself already says what went wrong, or is fine
            headers = None
    response.headers.update(headers or {})
    return response


@bp.before_request
def see_own_usage() -> None:
    """Reads of spend and usage first wait for this process's queued usage rows (usage.py), so a
    caller sees its own calls; other workers' rows are a few tens of milliseconds behind."""
    if request.method == "GET":
        state().db.usage.flush()


def register(app: Flask) -> None:
    """Register the admin API, the rate-limit headers hook and `flask --app app create-key`."""
    app.register_blueprint(bp)
    app.after_request(attach_rate_headers)

    @app.cli.command("create-key")
    @click.option("--name", required=True, help="A label for the key.")
    @click.option("--rpm", type=click.IntRange(min=0), default=None, help="Requests per minute.")
    @click.option("--tpm", type=click.IntRange(min=0), default=None, help="Tokens per minute.")
    @click.option("--budget", type=click.FloatRange(min=0), default=None, help="Budget in USD.")
    def create_key_command(name, rpm, tpm, budget):
        """Create a virtual key and print it (it is shown only this once)."""
        db = app.extensions["llm_proxy"].db
        key_id, key = insert_key(db, name, {"rpm_limit": rpm, "tpm_limit": tpm, "max_budget": budget})
        click.echo(key)
        click.echo(f"id: {key_id}  (the key above is shown only once)", err=True)

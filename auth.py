"""Who is calling: the static API_KEY, the ADMIN_API_KEY, or a virtual key (SPEC section 2)."""
from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

from errors import AdminDisabled, AuthenticationError, PermissionDenied

KEY_HEADERS = ("X-API-Key", "X-ClientId")


@dataclass
class Caller:
    """An authenticated client. key_id is set for virtual keys only."""

    kind: str                      # "admin" | "static" | "virtual"
    key_id: str | None = None
    name: str = ""
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_budget: float | None = None
    models: list[str] | None = None
    spend_nusd: int = 0
    has_provider_keys: bool = True  # False only when authentication saw none: saves the lookup

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    @property
    def log_id(self) -> str:
        """What the access log shows for this caller (never the key itself)."""
        return self.key_id or self.kind


def hash_key(key: str) -> str:
    """The SHA-256 hex digest under which a virtual key is stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def presented_key(headers) -> str:
    """The key from Authorization: Bearer, X-API-Key or X-ClientId; 401 when absent or malformed."""
    auth = headers.get("Authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("The Authorization header must be 'Bearer <key>'.")
        return token.strip()
    for name in KEY_HEADERS:
        value = headers.get(name)
        if value and value.strip():
            return value.strip()
    raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.")


def _same(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def authenticate(headers, config, db, spending: bool = False) -> Caller:
    """Resolve the presented key to a Caller, or raise 401.

    spending=True (chat and the other calling endpoints) may reuse a rate-limited key's row read in the
    last few seconds (db.KeyRows): those keys are admitted by limits.admit, whose statement re-reads
    revocation and spend, so a revoked or spent key is still refused at once; edits of limits, models
    or provider keys reach other workers within KEY_ROWS_TTL, as model edits do. Everything else, and
    keys without rate limits (whose only check this lookup is), reads the database every time.
    """
    key = presented_key(headers)
    if _same(config.admin_api_key, key):
        return Caller("admin", name="admin")
    if _same(config.api_key, key):
        return Caller("static", name="api_key")
    if key.startswith("sk-"):
        key_hash = hash_key(key)
        row = db.key_rows.get(key_hash) if spending else None
        if row is None:
            generation = db.key_rows.generation
            row = db.find_live_key(key_hash)
            if row is not None and spending and (row["rpm_limit"] is not None or row["tpm_limit"] is not None):
                db.key_rows.put(key_hash, row, generation)
        if row is not None:
            return caller_from_row(row)
    raise AuthenticationError("Invalid API key.")


def caller_from_row(row: dict) -> Caller:
    """A virtual key's Caller from its api_keys row (as db.find_live_key returns it)."""
    return Caller("virtual", key_id=row["id"], name=row["name"], rpm_limit=row["rpm_limit"],
                  tpm_limit=row["tpm_limit"],
                  max_budget=None if row["max_budget"] is None else float(row["max_budget"]),
                  models=json.loads(row["models"]) if row["models"] else None,
                  spend_nusd=int(row["spend_nusd"] or 0), has_provider_keys=bool(row["has_provider_keys"]))


def authenticate_admin(headers, config, db) -> Caller:
    """Admin endpoints: 403 admin_disabled without ADMIN_API_KEY, 401 bad key, 403 non-admin key."""
    if not config.admin_api_key:
        raise AdminDisabled("The admin API is disabled: set ADMIN_API_KEY to enable it.")
    caller = authenticate(headers, config, db)
    if not caller.is_admin:
        raise PermissionDenied("This endpoint needs the admin key.")
    return caller

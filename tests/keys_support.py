"""Helpers for the keys, limits and concurrency tests: admin calls, key creation, a priced echo model."""
from __future__ import annotations

from support import ADMIN_KEY, auth

ENCRYPTION_KEY = bytes(range(32))          # what create_app(test_config) takes
ENCRYPTION_KEY_HEX = ENCRYPTION_KEY.hex()  # what the environment takes
ADMIN = auth(ADMIN_KEY)


def chat(content: str = "Hello there", model: str = "echo", **extra) -> dict:
    """A chat request body."""
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def create_key(client, **fields) -> tuple[str, str]:
    """POST /api/keys through a Flask test client (or a requests-like session with base URL); (id, key)."""
    r = client.post("/api/keys", json={"name": "test", **fields}, headers=ADMIN)
    assert r.status_code == 201, r.get_json()
    body = r.get_json()
    return body["id"], body["key"]


def price_echo(client, input_per_1k: float, output_per_1k: float) -> None:
    """Give the echo model prices so that its calls cost something."""
    r = client.put("/api/models/echo", json={"input_cost_per_1k": input_per_1k, "output_cost_per_1k": output_per_1k},
                   headers=ADMIN)
    assert r.status_code == 200, r.get_json()

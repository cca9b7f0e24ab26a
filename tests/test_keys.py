"""Virtual keys and the admin API (SPEC 2 and 5): keys, encrypted provider keys, models, providers, usage."""
from __future__ import annotations

import base64

import pytest
import requests

from config import ConfigError
from keys_support import ADMIN, ENCRYPTION_KEY, ENCRYPTION_KEY_HEX, chat, create_key, price_echo
from support import ADMIN_KEY, CLIENT_KEY, FakeOpenAI, Gunicorn, auth


@pytest.fixture
def app(make_app):
    return make_app(encryption_key=ENCRYPTION_KEY)


def db_of(app):
    return app.extensions["llm_proxy"].db


# -- keys -------------------------------------------------------------------------------------------

def test_created_key_is_random_shown_once_and_stored_only_as_a_hash(client, app):
    r = client.post("/api/keys", json={"name": "alice", "rpm_limit": 10, "tpm_limit": 1000, "max_budget": 5,
                                       "models": ["echo"]}, headers=ADMIN)
    assert r.status_code == 201
    body = r.get_json()
    key = body["key"]
    assert key.startswith("sk-") and len(key) >= 3 + 43  # 32 random bytes, base64url
    assert body["key_prefix"] == key[:10] and body["name"] == "alice"
    assert (body["rpm_limit"], body["tpm_limit"], body["max_budget"], body["models"]) == (10, 1000, 5.0, ["echo"])
    row = db_of(app).query_one("SELECT * FROM api_keys WHERE id = ?", (body["id"],))
    assert key not in str(row.values())
    listed = client.get("/api/keys", headers=ADMIN)
    one = client.get(f"/api/keys/{body['id']}", headers=ADMIN)
    assert key not in listed.get_data(as_text=True) and key not in one.get_data(as_text=True)
    assert [k["id"] for k in listed.get_json()["data"]] == [body["id"]]
    assert create_key(client)[1] != key


def test_virtual_key_calls_and_revoked_key_gets_401(client):
    key_id, key = create_key(client)
    for header in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}, {"X-ClientId": key}):
        assert client.post("/v1/chat/completions", json=chat(), headers=header).status_code == 200
    r = client.delete(f"/api/keys/{key_id}", headers=ADMIN)
    assert r.status_code == 200 and r.get_json()["revoked"] is True
    r = client.post("/v1/chat/completions", json=chat(), headers=auth(key))
    assert r.status_code == 401 and r.get_json()["error"]["type"] == "authentication_error"
    assert client.delete(f"/api/keys/{key_id}", headers=ADMIN).status_code == 200  # idempotent


def test_patch_changes_limits_at_once_and_null_removes_them(client):
    key_id, key = create_key(client, rpm_limit=5)
    r = client.patch(f"/api/keys/{key_id}", json={"name": "renamed", "rpm_limit": None, "tpm_limit": 50},
                     headers=ADMIN)
    assert r.status_code == 200
    assert (r.get_json()["name"], r.get_json()["rpm_limit"], r.get_json()["tpm_limit"]) == ("renamed", None, 50)
    r = client.post("/v1/chat/completions", json=chat(), headers=auth(key))
    assert "x-ratelimit-limit-requests" not in r.headers and r.headers["x-ratelimit-limit-tokens"] == "50"


@pytest.mark.parametrize("fields, path", [
    ({"rpm_limit": -1}, "rpm_limit"), ({"tpm_limit": 1.5}, "tpm_limit"), ({"rpm_limit": "10"}, "rpm_limit"),
    ({"tpm_limit": True}, "tpm_limit"), ({"max_budget": -0.01}, "max_budget"), ({"max_budget": "5"}, "max_budget"),
    ({"models": "echo"}, "models"), ({"models": [1]}, "models"), ({"name": 7}, "name"), ({"colour": "red"}, "colour"),
])
def test_malformed_key_fields_are_400_with_details(client, fields, path):
    r = client.post("/api/keys", json={"name": "x", **fields}, headers=ADMIN)
    assert r.status_code == 400
    err = r.get_json()["error"]
    assert err["type"] == "validation_error" and [d["path"] for d in err["details"]] == [path]
    key_id, _ = create_key(client)
    assert client.patch(f"/api/keys/{key_id}", json=fields, headers=ADMIN).status_code == 400


def test_several_problems_give_one_detail_each(client):
    r = client.post("/api/keys", json={"rpm_limit": -1, "tpm_limit": "x", "max_budget": [], "models": 3}, headers=ADMIN)
    assert {d["path"] for d in r.get_json()["error"]["details"]} == {"rpm_limit", "tpm_limit", "max_budget", "models"}


@pytest.mark.parametrize("method, path", [("GET", "/api/keys/nope"), ("PATCH", "/api/keys/nope"),
                                          ("DELETE", "/api/keys/nope"), ("PUT", "/api/keys/nope/provider-keys")])
def test_unknown_key_id_is_404(client, method, path):
    r = client.open(path, method=method, json={"openai": "sk-x"} if "provider" in path else {}, headers=ADMIN)
    assert r.status_code == 404 and r.get_json()["error"]["type"] == "not_found"


def test_admin_api_needs_the_admin_key(client, make_app):
    _, key = create_key(client)
    assert client.get("/api/keys").status_code == 401
    assert client.get("/api/keys", headers=auth("wrong")).status_code == 401
    for other in (CLIENT_KEY, key):
        r = client.get("/api/keys", headers=auth(other))
        assert r.status_code == 403 and r.get_json()["error"]["type"] == "permission_error"
    r = make_app(admin_api_key=None).test_client().get("/api/keys", headers=ADMIN)
    assert r.status_code == 403 and r.get_json()["error"]["type"] == "admin_disabled"


def test_model_allow_list(client):
    _, key = create_key(client, models=["echo"])
    assert client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 200
    r = client.post("/v1/chat/completions", json=chat(model="echo/other"), headers=auth(key))
    assert r.status_code == 403 and r.get_json()["error"]["type"] == "permission_error"
    assert [m["id"] for m in client.get("/v1/models", headers=auth(key)).get_json()["data"]] == ["echo"]


def test_budget_reached_is_402(client):
    price_echo(client, 1.0, 1.0)  # $1 per 1k tokens: "Hello there" costs a few thousandths
    key_id, key = create_key(client, max_budget=0.01)
    statuses = [client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code for _ in range(5)]
    assert statuses[0] == 200 and statuses[-1] == 402
    spend = client.get(f"/api/keys/{key_id}", headers=ADMIN).get_json()["spend"]
    assert spend >= 0.01
    r = client.post("/v1/chat/completions", json=chat(), headers=auth(key))
    assert r.get_json()["error"]["type"] == "budget_exceeded"
    client.patch(f"/api/keys/{key_id}", json={"max_budget": 100}, headers=ADMIN)  # raising it lets the key back in
    assert client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 200


def test_budget_zero_refuses_at_once(client):
    _, key = create_key(client, max_budget=0)
    assert client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 402


def test_cli_create_key_prints_a_working_key(app, client):
    result = app.test_cli_runner().invoke(args=["create-key", "--name", "cli", "--rpm", "7", "--budget", "2.5"])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip().splitlines()[0]
    assert key.startswith("sk-")
    r = client.post("/v1/chat/completions", json=chat(), headers=auth(key))
    assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "7"
    bad = app.test_cli_runner().invoke(args=["create-key", "--name", "x", "--rpm", "-3"])
    assert bad.exit_code != 0


def test_seed_generate_virtual_key(client):
    r = client.post("/api/generate-virtual-key", json={"requestsPerMinute": 2, "tokensPerMinute": 500,
                                                       "maxBudget": 1.5, "name": "seed"}, headers=ADMIN)
    assert r.status_code == 200
    key = r.get_json()["virtualKey"]
    row = client.get(f"/api/keys/{r.get_json()['id']}", headers=ADMIN).get_json()
    assert (row["rpm_limit"], row["tpm_limit"], row["max_budget"], row["name"]) == (2, 500, 1.5, "seed")
    assert client.post("/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 200
    assert client.post("/api/generate-virtual-key", headers=ADMIN).status_code == 200  # no body at all
    r = client.post("/api/generate-virtual-key", json={"requestsPerMinute": "lots"}, headers=ADMIN)
    assert r.status_code == 400


# -- provider keys ----------------------------------------------------------------------------------

@pytest.fixture
def upstream():
    with FakeOpenAI() as fake:
        yield fake


def test_stored_provider_key_is_encrypted_never_returned_and_used_upstream(make_app, upstream):
    app = make_app(encryption_key=ENCRYPTION_KEY, provider_keys={"openai": "sk-server-wide"},
                   base_urls={"openai": upstream.url})
    client = app.test_client()
    key_id, key = create_key(client)
    r = client.put(f"/api/keys/{key_id}/provider-keys", json={"openai": "sk-mine-secret", "mistral": "m-secret"},
                   headers=ADMIN)
    assert r.status_code == 200 and r.get_json() == {"id": key_id, "provider_keys": ["mistral", "openai"]}
    stored = db_of(app).query("SELECT ciphertext FROM provider_keys WHERE key_id = ?", (key_id,))
    assert all("secret" not in s["ciphertext"] and len(base64.b64decode(s["ciphertext"])) > 12 for s in stored)
    for path in (f"/api/keys/{key_id}", "/api/keys"):
        assert "secret" not in client.get(path, headers=ADMIN).get_data(as_text=True)
    assert "secret" not in client.get("/api/me", headers=auth(key)).get_data(as_text=True)

    assert client.post("/v1/chat/completions", json=chat(model="gpt-4o-mini"), headers=auth(key)).status_code == 200
    assert upstream.posts[-1]["headers"]["Authorization"] == "Bearer sk-mine-secret"  # the key's own beats the server's
    client.post("/v1/chat/completions", json=chat(model="gpt-4o-mini"), headers={**auth(key), "x-llm-apikey": "sk-req"})
    assert upstream.posts[-1]["headers"]["Authorization"] == "Bearer sk-req"            # the request's beats both
    client.post("/v1/chat/completions", json=chat(model="gpt-4o-mini"), headers=auth(CLIENT_KEY))
    assert upstream.posts[-1]["headers"]["Authorization"] == "Bearer sk-server-wide"


def test_same_value_encrypts_differently_each_time(client, app):
    key_id, _ = create_key(client)
    seen = set()
    for _ in range(2):
        client.put(f"/api/keys/{key_id}/provider-keys", json={"openai": "sk-same"}, headers=ADMIN)
        seen.add(db_of(app).query_one("SELECT ciphertext FROM provider_keys WHERE key_id = ?", (key_id,))["ciphertext"])
    assert len(seen) == 2  # fresh nonce per value


def test_null_deletes_a_stored_provider_key_and_bad_providers_are_400(client):
    key_id, _ = create_key(client)
    client.put(f"/api/keys/{key_id}/provider-keys", json={"openai": "sk-a", "groq": "g"}, headers=ADMIN)
    r = client.put(f"/api/keys/{key_id}/provider-keys", json={"openai": None}, headers=ADMIN)
    assert r.get_json()["provider_keys"] == ["groq"]
    r = client.put(f"/api/keys/{key_id}/provider-keys", json={"nosuch": "x", "echo": "y", "groq": ""}, headers=ADMIN)
    assert r.status_code == 400 and {d["path"] for d in r.get_json()["error"]["details"]} == {"nosuch", "echo", "groq"}


def test_a_key_holder_may_store_only_their_own_provider_keys(client):
    mine_id, mine = create_key(client)
    theirs_id, theirs = create_key(client)
    r = client.put(f"/api/keys/{mine_id}/provider-keys", json={"openai": "sk-a"}, headers=auth(mine))
    assert r.status_code == 200
    r = client.put(f"/api/keys/{theirs_id}/provider-keys", json={"openai": "sk-a"}, headers=auth(mine))
    assert r.status_code == 403 and r.get_json()["error"]["type"] == "permission_error"


def test_seed_save_keys(client):
    mine_id, mine = create_key(client)
    _, theirs = create_key(client)
    r = client.post("/api/save-keys", json={"virtualKey": mine, "openaiKey": "sk-o", "claudeKey": "sk-c",
                                            "geminiKey": "g", "mistralKey": ""}, headers=ADMIN)
    assert r.status_code == 200 and r.get_json()["provider_keys"] == ["anthropic", "gemini", "openai"]
    r = client.post("/api/save-keys", json={"virtualKey": mine, "mistralaiKey": "m"}, headers=auth(mine))
    assert r.status_code == 200 and "mistral" in r.get_json()["provider_keys"]
    r = client.post("/api/save-keys", json={"virtualKey": theirs, "openaiKey": "sk-x"}, headers=auth(mine))
    assert r.status_code == 403
    r = client.post("/api/save-keys", json={"virtualKey": "sk-unknown", "openaiKey": "sk-x"}, headers=auth(mine))
    assert r.status_code == 403  # a non-admin learns nothing about other keys
    r = client.post("/api/save-keys", json={"virtualKey": "sk-unknown", "openaiKey": "sk-x"}, headers=ADMIN)
    assert r.status_code == 404
    r = client.post("/api/save-keys", json={"openaiKey": "sk-x"}, headers=ADMIN)
    assert r.status_code == 400
    r = client.post("/api/save-keys", json={"virtualKey": mine, "bogusKey": "x"}, headers=ADMIN)
    assert r.status_code == 400


def test_saving_provider_keys_without_encryption_key_is_400(make_app):
    client = make_app(encryption_key=None).test_client()
    key_id, _ = create_key(client)
    r = client.put(f"/api/keys/{key_id}/provider-keys", json={"openai": "sk-a"}, headers=ADMIN)
    assert r.status_code == 400 and r.get_json()["error"]["type"] == "encryption_not_configured"


def test_wrong_encryption_key_is_a_clear_error_not_garbage(make_app, upstream):
    first = make_app(encryption_key=ENCRYPTION_KEY).test_client()
    key_id, key = create_key(first)
    first.put(f"/api/keys/{key_id}/provider-keys", json={"openai": "sk-mine"}, headers=ADMIN)
    for other in (bytes(32), None):
        client = make_app(encryption_key=other, base_urls={"openai": upstream.url}).test_client()
        r = client.post("/v1/chat/completions", json=chat(model="gpt-4o-mini"), headers=auth(key))
        assert r.status_code == 500
        assert "ENCRYPTION_KEY" in r.get_json()["error"]["message"] and "sk-mine" not in r.get_data(as_text=True)
    assert upstream.posts == []  # nothing was sent with a garbled key


def test_encryption_key_of_wrong_length_stops_the_start(monkeypatch):
    from app import create_app
    monkeypatch.setenv("ENCRYPTION_KEY", "abcd" * 8)  # 32 hex chars: 16 bytes, not 32
    with pytest.raises(ConfigError, match="64 hexadecimal"):
        create_app()


# -- models and providers ---------------------------------------------------------------------------

def test_models_crud_and_prices_apply_at_once(client):
    models = client.get("/api/models", headers=ADMIN).get_json()["data"]
    seeded = {"gpt-4o-mini", "claude-sonnet-4-5", "gemini-2.5-flash", "mistral-large-latest"}
    assert seeded <= {m["name"] for m in models}
    r = client.put("/api/models/house", json={"provider": "echo", "upstream_model": "echo",
                                              "input_cost_per_1k": 0.5, "output_cost_per_1k": 1.5,
                                              "task_types": ["summarization"]}, headers=ADMIN)
    assert r.status_code == 201 and r.get_json()["task_types"] == ["summarization"]
    r = client.post("/v1/chat/completions", json=chat("abcdefgh", model="house"), headers=auth(CLIENT_KEY))
    usage = r.get_json()["usage"]
    expected = (usage["prompt_tokens"] * 0.5 + usage["completion_tokens"] * 1.5) / 1000
    assert float(r.headers["x-llm-cost"]) == pytest.approx(expected)
    r = client.put("/api/models/house", json={"output_cost_per_1k": 3}, headers=ADMIN)  # only what is given changes
    assert r.status_code == 200 and r.get_json()["input_cost_per_1k"] == 0.5 and r.get_json()["output_cost_per_1k"] == 3
    assert client.get("/api/models/house", headers=ADMIN).get_json()["provider"] == "echo"
    assert client.delete("/api/models/house", headers=ADMIN).status_code == 200
    assert client.get("/api/models/house", headers=ADMIN).status_code == 404
    assert client.delete("/api/models/house", headers=ADMIN).status_code == 404


def test_model_validation(client):
    r = client.put("/api/models/new", json={"input_cost_per_1k": -1}, headers=ADMIN)
    assert r.status_code == 400
    assert {d["path"] for d in r.get_json()["error"]["details"]} == {"provider", "input_cost_per_1k"}
    r = client.put("/api/models/new", json={"provider": "openai", "fallbacks": "x", "speed": 1}, headers=ADMIN)
    assert {d["path"] for d in r.get_json()["error"]["details"]} == {"fallbacks", "speed"}


def test_providers_override_and_reset(client, upstream):
    names = [p["name"] for p in client.get("/api/providers", headers=ADMIN).get_json()["data"]]
    assert {"openai", "anthropic", "gemini", "mistral", "echo"} <= set(names)
    r = client.put("/api/providers/openai", json={"api_base": upstream.url + "/", "enabled": True}, headers=ADMIN)
    assert r.status_code == 200 and r.get_json()["base_url"] == upstream.url
    r = client.post("/v1/chat/completions", json=chat(model="gpt-4o-mini"),
                    headers={**auth(CLIENT_KEY), "x-llm-apikey": "sk-x"})
    assert r.status_code == 200 and len(upstream.posts) == 1  # reached through the database's api_base
    client.put("/api/providers/openai", json={"api_base": upstream.url, "enabled": False}, headers=ADMIN)
    r = client.post("/v1/chat/completions", json=chat(model="gpt-unlisted"),
                    headers={**auth(CLIENT_KEY), "x-llm-apikey": "sk-x"})
    assert r.status_code == 400
    assert client.delete("/api/providers/openai", headers=ADMIN).get_json()["api_base"] is None
    assert client.get("/api/providers/nosuch", headers=ADMIN).status_code == 404
    r = client.put("/api/providers/openai", json={"api_base": "ftp://x", "enabled": "yes"}, headers=ADMIN)
    assert {d["path"] for d in r.get_json()["error"]["details"]} == {"api_base", "enabled"}


# -- usage ------------------------------------------------------------------------------------------

def test_usage_and_me(client):
    price_echo(client, 1.0, 2.0)
    alice_id, alice = create_key(client, rpm_limit=100)
    bob_id, bob = create_key(client)
    for _ in range(3):
        client.post("/v1/chat/completions", json=chat("hello alice"), headers=auth(alice))
    client.post("/v1/chat/completions", json=chat("bob", model="echo/x"), headers=auth(bob))
    total = client.get("/api/usage", headers=ADMIN).get_json()["total"]
    assert total["requests"] == 4 and total["total_tokens"] == total["prompt_tokens"] + total["completion_tokens"]
    by_key = {row["key_id"]: row for row in client.get("/api/usage?group_by=key", headers=ADMIN).get_json()["data"]}
    assert by_key[alice_id]["requests"] == 3 and by_key[bob_id]["requests"] == 1
    assert by_key[alice_id]["cost_nusd"] == client.get(f"/api/keys/{alice_id}", headers=ADMIN).get_json()["spend_nusd"]
    by_model = client.get("/api/usage?group_by=model", headers=ADMIN).get_json()["data"]
    assert {r["model"]: r["requests"] for r in by_model} == {"echo": 3, "echo/x": 1}
    assert client.get("/api/usage?group_by=provider", headers=ADMIN).get_json()["data"][0]["provider"] == "echo"
    days = client.get("/api/usage?group_by=day", headers=ADMIN).get_json()["data"]
    assert len(days) == 1 and len(days[0]["day"]) == 10 and days[0]["requests"] == 4
    assert client.get(f"/api/usage?key_id={bob_id}&model=echo/x", headers=ADMIN).get_json()["total"]["requests"] == 1
    assert client.get("/api/usage?since=2999-01-01", headers=ADMIN).get_json()["total"]["requests"] == 0
    assert client.get("/api/usage?until=1000", headers=ADMIN).get_json()["total"]["requests"] == 0
    assert client.get("/api/usage?group_by=colour", headers=ADMIN).status_code == 400
    assert client.get("/api/usage?since=yesterday", headers=ADMIN).status_code == 400
    assert client.get("/api/usage", headers=auth(alice)).status_code == 403

    me = client.get("/api/me", headers=auth(alice)).get_json()
    assert me["id"] == alice_id and me["rpm_limit"] == 100 and me["usage"]["requests"] == 3
    assert me["current_minute"]["requests"] == 3 and me["spend_nusd"] == me["usage"]["cost_nusd"] > 0
    assert client.get("/api/me", headers=auth(CLIENT_KEY)).get_json()["kind"] == "static"


def test_recent_usage_lists_the_newest_calls(client):
    _, alice = create_key(client)
    client.post("/v1/chat/completions", json=chat("first"), headers={**auth(alice), "X-Request-ID": "recent-1"})
    client.post("/v1/chat/completions", json=chat("second"), headers={**auth(alice), "X-Request-ID": "recent-2"})
    rows = client.get("/api/usage/recent?limit=1", headers=ADMIN).get_json()["data"]
    assert [r["request_id"] for r in rows] == ["recent-2"]
    assert rows[0]["provider"] == "echo" and rows[0]["status"] == "ok" and rows[0]["cached"] is False
    assert client.get("/api/usage/recent?limit=0", headers=ADMIN).status_code == 400
    assert client.get("/api/usage/recent", headers=auth(alice)).status_code == 403


def test_disabled_provider_is_not_used_even_for_listed_models(client, upstream):
    client.put("/api/providers/openai", json={"api_base": upstream.url, "enabled": False}, headers=ADMIN)
    r = client.post("/v1/chat/completions", json=chat(model="gpt-4o-mini"),
                    headers={**auth(CLIENT_KEY), "x-llm-apikey": "sk-x"})
    assert r.status_code == 400 and r.get_json()["error"]["type"] == "provider_not_configured"
    assert upstream.posts == []


# -- through real HTTP ------------------------------------------------------------------------------

def test_walkthrough_through_gunicorn(database_url, upstream):
    """The README's walk-through: create a key, store a provider key, call, see usage and cost, hit the limit."""
    env = {"DATABASE_URL": database_url, "ADMIN_API_KEY": ADMIN_KEY, "ENCRYPTION_KEY": ENCRYPTION_KEY_HEX,
           "OPENAI_BASE_URL": upstream.url, "MAX_RETRIES": "0", "REQUEST_TIMEOUT": "5"}
    with Gunicorn(env, workers=2, threads=4) as proxy:
        http = requests.Session()
        r = http.post(proxy.url + "/api/keys", json={"name": "demo", "rpm_limit": 2, "max_budget": 1}, headers=ADMIN)
        assert r.status_code == 201
        key_id, key = r.json()["id"], r.json()["key"]
        r = http.put(f"{proxy.url}/api/keys/{key_id}/provider-keys", json={"openai": "sk-demo"}, headers=ADMIN)
        assert r.json()["provider_keys"] == ["openai"]
        r = http.post(proxy.url + "/v1/chat/completions", json=chat(model="gpt-4o-mini"), headers=auth(key))
        assert r.status_code == 200 and r.headers["x-llm-cost"] == "0.0000045"
        assert r.headers["x-ratelimit-remaining-requests"] == "1"
        assert upstream.posts[-1]["headers"]["Authorization"] == "Bearer sk-demo"
        me = http.get(proxy.url + "/api/me", headers=auth(key)).json()
        assert me["spend_nusd"] == 4500 and me["usage"]["total_tokens"] == 15
        stream = http.post(proxy.url + "/v1/chat/completions", json=chat(stream=True), headers=auth(key))
        assert stream.status_code == 200 and stream.headers["x-ratelimit-remaining-requests"] == "0"
        r = http.post(proxy.url + "/v1/chat/completions", json=chat(), headers=auth(key))
        assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
        assert http.delete(f"{proxy.url}/api/keys/{key_id}", headers=ADMIN).status_code == 200
        assert http.post(proxy.url + "/v1/chat/completions", json=chat(), headers=auth(key)).status_code == 401

"""Client-chosen URLs (/execute endpoints, webhooks) reach public addresses only, even when DNS changes
its answer between the check and the connection (DNS rebinding)."""
from __future__ import annotations

import socket

import pytest
import requests

import urlguard
from support import FakeOpenAI, auth

PUBLIC_IP = "93.184.216.34"


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.1", False), ("172.16.0.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("::1", False), ("fe80::1%eth0", False), ("::ffff:127.0.0.1", False), ("fc00::1", False),
    ("2606:4700:4700::1111", True),
])
def test_only_globally_routable_addresses_are_public(address, public):
    assert urlguard.is_public(address) is public


@pytest.mark.parametrize("url", ["ftp://x.example/", "http://[::1", "http://x.example:99999/", "/relative", ""])
def test_urls_that_are_not_absolute_http_are_rejected(url):
    assert urlguard.host_and_port(url) is None


def test_a_host_with_any_private_address_is_refused(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in (PUBLIC_IP, "10.0.0.7")])
    with pytest.raises(urlguard.EndpointNotAllowed):
        urlguard.check_public("mixed.example", 443, what="webhookUrl", param="webhookUrl")


def test_dns_rebinding_cannot_reach_a_loopback_server(monkeypatch):
    real = socket.getaddrinfo
    answers = iter([PUBLIC_IP])  # the check sees a public address; the connection then gets 127.0.0.1

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.example":
            ip = next(answers, "127.0.0.1")
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with FakeOpenAI() as server:
        urlguard.check_public("rebind.example", server.port, what="webhookUrl", param="webhookUrl")
        with pytest.raises(requests.ConnectionError):
            urlguard.public_session().post(f"http://rebind.example:{server.port}/v1/hook", json={}, timeout=3)
        assert server.requests == []


def test_execute_is_protected_from_dns_rebinding_too(make_app, monkeypatch):
    real = socket.getaddrinfo
    answers = iter([PUBLIC_IP])

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers, "127.0.0.1"), port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    client = make_app(execute_allowed_hosts=("*",)).test_client()
    with FakeOpenAI() as server:
        r = client.post("/execute", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}, headers={
            **auth(), "x-llm-endpoint": f"http://rebind.example:{server.port}/v1/chat/completions",
            "x-llm-apikey": "k"})
        assert r.status_code == 502 and server.requests == []

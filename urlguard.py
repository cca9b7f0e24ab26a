"""Outbound URLs chosen by clients (/execute endpoints, webhooks): public addresses only, unless
ALLOW_PRIVATE_URLS. Checked twice: every address the host resolves to before the call, and the
address actually connected to (so a DNS answer that changes in between cannot reach a private one).
"""
from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from errors import APIError


class EndpointNotAllowed(APIError):
    status, type = 403, "endpoint_not_allowed"


def is_public(address: str) -> bool:
    """Whether an IP address is globally routable (not loopback, private, link-local, CGNAT, multicast...)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is loopback too
    return ip.is_global and not ip.is_multicast


def host_and_port(url: str) -> tuple[str, int] | None:
    """(host, port) of an absolute http(s) URL, or None when it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # an unclosed IPv6 bracket, a port out of range
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.hostname.lower(), port


def check_public(host: str, port: int, what: str, param: str) -> None:
    """403 endpoint_not_allowed unless every address of the host is public; OSError if it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except UnicodeError as exc:  # a label over 63 characters, say
        raise OSError(str(exc)) from None
    for *_, sockaddr in infos:
        if not is_public(sockaddr[0]):
            raise EndpointNotAllowed(f"The {what} resolves to a private or loopback address; set "
                                     "ALLOW_PRIVATE_URLS to allow it.", param=param)


class _PublicOnly:
    """A connection that refuses to talk to a non-public peer, whatever DNS said a moment ago."""

    def connect(self) -> None:
        super().connect()
        peer = self.sock.getpeername()[0]
        if not is_public(peer):
            self.sock.close()
            raise requests.ConnectionError("refused to connect to a non-public address")


class _PublicHTTPConnection(_PublicOnly, HTTPConnection):
    pass


class _PublicHTTPSConnection(_PublicOnly, HTTPSConnection):
    pass


class PublicOnlyAdapter(HTTPAdapter):
    """A requests adapter whose pools use the public-only connections."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("PublicHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": _PublicHTTPConnection}),
            "https": type("PublicHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": _PublicHTTPSConnection}),
        }
        self.poolmanager.key_fn_by_scheme = dict(self.poolmanager.key_fn_by_scheme)


def public_session(pool_maxsize: int = 64) -> requests.Session:
    """A session that can only reach public addresses (for client-chosen URLs)."""
    session = requests.Session()
    adapter = PublicOnlyAdapter(pool_connections=16, pool_maxsize=pool_maxsize)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
